"""pp DSL and general/image ops (big_vision_lite/data/pp_parse.py, pp_ops.py): hand-computed values."""
import io

import numpy as np
import PIL.Image
import pytest

from big_vision_lite.data import pp_ops
from big_vision_lite.data.pp_parse import (ExampleError, PPContext, PPError, Preprocess, Runtime,
                                           get_key, parse, set_key, split_ops)


def run(pp, data, seed=0, index=0, epoch=0, ctx=None):
  return Preprocess(pp, ctx)(data, Runtime(seed=seed, index=index, epoch=epoch))


def encode(arr, fmt, **kw):
  buf = io.BytesIO()
  PIL.Image.fromarray(arr).save(buf, fmt, **kw)
  return buf.getvalue()


# --- the DSL -------------------------------------------------------------------------------------
def test_split_respects_quotes_and_brackets():
  pp = 'strfmt("a|b {x}", outkey="p")|keep("p", "q")||choice(key=["a|b", "c"])|'
  assert [t for t, _ in split_ops(pp)] == [
      'strfmt("a|b {x}", outkey="p")', 'keep("p", "q")', "", 'choice(key=["a|b", "c"])', ""]
  specs = parse(pp)
  assert [s.name for s in specs] == ["strfmt", "keep", "choice"]
  assert specs[0].args == ("a|b {x}",) and specs[0].kwargs == {"outkey": "p"}
  assert specs[2].kwargs == {"key": ["a|b", "c"]}
  assert run('strfmt("a|b {x}", outkey="p")', {"x": "hi"})["p"] == "a|b hi"


def test_unknown_op_points_at_it():
  pp = "decode|resise(224)|value_range(-1, 1)"
  with pytest.raises(PPError) as e:
    Preprocess(pp)
  msg = str(e.value)
  assert "unknown pp op 'resise'" in msg and "did you mean resize" in msg
  line, caret = [l for l in msg.splitlines() if l.strip()][1:3]
  assert line.strip() == pp
  assert caret.index("^") == line.index("resise") and caret.count("^") == len("resise(224)")


@pytest.mark.parametrize("pp, needle", [
    ("resize(224, foo=1)", "unexpected keyword argument 'foo'"),
    ("resize()", "missing a required argument: 'size'"),
    ("resize(x)", "must be Python literals"),
    ("resize(-3)", "size must be a positive int"),
    ("resize(224, method='cubic')", "method must be one of"),
    ("value_range(-1, 1, in_min=5, in_max=5)", "in_max must differ"),
    ("choice(n='two', key='a')", "n must be 'single'"),
    ("tolen(4, key='text')", "needs pad_value= or pad_key="),
    ("decode(ctx=1)", "ctx is supplied by the pipeline"),
    ("resize(224", "syntax error"),
    ("a.b(1)", "must be a name or a call"),
])
def test_bad_arguments_are_pp_errors(pp, needle):
  with pytest.raises(PPError) as e:
    Preprocess(f"decode|{pp}")
  assert needle in str(e.value)
  assert f"decode|{pp}" in str(e.value)  # The whole pp string is shown.


def test_runtime_errors_name_the_op_and_keys():
  with pytest.raises(ExampleError) as e:
    run('value_range(-1, 1)|strfmt("answer en {question}", outkey="prefix")',
        {"image": np.zeros((2, 2, 3), np.uint8), "objects": {"bbox": 1}})
  assert "strfmt(\"answer en {question}\"" in str(e.value)
  assert "missing field 'question'" in str(e.value) and "objects/{bbox}" in str(e.value)


def test_nested_keys_read_and_copy_on_write():
  shared = {"bbox": [1, 2], "label": "a"}
  data = {"objects": shared}
  assert get_key(data, "objects/bbox") == [1, 2]
  set_key(data, "objects/label", "b")
  assert data["objects"]["label"] == "b" and shared["label"] == "a"  # Source not mutated.
  set_key(data, "new/key", 3)  # No nested parent: a flat key.
  assert data["new/key"] == 3


# --- general ops ----------------------------------------------------------------------------------
def test_value_range():
  img = np.array([[[0, 255, 51]]], np.uint8)
  out = run("value_range(-1, 1)", {"image": img})["image"]
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [[[-1.0, 1.0, -0.6]]], atol=1e-6)
  out = run("value_range(0, 1, in_min=[0, 0, 50], in_max=[255, 255, 52], clip_values=True)",
            {"image": img})["image"]
  np.testing.assert_allclose(out, [[[0.0, 1.0, 0.5]]], atol=1e-6)
  out = run("value_range(0, 10, 0, 100, key='x')", {"x": np.array([50.0, 200.0])})["x"]
  np.testing.assert_allclose(out, [5.0, 20.0])


