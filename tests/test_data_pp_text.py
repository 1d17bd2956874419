"""Text and target pp ops (pp_text.py, pp_targets.py): tok, masks, layout, <loc>/<seg> targets."""
import numpy as np
import pytest

from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data import pp_targets
from big_vision_lite.data.pp_parse import (ExampleError, PPContext, PPError, Preprocess, Runtime,
                                           TextTooLongError)
from big_vision_lite.data.pp_text import TOKENIZER, combine_and_keep_eval, combine_and_keep_train


class CharTokenizer:
  """Hand-checkable: one id per character (ord(c) - 90, "\\n" -> 7), pad 0, eos 1, bos 2."""
  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, *, add_bos=False, add_eos=False):
    ids = [7 if c == "\n" else ord(c) - 90 for c in text]
    return [2] * add_bos + ids + [1] * add_eos


def fake_encode_masks(masks):
  """int[N, 16]: code k = round(100 * mean of the k-th 16x16 block) (fully checkable)."""
  m = np.asarray(masks, np.float32)[..., 0]
  blocks = m.reshape(len(m), 4, 16, 4, 16).mean((2, 4)).reshape(len(m), 16)
  return np.round(blocks * 100).astype(np.int32)


def run(pp, data, truncate=False, epoch=0):
  ctx = PPContext(tokenizer=CharTokenizer(), encode_masks=fake_encode_masks, truncate=truncate)
  rt = Runtime(seed=0, index=0, epoch=epoch, ctx=ctx)
  return Preprocess(pp, ctx)(data, rt), rt


def test_strfmt_and_lower():
  out, _ = run('strfmt("answer en {question_text} {n} {objects/label}", outkey="prefix")|'
               'lower(key="prefix")',
               {"question_text": b"Is It?", "n": np.int64(3), "objects": {"label": "Cat"}})
  assert out["prefix"] == "answer en is it? 3 cat"
  with pytest.raises(PPError, match="format specs"):
    Preprocess('strfmt("{x:>3}")')


def test_tok_bos_eos_sticky_and_constant():
  data = {"s": "abc"}
  assert run("tok(key='s')", data)[0]["s"].tolist() == [7, 8, 9]
  assert run("tok(key='s', bos='yes', eos='yes')", data)[0]["s"].tolist() == [2, 7, 8, 9, 1]
  out, _ = run(f"tok(inkey='s', outkey='t', length=6, bos='yes', eos='yes', model={TOKENIZER!r})",
               data)
  assert out["t"].dtype == np.int32 and out["t"].tolist() == [2, 7, 8, 9, 1, 0]
  assert run("tok(key='sep', text='\\n')", {})[0]["sep"].tolist() == [7]
  out, rt = run("tok(key='s', length=3, eos='sticky')", data, truncate=True)
  assert out["s"].tolist() == [7, 8, 1] and rt.truncated
  out, rt = run("tok(key='s', length=3, eos='yes')", data, truncate=True)
  assert out["s"].tolist() == [7, 8, 9] and rt.truncated
  with pytest.raises(TextTooLongError, match="4 tokens, more than the allowed 3"):
    run("tok(key='s', length=3, eos='yes')", data)


@pytest.mark.parametrize("pp, needle", [
    ("tok(key='s', model='mc4')", "unknown tokenizer model='mc4'"),
    ("tok(key='s', model='gemma(tokensets=(\"loc\", \"pix\"))')", "tokensets must be a subset"),
    ("tok(key='s', bos='sticky')", "bos must be 'no'/'yes'"),
    ("tok(model='gemma')", "needs key="),
])
def test_tok_bad_args(pp, needle):
  with pytest.raises(PPError, match=needle):
    Preprocess(pp, PPContext(tokenizer=CharTokenizer()))


def test_tok_without_tokenizer_is_a_build_error():
  with pytest.raises(PPError, match="needs a tokenizer"):
    Preprocess("tok(key='s')")


