"""The PaliGemma train step: teacher-forced loss, gradients, optimizer update, metrics.

Shared by train.py (which jits it with explicit shardings and donated state) and the
memory planner (which AOT-compiles it for a mesh of fake devices).

Batches follow the input pipeline's train layout: `text` int32[B,T+1] with `mask_ar`,
`mask_loss`, `mask_input` of the same shape; the model reads text[:, :-1] and predicts
text[:, 1:] where mask_loss[:, 1:] is 1.

State: {"params": base params, "opt": optimizer state} and, with LoRA, {"lora": adapters}:
the optimizer then updates the adapters only and the base params stay frozen.
"""
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from big_vision_lite import lora as lora_lib
from big_vision_lite import optim

TrainState = dict[str, Any]
BATCH_KEYS = ("image", "text", "mask_ar", "mask_loss", "mask_input")


def model_inputs(batch: Mapping[str, jax.Array]) -> tuple:
  """(image, text, mask_ar, input_mask) of the model's teacher-forced forward."""
  return (batch["image"], batch["text"][:, :-1], batch["mask_ar"][:, :-1],
          batch["mask_input"][:, :-1].astype(bool))


def make_loss_fn(model, *, label_smoothing: float, reduction: str, lora: Mapping | None = None,
                 base_params: Any = None) -> Callable:
  """(trainable, batch) -> (loss numerator, denominator) for optim.accumulate_gradients.

  `trainable` is the params, or the LoRA adapters applied on top of `base_params`.
  batch["rng"] holds one dropout key per example; the first one of a (micro-)batch is used.
  """
  def loss_fn(trainable, batch):
    params = trainable
    if lora:
      params = lora_lib.apply_lora(base_params, trainable, lora["alpha"], lora["rank"])
    logits, _ = model.apply({"params": params}, *model_inputs(batch), train=True,
                            rngs={"dropout": batch["rng"][0]})
    return optim.xent_sum_and_count(logits, batch["text"][:, 1:], batch["mask_loss"][:, 1:],
                                    label_smoothing=label_smoothing, reduction=reduction)
  return loss_fn


def make_train_step(model, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0,
                    reduction: str = "per_example", grad_accum_steps: int = 1,
                    lora: Mapping | None = None, micro_batch_sharding=None,
                    lr_fn: Callable | None = None, frozen: Any = None) -> Callable:
  """Returns step(state, batch, rng) -> (state, metrics); jit it with shardings.

  With `micro_batch_sharding` (a NamedSharding of the batch), the model's activations are
  constrained to the same batch split (the "act_batch" logical axis). `frozen`
  (optim.frozen_mask of the optimized tree: the params, or the LoRA adapters) marks leaves
  that never change: their gradients are never computed (XLA drops the backward pass that
  only they need), the grad_norm metric leaves them out and their values pass through.
  """
  args = (model, tx, label_smoothing, reduction, grad_accum_steps, lora)
  if micro_batch_sharding is None:
    return _step_fn(*args, None, lr_fn, frozen)
  inner = _step_fn(*args, micro_batch_sharding, lr_fn, frozen)
  rules = [("act_batch", micro_batch_sharding.spec[0])]
  mesh = micro_batch_sharding.mesh
  abstract_mesh = getattr(mesh, "abstract_mesh", mesh)

  def step(state, batch, rng):
    with jax.sharding.use_abstract_mesh(abstract_mesh), nn.logical_axis_rules(rules):
      return inner(state, batch, rng)
  return step


def _step_fn(model, tx, label_smoothing, reduction, grad_accum_steps, lora, micro_batch_sharding,
             lr_fn, frozen):
  def step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    batch = {k: batch[k] for k in BATCH_KEYS}
    batch["rng"] = jax.random.split(rng, batch["text"].shape[0])
    key = "lora" if lora else "params"
    loss_fn = make_loss_fn(model, label_smoothing=label_smoothing, reduction=reduction,
                           lora=lora, base_params=state["params"])
    loss, grads = optim.accumulate_gradients(loss_fn, state[key], batch, grad_accum_steps,
                                             micro_batch_sharding=micro_batch_sharding)
    if frozen is not None:  # Zeros that depend on nothing: the backward pass behind is dead.
      grads = jax.tree.map(lambda f, g: jnp.zeros_like(g) if f else g, frozen, grads)
    updates, opt = tx.update(grads, state["opt"], state[key])
    new_params = optax.apply_updates(state[key], updates)
    if frozen is not None:  # Not even a pass of p + 0 over frozen weights.
      new_params = jax.tree.map(lambda f, old, new: old if f else new, frozen, state[key],
                                new_params)
    new_state = {**state, key: new_params, "opt": opt}
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "update_norm": optax.tree.norm(updates),
               "tokens": jnp.sum(batch["mask_input"])}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(optim.optimizer_step(state["opt"]))
    return new_state, metrics

  return step


def init_state(params: Any, tx: optax.GradientTransformation, *, lora: Mapping | None = None,
               rng: jax.Array | None = None) -> TrainState:
  """The initial train state (jit it with out_shardings to create it sharded)."""
  if lora:
    adapters = lora_lib.init_lora(rng, params, rank=lora["rank"], targets=lora["targets"])
    return {"params": params, "lora": adapters, "opt": tx.init(adapters)}
  return {"params": params, "opt": tx.init(params)}
