"""Detection metrics from PaliGemma's `<loc>` output: COCO mAP and RefCOCO accuracy@IoU.

Output format: objects "<locY1><locX1><locY2><locX2> label" joined by " ; "
(big_vision_lite.tokenizer.parse_objects; loc t -> t / 1023).

COCO mAP ("detection", pycocotools):
  * Scores. The model emits no confidences. Each image's valid predictions are ranked by
    their order in the output: the i-th of n gets score 1 - i/n (first emitted = 1.0).
    Across images, detections of equal score keep image order (pycocotools sorts stably).
  * Labels are matched to categories by exact string after normalisation (lowercase,
    whitespace collapsed). Categories are the `categories` kwarg, or else every label seen
    in the (gathered) ground truth. A predicted label outside them becomes a detection of
    an extra "unknown" category that has no ground truth: a false positive that COCO's
    per-category AP cannot see (it averages over categories with ground truth), so its
    rate is reported separately as "unknown_label_rate".
  * Invalid objects (parse_objects' valid=False: not 4 locs, y2 <= y1 or x2 <= x1, no
    label, ...) are dropped and counted in "invalid_rate" (over all emitted objects).
  * Boxes go to pixels of the original image (height, width): COCO's small/medium/large
    areas and its maxDets=100 (the 100 first-emitted objects per image) apply as usual.
  Metrics: map (AP@[.5:.95]), ap50, ap75, ap_small/ap_medium/ap_large (only when some
  ground truth has that size), ar100, num_pred, num_gt, invalid_rate, unknown_label_rate.

RefCOCO ("refcoco"): one ground-truth box per example (the referred object); the
prediction is the first emitted object with a box of positive area (its label text is
ignored, as big_vision reads only the box tokens). No such box = a miss (IoU 0).
Metrics: "acc@<t>" = fraction with IoU >= t for each threshold (default 0.5), mean_iou,
invalid_rate.
"""
import contextlib
import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from big_vision_lite import tokenizer
from big_vision_lite.evaluators import base

UNKNOWN = "unknown"


def normalize_label(label: str) -> str:
  return " ".join(label.lower().split())


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
  """IoU of two y1,x1,y2,x2 boxes (any common scale; IoU is invariant to axis scaling)."""
  iy = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ix = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iy * ix
  area = lambda r: max(0.0, r[2] - r[0]) * max(0.0, r[3] - r[1])
  union = area(a) + area(b) - inter
  return inter / union if union > 0 else 0.0


def parse_gt_boxes(example, eid, *, labels: bool) -> tuple[list[list[float]], list[str]]:
  """Checked example["objects"]: (N boxes y1,x1,y2,x2 in [0,1], N labels or [])."""
  objects = base.get_field(example, "objects", eid,
                           'dict with "bbox" float[N,4] (y1,x1,y2,x2 normalised)'
                           + (' and "label" list[str]' if labels else ""))
  if not isinstance(objects, dict) or "bbox" not in objects:
    raise base.MalformedExampleError(eid, "objects", 'expected a dict with key "bbox"')
  try:
    boxes = np.asarray(objects["bbox"], np.float64)
  except (TypeError, ValueError) as e:
    raise base.MalformedExampleError(eid, "objects/bbox", f"not numeric: {e}") from None
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise base.MalformedExampleError(eid, "objects/bbox",
                                     f"expected float[N,4], got shape {boxes.shape}")
  if not np.isfinite(boxes).all() or (boxes < -1e-6).any() or (boxes > 1 + 1e-6).any():
    raise base.MalformedExampleError(eid, "objects/bbox",
                                     f"expected finite values in [0, 1], got {boxes.tolist()}")
  if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
    raise base.MalformedExampleError(eid, "objects/bbox",
                                     f"expected y1 <= y2 and x1 <= x2, got {boxes.tolist()}")
  names = []
  if labels:
    if "label" not in objects:
      raise base.MalformedExampleError(eid, "objects/label", "missing (expected list[str])")
    names = base.as_str_list(objects["label"], eid, "objects/label", allow_empty=True)
    if len(names) != len(boxes):
      raise base.MalformedExampleError(
          eid, "objects/label", f"{len(names)} labels for {len(boxes)} boxes")
  return boxes.tolist(), names


