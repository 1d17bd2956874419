"""Tests for big_vision_lite/run_state.py: orbax train-state checkpoints and load(WORKDIR)."""
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import big_vision_lite
from big_vision_lite import checkpoints
from big_vision_lite import checkpoints_config
from big_vision_lite import lora as lora_lib
from big_vision_lite import run_state
from big_vision_lite.models import paligemma

TINY = dict(img=dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2, image_size=16),
            llm=dict(vocab_size=300, width=48, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2,
                     head_dim=12))


def bits(x) -> np.ndarray:
  x = np.asarray(x)
  return x.view(f"u{x.dtype.itemsize}")


def assert_trees_bit_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  flat = lambda t: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(t)}
  g, w = flat(got), flat(want)
  for k in w:
    assert np.asarray(g[k]).dtype == np.asarray(w[k]).dtype, k
    assert np.array_equal(bits(g[k]), bits(w[k])), k


def tiny_params(model_config, seed=0):
  """Random params of the model's shapes (numpy: no model compile, fast tests)."""
  size = model_config["img"]["image_size"]
  shapes = jax.eval_shape(paligemma.Model(**model_config).init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)), jnp.zeros((1, 4), jnp.int32),
                          jnp.zeros((1, 4), jnp.int32))["params"]
  rs = np.random.RandomState(seed)
  return jax.tree.map(lambda s: rs.normal(0, 0.5, s.shape).astype(s.dtype), shapes)


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((4, 2), ("data", "model"))


def small_state(mesh, step: int = 0):
  params = {"w": jax.device_put(jnp.arange(64.0).reshape(8, 8) + step,
                                NamedSharding(mesh, P("data", "model"))),
            "b": jnp.full((5,), step, jnp.bfloat16),
            "frozen": jnp.ones((3,), jnp.float32)}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.masked(optax.adam(1e-3), {"w": True, "b": True, "frozen": False}))
  opt = tx.init(params)
  opt = jax.tree.map(lambda x: x + step if jnp.issubdtype(x.dtype, jnp.floating) else x, opt)
  return {"params": params, "opt": opt}


def test_round_trip_bit_exact_into_other_shardings(tmp_path, mesh):
  state = small_state(mesh, step=3)
  key = jax.random.key(7)
  extra = {"rng": key, "rng_raw": jax.random.key_data(key), "config": json.dumps({"a": 1}),
           "metrics": {"loss": 1.25, "n": np.int32(4)}, "blob": b"\x00\xff{",
           "tup": (1, 2), "arr": np.arange(6, dtype=np.float16).reshape(2, 3)}
  with run_state.RunState(tmp_path, keep_last=3) as mgr:
    assert mgr.latest_step() is None
    assert mgr.save(3, state, extra=extra, data_state=b'{"pos": 17}')
    mgr.wait()
    assert mgr.all_steps() == [3]
    # Restore onto another layout: w replicated on a (8,) mesh, opt as the saved one.
    other = NamedSharding(jax.make_mesh((8,), ("x",)), P())
    target = run_state.abstract_tree(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((8, 8), jnp.float32, sharding=other)
    r = mgr.restore(target=target)
  assert r.step == 3 and r.data_state == b'{"pos": 17}'
  assert_trees_bit_equal(r.state["params"], state["params"])
  assert r.state["params"]["w"].sharding == other
  assert jax.tree.structure(r.state["opt"]) == jax.tree.structure(state["opt"])
  for got, want in zip(jax.tree.leaves(r.state["opt"]), jax.tree.leaves(state["opt"])):
    assert got.sharding == want.sharding and np.array_equal(bits(got), bits(want))
  e = r.extra
  assert jax.dtypes.issubdtype(e["rng"].dtype, jax.dtypes.prng_key)
  assert np.array_equal(jax.random.key_data(e["rng"]), jax.random.key_data(key))
  assert e["rng_raw"].dtype == np.uint32 and np.array_equal(e["rng_raw"], jax.random.key_data(key))
  assert e["config"] == '{"a": 1}' and e["metrics"] == {"loss": 1.25, "n": 4}
  assert e["blob"] == b"\x00\xff{" and e["tup"] == [1, 2]
  assert e["arr"].dtype == np.float16 and np.array_equal(e["arr"], extra["arr"])
  # Only the params (what an evaluator needs); without target shardings orbax uses the saved.
  with run_state.RunState(tmp_path, read_only=True) as ro:
    r = ro.restore(target={"params": jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])})
  assert set(r.state) == {"params"}
  assert r.state["params"]["w"].sharding.is_equivalent_to(state["params"]["w"].sharding, 2)
  assert_trees_bit_equal(r.state["params"], state["params"])


