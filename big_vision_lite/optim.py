"""Optimizer from a big_vision-style config, losses and train-step numerics.

`make_optimizer(config, params)` reads these config keys (big_vision names):

  optax_name      direction of the update: "sgd" (optax kwarg momentum: heavy
                  ball), "adam" / "adamw" / "scale_by_adam", "lion", "adafactor"
                  (optax's, without its lr), "big_vision.scale_by_adafactor",
                  "big_vision.momentum_hp", "big_vision.sgd", or any optax
                  "scale_by_*". The learning rate and weight decay never come
                  from here: "adamw" is adam + `wd` below.
  optax           kwargs of that transformation, e.g. {"b2": 0.95}.
  lr              peak learning rate.
  schedule        a dict {decay_type: cosine|linear|rsqrt|constant|stair,
                  warmup_steps | warmup_percent, cooldown_steps | cooldown_percent,
                  mult (peak multiplier, 1.0), end + power (linear), timescale +
                  shift (rsqrt), steps + mults (stair)}, or a list of (regex,
                  dict | None) pairs; first match wins, None freezes the params,
                  every param must be matched.
  wd              decoupled weight decay. big_vision's semantics, kept here: the
                  update is `-sched(t) * (lr * lr_mult * direction + wd * wd_mult *
                  param)`, so wd is *not* multiplied by lr, only by the relative
                  schedule sched(t) (peak 1): wd=1e-4 decays 1e-4 of the weight per
                  step at the peak. (optax.adamw uses lr * wd instead.)
  wd_mults        [(regex, mult)], first match wins, unmatched params are not
                  decayed; required when wd != 0 (big_vision defaulted to kernels).
  lr_mults        [(regex, mult > 0)], first match wins, unmatched: 1.0.
  grad_clip_norm  clip the global norm of the trainable params' gradients; 0/None = off.
  total_steps     unless passed as `make_optimizer(..., total_steps=...)`.

The schedule counts optimizer updates from 0: the first update uses sched(0)
(0 with a warmup, as in big_vision). Frozen params get a zero update and no
optimizer state. Gradient accumulation (config.grad_accum_steps) is done by the
train step with `accumulate_gradients`, before `tx.update`, so the schedule and
the optimizer see one update per step.
"""
from collections.abc import Callable, Mapping, Sequence
import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Documented defaults of the optional keys (the required ones: optax_name, lr, schedule).
DEFAULTS = dict(optax={}, wd=0.0, wd_mults=None, lr_mults=None, grad_clip_norm=None)

_SCHEDULE_KEYS = {
    "common": {"decay_type", "mult", "warmup_steps", "warmup_percent", "cooldown_steps",
               "cooldown_percent"},
    "cosine": set(), "constant": set(), "linear": {"end", "linear_end", "power"},
    "rsqrt": {"timescale", "shift"}, "stair": {"steps", "mults"},
}


def _names(tree: Any) -> Any:
  return jax.tree_util.tree_map_with_path(
      lambda p, _: jax.tree_util.keystr(p, simple=True, separator="/"), tree)


def _as_dict(x: Any) -> dict:
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def _first_match(rules: Sequence[tuple[str, Any]], what: str) -> Callable[[str], int | None]:
  """Returns name -> index of the first (regex, value) rule that fullmatches it."""
  try:
    compiled = [re.compile(pattern) for pattern, _ in rules]
  except (TypeError, ValueError, re.error) as e:
    raise ValueError(f"{what} must be a list of (regex, value) pairs, got {rules!r}: {e}") from e
  return lambda name: next((i for i, p in enumerate(compiled) if p.fullmatch(name)), None)


# ------------------------------------------------------------------------ schedule


def _duration(kw: Mapping[str, Any], prefix: str, total_steps: int) -> int:
  if f"{prefix}_steps" in kw and f"{prefix}_percent" in kw:
    raise ValueError(f"schedule: give {prefix}_steps or {prefix}_percent, not both")
  if f"{prefix}_percent" in kw:
    pct = kw[f"{prefix}_percent"]
    if not 0.0 <= pct <= 1.0:
      raise ValueError(f"schedule: {prefix}_percent must lie in [0, 1], got {pct}")
    return max(1, round(pct * total_steps)) if pct else 0  # big_vision's rounding.
  return int(kw.get(f"{prefix}_steps", 0))


