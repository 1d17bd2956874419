"""Tests for big_vision_lite/sharding.py on 8 fake CPU devices (see conftest.py)."""
import functools
import json
import logging
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from big_vision_lite import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def shape_tree(flat: dict[str, list[int]], dtype=jnp.float32) -> dict:
  tree = {}
  for name, shape in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.ShapeDtypeStruct(tuple(shape), dtype)
  return tree


def flat_specs(shardings) -> dict[str, P]:
  return {jax.tree_util.keystr(k, simple=True, separator="/"): s.spec
          for k, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


@pytest.fixture(scope="module")
def pt_224(fixtures_dir):
  with open(fixtures_dir / "param_shapes" / "pt_224.json") as f:
    return shape_tree(json.load(f)["params"])


# ---------------------------------------------------------------------------- mesh


@pytest.mark.parametrize("axes,names,sizes", [
    ([("data", -1)], ("data",), (8,)),
    ([("data", 2), ("fsdp", -1)], ("data", "fsdp"), (2, 4)),
    ([("data", 2), ("fsdp", -1), ("tensor", 2)], ("data", "fsdp", "tensor"), (2, 2, 2)),
    ([("data", 1), ("fsdp", 8)], ("data", "fsdp"), (1, 8)),
])
def test_make_mesh_shapes(axes, names, sizes):
  mesh = sharding.make_mesh(axes)
  assert mesh.axis_names == names
  assert tuple(mesh.shape.values()) == sizes
  assert mesh.axis_types == (AxisType.Auto,) * len(names)
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_over_device_subset_and_constraint_works():
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[4:])
  assert mesh.size == 4 and sorted(d.id for d in mesh.devices.flat) == [4, 5, 6, 7]
  x = jax.device_put(jnp.arange(8.0), NamedSharding(mesh, P()))
  # Auto axes: with_sharding_constraint is allowed (Explicit axes would reject it).
  y = jax.jit(lambda v: sharding.constrain_batch(v * 2, mesh))(x)
  np.testing.assert_array_equal(y, np.arange(8.0) * 2)
  assert y.sharding.spec == P(("data",)) and {d.id for d in y.devices()} == {4, 5, 6, 7}


def test_abstract_mesh_for_aot_dry_run():
  mesh = sharding.make_mesh([("data", 4), ("fsdp", -1)], devices=64)  # More than we have.
  assert isinstance(mesh, AbstractMesh) and dict(mesh.shape) == {"data": 4, "fsdp": 16}
  params = {"w": jax.ShapeDtypeStruct((128, 64), jnp.float32)}
  shardings = sharding.infer_shardings(params, sharding.FSDP_RULES, mesh)
  assert shardings["w"].spec == P("fsdp", None)
  x = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=sharding.batch_sharding(mesh))
  w = jax.ShapeDtypeStruct((128, 64), jnp.float32, sharding=shardings["w"])
  lowered = jax.jit(lambda w, x: jnp.sum(x @ w)).trace(w, x).lower(lowering_platforms=("tpu",))
  text = lowered.as_text()
  assert '"data"=4' in text and '"fsdp"=16' in text and "mhlo.num_partitions = 64" in text


@pytest.mark.parametrize("axes,match", [
    ([("data", 3), ("fsdp", -1)], "does not divide the 8 devices"),
    ([("data", 2)], "covers 2 devices but there are 8"),
    ([("data", -1), ("fsdp", -1)], "at most one -1"),
    ([("data", 2), ("data", 4)], "names repeat"),
    ([("data", 0)], "positive"),
    ([], "empty"),
    (["data"], "pairs"),
])
def test_make_mesh_errors(axes, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(axes)


# ----------------------------------------------------------------- rule application


def test_fsdp_rules_on_paligemma_shapes(pt_224):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)])
  shardings = sharding.infer_shardings(pt_224, sharding.FSDP_RULES, mesh)
  specs = flat_specs(shardings)
  assert len(specs) == len(jax.tree.leaves(pt_224))
  expected = {
      "llm/embedder/input_embedding": P("fsdp", None),  # [257152, 2048]: 257152 is largest.
      "llm/layers/attn/q_einsum/w": P(None, None, "fsdp", None),  # [18, 8, 2048, 256]
      "llm/layers/attn/kv_einsum/w": P(None, None, None, "fsdp", None),  # [18, 2, 1, 2048, 256]
      "llm/layers/mlp/gating_einsum": P(None, None, None, "fsdp"),  # [18, 2, 2048, 16384]
      "llm/layers/mlp/linear": P(None, "fsdp", None),  # [18, 16384, 2048]
      "llm/layers/pre_ffw_norm/scale": P(None, "fsdp"),  # [18, 2048]
      "img/embedding/kernel": P(None, None, None, "fsdp"),  # [14, 14, 3, 1152]
      "img/pos_embedding": P(None, None, "fsdp"),  # [1, 256, 1152]
      "img/head/kernel": P(None, "fsdp"),  # [1152, 2048]
      "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": P(None, None, "fsdp"),
      "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias": P(None, None, "fsdp"),
  }
  for name, spec in expected.items():
    assert specs[name] == spec, name
  q = shardings["llm"]["layers"]["attn"]["q_einsum"]["w"]
  assert q.mesh is mesh and q.shard_shape((18, 8, 2048, 256)) == (18, 8, 512, 256)


