"""Tests for big_vision_lite/model_init.py: pretrained params over a fresh init, for fine-tuning."""
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite import model_init
from big_vision_lite import run_state
from big_vision_lite import sharding
from big_vision_lite.models import paligemma

TINY = dict(img=dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2, image_size=16),
            llm=dict(vocab_size=300, width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2,
                     head_dim=12))
EMB, POS = "llm/embedder/input_embedding", "img/pos_embedding"


def variant(img=None, llm=None):
  return {"img": {**TINY["img"], **(img or {})}, "llm": {**TINY["llm"], **(llm or {})}}


def model_init_fn(config):
  """The real thing: the model's own init (compiles the model: used once)."""
  size = config["img"]["image_size"]
  model = paligemma.Model(**config)
  return lambda rng: model.init(rng, jnp.zeros((1, size, size, 3)), jnp.zeros((1, 4), jnp.int32),
                                jnp.zeros((1, 4), jnp.int32))["params"]


def cheap_init_fn(config):
  """Same tree, shapes and dtypes as the model's init, but cheap to compile."""
  flat = sorted(checkpoints.flatten(
      jax.eval_shape(model_init_fn(config), jax.random.key(0))).items())
  sizes = [math.prod(s.shape) for _, s in flat]

  def init(rng):  # one random draw, cut into the leaves (one RNG op compiles fast)
    values = jax.random.normal(rng, (sum(sizes),))
    starts = np.cumsum([0] + sizes)
    return checkpoints.unflatten({
        n: values[a:a + math.prod(s.shape)].reshape(s.shape).astype(s.dtype)
        for (n, s), a in zip(flat, starts)})
  return init


def random_params(config, seed=0, dtype=np.float32):
  shapes = checkpoints.flatten(jax.eval_shape(model_init_fn(config), jax.random.key(0)))
  rs = np.random.RandomState(seed)
  return checkpoints.unflatten({n: rs.normal(0, 0.5, s.shape).astype(dtype)
                                for n, s in shapes.items()})


def bits(x):
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}")


def flat_np(tree):
  return {k: np.asarray(v) for k, v in checkpoints.flatten(tree).items()}


@pytest.fixture(scope="module")
def ckpt_file(tmp_path_factory):
  """A tiny big_vision .npz and the params in it."""
  params = random_params(TINY)
  path = tmp_path_factory.mktemp("ckpt") / "tiny.npz"
  checkpoints.save(path, TINY, params)
  return path, flat_np(params)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("fsdp",))


def test_full_load_equals_the_file_in_its_shardings(ckpt_file, mesh):
  path, stored = ckpt_file
  init_fn = cheap_init_fn(TINY)
  shapes = jax.eval_shape(init_fn, jax.random.key(0))
  shardings = sharding.infer_shardings(shapes, sharding.FSDP_RULES, mesh)
  params, report = model_init.init_params(TINY, init_fn, model_init=path, load={},
                                          shardings=shardings, rng=jax.random.key(1))
  got, want_sh = checkpoints.flatten(params), checkpoints.flatten(shardings)
  assert sorted(got) == sorted(stored)
  for name, value in got.items():
    assert value.sharding == want_sh[name], name
    assert np.array_equal(bits(value), bits(stored[name])), name
  assert got["llm/layers/mlp/linear"].sharding.spec != jax.sharding.PartitionSpec()  # sharded
  assert report.source == str(path) and not report.fresh and not report.cast
  assert sorted(report.loaded) == sorted(stored)
  assert report.loaded_bytes == sum(a.nbytes for a in stored.values())
  count = sum(a.size for a in stored.values())
  assert f"loaded        {len(stored)} params  {count:,} values" in str(report)