def test_keep_last_and_every(tmp_path, mesh):
  with run_state.RunState(tmp_path, keep_last=2, keep_every=4, async_save=False) as mgr:
    for step in range(1, 11):
      mgr.save(step, {"params": small_state(mesh, step)["params"]})
    assert mgr.all_steps() == [4, 8, 9, 10]
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "4", "8", "9"]


def test_async_save_wait_and_restore_latest(tmp_path, mesh):
  with run_state.RunState(tmp_path, keep_last=None) as mgr:
    for step in (5, 10, 15):
      state = small_state(mesh, step)
      assert mgr.save(step, state, extra={"step": step})
      # save() returns with the arrays copied off the devices: the train step may donate
      # (here: delete) them while the files are still being written.
      jax.tree.map(lambda x: x.delete(), state)
    assert not mgr.save(15, small_state(mesh, 99))  # already saved: nothing written
    mgr.wait()
    assert mgr.all_steps() == [5, 10, 15] and mgr.latest_step() == 15
    target = run_state.abstract_tree(small_state(mesh))
    r = mgr.restore(target=target)
    assert r.step == 15 and r.extra == {"step": 15} and r.data_state is None
    assert_trees_bit_equal(r.state, small_state(mesh, 15))
    r = mgr.restore(10, target=target)
    assert_trees_bit_equal(r.state, small_state(mesh, 10))
    with pytest.raises(ValueError, match=r"step 11.*complete steps: \[5, 10, 15\]"):
      mgr.restore(11, target=target)


def test_relative_workdir_saves_and_restores(tmp_path, mesh, monkeypatch):
  """The README's `--workdir runs/demo`: orbax's array writer needs absolute paths and
  fails only in its background thread, so an async save must still commit."""
  monkeypatch.chdir(tmp_path)
  with run_state.RunState("runs/demo", keep_last=None) as mgr:
    assert mgr.save(3, small_state(mesh, 3))
    mgr.wait()
  with run_state.RunState(os.path.join("runs", "demo"), read_only=True) as ro:
    assert ro.all_steps() == [3]
    r = ro.restore(target=run_state.abstract_tree(small_state(mesh)))
    assert_trees_bit_equal(r.state, small_state(mesh, 3))
  assert run_state.committed_steps(tmp_path / "runs" / "demo" / "checkpoints") == [3]


def test_unfinished_and_damaged_steps_are_skipped(tmp_path, mesh, caplog):
  target = run_state.abstract_tree(small_state(mesh))
  with run_state.RunState(tmp_path, keep_last=None, async_save=False) as mgr:
    mgr.save(10, small_state(mesh, 10))
    ckdir = tmp_path / "checkpoints"
    # A crash mid-save leaves orbax's tmp folder (here: a partial copy of step 10).
    tmp = ckdir / "20.orbax-checkpoint-tmp"
    shutil.copytree(ckdir / "10", tmp)
    (tmp / "commit_success.txt").unlink()
    shutil.rmtree(tmp / "opt")
    # A step folder without the commit marker (damaged / copied by hand).
    shutil.copytree(tmp, ckdir / "30")
    with caplog.at_level(logging.WARNING, logger="big_vision_lite.run_state"):
      assert mgr.latest_step() == 10
    assert "skipping" in caplog.text and "30" in caplog.text
    r = mgr.restore(target=target)
    assert r.step == 10
    assert_trees_bit_equal(r.state, small_state(mesh, 10))
    with pytest.raises(ValueError, match="step 30"):
      mgr.restore(30, target=target)
  # A resumed run (writable RunState) deletes the stale tmp folder before its first save,
  # then saves that step anew.
  with run_state.RunState(tmp_path, keep_last=None) as mgr:
    assert mgr.save(20, small_state(mesh, 20))
    mgr.wait()
    assert not tmp.exists() and mgr.all_steps() == [10, 20]
    assert_trees_bit_equal(mgr.restore(target=target).state, small_state(mesh, 20))


