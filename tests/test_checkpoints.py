"""Tests for big_vision_lite/checkpoints.py (+ checkpoints_config.py): big_vision .npz files.

The Hugging Face side is tested in tests/test_checkpoints_hf.py. Every value check is
against the arrays np.load reads from the fixture files themselves (bit for bit).
"""
import json
import logging
import shutil
import zipfile

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_dtypes
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite import checkpoints_config

PG2_CAPS = {"query_pre_attn_norm": "rsqrt_emb_per_head", "attn_logits_softcap": 2.5,
            "final_logits_softcap": 5.0}


def raw_npz(path) -> dict[str, np.ndarray]:
  """The file's arrays as stored, keys without "params/" (bf16 stays raw '|V2')."""
  with np.load(path, allow_pickle=False) as z:
    return {k.removeprefix("params/"): z[k] for k in z.files}


def assert_bits_equal(got: np.ndarray, stored: np.ndarray, name: str):
  assert got.shape == stored.shape, name
  assert got.dtype.itemsize == stored.dtype.itemsize, name
  assert np.array_equal(np.ascontiguousarray(got).view(f"u{got.dtype.itemsize}"),
                        np.ascontiguousarray(stored).view(f"u{got.dtype.itemsize}")), name


@pytest.fixture(scope="module")
def pg1(fixtures_dir):
  return fixtures_dir / "bv_paligemma1_tiny"


@pytest.mark.parametrize("fname,dtype", [("params.npz", "float32"), ("params_bf16.npz", "bfloat16"),
                                         ("params_f16.npz", "float16")])
def test_load_pg1_npz_config_and_bits(pg1, fname, dtype):
  config, params = checkpoints.load(pg1 / fname)
  ref = json.loads((pg1 / "config.json").read_text())
  llm, img = config["llm"], config["img"]
  want_llm = {k: ref["llm_resolved_config"][k] for k in
              ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")}
  assert {k: llm[k] for k in want_llm} == want_llm == dict(
      vocab_size=1408, width=48, depth=3, mlp_dim=96, num_heads=2, num_kv_heads=1, head_dim=24)
  assert img["patch_size"] == [14, 14] and img["image_size"] == 42
  assert (img["width"], img["depth"], img["mlp_dim"], img["num_heads"]) == (32, 3, 64, 2)
  assert llm["post_norms"] is False and llm["final_logits_softcap"] is None
  assert llm["attn_logits_softcap"] is None and llm["sliding_window"] is None
  assert llm["query_pre_attn_norm"] == "rsqrt_head_dim" and llm["variant"] is None
  assert img["param_dtype"] == llm["param_dtype"] == dtype
  stored = raw_npz(pg1 / fname)
  flat = checkpoints.flatten(params)
  assert set(flat) == set(stored) and len(flat) == 32
  for name, got in flat.items():
    assert got.dtype == np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype), name
    assert_bits_equal(got, stored[name], name)
  # bf16 decoded to float32 is the rounded weights (rounding change <= 0.0156, README).
  if dtype != "float32":
    f32 = raw_npz(pg1 / "params.npz")["llm/layers/mlp/linear"]
    assert np.abs(flat["llm/layers/mlp/linear"].astype(np.float32) - f32).max() <= 0.0157


def test_noscan_file_gives_same_stacked_params(pg1):
  _, scanned = checkpoints.load(pg1 / "params.npz")
  _, from_noscan = checkpoints.load(pg1 / "params_vit_noscan.npz")
  a, b = checkpoints.flatten(scanned), checkpoints.flatten(from_noscan)
  assert a.keys() == b.keys()
  for k in a:
    assert_bits_equal(a[k], b[k], k)
  stored = raw_npz(pg1 / "params_vit_noscan.npz")
  q = "img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"
  assert stored[q].shape == (32, 2, 16)
  np.testing.assert_array_equal(
      a["img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"][1], stored[q])


