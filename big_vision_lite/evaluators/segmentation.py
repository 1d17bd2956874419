"""Referring-expression segmentation metrics from PaliGemma's `<loc>`x4 `<seg>`x16 output.

As big_vision's paligemma segmentation evaluator: the prediction is a box
("<loc>" y1 x1 y2 x2, t / 1023) and 16 VQ-VAE codes; the codes are decoded to 64x64
mask logits, which are resized (PIL bilinear) into the box at the original image
resolution, box corners int(v * size), and thresholded at 0.

The prediction is the first emitted object with a box of positive area and 16 `<seg>`
codes (its label text is ignored); an output without one, or whose box collapses to
zero pixels, is invalid and scores IoU 0 (its ground truth still counts in cIoU's union).

Metrics (one ground-truth object per example):
  miou: mean over examples of mask IoU;
  ciou: cumulative intersection / cumulative union over all examples (the "overall IoU"
    of RefCOCO papers);
  box_acc@<t>: fraction of examples whose box IoU >= t (default 0.5 and 0.75);
  invalid_rate: fraction of examples without a usable prediction.
"""
from collections.abc import Callable, Sequence

import numpy as np

from big_vision_lite import tokenizer
from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import detection
from big_vision_lite.models import vqvae

DecodeMasks = Callable[[np.ndarray], np.ndarray]


def first_box_and_codes(prediction: str) -> tuple[list[float], list[int]] | None:
  """The first object with a positive-area box and 16 seg codes, or None."""
  for o in tokenizer.parse_objects(prediction):
    if (o.box is not None and o.seg_codes is not None and o.box[2] > o.box[0]
        and o.box[3] > o.box[1]):
      return list(o.box), list(o.seg_codes)
  return None


