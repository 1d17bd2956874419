"""Detection metrics: hand-known COCO APs, a direct pycocotools cross-check, RefCOCO."""
import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from big_vision_lite import tokenizer
from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import detection


def locs(*bins):
  """Box text from integer loc bins (exact boxes: bin / 1023)."""
  return "".join(f"<loc{b:04d}>" for b in bins)


def nbox(*bins):
  return [b / 1023 for b in bins]


def _ex(i, boxes, labels, h=480, w=640):
  return {"id": i, "image": np.zeros((4, 4, 3), np.float32), "prefix": "detect cat ; dog",
          "objects": {"bbox": np.asarray(boxes, np.float32).reshape(-1, 4), "label": labels},
          "height": h, "width": w}


def _run(examples, preds, **kw):
  ev = detection.DetectionEvaluator(examples, **kw)
  return ev.run(lambda b: [preds[e["id"]] for e in b]), ev


CAT_A, CAT_B = (100, 100, 400, 300), (500, 600, 900, 1000)


def test_perfect_predictions_give_ap_1():
  exs = [_ex(1, [nbox(*CAT_A), nbox(*CAT_B)], ["cat", "cat"]),
         _ex(2, [nbox(0, 0, 511, 511)], ["dog"])]
  preds = {1: f"{locs(*CAT_B)} cat ; {locs(*CAT_A)} Cat", 2: f"{locs(0, 0, 511, 511)} dog"}
  m, ev = _run(exs, preds)
  for k in ("map", "ap50", "ap75", "ar100"):
    assert m[k] == pytest.approx(1.0), k
  assert m["num_pred"] == 3 and m["num_gt"] == 3
  assert m["invalid_rate"] == 0.0 and m["unknown_label_rate"] == 0.0
  assert ev.last_predictions[0]["pred_labels"] == ["cat", "Cat"]


def test_one_of_two_found_and_ranking_by_emission_order():
  exs = [_ex(1, [nbox(*CAT_A), nbox(*CAT_B)], ["cat", "cat"])]
  # Recall reaches 0.5 at precision 1: COCO's 101-point interpolated AP = 51/101.
  m, _ = _run(exs, {1: f"{locs(*CAT_A)} cat"})
  assert m["map"] == pytest.approx(51 / 101)
  assert m["ar100"] == pytest.approx(0.5)
  # A wrong box emitted first outranks the hit (score 1 vs 0.5): precision 1/2 at
  # recall 1/2, so AP = 0.5 * 51/101. Emitted after the hit it costs nothing.
  miss = locs(0, 0, 50, 50)
  m, _ = _run(exs, {1: f"{miss} cat ; {locs(*CAT_A)} cat"})
  assert m["map"] == pytest.approx(0.5 * 51 / 101)
  m, _ = _run(exs, {1: f"{locs(*CAT_A)} cat ; {miss} cat"})
  assert m["map"] == pytest.approx(51 / 101)


def test_invalid_and_unknown_labels():
  exs = [_ex(1, [nbox(*CAT_A)], ["cat"]), _ex(2, [nbox(*CAT_B)], ["dog"])]
  preds = {1: f"{locs(*CAT_A)} cat ; {locs(10, 10)} cat ; {locs(300, 300, 300, 400)} cat",
           2: f"{locs(*CAT_B)} dog ; {locs(*CAT_B)} zebra ; garbage"}
  m, ev = _run(exs, preds)
  # Invalid: 2-loc object, zero-height box, text without locs: 3 of 6 emitted objects.
  assert m["invalid_rate"] == pytest.approx(3 / 6)
  assert [r["num_invalid"] for r in ev.last_predictions] == [2, 1]
  # "zebra" is an unknown-category false positive: invisible to per-category AP.
  assert m["unknown_label_rate"] == pytest.approx(1 / 3)
  assert m["map"] == pytest.approx(1.0)
  assert m["num_pred"] == 3
  # Fixed categories: labels are matched after lowercasing/whitespace normalisation.
  m, _ = _run(exs, {1: f"{locs(*CAT_A)}  CAT ", 2: ""}, categories=["Cat", "dog", "bird"])
  assert m["map"] == pytest.approx(0.5)  # cat AP 1, dog AP 0 (no prediction).
  with pytest.raises(ValueError, match=r"labels \['dog'\] are not in categories"):
    _run(exs, {1: "", 2: ""}, categories=["cat"])


