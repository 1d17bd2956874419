"""Segmentation metrics with hand-made masks and a fake mask decoder; the real VQ-VAE
decoder on big_vision's fixture."""
import math

import numpy as np
import PIL.Image
import pytest

from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import segmentation

H, W = 80, 120  # Non-square, to catch y/x mix-ups.


def fake_decode_masks(codes):
  """Pattern by the first code: 0 all in, 1 all out, 2 left half in, 3 top half in."""
  codes = np.asarray(codes)
  assert codes.dtype == np.int32 and codes.shape[1:] == (16,)
  out = np.empty((len(codes), 64, 64, 1), np.float32)
  for i, c in enumerate(codes[:, 0]):
    m = np.full((64, 64), -1.0, np.float32)
    if c == 0:
      m[:] = 1.0
    elif c == 2:
      m[:, :32] = 1.0
    elif c == 3:
      m[:32, :] = 1.0
    out[i, ..., 0] = m
  return out


def bin_for(pixel, size):
  """The loc bin t whose int(t / 1023 * size) is `pixel` (the evaluator's truncation)."""
  t = math.ceil(pixel * 1023 / size)
  while int(t / 1023 * size) < pixel:
    t += 1
  assert int(t / 1023 * size) == pixel
  return t


def seg_text(y1, x1, y2, x2, pattern, label="the thing"):
  bins = (bin_for(y1, H), bin_for(x1, W), bin_for(y2, H), bin_for(x2, W))
  return ("".join(f"<loc{b:04d}>" for b in bins) + f"<seg{pattern:03d}>" * 16
          + f" {label}")


GT_Y1, GT_X1, GT_Y2, GT_X2 = 20, 30, 60, 90  # 40 x 60 = 2400 pixels.


def _ex(i, mask=None):
  if mask is None:
    mask = np.zeros((H, W), bool)
    mask[GT_Y1:GT_Y2, GT_X1:GT_X2] = True
  return {"id": i, "image": np.zeros((4, 4, 3), np.float32), "prefix": "segment thing",
          "objects": {"bbox": [[GT_Y1 / H, GT_X1 / W, GT_Y2 / H, GT_X2 / W]]},
          "masks": mask[None], "height": H, "width": W}


def _run(preds, masks=None, **kw):
  masks = masks or {}
  exs = [_ex(i, masks.get(i)) for i in preds]
  ev = segmentation.SegmentationEvaluator(exs, decode_masks=fake_decode_masks, **kw)
  return ev.run(lambda b: [preds[e["id"]] for e in b]), ev


def test_hand_made_masks():
  preds = {
      0: seg_text(GT_Y1, GT_X1, GT_Y2, GT_X2, 0),  # The GT box, filled: IoU 1.
      1: seg_text(GT_Y1, GT_X1, GT_Y2, GT_X2, 2),  # Left half of it: 1200 / 2400.
      2: seg_text(40, GT_X1, 80, GT_X2, 0),        # Shifted down 20 rows: 1200 / 3600.
      3: "<loc0100><loc0100><loc0500><loc0500> the thing",  # No seg codes: invalid.
      4: seg_text(GT_Y1, GT_X1, GT_Y2, GT_X2, 1),  # Valid, but an empty mask: IoU 0.
  }
  m, ev = _run(preds, batch_size=2)
  recs = {r["id"]: r for r in ev.last_predictions}
  assert [(recs[i]["intersection"], recs[i]["union"]) for i in range(5)] == [
      (2400, 2400), (1200, 2400), (1200, 3600), (0, 2400), (0, 2400)]
  assert [recs[i]["valid"] for i in range(5)] == [True, True, True, False, True]
  assert m["miou"] == pytest.approx((1 + 0.5 + 1 / 3 + 0 + 0) / 5)
  assert m["ciou"] == pytest.approx((2400 + 1200 + 1200) / (2400 * 4 + 3600))
  assert m["invalid_rate"] == pytest.approx(1 / 5)
  # Box IoUs (normalised boxes, loc-quantised): ~1, ~1, ~1/3, 3 is far off, ~1.
  assert recs[2]["box_iou"] == pytest.approx(1 / 3, abs=0.02)
  assert m["box_acc@0.5"] == pytest.approx(3 / 5)
  assert m["box_acc@0.75"] == pytest.approx(3 / 5)
  assert m["num"] == 5


def test_paste_matches_pil_bilinear_into_the_box():
  # The "top half" pattern pasted into an 11-row box: PIL decides the boundary row.
  y1, x1, y2, x2 = 16, 5, 27, 50
  m, ev = _run({0: seg_text(y1, x1, y2, x2, 3)})
  logits = np.full((64, 64), -1.0, np.float32)
  logits[:32] = 1.0
  pasted = np.zeros((H, W), bool)
  pasted[y1:y2, x1:x2] = np.asarray(PIL.Image.fromarray(logits).resize(
      (x2 - x1, y2 - y1), PIL.Image.BILINEAR)) > 0
  gt = np.zeros((H, W), bool)
  gt[GT_Y1:GT_Y2, GT_X1:GT_X2] = True
  rec = ev.last_predictions[0]
  assert rec["intersection"] == (pasted & gt).sum()
  assert rec["union"] == (pasted | gt).sum()
  assert 0 < (pasted & gt).sum() < pasted.sum()  # A partial overlap, not a trivial case.


