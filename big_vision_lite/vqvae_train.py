r"""Trains a mask VQ-VAE (models/vqvae.py) on binary masks.

  python -m big_vision_lite.vqvae_train --config configs/vqvae_masks.py --workdir DIR

writes DIR/vqvae.npz (vqvae.load reads it) and DIR/metrics.jsonl. Loss: sigmoid BCE of
the mask logits + codebook and commitment terms (straight-through estimator); dead codes
are re-seeded from encoder outputs; codebook usage (perplexity, used codes) and the
reconstruction IoU on a held-out split are logged.

Masks come from `train(config, workdir, masks=...)` (any iterable of float32[64,64,1] in
[0,1], or a callable returning one), a folder of mask PNGs, or the built-in synthetic
shapes (`synthetic_masks`).
"""
import itertools
import json
import math
import os
import pathlib
import time
from typing import Callable, Iterable, Iterator

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import PIL.Image
import PIL.ImageDraw

from big_vision_lite.models import vqvae

S = vqvae.MASK_SIZE

# Every key the trainer reads (configs/vqvae_masks.py sets them all): anything else is a typo.
_SCHEMA = {
    "seed": None, "total_steps": None, "batch_size": None, "log_every": None,
    "eval_every": None, "model": None,
    "optim": {"lr", "warmup_steps", "end_lr_frac", "b2", "grad_clip_norm"},
    "loss": {"codebook_weight", "commitment_weight"},
    "reseed": {"every", "until_frac", "min_count"},
    "data": {"source", "folder", "crop_to_box", "flip", "val_size"},
}


def _check_config(config: ml_collections.ConfigDict) -> vqvae.VQVAEConfig:
  """Unknown or missing keys are errors; returns the model config."""
  have = set(config.keys())
  if have != set(_SCHEMA):
    raise ValueError(f"vqvae_train config: unknown keys {sorted(have - set(_SCHEMA))}, "
                     f"missing keys {sorted(set(_SCHEMA) - have)}")
  for group, keys in _SCHEMA.items():
    if keys is not None and set(config[group].keys()) != keys:
      sub = set(config[group].keys())
      raise ValueError(f"vqvae_train config.{group}: unknown keys {sorted(sub - keys)}, "
                       f"missing keys {sorted(keys - sub)}")
  try:
    return vqvae.VQVAEConfig(**config.model.to_dict())
  except TypeError as e:
    raise ValueError(f"vqvae_train config.model: {e} (fields of vqvae.VQVAEConfig)") from e


# ----------------------------------------------------------------------------------------
# Mask sources.

def _polygon(rng, kind, cy, cx, r):
  """Vertices (x, y) of a random shape of size ~r around (cy, cx), random rotation."""
  rot = rng.uniform(0, 2 * np.pi)
  if kind == "disc":  # Ellipse.
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    rad = np.stack([np.full_like(t, r), np.full_like(t, r * rng.uniform(0.5, 1.0))])
  elif kind == "rectangle":
    a, b = r, r * rng.uniform(0.3, 1.0)
    return _rotate(np.array([a, -a, -a, a]), np.array([b, b, -b, -b]), rot, cy, cx)
  elif kind == "triangle":
    t = np.sort(rng.uniform(0, 2 * np.pi, 3))
    t[1] = max(t[1], t[0] + 0.6)
    t[2] = max(t[2], t[1] + 0.6)
    rad = np.full((2, 3), r)
  else:  # Star.
    n = rng.integers(4, 8)
    t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
    inner = rng.uniform(0.35, 0.6)
    rad = np.tile(np.where(np.arange(2 * n) % 2 == 0, r, r * inner), (2, 1))
  return _rotate(np.cos(t) * rad[0], np.sin(t) * rad[1], rot, cy, cx)


