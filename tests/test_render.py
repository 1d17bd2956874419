"""Rendering of predictions: upscaling, box edges, mask overlays, text band, batch padding."""
import numpy as np
import pytest

from big_vision_lite import render
from big_vision_lite.models import vqvae
from big_vision_lite.tokenizer import DetectedObject, objects_to_text

BLACK = np.full((16, 16, 3), -1.0, np.float32)  # Model range [-1, 1]: -1 is black.


def _obj(box, label="cat", valid=True):
  return DetectedObject(box=box, label=label, seg_codes=None, valid=valid, raw="")


def test_shape_and_nearest_upscale():
  img = np.zeros((2, 2, 3), np.uint8)
  img[0, 1] = (255, 0, 0)
  img[1, 0] = (0, 0, 255)
  out = render.draw_prediction(img, "", prompt="")
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[1:] == (256, 3)
  assert out.shape[0] > 256  # The text band below.
  # Factor 128: each pixel a 128x128 block, exactly.
  np.testing.assert_array_equal(out[:128, 128:256], np.broadcast_to([255, 0, 0], (128, 128, 3)))
  np.testing.assert_array_equal(out[128:256, :128], np.broadcast_to([0, 0, 255], (128, 128, 3)))
  np.testing.assert_array_equal(out[:128, :128], 0)


def test_float_image_value_range():
  img = np.stack([np.full((4, 4), v, np.float32) for v in (-1.0, 0.0, 1.0)], -1)
  out = render.draw_prediction(img, "x", min_size=8)
  np.testing.assert_array_equal(out[0, 0], [0, 128, 255])  # round((v + 1) * 127.5)
  assert render.to_uint8(np.full((1, 1), 3.0)).tolist() == [[[255, 255, 255]]]  # Clipped gray.


def test_box_edges_and_label():
  out = render.draw_prediction(BLACK, "", objects=[_obj((0.25, 0.25, 0.75, 0.75))])
  color = render.PALETTE[0]
  # 16 px -> 256 px: the box spans pixels 64..192; its outline is 2 px wide, drawn inward.
  for y, x in [(128, 64), (128, 65), (128, 192), (64, 128), (192, 128)]:
    assert tuple(out[y, x]) == color, (y, x)
  for y, x in [(128, 128), (128, 62), (128, 67), (128, 194), (200, 128)]:
    assert tuple(out[y, x]) == (0, 0, 0), (y, x)
  # The label sits on a filled box of the object's colour just above the top-left corner.
  label_area = out[50:63, 64:80].reshape(-1, 3)
  assert (label_area == color).all(axis=1).mean() > 0.5
  assert (label_area == (255, 255, 255)).all(axis=1).any()  # White text on the dark blue.


def test_objects_parsed_from_text_get_palette_colours():
  text = objects_to_text([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], ["a", "b"])
  out = render.draw_prediction(BLACK, text)
  assert tuple(out[100, 0]) == render.PALETTE[0]  # Left edge of box 0 (x = 0).
  assert tuple(out[200, 128]) == render.PALETTE[1]  # Left edge of box 1 (x = 128).
  # Plain text (a caption) draws no boxes at all.
  plain = render.draw_prediction(BLACK, "a black square")
  np.testing.assert_array_equal(plain[:256], 0)


def test_boxes_outside_the_image_are_clipped_and_skipped_without_box():
  objects = [_obj(None, "nothing", valid=False), _obj((0.5, 0.5, 1.0, 1.0), "edge", valid=False)]
  out = render.draw_prediction(BLACK, "", objects=objects)
  assert out.shape[:2][1] == 256
  assert tuple(out[200, 255]) == render.PALETTE[1]  # The right edge at the last column.
  assert tuple(out[255, 200]) == render.PALETTE[1]  # The bottom edge at the last row.


def test_mask_overlay_blends_the_object_colour():
  mask = np.zeros((16, 16), bool)
  mask[0:4, 10:16] = True
  gray = np.full((16, 16, 3), 100, np.uint8)
  out = render.draw_prediction(gray, "", objects=[], masks=[None, mask])
  color = np.asarray(render.PALETTE[1], np.float64)
  expected = np.round(0.5 * 100 + 0.5 * color)
  np.testing.assert_array_equal(out[0:64, 160:256].reshape(-1, 3),
                                np.broadcast_to(expected, (64 * 96, 3)))
  np.testing.assert_array_equal(out[64:256].reshape(-1, 3), 100)  # Outside the mask.
  np.testing.assert_array_equal(out[0:64, :160].reshape(-1, 3), 100)