def test_first_valid_object_and_invalid_outputs():
  good = seg_text(GT_Y1, GT_X1, GT_Y2, GT_X2, 0)
  preds = {
      0: "<loc0500><loc0500><loc0100><loc0100>" + "<seg000>" * 16 + " x ; " + good,
      1: good + " ; " + seg_text(0, 0, 10, 10, 0),  # Only the first counts.
      2: "",
      3: "<loc0010><loc0010><loc0020><loc0020>" + "<seg000>" * 15 + " x",  # 15 codes.
      # Positive in loc bins but zero pixels after truncation (rows 20.02 -> 20.09).
      4: f"<loc{bin_for(20, H):04d}><loc0100><loc{bin_for(20, H) + 1:04d}><loc0500>"
         + "<seg000>" * 16,
  }
  m, ev = _run(preds)
  recs = {r["id"]: r for r in ev.last_predictions}
  assert recs[0]["mask_iou"] == 1.0 and recs[1]["mask_iou"] == 1.0
  assert [recs[i]["valid"] for i in (2, 3, 4)] == [False] * 3
  assert recs[4]["pred_box"] is not None and recs[4]["union"] == 2400
  assert m["invalid_rate"] == pytest.approx(3 / 5)


def test_sharded_run_equals_single_process():
  preds = {i: seg_text(GT_Y1 + 2 * i, GT_X1, GT_Y2, GT_X2 - 3 * i, i % 4) for i in range(7)}
  full, _ = _run(preds)
  exs = [_ex(i) for i in preds]
  predict = lambda b: [preds[e["id"]] for e in b]
  other = segmentation.SegmentationEvaluator(exs[3:], decode_masks=fake_decode_masks)
  other.run(predict)
  shard = segmentation.SegmentationEvaluator(
      exs[:3], decode_masks=fake_decode_masks, gather=lambda r: r + other.last_predictions)
  assert shard.run(predict) == pytest.approx(full)


def test_real_vqvae_decoder_on_big_vision_fixture(fixtures_dir):
  io = np.load(fixtures_dir / "bv_vqvae" / "io.npz")
  codes, ref_logits = io["codes"], io["masks"]  # big_vision's decoder output.
  y1, x1, y2, x2 = 10, 20, 70, 100
  gt = np.zeros((H, W), bool)
  gt[15:65, 25:110] = True
  exs, preds, want = [], {}, []
  for i in range(len(codes)):
    ex = _ex(i, gt)
    exs.append(ex)
    bins = (bin_for(y1, H), bin_for(x1, W), bin_for(y2, H), bin_for(x2, W))
    preds[i] = ("".join(f"<loc{b:04d}>" for b in bins)
                + "".join(f"<seg{c:03d}>" for c in codes[i]) + " thing")
    pasted = np.zeros((H, W), bool)
    pasted[y1:y2, x1:x2] = np.asarray(PIL.Image.fromarray(ref_logits[i, ..., 0]).resize(
        (x2 - x1, y2 - y1), PIL.Image.BILINEAR)) > 0
    want.append(((pasted & gt).sum(), (pasted | gt).sum()))
  ev = segmentation.SegmentationEvaluator(
      exs, vqvae_checkpoint=str(fixtures_dir / "bv_vqvae" / "params.npz"), batch_size=3)
  ev.run(lambda b: [preds[e["id"]] for e in b])
  got = [(r["intersection"], r["union"]) for r in ev.last_predictions]
  # Logits agree to float32 noise; a pixel whose logit is ~0 could flip: allow 1 pixel.
  np.testing.assert_allclose(np.array(got), np.array(want), atol=1)
  assert len({g for g in got}) > 1  # The different codes give different masks.


def test_malformed_ground_truth_and_decoder():
  ok = seg_text(GT_Y1, GT_X1, GT_Y2, GT_X2, 0)

  def err(ex, match, decode=fake_decode_masks):
    with pytest.raises((base.MalformedExampleError, ValueError), match=match):
      segmentation.SegmentationEvaluator([ex], decode_masks=decode).run(lambda b: [ok])

  ex = _ex(1)
  del ex["masks"]
  err(ex, r"id=1, field 'masks': missing")
  err(dict(_ex(2), masks=np.zeros((1, H, W + 1), bool)),
      r"id=2, field 'masks': mask is 80x121 but .* 80x120")
  err(dict(_ex(3), masks=np.zeros((2, H, W), bool)), r"id=3, field 'masks'.*\[1,H,W\]")
  err(dict(_ex(4), masks=np.zeros((1, H, W), bool)), r"id=4, field 'masks': empty")
  err(dict(_ex(5), masks=np.full((1, H, W), 0.5)), r"id=5, field 'masks': expected a binary")
  err(dict(_ex(6), objects={"bbox": np.zeros((2, 4))}), r"id=6, .*exactly one box")
  err(_ex(7), r"decode_masks returned shape \(1, 32, 32, 1\)",
      decode=lambda c: np.zeros((len(c), 32, 32, 1), np.float32))
  # Masks inside "objects" and float 0/1 masks are accepted.
  ex = _ex(8)
  ex["objects"]["masks"] = ex.pop("masks").astype(np.float32)[..., None]
  m = segmentation.SegmentationEvaluator([ex], decode_masks=fake_decode_masks).run(
      lambda b: [ok])
  assert m["miou"] == 1.0
  with pytest.raises(ValueError, match="exactly one of decode_masks"):
    segmentation.SegmentationEvaluator([])
  assert isinstance(base.create("segmentation", examples=[],
                                decode_masks=fake_decode_masks),
                    segmentation.SegmentationEvaluator)
