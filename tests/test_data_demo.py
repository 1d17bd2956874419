"""The embedded demo dataset (demo.py): determinism, exact ground truth, tasks, tokenizer."""
import os

import numpy as np
import pytest

from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data import demo, pipeline, pp_targets
from big_vision_lite.data.pp_parse import PPContext, Preprocess, Runtime


def fake_encode_masks(masks):
  m = np.asarray(masks, np.float32)[..., 0]
  return np.round(m.reshape(len(m), 4, 16, 4, 16).mean((2, 4)).reshape(len(m), 16) * 127).astype(
      np.int32)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return demo.demo_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_records_are_deterministic_and_splits_differ():
  a, b = demo.DemoSource("val", image_size=48), demo.DemoSource("val", image_size=48)
  for i in (0, 5, 511):
    ra, rb = a[i], b[i]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["objects"]["mask"], rb["objects"]["mask"])
    assert ra["captions"] == rb["captions"] and ra["question"] == rb["question"]
  assert len(a) == 512 and len(demo.DemoSource("train", train_size=1000)) == 1000
  train = demo.DemoSource("train", image_size=48)
  assert not any(np.array_equal(train[i]["image"], a[i]["image"]) for i in range(10))
  # The same scene at another size: same text, boxes equal up to the pixel grid.
  big = demo.DemoSource("val", image_size=96)[5]
  assert big["captions"] == a[5]["captions"]
  np.testing.assert_allclose(big["objects"]["bbox"], a[5]["objects"]["bbox"], atol=2.5 / 48)
  sliced = demo.DemoSource("val[10:20]", image_size=48)
  assert len(sliced) == 10 and sliced[0]["id"] == 10 and sliced.where(0) == "demo:val[10]"
  with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
    demo.DemoSource("test")


def test_ground_truth_matches_the_pixels():
  src = demo.DemoSource("val", image_size=64)
  counts = set()
  for i in range(40):
    r = src[i]
    obj = r["objects"]
    n = len(obj["label"])
    counts.add(n)
    assert 1 <= n <= 3 and len(set(obj["label"])) == n and len(set(obj["colour"])) == n
    assert obj["mask"].shape == (n, 64, 64) and obj["mask"].dtype == bool
    assert not (obj["mask"].sum(0) > 1).any()  # Visible masks never overlap.
    for k in range(n):
      m = obj["mask"][k]
      rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
      np.testing.assert_array_equal(obj["bbox_pixels"][k],
                                    [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1])
      np.testing.assert_allclose(obj["bbox"][k], obj["bbox_pixels"][k] / 64)
      # Every visible pixel has the shape's colour.
      assert (r["image"][m] == demo.COLOURS[obj["colour"][k]]).all()
    centres = (obj["bbox"][:, 1] + obj["bbox"][:, 3]) / 2
    assert np.all(np.diff(centres) > -0.15)  # Described left to right (by layout centre).
    qa = dict(zip(r["qa"]["question"], r["qa"]["answer"]))
    assert qa["how many shapes are there?"] == str(n)
    for label, colour in zip(obj["label"], obj["colour"]):
      assert qa[f"what colour is the {label}?"] == colour
      assert qa[f"which shape is {colour}?"] == label
    assert qa[r["question"]] == r["answers"][0]
    first = r["captions"][0]
    assert all(f"{c} {k}" in first for c, k in zip(obj["colour"], obj["label"]))
  assert counts == {1, 2, 3}


def test_caption_relation_is_from_the_centres():
  src = demo.DemoSource("val", image_size=64)
  checked = 0
  for i in range(60):
    r = src[i]
    layout = demo.scene_text("val", i)[0]
    if len(layout["shapes"]) != 2:
      continue
    a, b = layout["shapes"]
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    rel = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else (
        "above" if dy > 0 else "below")
    name = lambda s: ("an " if s["colour"] == "orange" else "a ") + f"{s['colour']} {s['kind']}"
    assert r["captions"][0] == f"{name(a)} {rel} {name(b)}"
    checked += 1
  assert checked >= 10


def test_demo_tokenizer_is_cached_and_covers_the_vocabulary(tmp_path):
  tok = demo.demo_tokenizer(str(tmp_path))
  files = os.listdir(tmp_path)
  assert len(files) == 1 and files[0].startswith("demo_tokenizer_")
  mtime = os.path.getmtime(tmp_path / files[0])
  again = demo.demo_tokenizer(str(tmp_path))
  assert os.path.getmtime(tmp_path / files[0]) == mtime and again.vocab_size == tok.vocab_size
  assert os.path.getsize(tmp_path / files[0]) < 1_000_000
  assert tok.pad_id == 0 and tok.eos_id == 1 and tok.bos_id == 2
  for s in set(demo.demo_sentences(num_scenes=200)):
    ids = tok.encode(s)
    pieces = [tok.id_to_piece(i) for i in ids]
    assert not any(p.startswith("<0x") for p in pieces), (s, pieces)  # No byte fallback.
    assert tok.decode(ids) == s
  assert len(tok.encode("a red circle left of a blue square")) <= 8