def make_schedule(total_steps: int, **kw: Any) -> Callable[[Any], jax.Array]:
  """Relative lr schedule (big_vision's create_learning_rate_schedule).

  progress = clip((step - warmup) / (total_steps - warmup), 0, 1), then
  cosine: mult * (1 + cos(pi * progress)) / 2; linear: end + (mult - end) *
  (1 - progress)**power; rsqrt: mult / sqrt(1 + (step + shift - warmup) /
  timescale) (mult / sqrt(1 + shift / timescale) during warmup); constant: mult;
  stair: mult * mults[i] after steps[i]. The result is multiplied by
  min(1, step / warmup) and min(1, (total_steps - step) / cooldown).
  Returns step -> float32[] (multiplies config.lr).
  """
  kw = _as_dict(kw)
  decay_type = kw.get("decay_type")
  if decay_type not in _SCHEDULE_KEYS or decay_type == "common":
    raise ValueError(f"schedule {kw}: decay_type must be one of cosine, linear, rsqrt, "
                     f"constant, stair; got {decay_type!r}")
  unknown = set(kw) - _SCHEDULE_KEYS["common"] - _SCHEDULE_KEYS[decay_type]
  if unknown:
    raise ValueError(f"schedule {kw}: unknown keys {sorted(unknown)} for decay_type "
                     f"{decay_type!r} (allowed: {sorted(_SCHEDULE_KEYS[decay_type])} and "
                     f"{sorted(_SCHEDULE_KEYS['common'])})")
  warmup = _duration(kw, "warmup", total_steps)
  cooldown = _duration(kw, "cooldown", total_steps)
  if total_steps > 1 and warmup >= total_steps:
    raise ValueError(f"schedule {kw}: warmup ({warmup} steps) >= total_steps ({total_steps})")
  mult = float(kw.get("mult", 1.0))
  end = float(kw.get("end", kw.get("linear_end", 0.0)))
  power = float(kw.get("power", 1.0))
  timescale, shift = float(kw.get("timescale", 10_000)), float(kw.get("shift", 0))
  stair_steps = jnp.asarray(kw.get("steps", []), jnp.float32)
  stair_mults = jnp.asarray([1.0, *kw.get("mults", [])], jnp.float32)
  if stair_steps.shape[0] + 1 != stair_mults.shape[0]:
    raise ValueError(f"schedule {kw}: stair needs as many mults as steps")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    if decay_type == "cosine":
      lr = mult * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay_type == "linear":
      lr = end + (mult - end) * (1.0 - progress) ** power
    elif decay_type == "rsqrt":
      lr = jnp.where(step >= warmup, mult / jnp.sqrt(1.0 + (step + shift - warmup) / timescale),
                     mult / jnp.sqrt(1.0 + shift / timescale))
    elif decay_type == "stair":
      lr = mult * stair_mults[jnp.searchsorted(stair_steps, step + 1)]
    else:
      lr = jnp.full_like(step, mult)
    if warmup:
      lr = lr * jnp.minimum(1.0, step / warmup)
    if cooldown:
      lr = lr * jnp.minimum(1.0, (total_steps - step) / cooldown)
    return jnp.asarray(lr, jnp.float32)

  return schedule


# ----------------------------------------------------------------------- direction


def _sgd(momentum: float | None = None, nesterov: bool = False,
         accumulator_dtype: Any = None) -> optax.GradientTransformation:
  if not momentum:
    return optax.identity()
  return optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)


def _adafactor(**kw: Any) -> optax.GradientTransformation:
  # optax.adafactor ends with scale(-1): flip back, the sign comes at the end of our chain.
  return optax.chain(optax.adafactor(learning_rate=None, **kw), optax.scale(-1.0))


def _bv_adafactor(min_dim_size_to_factor: int = 32, decay_rate: float = 0.8,
                  decay_offset: int = 0, beta2_cap: float = 0.999,
                  clipping_threshold: float | None = None, momentum: float | None = 0.9,
                  dtype_momentum: Any = "bfloat16", eps: float = 1e-30):
  """big_vision's Adafactor: factored second moments with a capped beta2, bf16 momentum."""
  def decay_rate_fn(step, exponent):
    return jnp.minimum(beta2_cap, 1.0 - (jnp.asarray(step, jnp.float32) + 1.0) ** (-exponent))
  return optax.chain(
      optax.scale_by_factored_rms(factored=True, decay_rate=decay_rate, step_offset=decay_offset,
                                  min_dim_size_to_factor=min_dim_size_to_factor, epsilon=eps,
                                  decay_rate_fn=decay_rate_fn),
      optax.clip_by_block_rms(clipping_threshold) if clipping_threshold else optax.identity(),
      optax.ema(momentum, debias=False, accumulator_dtype=jnp.dtype(dtype_momentum))
      if momentum else optax.identity())


