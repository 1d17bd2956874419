"""Tests for big_vision_lite/checkpoints_hf.py: Hugging Face PaliGemma folders, both ways.

References: the safetensors files of the fixtures (read with the `safetensors` library) and
transformers' own PaliGemmaForConditionalGeneration.from_pretrained.
"""
import json
import logging
import shutil

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from big_vision_lite import checkpoints
from big_vision_lite import checkpoints_hf

PG2_CAPS = {"query_pre_attn_norm": "rsqrt_emb_per_head", "attn_logits_softcap": 2.5,
            "final_logits_softcap": 5.0}
FOLDERS = ["hf_paligemma1_tiny", "hf_paligemma2_tiny", "hf_paligemma1_tiny/hub_key_layout",
           "hf_paligemma2_tiny/hub_key_layout"]


def bits(a) -> np.ndarray:
  a = np.ascontiguousarray(a)
  return a.view(f"u{a.dtype.itemsize}")


def tensors(folder) -> dict[str, np.ndarray]:
  """The fixture's tensors, keys in transformers 5's file names (hub layout renamed back)."""
  raw = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in raw.items()}


@pytest.mark.parametrize("folder", FOLDERS)
def test_load_hf_config(fixtures_dir, folder):
  config, _ = checkpoints.load(fixtures_dir / folder)
  llm, img = config["llm"], config["img"]
  pg2 = "paligemma2" in folder
  assert llm["vocab_size"] == 1472  # every HF row kept: the <image> row and 63 unused rows
  assert (llm["width"], llm["depth"], llm["num_heads"], llm["num_kv_heads"]) == (48, 3, 2, 1)
  assert (llm["mlp_dim"], llm["head_dim"]) == ((112, 16) if pg2 else (96, 24))
  assert (img["width"], img["depth"], img["mlp_dim"], img["num_heads"]) == (
      (32, 2, 96, 4) if pg2 else (32, 3, 64, 2))
  assert (img["patch_size"], img["image_size"]) == (([14, 14], 42) if pg2 else ([16, 16], 32))
  assert llm["post_norms"] is pg2 and llm["norm_eps"] == 1e-6
  if pg2:
    assert {k: llm[k] for k in PG2_CAPS} == PG2_CAPS and llm["sliding_window"] == 8
  else:
    assert (llm["attn_logits_softcap"], llm["final_logits_softcap"], llm["sliding_window"]) == (
        None, None, None)
    assert llm["query_pre_attn_norm"] == "rsqrt_head_dim"


