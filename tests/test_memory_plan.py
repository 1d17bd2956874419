"""Tests of big_vision_lite/memory_plan.py: exact sharded bytes, compiled plan, --dry_run."""
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from big_vision_lite import memory_plan
from big_vision_lite import sharding
from big_vision_lite import train_lib
from big_vision_lite import train_step as ts
from configs import common

REPO = pathlib.Path(__file__).resolve().parents[1]

# A PaliGemma small enough to compile in seconds. Every LLM dim that FSDP may shard is a
# multiple of 8; the ViT's are not (width 12, mlp 20, 2 heads of 6, 4x4 patches), so over 8
# devices only its projector (img/head, [12, 64] + [64]) can be split.
TINY = dict(
    img=dict(patch_size=(4, 4), width=12, depth=1, mlp_dim=20, num_heads=2, image_size=8,
             scan=True),
    llm=dict(vocab_size=256, width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1,
             head_dim=32, scan=True),
)
# Elements counted by hand from the contract's parameter tree.
W, M, PATCH, N_IMG, D, L, F, V, H = 12, 20, 4, 4, 64, 2, 128, 256, 32
VIT_ELEMENTS = (2 * W  # encoder_norm scale + bias
                + 4 * W  # LayerNorm_0/1 scale + bias, [1, W] each
                + (W * M + M) + (M * W + W)  # MlpBlock Dense_0, Dense_1
                + 4 * (W * W + W)  # query/key/value kernels [1,W,2,6] + biases [1,2,6], out
                + (PATCH * PATCH * 3 * W + W)  # patch embedding
                + N_IMG * W)  # pos_embedding
HEAD_ELEMENTS = W * D + D
LLM_ELEMENTS = (V * D + D  # embedder, final_norm
                + L * (2 * H * D  # q_einsum [L,2,D,H]
                       + 2 * 1 * D * H  # kv_einsum [L,2,1,D,H]
                       + 2 * H * D  # attn_vec_einsum
                       + 2 * D * F + F * D  # gating_einsum, linear
                       + 2 * D))  # pre_attention_norm, pre_ffw_norm


def tiny_config(rules="fsdp", batch_size=16, text_len=8, **model_overrides):
  c = common.base_config()
  c.total_steps = 10
  c.model = ml_collections.ConfigDict({k: {**v, **model_overrides.get(k, {})}
                                       for k, v in TINY.items()})
  c.input.batch_size = batch_size
  c.input.text_len = text_len
  c.mesh = [("fsdp", -1)]
  c.sharding_rules = rules
  return c


def build(config):
  """What train.py's --dry_run builds (no tokenizer: the model config has its vocab)."""
  mesh = sharding.make_mesh(config.mesh)
  data_sharding = sharding.batch_sharding(mesh)
  model_config = config.model.to_dict()
  model = train_lib.make_model(model_config)
  params = train_lib.abstract_params(model, config)
  tx, lr_fns, lora = train_lib.make_optimizer(config, params)
  state = jax.eval_shape(lambda p, r: ts.init_state(p, tx, lora=lora, rng=r), params,
                         jax.random.PRNGKey(0))
  shardings = train_lib.state_shardings(config, state, mesh)
  step_fn = ts.make_train_step(model, tx, lora=lora, micro_batch_sharding=data_sharding,
                               lr_fn=next(iter(lr_fns.values())))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(step_fn, in_shardings=(shardings, data_sharding, replicated),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))
  batch = train_lib.abstract_batch(config, model_config)
  return step, state, shardings, batch, data_sharding, mesh


def test_param_count_matches_hand_count():
  _, state, *_ = build(tiny_config())
  total = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert total == VIT_ELEMENTS + HEAD_ELEMENTS + LLM_ELEMENTS


