"""Tests for big_vision_lite/optim.py: schedules, optimizer assembly, losses, helpers."""
import math

import jax
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vision_lite import optim
from big_vision_lite.models.siglip import remat_policy


def _params(seed=0):
  rng = np.random.RandomState(seed)
  return {"enc": {"kernel": jnp.asarray(rng.randn(3, 4), jnp.float32),
                  "bias": jnp.asarray(rng.randn(4), jnp.float32)},
          "head": {"kernel": jnp.asarray(rng.randn(4, 2), jnp.float32)}}


def _grads(seed):
  return jax.tree.map(lambda p: jnp.asarray(np.random.RandomState(seed).randn(*p.shape),
                                            jnp.float32), _params())


def _leaves(tree):
  return {jax.tree_util.keystr(k, simple=True, separator="/"): v
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("kw,expected", [
    (dict(decay_type="cosine", warmup_steps=10),
     {0: 0.0, 5: 0.5, 10: 1.0, 40: 0.75, 55: 0.5, 100: 0.0}),
    (dict(decay_type="linear", warmup_percent=0.1, end=0.1),
     {0: 0.0, 10: 1.0, 55: 0.55, 100: 0.1}),
    (dict(decay_type="linear", warmup_steps=10, linear_end=0.1, power=2),
     {55: 0.1 + 0.9 * 0.25}),
    (dict(decay_type="rsqrt", warmup_steps=10, timescale=10),
     {5: 0.5, 10: 1.0, 20: 1 / math.sqrt(2), 50: 1 / math.sqrt(5)}),
    (dict(decay_type="rsqrt", timescale=10, shift=30), {0: 0.5, 10: 1 / math.sqrt(5)}),
    (dict(decay_type="constant", mult=2.0, warmup_steps=4, cooldown_steps=10),
     {2: 1.0, 50: 2.0, 95: 1.0, 100: 0.0}),
    (dict(decay_type="stair", steps=[30, 60], mults=[0.1, 0.01]),
     {29: 1.0, 30: 0.1, 59: 0.1, 60: 0.01, 99: 0.01}),
    (ml_collections.ConfigDict(dict(decay_type="cosine", cooldown_percent=0.5)),
     {0: 1.0, 50: 0.5, 75: 0.5 * (1 + math.cos(math.pi * 0.75)) * 0.5}),
])
def test_schedule_values(kw, expected):
  fn = optim.make_schedule(100, **kw)
  for step, value in expected.items():
    np.testing.assert_allclose(float(fn(step)), value, rtol=1e-6, atol=1e-7, err_msg=str(step))
  assert jax.jit(fn)(jnp.int32(40)).dtype == jnp.float32


@pytest.mark.parametrize("kw,match", [
    (dict(decay_type="cosine", end=0.1), r"unknown keys \['end'\] for decay_type 'cosine'"),
    (dict(decay_type="exp"), "decay_type must be one of"),
    (dict(warmup_steps=3), "decay_type must be one of"),
    (dict(decay_type="cosine", warmup_steps=100), "warmup .* >= total_steps"),
    (dict(decay_type="cosine", warmup_steps=1, warmup_percent=0.1), "not both"),
    (dict(decay_type="cosine", warmup_percent=5), r"must lie in \[0, 1\]"),
    (dict(decay_type="stair", steps=[1, 2], mults=[0.1]), "as many mults as steps"),
])
def test_schedule_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.make_schedule(100, **kw)


# ------------------------------------------------------------------------ optimizer


def _config(**kw):
  base = dict(optax_name="adam", lr=0.01, schedule=dict(decay_type="constant"), total_steps=10)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_freezing_zero_updates_and_no_state():
  params = _params()
  cfg = _config(schedule=[("enc/bias", None), (".*", dict(decay_type="cosine"))],
                wd=0.1, wd_mults=[(".*", 1.0)], grad_clip_norm=1.0)
  tx, lr_fns = optim.make_optimizer(cfg, params)
  state = tx.init(params)
  # Adam keeps mu and nu for the 12 + 8 trainable numbers only; the frozen [4] bias has none.
  sizes = sorted(np.size(x) for x in jax.tree.leaves(state))
  assert sizes == [1, 1, 8, 8, 12, 12]
  assert not any(x.shape == (4,) for x in jax.tree.leaves(state))
  p = params
  for step in range(3):
    updates, state = tx.update(_grads(step), state, p)
    np.testing.assert_array_equal(updates["enc"]["bias"], np.zeros(4))
    assert np.abs(updates["enc"]["kernel"]).min() > 0
    p = optax.apply_updates(p, updates)
  np.testing.assert_array_equal(p["enc"]["bias"], params["enc"]["bias"])
  assert int(optim.optimizer_step(state)) == 3
  assert list(lr_fns) == ["lr/.*"]
  np.testing.assert_allclose(float(lr_fns["lr/.*"](5)), 0.01 * 0.5, rtol=1e-6)


def test_every_param_needs_a_schedule():
  cfg = _config(schedule=[("enc/.*", dict(decay_type="constant"))])
  with pytest.raises(ValueError, match=r"no rule for params \['head/kernel'\]"):
    optim.make_optimizer(cfg, _params())


@pytest.mark.parametrize("schedule", [
    dict(decay_type="constant"), dict(decay_type="cosine", warmup_steps=2)])
def test_lr_and_wd_mults_match_optax_adamw(schedule):
  """Our update = -sched * (lr * lr_mult * adam + wd * wd_mult * p); with lr_t = lr * sched
  that is optax.adamw(lr_t * lr_mult, weight_decay=wd * wd_mult / (lr * lr_mult))."""
  lr, wd, total = 0.01, 1e-3, 10
  params = _params()
  cfg = _config(optax_name="adamw", lr=lr, wd=wd, schedule=schedule, optax=dict(b2=0.95),
                lr_mults=[("head/.*", 10.0)], wd_mults=[(".*/kernel", 1.0), (".*bias", 0.5)])
  tx, _ = optim.make_optimizer(cfg, params, total_steps=total)
  sched = optim.make_schedule(total, **schedule)
  groups = {"enc/kernel": (1.0, 1.0), "enc/bias": (1.0, 0.5), "head/kernel": (10.0, 1.0)}
  refs = {name: optax.adamw(lambda c, m=m: lr * m * sched(c), b2=0.95,
                            weight_decay=wd * w / (lr * m)) for name, (m, w) in groups.items()}
  ref_states = {name: ref.init(params) for name, ref in refs.items()}
  state, p = tx.init(params), params
  for step in range(4):
    g = _grads(step)
    updates, state = tx.update(g, state, p)
    for name, ref in refs.items():
      ref_updates, ref_states[name] = ref.update(g, ref_states[name], p)
      np.testing.assert_allclose(_leaves(updates)[name], _leaves(ref_updates)[name],
                                 rtol=2e-6, atol=1e-9, err_msg=f"{name} step {step}")
    p = optax.apply_updates(p, updates)


def test_clipping_by_global_norm_of_trainable_grads():
  params = {"a": jnp.zeros(2), "frozen": jnp.zeros(1)}
  cfg = _config(optax_name="sgd", lr=1.0, grad_clip_norm=1.0,
                schedule=[("frozen", None), (".*", dict(decay_type="constant"))])
  tx, _ = optim.make_optimizer(cfg, params)
  state = tx.init(params)
  # Norm 5 -> scaled to 1; the frozen param's huge gradient does not count.
  updates, state = tx.update({"a": jnp.array([3.0, 4.0]), "frozen": jnp.array([100.0])},
                             state, params)
  np.testing.assert_allclose(updates["a"], [-0.6, -0.8], rtol=1e-6)
  np.testing.assert_array_equal(updates["frozen"], [0.0])
  updates, _ = tx.update({"a": jnp.array([0.3, 0.4]), "frozen": jnp.array([1.0])}, state, params)
  np.testing.assert_allclose(updates["a"], [-0.3, -0.4], rtol=1e-6)


@pytest.mark.parametrize("name,kw,reference", [
    ("sgd", {}, lambda lr: optax.sgd(lr)),
    ("sgd", {"momentum": 0.9, "nesterov": True},
     lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True)),
    ("big_vision.momentum_hp", {"dtype": "float32"}, lambda lr: optax.sgd(lr, momentum=0.9)),
    ("adam", {"b1": 0.8}, lambda lr: optax.adam(lr, b1=0.8)),
    ("scale_by_adam", {}, optax.adam),
    ("lion", {}, lambda lr: optax.lion(lr, weight_decay=0.0)),
    ("adafactor", {"min_dim_size_to_factor": 2}, lambda lr: optax.adafactor(
        lr, min_dim_size_to_factor=2)),
    ("scale_by_rms", {}, optax.rmsprop),
])
def test_directions_match_optax(name, kw, reference):
  params = _params()
  tx, _ = optim.make_optimizer(_config(optax_name=name, optax=kw, lr=0.1), params)
  ref = reference(0.1)
  state, ref_state, p = tx.init(params), ref.init(params), params
  for step in range(3):
    g = _grads(step)
    updates, state = tx.update(g, state, p)
    ref_updates, ref_state = ref.update(g, ref_state, p)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(ref_updates)):
      np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-8)
    p = optax.apply_updates(p, updates)


