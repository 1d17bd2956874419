"""Mask VQ-VAE of PaliGemma's segmentation output: 64x64 mask <-> 16 codes.

The architecture of big_vision's `evaluators/proj/paligemma/transfers/segmentation.py`
(decoder) and `pp/proj/paligemma/segmentation.py` (encoder), which read the official
`vae-oid.npz` (a PyTorch state dict). Every width and kernel size is taken from the
weights; only the layer counts are fixed (4 stride-2 layers take 64x64 to the 4x4
grid of 16 codes, 2 residual blocks on each side).

Axis legend: B batch, K codebook entries, D code width, C channels.

Two file layouts: official (`_vq_vae._embedding` [K,D], `encoder.N.weight` / `decoder.N.weight`
in PyTorch layout [out,in,kh,kw], ConvTranspose2d [in,out,kh,kw], + `.bias`) and ours (what
`save` writes: npz of the flax tree with "/"-joined keys, `codebook` [K,D], `encoder/Conv_0/kernel`
HWIO, ..., `decoder/ConvTranspose_0/kernel` [kh,kw,out,in] as flax's `transpose_kernel=True`).
"""
import dataclasses
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image

GRID = 4  # 4x4 codes per mask.
TOKENS_PER_MASK = GRID * GRID
MASK_SIZE = 64
NUM_DOWN = 4  # 64 / 2**4 = GRID.
NUM_RES_BLOCKS = 2


@dataclasses.dataclass(frozen=True)
class VQVAEConfig:
  """Shapes of a mask VQ-VAE (defaults: the official `vae-oid.npz` decoder)."""
  num_codes: int = 128
  code_dim: int = 512
  enc_channels: tuple[int, ...] = (16, 32, 64, 128)  # Strided convs; last = res width.
  enc_kernels: tuple[int, ...] = (4, 4, 4, 4)
  enc_res_hidden: int = 128
  enc_res_kernels: tuple[int, ...] = (3, 3, 1)
  enc_out_kernel: int = 1
  dec_width: int = 128  # First conv's output = residual blocks' width.
  dec_in_kernel: int = 1
  dec_res_hidden: int = 128
  dec_res_kernels: tuple[int, ...] = (3, 3, 1)
  dec_channels: tuple[int, ...] = (128, 64, 32, 16)  # Stride-2 transposed convs.
  dec_kernels: tuple[int, ...] = (4, 4, 4, 4)
  dec_out_kernel: int = 1

  def __post_init__(self):
    lengths = dict(enc_channels=NUM_DOWN, enc_kernels=NUM_DOWN, dec_channels=NUM_DOWN,
                   dec_kernels=NUM_DOWN, enc_res_kernels=3, dec_res_kernels=3)
    for name, n in lengths.items():
      v = tuple(int(x) for x in getattr(self, name))
      if len(v) != n or min(v) < 1:
        raise ValueError(f"VQVAEConfig.{name}: expected {n} positive entries, got {v}")
      object.__setattr__(self, name, v)  # Lists (from a ConfigDict) -> hashable tuples.
    if any(k % 2 == 0 for k in self.enc_res_kernels + self.dec_res_kernels):
      raise ValueError("VQVAEConfig: residual block kernels must be odd ('SAME' = big_vision's)")
    if any(k % 2 for k in self.dec_kernels):  # Else a stride-2 transpose is not exactly 2x.
      raise ValueError(f"VQVAEConfig.dec_kernels must be even, got {self.dec_kernels}")


class ResBlock(nn.Module):
  """x + conv(relu(conv(relu(conv(x))))), 'SAME' padding (= big_vision's 1/1/0 for 3/3/1)."""
  features: int
  hidden: int
  kernels: tuple[int, ...]
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    y = x
    for i, (k, f) in enumerate(zip(self.kernels, (self.hidden, self.hidden, self.features))):
      y = nn.Conv(f, (k, k), padding="SAME", precision=self.precision)(y)
      if i < 2:
        y = nn.relu(y)
    return x + y


