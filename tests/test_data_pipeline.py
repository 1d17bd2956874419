"""Batching, process shards, mixtures, bad input and exact resume (pipeline.py)."""
import io
import json

import jax
import numpy as np
import PIL.Image
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from big_vision_lite.data import demo, pipeline
from big_vision_lite.data.pp_text import combine_and_keep_train


def fake_encode_masks(masks):
  m = np.asarray(masks, np.float32)[..., 0]
  return np.round(m.reshape(len(m), 4, 16, 4, 16).mean((2, 4)).reshape(len(m), 16) * 127).astype(
      np.int32)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  return demo.demo_tokenizer(str(tmp_path_factory.mktemp("tok")))


def input_cfg(**kw):
  cfg = dict(data=dict(name="demo", split="train", image_size=32, train_size=40),
             pp=demo.demo_pp("caption", image_size=32, text_len=24),
             batch_size=4, shuffle_buffer_size=1000, num_workers=0, skip_bad_examples=False,
             prefetch=2)
  cfg.update(kw)
  return cfg


def mixture_cfg(**kw):
  mix = demo.demo_mixture(image_size=32, text_len=40, train_size=40,
                          weights={"caption": 1, "vqa": 1, "detect": 1, "segment": 1})
  for name in mix["data"]:  # Random crops on top: resume must replay pp randomness too.
    mix[name]["pp"] = "inception_crop(32, area_min=60)|" + mix[name]["pp"]
  cfg = dict(batch_size=8, shuffle_buffer_size=100, num_workers=0, skip_bad_examples=False,
             prefetch=2, **mix)
  cfg.update(kw)
  return cfg


