"""Sources (sources.py): JSONL rows good and bad; TFDS through mock_data and through real
tfrecord files; big_vision's cococap / vqav2 / refcoco_seg pp strings run on them.

tfds.testing.mock_data's random-access mock cannot generate nested Sequence(dict) features
(coco_captions' captions, ref_coco's objects/refs: "length of all elements of one sequence
should be the same"), so those two run on tiny real TFDS datasets with the same features,
written to tfrecord files; the flat VQAv2 features run under mock_data.
"""
import io
import json
import os
import pickle
import re

import numpy as np
import PIL.Image
import pytest

from big_vision_lite.data import pp_text
from big_vision_lite.data.pp_parse import ExampleError, PPContext, Preprocess, Runtime
from big_vision_lite.data.sources import JsonlSource, TfdsSource, make_source, slice_bounds

tfds = pytest.importorskip("tensorflow_datasets")

COMBINE_TRAIN = pp_text.combine_and_keep_train
COMBINE_EVAL = pp_text.combine_and_keep_eval


class CharTokenizer:
  """One id per character; <locNNNN> / <segNNN> are single ids (1000 + N, 3000 + N)."""
  pad_id, eos_id, bos_id = 0, 1, 2

  def encode(self, text, *, add_bos=False, add_eos=False):
    ids = []
    for loc, seg, char in re.findall(r"<loc(\d{4})>|<seg(\d{3})>|(.)", text, re.S):
      ids.append(1000 + int(loc) if loc else 3000 + int(seg) if seg else 3 + ord(char) % 200)
    return [2] * add_bos + ids + [1] * add_eos


def fake_encode_masks(masks):
  return np.round(np.asarray(masks)[..., 0].reshape(len(masks), 16, -1).mean(-1) * 127).astype(
      np.int32)


CTX = PPContext(tokenizer=CharTokenizer(), encode_masks=fake_encode_masks)


def jpeg(h, w, value=128):
  buf = io.BytesIO()
  PIL.Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(buf, "JPEG")
  return buf.getvalue()


