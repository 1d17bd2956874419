"""Detection and segmentation targets as PaliGemma text (<loc> boxes, <seg> mask codes).

  detection_target:    objects -> prefix "detect circle ; square",
                       suffix "<loc>x4 circle ; <loc>x4 square" (objects in their given order).
  segmentation_target: objects with masks -> prefix "segment triangle",
                       suffix "<loc>x4<seg>x16 triangle" (" ; " between objects).
  refcoco_mask2str:    big_vision's op (proj/paligemma/segmentation.py): one chosen object ->
                       prefix = its sentence, suffix = "<loc>x4<seg>x16" (no label).

Boxes are y1 x1 y2 x2 normalised (TFDS BBoxFeature) by default; box_format="xyxy"/"xywh" and
pixels=True read other layouts (pixels are divided by the "height"/"width" keys when present,
otherwise by the image's current size: put the op before any resize then). The mask encoder
is injected (PPContext.encode_masks: float32[N,64,64,1] in [0,1] -> int[N,16]), as big_vision's
VQ-VAE `encode_to_codebook_indices`.
"""
import numpy as np

from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data.pp_ops import resize_array
from big_vision_lite.data.pp_parse import ExampleError, get_key, register, set_key, to_str

_BOX_FORMATS = ("yxyx", "xyxy", "xywh")


def _image_size(data) -> tuple[int, int]:
  h, w = get_key(data, "height", None), get_key(data, "width", None)
  if h is not None and w is not None:
    return int(np.asarray(h)), int(np.asarray(w))
  image = get_key(data, "image", None)
  if isinstance(image, np.ndarray) and image.ndim == 3:
    return image.shape[0], image.shape[1]
  raise ExampleError("pixel boxes need 'height'/'width' keys or a decoded 'image'")


def normalised_boxes(data, bbox_key: str, box_format: str, pixels: bool) -> np.ndarray:
  """float64[N, 4] y1 x1 y2 x2 in [0, 1] from the example's boxes."""
  boxes = np.asarray(get_key(data, bbox_key), np.float64)
  if boxes.size == 0:
    return boxes.reshape(0, 4)
  if boxes.ndim == 1:
    boxes = boxes[None]
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ExampleError(f"{bbox_key!r} must be float[N, 4], got shape {list(boxes.shape)}")
  a, b, c, d = boxes.T
  if box_format == "xyxy":
    boxes = np.stack([b, a, d, c], axis=1)
  elif box_format == "xywh":
    boxes = np.stack([b, a, b + d, a + c], axis=1)
  if pixels:
    h, w = _image_size(data)
    boxes = boxes / np.array([h, w, h, w], np.float64)
  if not np.isfinite(boxes).all():
    raise ExampleError(f"{bbox_key!r} has non-finite values")
  return boxes


def labels_of(data, label_key: str, label_names, n: int) -> list[str]:
  raw = get_key(data, label_key)
  if isinstance(raw, (str, bytes)) or (isinstance(raw, np.ndarray) and raw.ndim == 0):
    raw = [raw]
  labels = []
  for v in list(raw):
    if isinstance(v, (int, np.integer)):
      if label_names is None:
        raise ExampleError(f"{label_key!r} holds class ids; pass label_names=[...]")
      if not 0 <= int(v) < len(label_names):
        raise ExampleError(f"class id {int(v)} outside label_names (len {len(label_names)})")
      labels.append(label_names[int(v)])
    else:
      labels.append(to_str(v, f"label in {label_key!r}"))
  if len(labels) != n:
    raise ExampleError(f"{n} boxes but {len(labels)} labels in {label_key!r}")
  return labels


def _prompt(prompt: str, labels) -> str:
  unique = list(dict.fromkeys(labels))  # First-appearance order, no repeats.
  return f"{prompt} {' ; '.join(unique)}"


def _check_common(box_format, label_names):
  if box_format not in _BOX_FORMATS:
    raise ValueError(f"box_format must be one of {_BOX_FORMATS}, got {box_format!r}")
  if label_names is not None and (isinstance(label_names, str)
                                  or not all(isinstance(n, str) for n in label_names)):
    raise ValueError(f"label_names must be a list of strings, got {label_names!r}")


@register("detection_target")
def get_detection_target(bbox_key="objects/bbox", label_key="objects/label", *,
                         prompt="detect", box_format="yxyx", pixels=False, label_names=None,
                         prefix_key="prefix", suffix_key="suffix"):
  """prefix "detect a ; b", suffix "<loc>x4 a ; <loc>x4 b" from boxes and labels."""
  _check_common(box_format, label_names)

  def _detection_target(data, rt):
    boxes = normalised_boxes(data, bbox_key, box_format, pixels)
    if not len(boxes):
      raise ExampleError(f"no objects in {bbox_key!r} to build a detection target from")
    labels = labels_of(data, label_key, label_names, len(boxes))
    try:
      suffix = tok_lib.objects_to_text(boxes, labels)
    except ValueError as e:
      raise ExampleError(str(e)) from None
    set_key(data, prefix_key, _prompt(prompt, labels))
    set_key(data, suffix_key, suffix)
    return data
  return _detection_target