@pytest.mark.parametrize("rules", ["fsdp", "replicate"])
def test_sharded_bytes_equal_hand_computation(rules):
  assert jax.device_count() == 8
  _, state, shardings, *_ = build(tiny_config(rules))
  got = memory_plan.sharded_bytes(state, shardings)
  all_params = 4 * (VIT_ELEMENTS + HEAD_ELEMENTS + LLM_ELEMENTS)
  if rules == "fsdp":  # The ViT tower stays whole on every device; the rest is split 8 ways.
    params = 4 * VIT_ELEMENTS + 4 * (HEAD_ELEMENTS + LLM_ELEMENTS) // 8
  else:
    params = all_params
  scalars = [x for x in jax.tree.leaves(state["opt"]) if x.shape == ()]
  assert scalars and all(np.dtype(x.dtype).itemsize == 4 for x in scalars)
  # Adam: mu and nu shaped (and sharded) like the params, plus replicated step counters.
  opt = 2 * params + 4 * len(scalars)
  assert got["by_group"] == {"params": params, "opt": opt}
  assert got["per_device"] == params + opt
  assert got["global"] == 3 * all_params + 4 * len(scalars)
  names = [name for _, name, _ in got["replicated"]]
  if rules == "fsdp":
    assert len(names) == 3 * 21  # 21 ViT leaves besides img/head, in params, mu and nu.
    assert all("/img/" in n and "/head/" not in n for n in names)
    assert sum(b for b, _, _ in got["replicated"]) == 3 * 4 * VIT_ELEMENTS
  else:
    assert len(names) == 3 * len(jax.tree.leaves(state["params"]))


def pg2_28b_plan_config():
  """PaliGemma 2 28B at 448px, batch 256, FSDP over 256 chips (until configs/cococap.py has it)."""
  c = common.base_config()
  c.name = "pg2_28b_448_fsdp256"
  c.total_steps = 10
  c.model = ml_collections.ConfigDict({
      "img": {"variant": "So400m/14", "image_size": 448},
      "llm": {"variant": "gemma2_27b", "vocab_size": 257152, "scan": True,
              "remat_policy": "nothing_saveable"}})
  c.input.batch_size = 256
  c.input.text_len = 64
  c.mesh = [("fsdp", -1)]
  c.sharding_rules = "fsdp"
  return c