def test_big_vision_adafactor():
  params = {"w": jnp.ones((64, 48)), "b": jnp.ones(3)}
  tx, _ = optim.make_optimizer(_config(optax_name="big_vision.scale_by_adafactor", lr=0.1),
                               params)
  state = tx.init(params)
  assert any(x.dtype == jnp.bfloat16 and x.shape == (64, 48) for x in jax.tree.leaves(state))
  # Factored second moments: [64] and [48] for w (min_dim_size_to_factor=32).
  shapes = [x.shape for x in jax.tree.leaves(state)]
  assert (64,) in shapes and (48,) in shapes and (64, 48) in shapes
  grads = {"w": jnp.full((64, 48), 2.0), "b": jnp.full(3, -2.0)}
  updates, _ = tx.update(grads, state, params)
  # Step 0: beta2 = min(0.999, 1 - 1) = 0 so v = g^2, the direction is sign(g) * (1 - 0.9).
  np.testing.assert_allclose(updates["w"], -0.1 * 0.1 * np.ones((64, 48)), rtol=1e-2)
  np.testing.assert_allclose(updates["b"], 0.1 * 0.1 * np.ones(3), rtol=1e-2)


@pytest.mark.parametrize("kw,match", [
    (dict(optax_name="adamx"), "optax_name='adamx' is unknown"),
    (dict(optax=dict(learning_rate=1.0)), r"config.optax has \['learning_rate'\]"),
    (dict(optax_name="adamw", optax=dict(weight_decay=0.1)), r"use config.lr / config.wd"),
    (dict(optax=dict(beta=0.9)), r"does not fit optimizer 'adam'"),
    (dict(wd=0.1), "config.wd is set but config.wd_mults is not"),
    (dict(lr_mults=[(".*", 0.0)]), "mults must be > 0"),
    (dict(lr_mults=[("(", 1.0)]), "config.lr_mults must be a list of"),
])
def test_make_optimizer_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_config(**kw), _params())