def _direct_pycocotools(images, cat_names):
  """Independent reference: standard COCO json dicts + loadRes, boxes in pixels."""
  gt = {"images": [], "annotations": [], "categories": [
      {"id": i + 1, "name": n} for i, n in enumerate(cat_names)]}
  res = []
  for img_id, (h, w, gts, preds) in enumerate(images, 1):
    gt["images"].append({"id": img_id, "height": h, "width": w})
    for (y1, x1, y2, x2), c in gts:
      gt["annotations"].append({
          "id": len(gt["annotations"]) + 1, "image_id": img_id, "category_id": c,
          "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h], "iscrowd": 0,
          "area": (x2 - x1) * w * (y2 - y1) * h})
    for rank, ((y1, x1, y2, x2), c) in enumerate(preds):
      res.append({"image_id": img_id, "category_id": c, "score": 1 - rank / len(preds),
                  "bbox": [x1 * w, y1 * h, (x2 - x1) * w, (y2 - y1) * h]})
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = gt
    coco.createIndex()
    ev = COCOeval(coco, coco.loadRes(res), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
  return ev.stats


def test_matches_direct_pycocotools_on_random_scenes():
  rng = np.random.default_rng(0)
  names = ["cat", "dog", "person"]
  examples, preds, ref_images = [], {}, []
  for i in range(12):
    h, w = int(rng.integers(100, 800)), int(rng.integers(100, 800))
    n = int(rng.integers(0, 5))
    lo = rng.integers(0, 600, size=(n, 2))
    gt_bins = np.concatenate([lo, np.minimum(lo + rng.integers(60, 420, size=(n, 2)),
                                             1023)], 1)
    gt_cls = rng.integers(0, 3, size=n)
    emitted = []  # (loc bins, class index) in emission order.
    for b, c in zip(gt_bins, gt_cls):
      if rng.random() < 0.8:  # Found, jittered; sometimes with the wrong class.
        jb = np.clip(b + rng.integers(-12, 13, size=4), 0, 1023)
        jb[2:] = np.maximum(jb[2:], jb[:2] + 1)
        emitted.append((jb, c if rng.random() < 0.85 else (c + 1) % 3))
    for _ in range(int(rng.integers(0, 3))):  # Hallucinations, anywhere in the output.
      y, x = np.sort(rng.integers(0, 1024, size=(2, 2)), axis=0)
      fb = np.array([y[0], x[0], max(y[1], y[0] + 1), max(x[1], x[0] + 1)])
      emitted.insert(int(rng.integers(0, len(emitted) + 1)), (fb, rng.integers(0, 3)))
    examples.append(_ex(i, [nbox(*b) for b in gt_bins], [names[c] for c in gt_cls], h, w))
    preds[i] = " ; ".join(f"{locs(*b)} {names[c]}" for b, c in emitted)
    ref_images.append((h, w, [(nbox(*b), int(c) + 1) for b, c in zip(gt_bins, gt_cls)],
                       [(nbox(*b), int(c) + 1) for b, c in emitted]))
  m, _ = _run(examples, preds, categories=names)
  stats = _direct_pycocotools(ref_images, names)
  assert 0.2 < m["map"] < 0.95  # A non-trivial case.
  np.testing.assert_allclose(
      [m["map"], m["ap50"], m["ap75"], m["ar100"]],
      [stats[0], stats[1], stats[2], stats[8]], rtol=1e-12, atol=1e-12)
  # Sharded across two "processes" and gathered: the same numbers.
  other = detection.DetectionEvaluator(examples[5:], categories=names)
  other.run(lambda b: [preds[e["id"]] for e in b])
  shard = detection.DetectionEvaluator(examples[:5], categories=names, batch_size=2,
                                       gather=lambda r: r + other.last_predictions)
  assert shard.run(lambda b: [preds[e["id"]] for e in b]) == pytest.approx(m)


def test_no_predictions_and_no_ground_truth():
  exs = [_ex(1, [nbox(*CAT_A)], ["cat"]), _ex(2, np.zeros((0, 4)), [])]
  m, _ = _run(exs, {1: "", 2: ""})
  assert m["map"] == 0.0 and m["num_pred"] == 0 and m["invalid_rate"] == 0.0
  m, _ = _run([_ex(2, np.zeros((0, 4)), [])], {2: f"{locs(*CAT_A)} cat"})
  assert np.isnan(m["map"]) and m["num_gt"] == 0


def test_malformed_detection_ground_truth():
  def err(ex, match):
    with pytest.raises(base.MalformedExampleError, match=match):
      detection.DetectionEvaluator([ex]).run(lambda b: [""] * len(b))

  err(_ex(3, [nbox(*CAT_A)], ["cat", "dog"]), r"id=3, field 'objects/label': 2 labels")
  err(_ex(4, [[0.5, 0.1, 0.2, 0.3]], ["cat"]), r"id=4, field 'objects/bbox': expected y1")
  err(_ex(5, [[0, 0, 2.0, 1.0]], ["cat"]), r"id=5, field 'objects/bbox'.*\[0, 1\]")
  err({"id": 6, "objects": {"bbox": np.zeros((1, 3)), "label": ["a"]}, "height": 4,
       "width": 4}, r"id=6, field 'objects/bbox': expected float\[N,4\]")
  err(dict(_ex(7, [nbox(*CAT_A)], ["cat"]), height=0), r"id=7, field 'height'")
  err({"id": 8, "height": 4, "width": 4}, r"id=8, field 'objects': missing")
  err(_ex(9, [nbox(*CAT_A)], [3]), r"id=9, field 'objects/label\[0\]'")


def test_refcoco_accuracy():
  gt = (100, 100, 500, 500)
  exs = [{"id": i, "objects": {"bbox": [nbox(*gt)]}} for i in range(6)]
  preds = {
      0: f"{locs(*gt)} the man",                     # IoU 1.
      1: f"{locs(100, 100, 500, 420)}",              # IoU 0.8: no label needed.
      2: f"{locs(100, 100, 300, 400)} man",          # IoU 0.375: a miss at 0.5.
      3: "the man on the left",                      # No box: invalid, a miss.
      4: f"{locs(500, 500, 100, 100)} ; {locs(*gt)}",  # First box inverted: skip it.
      5: f"{locs(0, 0, 1000, 1000)} x ; {locs(*gt)}",  # First valid box counts.
  }
  iou5 = 400 * 400 / 1000**2
  ev = base.create("refcoco", examples=exs, iou_thresholds=(0.5, 0.75))
  m = ev.run(lambda b: [preds[e["id"]] for e in b])
  assert [r["iou"] for r in ev.last_predictions] == pytest.approx(
      [1, 0.8, 0.375, 0, 1, iou5])
  assert m["acc@0.5"] == pytest.approx(3 / 6)
  assert m["acc@0.75"] == pytest.approx(3 / 6)
  assert m["mean_iou"] == pytest.approx((1 + 0.8 + 0.375 + 0 + 1 + iou5) / 6)
  assert m["invalid_rate"] == pytest.approx(1 / 6)
  with pytest.raises(base.MalformedExampleError, match=r"id=1, .*exactly one box"):
    detection.RefCocoEvaluator([{"id": 1, "objects": {"bbox": np.zeros((2, 4))}}]).run(
        lambda b: [""])


def test_box_iou_by_hand():
  assert detection.box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
  assert detection.box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0.0
  assert detection.box_iou([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
  # Uses the tokenizer's parse_objects (bins / 1023).
  assert detection.first_box(locs(0, 1023, 1023, 1023) + " ; " + locs(0, 0, 1023, 1023)) \
      == [0.0, 0.0, 1.0, 1.0]
  assert tokenizer.parse_objects(locs(1, 2, 3, 4) + " a")[0].box == tuple(nbox(1, 2, 3, 4))