@pytest.fixture()
def jsonl_dir(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "a.jpg").write_bytes(jpeg(30, 40, 50))
  (tmp_path / "img" / "b.jpg").write_bytes(jpeg(20, 20, 200))
  (tmp_path / "img" / "cut.jpg").write_bytes(jpeg(64, 64)[:300])
  rows = [
      json.dumps({"image": "img/a.jpg", "caption": "first", "boxes": [[0, 0, 1, 1]]}),
      json.dumps({"image": "img/b.jpg", "caption": "second", "id": "b"}),
      "{not json",                                      # line 3
      json.dumps({"image": "img/missing.jpg", "caption": "x"}),
      "",                                               # blank line: ignored
      json.dumps({"image": "img/cut.jpg", "caption": "truncated image"}),
      json.dumps({"caption": "no image field"}),
      json.dumps(["a", "list"]),
      json.dumps({"image": "img/a.jpg"}),              # no caption (found by the pp)
  ]
  (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
  return tmp_path


def test_jsonl_good_and_bad_rows(jsonl_dir):
  src = JsonlSource(str(jsonl_dir / "data.jsonl"))
  assert len(src) == 8
  path = str(jsonl_dir / "data.jsonl")
  assert src.where(2) == f"{path}:3" and src.where(4) == f"{path}:6"
  first = src[0]
  assert first["caption"] == "first" and first["id"] == 0 and first["boxes"] == [[0, 0, 1, 1]]
  assert first["image"] == (jsonl_dir / "img" / "a.jpg").read_bytes()
  assert src[1]["id"] == "b"
  errors = {}
  for i in (2, 3, 5, 6):
    with pytest.raises(ExampleError) as e:
      src[i]
    errors[i] = str(e.value)
  assert "malformed JSON" in errors[2]
  assert "image file not found" in errors[3] and "missing.jpg" in errors[3]
  assert "missing field 'image'" in errors[5]
  assert "must hold a JSON object" in errors[6]
  pp = Preprocess('decode|resize(8)|strfmt("{caption}", outkey="suffix")', CTX)
  assert pp(src[0])["image"].shape == (8, 8, 3)
  with pytest.raises(ExampleError, match="corrupt or truncated"):
    pp(src[4])
  with pytest.raises(ExampleError, match="missing field 'caption'"):
    pp(src[7])


def test_jsonl_split_base_dir_and_pickle(jsonl_dir, tmp_path_factory):
  src = make_source({"name": "jsonl", "path": str(jsonl_dir / "data.jsonl"), "split": "[1:3]"})
  assert len(src) == 2 and src[0]["id"] == "b" and src.where(1) == f"{jsonl_dir}/data.jsonl:3"
  with pytest.raises(ExampleError, match="malformed"):
    src[1]
  assert make_source({"name": "jsonl", "path": str(jsonl_dir / "data.jsonl"),
                      "split": "[7:]"})[0]["id"] == 7
  other = tmp_path_factory.mktemp("elsewhere")
  (other / "d.jsonl").write_text(json.dumps({"pic": "img/b.jpg"}) + "\n")
  src = make_source({"name": "jsonl", "path": str(other / "d.jsonl"), "image_keys": ["pic"],
                     "base_dir": str(jsonl_dir)})
  assert src[0]["pic"] == (jsonl_dir / "img" / "b.jpg").read_bytes()
  again = pickle.loads(pickle.dumps(src))
  assert again[0]["pic"] == src[0]["pic"]
  with pytest.raises(ValueError, match="unexpected keyword argument 'colums'"):
    make_source({"name": "jsonl", "path": str(other / "d.jsonl"), "colums": 1})
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    make_source({"name": "jsonl", "path": str(other / "nope.jsonl")})


def test_slice_bounds():
  assert slice_bounds(50, None, "16", "t") == (0, 16)
  assert slice_bounds(50, "-2%", None, "t") == (49, 50)
  assert slice_bounds(50, "10%", "-10", "t") == (5, 40)
  assert slice_bounds(5, "7", None, "t") == (5, 5)


# --- TFDS: mock_data (no files) -------------------------------------------------------------------
def run_pp(pp, example, index=0):
  return Preprocess(pp, CTX)(example, Runtime(seed=0, index=index, epoch=0, ctx=CTX))


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds_coco"))
  CocoCaptionsTiny(data_dir=data_dir).download_and_prepare()
  return data_dir


def _coco_captions_builder_cls():
  return tfds.builder_cls("coco_captions")


class CocoCaptionsTiny(_coco_captions_builder_cls()):
  """TFDS's own coco_captions features and splits, with a few random examples written out."""

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 4), "restval": self._generate_examples(50, 2),
            "val": self._generate_examples(100, 2)}

  def _generate_examples(self, base, n):  # pylint: disable=arguments-differ
    for i in range(n):
      rng = np.random.default_rng(base + i)
      captions = [dict(id=base * 10 + k, text=f"caption {base + i} number {k}")
                  for k in range(int(rng.integers(2, 5)))]
      objects = [dict(id=j, area=10, bbox=tfds.features.BBox(0.1, 0.1, 0.5, 0.6),
                      label=int(rng.integers(80)), is_crowd=False) for j in range(2)]
      image = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
      yield base + i, {"image": image, "image/filename": f"{base + i}.jpg",
                       "image/id": base + i, "objects": objects, "captions": captions}


def test_cococap_pp_on_coco_captions(coco_dir):
  # The pp strings of big_vision's configs/proj/paligemma/transfers/cococap.py.
  train_pp = "|".join(["flatten", "decode", "resize(32)", "value_range(-1, 1)",
                       'choice_no_replacement(inkey="captions/text", outkey="suffix")',
                       'strfmt("caption en", outkey="prefix")', COMBINE_TRAIN(32)])
  eval_pp = "|".join([
      "flatten", 'copy("captions/text", "captions")', "decode", "resize(32)",
      "value_range(-1, 1)", 'strfmt("caption en", outkey="prefix")',
      COMBINE_EVAL(32, keep=("image/id", "captions"))])
  src = make_source({"name": "coco_captions_tiny", "split": "train[:50%]+restval",
                     "data_dir": coco_dir})
  assert len(src) == 4 and src.where(1) == "tfds:coco_captions_tiny/train[:50%]+restval[1]"
  train = make_source({"name": "coco_captions_tiny", "split": "train", "data_dir": coco_dir})
  first_half = [int(train[i]["image/id"]) for i in range(2)]  # File order (TFDS shuffles).
  assert [int(src[i]["image/id"]) for i in range(4)] == first_half + [50, 51]
  ex = src[2]
  assert isinstance(ex["image"], bytes)  # skip_decode: the pp decodes.
  captions = [c.decode() for c in ex["captions"]["text"]]
  suffixes = set()
  for epoch in range(len(captions)):  # choice_no_replacement: every caption once.
    out = Preprocess(train_pp, CTX)(ex, Runtime(seed=0, index=2, epoch=epoch, ctx=CTX))
    assert out["image"].shape == (32, 32, 3) and out["text"].shape == (33,)
    n_prefix = 1 + len("caption en") + 1
    suffix_ids = out["text"][n_prefix:n_prefix + int(out["mask_loss"].sum()) - 1]
    suffixes.add("".join(chr(i - 3) for i in suffix_ids))
  assert suffixes == set(captions)
  ev = run_pp(eval_pp, ex)
  assert set(ev) == {"image", "text", "mask_ar", "mask_input", "image/id", "captions"}
  assert ev["text"].shape == (32,) and [c.decode() for c in ev["captions"]] == captions