def _rotate(x, y, rot, cy, cx):
  c, s = np.cos(rot), np.sin(rot)
  return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def synthetic_mask(rng: np.random.Generator, crop_to_box: float = 0.5,
                   canvas: int = 128) -> np.ndarray:
  """float32[64,64,1]: 1-2 random discs/rectangles/triangles/stars/rings.

  With probability crop_to_box the shape is cropped to its tight box and resized to 64x64
  (soft edges), like the VQ-VAE inputs that seg targets make; otherwise it sits at a
  random place in the frame.
  """
  img = PIL.Image.new("L", (canvas, canvas), 0)
  draw = PIL.ImageDraw.Draw(img)
  for j in range(1 + int(rng.random() < 0.25)):
    kind = rng.choice(["disc", "rectangle", "triangle", "star", "ring"])
    r = rng.uniform(0.08, 0.45) * canvas
    cy, cx = rng.uniform(0.1, 0.9, 2) * canvas
    if kind == "ring":
      draw.polygon(_polygon(rng, "disc", cy, cx, r), fill=255)
      draw.ellipse([cx - r * 0.4, cy - r * 0.4, cx + r * 0.4, cy + r * 0.4], fill=0)
    else:
      draw.polygon(_polygon(rng, kind, cy, cx, r), fill=255 if j == 0 or rng.random() < 0.8 else 0)
  return _to_64(np.asarray(img) > 127, rng.random() < crop_to_box)


def _to_64(mask: np.ndarray, crop: bool) -> np.ndarray:
  """bool[H,W] -> float32[64,64,1]: cropped to the tight box or the whole frame, resized."""
  box = vqvae.tight_box(mask) if crop else None
  if box is None:
    box = (0, 0) + mask.shape
  return np.clip(vqvae.crop_mask_to_box(mask, box), 0.0, 1.0)


def synthetic_masks(seed: int = 0, crop_to_box: float = 0.5) -> Iterator[np.ndarray]:
  """Endless float32[64,64,1] synthetic masks (see synthetic_mask)."""
  rng = np.random.default_rng(seed)
  while True:
    yield synthetic_mask(rng, crop_to_box)


def read_mask_png(path: str | os.PathLike) -> np.ndarray:
  """bool[H,W]: pixels above half the mask's maximum (0/1 and 0/255 masks alike).

  The rule of tools/seg_targets.py's binary mode; colour channels are max-reduced, alpha dropped.
  """
  try:
    with PIL.Image.open(path) as im:
      a = np.asarray(im)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable mask image ({e})") from e
  if a.ndim == 3:
    a = a[..., :3].max(axis=-1) if a.shape[-1] >= 3 else a[..., 0]
  a = a.astype(np.float64)
  return a > a.max() / 2 if a.max() > 0 else np.zeros(a.shape, bool)