def test_missing_required_key():
  cfg = _config()
  del cfg["lr"]
  with pytest.raises(ValueError, match="missing the key 'lr'"):
    optim.make_optimizer(cfg, _params())


def test_optimizer_on_shape_structs_and_jit():
  params = _params()
  shapes = jax.eval_shape(lambda: params)
  tx, _ = optim.make_optimizer(_config(schedule=dict(decay_type="cosine", warmup_steps=2)),
                               shapes)
  state_shapes = jax.eval_shape(tx.init, shapes)
  state = jax.jit(tx.init)(params)
  assert jax.tree.structure(state_shapes) == jax.tree.structure(state)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  updates, state = step(_grads(0), state, params)
  np.testing.assert_array_equal(updates["enc"]["kernel"], np.zeros((3, 4)))  # sched(0) = 0.
  updates, state = step(_grads(1), state, params)
  assert np.abs(updates["enc"]["kernel"]).min() > 0


# -------------------------------------------------------------------------- losses


def _logits_for(losses_and_labels):
  """V=3 logits whose token loss is known: [0, 0, 0] -> ln 3; [ln 3, 0, 0] label 0 -> ln(5/3)."""
  return np.array(losses_and_labels, np.float32)


def test_per_example_and_per_token_hand_computed():
  ln3 = math.log(3.0)
  l_uniform = ln3  # logits [0, 0, 0]
  l_high = math.log(5.0 / 3.0)  # logits [ln 3, 0, 0], label 0: -log(3 / 5).
  l_low = math.log(5.0)  # logits [ln 3, 0, 0], label 1: -log(1 / 5).
  logits = np.zeros((3, 3, 3), np.float32)
  labels = np.zeros((3, 3), np.int32)
  logits[0, 1, 0] = ln3
  logits[1, 0, 0] = ln3
  labels[1, 0] = 1
  logits[0, 2, 0] = 50.0  # Masked out: must not count.
  mask = np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]], np.int32)
  per_token = (l_uniform + l_high + l_low + l_uniform + l_uniform) / 5
  per_example = ((l_uniform + l_high) / 2 + (l_low + 2 * l_uniform) / 3 + 0.0) / 3
  got = optim.softmax_xent(logits, labels, mask, reduction="per_token")
  np.testing.assert_allclose(float(got), per_token, rtol=1e-6)
  got = optim.softmax_xent(logits, labels, mask, reduction="per_example")
  np.testing.assert_allclose(float(got), per_example, rtol=1e-6)
  total, count = optim.xent_sum_and_count(logits, labels, mask, reduction="per_token")
  assert float(count) == 5.0 and math.isclose(float(total), per_token * 5, rel_tol=1e-6)