def _momentum_hp(momentum: float = 0.9, dtype: Any = "bfloat16", nesterov: bool = False):
  return optax.trace(decay=momentum, accumulator_dtype=jnp.dtype(dtype), nesterov=nesterov)


_DIRECTIONS = {
    "sgd": _sgd, "big_vision.sgd": _sgd, "adam": optax.scale_by_adam,
    "adamw": optax.scale_by_adam, "lion": optax.scale_by_lion, "adafactor": _adafactor,
    "big_vision.scale_by_adafactor": _bv_adafactor, "big_vision.momentum_hp": _momentum_hp,
}


def make_direction(name: str, kw: Mapping[str, Any]) -> optax.GradientTransformation:
  """The lr-free optimizer transformation named by config.optax_name."""
  factory = _DIRECTIONS.get(name)
  if factory is None and name.startswith("scale_by_"):
    factory = getattr(optax, name, None)
  if factory is None:
    raise ValueError(f"config.optax_name={name!r} is unknown; use one of {sorted(_DIRECTIONS)} "
                     "or an optax scale_by_* name")
  bad = {"learning_rate", "weight_decay", "weight_decay_rate"} & set(kw)
  if bad:
    raise ValueError(f"config.optax has {sorted(bad)}: use config.lr / config.wd instead")
  try:
    return factory(**kw)
  except TypeError as e:
    raise ValueError(f"config.optax={dict(kw)} does not fit optimizer {name!r}: {e}") from e


# ------------------------------------------------------------------------ optimizer


class ScheduleState(NamedTuple):
  count: jax.Array  # int32[]: optimizer updates applied so far.


def _lr_wd_schedule(lr: Any, wd: Any, group: Any, fns: Sequence[Callable]):
  """update -> -sched_g(count) * (lr * update + wd * param), per leaf (trees of floats/ints)."""
  def init_fn(params):
    del params
    return ScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("this optimizer needs params in tx.update(grads, state, params)")
    scales = [fn(state.count) for fn in fns]
    def one(u, p, lr_, wd_, g):
      step = lr_ * u + wd_ * p if wd_ else lr_ * u
      return (-scales[g] * step).astype(u.dtype)
    updates = jax.tree.map(one, updates, params, lr, wd, group)
    return updates, ScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _schedule_rules(schedule: Any, flat_names: Sequence[str]
                    ) -> tuple[list[tuple[str, Any]], Callable[[str], int]]:
  """config.schedule -> (rules [(regex, dict | None)], name -> index of its rule); every
  param name must match a rule."""
  if isinstance(schedule, (list, tuple)):
    rules = [tuple(r) for r in schedule]
  else:
    rules = [(".*", schedule)]
  which = _first_match(rules, "config.schedule")
  uncovered = [n for n in flat_names if which(n) is None]
  if uncovered:
    raise ValueError(f"config.schedule matches no rule for params {uncovered}: every param "
                     "needs a schedule (use None to freeze)")
  return rules, which


def frozen_mask(config: Any, params: Any) -> Any:
  """Pytree of bool like `params`: True where config.schedule freezes the param (None).

  The train step drops those gradients (make_train_step's `frozen`), so XLA never computes
  them; the optimizer of `make_optimizer` gives them a zero update either way.
  """
  if "schedule" not in config:
    raise ValueError("optimizer config is missing the key 'schedule'")
  names = _names(params)
  rules, which = _schedule_rules(config["schedule"], jax.tree.leaves(names))
  return jax.tree.map(lambda n: rules[which(n)][1] is None, names)


