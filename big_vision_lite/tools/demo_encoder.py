"""Pretrains the demo's image encoder (configs/demo.py's ViT + projector) on the demo scenes.

  python -m big_vision_lite.tools.demo_encoder --out big_vision_lite/data/assets/demo_encoder.npz

PaliGemma starts from a pretrained SigLIP encoder; the demo starts from this one. The shipped
file (data/assets/demo_encoder.npz, loaded by configs/demo.py with model_load.only="img") was
made with this command (30000 steps of 32 scenes, 17 minutes on 2 cores; on 512 validation
scenes: presence accuracy 0.999, kind 0.875, colour 0.986, box error 0.96 pixels of 64, kind
of the patches an object covers 0.89), so the demo never trains it at run time; rerun it
after changing the demo's shapes or its image tower.

What takes long is the shapes. Colours and places come within 2000 steps (colour 0.90, box
error 3.8 pixels), the kind of an object stays near chance (1/6) until step ~7000 (0.28),
then rises (0.70 at step 15000). The previous encoder, 6000 steps on the per-object targets
alone, had kind 0.27; with it the demo wrote captions of word-F1 0.71 (now 0.955) and found
detection AP50 0.57 (now 0.88). The per-patch targets (each token names the kind and colour
of the object under it) came with the longer schedule: an encoder probe of 10000 steps with
both target sets (its heads on the tower's output, before the projector) reached kind 0.42.

Why a stage 0 (measured on 2 cores, 2026-11-28): trained from scratch inside the demo, the
ViT never learned where objects are. Its tokens carry position only through the learned
position embedding (init N(0, 1/width): RMS 0.09 vs 0.31 for the patch content), and every
readout the LLM has pools tokens (attention). Probes on the encoder alone, predicting the
first object's top edge: through a pooled readout (mean or attention) it learned nothing in
600 steps, while a readout with its own weights per token learned the coarse row in 100.
Within PaliGemma the LLM meanwhile learns to ignore the image (the <loc> loss on real images
equals the blank-image loss from step 50 on). Here the encoder learns to parse the scene
from the mean of its tokens (for each object, left to right as detection lists them: is it
there, its kind, its colour, its box): a pooled readout, so positions have to live in the
tokens, where the LLM can read them. The position embedding starts as a 2D sin-cos table of
RMS `POSEMB_RMS`, with which pooled position features appear within a few hundred steps
(from N(0, 1/width) none did in 600).
"""
import argparse
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_vision_lite import param_tree
from big_vision_lite.data import demo
from big_vision_lite.models import siglip

POSEMB_RMS = 3.0
BOX_BINS = 64      # Box coordinates are classified in BOX_BINS bins per image side ...
BOX_SIGMA = 3.0    # ... against a Gaussian of this width in bins: near misses count as near.
SLOTS = 3          # The demo draws 1-3 objects.
TOKEN_MIN_COVER = 0.2  # A patch is labelled with an object that covers this much of it.
_KINDS, _COLOURS = len(demo.KINDS), len(demo.COLOUR_NAMES)
_SLOT_OUT = 1 + _KINDS + _COLOURS + 4 * BOX_BINS