def test_keep_drop_copy_flatten_setdefault():
  data = {"a": {"b": 1, "c": {"d": [2, 3]}}, "e": 3, "f": np.zeros(0)}
  assert run("flatten", data) == {"a/b": 1, "a/c/d": [2, 3], "e": 3, "f": data["f"]}
  assert set(run('keep("e", "a/b")', data)) == {"e", "a"}
  assert set(run('drop("e")', data)) == {"a", "f"}
  out = run('copy("a", "z")', data)
  assert out["z"] == data["a"] and out["z"] is not data["a"]
  assert out["z"]["c"]["d"] is not data["a"]["c"]["d"]  # Lists copied, structure independent.
  out = run('setdefault("f", 7)|setdefault("g", "x")|setdefault("e", 9)', data)
  np.testing.assert_array_equal(out["f"], 7)
  assert out["g"] == "x" and out["e"] == 3


def test_choice_single_keeps_keys_aligned_and_is_deterministic():
  data = {"q": [f"q{i}" for i in range(6)], "a": np.arange(6) * 10}
  pp = 'choice(inkey=["q", "a"], outkey=["qq", "aa"])'
  picks = set()
  for index in range(30):
    out = run(pp, data, index=index)
    assert out["aa"] == int(out["qq"][1:]) * 10
    assert out == run(pp, data, index=index)  # Same (seed, index, epoch): same pick.
    picks.add(out["qq"])
  assert len(picks) == 6


def test_choice_n_and_ranges():
  data = {"x": np.arange(10)}
  out = run("choice(n=4, key='x')", data, index=3)["x"]
  assert len(out) == 4 and np.all(np.diff(out) > 0) and set(out) <= set(range(10))
  for index in range(10):
    out = run("choice(n=[2, 3], key='x')", data, index=index)["x"]
    assert len(out) in (2, 3)
  assert len(run("choice(n=20, key='x', fewer_ok=True)", data)["x"]) == 10
  with pytest.raises(ExampleError, match="fewer than 20"):
    run("choice(n=20, key='x')", data)
  with pytest.raises(ExampleError, match="'x' has 0 entries"):
    run("choice(key='x')", {"x": []})
  with pytest.raises(ExampleError, match="different lengths"):
    run("choice(key=['x', 'y'])", {"x": [1, 2], "y": [1]})


def test_choice_no_replacement_cycles_through_entries():
  data = {"c": ["a", "b", "c", "d"]}
  pp = 'choice_no_replacement(inkey="c", outkey="s")'
  for index in (0, 7):
    first = [run(pp, data, index=index, epoch=e)["s"] for e in range(4)]
    second = [run(pp, data, index=index, epoch=e)["s"] for e in range(4, 8)]
    assert sorted(first) == sorted(second) == ["a", "b", "c", "d"]
    assert first == [run(pp, data, index=index, epoch=e)["s"] for e in range(4)]


# --- image ops ------------------------------------------------------------------------------------
def test_decode_png_exact_and_jpeg_close():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
  np.testing.assert_array_equal(run("decode", {"image": encode(img, "PNG")})["image"], img)
  smooth = np.repeat(np.repeat(img[:3, :4], 8, 0), 8, 1)
  out = run("decode", {"image": encode(smooth, "JPEG", quality=95)})["image"]
  assert out.shape == smooth.shape and np.abs(out.astype(int) - smooth).mean() < 6
  gray = run("decode", {"image": encode(img[..., 0], "PNG")})["image"]
  assert gray.shape == (12, 17, 3) and np.array_equal(gray[..., 1], img[..., 0])
  assert run("decode", {"image": img})["image"] is img  # Decoded arrays pass through.
  assert run("decode(channels=1)", {"image": encode(img[..., 0], "PNG")})["image"].shape == (
      12, 17, 1)


@pytest.mark.parametrize("payload, needle", [
    (b"", "empty image file"), (b"not an image at all", "corrupt or truncated"),
    ("jpeg_cut", "corrupt or truncated"), ("str", "expected encoded image bytes")])