class UpConv(nn.Module):
  """Stride-2 transposed conv = torch ConvTranspose2d(k, stride=2, padding=k/2-1).

  The kernel is float32[k,k,out,in], flax's `ConvTranspose(transpose_kernel=True)` layout
  (what big_vision loads). Computed as a stride-1 conv to 4*out channels (one set per output
  pixel parity) + depth-to-space: the same sums, but XLA:CPU runs the lhs-dilated conv of
  `lax.conv_transpose` (and above all its gradient) ~10x slower.
  """
  features: int
  kernel_size: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    k, f, cin = self.kernel_size, self.features, x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=-1, out_axis=-2),
                        (k, k, f, cin))
    bias = self.param("bias", nn.initializers.zeros, (f,))
    pad = k // 2 - 1  # torch padding.
    # Output 2m+r sums x[m+d] * kernel[t] over taps t = r + pad - 2d in [0, k).
    offsets = [d for d in range(-k, k + 1) if any(0 <= r + pad - 2 * d < k for r in (0, 1))]
    t = np.array([[r + pad - 2 * d for r in (0, 1)] for d in offsets])  # [n, 2]
    valid, t = (t >= 0) & (t < k), np.clip(t, 0, k - 1)
    sub = jnp.where(valid[:, :, None, None, None], kernel[t], 0.0)  # [dy, ry, kx, out, in]
    # -> [dy, ry, dx, rx, out, in]
    sub = jnp.where(valid[None, None, :, :, None, None], sub[:, :, t], 0.0)
    n = len(offsets)
    sub = sub.transpose(0, 2, 5, 1, 3, 4).reshape(n, n, cin, 4 * f)
    lo, hi = -offsets[0], offsets[-1]
    y = jax.lax.conv_general_dilated(x, sub.astype(x.dtype), (1, 1), [(lo, hi), (lo, hi)],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.precision)
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, f).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, f)
    return y + bias.reshape(1, 1, 1, f)


class Encoder(nn.Module):
  """float32[B,64,64,1] in [0,1] -> float32[B,4,4,D] (before quantisation)."""
  config: VQVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, masks):
    c = self.config
    x = 2.0 * (masks - 0.5)
    # TF 'SAME' (what big_vision's TF op uses): for even kernels at stride 2 it pads
    # 1 on each side (= torch padding=1), for odd ones 0 before / 1 after.
    for f, k in zip(c.enc_channels, c.enc_kernels):
      x = nn.relu(nn.Conv(f, (k, k), strides=2, padding="SAME", precision=self.precision)(x))
    for _ in range(NUM_RES_BLOCKS):
      x = ResBlock(c.enc_channels[-1], c.enc_res_hidden, c.enc_res_kernels, self.precision)(x)
    k = c.enc_out_kernel
    return nn.Conv(c.code_dim, (k, k), padding="SAME", precision=self.precision)(x)


class Decoder(nn.Module):
  """float32[B,4,4,D] -> float32[B,64,64,1] mask logits (big_vision's module names)."""
  config: VQVAEConfig
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    c = self.config
    k = c.dec_in_kernel
    x = nn.relu(nn.Conv(c.dec_width, (k, k), padding="SAME", precision=self.precision)(x))
    for _ in range(NUM_RES_BLOCKS):
      x = ResBlock(c.dec_width, c.dec_res_hidden, c.dec_res_kernels, self.precision)(x)
    for i, (f, k) in enumerate(zip(c.dec_channels, c.dec_kernels)):
      # big_vision: nn.ConvTranspose(f, (k, k), 2, padding=k // 2, transpose_kernel=True).
      x = nn.relu(UpConv(f, k, self.precision, name=f"ConvTranspose_{i}")(x))
    k = c.dec_out_kernel
    return nn.Conv(1, (k, k), padding="SAME", precision=self.precision)(x)