def test_restore_errors(tmp_path, mesh):
  with run_state.RunState(tmp_path) as mgr:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      mgr.restore(target={"params": {}})
    mgr.save(1, small_state(mesh, 1))
    mgr.wait()
    with pytest.raises(ValueError, match=r"holds no item \['lora'\]"):
      mgr.restore(target={"lora": {}})
    bad = run_state.abstract_tree(small_state(mesh))
    bad["params"]["w"] = jax.ShapeDtypeStruct((4, 8), jnp.float32)
    with pytest.raises(ValueError, match=r"checkpoints/1: cannot restore"):
      mgr.restore(target=bad)
    with pytest.raises(ValueError, match="reserved"):
      mgr.save(2, {"params": {}, "extra": {}})
    with pytest.raises(TypeError, match=r"extra\['f'\]: builtin_function_or_method cannot"):
      mgr.save(2, {"params": small_state(mesh)["params"]}, extra={"f": print})
  with pytest.raises(ValueError, match="keep_last"):
    run_state.RunState(tmp_path, keep_last=0)


def _write_run(tmp_path, model_config, state, *, lora_cfg=None, step=7):
  run_state.write_config(tmp_path, {"model": model_config, "lora": lora_cfg, "lr": 1e-3})
  with run_state.RunState(tmp_path) as mgr:
    mgr.save(step, state, extra={"rng": jax.random.key(0)})


def test_load_relative_workdir(tmp_path, monkeypatch):
  """`predict.py --checkpoint runs/demo`: orbax's reader refuses relative paths too."""
  params = tiny_params(TINY)
  _write_run(tmp_path / "runs" / "demo", TINY, {"params": params})
  monkeypatch.chdir(tmp_path)
  for path in ("runs/demo", os.path.join("runs", "demo", "checkpoints", "7")):
    _, loaded = big_vision_lite.load(path)
    assert_trees_bit_equal(loaded, params)


def test_load_workdir_returns_config_and_params(tmp_path):
  params = tiny_params(TINY)
  tx = optax.adam(1e-3)
  _write_run(tmp_path, TINY, {"params": params, "opt": tx.init(params)})
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 1e-3
  for path in (tmp_path, tmp_path / "checkpoints" / "7"):
    config, loaded = big_vision_lite.load(path)
    assert_trees_bit_equal(loaded, params)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(loaded))
    assert config["img"]["image_size"] == 16 and config["img"]["patch_size"] == [8, 8]
    assert config["llm"]["vocab_size"] == 300 and config["llm"]["num_kv_heads"] == 2
    assert config["img"]["param_dtype"] == config["llm"]["param_dtype"] == "float32"
    assert set(config["img"]) == set(checkpoints_config.IMG_CONFIG)
    assert set(config["llm"]) == set(checkpoints_config.LLM_CONFIG)
    # The returned config builds the same model.
    shapes = jax.eval_shape(paligemma.Model(**config).init, jax.random.key(0),
                            jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 4), jnp.int32),
                            jnp.zeros((1, 4), jnp.int32))["params"]
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)
  # Straight into shardings; and a config override (bf16) casts.
  mesh = jax.make_mesh((8,), ("fsdp",))
  shard = lambda name: NamedSharding(mesh, P())
  _, loaded = checkpoints.load(tmp_path, shardings=shard, param_dtype="bfloat16")
  leaf = loaded["llm"]["embedder"]["input_embedding"]
  assert leaf.sharding == NamedSharding(mesh, P()) and leaf.dtype == jnp.bfloat16
  want = np.asarray(params["llm"]["embedder"]["input_embedding"]).astype(jnp.bfloat16)
  assert np.array_equal(bits(leaf), bits(want))