def test_only_img_keeps_the_models_own_llm_init(ckpt_file):
  path, stored = ckpt_file
  init_fn, rng = model_init_fn(TINY), jax.random.key(3)
  params, report = model_init.init_params(TINY, init_fn, model_init=path,
                                          load={"only": "img"}, rng=rng)
  got = flat_np(params)
  for name, value in got.items():
    if name.startswith("img/"):
      assert np.array_equal(bits(value), bits(stored[name])), name
  # The LLM is the model's own init: compare a few leaves (a small compile, not a second init).
  some = [EMB, "llm/final_norm/scale", "llm/layers/attn/q_einsum/w"]
  fresh = jax.jit(lambda r: [checkpoints.flatten(init_fn(r))[n] for n in some])(rng)
  for name, want in zip(some, fresh):
    assert np.array_equal(bits(got[name]), bits(want)), name
  assert not np.array_equal(got["llm/final_norm/scale"], stored["llm/final_norm/scale"])
  llm = sorted(n for n in stored if n.startswith("llm/"))
  assert sorted(report.fresh) == llm and set(report.fresh.values()) == {"model_load.only='img'"}
  assert all(n.startswith("img/") for n in report.loaded)
  assert f"fresh          {len(llm)} params  (model_load.only='img'): llm/" in str(report)


def test_skip_regexes_and_nothing_to_load(ckpt_file):
  path, stored = ckpt_file
  init_fn, rng = cheap_init_fn(TINY), jax.random.key(4)
  fresh = flat_np(jax.jit(init_fn)(rng))
  params, report = model_init.init_params(
      TINY, init_fn, model_init=path, rng=rng,
      load={"skip": ["img/head/.*", "llm/final_norm/scale"]})
  skipped = {"img/head/kernel", "img/head/bias", "llm/final_norm/scale"}
  assert set(report.fresh) == skipped
  for name, value in flat_np(params).items():
    assert np.array_equal(bits(value), bits(fresh[name] if name in skipped else stored[name])), name
  # No model_init: everything from the init.
  params, report = model_init.init_params(TINY, init_fn, model_init=None, rng=rng)
  assert report.source is None and not report.loaded and len(report.fresh) == len(stored)
  for name, value in flat_np(params).items():
    assert np.array_equal(bits(value), bits(fresh[name])), name
  with pytest.raises(ValueError, match=r"'img/haed/\.\*' matches no param"):
    model_init.init_params(TINY, init_fn, model_init=path, rng=rng, load={"skip": ["img/haed/.*"]})
  with pytest.raises(ValueError, match="not a list of regexes"):
    model_init.init_params(TINY, init_fn, model_init=path, rng=rng, load={"skip": ["("]})


def test_posemb_resampled_from_2x2_to_3x3(ckpt_file):
  path, stored = ckpt_file
  config = variant(img={"image_size": 24})
  params, report = model_init.init_params(config, cheap_init_fn(config), model_init=path,
                                          rng=jax.random.key(0))
  got = np.asarray(params["img"]["pos_embedding"])
  old = stored[POS].reshape(2, 2, 32)
  new = got.reshape(3, 3, 32)
  # Bilinear with corners kept (big_vision's zoom, order=1): corners, edge midpoints, centre.
  np.testing.assert_allclose(new[0, 0], old[0, 0], atol=1e-6)
  np.testing.assert_allclose(new[2, 2], old[1, 1], atol=1e-6)
  np.testing.assert_allclose(new[0, 1], (old[0, 0] + old[0, 1]) / 2, atol=1e-6)
  np.testing.assert_allclose(new[1, 1], old.mean(axis=(0, 1)), atol=1e-6)
  assert np.array_equal(got, checkpoints.resample_posemb(stored[POS], 9))
  assert report.resampled == {POS: (2, 3)} and "2x2 -> 3x3 grid" in str(report)
  with pytest.raises(ValueError, match=r"2x2 grid \[1, 4, 32\].*image_size 24.*3x3 \[1, 9, 32\]"):
    model_init.init_params(config, cheap_init_fn(config), model_init=path, rng=jax.random.key(0),
                           load={"resample_posemb": False})