class VQVAE(nn.Module):
  """Encoder + codebook + decoder; methods for each stage (training uses __call__)."""
  config: VQVAEConfig
  precision: Any = None

  def setup(self):
    c = self.config
    self.encoder = Encoder(c, self.precision)
    self.decoder = Decoder(c, self.precision)
    # Unit-variance init; training re-seeds unused entries from encoder outputs anyway.
    self.codebook = self.param("codebook", nn.initializers.normal(1.0), (c.num_codes, c.code_dim))

  def encode_features(self, masks):  # float32[B,64,64,1] -> float32[B,4,4,D].
    return self.encoder(masks)

  def quantize(self, z):
    """float32[B,4,4,D] -> int32[B,16] nearest codebook entries (row-major grid)."""
    flat = z.reshape(-1, z.shape[-1])
    e = self.codebook
    # The expansion big_vision's op uses; argmin ties resolve to the lowest index.
    dist = (jnp.sum(flat**2, axis=1, keepdims=True) + jnp.sum(e**2, axis=1)[None, :]
            - 2 * jnp.dot(flat, e.T, precision=self.precision))
    return jnp.argmin(dist, axis=1).astype(jnp.int32).reshape(z.shape[0], TOKENS_PER_MASK)

  def lookup(self, codes):  # int32[B,16] -> float32[B,4,4,D].
    return jnp.take(self.codebook, codes, axis=0).reshape(codes.shape[0], GRID, GRID, -1)

  def decode_latents(self, z):  # float32[B,4,4,D] -> float32[B,64,64,1] logits.
    return self.decoder(z)

  def decode_codes(self, codes):  # int32[B,16] -> float32[B,64,64,1] logits.
    return self.decoder(self.lookup(codes))

  def encode_codes(self, masks):  # float32[B,64,64,1] -> int32[B,16].
    return self.quantize(self.encoder(masks))

  def __call__(self, masks):
    """Training forward: straight-through estimator from the decoder to the encoder.

    Returns (logits float32[B,64,64,1], dict z_e, z_q float32[B,4,4,D], codes int32[B,16]).
    """
    z_e = self.encoder(masks)
    codes = self.quantize(jax.lax.stop_gradient(z_e))
    z_q = self.lookup(codes)
    z_st = z_e + jax.lax.stop_gradient(z_q - z_e)
    return self.decoder(z_st), {"z_e": z_e, "z_q": z_q, "codes": codes}


# ----------------------------------------------------------------------------------------
# Shapes <-> config.

def _kshape(params, path):
  return tuple(np.shape(functools.reduce(lambda node, k: node[k], path.split("/"), params)))


def config_from_params(params: dict) -> VQVAEConfig:
  """Reads every width and kernel size off a parameter tree (ours/flax layout)."""
  try:
    k, d = _kshape(params, "codebook")
    enc = [_kshape(params, f"encoder/Conv_{i}/kernel") for i in range(NUM_DOWN + 1)]
    dec = [_kshape(params, f"decoder/ConvTranspose_{i}/kernel") for i in range(NUM_DOWN)]
    cfg = VQVAEConfig(
        num_codes=k, code_dim=d,
        enc_channels=tuple(s[3] for s in enc[:NUM_DOWN]),
        enc_kernels=tuple(s[0] for s in enc[:NUM_DOWN]),
        enc_res_hidden=_kshape(params, "encoder/ResBlock_0/Conv_0/kernel")[3],
        enc_res_kernels=tuple(_kshape(params, f"encoder/ResBlock_0/Conv_{i}/kernel")[0]
                              for i in range(3)),
        enc_out_kernel=enc[NUM_DOWN][0],
        dec_width=_kshape(params, "decoder/Conv_0/kernel")[3],
        dec_in_kernel=_kshape(params, "decoder/Conv_0/kernel")[0],
        dec_res_hidden=_kshape(params, "decoder/ResBlock_0/Conv_0/kernel")[3],
        dec_res_kernels=tuple(_kshape(params, f"decoder/ResBlock_0/Conv_{i}/kernel")[0]
                              for i in range(3)),
        dec_channels=tuple(s[2] for s in dec),  # [kh,kw,out,in]
        dec_kernels=tuple(s[0] for s in dec),
        dec_out_kernel=_kshape(params, "decoder/Conv_1/kernel")[0])
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"VQ-VAE params: missing or malformed entry ({e!r}); expected the tree "
                     "of vqvae.VQVAE (codebook, encoder/..., decoder/...)") from e
  return cfg


def param_shapes(config: VQVAEConfig) -> dict[str, tuple[int, ...]]:
  """{"/"-joined key: shape} of every parameter of VQVAE(config)."""
  tree = jax.eval_shape(
      lambda: VQVAE(config).init(jax.random.PRNGKey(0), jnp.zeros((1, MASK_SIZE, MASK_SIZE, 1))))
  return {k: tuple(v.shape) for k, v in _flatten(tree["params"]).items()}


