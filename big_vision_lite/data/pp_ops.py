"""General and image pp ops: numpy/PIL versions of big_vision's ops_general.py / ops_image.py.

Same names, arguments and semantics as big_vision, over dict examples of numpy values:
  value_range, keep, drop, copy, flatten, setdefault, choice, choice_no_replacement,
  decode, resize, resize_small, resize_long, central_crop, random_crop, inception_crop, flip_lr.
Randomness comes from the per-example `rt.rng` (seeded by seed, record index and epoch), so a
resumed run preprocesses every record exactly as the uninterrupted one.

Numerics vs TF: bilinear/bicubic resizes without antialias sample at half-pixel centres exactly
like tf.image.resize; uint8 results are rounded (TF truncates), so values may differ by one
level. "area" is PIL's box filter. JPEG decoding uses libjpeg's accurate integer DCT (as
`decode(precise=True)` in big_vision).
"""
import io
import math

import numpy as np
import PIL.Image
import PIL.ImageFile

from big_vision_lite.data.pp_parse import ExampleError, get_key, inkey_outkey, register, set_key

# A truncated file must fail loudly (the pipeline counts or raises), never decode half grey.
PIL.ImageFile.LOAD_TRUNCATED_IMAGES = False

_METHODS = {
    "nearest": PIL.Image.NEAREST, "bilinear": PIL.Image.BILINEAR,
    "bicubic": PIL.Image.BICUBIC, "area": PIL.Image.BOX, "lanczos3": PIL.Image.LANCZOS,
}


def _pair(size, what: str) -> tuple[int, int]:
  if isinstance(size, int) and not isinstance(size, bool):
    size = (size, size)
  if (not isinstance(size, (list, tuple)) or len(size) != 2
      or not all(isinstance(s, int) and s > 0 for s in size)):
    raise ValueError(f"{what} must be a positive int or [height, width], got {size!r}")
  return int(size[0]), int(size[1])


def _check_method(method: str) -> None:
  if method not in _METHODS:
    raise ValueError(f"method must be one of {sorted(_METHODS)}, got {method!r}")


def _as_image(x, what: str = "image") -> np.ndarray:
  x = np.asarray(x)
  if x.ndim not in (2, 3) or x.dtype == object or x.dtype.kind in "SU":
    raise ExampleError(f"{what} must be a decoded [H, W] or [H, W, C] array, got "
                       f"{x.dtype}{list(x.shape)} (missing `decode`?)")
  return x


def resize_array(img: np.ndarray, size: tuple[int, int], method: str = "bilinear",
                 antialias: bool = False) -> np.ndarray:
  """Resizes [H, W] or [H, W, C] (any dtype) to size=(h, w), keeping the dtype."""
  img = _as_image(img)
  h, w = size
  H, W = img.shape[:2]  # pylint: disable=invalid-name
  if (H, W) == (h, w):
    return img
  if H == 0 or W == 0:
    raise ExampleError(f"cannot resize an empty {list(img.shape)} image")
  resample = _METHODS[method]
  downscale = h < H or w < W
  sample = downscale and not antialias and method in ("bilinear", "bicubic")

  def one(pil):
    if sample:  # tf.image.resize(antialias=False): plain sampling at half-pixel centres.
      return pil.transform((w, h), PIL.Image.AFFINE, (W / w, 0, 0, 0, H / h, 0), resample=resample)
    return pil.resize((w, h), resample=resample)

  squeeze = img.ndim == 2
  x = img[..., None] if squeeze else img
  if x.dtype == np.uint8 and x.shape[-1] in (1, 3, 4):
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[x.shape[-1]]
    out = np.asarray(one(PIL.Image.fromarray(x[..., 0] if mode == "L" else x, mode)))
    out = out.reshape(h, w, x.shape[-1])
  else:  # Floats, bools, other ints: per channel in 32-bit float.
    chans = [np.asarray(one(PIL.Image.fromarray(np.ascontiguousarray(x[..., c], np.float32), "F")))
             for c in range(x.shape[-1])]
    out = np.stack(chans, axis=-1)
    if x.dtype == bool:
      out = out >= 0.5
    elif np.issubdtype(x.dtype, np.integer):
      info = np.iinfo(x.dtype)
      out = np.clip(np.round(out), info.min, info.max)
    out = out.astype(x.dtype)
  return out[..., 0] if squeeze else out