def test_scan_false_returns_per_layer_layout(pg1):
  config, params = checkpoints.load(pg1 / "params_vit_noscan.npz", img={"scan": False},
                                    llm={"scan": False})
  flat = checkpoints.flatten(params)
  stored = raw_npz(pg1 / "params.npz")
  assert config["img"]["scan"] is False and config["llm"]["scan"] is False
  np.testing.assert_array_equal(flat["llm/layers/2/attn/kv_einsum/w"], stored["llm/layers/attn/kv_einsum/w"][2])
  np.testing.assert_array_equal(flat["img/Transformer/encoderblock_0/LayerNorm_1/bias"],
                                stored["img/Transformer/encoderblock/LayerNorm_1/bias"][0])
  assert "llm/layers/attn/kv_einsum/w" not in flat and len(flat) == 16 * 3 + 7 * 3 + 7 + 2
  assert checkpoints.flatten(checkpoints.stack_layers(params)).keys() == stored.keys()


def test_load_pg2_npz_and_overrides(fixtures_dir):
  path = fixtures_dir / "bv_paligemma2_tiny" / "params.npz"
  config, params = checkpoints.load(path)
  llm = config["llm"]
  assert (llm["width"], llm["depth"], llm["mlp_dim"], llm["num_heads"], llm["num_kv_heads"],
          llm["head_dim"], llm["vocab_size"]) == (48, 2, 112, 2, 1, 16, 1408)
  assert llm["post_norms"] is True and config["img"]["image_size"] == 28
  # No tiny variant matches: what shapes cannot tell stays at the defaults ...
  assert (llm["final_logits_softcap"], llm["attn_logits_softcap"], llm["query_pre_attn_norm"]) == (
      None, None, "rsqrt_head_dim")
  stored = raw_npz(path)
  for name, got in checkpoints.flatten(params).items():
    assert_bits_equal(got, stored[name], name)
  # ... and overrides merge over the inferred numbers, leaving the rest alone.
  config2, _ = checkpoints.load(path, llm=PG2_CAPS, img={"dropout": 0.1})
  assert {k: config2["llm"][k] for k in PG2_CAPS} == PG2_CAPS
  assert config2["img"]["dropout"] == 0.1 and config2["img"]["width"] == 32
  assert {k: v for k, v in config2["llm"].items() if k not in PG2_CAPS} == {
      k: v for k, v in llm.items() if k not in PG2_CAPS}


def test_bad_overrides_are_errors(pg1):
  with pytest.raises(ValueError, match=r"unknown override\(s\) \['vit'\]"):
    checkpoints.load(pg1 / "params.npz", vit={"width": 3})
  with pytest.raises(ValueError, match="unknown key"):
    checkpoints.load(pg1 / "params.npz", llm={"softcap": 3.0})
  with pytest.raises(ValueError, match=r"llm/embedder/input_embedding: the checkpoint has shape "
                     r"\[1408, 48\], the model config expects \[1000, 48\]"):
    checkpoints.load(pg1 / "params.npz", llm={"vocab_size": 1000})
  with pytest.raises(ValueError, match=r"post_attention_norm/scale \(shape \[3, 48\]\) is missing"):
    checkpoints.load(pg1 / "params.npz", llm={"post_norms": True})