def test_label_smoothing_hand_computed():
  logits = np.array([[[1.0, 2.0, 3.0, 4.0]]], np.float32)
  logp = logits[0, 0] - np.log(np.sum(np.exp(logits[0, 0])))
  targets = np.array([0.1 / 3, 0.1 / 3, 0.9, 0.1 / 3])  # label 2, ls = 0.1.
  expected = -np.sum(targets * logp)
  got = optim.softmax_xent(logits, np.array([[2]]), np.array([[1]]), label_smoothing=0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-6)
  got_bf16 = optim.softmax_xent(jnp.asarray(logits, jnp.bfloat16), np.array([[2]]),
                                np.array([[1]]), label_smoothing=0.1)
  assert got_bf16.dtype == jnp.float32


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["per_token", "per_example"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_xent_gradient_equals_autodiff_of_log_softmax(label_smoothing, reduction, dtype):
  """xent's custom gradient (one fused softmax - target pass) == autodiff of the formula."""
  rng = np.random.RandomState(0)
  logits = jnp.asarray(rng.randn(3, 4, 11) * 3, dtype)
  labels = jnp.asarray(rng.randint(0, 11, (3, 4)), jnp.int32)
  mask = jnp.asarray(rng.rand(3, 4) < 0.7, jnp.int32)

  def reference(z):
    logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
    target = jax.nn.one_hot(labels, 11) * (1 - label_smoothing) + (
        1 - jax.nn.one_hot(labels, 11)) * label_smoothing / 10
    tok = -jnp.sum(target * logp, axis=-1) * mask
    if reduction == "per_token":
      return jnp.sum(tok) / jnp.sum(mask)
    return jnp.mean(jnp.sum(tok, -1) / jnp.maximum(jnp.sum(mask, -1), 1))

  got_loss, got = jax.value_and_grad(lambda z: optim.softmax_xent(
      z, labels, mask, label_smoothing=label_smoothing, reduction=reduction))(logits)
  want_loss, want = jax.value_and_grad(reference)(logits)
  assert got.dtype == dtype
  tol = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=tol, atol=tol)
  # Masked tokens get no gradient.
  assert not np.any(np.float32(got)[np.asarray(mask) == 0])


