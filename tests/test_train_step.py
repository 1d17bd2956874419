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


def train(mesh_axes, rules, grad_accum=1, devices=None):
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
    state, metrics = step(state, jax.device_put(batch, data), jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
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