def test_load_workdir_merges_lora_and_reads_per_layer_params(tmp_path):
  config = {"img": {**TINY["img"], "scan": False}, "llm": TINY["llm"]}
  params = tiny_params(config, seed=1)
  assert "encoderblock_1" in params["img"]["Transformer"]
  adapters = lora_lib.init_lora(jax.random.key(2), params, rank=2)
  # b starts at zero; make it nonzero so that the merge shows.
  adapters = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.3 if jax.tree_util.keystr(p).endswith("['b']") else x, adapters)
  _write_run(tmp_path, config, {"params": params, "lora": adapters},
             lora_cfg={"rank": 2, "alpha": 4.0, "targets": lora_lib.LLM_TARGETS})
  got_config, loaded = checkpoints.load(tmp_path)
  assert got_config["img"]["scan"] is False
  want = jax.device_get(lora_lib.merge_lora(params, adapters, 4.0, 2))
  assert_trees_bit_equal(loaded, want)
  q = "llm/layers/attn/q_einsum/w"
  assert not np.allclose(checkpoints.flatten(loaded)[q], checkpoints.flatten(params)[q])
  # Without rank/alpha in the config the adapters cannot be merged: a clear error.
  run_state.write_config(tmp_path, {"model": config, "lora": None})
  with pytest.raises(ValueError, match="LoRA adapters but the run config has no lora.rank"):
    checkpoints.load(tmp_path)


def test_load_workdir_errors(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="without a complete checkpoint"):
    checkpoints.load(tmp_path)
  params = tiny_params(TINY)
  with run_state.RunState(tmp_path) as mgr:
    mgr.save(3, {"params": params})
  with pytest.raises(ValueError, match="no run config"):
    checkpoints.load(tmp_path)
  # Without config.json, a run config that the trainer stored in `extra` is used.
  with run_state.RunState(tmp_path) as mgr:
    mgr.save(4, {"params": params}, extra={"config": json.dumps({"model": TINY})})
  _, loaded = checkpoints.load(tmp_path)
  assert_trees_bit_equal(loaded, params)
  # config.json, when there, is the run config.
  (tmp_path / "config.json").write_text(json.dumps({"model": {"img": {"widht": 3}}}))
  with pytest.raises(ValueError, match="unknown key"):
    checkpoints.load(tmp_path)
  step = tmp_path / "checkpoints" / "3"
  (step / "commit_success.txt").unlink()
  with pytest.raises(ValueError, match="not a complete checkpoint step"):
    checkpoints.load(step)


_WORKER = r'''
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid, workdir, phase = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from big_vision_lite import run_state
mesh = jax.make_mesh((4,), ("data",))
sharding = NamedSharding(mesh, P("data"))
w = jax.make_array_from_callback((8, 3), sharding, lambda i: np.arange(24.0).reshape(8, 3)[i])
with run_state.RunState(workdir) as mgr:
  if phase == "save":
    mgr.save(4, {"params": {"w": w}}, extra={"who": "p0"}, data_state=f"proc{pid}".encode())
    out = {}
  else:
    rep = NamedSharding(mesh, P())
    w = jax.ShapeDtypeStruct((8, 3), np.float32, sharding=rep)
    r = mgr.restore(target={"params": {"w": w}})
    out = {"w": np.asarray(r.state["params"]["w"].addressable_data(0)).tolist(),
           "data": r.data_state.decode(), "extra": r.extra, "step": r.step}
print("RESULT " + json.dumps(out))
'''


def test_two_processes_save_and_restore(tmp_path):
  """Two JAX processes (CPU, gloo): sharded arrays, one input state per process."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  outs = {}
  for phase in ("save", "restore"):
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(p),
                               str(tmp_path / "run"), phase], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    outs[phase] = []
    for p in procs:
      try:
        out, err = p.communicate(timeout=120)
      finally:
        if p.poll() is None:
          p.kill()
      assert p.returncode == 0, err[-3000:]
      outs[phase].append(json.loads(next(l for l in out.splitlines()
                                         if l.startswith("RESULT "))[7:]))
  files = sorted(os.listdir(tmp_path / "run" / "checkpoints" / "4" / "data"))
  assert [f for f in files if f.endswith(".bin")] == ["process_0-of-2.bin", "process_1-of-2.bin"]
  for pid, o in enumerate(outs["restore"]):
    assert o["w"] == np.arange(24.0).reshape(8, 3).tolist()
    assert o["data"] == f"proc{pid}" and o["extra"] == {"who": "p0"} and o["step"] == 4