def test_param_dtype_casts(pg1):
  config, params = checkpoints.load(pg1 / "params_bf16.npz", param_dtype="float32")
  assert config["llm"]["param_dtype"] == config["img"]["param_dtype"] == "float32"
  stored = raw_npz(pg1 / "params_bf16.npz")["img/head/kernel"].view(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(params["img"]["head"]["kernel"], stored.astype(np.float32))
  assert params["img"]["head"]["kernel"].dtype == np.float32
  config, params = checkpoints.load(pg1 / "params.npz", llm={"param_dtype": "bfloat16"})
  assert params["llm"]["final_norm"]["scale"].dtype == ml_dtypes.bfloat16
  assert params["img"]["head"]["kernel"].dtype == np.float32
  with pytest.raises(ValueError, match="param_dtype"):
    checkpoints.load(pg1 / "params.npz", param_dtype="float32", llm={"param_dtype": "float16"})


def test_image_size_override_resamples_posemb(pg1, caplog):
  with caplog.at_level(logging.INFO, logger="big_vision_lite.checkpoints"):
    config, params = checkpoints.load(pg1 / "params.npz", img={"image_size": 70})
  assert "resampling img/pos_embedding from 9 to 25 positions" in caplog.text
  assert config["img"]["image_size"] == 70
  old = raw_npz(pg1 / "params.npz")["img/pos_embedding"]
  new = params["img"]["pos_embedding"]
  assert new.shape == (1, 25, 32)
  np.testing.assert_array_equal(new, checkpoints.resample_posemb(old, 25))


def test_resample_posemb_is_bilinear_with_corners_kept():
  rng = np.random.default_rng(0)
  old = rng.normal(size=(1, 4, 3)).astype(np.float32)  # 2x2 grid
  new = checkpoints.resample_posemb(old, 16).reshape(4, 4, 3)
  g = old.reshape(2, 2, 3)
  t = np.array([0, 1 / 3, 2 / 3, 1])  # scipy zoom order=1 maps corners onto corners
  want = ((1 - t)[:, None, None] * ((1 - t)[None, :, None] * g[0, 0] + t[None, :, None] * g[0, 1])
          + t[:, None, None] * ((1 - t)[None, :, None] * g[1, 0] + t[None, :, None] * g[1, 1]))
  np.testing.assert_allclose(new, want, atol=1e-6)
  bf = checkpoints.resample_posemb(old.astype(ml_dtypes.bfloat16), 9)
  assert bf.dtype == ml_dtypes.bfloat16 and bf.shape == (1, 9, 3)
  with pytest.raises(ValueError, match="square"):
    checkpoints.resample_posemb(old, 8)


@pytest.mark.parametrize("fname", ["params.npz", "params_bf16.npz", "params_f16.npz",
                                   "params_vit_noscan.npz"])
def test_npz_round_trip_is_bit_exact(pg1, tmp_path, fname):
  config, params = checkpoints.load(pg1 / fname)
  checkpoints.save(tmp_path / "out.npz", config, params)
  written, stored = raw_npz(tmp_path / "out.npz"), raw_npz(pg1 / "params.npz")
  assert written.keys() == stored.keys()
  original = raw_npz(pg1 / fname)
  with zipfile.ZipFile(tmp_path / "out.npz") as z:
    assert all(n.startswith("params/") for n in z.namelist())
  for name, got in written.items():
    if fname == "params_bf16.npz":
      assert got.dtype == np.dtype("V2"), name  # big_vision's encoding of bfloat16
    want = np.stack([original[f"img/Transformer/encoderblock_{i}/{name.split('/', 3)[3]}"]
                     for i in range(3)]) if name not in original else original[name]
    assert_bits_equal(got, want, name)
  # Per-layer params save to the same (scanned) file.
  checkpoints.save(tmp_path / "noscan.npz", config, checkpoints.unstack_layers(params))
  again = raw_npz(tmp_path / "noscan.npz")
  assert all(np.array_equal(again[k].view("u1"), written[k].view("u1")) for k in written)


def test_save_checks_params_against_config(pg1, tmp_path):
  config, params = checkpoints.load(pg1 / "params.npz")
  flat = checkpoints.flatten(params)
  flat["img/head/bias"] = np.zeros(7, np.float32)
  with pytest.raises(ValueError, match=r"img/head/bias has shape \[7\], the model config expects \[48\]"):
    checkpoints.save(tmp_path / "x.npz", config, checkpoints.unflatten(flat))
  del flat["img/head/bias"]
  with pytest.raises(ValueError, match="params lack img/head/bias"):
    checkpoints.save(tmp_path / "x.npz", config, checkpoints.unflatten(flat))
  with pytest.raises(ValueError, match="format="):
    checkpoints.save(tmp_path / "x", config, params, format="pickle")
  assert not (tmp_path / "x.npz").exists()


def test_truncated_and_foreign_files_are_clear_errors(pg1, tmp_path):
  data = (pg1 / "params.npz").read_bytes()
  (tmp_path / "trunc.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="trunc.npz: not a readable .npz checkpoint"):
    checkpoints.load(tmp_path / "trunc.npz")
  (tmp_path / "random.bin").write_bytes(np.random.default_rng(1).bytes(4096))
  with pytest.raises(ValueError, match="random.bin: not a checkpoint"):
    checkpoints.load(tmp_path / "random.bin")
  (tmp_path / "folder").mkdir()
  with pytest.raises(ValueError, match="folder: a directory without config.json"):
    checkpoints.load(tmp_path / "folder")
  with pytest.raises(FileNotFoundError, match="nothere"):
    checkpoints.load(tmp_path / "nothere.npz")
  np.savez(tmp_path / "other.npz", weights=np.zeros(3))
  with pytest.raises(ValueError, match="other.npz: not a PaliGemma checkpoint: no parameter img/"):
    checkpoints.load(tmp_path / "other.npz")
  np.save(tmp_path / "single.npy", np.zeros(3))
  shutil.move(tmp_path / "single.npy", tmp_path / "single.npz")
  with pytest.raises(ValueError, match="single.npz: holds a single array, not a checkpoint"):
    checkpoints.load(tmp_path / "single.npz")


def test_key_mismatches_name_the_parameter(pg1, tmp_path):
  stored = raw_npz(pg1 / "params.npz")
  extra = dict(stored, **{"llm/extra/w": np.zeros(2, np.float32)})
  np.savez(tmp_path / "extra.npz", **extra)
  with pytest.raises(ValueError, match=r"parameter llm/extra/w \[2\] in the checkpoint is not part"):
    checkpoints.load(tmp_path / "extra.npz")
  missing = {k: v for k, v in stored.items() if k != "llm/final_norm/scale"}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=r"llm/final_norm/scale \(shape \[48\]\) is missing"):
    checkpoints.load(tmp_path / "missing.npz")
  noscan = raw_npz(pg1 / "params_vit_noscan.npz")
  del noscan["img/Transformer/encoderblock_1/LayerNorm_0/bias"]
  np.savez(tmp_path / "hole.npz", **noscan)
  with pytest.raises(ValueError, match=r"LayerNorm_0/bias is stored for layers \[0, 2\]"):
    checkpoints.load(tmp_path / "hole.npz")


def test_shardings_place_each_array(pg1):
  mesh = jax.make_mesh((8,), ("data",))
  rows = NamedSharding(mesh, P("data"))  # 1408 vocab rows / 8 devices
  replicated = NamedSharding(mesh, P())

  def by_name(name):
    return rows if name == "llm/embedder/input_embedding" else replicated

  _, host = checkpoints.load(pg1 / "params_bf16.npz")
  _, placed = checkpoints.load(pg1 / "params_bf16.npz", shardings=by_name)
  tree = jax.tree.map(lambda _: replicated, host)
  tree["llm"]["embedder"]["input_embedding"] = rows
  _, placed2 = checkpoints.load(pg1 / "params_bf16.npz", shardings=tree)
  for p in (placed, placed2):
    emb = p["llm"]["embedder"]["input_embedding"]
    assert isinstance(emb, jax.Array) and emb.sharding == rows and emb.dtype == ml_dtypes.bfloat16
    assert {s.data.shape for s in emb.addressable_shards} == {(176, 48)}
    for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(p)):
      assert_bits_equal(np.asarray(b), a, "leaf")
  with pytest.raises(ValueError, match="shardings has no entry for parameter img/Transformer/encoder_norm/bias"):
    checkpoints.load(pg1 / "params.npz", shardings={"img": {"head": {"bias": replicated}}})