def parse_image_size(example, eid) -> tuple[int, int]:
  """Checked (example["height"], example["width"]) of the original image."""
  out = []
  for key in ("height", "width"):
    v = base.get_field(example, key, eid, "int > 0 (original image size in pixels)")
    v = v.item() if isinstance(v, (np.ndarray, np.generic)) and np.ndim(v) == 0 else v
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise base.MalformedExampleError(eid, key, f"expected an int > 0, got {v!r}")
    out.append(int(v))
  return out[0], out[1]


# ---------------------------------------------------------------------------------------
# COCO mAP.
# ---------------------------------------------------------------------------------------
def _xywh(box, h, w) -> list[float]:
  y1, x1, y2, x2 = box
  return [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]


def coco_map(images: Sequence[dict[str, Any]],
             categories: Sequence[str] | None = None) -> dict[str, float]:
  """COCO box metrics for ranked, labelled predictions.

  Args:
    images: one dict per image with "height", "width" (pixels), "gt_boxes" and
      "pred_boxes" (lists of normalised y1,x1,y2,x2), "gt_labels" and "pred_labels"
      (str, any case). Predictions are in emission order (score 1 - i/n).
    categories: the category names; default: the normalised ground-truth labels.
  Returns:
    map, ap50, ap75, ap_small/medium/large (when such ground truth exists), ar100,
    num_pred, num_gt, unknown_label_rate.
  """
  # pylint: disable=import-outside-toplevel
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  # pylint: enable=import-outside-toplevel
  if categories is None:
    names = sorted({normalize_label(l) for im in images for l in im["gt_labels"]})
  else:
    names = list(dict.fromkeys(normalize_label(c) for c in categories))
    unseen = {normalize_label(l) for im in images for l in im["gt_labels"]} - set(names)
    if unseen:
      raise ValueError(f"detection: ground-truth labels {sorted(unseen)} are not in "
                       f"categories {names}")
  cat_id = {n: i + 1 for i, n in enumerate(names)}
  unknown_id = len(names) + 1
  cats = [{"id": i, "name": n} for n, i in cat_id.items()]
  cats.append({"id": unknown_id, "name": UNKNOWN})
  imgs, gts, dts, n_unknown = [], [], [], 0
  for img_id, im in enumerate(images, 1):
    h, w = im["height"], im["width"]
    imgs.append({"id": img_id, "height": h, "width": w})
    for box, label in zip(im["gt_boxes"], im["gt_labels"]):
      xywh = _xywh(box, h, w)
      gts.append({"id": len(gts) + 1, "image_id": img_id, "bbox": xywh, "iscrowd": 0,
                  "area": xywh[2] * xywh[3], "category_id": cat_id[normalize_label(label)]})
    n = len(im["pred_boxes"])
    for i, (box, label) in enumerate(zip(im["pred_boxes"], im["pred_labels"])):
      cid = cat_id.get(normalize_label(label), unknown_id)
      n_unknown += cid == unknown_id
      xywh = _xywh(box, h, w)
      dts.append({"id": len(dts) + 1, "image_id": img_id, "bbox": xywh, "iscrowd": 0,
                  "area": xywh[2] * xywh[3], "category_id": cid, "score": 1.0 - i / n})

  out = {"num_pred": float(len(dts)), "num_gt": float(len(gts)),
         "unknown_label_rate": n_unknown / len(dts) if dts else 0.0}
  if not gts:  # COCO AP is undefined without ground truth.
    return dict(out, map=float("nan"), ap50=float("nan"), ap75=float("nan"))

  def make(anns):
    c = COCO()
    c.dataset = {"images": imgs, "categories": cats, "annotations": anns}
    c.createIndex()
    return c

  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress.
    ev = COCOeval(make(gts), make(dts), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  s = ev.stats
  out.update(map=s[0], ap50=s[1], ap75=s[2], ar100=s[8])
  for key, v in (("ap_small", s[3]), ("ap_medium", s[4]), ("ap_large", s[5])):
    if v > -1:  # -1: no ground truth of that size.
      out[key] = v
  return {k: float(v) for k, v in out.items()}


@base.register("detection")
class DetectionEvaluator(base.Evaluator):
  """COCO-style detection evaluator (see the module docstring for scores and labels).

  Examples need "id", "objects" {"bbox": float[N,4] y1,x1,y2,x2 normalised, "label":
  list[str] of N}, "height", "width" (original image). Records: {"id", "prediction",
  "height", "width", "gt_boxes", "gt_labels", "pred_boxes", "pred_labels",
  "num_objects", "num_invalid"}.
  """

  def __init__(self, examples, *, categories: Sequence[str] | None = None, **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      categories: category names (default: all ground-truth labels seen).
    """
    super().__init__(examples, **kw)
    if isinstance(categories, str):
      raise ValueError("detection: categories must be a list of names, not one string")
    self.categories = None if categories is None else list(categories)

  def score_example(self, example, prediction):
    eid = base.example_id(example)
    gt_boxes, gt_labels = parse_gt_boxes(example, eid, labels=True)
    h, w = parse_image_size(example, eid)
    objs = tokenizer.parse_objects(prediction)
    valid = [o for o in objs if o.valid]
    return {"id": eid, "prediction": prediction, "height": h, "width": w,
            "gt_boxes": gt_boxes, "gt_labels": gt_labels,
            "pred_boxes": [list(o.box) for o in valid],
            "pred_labels": [o.label for o in valid],
            "num_objects": len(objs), "num_invalid": len(objs) - len(valid)}

  def compute_metrics(self, records):
    out = coco_map(records, self.categories)
    n_obj = sum(r["num_objects"] for r in records)
    out["invalid_rate"] = sum(r["num_invalid"] for r in records) / n_obj if n_obj else 0.0
    return out


# ---------------------------------------------------------------------------------------
# RefCOCO.
# ---------------------------------------------------------------------------------------
def first_box(prediction: str) -> list[float] | None:
  """The first emitted box of positive area (normalised y1,x1,y2,x2), or None."""
  for o in tokenizer.parse_objects(prediction):
    if o.box is not None and o.box[2] > o.box[0] and o.box[3] > o.box[1]:
      return list(o.box)
  return None


@base.register("refcoco")
class RefCocoEvaluator(base.Evaluator):
  """Referring expression comprehension: accuracy of the first predicted box @ IoU.

  Examples need "id" and "objects" {"bbox": float[1,4]} (the referred object). Records:
  {"id", "prediction", "gt_box", "pred_box" (None when invalid), "iou"}.
  """

  def __init__(self, examples, *, iou_thresholds: Sequence[float] = (0.5,), **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      iou_thresholds: an "acc@<t>" metric is reported for each.
    """
    super().__init__(examples, **kw)
    if isinstance(iou_thresholds, (int, float)):
      iou_thresholds = (iou_thresholds,)
    if not iou_thresholds or not all(0 < t <= 1 for t in iou_thresholds):
      raise ValueError(f"refcoco: iou_thresholds must be in (0, 1], got {iou_thresholds}")
    self.iou_thresholds = tuple(float(t) for t in iou_thresholds)

  def score_example(self, example, prediction):
    eid = base.example_id(example)
    boxes, _ = parse_gt_boxes(example, eid, labels=False)
    if len(boxes) != 1:
      raise base.MalformedExampleError(
          eid, "objects/bbox", f"refcoco expects exactly one box (the referred object), "
          f"got {len(boxes)}")
    pred = first_box(prediction)
    iou = box_iou(pred, boxes[0]) if pred is not None else 0.0
    return {"id": eid, "prediction": prediction, "gt_box": boxes[0], "pred_box": pred,
            "iou": iou}

  def compute_metrics(self, records):
    n = len(records)
    out = {f"acc@{t:g}": sum(r["iou"] >= t for r in records) / n
           for t in self.iou_thresholds}
    out["mean_iou"] = sum(r["iou"] for r in records) / n
    out["invalid_rate"] = sum(r["pred_box"] is None for r in records) / n
    return out