def check_params(config: VQVAEConfig, params: dict, where: str = "params") -> None:
  """Raises ValueError naming every missing, unexpected or mis-shaped key."""
  want = param_shapes(config)
  got = {k: tuple(np.shape(v)) for k, v in _flatten(params).items()}
  problems = [f"missing {k} {s}" for k, s in want.items() if k not in got]
  problems += [f"unexpected {k} {s}" for k, s in got.items() if k not in want]
  problems += [f"{k}: shape {got[k]}, expected {s}" for k, s in want.items()
               if k in got and got[k] != s]
  if problems:
    raise ValueError(f"{where}: VQ-VAE parameters do not fit {config}:\n  " + "\n  ".join(problems))


def init_params(config: VQVAEConfig, seed: int = 0) -> dict:
  """Fresh float32 parameters of VQVAE(config), drawn with numpy.

  Kernels N(0, 1/fan_in) (He-like scale without the ReLU gain), zero biases, unit-normal
  codebook. Numpy because XLA:CPU takes ~0.3 s to compile each random initializer (~15 s
  for this model), longer than a short training run.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in param_shapes(config).items():
    if key == "codebook":
      flat[key] = rng.standard_normal(shape)
    elif key.endswith("bias"):
      flat[key] = np.zeros(shape)
    else:  # Conv HWIO: fan_in = kh*kw*in; UpConv [k,k,out,in]: k/2 x k/2 taps reach a pixel.
      fan_in = np.prod(shape[:-1]) if "ConvTranspose" not in key else shape[0] ** 2 * shape[3] / 4
      flat[key] = rng.standard_normal(shape) / np.sqrt(fan_in)
  return _unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f"{prefix}{k}/") if hasattr(v, "items") else {f"{prefix}{k}": v})
  return out


def _unflatten(flat):
  tree = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


# ----------------------------------------------------------------------------------------
# Files.

def _official_to_tree(sd: dict, path: str) -> dict:
  """PyTorch state dict of vae-oid.npz -> our flax tree (same conversion as big_vision)."""
  def get(name):
    if name not in sd:
      raise ValueError(f"{path}: official VQ-VAE checkpoint lacks key {name!r} "
                       f"(has {len(sd)} keys, e.g. {sorted(sd)[:4]})")
    return np.asarray(sd[name], np.float32)

  def conv(name):  # [out,in,kh,kw] -> HWIO; ConvTranspose [in,out,kh,kw] -> [kh,kw,out,in].
    w = get(name + ".weight")
    if w.ndim != 4:
      raise ValueError(f"{path}: {name}.weight has shape {w.shape}, expected 4 dims")
    return {"kernel": np.transpose(w, (2, 3, 1, 0)), "bias": get(name + ".bias")}

  def res(name):
    return {f"Conv_{i}": conv(f"{name}.{2 * i}") for i in range(3)}

  n_res = NUM_RES_BLOCKS
  enc = {f"Conv_{i}": conv(f"encoder.{2 * i}") for i in range(NUM_DOWN)}
  enc.update({f"ResBlock_{r}": res(f"encoder.{2 * NUM_DOWN + r}.net") for r in range(n_res)})
  enc[f"Conv_{NUM_DOWN}"] = conv(f"encoder.{2 * NUM_DOWN + n_res}")
  dec = {"Conv_0": conv("decoder.0")}
  dec.update({f"ResBlock_{r}": res(f"decoder.{2 + r}.net") for r in range(n_res)})
  dec.update({f"ConvTranspose_{i}": conv(f"decoder.{2 + n_res + 2 * i}") for i in range(NUM_DOWN)})
  dec["Conv_1"] = conv(f"decoder.{2 + n_res + 2 * NUM_DOWN}")
  return {"codebook": get("_vq_vae._embedding"), "encoder": enc, "decoder": dec}


def load(path: str | os.PathLike) -> tuple[VQVAEConfig, dict]:
  """Reads the official `vae-oid.npz` layout or ours; returns (config, params).

  params: nested dict of float32 numpy arrays (the tree of `VQVAE`). Keys of the
  official file that the model does not use (e.g. optimiser buffers) are ignored.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"VQ-VAE checkpoint not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as f:
      flat = {k: f[k] for k in f.files}
  except Exception as e:  # np.load raises a zoo of types for a non-npz file.
    raise ValueError(f"{path}: not a readable .npz VQ-VAE checkpoint ({e})") from e
  if "_vq_vae._embedding" in flat:
    params = _official_to_tree(flat, path)
  elif "codebook" in flat:
    params = _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  else:
    raise ValueError(f"{path}: neither the official layout (key '_vq_vae._embedding') nor ours "
                     f"(key 'codebook'); found keys {sorted(flat)[:6]}")
  config = config_from_params(params)
  check_params(config, params, where=path)
  return config, params