def test_vocabulary_extension_and_shrink_error(ckpt_file):
  path, stored = ckpt_file
  config = variant(llm={"vocab_size": 310})
  init_fn = cheap_init_fn(config)
  params, report = model_init.init_params(config, init_fn, model_init=path, rng=jax.random.key(0))
  emb = np.asarray(params["llm"]["embedder"]["input_embedding"])
  assert emb.shape == (310, 48) and np.array_equal(emb[:300], stored[EMB])
  new = emb[300:]
  assert 0.015 < new.std() < 0.025 and abs(new.mean()) < 0.005  # N(0, 0.02^2), 480 values
  again, _ = model_init.init_params(config, init_fn, model_init=path, rng=jax.random.key(0))
  assert np.array_equal(np.asarray(again["llm"]["embedder"]["input_embedding"]), emb)
  other, _ = model_init.init_params(config, init_fn, model_init=path, rng=jax.random.key(1))
  assert not np.allclose(np.asarray(other["llm"]["embedder"]["input_embedding"])[300:], new)
  assert report.extended == {EMB: (300, 310)} and "300 -> 310 rows" in str(report)
  small = variant(llm={"vocab_size": 290})
  with pytest.raises(ValueError, match="has 300 rows.*llm.vocab_size 290"):
    model_init.init_params(small, cheap_init_fn(small), model_init=path, rng=jax.random.key(0))


def test_mismatches_are_errors_naming_the_param(ckpt_file, tmp_path):
  path, _ = ckpt_file
  rng = jax.random.key(0)
  config = variant(llm={"mlp_dim": 64})
  with pytest.raises(ValueError, match=r"parameter llm/layers/mlp/(gating_einsum|linear): the "
                     r"checkpoint has shape \[2, .*96.*\], the model expects \[2, .*64.*\]"):
    model_init.init_params(config, cheap_init_fn(config), model_init=path, rng=rng)
  # ... unless those params are skipped.
  params, report = model_init.init_params(config, cheap_init_fn(config), model_init=path, rng=rng,
                                          load={"skip": ["llm/layers/mlp/.*"]})
  assert sorted(report.fresh) == ["llm/layers/mlp/gating_einsum", "llm/layers/mlp/linear"]
  # A checkpoint with Gemma 2 post-norms into a model without them, and the other way round.
  g2 = variant(llm={"post_norms": True})
  checkpoints.save(tmp_path / "g2.npz", g2, random_params(g2))
  with pytest.raises(ValueError, match="post_attention_norm/scale', .* in the checkpoint but not"):
    model_init.init_params(TINY, cheap_init_fn(TINY), model_init=tmp_path / "g2.npz", rng=rng)
  with pytest.raises(ValueError, match="post_attention_norm/scale .* missing from the checkpoint"):
    model_init.init_params(g2, cheap_init_fn(g2), model_init=path, rng=rng)
  for load, msg in (({"onyl": "img"}, r"unknown key\(s\) \['onyl'\]"),
                    ({"only": "vit"}, "only='vit'"), ({"skip": "img/.*"}, "list of regexes"),
                    ({"resample_posemb": "yes"}, "expected a bool")):
    with pytest.raises(ValueError, match=msg):
      model_init.init_params(TINY, cheap_init_fn(TINY), model_init=path, rng=rng, load=load)