def sincos_posemb(grid: int, width: int, rms: float = POSEMB_RMS) -> np.ndarray:
  """float32[1, grid*grid, width]: rows then columns, sin and cos over width/4 frequencies."""
  if width % 4:
    raise ValueError(f"sincos_posemb: width {width} must be a multiple of 4")
  freq = 1.0 / 100.0 ** (np.arange(width // 4) / (width // 4))
  yy, xx = np.mgrid[:grid, :grid]
  parts = []
  for coord in (yy.reshape(-1), xx.reshape(-1)):
    angle = coord[:, None] * freq[None]
    parts += [np.sin(angle), np.cos(angle)]
  table = np.concatenate(parts, axis=1)
  return (table * (rms / np.sqrt(np.mean(table ** 2))))[None].astype(np.float32)


def scene_targets(record: dict, patch: int) -> dict[str, np.ndarray]:
  """A demo record -> the pretraining targets.

  Per slot (the objects left to right, as detection lists them): present f32[SLOTS], kind
  i32[SLOTS], colour i32[SLOTS], box i32[SLOTS, 4] (y1 x1 y2 x2 in BOX_BINS bins). Per patch
  (row-major, as the ViT's tokens): token_kind, token_colour i32[(S/patch)**2], the kind and
  colour of the object that covers most of the patch if it covers at least TOKEN_MIN_COVER of
  it, else background (len(KINDS), len(COLOUR_NAMES)).
  """
  objects = record["objects"]
  n = len(objects["label"])
  if n > SLOTS:
    raise ValueError(f"demo_encoder: {n} objects, more than SLOTS={SLOTS}")
  size = record["image"].shape[0]
  if patch <= 0 or size % patch:
    raise ValueError(f"demo_encoder: image size {size} is not a multiple of patch {patch}")
  out = {"present": np.zeros(SLOTS, np.float32), "kind": np.zeros(SLOTS, np.int32),
         "colour": np.zeros(SLOTS, np.int32), "box": np.zeros((SLOTS, 4), np.int32)}
  kinds = np.array([demo.KINDS.index(k) for k in objects["label"]] + [_KINDS], np.int32)
  colours = np.array([demo.COLOUR_NAMES.index(c) for c in objects["colour"]] + [_COLOURS],
                     np.int32)
  out["present"][:n] = 1.0
  out["kind"][:n], out["colour"][:n] = kinds[:n], colours[:n]
  out["box"][:n] = np.clip(np.round(np.asarray(objects["bbox"]) * (BOX_BINS - 1)), 0,
                           BOX_BINS - 1)
  g = size // patch
  best = np.full(g * g, n)  # Index n of kinds/colours: background.
  if n:
    cover = np.asarray(objects["mask"], np.float32).reshape(n, g, patch, g, patch).mean((2, 4))
    cover = cover.reshape(n, g * g)
    best = np.where(cover.max(0) >= TOKEN_MIN_COVER, cover.argmax(0), n)
  out["token_kind"], out["token_colour"] = kinds[best], colours[best]
  return out


def render_scenes(split: str, image_size: int, patch: int, count: int) -> dict[str, np.ndarray]:
  """The first `count` scenes of a demo split, stacked: image uint8[N,S,S,3] and the targets
  of `scene_targets`."""
  source = demo.DemoSource(split, image_size=image_size)
  if not 1 <= count <= len(source):
    raise ValueError(f"demo_encoder: {count} {split} scenes asked for, the split has "
                     f"{len(source)}")
  records = (source[i] for i in range(count))
  parts = [(r["image"], scene_targets(r, patch)) for r in records]
  out = {"image": np.stack([image for image, _ in parts])}
  out.update({k: np.stack([t[k] for _, t in parts]) for k in parts[0][1]})
  return out


def model_input(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1], as the demo's pp (value_range(-1, 1)) makes them."""
  return images.astype(np.float32) / 127.5 - 1.0


class Pretrainer(nn.Module):
  """The demo ViT (named "img", as inside PaliGemma), a head on the mean of its tokens (per
  slot) and one on each token (per patch)."""
  img: dict
  hidden: int = 256

  @nn.compact
  def __call__(self, image):
    tokens, _ = siglip.ViT(**self.img, name="img")(image)
    h = nn.RMSNorm()(tokens.mean(axis=1))
    h = nn.gelu(nn.Dense(self.hidden)(h))
    out = nn.Dense(SLOTS * _SLOT_OUT)(h).reshape(-1, SLOTS, _SLOT_OUT)
    kind_end = 1 + _KINDS
    colour_end = kind_end + _COLOURS
    return {"present": out[..., 0], "kind": out[..., 1:kind_end],
            "colour": out[..., kind_end:colour_end],
            "box": out[..., colour_end:].reshape(-1, SLOTS, 4, BOX_BINS),
            "token_kind": nn.Dense(_KINDS + 1, name="token_kind")(tokens),
            "token_colour": nn.Dense(_COLOURS + 1, name="token_colour")(tokens)}


def losses(pred: dict, batch: dict) -> dict[str, jax.Array]:
  """Presence (binary), kind, colour and box (soft over bins) cross-entropies, the last three
  on the slots with an object only; per-patch kind and colour cross-entropies."""
  present = batch["present"]
  n = jnp.maximum(present.sum(), 1.0)
  out = {"present": optax.sigmoid_binary_cross_entropy(pred["present"], present).mean()}
  for key in ("kind", "colour"):
    out[key] = jnp.sum(present * optax.softmax_cross_entropy_with_integer_labels(
        pred[key], batch[key])) / n
  bins = jnp.arange(BOX_BINS).reshape((1,) * batch["box"].ndim + (BOX_BINS,))
  soft = jax.nn.softmax(-0.5 * ((bins - batch["box"][..., None]) / BOX_SIGMA) ** 2, axis=-1)
  box = optax.softmax_cross_entropy(pred["box"], soft).sum(-1)  # [B, SLOTS]
  out["box"] = jnp.sum(present * box) / n
  for key in ("token_kind", "token_colour"):
    out[key] = optax.softmax_cross_entropy_with_integer_labels(pred[key], batch[key]).mean()
  return out


def evaluate(predict, params, scenes: dict) -> dict[str, float]:
  """Presence, kind and colour accuracy and the mean box error in pixels of the objects; kind
  accuracy of the patches an object covers. predict: (params, images) -> Pretrainer outputs."""
  pred = jax.device_get(predict(params, model_input(scenes["image"])))
  present = scenes["present"] > 0
  size = scenes["image"].shape[1]
  err = np.abs(pred["box"].argmax(-1) - scenes["box"]) * size / (BOX_BINS - 1)
  covered = scenes["token_kind"] < _KINDS
  token_kind = pred["token_kind"].argmax(-1)
  return {"presence_accuracy": float(np.mean((pred["present"] > 0) == present)),
          **{f"{k}_accuracy": float(np.mean(pred[k].argmax(-1)[present] == scenes[k][present]))
             for k in ("kind", "colour")},
          "box_error_pixels": float(err[present].mean()),
          "token_kind_accuracy": float(np.mean(token_kind[covered]
                                               == scenes["token_kind"][covered]))}


def pretrain(img: dict, *, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             train_scenes: int = 40_000, val_examples: int = 512, log_every: int = 1000,
             log=print) -> tuple[dict, dict]:
  """Trains the encoder on random batches of the first `train_scenes` training scenes (drawn
  once, up front: rendering each batch anew would take as long as the step); returns (its
  params {"img": ...}, validation metrics)."""
  if steps < 1:
    raise ValueError(f"demo_encoder: steps must be >= 1, got {steps}")
  model = Pretrainer(img)
  size, patch = img["image_size"], img["patch_size"][0]
  if tuple(img["patch_size"]) != (patch, patch):
    raise ValueError(f"demo_encoder: square patches only, got {img['patch_size']}")
  t0 = time.time()
  train = render_scenes("train", size, patch, min(train_scenes, steps * batch_size))
  val = render_scenes("val", size, patch, val_examples)
  log(f"rendered {len(train['image'])} training and {val_examples} validation scenes "
      f"({time.time() - t0:.0f}s)")
  params = model.init(jax.random.PRNGKey(seed), model_input(train["image"][:1]))["params"]
  params["img"]["pos_embedding"] = jnp.asarray(sincos_posemb(size // patch, img["width"]))
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule, b2=0.98))
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    def loss_fn(p):
      parts = losses(model.apply({"params": p}, batch["image"]), batch)
      return sum(parts.values()), parts
    (_, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, parts

  predict = jax.jit(lambda p, x: model.apply({"params": p}, x))  # Compiled once, not per eval.
  order = np.random.default_rng(seed)
  t0 = time.time()
  for s in range(1, steps + 1):
    idx = order.integers(0, len(train["image"]), batch_size)
    batch = {k: v[idx] for k, v in train.items()}
    batch["image"] = model_input(batch["image"])
    params, opt, parts = step(params, opt, batch)
    if s % log_every == 0 or s == steps:
      metrics = evaluate(predict, params, val)
      log(f"step {s}/{steps} ({time.time() - t0:.0f}s): "
          + " ".join(f"{k}_loss={float(v):.3f}" for k, v in parts.items()) + " val: "
          + " ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
  return {"img": params["img"]}, metrics  # The last step always logs, so these are final.


def save(path: str, params: dict) -> None:
  """Writes {"img": ...} as a big_vision .npz ("params/img/..." keys, scanned layers), which
  model_init + model_load.only="img" load into a PaliGemma of the same image tower."""
  flat = param_tree.flatten(jax.device_get(params))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"  # Renamed when complete: a reader never sees half a file.
  with open(tmp, "wb") as f:
    np.savez(f, **{f"params/{k}": np.asarray(v, np.float32) for k, v in flat.items()})
  os.replace(tmp, path)

def main(argv=None):
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="where to write the encoder npz")
  parser.add_argument("--steps", type=int, default=30000)
  parser.add_argument("--res", type=int, default=64, help="image size (configs/demo.py res)")
  parser.add_argument("--patch", type=int, default=16, help="patch size (configs/demo.py patch)")
  args = parser.parse_args(argv)
  if args.patch <= 0 or args.res % args.patch:
    parser.error(f"--res {args.res} must be a multiple of --patch {args.patch}")
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  img = dict(demo_config.image_tower(res=args.res, patch=args.patch),
             num_classes=demo_config.LLM_WIDTH)
  params, metrics = pretrain(img, steps=args.steps)
  save(args.out, params)
  print(f"wrote {args.out}: {metrics}")


if __name__ == "__main__":
  main()