def pixel_box(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
  """Normalised y1,x1,y2,x2 -> integer pixel box, truncating as big_vision does."""
  y1, x1, y2, x2 = box
  return int(y1 * height), int(x1 * width), int(y2 * height), int(x2 * width)


def _gt_mask(example, eid, h: int, w: int) -> np.ndarray:
  if "masks" in example:
    field, masks = "masks", example["masks"]
  elif isinstance(example.get("objects"), dict) and "masks" in example["objects"]:
    field, masks = "objects/masks", example["objects"]["masks"]
  else:
    raise base.MalformedExampleError(
        eid, "masks", f'missing (expected bool[1,H,W] as "masks" or "objects"/"masks"; '
        f"keys: {sorted(example)})")
  m = np.asarray(masks)
  if m.ndim == 4 and m.shape[-1] == 1:
    m = m[..., 0]
  if m.ndim != 3 or m.shape[0] != 1:
    raise base.MalformedExampleError(
        eid, field, f"expected bool[1,H,W] (one referred object), got shape {m.shape}")
  if m.shape[1:] != (h, w):
    raise base.MalformedExampleError(
        eid, field, f"mask is {m.shape[1]}x{m.shape[2]} but the example's height x width "
        f"is {h}x{w} (masks must be at the original resolution)")
  if m.dtype != bool:
    if not np.isin(m, (0, 1)).all():
      raise base.MalformedExampleError(eid, field, "expected a binary (0/1 or bool) mask")
    m = m.astype(bool)
  if not m[0].any():
    raise base.MalformedExampleError(eid, field, "empty ground-truth mask")
  return m[0]


@base.register("segmentation")
class SegmentationEvaluator(base.Evaluator):
  """Referring-expression segmentation evaluator (see the module docstring).

  Examples need "id", "objects" {"bbox": float[1,4] y1,x1,y2,x2 normalised}, "masks"
  (bool[1,H,W], or inside "objects"), "height" = H, "width" = W. Records: {"id",
  "prediction", "valid", "pred_box", "gt_box", "box_iou", "intersection", "union",
  "mask_iou"} (pixel counts at the original resolution).
  """

  def __init__(self, examples, *, decode_masks: DecodeMasks | None = None,
               vqvae_checkpoint: str | None = None,
               box_iou_thresholds: Sequence[float] = (0.5, 0.75), **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      decode_masks: int32[N,16] codes -> float32[N,64,64,1] mask logits (e.g.
        `functools.partial(vqvae.decode, params)`).
      vqvae_checkpoint: instead of decode_masks, a VQ-VAE .npz (official vae-oid.npz or
        big_vision_lite's layout) to decode with big_vision_lite.models.vqvae.
      box_iou_thresholds: a "box_acc@<t>" metric is reported for each.
    """
    super().__init__(examples, **kw)
    if (decode_masks is None) == (vqvae_checkpoint is None):
      raise ValueError("segmentation evaluator: pass exactly one of decode_masks "
                       "(a callable) or vqvae_checkpoint (a path)")
    if vqvae_checkpoint is not None:
      _, params = vqvae.load(vqvae_checkpoint)
      decode_masks = lambda codes: vqvae.decode(params, codes)
    if not callable(decode_masks):
      raise TypeError(f"segmentation evaluator: decode_masks must be callable, got "
                      f"{type(decode_masks).__name__}")
    if isinstance(box_iou_thresholds, (int, float)):
      box_iou_thresholds = (box_iou_thresholds,)
    if not box_iou_thresholds or not all(0 < t <= 1 for t in box_iou_thresholds):
      raise ValueError(f"segmentation: box_iou_thresholds must be in (0, 1], got "
                       f"{box_iou_thresholds}")
    self.decode_masks = decode_masks
    self.box_iou_thresholds = tuple(float(t) for t in box_iou_thresholds)

  def _decode(self, codes: list[list[int]]) -> np.ndarray:
    n = len(codes)
    logits = np.asarray(self.decode_masks(np.asarray(codes, np.int32)), np.float32)
    if logits.shape == (n, vqvae.MASK_SIZE, vqvae.MASK_SIZE):
      logits = logits[..., None]
    want = (n, vqvae.MASK_SIZE, vqvae.MASK_SIZE, 1)
    if logits.shape != want:
      raise ValueError(f"segmentation: decode_masks returned shape {logits.shape} for "
                       f"{n} codes; expected float32{list(want)}")
    return logits

  def score_batch(self, examples, predictions):
    parsed = [first_box_and_codes(p) for p in predictions]
    valid_idx = [i for i, p in enumerate(parsed) if p is not None]
    # One decoder call per batch (the decoder is a jitted conv net).
    logits = self._decode([parsed[i][1] for i in valid_idx]) if valid_idx else None
    logit_of = {i: logits[k] for k, i in enumerate(valid_idx)}
    records = []
    for i, (ex, pred) in enumerate(zip(examples, predictions)):
      eid = base.example_id(ex)
      boxes, _ = detection.parse_gt_boxes(ex, eid, labels=False)
      if len(boxes) != 1:
        raise base.MalformedExampleError(
            eid, "objects/bbox", f"segmentation expects exactly one box (the referred "
            f"object), got {len(boxes)}")
      h, w = detection.parse_image_size(ex, eid)
      gt = _gt_mask(ex, eid, h, w)
      gt_area = int(gt.sum())
      rec = {"id": eid, "prediction": pred, "valid": False, "pred_box": None,
             "gt_box": boxes[0], "box_iou": 0.0, "intersection": 0, "union": gt_area,
             "mask_iou": 0.0}
      if parsed[i] is not None:
        box = parsed[i][0]
        rec["pred_box"] = box
        rec["box_iou"] = detection.box_iou(box, boxes[0])
        y1, x1, y2, x2 = pixel_box(box, h, w)
        if y2 > y1 and x2 > x1:  # Truncation can still collapse a thin box.
          mask = vqvae.mask_in_box(logit_of[i], (y1, x1, y2, x2), (h, w))
          inter = int((mask & gt).sum())
          union = int(mask.sum()) + gt_area - inter
          rec.update(valid=True, intersection=inter, union=union, mask_iou=inter / union)
      records.append(rec)
    return records

  def compute_metrics(self, records):
    n = len(records)
    out = {"miou": sum(r["mask_iou"] for r in records) / n,
           "ciou": sum(r["intersection"] for r in records)
                   / max(1, sum(r["union"] for r in records))}
    for t in self.box_iou_thresholds:
      out[f"box_acc@{t:g}"] = sum(r["box_iou"] >= t for r in records) / n
    out["invalid_rate"] = sum(not r["valid"] for r in records) / n
    out["num"] = n
    return out