def test_flatten_unflatten_stack_unstack():
  tree = {"img": {"Transformer": {"encoderblock": {"w": np.arange(6).reshape(3, 2)}}},
          "llm": {"layers": {"x": {"w": np.ones((2, 4))}}, "final_norm": {"scale": np.zeros(4)}}}
  flat = checkpoints.flatten(tree)
  assert sorted(flat) == ["img/Transformer/encoderblock/w", "llm/final_norm/scale", "llm/layers/x/w"]
  assert checkpoints.flatten(checkpoints.unflatten(flat)).keys() == flat.keys()
  per_layer = checkpoints.flatten(checkpoints.unstack_layers(tree))
  assert sorted(per_layer) == ["img/Transformer/encoderblock_0/w", "img/Transformer/encoderblock_1/w",
                               "img/Transformer/encoderblock_2/w", "llm/final_norm/scale",
                               "llm/layers/0/x/w", "llm/layers/1/x/w"]
  np.testing.assert_array_equal(per_layer["img/Transformer/encoderblock_2/w"], [4, 5])
  only_img = checkpoints.flatten(checkpoints.unstack_layers(tree, towers=("img",)))
  assert "llm/layers/x/w" in only_img
  back = checkpoints.flatten(checkpoints.stack_layers(checkpoints.unstack_layers(tree)))
  assert back.keys() == flat.keys() and all(np.array_equal(back[k], flat[k]) for k in flat)
  with pytest.raises(ValueError, match="is a leaf"):
    checkpoints.unflatten({"a": 1, "a/b": 2})
  with pytest.raises(ValueError, match="without '/'"):
    checkpoints.flatten({"a/b": 1})