def test_bf16_file_is_cast_and_per_layer_model_gets_slices(tmp_path):
  bf16 = random_params(TINY, seed=5, dtype=ml_dtypes.bfloat16)
  checkpoints.save(tmp_path / "b.npz", TINY, bf16)
  stored = flat_np(bf16)
  config = variant(img={"scan": False})
  params, report = model_init.init_params(config, cheap_init_fn(config),
                                          model_init=tmp_path / "b.npz", rng=jax.random.key(0),
                                          load={"skip": [r"img/Transformer/encoderblock_1/.*"]})
  got = flat_np(params)
  block = "img/Transformer/encoderblock"
  q = f"{block}_0/MultiHeadDotProductAttention_0/query/kernel"
  assert got[q].dtype == np.float32
  assert np.array_equal(got[q], stored[q.replace("_0/", "/", 1)][0].astype(np.float32))
  assert np.array_equal(got[EMB], stored[EMB].astype(np.float32))
  assert all(n.startswith(f"{block}_1/") for n in report.fresh) and len(report.fresh) == 16
  assert set(report.cast.values()) == {("bfloat16", "float32")}
  assert len(report.cast) == len(got) - 16
  assert f"cast          {len(got) - 16} params  bfloat16 -> float32" in str(report)


def test_vanity_names(tmp_path, monkeypatch, ckpt_file):
  path, stored = ckpt_file
  assert model_init.vanity_candidates("pt_224")[:3] == [
      "pt_224.npz", "paligemma-3b-pt-224.npz", "paligemma-3b-pt-224.b16.npz"]
  assert model_init.vanity_candidates("pt_3b_448") == [
      "pt_3b_448.npz", "paligemma2-3b-pt-448.npz", "paligemma2-3b-pt-448.b16.npz",
      "paligemma2-3b-pt-448.bf16.npz", "paligemma2-3b-pt-448.f16.npz", "paligemma2-3b-pt-448"]
  assert model_init.vanity_candidates("pt_10b_896.bf16") == [
      "pt_10b_896.bf16.npz", "paligemma2-10b-pt-896.bf16.npz", "paligemma2-10b-pt-896.b16.npz"]
  assert model_init.vanity_candidates("pt_9b_224") is None
  monkeypatch.delenv("BVL_CHECKPOINT_DIR", raising=False)
  with pytest.raises(FileNotFoundError, match="set BVL_CHECKPOINT_DIR"):
    model_init.resolve_checkpoint("pt_224")
  with pytest.raises(FileNotFoundError, match="not a vanity name"):
    model_init.resolve_checkpoint(str(tmp_path / "nope.npz"))
  monkeypatch.setenv("BVL_CHECKPOINT_DIR", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"none of these exist: .*paligemma2-28b-pt-896\.b16"):
    model_init.resolve_checkpoint("pt_28b_896")
  (tmp_path / "paligemma-3b-pt-224.npz").write_bytes(path.read_bytes())
  (tmp_path / "paligemma2-3b-pt-448.b16.npz").write_bytes(b"")
  assert model_init.resolve_checkpoint("pt_224") == str(tmp_path / "paligemma-3b-pt-224.npz")
  assert model_init.resolve_checkpoint("pt_3b_448") == str(
      tmp_path / "paligemma2-3b-pt-448.b16.npz")
  params, report = model_init.init_params(TINY, cheap_init_fn(TINY), model_init="pt_224",
                                          rng=jax.random.key(0))
  assert report.source == str(tmp_path / "paligemma-3b-pt-224.npz")
  for name, value in flat_np(params).items():
    assert np.array_equal(bits(value), bits(stored[name])), name


def test_init_from_a_training_workdir(tmp_path, ckpt_file):
  _, stored = ckpt_file
  params = checkpoints.unflatten(stored)
  run_state.write_config(tmp_path, {"model": TINY})
  with run_state.RunState(tmp_path) as mgr:
    mgr.save(12, {"params": params})
  config = variant(img={"image_size": 24})
  got, report = model_init.init_params(config, cheap_init_fn(config), model_init=tmp_path,
                                       rng=jax.random.key(0))
  assert report.source == str(tmp_path) and report.resampled == {POS: (2, 3)}
  for name, value in flat_np(got).items():
    want = checkpoints.resample_posemb(stored[name], 9) if name == POS else stored[name]
    assert np.array_equal(bits(value), bits(want)), name
  assert math.prod(np.asarray(got["img"]["pos_embedding"]).shape) == 9 * 32