def save(path: str | os.PathLike, config: VQVAEConfig, params: dict) -> None:
  """Writes params (our layout: "/"-joined keys, float32) to an .npz that `load` reads."""
  check_params(config, params, where="vqvae.save")
  flat = {k: np.asarray(v, np.float32) for k, v in _flatten(params).items()}
  path = os.fspath(path)
  tmp = path + ".tmp.npz"  # Atomic: a crash never leaves a truncated checkpoint behind.
  np.savez(tmp, **flat)
  os.replace(tmp, path)


# ----------------------------------------------------------------------------------------
# Inference (float32, highest matmul precision: codes must not depend on the backend).

_HIGHEST = jax.lax.Precision.HIGHEST


@functools.partial(jax.jit, static_argnames="method")
def _apply(params, x, method):
  # The module's shapes come from the params' (static) shapes: any VQ-VAE size works.
  model = VQVAE(config_from_params(params), precision=_HIGHEST)
  return model.apply({"params": params}, x, method=getattr(VQVAE, method))


def _check_masks(masks, fn):
  if np.ndim(masks) != 4 or np.shape(masks)[1:] != (MASK_SIZE, MASK_SIZE, 1):
    raise ValueError(f"vqvae.{fn}: masks must be float[B,{MASK_SIZE},{MASK_SIZE},1], "
                     f"got shape {np.shape(masks)}")
  return jnp.asarray(masks, jnp.float32)


def decode(params: dict, codes) -> jax.Array:
  """int32[B,16] codes in [0, K) -> float32[B,64,64,1] mask logits (mask = logits > 0)."""
  if np.ndim(codes) != 2 or np.shape(codes)[1] != TOKENS_PER_MASK:
    raise ValueError(f"vqvae.decode: codes must be int[B,{TOKENS_PER_MASK}], "
                     f"got shape {np.shape(codes)}")
  if not isinstance(codes, jax.core.Tracer):  # Out-of-range ids would read NaN rows.
    c, k = np.asarray(codes), np.shape(params["codebook"])[0]
    if c.size and (not np.issubdtype(c.dtype, np.integer) or c.min() < 0 or c.max() >= k):
      raise ValueError(f"vqvae.decode: codes must be integers in [0, {k}), got {c.dtype} "
                       f"in [{c.min()}, {c.max()}]")
  return _apply(params, jnp.asarray(codes, jnp.int32), "decode_codes")


def encode(params: dict, masks) -> jax.Array:
  """float32[B,64,64,1] masks in [0,1] -> int32[B,16] codes (row-major 4x4 grid)."""
  return _apply(params, _check_masks(masks, "encode"), "encode_codes")


def encode_features(params: dict, masks) -> jax.Array:
  """float32[B,64,64,1] in [0,1] -> float32[B,4,4,D] encoder output before quantisation."""
  return _apply(params, _check_masks(masks, "encode_features"), "encode_features")


# ----------------------------------------------------------------------------------------
# Masks <-> boxes (numpy; the host side of targets and evaluation).

@functools.lru_cache(maxsize=256)
def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
  """float64[n_out, n_in]: antialiased bilinear (triangle) weights, half-pixel centres.

  The scale_and_translate rule of tf.image.resize(antialias=True) and jax.image.resize:
  when shrinking, the triangle widens by n_in / n_out so every input pixel counts.
  """
  scale = n_out / n_in
  width = max(1.0 / scale, 1.0)
  centres = (np.arange(n_out) + 0.5) / scale - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - np.arange(n_in)[None, :]) / width)
  return w / w.sum(axis=1, keepdims=True)