@pytest.mark.parametrize("args,kw,match", [
    (((2, 3, 5), (2, 4), (2, 4)), {}, "must be labels"),
    (((2, 3, 5), (2, 3), (2, 3)), {"reduction": "mean"}, "reduction must be"),
    (((2, 3, 5), (2, 3), (2, 3)), {"label_smoothing": 1.0}, "label_smoothing must lie"),
])
def test_xent_errors(args, kw, match):
  logits, labels, mask = (np.zeros(s) for s in args)
  with pytest.raises(ValueError, match=match):
    optim.softmax_xent(logits, labels.astype(np.int32), mask, **kw)


@pytest.mark.parametrize("reduction", ["per_token", "per_example"])
def test_grad_accumulation_equals_big_batch(reduction):
  rng = np.random.RandomState(0)
  params = {"w": jnp.asarray(rng.randn(6, 7), jnp.float32), "b": jnp.zeros(7)}
  batch = {"x": rng.randn(8, 5, 6).astype(np.float32),
           "labels": rng.randint(0, 7, (8, 5)).astype(np.int32),
           "mask": (rng.rand(8, 5) < 0.5).astype(np.int32)}  # Uneven token counts.
  batch["mask"][3] = 0

  def loss_fn(p, b):
    logits = jnp.einsum("btd,dv->btv", b["x"], p["w"]) + p["b"][None, None]
    return optim.xent_sum_and_count(logits, b["labels"], b["mask"], reduction=reduction)

  tx, _ = optim.make_optimizer(_config(optax_name="sgd", lr=0.5), params)
  results = []
  for k in (1, 4):
    loss, grads = jax.jit(lambda p, b, k=k: optim.accumulate_gradients(loss_fn, p, b, k))(
        params, batch)
    updates, _ = tx.update(grads, tx.init(params), params)
    results.append((loss, grads, optax.apply_updates(params, updates)))
  (l1, g1, p1), (l4, g4, p4) = results
  expected = optim.softmax_xent(
      jnp.einsum("btd,dv->btv", batch["x"], params["w"]), batch["labels"], batch["mask"],
      reduction=reduction)
  np.testing.assert_allclose(l1, expected, rtol=1e-6)
  np.testing.assert_allclose(l4, l1, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves((g4, p4)), jax.tree.leaves((g1, p1))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="not divisible by grad_accum_steps 3"):
    optim.accumulate_gradients(loss_fn, params, batch, 3)


def test_remat_policy_names(capsys):
  cp = jax.checkpoint_policies
  assert remat_policy("none") is None
  assert remat_policy("full") is cp.nothing_saveable
  assert remat_policy("dots_saveable") is cp.dots_saveable
  assert remat_policy("nothing_saveable") is cp.nothing_saveable
  def f(x):
    h = checkpoint_name(jnp.sin(x), "h")
    return jnp.sum(jnp.cos(h))

  x = jnp.arange(3.0)
  for name, saves_h in (("save_only_these_names:h", True), ("full", False)):
    print_saved_residuals(jax.checkpoint(f, policy=remat_policy(name)), x)
    assert ("named 'h'" in capsys.readouterr().out) == saves_h, name
    g = jax.grad(jax.checkpoint(f, policy=remat_policy(name)))(x)
    np.testing.assert_allclose(g, -np.sin(np.sin(np.arange(3.0))) * np.cos(np.arange(3.0)),
                               rtol=1e-6)
  for bad in ("dots", "save_from_both_policies", "dots_saveable:x"):
    with pytest.raises(ValueError, match="remat_policy .* is unknown"):
      remat_policy(bad)