def test_fsdp_tensor_rules_on_paligemma_shapes(pt_224):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", -1), ("tensor", 2)])
  specs = flat_specs(sharding.infer_shardings(pt_224, sharding.FSDP_TENSOR_RULES, mesh))
  expected = {
      "llm/layers/attn/q_einsum/w": P(None, "tensor", "fsdp", None),
      "llm/layers/attn/attn_vec_einsum/w": P(None, "tensor", None, "fsdp"),
      # Gemma 2B has one KV head: not split over "tensor".
      "llm/layers/attn/kv_einsum/w": P(None, None, None, "fsdp", None),
      "llm/layers/mlp/gating_einsum": P(None, None, "fsdp", "tensor"),
      "llm/layers/mlp/linear": P(None, "tensor", "fsdp"),
      "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel":
          P(None, "fsdp", "tensor", None),
      "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel":
          P(None, "tensor", None, "fsdp"),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel": P(None, "fsdp", "tensor"),
      "img/Transformer/encoderblock/MlpBlock_0/Dense_1/kernel": P(None, "tensor", "fsdp"),
      "llm/embedder/input_embedding": P("fsdp", None),
  }
  for name, spec in expected.items():
    assert specs[name] == spec, name


def test_tensor_rules_gemma2_kv_heads_and_unscanned_layout():
  mesh = sharding.make_mesh([("fsdp", 4), ("tensor", 2)])
  tree = shape_tree({
      "llm/layers/attn/kv_einsum/w": [26, 2, 4, 2304, 256],  # gemma2_2b: 4 KV heads.
      "llm/layers/3/attn/q_einsum/w": [8, 2304, 256],  # scan=False layout.
      "llm/layers/3/mlp/linear": [9216, 2304],
      "img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel": [1152, 4304],
  })
  specs = flat_specs(sharding.infer_shardings(tree, sharding.FSDP_TENSOR_RULES, mesh))
  assert specs["llm/layers/attn/kv_einsum/w"] == P(None, None, "tensor", "fsdp", None)
  assert specs["llm/layers/3/attn/q_einsum/w"] == P("tensor", "fsdp", None)
  assert specs["llm/layers/3/mlp/linear"] == P("tensor", "fsdp")
  assert specs["img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] == P("fsdp", "tensor")


def test_fsdp_scan_axis_exclusion_and_fallback_logging(caplog):
  mesh = sharding.make_mesh([("fsdp", 4), ("data", 2)])
  tree = shape_tree({
      "llm/layers/pre_ffw_norm/scale": [16, 8],  # L=16 is largest, but never sharded.
      "llm/layers/odd/scale": [16, 6],  # Only L is divisible: replicated.
      "other/scale": [16, 6],  # Not stacked: L-like dim 0 may be sharded.
      "tiny": [3],
      "count": [],
  })
  with caplog.at_level(logging.INFO):
    specs = flat_specs(sharding.infer_shardings(tree, sharding.FSDP_RULES, mesh))
  assert specs == {"count": P(), "llm/layers/odd/scale": P(None, None),
                   "llm/layers/pre_ffw_norm/scale": P(None, "fsdp"),
                   "other/scale": P("fsdp", None), "tiny": P(None)}
  assert "llm/layers/odd/scale" in caplog.text and "tiny" in caplog.text
  assert "count" not in caplog.text  # Scalars are replicated silently.


def test_rule_composition_multi_axis_and_min_size():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  tree = shape_tree({"a/w": [4, 12, 6], "b/w": [8, 8], "c/w": [4, 4], "d/w": [64, 64]})
  rules = [
      ("a/w", [("shard", 0, "tensor"), ("fsdp", ("data", "fsdp"))]),
      ("b/w", ["shard", -1, ["data", "tensor"]]),  # A rule after a JSON round trip.
      ("c/w", ("fsdp", "fsdp", {"min_size_mb": 1.0})),
      ("d/w", ("fsdp", "fsdp", {"min_size_mb": 0.01})),
  ]
  specs = flat_specs(sharding.infer_shardings(tree, rules, mesh))
  assert specs == {"a/w": P("tensor", ("data", "fsdp"), None), "b/w": P(None, ("data", "tensor")),
                   "c/w": P(None, None), "d/w": P("fsdp", None)}


@pytest.mark.parametrize("rules,match", [
    ([(".*", ("shard", -1, "tensor"))], r"param llm/w \(4, 5\).*cannot shard dim 1 of size 5"),
    ([(".*", ("shard", 2, "tensor"))], r"param llm/w \(4, 5\).*shards dim 2, which it lacks"),
    ([(".*", ("fsdp", "model"))], r"param llm/w: rule .* names mesh axis 'model'"),
    ([(".*", [("shard", 0, "tensor"), ("shard", 0, "data")])], r"param llm/w: rule .* conflicts"),
    ([(".*", [("shard", 0, "tensor"), ("fsdp", "tensor")])], r"param llm/w: rule .* reuses"),
    ([(".*", [("shard", 0, "tensor"), "replicate"])], r"param llm/w: 'replicate' after"),
    ([(".*", ("tensor", 0))], r"param llm/w: unknown sharding rule"),
    ([(".*", ("shard", "x", "tensor"))], r"param llm/w: bad shard rule"),
    ([(".*", ("fsdp", "fsdp", {"bad": 1}))], r"param llm/w: bad fsdp rule"),
    ([("img/.*", "replicate")], r"param llm/w \(4, 5\) matches no regex"),
    ([("(", "replicate")], r"not a \(regex, rule\) pair"),
])
def test_rule_errors_name_param_and_rule(rules, match):
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  with pytest.raises(ValueError, match=match):
    sharding.infer_shardings(shape_tree({"llm/w": [4, 5]}), rules, mesh)


def test_skip_if_indivisible():
  mesh = sharding.make_mesh([("tensor", 8)])
  rules = [(".*", ("shard", 1, "tensor", {"skip_if_indivisible": True}))]
  specs = flat_specs(sharding.infer_shardings(shape_tree({"w": [8, 4]}), rules, mesh))
  assert specs == {"w": P(None, None)}


# ------------------------------------------------------------------------- batches


def test_batch_sharding_and_global_batch():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  assert sharding.batch_sharding(mesh, ("data",)).spec == P(("data",))
  with pytest.raises(ValueError, match=r"\['model'\] not in the mesh axes"):
    sharding.batch_sharding(mesh, ("data", "model"))
  with pytest.raises(ValueError, match="neither 'data' nor 'fsdp'"):
    sharding.batch_sharding(sharding.make_mesh([("tensor", 8)]))

  local = {"text": np.arange(24, dtype=np.int32).reshape(8, 3),
           "image": np.random.RandomState(0).rand(8, 2, 2, 3).astype(np.float32)}
  batch = sharding.make_global_batch(local, mesh)
  for k, v in local.items():
    np.testing.assert_array_equal(np.asarray(batch[k]), v)
    assert batch[k].sharding.spec == P(("data", "fsdp"))
    # 4 data shards of 2 rows, each held by both "tensor" devices.
    assert {s.data.shape[0] for s in batch[k].addressable_shards} == {2}
  with pytest.raises(ValueError, match=r"batch\['text'\]: global batch 6 .* divisible by the 4"):
    sharding.make_global_batch({"text": np.zeros((6, 3))}, mesh)


def _mlp_loss(params, batch):
  h = jnp.tanh(batch["x"] @ params["dense1"]["kernel"] + params["dense1"]["bias"][None])
  y = h @ params["dense2"]["kernel"] + params["dense2"]["bias"][None]
  return jnp.mean((y - batch["y"]) ** 2)


def _train_mlp(mesh=None, rules=None, steps=3):
  rng = np.random.RandomState(0)
  params = {"dense1": {"kernel": rng.randn(16, 32) * 0.3, "bias": rng.randn(32) * 0.1},
            "dense2": {"kernel": rng.randn(32, 8) * 0.3, "bias": rng.randn(8) * 0.1}}
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  batches = [{"x": rng.randn(16, 16).astype(np.float32), "y": rng.randn(16, 8).astype(np.float32)}
             for _ in range(steps)]
  tx = optax.adam(0.05)

  def step(params, opt, batch):
    if mesh is not None:
      batch = sharding.constrain_batch(batch, mesh)
    loss, grads = jax.value_and_grad(_mlp_loss)(params, batch)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt = tx.init(params)
  if mesh is None:
    step_fn = jax.jit(step)
  else:
    p_sh = sharding.infer_shardings(params, rules, mesh)
    o_sh = sharding.infer_shardings(opt, rules, mesh)
    b_sh = sharding.batch_sharding(mesh)
    params, opt = jax.device_put(params, p_sh), jax.device_put(opt, o_sh)
    step_fn = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, None))
  losses = []
  for b in batches:
    if mesh is not None:
      b = sharding.make_global_batch(b, mesh)
    params, opt, loss = step_fn(params, opt, b)
    losses.append(float(loss))
  return params, losses