# ---------------------------------------------------------------------------------------------
# General ops (ops_general.py).
# ---------------------------------------------------------------------------------------------
@register("value_range")
@inkey_outkey()
def get_value_range(vmin=-1, vmax=1, in_min=0, in_max=255.0, clip_values=False):
  """[in_min, in_max] -> [vmin, vmax] as float32 (in_min/in_max may be per-channel lists)."""
  in_min_a = np.asarray(in_min, np.float32)
  in_max_a = np.asarray(in_max, np.float32)
  if np.any(in_max_a == in_min_a):
    raise ValueError(f"in_max must differ from in_min, got {in_min!r}, {in_max!r}")

  # One multiply-add pass: x * scale + offset == vmin + (x - in_min) / (in_max - in_min) * (..).
  scale = (np.float32(vmax) - np.float32(vmin)) / (in_max_a - in_min_a)
  offset = np.float32(vmin) - in_min_a * scale

  def _value_range(image, rt, data):
    x = np.array(image, np.float32)  # A copy: the in-place ops below never touch the input.
    x *= scale
    x += offset
    return np.clip(x, vmin, vmax, out=x) if clip_values else x
  return _value_range


@register("keep")
def get_keep(*keys):
  """Keeps only the given keys (nested "a/b" keys keep their top-level dict)."""
  top = {k.split("/")[0] for k in keys}

  def _keep(data, rt):
    return {k: v for k, v in data.items() if k in keys or k in top}
  return _keep


@register("drop")
def get_drop(*keys):
  def _drop(data, rt):
    return {k: v for k, v in data.items() if k not in keys}
  return _drop