def crop_masks_64(masks, boxes: np.ndarray) -> np.ndarray:
  """Crops each mask to its normalised box and resizes to float32[N, 64, 64, 1] in [0, 1].

  As big_vision's refcoco_mask2str: pixel box = round(size * box), bilinear with antialias;
  uint8 masks stored as 0/255 are scaled to [0, 1].
  """
  masks = np.asarray(masks)
  if masks.ndim == 4:  # [N, H, W, C]: big_vision takes the first channel.
    masks = masks[..., 0]
  if masks.ndim != 3 or len(masks) != len(boxes):
    raise ExampleError(f"masks must be [N, H, W] (or [N, H, W, C]) for {len(boxes)} boxes, got "
                       f"{masks.dtype}{list(masks.shape)}")
  out = np.zeros((len(masks), 64, 64, 1), np.float32)
  for i, (mask, box) in enumerate(zip(masks, boxes)):
    h, w = mask.shape
    y1, x1, y2, x2 = np.round(np.array([h, w, h, w]) * box).astype(int)
    y1, y2 = np.clip([y1, y2], 0, h)
    x1, x2 = np.clip([x1, x2], 0, w)
    if y2 <= y1 or x2 <= x1:
      raise ExampleError(f"box {box.tolist()} is empty on the {h}x{w} mask")
    crop = mask[y1:y2, x1:x2].astype(np.float32)
    if mask.dtype != bool and crop.size and crop.max() > 1:
      crop = crop / 255.0
    out[i, :, :, 0] = resize_array(crop, (64, 64), "bilinear", antialias=True)
  return out


def encode_masks_to_codes(ctx, masks64: np.ndarray) -> np.ndarray:
  codes = np.asarray(ctx.encode_masks(masks64))
  if codes.shape != (len(masks64), 16) or not np.issubdtype(codes.dtype, np.integer):
    raise ExampleError(f"encode_masks returned {codes.dtype}{list(codes.shape)}, expected "
                       f"int[{len(masks64)}, 16]")
  return codes


def _need_encoder(ctx, op):
  if ctx is None or ctx.encode_masks is None:
    raise ValueError(f"{op} needs a mask encoder: pass encode_masks= to the input pipeline")


@register("segmentation_target")
def get_segmentation_target(mask_key="objects/mask", bbox_key="objects/bbox",
                            label_key="objects/label", *, prompt="segment", box_format="yxyx",
                            pixels=False, label_names=None, prefix_key="prefix",
                            suffix_key="suffix", ctx=None):
  """prefix "segment a", suffix "<loc>x4<seg>x16 a" (" ; " between several objects)."""
  _check_common(box_format, label_names)
  _need_encoder(ctx, "segmentation_target")

  def _segmentation_target(data, rt):
    boxes = normalised_boxes(data, bbox_key, box_format, pixels)
    if not len(boxes):
      raise ExampleError(f"no objects in {bbox_key!r} to build a segmentation target from")
    labels = labels_of(data, label_key, label_names, len(boxes))
    masks = np.asarray(get_key(data, mask_key))
    if masks.ndim == 2:  # One object after choice(): [H, W].
      masks = masks[None]
    codes = encode_masks_to_codes(ctx, crop_masks_64(masks, np.clip(boxes, 0, 1)))
    try:
      suffix = tok_lib.objects_to_text(boxes, labels, seg_codes=codes)
    except ValueError as e:
      raise ExampleError(str(e)) from None
    set_key(data, prefix_key, _prompt(prompt, labels))
    set_key(data, suffix_key, suffix)
    return data
  return _segmentation_target


@register("refcoco_mask2str")
def get_refcoco_mask2str(model="oi", *, ctx=None):
  """big_vision's op: after choice(), objects/{mask,bbox,refs/sentence} -> prefix, suffix."""
  if model != "oi":
    raise ValueError(f"model={model!r}: only 'oi' (the injected mask encoder) is supported")
  _need_encoder(ctx, "refcoco_mask2str")

  def _mask2str(data, rt):
    mask = np.asarray(get_key(data, "objects/mask"))
    bbox = np.asarray(get_key(data, "objects/bbox"), np.float64)
    sentence = to_str(get_key(data, "objects/refs/sentence"), "objects/refs/sentence")
    if mask.ndim == 3:
      mask = mask[..., 0]
    if mask.ndim != 2 or bbox.shape != (4,):
      raise ExampleError(f"needs one object (use choice first): mask {list(mask.shape)}, "
                         f"bbox {list(bbox.shape)}")
    codes = encode_masks_to_codes(ctx, crop_masks_64(mask[None], bbox[None]))
    set_key(data, "prefix", sentence)
    set_key(data, "suffix", tok_lib.boxes_to_loc(bbox) + tok_lib.seg_to_text(codes[0]))
    return data
  return _mask2str