@pytest.mark.parametrize("task", demo.TASKS)
def test_train_pp_of_each_task(tok, task):
  ctx = PPContext(tokenizer=tok, encode_masks=fake_encode_masks)
  pp = Preprocess(demo.demo_pp(task, image_size=32, text_len=64), ctx)
  src = demo.DemoSource("train", image_size=32)
  for i in range(8):
    raw = src[i]
    out = pp(raw, Runtime(seed=0, index=i, epoch=0, ctx=ctx))
    n = int(out["mask_input"].sum())
    prefix, suffix = tok.decode(out["text"][:n].tolist()).split("\n")
    obj = raw["objects"]
    if task == "caption":
      assert prefix == "caption en" and suffix in raw["captions"]
    elif task == "vqa":
      qa = dict(zip(raw["qa"]["question"], raw["qa"]["answer"]))
      question = prefix[len("answer en "):]
      assert prefix.startswith("answer en ") and qa[question] == suffix
    elif task == "detect":
      assert prefix == "detect " + " ; ".join(obj["label"])
      parsed = tok_lib.parse_objects(suffix)
      assert [p.label for p in parsed] == obj["label"] and all(p.valid for p in parsed)
      np.testing.assert_allclose([p.box for p in parsed], obj["bbox"], atol=0.5 / 1023)
    else:
      (p,) = tok_lib.parse_objects(suffix)
      k = obj["label"].index(p.label)
      assert prefix == f"segment {p.label}" and p.valid
      np.testing.assert_allclose(p.box, obj["bbox"][k], atol=0.5 / 1023)
      assert p.seg_codes == tuple(int(c) for c in fake_encode_masks(
          pp_targets.crop_masks_64(obj["mask"][k:k + 1], obj["bbox"][k:k + 1]))[0])


def test_eval_examples_have_the_evaluator_fields():
  data = dict(name="demo", split="val[:6]", image_size=32)
  raw = demo.DemoSource("val[:6]", image_size=32)
  fields = {
      "caption": {"image", "prefix", "captions", "id"},
      "vqa": {"image", "prefix", "answers", "question", "id"},
      "detect": {"image", "prefix", "objects", "height", "width", "id"},
      "segment": {"image", "prefix", "masks", "objects", "height", "width", "id"},
  }
  for task, want in fields.items():
    examples = list(pipeline.eval_examples(data, demo.demo_pp(task, image_size=32, text_len=32,
                                                             train=False), process_count=1,
                                           process_index=0))
    assert len(examples) == 6
    for ex, r in zip(examples, (raw[i] for i in range(6))):
      assert set(ex) == want and ex["id"] == r["id"]
      assert ex["image"].dtype == np.float32 and ex["image"].shape == (32, 32, 3)
      if task == "caption":
        assert ex["prefix"] == "caption en" and ex["captions"] == r["captions"]
      elif task == "vqa":
        assert ex["prefix"] == f"answer en {r['question']}" and ex["answers"] == r["answers"]
      elif task == "segment":
        (label,) = ex["objects"]["label"]
        k = r["objects"]["label"].index(label)
        assert ex["prefix"] == f"segment {label}"
        assert ex["masks"].shape == (1, 32, 32) and ex["masks"].dtype == bool
        np.testing.assert_array_equal(ex["masks"][0], r["objects"]["mask"][k])
        np.testing.assert_array_equal(ex["objects"]["bbox"][0], r["objects"]["bbox"][k])


def test_demo_mixture_config_trains(tok):
  mix = demo.demo_mixture(image_size=32, text_len=48, weights={"caption": 1, "segment": 1})
  assert set(mix) == {"data", "demo_caption", "demo_segment"}
  cfg = dict(batch_size=4, shuffle_buffer_size=1000, num_workers=0, skip_bad_examples=False,
             prefetch=0, **mix)
  it = pipeline.make_train_iterator(cfg, tokenizer=tok, seed=0, encode_masks=fake_encode_masks,
                                    process_index=0, process_count=1)
  b = next(it)
  prompts = [tok.decode(t.tolist()).split()[0] for t in b["text"]]
  assert sorted(prompts) == ["caption", "caption", "segment", "segment"]
  assert it.num_examples == 200_000
  with pytest.raises(ValueError, match="unknown tasks"):
    demo.demo_mixture(image_size=32, text_len=48, weights={"ocr": 1})