def _copy_structure(x):
  # Copies dicts and lists, shares arrays (ops never modify arrays in place).
  if isinstance(x, dict):
    return {k: _copy_structure(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_copy_structure(v) for v in x]
  return x


@register("copy")
def get_copy(inkey, outkey):
  def _copy(data, rt):
    set_key(data, outkey, _copy_structure(get_key(data, inkey)))
    return data
  return _copy


def flatten_dict(data: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in data.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


@register("flatten")
def get_flatten():
  """Nested dicts -> flat "a/b" keys (as big_vision's tree_flatten_with_names)."""
  def _flatten(data, rt):
    return flatten_dict(data)
  return _flatten


def _is_empty(x) -> bool:
  if isinstance(x, (list, tuple, str, bytes)):
    return len(x) == 0
  return np.size(x) == 0


@register("setdefault")
def get_setdefault(key, value):
  """If `key` is missing or empty, sets it to `value`."""
  def _setdefault(data, rt):
    x = get_key(data, key, None)
    if x is None or _is_empty(x):
      set_key(data, key, np.asarray(value) if isinstance(x, np.ndarray) else value)
    return data
  return _setdefault


def _keys(key, inkey, outkey, what):
  inkeys = inkey or key
  outkeys = outkey or key
  inkeys = [inkeys] if isinstance(inkeys, str) else list(inkeys or [])
  outkeys = [outkeys] if isinstance(outkeys, str) else list(outkeys or [])
  if not inkeys or len(inkeys) != len(outkeys):
    raise ValueError(f"{what} needs key= or inkey=/outkey= of equal lengths, got key={key!r}, "
                     f"inkey={inkey!r}, outkey={outkey!r}")
  return inkeys, [ok.format(key=ik) for ok, ik in zip(outkeys, inkeys)]


def _take(x, index):
  """x[index] along the leading axis for arrays, lists and tuples (index int or int array)."""
  if isinstance(x, np.ndarray):
    return x[index]
  if isinstance(x, (list, tuple)):
    return x[index] if np.isscalar(index) else [x[i] for i in index]
  raise ExampleError(f"expected a list or array to choose from, got {type(x).__name__}")


def _lengths(data, inkeys):
  lengths = []
  for k in inkeys:
    v = get_key(data, k)
    if isinstance(v, (str, bytes)) or (isinstance(v, np.ndarray) and v.ndim == 0):
      raise ExampleError(f"key {k!r} holds one value, not a list to choose from")
    lengths.append(len(v))
  if len(set(lengths)) != 1:
    raise ExampleError(f"keys {inkeys} have different lengths {lengths}")
  return lengths[0]


@register("choice")
def get_choice(n="single", key=None, fewer_ok=False, inkey=None, outkey=None):
  """Chooses the same random entries of all keys (n: "single", an int, or [min, max])."""
  inkeys, outkeys = _keys(key, inkey, outkey, "choice")
  is_varlen = isinstance(n, (list, tuple))
  if not (n == "single" or (isinstance(n, int) and n >= 0) or (is_varlen and len(n) == 2)):
    raise ValueError(f"n must be 'single', an int >= 0 or [min, max], got {n!r}")
  min_n = n[0] if is_varlen else 1 if n == "single" else n

  def _choice(data, rt):
    nitems = _lengths(data, inkeys)
    if nitems < min_n and not fewer_ok:
      raise ExampleError(f"{inkeys[0]!r} has {nitems} entries, fewer than {min_n} to choose")
    if n == "single":
      if not nitems:
        raise ExampleError(f"{inkeys[0]!r} is empty: nothing to choose")
      index = int(rt.rng.integers(nitems))
    else:
      end = int(rt.rng.integers(n[0], n[1] + 1)) if is_varlen else n
      # Keep the original order of the subsample (it may mean something, e.g. boxes).
      index = np.sort(rt.rng.permutation(nitems)[:end])
    values = [_take(get_key(data, ik), index) for ik in inkeys]
    for ok, v in zip(outkeys, values):
      set_key(data, ok, v)
    return data
  return _choice


@register("choice_no_replacement")
def get_choice_no_replacement(key=None, inkey=None, outkey=None):
  """Like choice(), but the epochs of one record cycle through all entries before repeating.

  big_vision counts visits per example id in host RAM (not resumable); here the visit count is
  the epoch, and each cycle of len(entries) epochs uses its own permutation seeded by (seed,
  record index, cycle): stateless, so exact across resumes.
  """
  inkeys, outkeys = _keys(key, inkey, outkey, "choice_no_replacement")

  def _choice(data, rt):
    nitems = _lengths(data, inkeys)
    if not nitems:
      raise ExampleError(f"{inkeys[0]!r} is empty: nothing to choose")
    cycle, offset = divmod(rt.epoch, nitems)
    perm = np.random.default_rng([rt.seed, rt.index, cycle, 0x6E6F]).permutation(nitems)
    index = int(perm[offset])
    values = [_take(get_key(data, ik), index) for ik in inkeys]
    for ok, v in zip(outkeys, values):
      set_key(data, ok, v)
    return data
  return _choice


# ---------------------------------------------------------------------------------------------
# Image ops (ops_image.py).
# ---------------------------------------------------------------------------------------------
@register("decode")
@inkey_outkey()
def get_decode(channels=3, precise=False, draft=None):
  """Encoded bytes (JPEG/PNG/GIF/BMP/WebP) -> uint8[H, W, channels].

  Already-decoded uint8 arrays pass through (TFDS decoded features, the demo dataset). `draft`
  (set automatically when decode is followed by resize(S)/resize_small(S)) lets JPEG decode
  at 1/2, 1/4 or 1/8 scale while staying >= S on both sides. `precise` is accepted for
  big_vision compatibility: PIL always uses the accurate integer DCT.
  """
  del precise
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  draft_hw = None if draft in (None, False) else _pair(draft, "draft")

  def _decode(x, rt, data):
    if isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 3:
      if x.shape[-1] != channels:
        raise ExampleError(f"decoded image has {x.shape[-1]} channels, expected {channels}")
      return x
    if isinstance(x, np.ndarray) and x.ndim == 0:
      x = x.item()
    if not isinstance(x, (bytes, bytearray, memoryview)):
      raise ExampleError(f"expected encoded image bytes, got {type(x).__name__}")
    if not len(x):
      raise ExampleError("empty image file (0 bytes)")
    try:
      with PIL.Image.open(io.BytesIO(x)) as im:
        if draft_hw and im.format == "JPEG":
          im.draft("RGB" if channels == 3 else "L", (draft_hw[1], draft_hw[0]))
        im = im.convert("RGB" if channels == 3 else "L")  # Loads all pixels: catches truncation.
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
      raise ExampleError(f"corrupt or truncated image ({len(x)} bytes): {e}") from None
    arr = np.asarray(im)
    return arr if channels == 3 else arr[..., None]
  return _decode


@register("resize")
@inkey_outkey()
def get_resize(size, method="bilinear", antialias=False):
  """Resizes to size (int or [H, W]), as tf.image.resize."""
  hw = _pair(size, "size")
  _check_method(method)

  def _resize(image, rt, data):
    return resize_array(image, hw, method, antialias)
  return _resize


def _resize_factor(image, factor, method, antialias):
  image = _as_image(image)
  h, w = image.shape[:2]
  new = (max(1, int(round(h * factor))), max(1, int(round(w * factor))))
  return resize_array(image, new, method, antialias)


@register("resize_small")
@inkey_outkey()
def get_resize_small(smaller_size, method="area", antialias=False):
  """Resizes the shorter side to smaller_size, keeping the aspect ratio."""
  _pair(smaller_size, "smaller_size")
  _check_method(method)

  def _resize_small(image, rt, data):
    image = _as_image(image)
    return _resize_factor(image, smaller_size / min(image.shape[:2]), method, antialias)
  return _resize_small


@register("resize_long")
@inkey_outkey()
def get_resize_long(longer_size, method="area", antialias=True):
  """Resizes the longer side to longer_size, keeping the aspect ratio."""
  _pair(longer_size, "longer_size")
  _check_method(method)

  def _resize_long(image, rt, data):
    image = _as_image(image)
    return _resize_factor(image, longer_size / max(image.shape[:2]), method, antialias)
  return _resize_long


@register("central_crop")
@inkey_outkey()
def get_central_crop(crop_size=None):
  """Central crop of crop_size (int or [H, W]); None takes the largest central square."""
  hw = _pair(crop_size, "crop_size") if crop_size else None

  def _crop(image, rt, data):
    image = _as_image(image)
    H, W = image.shape[:2]  # pylint: disable=invalid-name
    h, w = hw or (min(H, W),) * 2
    if h > H or w > W:
      raise ExampleError(f"central_crop {h}x{w} is larger than the {H}x{W} image")
    dy, dx = (H - h) // 2, (W - w) // 2
    return image[dy:dy + h, dx:dx + w]
  return _crop


@register("random_crop")
@inkey_outkey()
def get_random_crop(crop_size):
  """A crop of crop_size at a uniformly random position."""
  h, w = _pair(crop_size, "crop_size")

  def _crop(image, rt, data):
    image = _as_image(image)
    H, W = image.shape[:2]  # pylint: disable=invalid-name
    if h > H or w > W:
      raise ExampleError(f"random_crop {h}x{w} is larger than the {H}x{W} image")
    dy = int(rt.rng.integers(H - h + 1))
    dx = int(rt.rng.integers(W - w + 1))
    return image[dy:dy + h, dx:dx + w]
  return _crop


def sample_inception_box(rng: np.random.Generator, height: int, width: int, area_range,
                         aspect_range=(3 / 4, 4 / 3), attempts: int = 10):
  """(y, x, h, w) of a random crop with area fraction and aspect ratio in range.

  As tf.image.sample_distorted_bounding_box (min_object_covered=0): falls back to the whole
  image when no sampled box fits.
  """
  area = height * width
  log_lo, log_hi = math.log(aspect_range[0]), math.log(aspect_range[1])
  for _ in range(attempts):
    target = area * rng.uniform(*area_range)
    ratio = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < h <= height and 0 < w <= width:
      return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
  return 0, 0, height, width


@register("inception_crop")
@inkey_outkey()
def get_inception_crop(size=None, area_min=5, area_max=100, method="bilinear", antialias=False):
  """Inception-style random crop (area in [area_min, area_max] percent), then resize(size)."""
  hw = _pair(size, "size") if size else None
  if not 0 < area_min <= area_max <= 100:
    raise ValueError(f"need 0 < area_min <= area_max <= 100, got {area_min}, {area_max}")
  _check_method(method)

  def _inception_crop(image, rt, data):
    image = _as_image(image)
    y, x, h, w = sample_inception_box(rt.rng, *image.shape[:2],
                                      (area_min / 100, area_max / 100))
    crop = image[y:y + h, x:x + w]
    return resize_array(crop, hw, method, antialias) if hw else crop
  return _inception_crop


@register("flip_lr")
@inkey_outkey()
def get_flip_lr():
  """Flips left-right with probability 1/2."""
  def _flip(image, rt, data):
    image = _as_image(image)
    return image[:, ::-1] if rt.rng.random() < 0.5 else image
  return _flip