def test_mask_from_vqvae_mask_in_box_lines_up_with_its_box():
  logits = np.ones((64, 64), np.float32)  # All "inside": the mask fills its box.
  box = (0.25, 0.5, 0.5, 1.0)
  mask = vqvae.mask_in_box(logits, [int(v * 16) for v in box], (16, 16))
  out = render.draw_prediction(BLACK, "", objects=[_obj(box)], masks=[mask])
  color = np.asarray(render.PALETTE[0])
  np.testing.assert_array_equal(out[100, 160], np.round(0.5 * color))  # Inside box and mask.
  assert tuple(out[100, 128]) == tuple(color)  # Box edge, x = 0.5 * 256.
  np.testing.assert_array_equal(out[200, 160], 0)  # Below the box: neither.


def test_text_band_wraps_long_text():
  short = render.draw_prediction(BLACK, "a cat", prompt="caption en")
  long = render.draw_prediction(BLACK, "a cat on a mat " * 20, prompt="caption en")
  target = render.draw_prediction(BLACK, "a cat", prompt="caption en", target="a cat")
  assert short.shape[1] == long.shape[1] == target.shape[1] == 256
  line_h = target.shape[0] - short.shape[0]  # One more line ("target: a cat").
  assert line_h > 8
  assert long.shape[0] > short.shape[0] + 3 * line_h
  band = short[256:]
  assert (band == 255).all(axis=-1).mean() > 0.8  # White band ...
  assert (band < 100).all(axis=-1).any()  # ... with dark text on it.
  capped = render.draw_prediction(BLACK, "word " * 1000, max_text_lines=3)
  assert capped.shape[0] == short.shape[0] + 2 * line_h  # 1 prompt line + 3 pred lines.


def test_unbreakable_tokens_wrap_inside_the_width():
  font = render._font(13)  # pylint: disable=protected-access
  lines = render._wrap("pred: " + "<loc0123>" * 40, font, 200, 100)  # pylint: disable=W0212
  assert len(lines) > 5 and lines[0].startswith("pred: <loc")
  assert all(font.getlength(line) <= 200 for line in lines)
  assert "".join(lines).replace(" ", "") == ("pred:" + "<loc0123>" * 40)


def test_render_batch_pads_to_one_size():
  images = [BLACK, np.zeros((32, 48, 3), np.uint8)]
  out = render.render_batch(images, ["a", "b " * 200], prompts=["p", "q"],
                            targets=[None, "t"], masks=[[np.ones((16, 16), bool)], None])
  one = render.draw_prediction(BLACK, "a", prompt="p", masks=[np.ones((16, 16), bool)])
  two = render.draw_prediction(images[1], "b " * 200, prompt="q", target="t")
  assert out.shape == (2, max(one.shape[0], two.shape[0]), max(one.shape[1], two.shape[1]), 3)
  assert two.shape[1] == 288  # 48 px * 6 (the longer side 48 -> 288 >= 256).
  np.testing.assert_array_equal(out[0, :one.shape[0], :one.shape[1]], one)
  np.testing.assert_array_equal(out[1, :two.shape[0], :two.shape[1]], two)
  np.testing.assert_array_equal(out[0, :, one.shape[1]:], 255)  # Padding.


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match=r"image: expected \[H,W,3\].*\[2, 16, 16, 3\]"):
    render.draw_prediction(np.zeros((2, 16, 16, 3)), "x")
  with pytest.raises(ValueError, match="float in \\[-1, 1\\] or uint8, got int32"):
    render.draw_prediction(np.zeros((16, 16, 3), np.int32), "x")
  with pytest.raises(ValueError, match=r"masks\[0\] must be bool\[16,16\].*\[8, 8\]"):
    render.draw_prediction(BLACK, "x", masks=[np.zeros((8, 8), bool)])
  with pytest.raises(TypeError, match="text must be a str"):
    render.draw_prediction(BLACK, [1, 2])
  with pytest.raises(ValueError, match="render_batch: 1 prompts for 2 texts"):
    render.render_batch([BLACK, BLACK], ["a", "b"], prompts=["p"])