@pytest.mark.parametrize("folder", FOLDERS)
def test_hf_values_follow_the_mapping(fixtures_dir, folder):
  """Each array equals its HF tensor(s) under the mapping written out from the issue."""
  _, params = checkpoints.load(fixtures_dir / folder)
  got = checkpoints.flatten(params)
  st = tensors(fixtures_dir / folder)
  pg2 = "paligemma2" in folder
  n, k, h, d, depth = 2, 1, (16 if pg2 else 24), 48, 3
  lm = "language_model.model."
  per = lambda i, key: st[f"{lm}layers.{i}.{key}"]
  want = {
      "llm/embedder/input_embedding": st[lm + "embed_tokens.weight"],
      "llm/final_norm/scale": st[lm + "norm.weight"],
      "llm/layers/attn/q_einsum/w": np.stack([
          per(i, "self_attn.q_proj.weight").reshape(n, h, d).transpose(0, 2, 1) for i in range(depth)]),
      "llm/layers/attn/kv_einsum/w": np.stack([np.stack([
          per(i, f"self_attn.{x}_proj.weight").reshape(k, h, d).transpose(0, 2, 1) for x in "kv"])
          for i in range(depth)]),
      "llm/layers/attn/attn_vec_einsum/w": np.stack([
          per(i, "self_attn.o_proj.weight").T.reshape(n, h, d) for i in range(depth)]),
      "llm/layers/mlp/gating_einsum": np.stack([np.stack([
          per(i, f"mlp.{x}_proj.weight").T for x in ("gate", "up")]) for i in range(depth)]),
      "llm/layers/mlp/linear": np.stack([per(i, "mlp.down_proj.weight").T for i in range(depth)]),
      "llm/layers/pre_attention_norm/scale": np.stack([
          per(i, "input_layernorm.weight") for i in range(depth)]),
  }
  norms = ({"post_attention_norm": "post_attention_layernorm", "pre_ffw_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm"} if pg2 else
           {"pre_ffw_norm": "post_attention_layernorm"})  # Gemma 1: the norm before the MLP
  for bv, hf in norms.items():
    want[f"llm/layers/{bv}/scale"] = np.stack([per(i, f"{hf}.weight") for i in range(depth)])
  w, nh, vdepth = 32, (4 if pg2 else 2), (2 if pg2 else 3)
  vl = lambda i, key: st[f"vision_tower.encoder.layers.{i}.{key}"]
  b, a = "img/Transformer/encoderblock/", "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/"
  want.update({
      "img/embedding/kernel": st["vision_tower.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0),
      "img/embedding/bias": st["vision_tower.embeddings.patch_embedding.bias"],
      "img/pos_embedding": st["vision_tower.embeddings.position_embedding.weight"][None],
      "img/Transformer/encoder_norm/scale": st["vision_tower.post_layernorm.weight"],
      "img/Transformer/encoder_norm/bias": st["vision_tower.post_layernorm.bias"],
      "img/head/kernel": st["multi_modal_projector.linear.weight"].T,
      "img/head/bias": st["multi_modal_projector.linear.bias"],
      a + "out/kernel": np.stack([vl(i, "self_attn.out_proj.weight").T.reshape(nh, w // nh, w)
                                  for i in range(vdepth)]),
      a + "out/bias": np.stack([vl(i, "self_attn.out_proj.bias") for i in range(vdepth)]),
  })
  for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
    want[f"{a}{name}/kernel"] = np.stack([vl(i, f"self_attn.{x}_proj.weight").T.reshape(w, nh, w // nh)
                                          for i in range(vdepth)])
    want[f"{a}{name}/bias"] = np.stack([vl(i, f"self_attn.{x}_proj.bias").reshape(nh, w // nh)
                                        for i in range(vdepth)])
  for j in (0, 1):
    want[f"{b}LayerNorm_{j}/scale"] = np.stack([vl(i, f"layer_norm{j + 1}.weight") for i in range(vdepth)])
    want[f"{b}LayerNorm_{j}/bias"] = np.stack([vl(i, f"layer_norm{j + 1}.bias") for i in range(vdepth)])
    want[f"{b}MlpBlock_0/Dense_{j}/kernel"] = np.stack([vl(i, f"mlp.fc{j + 1}.weight").T for i in range(vdepth)])
    want[f"{b}MlpBlock_0/Dense_{j}/bias"] = np.stack([vl(i, f"mlp.fc{j + 1}.bias") for i in range(vdepth)])
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_mapping_computes_what_hf_computes(fixtures_dir):
  """The mapped weights give HF's projections: y = x @ W.T, heads major; conv = patch matmul."""
  _, params = checkpoints.load(fixtures_dir / "hf_paligemma2_tiny")
  st = tensors(fixtures_dir / "hf_paligemma2_tiny")
  rng = np.random.default_rng(0)
  x = rng.normal(size=48).astype(np.float64)
  layers = params["llm"]["layers"]
  lm = "language_model.model.layers.1."
  q = np.einsum("D,NDH->NH", x, layers["attn"]["q_einsum"]["w"][1])
  np.testing.assert_allclose(q.reshape(-1), x @ st[lm + "self_attn.q_proj.weight"].T, rtol=1e-6, atol=1e-6)
  v = np.einsum("D,KDH->KH", x, layers["attn"]["kv_einsum"]["w"][1, 1])
  np.testing.assert_allclose(v.reshape(-1), x @ st[lm + "self_attn.v_proj.weight"].T, rtol=1e-6, atol=1e-6)
  heads = rng.normal(size=(2, 16))
  o = np.einsum("NH,NHD->D", heads, layers["attn"]["attn_vec_einsum"]["w"][1])
  np.testing.assert_allclose(o, heads.reshape(-1) @ st[lm + "self_attn.o_proj.weight"].T, rtol=1e-6, atol=1e-6)
  up = x @ layers["mlp"]["gating_einsum"][1, 1]
  np.testing.assert_allclose(up, x @ st[lm + "mlp.up_proj.weight"].T, rtol=1e-6, atol=1e-6)
  patch = rng.normal(size=(14, 14, 3))  # one HWC patch -> the conv output at that position
  kernel = params["img"]["embedding"]["kernel"]
  hf_w = st["vision_tower.embeddings.patch_embedding.weight"]  # [W, C, P, P], input CHW
  np.testing.assert_allclose(np.einsum("hwc,hwcW->W", patch, kernel),
                             np.einsum("chw,Wchw->W", patch.transpose(2, 0, 1), hf_w), rtol=1e-6, atol=1e-6)
  xv = rng.normal(size=32)
  key = np.einsum("D,DNH->NH", xv, params["img"]["Transformer"]["encoderblock"][
      "MultiHeadDotProductAttention_0"]["key"]["kernel"][0])
  np.testing.assert_allclose(key.reshape(-1), xv @ st["vision_tower.encoder.layers.0.self_attn.k_proj.weight"].T,
                             rtol=1e-6, atol=1e-6)


def test_hub_and_in_memory_key_names_load_the_same(fixtures_dir, tmp_path):
  _, base = checkpoints.load(fixtures_dir / "hf_paligemma1_tiny")
  _, hub = checkpoints.load(fixtures_dir / "hf_paligemma1_tiny" / "hub_key_layout")
  st = tensors(fixtures_dir / "hf_paligemma1_tiny")
  renamed = {("model.language_model." + k[len("language_model.model."):]
              if k.startswith("language_model.model.") else "model." + k): v for k, v in st.items()}
  renamed["lm_head.weight"] = st["language_model.model.embed_tokens.weight"]  # tied
  (tmp_path / "mem").mkdir()
  shutil.copy(fixtures_dir / "hf_paligemma1_tiny" / "config.json", tmp_path / "mem")
  safetensors.numpy.save_file(renamed, str(tmp_path / "mem" / "model.safetensors"))
  _, mem = checkpoints.load(tmp_path / "mem")
  a, b, c = (checkpoints.flatten(p) for p in (base, hub, mem))
  assert a.keys() == b.keys() == c.keys()
  for name in a:
    assert np.array_equal(bits(a[name]), bits(b[name])) and np.array_equal(bits(a[name]), bits(c[name]))
  renamed["lm_head.weight"] = renamed["lm_head.weight"] + 1
  safetensors.numpy.save_file(renamed, str(tmp_path / "mem" / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight differs from the token table"):
    checkpoints.load(tmp_path / "mem")


@pytest.mark.parametrize("fixture,fname,overrides", [
    ("bv_paligemma1_tiny", "params.npz", {}),
    ("bv_paligemma1_tiny", "params_bf16.npz", {}),
    ("bv_paligemma1_tiny", "params_f16.npz", {}),
    ("bv_paligemma2_tiny", "params.npz", {"llm": PG2_CAPS}),
    ("bv_paligemma2_tiny", "params.npz", {"llm": {**PG2_CAPS, "sliding_window": 4}})])
def test_npz_to_hf_to_npz_is_bit_exact(fixtures_dir, tmp_path, fixture, fname, overrides):
  src = fixtures_dir / fixture / fname
  config, params = checkpoints.load(src, **overrides)
  checkpoints.save(tmp_path / "hf", config, params, format="hf")
  hf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert hf["image_token_index"] == 1408 and hf["vocab_size"] == hf["text_config"]["vocab_size"] == 1472
  st = safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
  table = st["language_model.model.embed_tokens.weight"]
  assert table.shape == (1472, 48) and not bits(table[1408:]).any()  # <image> + padding rows: 0
  text = hf["text_config"]
  if fixture == "bv_paligemma2_tiny":
    assert text["model_type"] == "gemma2" and text["query_pre_attn_scalar"] == 24
    assert (text["attn_logit_softcapping"], text["final_logit_softcapping"]) == (2.5, 5.0)
    window = overrides["llm"].get("sliding_window")
    assert text["layer_types"] == (["sliding_attention", "full_attention"] if window else
                                   ["full_attention"] * 2)
  else:
    assert text["model_type"] == "gemma" and "layer_types" not in text
  config2, params2 = checkpoints.load(tmp_path / "hf")
  assert config2 == config
  checkpoints.save(tmp_path / "back.npz", config2, params2)
  with np.load(src) as a, np.load(tmp_path / "back.npz") as b:
    assert sorted(a.files) == sorted(b.files)
    for k in a.files:
      assert a[k].dtype == b[k].dtype and np.array_equal(bits(a[k]), bits(b[k])), k


def test_hf_to_hf_keeps_every_tensor(fixtures_dir, tmp_path):
  src = fixtures_dir / "hf_paligemma2_tiny"
  config, params = checkpoints.load(src)
  checkpoints.save(tmp_path / "hf", config, params, format="hf", image_token_index=1408)
  a, b = tensors(src), safetensors.numpy.load_file(str(tmp_path / "hf" / "model.safetensors"))
  assert a.keys() == b.keys()
  assert all(np.array_equal(bits(a[k]), bits(b[k])) for k in a)
  ref, out = (json.loads((d / "config.json").read_text()) for d in (src, tmp_path / "hf"))
  for key in ("image_token_index", "vocab_size", "projection_dim"):
    assert out[key] == ref[key], key
  for key in ("vocab_size", "hidden_size", "head_dim", "query_pre_attn_scalar", "sliding_window",
              "layer_types", "attn_logit_softcapping", "final_logit_softcapping", "num_key_value_heads"):
    assert out["text_config"][key] == ref["text_config"][key], key
  for key in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_attention_heads"):
    assert out["vision_config"][key] == ref["vision_config"][key], key


def from_pretrained(folder):
  """transformers' loader, with its log records (it reports key mismatches there)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  records = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = records.append
  logger = logging.getLogger("transformers")
  logger.addHandler(handler)
  try:
    model, info = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
        str(folder), output_loading_info=True)
  finally:
    logger.removeHandler(handler)
  state = {}
  for k, t in model.state_dict().items():
    t = t.detach()
    state[k] = (t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16
                else t.numpy())
  return info, [r.getMessage() for r in records], state


@pytest.mark.parametrize("fname,shard_bytes", [("params_bf16.npz", 4 << 30), ("params.npz", 200_000)])
def test_hf_save_opens_in_transformers(fixtures_dir, tmp_path, fname, shard_bytes):
  src = fixtures_dir / ("bv_paligemma2_tiny" if fname == "params.npz" else "bv_paligemma1_tiny") / fname
  overrides = {"llm": {**PG2_CAPS, "sliding_window": 4}} if fname == "params.npz" else {}
  config, params = checkpoints.load(src, **overrides)
  checkpoints.save(tmp_path / "hf", config, params, format="hf", max_shard_bytes=shard_bytes)
  if shard_bytes < 1e6:  # ~600 KB of float32 weights in shards of <= 200 KB (or one big tensor)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
      sizes = [v.nbytes for v in safetensors.numpy.load_file(str(tmp_path / "hf" / shard)).values()]
      assert sum(sizes) <= shard_bytes or len(sizes) == 1, shard
    assert not (tmp_path / "hf" / "model.safetensors").exists()
  info, messages, state = from_pretrained(tmp_path / "hf")
  assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
  assert info["mismatched_keys"] == set() and not info["error_msgs"], info
  assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()
              or "not used" in m.lower() or "newly initialized" in m.lower()], messages
  # Reading transformers' own state dict with our key normalisation gives back our arrays.
  assert np.array_equal(bits(state.pop("lm_head.weight")), bits(state["model.language_model.embed_tokens.weight"]))
  mapped = {checkpoints_hf.normalize_key(k): v for k, v in state.items()}
  (tmp_path / "torch").mkdir()
  shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "torch")
  checkpoints_hf.write_safetensors(str(tmp_path / "torch" / "model.safetensors"),
                                   [(k, v.shape, v.dtype) for k, v in mapped.items()], iter(mapped.values()))
  config2, params2 = checkpoints.load(tmp_path / "torch")
  assert config2 == config
  a, b = checkpoints.flatten(params), checkpoints.flatten(params2)
  assert a.keys() == b.keys() and all(np.array_equal(bits(a[k]), bits(b[k])) for k in a)


def test_sharded_folder_loads(fixtures_dir, tmp_path):
  config, params = checkpoints.load(fixtures_dir / "hf_paligemma1_tiny")
  checkpoints.save(tmp_path / "hf", config, params, format="hf", image_token_index=1408,
                   max_shard_bytes=100_000)
  index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 3 and len(index["weight_map"]) == 84
  _, again = checkpoints.load(tmp_path / "hf")
  a, b = checkpoints.flatten(params), checkpoints.flatten(again)
  assert all(np.array_equal(bits(a[k]), bits(b[k])) for k in a)
  # Saving again unsharded removes the old shards.
  checkpoints.save(tmp_path / "hf", config, params, format="hf", image_token_index=1408)
  assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
      "config.json", "generation_config.json", "model.safetensors"]


def copy_folder(fixtures_dir, tmp_path, name="hf_paligemma2_tiny"):
  dst = tmp_path / "copy"
  shutil.copytree(fixtures_dir / name, dst, ignore=shutil.ignore_patterns("hub_key_layout", "io.npz"))
  return dst


def test_hf_errors_are_clear(fixtures_dir, tmp_path):
  folder = copy_folder(fixtures_dir, tmp_path)
  cfg = json.loads((folder / "config.json").read_text())

  def with_config(**text):
    (folder / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], **text}}))

  with_config(layer_types=["full_attention", "sliding_attention", "full_attention"])
  with pytest.raises(ValueError, match=r"layer_types=.*only sliding/full alternating"):
    checkpoints.load(folder)
  with_config(query_pre_attn_scalar=20)
  with pytest.raises(ValueError, match="query_pre_attn_scalar=20 is neither head_dim"):
    checkpoints.load(folder)
  with_config(num_key_value_heads=2)
  with pytest.raises(ValueError, match=r"layers.0.self_attn.k_proj.weight: the file has shape "
                     r"\[16, 48\], config.json implies \[32, 48\]"):
    checkpoints.load(folder)
  with_config(model_type="gemma3")
  with pytest.raises(ValueError, match="only 'gemma'"):
    checkpoints.load(folder)
  (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
  with pytest.raises(ValueError, match="model_type is 'llava', expected 'paligemma'"):
    checkpoints.load(folder)
  (folder / "config.json").write_text("[1, 2")
  with pytest.raises(ValueError, match="config.json: unreadable JSON"):
    checkpoints.load(folder)
  with_config()
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[: len(data) - 1000])
  with pytest.raises(ValueError, match="model.safetensors: truncated: tensor"):
    checkpoints.load(folder)
  (folder / "model.safetensors").write_bytes(b"\x00" * 64)
  with pytest.raises(ValueError, match="not a safetensors file"):
    checkpoints.load(folder)
  (folder / "model.safetensors").unlink()
  with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
    checkpoints.load(folder)


def test_missing_and_extra_hf_tensors(fixtures_dir, tmp_path):
  folder = copy_folder(fixtures_dir, tmp_path, "hf_paligemma1_tiny")
  st = tensors(folder)
  del st["language_model.model.layers.2.mlp.up_proj.weight"]
  st["vision_tower.head.probe"] = np.zeros((1, 32), np.float32)
  safetensors.numpy.save_file(st, str(folder / "model.safetensors"))
  with pytest.raises(ValueError, match=r"layers.2.mlp.up_proj.weight \[96, 48\].* is missing"):
    checkpoints.load(folder)
  st["language_model.model.layers.2.mlp.up_proj.weight"] = np.zeros((96, 48), np.float32)
  safetensors.numpy.save_file(st, str(folder / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) \['vision_tower.head.probe'\]"):
    checkpoints.load(folder)