def test_masked_concat_and_tolen():
  data = {"p": np.array([2, 5, 6], np.int32), "sep": np.array([7]), "s": np.array([9, 1])}
  out, _ = run('masked_concat(["p", "sep", "s"], mask_ar=[0, 0, 1], mask_loss=[0, 0, 1])', data)
  assert out["text"].tolist() == [2, 5, 6, 7, 9, 1]
  assert out["mask_ar"].tolist() == [0, 0, 0, 0, 1, 1]
  assert out["mask_loss"].tolist() == [0, 0, 0, 0, 1, 1]
  out, _ = run('tolen(5, pad_value=9, key="p")|tolen(2, inkey="s", outkey="s2", pad_key="sep")|'
               'tolen(3, key="s", pad_key="p")', data)
  assert out["p"].tolist() == [2, 5, 6, 9, 9] and out["s2"].tolist() == [9, 1]
  assert out["s"].tolist() == [9, 1, 2]
  out, rt = run('tolen(2, key="p", sticky_end=True, pad_value=0)', data, truncate=True)
  assert out["p"].tolist() == [2, 6] and rt.truncated
  with pytest.raises(ExampleError, match="must hold int"):
    run('masked_concat(["p", "x"], mask_ar=[0, 1])', {**data, "x": "text"})
  with pytest.raises(PPError, match="one value per key"):
    Preprocess('masked_concat(["p", "s"], mask_ar=[0])')


def test_paligemma_train_and_eval_layout():
  ex = {"image": np.zeros((2, 2, 3), np.float32), "prefix": "ab", "suffix": "cd", "x": 1}
  out, _ = run(combine_and_keep_train(8), ex)
  assert set(out) == {"image", "text", "mask_ar", "mask_loss", "mask_input"}
  # [bos a b] [\n] [c d eos] [pad pad pad]: text_len + 1 = 9 tokens.
  assert out["text"].tolist() == [2, 7, 8, 7, 9, 10, 1, 0, 0]
  assert out["mask_ar"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1]
  assert out["mask_loss"].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0]
  assert out["mask_input"].tolist() == [1, 1, 1, 1, 1, 1, 1, 0, 0]
  out, _ = run(combine_and_keep_eval(6, keep=("x",)), ex)
  assert set(out) == {"image", "text", "mask_ar", "mask_input", "x"}
  assert out["text"].tolist() == [2, 7, 8, 7, 0, 0]
  assert out["mask_ar"].tolist() == [0, 0, 0, 0, 1, 1]
  assert out["mask_input"].tolist() == [1, 1, 1, 1, 0, 0]
  with pytest.raises(TextTooLongError, match="10 tokens, more than the allowed 9"):
    run(combine_and_keep_train(8), {**ex, "suffix": "cdefg"})
  out, rt = run(combine_and_keep_train(8), {**ex, "suffix": "cdefg"}, truncate=True)
  assert out["text"].tolist() == [2, 7, 8, 7, 9, 10, 11, 12, 13] and rt.truncated


def test_detection_target_formats():
  ex = {"objects": {"bbox": np.array([[0.1, 0.2, 0.5, 1.0], [0.0, 0.0, 0.25, 0.75]]),
                    "label": ["cat", "dog"]}}
  out, _ = run("detection_target()", ex)
  # round(v * 1023): 102.3 -> 102, 204.6 -> 205, 511.5 -> 512 (half to even), 1023.
  assert out["prefix"] == "detect cat ; dog"
  assert out["suffix"] == ("<loc0102><loc0205><loc0512><loc1023> cat ; "
                           "<loc0000><loc0000><loc0256><loc0767> dog")
  # Pixels in COCO's x, y, w, h with height/width keys; class ids with names; repeated labels.
  ex = {"objects": {"bbox": [[20, 10, 80, 40], [0, 0, 200, 100]], "label": [1, 1]},
        "height": 100, "width": 200}
  out, _ = run("detection_target(box_format='xywh', pixels=True, label_names=['a', 'cat'])", ex)
  assert out["prefix"] == "detect cat"
  assert out["suffix"] == ("<loc0102><loc0102><loc0512><loc0512> cat ; "
                           "<loc0000><loc0000><loc1023><loc1023> cat")
  with pytest.raises(ExampleError, match="no objects"):
    run("detection_target()", {"objects": {"bbox": np.zeros((0, 4)), "label": []}})
  with pytest.raises(ExampleError, match="class ids; pass label_names"):
    run("detection_target()", {"objects": {"bbox": [[0, 0, 1, 1]], "label": [3]}})
  with pytest.raises(ExampleError, match="2 boxes but 1 labels"):
    run("detection_target()", {"objects": {"bbox": [[0, 0, 1, 1]] * 2, "label": ["a"]}})