def resize_bilinear_antialias(x: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """float[h,w] -> float32[H,W], as tf.image.resize(method='bilinear', antialias=True)."""
  x = np.asarray(x, np.float64)
  wy = _resize_weights(x.shape[0], int(out_hw[0]))
  wx = _resize_weights(x.shape[1], int(out_hw[1]))
  return (wy @ x @ wx.T).astype(np.float32)


def _box_ints(box, name):
  b = np.asarray(box, np.float64).reshape(-1)
  if b.shape != (4,) or not np.all(np.isfinite(b)):
    raise ValueError(f"{name}: box must be 4 finite numbers (y1, x1, y2, x2) in pixels, got {box}")
  return tuple(int(v) for v in np.round(b))


def mask_in_box(mask_logits64, box_yxyx_pixels, image_hw: tuple[int, int]) -> np.ndarray:
  """Pastes a decoded mask into its box, as big_vision's segmentation evaluator.

  Args:
    mask_logits64: float32[64,64] (or [64,64,1]) decoder logits.
    box_yxyx_pixels: (y1, x1, y2, x2) integer pixel box; big_vision gets it from the
      normalised box as int(v * size). Parts outside the image are cut off.
    image_hw: (H, W).
  Returns:
    bool[H,W]: the logits resized to the box (PIL bilinear), > 0 inside it, False elsewhere.
  """
  m = np.asarray(mask_logits64, np.float32)
  if m.shape == (MASK_SIZE, MASK_SIZE, 1):
    m = m[..., 0]
  if m.shape != (MASK_SIZE, MASK_SIZE):
    raise ValueError(f"mask_in_box: mask must be float[64,64], got shape {m.shape}")
  h, w = (int(v) for v in image_hw)
  y1, x1, y2, x2 = _box_ints(box_yxyx_pixels, "mask_in_box")
  out = np.zeros((h, w), bool)
  ty1, tx1, ty2, tx2 = max(y1, 0), max(x1, 0), min(y2, h), min(x2, w)
  if ty2 > ty1 and tx2 > tx1:  # Resize to the whole box, paste the part inside the image.
    box_mask = np.asarray(PIL.Image.fromarray(m).resize((x2 - x1, y2 - y1),
                                                       resample=PIL.Image.BILINEAR)) > 0.0
    out[ty1:ty2, tx1:tx2] = box_mask[ty1 - y1:ty2 - y1, tx1 - x1:tx2 - x1]
  return out


def crop_mask_to_box(mask, box_yxyx_pixels) -> np.ndarray:
  """The VQ-VAE input for an instance, as big_vision's `refcoco_mask2str` pp op.

  Args:
    mask: bool/float[H,W] (or [H,W,1]) instance mask, values in [0,1].
    box_yxyx_pixels: (y1, x1, y2, x2) pixel box (big_vision: round(v * size) of the
      normalised box).
  Returns:
    float32[64,64,1] in [0,1]: mask[y1:y2, x1:x2] resized to 64x64 (bilinear, antialiased).
  """
  m = np.asarray(mask)
  if m.ndim == 3 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.ndim != 2:
    raise ValueError(f"crop_mask_to_box: mask must be [H,W], got shape {m.shape}")
  y1, x1, y2, x2 = _box_ints(box_yxyx_pixels, "crop_mask_to_box")
  y1, x1 = max(y1, 0), max(x1, 0)
  y2, x2 = min(y2, m.shape[0]), min(x2, m.shape[1])
  if y2 <= y1 or x2 <= x1:
    raise ValueError(f"crop_mask_to_box: box {tuple(box_yxyx_pixels)} is empty inside the "
                     f"{m.shape} mask")
  crop = m[y1:y2, x1:x2].astype(np.float64)
  return resize_bilinear_antialias(crop, (MASK_SIZE, MASK_SIZE))[..., None]


def tight_box(mask) -> tuple[int, int, int, int] | None:
  """(y1, x1, y2, x2) pixel box (end-exclusive) around the True pixels; None when empty."""
  m = np.asarray(mask) > 0
  rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
  if rows.size == 0:
    return None
  return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1