class Vqa(tfds.core.GeneratorBasedBuilder):
  """big_vision's VQAv2 builder (datasets/vqa/vqa.py) features, for mock_data."""
  VERSION = tfds.core.Version("3.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image/id": np.int32, "image/filename": tfds.features.Text(),
        "image": tfds.features.Image(encoding_format="jpeg"), "question_id": np.int32,
        "question_type": tfds.features.Text(), "question_text": tfds.features.Text(),
        "answer_type": tfds.features.Text(),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "answer_confidences": tfds.features.Sequence(
            tfds.features.ClassLabel(names=["no", "maybe", "yes"])),
        "top_answer": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    raise NotImplementedError  # Only ever mocked.

  def _generate_examples(self):
    raise NotImplementedError


def test_vqav2_pp_on_mock_vqa():
  # The pp strings of big_vision's configs/proj/paligemma/transfers/vqav2.py.
  train_pp = "|".join([
      "decode|resize(24, antialias=True)|value_range(-1, 1)",
      'strfmt("answer en {question_text}", outkey="prefix")',
      'choice_no_replacement(inkey="answers", outkey="suffix")', COMBINE_TRAIN(96)])
  eval_pp = "|".join([
      "decode|resize(24, antialias=True)|value_range(-1, 1)",
      'strfmt("answer en {question_text}", outkey="prefix")',
      COMBINE_EVAL(96, keep=("answers", "answer_type", "question_type", "question_id"))])
  with tfds.testing.mock_data(num_examples=3):
    src = make_source({"name": "tfds:vqa", "split": "train + validation[:-10240]"})
    ex = src[1]
    out = run_pp(train_pp, ex)
    q = np.asarray(ex["question_text"]).item()
    q = q.decode() if isinstance(q, bytes) else q
    n_prefix = 1 + len(f"answer en {q}")
    assert out["text"].shape == (97,) and (out["mask_ar"][:n_prefix + 1] == 0).all()
    assert out["mask_loss"][:n_prefix + 1].sum() == 0 and out["mask_loss"].sum() >= 1
    ev = run_pp(eval_pp, ex)
    assert set(ev) == {"image", "text", "mask_ar", "mask_input", "answers", "answer_type",
                       "question_type", "question_id"}
    assert ev["image"].shape == (24, 24, 3) and ev["image"].min() >= -1


# --- TFDS: real tfrecord files (big_vision's ref_coco_bv layout, tiny) ------------------------------
class RefCocoBvTiny(tfds.core.GeneratorBasedBuilder):
  """big_vision's RefCocoBv features (datasets/refcoco/refcoco.py), a few random images."""
  VERSION = tfds.core.Version("1.4.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "id": np.int32, "image": tfds.features.Image(encoding_format="jpeg"),
        "height": np.int32, "width": np.int32,
        "objects": tfds.features.Sequence({
            "id": np.int64, "bbox": tfds.features.BBoxFeature(),
            "mask": tfds.features.Image(encoding_format="png"),
            "refs": tfds.features.Sequence({"id": np.int32, "sentence": tfds.features.Text()}),
        })}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(0, 4), "validation": self._generate_examples(10, 2)}

  def _generate_examples(self, base, n):
    for i in range(n):
      h, w = 30, 40
      image = np.random.default_rng(base + i).integers(0, 256, (h, w, 3), dtype=np.uint8)
      objects = []
      for j in range(2):
        mask = np.zeros((h, w, 3), np.uint8)
        mask[6:18, 8 + 8 * j:24 + 8 * j] = 255
        objects.append(dict(
            id=j, mask=mask, bbox=tfds.features.BBox(6 / h, (8 + 8 * j) / w, 18 / h,
                                                     (24 + 8 * j) / w),
            refs=[dict(id=k, sentence=f"obj {base + i} {j} ref {k}") for k in range(j + 1)]))
      yield base + i, dict(id=base + i, image=image, height=h, width=w, objects=objects)