def make(cfg, tok, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipeline.make_train_iterator(cfg, tokenizer=tok, seed=7,
                                      encode_masks=fake_encode_masks, **kw)


def batch_bytes(batch):
  return {k: np.asarray(v).tobytes() for k, v in sorted(batch.items())}


def test_config_errors():
  with pytest.raises(ValueError, match=r"unknown keys \['shuffle'\]"):
    pipeline.parse_input_config(input_cfg(shuffle=True))
  cfg = input_cfg()
  del cfg["prefetch"]
  with pytest.raises(ValueError, match=r"missing keys \['prefetch'\]"):
    pipeline.parse_input_config(cfg)
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    pipeline.parse_input_config(input_cfg(batch_size=0))
  with pytest.raises(ValueError, match="needs config.input.cap = dict"):
    pipeline.parse_input_config(input_cfg(data={"cap": 1.0}))
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    make(input_cfg(), None, process_index=0, process_count=3)
  with pytest.raises(ValueError, match="unexpected keyword argument 'image_sise'"):
    make(input_cfg(data=dict(name="demo", split="train", image_sise=3)), None)
  comps, settings = pipeline.parse_input_config(mixture_cfg(
      data={"demo_caption": 1.0, "demo_vqa": 0.0, "demo_detect": 2, "demo_segment": 1}))
  assert [c["name"] for c in comps] == ["demo_caption", "demo_detect", "demo_segment"]
  assert settings["batch_size"] == 8


def test_batches_follow_the_contract(tok):
  it = make(input_cfg(), tok)
  b = next(it)
  assert set(b) == {"image", "text", "mask_ar", "mask_loss", "mask_input"}
  assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
  assert -1 <= b["image"].min() and b["image"].max() <= 1
  for k in ("text", "mask_ar", "mask_loss", "mask_input"):
    assert b[k].shape == (4, 25) and b[k].dtype == np.int32
  for row in range(4):
    text = b["text"][row].tolist()
    n = int(b["mask_input"][row].sum())
    assert text[0] == tok.bos_id and text[n - 1] == tok.eos_id and set(text[n:]) <= {0}
    sep = text.index(tok.encode("\n")[0])
    assert tok.decode(text[:sep]) == "caption en"
    assert b["mask_ar"][row].tolist() == [0] * (sep + 1) + [1] * (25 - sep - 1)
    assert b["mask_loss"][row].tolist() == [0] * (sep + 1) + [1] * (n - sep - 1) + [0] * (25 - n)
  stats = it.stats()
  assert stats["batches"] >= 1 and stats["examples"] == 4 * stats["batches"]
  it.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_resume_is_exact_byte_for_byte(tok, prefetch):
  cfg = mixture_cfg(prefetch=prefetch)
  it = make(cfg, tok)
  reference = [batch_bytes(next(it)) for _ in range(12)]  # 96 examples: > 2 epochs of 40.
  it.close()
  it = make(cfg, tok)
  for _ in range(5):
    next(it)
  state = it.get_state()
  for _ in range(2):  # Consumed after the checkpoint: must not leak into the resumed run.
    next(it)
  it.close()
  resumed = make(cfg, tok)
  resumed.set_state(state)
  got = [batch_bytes(next(resumed)) for _ in range(7)]
  assert got == reference[5:]
  assert resumed.stats()["batches"] == 12 and resumed.stats()["examples"] == 96
  # Restoring into a running iterator rewinds it as well.
  resumed.set_state(state)
  assert batch_bytes(next(resumed)) == reference[5]
  resumed.close()
  with pytest.raises(ValueError, match="different pipeline"):
    make(mixture_cfg(batch_size=4), tok).set_state(state)


def test_mixture_weights_and_shuffle(tok):
  cfg = mixture_cfg(data={"demo_caption": 3.0, "demo_vqa": 1.0, "demo_detect": 0.0,
                          "demo_segment": 0.0})
  it = make(cfg, tok, data_sharding=None)
  prompts = []
  for _ in range(5):
    b = next(it)
    for row in b["text"]:
      prompts.append(tok.decode(row.tolist()).split()[0])
  assert prompts.count("caption") == 30 and prompts.count("answer") == 10
  it.close()


def _epoch_ids(process_index, process_count, shuffle):
  cfg = dict(data=dict(name="demo", split="train", image_size=16, train_size=30),
             pp='keep("id")', batch_size=6, shuffle_buffer_size=shuffle, num_workers=0,
             skip_bad_examples=False, prefetch=0)
  it = pipeline.make_train_iterator(cfg, seed=1, process_index=process_index,
                                    process_count=process_count)
  ids = np.concatenate([next(it)["id"] for _ in range(30 // 6)])  # One epoch: 5 x 3.
  it.close()
  return ids.tolist()


@pytest.mark.parametrize("shuffle", [None, 1000])
def test_two_process_shards_are_disjoint_and_cover(shuffle):
  a, b = _epoch_ids(0, 2, shuffle), _epoch_ids(1, 2, shuffle)
  assert len(a) == len(b) == 15 and not set(a) & set(b) and sorted(a + b) == list(range(30))
  if shuffle is None:
    assert a == list(range(15)) and b == list(range(15, 30))
  else:
    assert a != sorted(a)  # Shuffled within the process's contiguous slice.
    assert sorted(a) == list(range(15))


def test_global_arrays_on_the_mesh(tok):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  host = make(input_cfg(batch_size=16, prefetch=0), tok, data_sharding=None)
  dev = make(input_cfg(batch_size=16, prefetch=2), tok, data_sharding=sharding)
  want, got = next(host), next(dev)
  for k in want:
    assert isinstance(got[k], jax.Array) and got[k].sharding == sharding
    assert got[k].shape == want[k].shape
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  host.close()
  dev.close()


@pytest.fixture()
def bad_jsonl(tmp_path):
  def jpeg(v):
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((20, 20, 3), v, np.uint8)).save(buf, "JPEG")
    return buf.getvalue()
  for i in range(4):
    (tmp_path / f"{i}.jpg").write_bytes(jpeg(40 * i))
  (tmp_path / "cut.jpg").write_bytes(jpeg(10)[:200])
  rows = [json.dumps({"image": f"{i}.jpg", "caption": f"image {i}"}) for i in range(4)]
  rows.insert(1, "{broken")
  rows.insert(3, json.dumps({"image": "gone.jpg", "caption": "x"}))
  rows.append(json.dumps({"image": "cut.jpg", "caption": "x"}))
  rows.append(json.dumps({"image": "0.jpg"}))
  rows.append(json.dumps({"image": "1.jpg", "caption": "a very long caption " * 10}))
  (tmp_path / "d.jsonl").write_text("\n".join(rows) + "\n")
  return str(tmp_path / "d.jsonl")


def jsonl_cfg(path, **kw):
  pp = ('decode|resize(16)|value_range(-1, 1)|strfmt("caption en", outkey="prefix")|'
        'copy("caption", "suffix")|' + combine_and_keep_train(24))
  cfg = dict(data=dict(name="jsonl", path=path), pp=pp, batch_size=2, shuffle_buffer_size=None,
             num_workers=0, skip_bad_examples=False, prefetch=1)
  cfg.update(kw)
  return cfg


def test_bad_examples_fail_with_location_by_default(tok, bad_jsonl):
  it = make(jsonl_cfg(bad_jsonl), tok)
  with pytest.raises(pipeline.InputError) as e:
    next(it)
  assert f"{bad_jsonl}:2" in str(e.value) and "malformed JSON" in str(e.value)
  assert "skip_bad_examples=True" in str(e.value)
  it.close()


def test_bad_examples_skipped_and_counted(tok, bad_jsonl):
  it = make(jsonl_cfg(bad_jsonl, skip_bad_examples=True), tok)
  captions = []
  for _ in range(5):  # Two epochs of 5 good examples (4 short + 1 truncated long one).
    b = next(it)
    for row, n in zip(b["text"], b["mask_input"].sum(1)):
      captions.append(tok.decode(row[:n].tolist()).split("\n")[1])
  stats = it.stats()
  assert stats["skipped"] == 8 and stats["truncated"] == 2  # 4 bad rows, 1 long, x2 epochs.
  assert captions[:4] == ["image 0", "image 1", "image 2", "image 3"]
  assert captions[4].startswith("a very long caption") and len(captions) == 10
  it.close()


def test_text_too_long_is_an_error_by_default(tok, tmp_path):
  (tmp_path / "x.jpg").write_bytes(b"")
  path = tmp_path / "t.jsonl"
  path.write_text(json.dumps({"image": "x.jpg", "caption": "long " * 40}) + "\n")
  cfg = jsonl_cfg(str(path))
  cfg["pp"] = cfg["pp"].replace("decode|resize(16)|value_range(-1, 1)|", "drop('image')|")
  cfg["pp"] = cfg["pp"].replace('keep("image", ', 'keep(')
  it = make(cfg, tok)
  with pytest.raises(pipeline.InputError, match=r"t.jsonl:1: .*more than the allowed 25"):
    next(it)
  it.close()


def test_too_many_bad_in_a_row_stops(tok, tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline, "_MAX_BAD_IN_A_ROW", 10)
  path = tmp_path / "all_bad.jsonl"
  path.write_text("{nope\n" * 3)
  it = make(jsonl_cfg(str(path), skip_bad_examples=True), tok)
  with pytest.raises(pipeline.InputError, match="10 bad examples in a row"):
    next(it)
  it.close()


def test_eval_examples_ordered_sharded_reiterable():
  data = dict(name="demo", split="val[:10]", image_size=32)
  pp = demo.demo_pp("detect", image_size=32, text_len=32, train=False)
  shards = [pipeline.eval_examples(data, pp, process_index=p, process_count=3) for p in range(3)]
  assert [len(s) for s in shards] == [3, 3, 4]
  ids = [ex["id"] for s in shards for ex in s]
  assert ids == list(range(10))
  first = list(shards[0])
  again = list(shards[0])
  assert [e["prefix"] for e in first] == [e["prefix"] for e in again]
  ex = first[0]
  src = demo.DemoSource("val", image_size=32)
  assert ex["prefix"] == "detect " + " ; ".join(src[0]["objects"]["label"])
  np.testing.assert_array_equal(ex["objects"]["bbox"], src[0]["objects"]["bbox"])
  assert ex["image"].dtype == np.float32 and ex["image"].shape == (32, 32, 3)


def test_resume_with_worker_processes(tok):  # ~15 s: two spawned grain workers per iterator.
  cfg = mixture_cfg(num_workers=2)
  it = make(cfg, tok)
  reference = [batch_bytes(next(it)) for _ in range(6)]
  it.close()
  it = make(cfg, tok)
  for _ in range(3):
    next(it)
  state = it.get_state()
  it.close()
  resumed = make(cfg, tok)
  resumed.set_state(state)
  assert [batch_bytes(next(resumed)) for _ in range(3)] == reference[3:]
  resumed.close()
  # Worker processes give the very same stream as in-process preprocessing.
  inproc = make(mixture_cfg(num_workers=0), tok)
  assert [batch_bytes(next(inproc)) for _ in range(6)] == reference
  inproc.close()
