"""Pretrains the demo's image encoder (configs/demo.py's ViT + projector) on the demo scenes.

  python -m big_vision_lite.tools.demo_encoder --out big_vision_lite/data/assets/demo_encoder.npz

PaliGemma starts from a pretrained SigLIP encoder; the demo starts from this one. The shipped
file (data/assets/demo_encoder.npz, loaded by configs/demo.py with model_load.only="img") was
made with this command (6000 steps, 4-5 minutes on 2 cores; on 512 validation scenes:
presence accuracy 0.995, kind 0.27, colour 0.97, box error 2.1 pixels of 64; after 2000
steps the box error was 4.2 and the demo's detection AP50 0.19, now 0.57), so the demo never
trains it at run time; rerun it after changing the demo's shapes or its image tower.

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


def scene_targets(record: dict) -> dict[str, np.ndarray]:
  """A demo record -> targets per slot (the objects left to right, as detection lists them):
  present f32[N], kind i32[N], colour i32[N], box i32[N, 4] (y1 x1 y2 x2 in BOX_BINS bins)."""
  objects = record["objects"]
  out = {"present": np.zeros(SLOTS, np.float32), "kind": np.zeros(SLOTS, np.int32),
         "colour": np.zeros(SLOTS, np.int32), "box": np.zeros((SLOTS, 4), np.int32)}
  if len(objects["label"]) > SLOTS:
    raise ValueError(f"demo_encoder: {len(objects['label'])} objects, more than SLOTS={SLOTS}")
  for i, (label, col, bbox) in enumerate(zip(objects["label"], objects["colour"],
                                             objects["bbox"])):
    out["present"][i] = 1.0
    out["kind"][i] = demo.KINDS.index(label)
    out["colour"][i] = demo.COLOUR_NAMES.index(col)
    out["box"][i] = np.clip(np.round(np.asarray(bbox) * (BOX_BINS - 1)), 0, BOX_BINS - 1)
  return out


def batches(split: str, image_size: int, batch_size: int, start: int = 0):
  """Endless {"image": f32[B,S,S,3] in [-1, 1], targets of `scene_targets`} of a demo split."""
  source = demo.DemoSource(split, image_size=image_size)
  i = start
  while True:
    records = [source[(i + j) % len(source)] for j in range(batch_size)]
    i += batch_size
    out = {"image": np.stack([r["image"] for r in records]).astype(np.float32) / 127.5 - 1.0}
    targets = [scene_targets(r) for r in records]
    out.update({k: np.stack([t[k] for t in targets]) for k in targets[0]})
    yield out


class Pretrainer(nn.Module):
  """The demo ViT (named "img", as inside PaliGemma) + a head on the mean of its tokens."""
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
            "box": out[..., colour_end:].reshape(-1, SLOTS, 4, BOX_BINS)}


def losses(pred: dict, batch: dict) -> dict[str, jax.Array]:
  """Presence (binary), kind, colour and box (soft over bins) cross-entropies, the last three
  on the slots with an object only."""
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
  return out


def evaluate(model: Pretrainer, params, batch: dict) -> dict[str, float]:
  """Presence, kind and colour accuracy and the mean box error in pixels of the objects."""
  pred = jax.device_get(model.apply({"params": params}, batch["image"]))
  present = batch["present"] > 0
  size = batch["image"].shape[1]
  err = np.abs(pred["box"].argmax(-1) - batch["box"]) * size / (BOX_BINS - 1)
  return {"presence_accuracy": float(np.mean((pred["present"] > 0) == present)),
          **{f"{k}_accuracy": float(np.mean(pred[k].argmax(-1)[present] == batch[k][present]))
             for k in ("kind", "colour")},
          "box_error_pixels": float(err[present].mean())}


def pretrain(img: dict, *, steps: int, batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
             val_examples: int = 512, log_every: int = 250, log=print) -> tuple[dict, dict]:
  """Trains the encoder; returns (its params {"img": ...}, validation metrics)."""
  if steps < 1:
    raise ValueError(f"demo_encoder: steps must be >= 1, got {steps}")
  model = Pretrainer(img)
  size = img["image_size"]
  grid = size // img["patch_size"][0]
  train = batches("train", size, batch_size)
  params = model.init(jax.random.PRNGKey(seed), jnp.asarray(next(train)["image"]))["params"]
  params["img"]["pos_embedding"] = jnp.asarray(sincos_posemb(grid, img["width"]))
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

  val = next(batches("val", size, val_examples))
  t0 = time.time()
  for s in range(1, steps + 1):
    params, opt, parts = step(params, opt, next(train))
    if s % log_every == 0 or s == steps:
      metrics = evaluate(model, params, val)
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
  parser.add_argument("--steps", type=int, default=6000)
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