def make_optimizer(config: Any, params: Any, *, total_steps: int | None = None
                   ) -> tuple[optax.GradientTransformation, dict[str, Callable]]:
  """Builds the optax transformation described in the module docstring.

  Args:
    config: ConfigDict or dict with the keys above (other keys are ignored: this
      is usually the whole run config).
    params: pytree of arrays or jax.ShapeDtypeStruct (names only are used).
    total_steps: length of the run; default config.total_steps.
  Returns:
    (tx, lr_fns): lr_fns maps "lr" (single schedule) or "lr/<regex>" to a function
    step -> float32[] learning rate (config.lr * schedule) for logging.
  """
  def get(key):
    if key in DEFAULTS:
      return config.get(key, DEFAULTS[key]) or DEFAULTS[key]
    if key not in config:
      raise ValueError(f"optimizer config is missing the key {key!r}")
    return config[key]

  if total_steps is None:
    total_steps = get("total_steps")
  lr, wd = float(get("lr")), float(get("wd"))
  names = _names(params)
  flat_names = jax.tree.leaves(names)

  schedule = get("schedule")
  single = not isinstance(schedule, (list, tuple))
  rules, which = _schedule_rules(schedule, flat_names)
  active = [i for i, (_, s) in enumerate(rules) if s is not None]
  fns = [make_schedule(total_steps, **_as_dict(rules[i][1])) for i in active]
  frozen = jax.tree.map(lambda n: rules[which(n)][1] is None, names)
  group = jax.tree.map(lambda n: active.index(which(n)) if rules[which(n)][1] is not None
                       else 0, names)

  def per_leaf(key, default, check=None):
    table = get(key)
    if not table:
      return jax.tree.map(lambda _: default, names)
    table = [tuple(r) for r in table]
    match = _first_match(table, f"config.{key}")  # Also checks that entries are pairs.
    for pattern, mult in table:
      if check:
        check(pattern, mult)
    return jax.tree.map(lambda n: default if match(n) is None else float(table[match(n)][1]),
                        names)

  def positive(pattern, mult):
    if not mult > 0:
      raise ValueError(f"config.lr_mults ({pattern!r}, {mult}): mults must be > 0; freeze "
                       "params with a None schedule instead")
  lr_tree = jax.tree.map(lambda m: lr * m, per_leaf("lr_mults", 1.0, positive))
  if wd and not get("wd_mults"):
    raise ValueError("config.wd is set but config.wd_mults is not: say which params decay, "
                     "e.g. [('.*', 1.0)] or [('.*/(kernel|w|.*_einsum|linear)$', 1.0)]")
  wd_tree = jax.tree.map(lambda m: wd * m, per_leaf("wd_mults", 0.0)) if wd else (
      jax.tree.map(lambda _: 0.0, names))

  # Inside multi_transform the frozen leaves are optax.MaskedNode (no leaves);
  # give the per-leaf constant trees the same structure.
  mask = lambda t: jax.tree.map(lambda f, x: optax.MaskedNode() if f else x, frozen, t)
  clip = get("grad_clip_norm")
  trainable = optax.chain(
      optax.clip_by_global_norm(float(clip)) if clip else optax.identity(),
      make_direction(get("optax_name"), _as_dict(get("optax"))),
      _lr_wd_schedule(mask(lr_tree), mask(wd_tree), mask(group), fns))
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
  tx = optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)

  lr_fns = {}
  for i, fn in zip(active, fns):
    lr_fns["lr" if single else f"lr/{rules[i][0]}"] = lambda s, fn=fn: lr * fn(s)
  return tx, lr_fns


def optimizer_step(opt_state: Any) -> jax.Array:
  """int32[]: number of updates applied, read from the state of `make_optimizer`'s tx."""
  counts = [s.count for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ScheduleState)) if isinstance(s, ScheduleState)]
  if len(counts) != 1:
    raise ValueError(f"expected one ScheduleState in the optimizer state, found {len(counts)}")
  return counts[0]


# -------------------------------------------------------------------------- losses