@functools.cache
def _reference_run():
  return _train_mlp()


MLP_TENSOR_RULES = [
    (r".*dense1/kernel", [("shard", -1, "tensor"), ("fsdp", "fsdp")]),
    (r".*dense1/bias", ("shard", 0, "tensor")),
    (r".*dense2/kernel", [("shard", 0, "tensor"), ("fsdp", "fsdp")]),
    (".*", ("fsdp", "fsdp")),
]


@pytest.mark.parametrize("axes,rules,spec", [
    ([("data", -1)], sharding.REPLICATE_RULES, P(None, None)),
    ([("data", 2), ("fsdp", 4)], sharding.FSDP_RULES, P(None, "fsdp")),
    ([("data", 2), ("fsdp", 2), ("tensor", 2)], MLP_TENSOR_RULES, P("fsdp", "tensor")),
])
def test_sharded_training_matches_single_device(axes, rules, spec):
  ref_params, ref_losses = _reference_run()
  mesh = sharding.make_mesh(axes)
  params, losses = _train_mlp(mesh, rules)
  assert params["dense1"]["kernel"].sharding.spec == spec
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  assert losses[-1] < losses[0]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- multi-host


def test_maybe_initialize_distributed_env(monkeypatch):
  for var in ("BVL_COORDINATOR", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("SLURM_NTASKS", "1")  # A one-task SLURM job is single-process.
  assert sharding.maybe_initialize_distributed() is False
  monkeypatch.setenv("BVL_COORDINATOR", "127.0.0.1:1")
  monkeypatch.setenv("BVL_NUM_PROCESSES", "two")
  with pytest.raises(ValueError, match="BVL_NUM_PROCESSES and BVL_PROCESS_ID must be integers"):
    sharding.maybe_initialize_distributed()


_WORKER = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from big_vision_lite import sharding
    assert sharding.maybe_initialize_distributed()
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = sharding.make_mesh([("data", -1)])
    x = np.arange(24, dtype=np.float32).reshape(8, 3) / 7.0
    pid = jax.process_index()
    batch = sharding.make_global_batch({"x": x[pid * 4:(pid + 1) * 4]}, mesh)
    f = jax.jit(lambda b: (jnp.sum(b["x"] ** 2), jnp.mean(b["x"], axis=0)),
                out_shardings=NamedSharding(mesh, P()))
    total, mean = f(batch)
    print("RESULT " + json.dumps(dict(
        pid=pid, n=jax.device_count(), local=jax.local_device_count(),
        shape=list(batch["x"].shape), total=float(total), mean=np.asarray(mean).tolist())))
    jax.distributed.shutdown()
""")


def test_two_processes_global_batch_reduction(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  procs = []
  for pid in range(2):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "BVL_", "XLA_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               BVL_COORDINATOR=f"127.0.0.1:{port}", BVL_NUM_PROCESSES="2",
               BVL_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, str(script), str(REPO)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=120)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, out
    outs.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  x = np.arange(24, dtype=np.float32).reshape(8, 3) / 7.0
  assert sorted(o["pid"] for o in outs) == [0, 1]
  for o in outs:
    assert (o["n"], o["local"], o["shape"]) == (4, 2, [8, 3])
    np.testing.assert_allclose(o["total"], np.sum(x ** 2), rtol=1e-6)
    np.testing.assert_allclose(o["mean"], x.mean(axis=0), rtol=1e-6)
