"""The real train step under meshes: data-parallel, FSDP and FSDP+tensor equal one device."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from big_vision_lite import optim, sharding
from big_vision_lite import train_step as ts
from big_vision_lite.models import paligemma
from big_vision_lite.models import siglip

MODEL = {"img": dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2,
                     image_size=16, head_zeroinit=False),
         "llm": dict(vocab_size=256, width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2,
                     head_dim=8, post_norms=True, attn_logits_softcap=5.0,
                     final_logits_softcap=10.0, sliding_window=6)}
# SGD with momentum: the update is linear in the gradient, so float32 reduction-order noise
# stays at its own size (Adam's g / sqrt(v) would amplify it on parameters whose gradient is
# ~0, and "equal after 3 steps" would then measure Adam, not the sharding).
OPT = ConfigDict(dict(optax_name="sgd", optax={"momentum": 0.9}, lr=0.3, wd=1e-4, wd_mults=[(".*", 1.0)],
                      lr_mults=None, schedule=dict(decay_type="cosine", warmup_steps=1),
                      grad_clip_norm=1.0, total_steps=3))


def batches(n=3, b=8, t=12):
  rng = np.random.RandomState(0)
  for _ in range(n):
    text = rng.randint(3, 256, (b, t + 1)).astype(np.int32)
    prefix = rng.randint(2, 6, (b, 1))
    pos = np.arange(t + 1)[None]
    yield {"image": rng.uniform(-1, 1, (b, 16, 16, 3)).astype(np.float32), "text": text,
           "mask_ar": (pos >= prefix).astype(np.int32),
           "mask_loss": (pos >= prefix).astype(np.int32),
           "mask_input": (pos < t - rng.randint(0, 3, (b, 1))).astype(np.int32)}


def train(mesh_axes, rules, grad_accum=1, devices=None, global_batches=False):
  """3 steps; global_batches: this process feeds only its rows (multi-process runs)."""
  model = paligemma.Model(**MODEL)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                      jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))["params"]
  tx, _ = optim.make_optimizer(OPT, params)
  mesh = sharding.make_mesh(mesh_axes, devices=devices)
  data = sharding.batch_sharding(mesh)
  state = ts.init_state(params, tx)
  shardings = sharding.infer_shardings(jax.eval_shape(lambda: state), rules, mesh)
  state = jax.device_put(state, shardings)
  step = jax.jit(ts.make_train_step(model, tx, grad_accum_steps=grad_accum,
                                    micro_batch_sharding=data),
                 in_shardings=(shardings, data, None), out_shardings=(shardings, None))
  losses = []
  for i, batch in enumerate(batches()):
    if global_batches:
      rows = len(batch["text"]) // jax.process_count()
      mine = {k: v[jax.process_index() * rows:][:rows] for k, v in batch.items()}
      batch = sharding.make_global_batch(mine, mesh, data)
    else:
      batch = jax.device_put(batch, data)
    state, metrics = step(state, batch, jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  if global_batches:  # Params are sharded across processes: gather them on every process.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return losses, multihost_utils.process_allgather(state["params"], tiled=True)
  return losses, jax.device_get(state["params"])


@pytest.fixture(scope="module")
def single_device():
  return train([("data", 1)], sharding.REPLICATE_RULES, devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_axes,rules", [
    ([("data", 8)], sharding.REPLICATE_RULES),
    ([("fsdp", 8)], sharding.FSDP_RULES),
    ([("data", 2), ("fsdp", 2), ("tensor", 2)], sharding.FSDP_TENSOR_RULES),
], ids=["data", "fsdp", "fsdp_tensor"])
def test_sharded_training_equals_one_device(single_device, mesh_axes, rules):
  losses, params = train(mesh_axes, rules)
  ref_losses, ref_params = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)
  assert ref_losses[2] < ref_losses[0]  # It trains.


def test_gradient_accumulation_equals_one_batch(single_device):
  losses, params = train([("data", 1)], sharding.REPLICATE_RULES, grad_accum=4,
                         devices=jax.devices()[:1])
  ref_losses, ref_params = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), params, ref_params)


_WORKER = """
import json, sys
sys.path.insert(0, sys.argv[1])
from big_vision_lite import sharding
assert sharding.maybe_initialize_distributed()
import jax, numpy as np
sys.path.insert(0, sys.argv[1] + "/tests")
import test_train_step as t
losses, params = t.train([("fsdp", -1)], sharding.FSDP_RULES, global_batches=True)
flat = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params)]
print("RESULT " + json.dumps({"pid": jax.process_index(), "losses": losses, "sums": flat}))
jax.distributed.shutdown()
"""


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  """2 processes x 2 fake devices, each feeding its half of the batch == one process."""
  import json, os, socket, subprocess, sys, pathlib  # pylint: disable=g-import-not-at-top
  repo = pathlib.Path(__file__).resolve().parents[1]
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
    procs.append(subprocess.Popen([sys.executable, str(script), str(repo)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=600)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, out[-3000:]
    outs.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
  losses, params = train([("fsdp", 4)], sharding.FSDP_RULES, devices=jax.devices()[:4])
  sums = [float(np.asarray(x, np.float64).sum()) for x in jax.tree.leaves(params)]
  for o in outs:
    np.testing.assert_allclose(o["losses"], losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o["sums"], sums, rtol=1e-4, atol=1e-4)


def test_frozen_params_cost_no_backward_pass():
  """A None schedule freezes the image tower but its projector: the step leaves it unchanged,
  its gradients are left out of grad_norm, and XLA never computes them (the compiled step does
  fewer FLOPs than the same step training everything: about the tower's backward pass)."""
  model = paligemma.Model(**MODEL)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                      jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))["params"]
  sched = dict(decay_type="cosine", warmup_steps=1)
  cfg = ConfigDict(dict(OPT.to_dict(), schedule=[
      ("img/(Transformer|embedding|pos_embedding)(/.*)?", None), (".*", sched)]))
  frozen = optim.frozen_mask(cfg, params)
  tower = {k: v for k, v in frozen["img"].items() if k != "head"}
  assert len(jax.tree.leaves(tower)) > 3 and all(jax.tree.leaves(tower))
  assert not any(jax.tree.leaves(frozen["llm"])) and not any(jax.tree.leaves(
      frozen["img"]["head"]))
  tx, _ = optim.make_optimizer(cfg, params)
  batch = next(batches())

  def flops(fn, *args):
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]

  state = ts.init_state(params, tx)
  rng = jax.random.PRNGKey(0)
  step_all = flops(ts.make_train_step(model, tx), state, batch, rng)
  step_frozen = flops(ts.make_train_step(model, tx, frozen=frozen), state, batch, rng)
  vit = siglip.ViT(**siglip.resolve_config(MODEL["img"]))
  tower_forward = flops(lambda p, x: vit.apply({"params": p}, x)[0],
                        {k: v for k, v in params["img"].items() if k != "head"}, batch["image"])
  # The backward of a forward pass costs about twice the forward.
  assert step_all - step_frozen > 1.5 * tower_forward, (step_all, step_frozen, tower_forward)

  step = jax.jit(ts.make_train_step(model, tx, frozen=frozen))
  state, metrics = step(state, batch, rng)
  state, _ = step(state, batch, rng)  # The first update is 0 (warmup from 0).
  new = jax.device_get(state["params"])
  for a, b in zip(jax.tree.leaves(params["img"]["Transformer"]),
                  jax.tree.leaves(new["img"]["Transformer"])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params["llm"]),
                                                      jax.tree.leaves(new["llm"])))
  # grad_norm: the trainable gradients only (the full gradient's norm is larger).
  loss_fn = ts.make_loss_fn(model, label_smoothing=0.0, reduction="per_example")
  full = dict(batch, rng=jax.random.split(jax.random.PRNGKey(0), 8))
  grads = jax.grad(lambda p: (lambda n, d: n / d)(*loss_fn(p, full)))(params)
  trainable = jax.tree.map(lambda f, g: 0 * g if f else g, frozen, grads)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(trainable), rtol=2e-5)
  assert optax.tree.norm(grads) > 1.001 * optax.tree.norm(trainable)  # Measured: 1.0027.
  with pytest.raises(ValueError, match="matches no rule for params"):
    optim.frozen_mask(ConfigDict(dict(schedule=[("llm/.*", None)])), params)