def test_decode_bad_images(payload, needle):
  if payload == "jpeg_cut":
    full = encode(np.full((64, 64, 3), 128, np.uint8), "JPEG")
    payload = full[:len(full) // 2]
  elif payload == "str":
    payload = "path/to/file.jpg"
  with pytest.raises(ExampleError, match=needle):
    run("decode", {"image": payload})


def test_decode_draft_downscales_jpeg_but_not_below_target():
  img = np.zeros((256, 320, 3), np.uint8)
  img[:, 160:] = 200
  jpeg = encode(img, "JPEG", quality=95)
  assert run("decode(draft=[32, 32])", {"image": jpeg})["image"].shape == (32, 40, 3)
  assert run("decode(draft=[100, 100])", {"image": jpeg})["image"].shape == (128, 160, 3)
  # decode|resize gets the draft automatically; the output is still exactly the target size.
  pp = Preprocess("decode|resize(48)")
  assert pp.specs[0].kwargs["draft"] == 48
  out = pp({"image": jpeg})["image"]
  assert out.shape == (48, 48, 3) and abs(int(out[20, 5, 0])) < 8 and out[20, 44, 0] > 190
  assert "draft" not in Preprocess("decode|value_range|resize(48)").specs[0].kwargs


def test_resize_bilinear_matches_half_pixel_formula():
  img = np.array([[0.0, 100.0], [200.0, 40.0]], np.float32)[..., None]
  out = pp_ops.resize_array(img, (4, 4), "bilinear")[..., 0]
  # Output centre (i + 0.5) / 2 - 0.5 -> input coordinates -0.25, 0.25, 0.75, 1.25 (clamped).
  wy = np.array([0.0, 0.25, 0.75, 1.0])
  a, b, c, d = 0.0, 100.0, 200.0, 40.0
  want = ((1 - wy)[:, None] * ((1 - wy) * a + wy * b)[None] +
          wy[:, None] * ((1 - wy) * c + wy * d)[None])
  np.testing.assert_allclose(out, want, atol=1e-4)
  # 4 -> 2 without antialias samples between pixel pairs: the mean of each 2x2 block.
  big = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
  np.testing.assert_allclose(pp_ops.resize_array(big, (2, 2))[..., 0], [[2.5, 4.5], [10.5, 12.5]],
                             atol=1e-4)
  u8 = run("resize([2, 2])", {"image": (big * 10).astype(np.uint8).repeat(3, -1)})["image"]
  assert u8.dtype == np.uint8
  np.testing.assert_allclose(u8[..., 1], [[25, 45], [105, 125]], atol=1)


def test_resize_small_long_area():
  img = np.arange(32, dtype=np.float32).reshape(4, 8, 1)
  small = run("resize_small(2)", {"image": img})["image"]
  # "area": each output pixel is the mean of a 2x2 block.
  np.testing.assert_allclose(small[..., 0], img[..., 0].reshape(2, 2, 4, 2).mean((1, 3)),
                             atol=1e-4)
  assert run("resize_long(4)", {"image": img})["image"].shape == (2, 4, 1)
  assert run("resize_small(6)", {"image": np.zeros((10, 30, 3), np.uint8)})["image"].shape == (
      6, 18, 3)


def test_crops_and_flip():
  img = np.arange(4 * 6).reshape(4, 6, 1)
  np.testing.assert_array_equal(run("central_crop(2)", {"image": img})["image"], img[1:3, 2:4])
  np.testing.assert_array_equal(run("central_crop", {"image": img})["image"], img[:, 1:5])
  with pytest.raises(ExampleError, match="larger than"):
    run("central_crop(5)", {"image": img})
  offsets = set()
  for index in range(40):
    out = run("random_crop([2, 3])", {"image": img}, index=index)["image"]
    y, x = divmod(int(out[0, 0, 0]), 6)
    np.testing.assert_array_equal(out, img[y:y + 2, x:x + 3])
    np.testing.assert_array_equal(out, run("random_crop([2, 3])", {"image": img},
                                           index=index)["image"])
    offsets.add((y, x))
  assert offsets == {(y, x) for y in range(3) for x in range(4)}
  flips = [run("flip_lr", {"image": img}, index=i)["image"][0, 0, 0] == 5 for i in range(200)]
  assert 60 < sum(flips) < 140


def test_inception_crop():
  rng = np.random.default_rng(1)
  for _ in range(50):
    y, x, h, w = pp_ops.sample_inception_box(rng, 100, 80, (0.2, 0.6))
    assert 0.2 * 8000 * 0.97 <= h * w <= 0.6 * 8000 * 1.03
    assert 0.7 <= w / h <= 1.4 and y + h <= 100 and x + w <= 80
  # Impossible area range -> the whole image, as TF's fallback.
  assert pp_ops.sample_inception_box(rng, 10, 100, (0.95, 1.0)) == (0, 0, 10, 100)
  img = np.random.default_rng(2).integers(0, 255, (60, 50, 3), dtype=np.uint8)
  out = run("inception_crop(24, area_min=50)", {"image": img}, index=5)["image"]
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(
      out, run("inception_crop(24, area_min=50)", {"image": img}, index=5)["image"])


def test_ctx_and_runtime_are_per_example():
  ctx = PPContext(truncate=True)
  pp = Preprocess("keep('a')", ctx)
  assert pp.ctx is ctx and pp({"a": 1, "b": 2}) == {"a": 1}
  a, b = Runtime(seed=1, index=2, epoch=3), Runtime(seed=1, index=2, epoch=4)
  assert a.rng.integers(1 << 30) != b.rng.integers(1 << 30)