def test_param_shapes_match_official_checkpoints(fixtures_dir):
  files = sorted((fixtures_dir / "param_shapes").glob("*.json"))
  assert len(files) == 12
  for f in files:
    ref = json.loads(f.read_text())
    cfg = ref["big_vision_model_config"]
    config = {"img": {**cfg["img"], "image_size": ref["image_resolution"]}, "llm": cfg["llm"]}
    shapes = checkpoints.param_shapes(config)
    assert shapes == {k: tuple(v) for k, v in ref["params"].items()}, f.name
    assert sum(int(np.prod(s)) for s in shapes.values()) == ref["total_params"], f.name


@pytest.mark.parametrize("name,variant,caps,norm,window", [
    ("pt_224", "gemma_2b", (None, None), "rsqrt_head_dim", None),
    ("pt_3b_448", "gemma2_2b", (50.0, 30.0), "rsqrt_head_dim", 4096),
    ("pt_10b_224", "gemma2_9b", (50.0, 30.0), "rsqrt_head_dim", 4096),
    ("pt_28b_896", "gemma2_27b", (50.0, 30.0), "rsqrt_emb_per_head", 4096)])
def test_real_shapes_infer_variant_settings(fixtures_dir, name, variant, caps, norm, window):
  ref = json.loads((fixtures_dir / "param_shapes" / f"{name}.json").read_text())
  shapes = {k: (tuple(v), np.dtype(ml_dtypes.bfloat16)) for k, v in ref["params"].items()}
  config = checkpoints_config.config_from_shapes(shapes, name)
  llm, img = config["llm"], config["img"]
  assert llm["variant"] == variant and img["variant"] == "So400m/14"
  assert (llm["attn_logits_softcap"], llm["final_logits_softcap"]) == caps
  assert llm["query_pre_attn_norm"] == norm and llm["sliding_window"] == window
  assert img["image_size"] == ref["image_resolution"] and llm["param_dtype"] == "bfloat16"
  assert checkpoints.param_shapes(config) == {k: s for k, (s, _) in shapes.items()}