def test_pg2_28b_fsdp256_state_bytes_equal_hand_computation():
  """The real 28B shapes on an abstract 256-device mesh (no compile, no fake devices)."""
  config = pg2_28b_plan_config()
  mesh = sharding.make_mesh(config.mesh, devices=256)
  model = train_lib.make_model(config.model.to_dict())
  params = train_lib.abstract_params(model, config)
  tx, _, lora = train_lib.make_optimizer(config, params)
  state = jax.eval_shape(lambda p: ts.init_state(p, tx, lora=lora), params)
  got = memory_plan.sharded_bytes(state, train_lib.state_shardings(config, state, mesh))
  # So400m/14: W=1152, M=4304, 27 layers, 14x14 patches: no dim divisible by 256 except
  # pos_embedding's 1024 positions (448/14 = 32, squared) and the projector's 4608.
  w, m, layers = 1152, 4304, 27
  vit_layer = 4 * w + (2 * w * m + m + w) + (4 * w * w + 4 * w)
  vit_whole = 2 * w + layers * vit_layer + (14 * 14 * 3 * w + w)
  vit_split = 1024 * w + (w * 4608 + 4608)
  # Gemma 2 27B: D=4608 (= 256 * 18) is in every LLM leaf, so all of it is split.
  d, f, layers, v = 4608, 36864, 46, 257152
  llm_layer = 32 * d * 128 + 2 * 16 * d * 128 + 32 * 128 * d + 2 * d * f + f * d + 4 * d
  llm = v * d + d + layers * llm_layer
  assert (vit_whole + vit_split + llm) == sum(x.size for x in jax.tree.leaves(params))
  params_per_device = 4 * (vit_whole + (vit_split + llm) // 256)
  assert params_per_device == 2_074_198_032  # 1.93 GiB
  assert got["by_group"]["params"] == params_per_device
  scalars = sum(1 for x in jax.tree.leaves(state["opt"]) if x.shape == ())
  assert got["by_group"]["opt"] == 2 * params_per_device + 4 * scalars
  assert sum(b for b, _, _ in got["replicated"]) == 3 * 4 * vit_whole  # 4.61 GiB


def test_sharded_bytes_counts_each_device_exactly():
  """Per-device sums over leaves placed differently, then the max over devices."""
  mesh = sharding.make_mesh([("a", 2), ("b", 4)])
  P, NS = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
  tree = {"p": {"x": jax.ShapeDtypeStruct((8, 6), jnp.float32),
                "y": jax.ShapeDtypeStruct((16,), jnp.bfloat16)},
          "q": {"z": jax.ShapeDtypeStruct((), jnp.int32),
                "w": jax.ShapeDtypeStruct((3, 5), jnp.float32)}}
  shard = {"p": {"x": NS(mesh, P("b", None)), "y": NS(mesh, P(("a", "b")))},
           "q": {"z": NS(mesh, P()),
                 "w": jax.sharding.SingleDeviceSharding(jax.devices()[3])}}
  got = memory_plan.sharded_bytes(tree, shard)
  # x: f32[8,6] over b=4 -> [2,6] = 48 B; y: bf16[16] over 8 -> 2 elements = 4 B; z: 4 B on
  # every device; w: f32[3,5] = 60 B on device 3 only, which therefore holds the most.
  assert got["by_group"] == {"p": 48 + 4, "q": 4 + 60}
  assert got["per_device"] == 48 + 4 + 4 + 60
  assert got["global"] == 8 * 6 * 4 + 16 * 2 + 4 + 60
  assert got["replicated"] == []  # w lives on one device: not replicated; z is a scalar.
  got = memory_plan.sharded_bytes(tree["p"], {"x": NS(mesh, P()), "y": shard["p"]["y"]})
  assert got["replicated"] == [(192, "x", (8, 6))]


def test_chip_names_and_verdicts():
  assert memory_plan.chip_capacity("v5p") == ("v5p", 95 * 2**30)
  assert memory_plan.chip_capacity("TPU v5e")[0] == "v5e"
  assert memory_plan.chip_capacity("H100")[0] == "h100"
  assert memory_plan.chip_capacity("A100_40GB") == ("a100-40gb", 40 * 2**30)
  assert memory_plan.chip_capacity("v5litepod")[0] == "v5e"
  with pytest.raises(ValueError, match=r"unknown chip.*v5p"):
    memory_plan.chip_capacity("a100")
  gib = 2**30
  table = memory_plan.chip_table(int(15.5 * gib))
  assert table["v5e"] == {"capacity": 16 * gib, "headroom": gib // 2, "verdict": "tight"}
  assert table["v4"]["verdict"] == "fits" and table["v4"]["headroom"] == int(16.5 * gib)
  assert memory_plan.chip_table(17 * gib, "v5e") == {
      "v5e": {"capacity": 16 * gib, "headroom": -gib, "verdict": "does not fit"}}
  assert list(table) == sorted(table, key=lambda c: (memory_plan.CHIPS[c], c))


def test_largest_buffers_parses_hlo():
  hlo = textwrap.dedent("""\
      ENTRY %main (p: f32[4,8]) -> f32[4,8] {
        %p = f32[4,8]{1,0} parameter(0)
        %dot.1 = f32[16,256]{1,0} dot(%a, %b), metadata={op_name="jit(step)/jvp(x)/dot"}
        %dot.2 = f32[16,256]{1,0} dot(%c, %d)
        %w = (s32[], bf16[2,3]) while(%t), condition=%c, body=%b
        %v = f32[4096,4096]{1,0} bitcast(%big)
        %cvt = bf16[100]{0} convert(%x), metadata={op_name="jit(step)/convert"}
        ROOT %add = pred[3000]{0} add(%p, %p)
      }""")
  got = memory_plan.largest_buffers(hlo)
  assert got == [
      {"bytes": 16 * 256 * 4, "shape": "f32[16,256]", "op": "dot", "count": 2,
       "source": "jit(step)/jvp(x)/dot"},
      {"bytes": 3000, "shape": "pred[3000]", "op": "add", "count": 1, "source": ""},
      {"bytes": 200, "shape": "bf16[100]", "op": "convert", "count": 1,
       "source": "jit(step)/convert"},
  ]


def test_global_batch_buffers_flags_unsharded_activations():
  buf = lambda shape: {"bytes": 1, "shape": shape, "op": "dot", "count": 1, "source": ""}
  buffers = [buf("f32[16384,257152]"), buf("f32[256,1088,4608]"), buf("f32[1,1088,4608]"),
             buf("f32[46,1,1088,4608]"), buf("bf16[257152,4608]")]
  got = memory_plan.global_batch_buffers(buffers, batch_size=256, text_len=64, data_shards=256)
  assert [b["shape"] for b in got] == ["f32[16384,257152]", "f32[256,1088,4608]"]
  # One data shard holds the whole batch: nothing is suspicious.
  assert memory_plan.global_batch_buffers(buffers, 256, 64, data_shards=1) == []


def test_report_fsdp_compiled_is_consistent():
  config = tiny_config("fsdp", batch_size=16, text_len=8, llm={"scan": False})
  args = build(config)
  lines = []
  r = memory_plan.report(*args, chip=None, config=config, print_fn=lines.append)
  state = r["state"]["per_device"]
  params = 4 * VIT_ELEMENTS + 4 * (HEAD_ELEMENTS + LLM_ELEMENTS) // 8
  assert r["state"]["by_group"]["params"] == params
  # Batch: image f32[16,8,8,3] + 4 x int32[16, 9], 2 examples per device.
  assert r["batch_bytes"] == 2 * (8 * 8 * 3 * 4 + 4 * 9 * 4)
  c = r["compiled"]
  # XLA's argument buffers are exactly the state + the batch (the rng feeds dropout only,
  # which is off: jit drops unused arguments).
  assert c["argument"] == state + r["batch_bytes"]
  # The donated state comes back in place: every state byte is aliased to an output.
  assert c["alias"] == state
  assert c["output"] >= state and c["temp"] > 0
  assert c["peak_estimate"] == c["argument"] + c["output"] - c["alias"] + c["temp"]
  assert r["need_bytes"] == c["peak_estimate"] and not r["need_is_lower_bound"]
  assert all(row["verdict"] == "fits" for row in r["chips"].values())
  f = r["flops"]
  assert f["xla_counts_scan_once"] is False  # Unrolled layers: XLA sees every matmul.
  # Per device: XLA's counts (matmuls + ~1 per elementwise output) sit at or a bit above the
  # analytic matmul count of 1/8 of the batch; the compiled SPMD program matches the global.
  assert 1.0 <= f["xla_lowered_per_device"] / f["model_per_device"] < 1.6
  assert 0.9 < f["xla_compiled_per_device"] / f["xla_lowered_per_device"] < 1.2
  assert r["largest_buffers"] and r["largest_buffers"][0]["bytes"] <= c["temp"] + c["argument"]
  text = "\n".join(lines)
  assert "8 devices, mesh {'fsdp': 8}" in text
  assert re.search(r"v5e\s+16\.00 GiB\s+uses\s+0%\s+headroom\s+1[56]\.\d\d GiB\s+fits", text), text
  assert "leaves no rule could shard" in text and "params/img/" in text


def test_report_without_compile_plans_state_only():
  config = tiny_config("replicate")
  lines = []
  r = memory_plan.report(*build(config), chip="v5p", config=config, compile_step=False,
                         print_fn=lines.append)
  assert r["compiled"] is None and r["need_is_lower_bound"]
  assert r["need_bytes"] == r["state"]["per_device"] + r["batch_bytes"]
  assert list(r["chips"]) == ["v5p"]
  assert any("lower bound" in line for line in lines)


def test_report_rejects_bad_inputs():
  args = build(tiny_config())
  with pytest.raises(ValueError, match="unknown chip"):
    memory_plan.report(*args, chip="tpu9000", print_fn=lambda _: None)
  step, state, shardings, batch, data_sharding, mesh = args
  odd = {k: jax.ShapeDtypeStruct((12, *v.shape[1:]), v.dtype) for k, v in batch.items()}
  with pytest.raises(ValueError, match=r"input.batch_size\) must be divisible by the 8"):
    memory_plan.report(step, state, shardings, odd, data_sharding, mesh, print_fn=print)


def _dry_run(tmp_path, devices):
  cfg = tmp_path / "dry_config.py"
  cfg.write_text(textwrap.dedent("""\
      from configs import demo

      def get_config(arg=None):
        c = demo.get_config("mode=smoke")
        c.mesh = [("fsdp", -1)]
        c.sharding_rules = "fsdp"
        c.input.batch_size = 32
        return c
      """))
  # XLA_FLAGS keeps conftest's 8 devices: train.py appends its own count, which wins. The
  # fake devices are CPU ones: on a GPU machine jax would otherwise plan for the GPU.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "train.py", f"--config={cfg}", f"--workdir={tmp_path / 'wd'}",
       "--dry_run", f"--dry_run_devices={devices}", "--dry_run_chip=v5e"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_train_py_dry_run_prints_the_plan(tmp_path):
  out = _dry_run(tmp_path, 16)
  assert "16 devices, mesh {'fsdp': 16}" in out
  assert re.search(r"state per device \(exact", out)
  assert re.search(r"^\s+params\s+\d", out, re.M) and re.search(r"^\s+opt\s+\d", out, re.M)
  assert re.search(r"^\s+v5e\s+16\.00 GiB\s+uses\s+\d+%\s+headroom .* fits$", out, re.M), out
  assert "compiled step (XLA buffer assignment" in out
  assert not (tmp_path / "wd" / "checkpoints").exists()