def test_crop_masks_64_and_segmentation_target():
  mask = np.zeros((100, 200), bool)
  mask[20:60, 40:120] = True   # The box is [0.2, 0.2, 0.6, 0.6] ...
  mask[20:60, 80:120] = False  # ... and only its left half is inside the mask.
  box = np.array([0.2, 0.2, 0.6, 0.6])
  crop = pp_targets.crop_masks_64(mask[None], box[None])
  assert crop.shape == (1, 64, 64, 1)
  np.testing.assert_allclose(crop[0, :, :31, 0], 1.0, atol=1e-6)
  np.testing.assert_allclose(crop[0, :, 33:, 0], 0.0, atol=1e-6)
  # uint8 masks stored 0/255 (TFDS PNGs) give the same crop.
  np.testing.assert_allclose(
      pp_targets.crop_masks_64((mask * 255).astype(np.uint8)[None, ..., None], box[None]), crop)
  ex = {"objects": {"mask": mask[None], "bbox": box[None], "label": ["tri"]}}
  out, _ = run("segmentation_target()", ex)
  codes = [100, 100, 0, 0] * 4  # Left two of four 16-px block columns are full.
  assert out["prefix"] == "segment tri"
  assert out["suffix"] == ("<loc0205><loc0205><loc0614><loc0614>"
                           + "".join(f"<seg{c:03d}>" for c in codes) + " tri")
  parsed = tok_lib.parse_objects(out["suffix"])
  assert parsed[0].valid and parsed[0].seg_codes == tuple(codes)


def test_refcoco_mask2str_matches_big_vision_format():
  mask = np.zeros((50, 50, 3), np.uint8)
  mask[10:30, 10:30] = 255
  ex = {"objects/mask": mask, "objects/bbox": np.array([0.2, 0.2, 0.6, 0.6], np.float32),
        "objects/refs/sentence": b"the left one"}
  out, _ = run("refcoco_mask2str", ex)
  assert out["prefix"] == "the left one"
  assert out["suffix"] == ("<loc0205><loc0205><loc0614><loc0614>"
                           + "<seg100>" * 16)  # No label after the codes, as big_vision.
  with pytest.raises(PPError, match="only 'oi'"):
    Preprocess("refcoco_mask2str(model='other')", PPContext(encode_masks=fake_encode_masks))
  with pytest.raises(PPError, match="needs a mask encoder"):
    Preprocess("refcoco_mask2str")
  with pytest.raises(ExampleError, match="needs one object"):
    run("refcoco_mask2str", {**ex, "objects/bbox": np.zeros((2, 4))})


def test_bad_encoder_output_is_reported():
  ctx = PPContext(encode_masks=lambda m: np.zeros((len(m), 8), np.int32))
  pp = Preprocess("segmentation_target()", ctx)
  ex = {"objects": {"mask": np.ones((1, 8, 8), bool), "bbox": [[0, 0, 1, 1]], "label": ["a"]}}
  with pytest.raises(ExampleError, match=r"expected int\[1, 16\]"):
    pp(ex)