@pytest.fixture(scope="module")
def refcoco_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  RefCocoBvTiny(data_dir=data_dir).download_and_prepare()
  return data_dir


def test_tfds_tfrecord_random_access(refcoco_dir):
  src = TfdsSource("ref_coco_bv_tiny", "train[:50%]+validation", data_dir=refcoco_dir)
  train = TfdsSource("ref_coco_bv_tiny", "train", data_dir=refcoco_dir)
  val = TfdsSource("ref_coco_bv_tiny", "validation", data_dir=refcoco_dir)
  train_ids = [int(train[i]["id"]) for i in range(len(train))]
  assert sorted(train_ids) == [0, 1, 2, 3]
  assert [int(src[i]["id"]) for i in range(len(src))] == train_ids[:2] + [
      int(val[i]["id"]) for i in range(2)]
  ex = src[0]
  assert isinstance(ex["image"], bytes) and len(ex["objects"]["refs"]["sentence"]) == 2
  again = pickle.loads(pickle.dumps(src))
  assert again[3]["id"] == src[3]["id"]
  os.environ["TFDS_DATA_DIR"] = refcoco_dir  # data_dir=None respects TFDS_DATA_DIR.
  try:
    assert len(make_source({"name": "tfds:ref_coco_bv_tiny", "split": "validation"})) == 2
  finally:
    del os.environ["TFDS_DATA_DIR"]


def test_refcoco_seg_pp_on_tfrecord_dataset(refcoco_dir):
  # The pp strings of big_vision's configs/proj/paligemma/transfers/refcoco_seg.py (crop='rs').
  train_pp = "|".join([
      "flatten",
      'choice_no_replacement(key=["objects/mask", "objects/bbox", "objects/refs/sentence"])',
      'choice(key=["objects/refs/sentence"])', "decode", "resize(16)", "value_range(-1, 1)",
      "refcoco_mask2str", COMBINE_TRAIN(48)])
  eval_pp = "|".join([
      "flatten", 'choice(key=["objects/mask", "objects/bbox", "objects/refs/sentence"])',
      'choice(key=["objects/refs/sentence"], outkey="prefix")',
      "decode|resize(16)|value_range(-1, 1)",
      COMBINE_EVAL(48, keep=("objects/mask", "objects/bbox", "width", "height"))])
  src = TfdsSource("ref_coco_bv_tiny", "train", data_dir=refcoco_dir)
  for index in range(len(src)):
    ex = src[index]
    # Run the op chain up to refcoco_mask2str to check its target against the data.
    pre = Preprocess(train_pp.split("|value_range(-1, 1)|")[0] + "|refcoco_mask2str", CTX)(
        ex, Runtime(seed=0, index=index, epoch=0))
    obj = [j for j in range(2) if str(pre["prefix"]).startswith(f"obj {int(ex['id'])} {j} ")]
    assert len(obj) == 1
    j = obj[0]
    box = np.array([6 / 30, (8 + 8 * j) / 40, 18 / 30, (24 + 8 * j) / 40])
    locs = "".join(f"<loc{int(v):04d}>" for v in np.clip(np.round(box * 1023), 0, 1023))
    assert pre["suffix"] == locs + "<seg127>" * 16  # The crop is all mask: codes of 1.0.
    out = run_pp(train_pp, ex, index)
    assert out["image"].shape == (16, 16, 3) and out["text"].shape == (49,)
    assert int(out["mask_loss"].sum()) == 4 + 16 + 1  # locs + segs + eos.
    ev = run_pp(eval_pp, ex, index)
    assert ev["objects/mask"].shape == (30, 40, 3) and ev["objects/bbox"].shape == (4,)
    assert int(ev["width"]) == 40