def xent_sum_and_count(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                       label_smoothing: float = 0.0, reduction: str = "per_example"
                       ) -> tuple[jax.Array, jax.Array]:
  """(numerator, denominator) of `softmax_xent`; sums of these over micro-batches
  give the loss of the whole batch (see `accumulate_gradients`).

  Args:
    logits: float[B, T, V] (any float dtype; computed in float32).
    labels: int[B, T] target ids.
    mask: int/bool/float[B, T], 1 where the token counts (e.g. mask_loss).
    label_smoothing: ls; targets are 1 - ls on the label and ls / (V - 1)
      elsewhere (big_vision's convention).
    reduction: "per_example": sum over examples of (token loss sum / max(number
      of loss tokens, 1)), denominator B (examples without loss tokens add 0 but
      count, as in big_vision's PaliGemma trainer); "per_token": sum of token
      losses, denominator the number of loss tokens.
  Returns:
    float32[] numerator, float32[] denominator.
  """
  if logits.shape[:-1] != labels.shape or labels.shape != mask.shape or labels.ndim < 1:
    raise ValueError(f"softmax_xent: logits {logits.shape} must be labels {labels.shape} + [V] "
                     f"and mask {mask.shape} must equal labels")
  if reduction not in ("per_example", "per_token"):
    raise ValueError(f"reduction must be 'per_example' or 'per_token', got {reduction!r}")
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
  loss = _token_xent(logits, labels.astype(jnp.int32), float(label_smoothing))
  mask = mask.astype(jnp.float32)
  tok = (loss * mask).reshape(loss.shape[0], -1)
  mask = mask.reshape(loss.shape[0], -1)
  if reduction == "per_token":
    return jnp.sum(tok), jnp.sum(mask)
  per_example = jnp.sum(tok, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  return jnp.sum(per_example), jnp.asarray(loss.shape[0], jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_xent(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """float32[...] cross-entropy of each token: sum_v target_v * -log_softmax(logits)_v.

  A custom gradient because V is 257k for Gemma: autodiff of log_softmax + take_along_axis
  writes log-probs, exp, a zero [.., V] array and a scatter into it (each a pass over
  the f32 logits); here the forward reads the logits for a logsumexp and the backward
  writes d logits in one fused pass (softmax - target), with the one-hot an iota compare.
  """
  return _token_xent_fwd(logits, labels, label_smoothing)[0]


def _token_xent_fwd(logits, labels, label_smoothing):
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  loss = lse - jnp.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    # sum_v target_v * -logp_v without a [B, T, V] one-hot; sum_v logp_v = sum_v z_v - V lse.
    v = logits.shape[-1]
    off = label_smoothing / (v - 1)
    loss = (1.0 - label_smoothing - off) * loss - off * (jnp.sum(z, axis=-1) - v * lse)
  return loss, (logits, labels, lse)


def _token_xent_bwd(label_smoothing, res, g):
  logits, labels, lse = res
  v = logits.shape[-1]
  off = label_smoothing / (v - 1) if label_smoothing else 0.0
  hit = 1.0 - label_smoothing - off
  # d loss / d z_v = (hit + off * V) * p_v - hit * [v == label] - off.
  p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
  onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == labels[..., None]
  d = (hit + off * v) * p - jnp.where(onehot, hit, 0.0) - off
  return (d * g[..., None]).astype(logits.dtype), None


_token_xent.defvjp(_token_xent_fwd, _token_xent_bwd)


def softmax_xent(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                 label_smoothing: float = 0.0, reduction: str = "per_example") -> jax.Array:
  """float32[] masked cross-entropy; see `xent_sum_and_count` for the arguments."""
  total, count = xent_sum_and_count(logits, labels, mask, label_smoothing=label_smoothing,
                                    reduction=reduction)
  return total / jnp.maximum(count, 1.0)


def accumulate_gradients(loss_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array]],
                         params: Any, batch: Any, accum_steps: int, *,
                         micro_batch_sharding: jax.sharding.Sharding | None = None
                         ) -> tuple[jax.Array, Any]:
  """Loss and gradient of a batch computed in `accum_steps` sequential micro-batches.

  Args:
    loss_fn: (params, batch) -> (loss numerator, denominator), e.g. from
      `xent_sum_and_count`; the loss is sum(numerators) / sum(denominators), so
      the result equals the one-batch result for either reduction.
    params: pytree; gradients have its structure and dtypes.
    batch: pytree of arrays [B, ...], B divisible by accum_steps.
    accum_steps: 1 = no accumulation.
    micro_batch_sharding: optional sharding of each micro-batch [B / k, ...]
      (e.g. `sharding.batch_sharding(mesh)`).
  Returns:
    (float32[] loss, grads).
  """
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps < 1:
    raise ValueError(f"grad_accum_steps must be >= 1, got {accum_steps}")
  if accum_steps == 1:
    (total, count), grads = vg(params, batch)
  else:
    def split(x):
      if x.shape[0] % accum_steps:
        raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum_steps "
                         f"{accum_steps}")
      # Strided micro-batches (rows i, i+k, ...): every data shard holds rows of
      # every micro-batch, so no micro-batch lives on a few devices only.
      return x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)

    def body(carry, micro):
      if micro_batch_sharding is not None:
        micro = jax.lax.with_sharding_constraint(micro, micro_batch_sharding)
      (t, c), g = vg(params, micro)
      total, count, grads = carry
      return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32), zeros)
    (total, count, grads), _ = jax.lax.scan(body, init, jax.tree.map(split, batch))
  count = jnp.maximum(count, 1.0)
  return total / count, jax.tree.map(lambda g: (g / count).astype(g.dtype), grads)