def folder_masks(folder: str, seed: int, crop_to_box: float, flip: bool,
                 val_size: int) -> tuple[Callable[[], Iterator[np.ndarray]], np.ndarray]:
  """Mask PNGs under folder -> (endless shuffled train stream, float32[N,64,64,1] val)."""
  files = sorted(pathlib.Path(folder).rglob("*.png")) if folder else []
  if not files:
    raise ValueError(f"config.data.folder={folder!r}: no .png masks found (searched recursively)")
  masks = [m for m in (read_mask_png(f) for f in files) if m.any()]
  if len(masks) < 2:
    raise ValueError(f"config.data.folder={folder!r}: need at least 2 non-empty masks, "
                     f"found {len(masks)} of {len(files)} files")
  order = np.random.default_rng(seed).permutation(len(masks))
  n_val = min(val_size, len(masks) // 5) or 1  # At most 20% held out.
  # Validation on box crops: what the VQ-VAE encodes when it makes seg targets.
  val = np.stack([_to_64(masks[i], True) for i in order[:n_val]])
  train = [masks[i] for i in order[n_val:]]

  def stream():
    rng = np.random.default_rng(seed + 1)
    while True:
      for i in rng.permutation(len(train)):
        m = train[i][:, ::-1] if flip and rng.random() < 0.5 else train[i]
        yield _to_64(m, rng.random() < crop_to_box)
  return stream, val


def _checked(it: Iterable, what: str) -> Iterator[np.ndarray]:
  for i, m in enumerate(it):
    m = np.asarray(m, np.float32)
    if m.shape == (S, S):
      m = m[..., None]
    if m.shape != (S, S, 1):
      raise ValueError(f"{what}: item {i} has shape {m.shape}, expected float32[{S},{S},1]")
    if not (np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0):
      raise ValueError(f"{what}: item {i} has values outside [0, 1]")
    yield m


def _sources(config, masks) -> tuple[Iterator[np.ndarray], np.ndarray]:
  """(endless train iterator, float32[N,64,64,1] validation masks)."""
  d = config.data
  if masks is None and d.source == "synthetic":
    train = synthetic_masks(config.seed, d.crop_to_box)
    val = np.stack(list(itertools.islice(synthetic_masks(config.seed + 10_000, d.crop_to_box),
                                         d.val_size)))
    return train, val
  if masks is None and d.source == "folder":
    stream, val = folder_masks(d.folder, config.seed, d.crop_to_box, d.flip, d.val_size)
    return _checked(stream(), f"folder {d.folder}"), val
  if masks is None:
    raise ValueError(f"config.data.source must be 'synthetic' or 'folder', got {d.source!r}")
  # A given finite collection: up to 20% (at most val_size) held out, the rest cycled.
  if hasattr(masks, "__len__") and not callable(masks):
    items = list(_checked(masks, "masks"))
    n_val = min(d.val_size, len(items) // 5) or 1
    if len(items) < 2:
      raise ValueError(f"masks: need at least 2 masks, got {len(items)}")
    def cycle():
      rng = np.random.default_rng(config.seed)
      while True:
        for i in rng.permutation(len(items) - n_val):
          yield items[n_val + i]
    return cycle(), np.stack(items[:n_val])

  # A generator / callable: its first val_size masks are held out.
  def endless():
    while True:
      n = 0
      for m in _checked(masks() if callable(masks) else masks, "masks"):
        n += 1
        yield m
      if not callable(masks) or n == 0:
        raise ValueError("masks: the iterator ran out; pass a callable (called again for each "
                         "pass) or an endless generator")
  it = endless()
  val = np.stack(list(itertools.islice(it, d.val_size)))
  return it, val


# ----------------------------------------------------------------------------------------
# Metrics.

def iou(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """float32[B]: IoU of (logits > 0) with (targets > 0.5); 1 where both are empty."""
  p = np.asarray(logits).reshape(len(logits), -1) > 0
  t = np.asarray(targets).reshape(len(targets), -1) > 0.5
  inter, union = (p & t).sum(1), (p | t).sum(1)
  return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def usage_stats(counts: np.ndarray) -> dict[str, float]:
  """Perplexity exp(H(p)) of code frequencies and the number of codes used."""
  p = counts / max(counts.sum(), 1)
  h = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0))
  return {"perplexity": float(np.exp(h)), "used_codes": int((counts > 0).sum())}


# ----------------------------------------------------------------------------------------
# Training.

def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
          masks: Iterable | Callable[[], Iterable] | None = None) -> dict:
  """Trains, writes workdir/vqvae.npz and workdir/metrics.jsonl; returns the last metrics."""
  model_cfg = _check_config(config)
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  model = vqvae.VQVAE(model_cfg)
  train_it, val_masks = _sources(config, masks)

  def next_batch():
    return np.stack([next(train_it) for _ in range(config.batch_size)])

  # --- model + optimizer ---
  params = vqvae.init_params(model_cfg, config.seed)
  o = config.optim
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.lr, max(o.warmup_steps, 1), max(config.total_steps, o.warmup_steps + 1),
      end_value=o.lr * o.end_lr_frac)
  tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm),
                   optax.adam(schedule, b2=o.b2))
  opt_state = tx.init(params)
  lw = config.loss

  def loss_fn(p, batch):
    logits, aux = model.apply({"params": p}, batch)
    z_e, z_q = aux["z_e"], aux["z_q"]
    bce = optax.sigmoid_binary_cross_entropy(logits, batch).mean()
    codebook = jnp.mean((jax.lax.stop_gradient(z_e) - z_q) ** 2)
    commit = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2)
    loss = bce + lw.codebook_weight * codebook + lw.commitment_weight * commit
    counts = jnp.zeros(model_cfg.num_codes, jnp.int32).at[aux["codes"].reshape(-1)].add(1)
    return loss, {"loss": loss, "bce": bce, "codebook_loss": codebook,
                  "commitment_loss": commit, "counts": counts, "z_e": z_e}

  @jax.jit
  def train_step(p, s, batch):
    grads, m = jax.grad(loss_fn, has_aux=True)(p, batch)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s, m

  @jax.jit
  def reconstruct(p, batch):
    codes = model.apply({"params": p}, batch, method=vqvae.VQVAE.encode_codes)
    return model.apply({"params": p}, codes, method=vqvae.VQVAE.decode_codes), codes

  def evaluate(p):
    logits, codes = [], []
    bs = config.batch_size
    for i in range(0, len(val_masks), bs):
      chunk = val_masks[i:i + bs]
      n = len(chunk)  # Pad the last chunk: one compiled shape.
      chunk = np.concatenate([chunk, np.zeros((bs - n,) + chunk.shape[1:], np.float32)])
      out = jax.device_get(reconstruct(p, chunk))
      logits.append(out[0][:n])
      codes.append(out[1][:n])
    logits = np.concatenate(logits)
    counts = np.bincount(np.concatenate(codes).reshape(-1), minlength=model_cfg.num_codes)
    bce = np.mean(np.asarray(optax.sigmoid_binary_cross_entropy(logits, val_masks)))
    u = usage_stats(counts)
    return {"val_iou": float(iou(logits, val_masks).mean()), "val_bce": float(bce),
            "val_perplexity": u["perplexity"], "val_used_codes": u["used_codes"]}

  rng = np.random.default_rng(config.seed)
  reseed_until = int(config.reseed.until_frac * config.total_steps)

  def reseed(p, window_counts, z_e):
    """Dead codes := random encoder outputs of the last batch (+ tiny noise to split twins)."""
    dead = np.flatnonzero(window_counts < config.reseed.min_count)
    if dead.size == 0:
      return p, 0
    z = np.asarray(z_e).reshape(-1, model_cfg.code_dim)
    pick = rng.choice(len(z), size=dead.size, replace=dead.size > len(z))
    cb = np.array(p["codebook"])
    cb[dead] = z[pick] + 1e-3 * z.std() * rng.standard_normal((dead.size, z.shape[1]))
    return {**p, "codebook": jnp.asarray(cb, jnp.float32)}, int(dead.size)

  # --- loop ---
  metrics_path = workdir / "metrics.jsonl"
  metrics_path.write_text("")

  def log(step, m):
    line = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}}
    with open(metrics_path, "a") as f:  # Appended line by line: readable while training.
      f.write(json.dumps(line) + "\n")
    print(" ".join(f"{k}={v}" for k, v in line.items()), flush=True)

  init = evaluate(params)
  log(0, {"phase": "init", **init})
  window = np.zeros(model_cfg.num_codes, np.int64)  # Code usage since the last re-seed.
  log_counts = np.zeros(model_cfg.num_codes, np.int64)
  acc, n_acc, t0, last = {}, 0, time.time(), {}
  for step in range(1, config.total_steps + 1):
    params, opt_state, m = train_step(params, opt_state, next_batch())
    counts, z_e = np.asarray(m.pop("counts")), m.pop("z_e")
    window += counts
    log_counts += counts
    # After step 1 this re-seeds nearly every code: a data-dependent codebook init.
    if step == 1 or (step % config.reseed.every == 0 and step <= reseed_until):
      params, n_dead = reseed(params, window, z_e)
      acc["reseeded"] = acc.get("reseeded", 0.0) + n_dead
      window[:] = 0
    for k, v in m.items():
      acc[k] = acc.get(k, 0.0) + float(v)
    n_acc += 1
    if not math.isfinite(acc["loss"]):
      raise FloatingPointError(f"vqvae_train: loss is {acc['loss']} at step {step}")
    if step % config.log_every == 0 or step == config.total_steps:
      dt = time.time() - t0
      last = {k: v / n_acc for k, v in acc.items() if k != "reseeded"}
      last.update(usage_stats(log_counts), reseeded=int(acc.get("reseeded", 0)),
                  lr=float(schedule(step)), masks_per_s=n_acc * config.batch_size / dt)
      if step % config.eval_every == 0 or step == config.total_steps:
        last.update(evaluate(params))
      log(step, last)
      acc, n_acc, t0 = {}, 0, time.time()
      log_counts[:] = 0
  vqvae.save(workdir / "vqvae.npz", model_cfg, jax.device_get(params))
  return {"init_val_iou": init["val_iou"], **last}


_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/vqvae_masks.py[:arg]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (vqvae.npz, metrics.jsonl).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
