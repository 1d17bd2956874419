"""The pieces of train.py's phases, so that the loop itself reads top to bottom.

Everything here takes the run config explicitly; nothing reads a default that the config
does not hold (configs/common.py lists every key).
"""
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from big_vision_lite import optim
from big_vision_lite import sharding
from big_vision_lite import train_step as ts
from big_vision_lite.models import paligemma

# Every top-level key a run config may have (configs/common.py sets them all).
CONFIG_KEYS = frozenset({
    "seed", "total_steps", "total_epochs", "log_steps", "ckpt_steps", "eval_steps",
    "keep_ckpts", "keep_ckpt_every", "input", "tokenizer", "vqvae", "model", "model_init",
    "model_load", "mesh", "sharding_rules", "optax_name", "optax", "lr", "wd", "wd_mults",
    "lr_mults", "schedule", "grad_clip_norm", "grad_accum_steps", "label_smoothing",
    "loss_reduction", "lora", "evals", "render_predictions", "final_baseline", "name",
})
_RULE_TABLES = {"fsdp": sharding.FSDP_RULES, "fsdp_tensor": sharding.FSDP_TENSOR_RULES,
                "replicate": sharding.REPLICATE_RULES}


def check_config(config) -> None:
  """Unknown top-level keys are errors (a typo must never be silently ignored)."""
  unknown = sorted(set(config.keys()) - CONFIG_KEYS)
  if unknown:
    raise ValueError(f"config: unknown key(s) {unknown}; known: {sorted(CONFIG_KEYS)}")
  missing = sorted(k for k in CONFIG_KEYS - {"total_epochs", "name"} if k not in config)
  if missing:
    raise ValueError(f"config: missing key(s) {missing} (configs/common.py sets them all)")
  if (config.total_steps is None) == (config.get("total_epochs") is None):
    raise ValueError("config: set exactly one of total_steps and total_epochs")
  for key in ("log_steps", "ckpt_steps", "eval_steps"):
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]!r}: expected a positive int")


def make_tokenizer(config, workdir: str):
  from big_vision_lite import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  if config.tokenizer == "demo":
    from big_vision_lite.data import demo  # pylint: disable=g-import-not-at-top
    return demo.demo_tokenizer(workdir)
  if not os.path.isfile(config.tokenizer):
    raise FileNotFoundError(f"config.tokenizer={config.tokenizer!r}: no such SentencePiece "
                            "model file (or 'demo' for the demo tokenizer)")
  return tok_lib.Tokenizer(config.tokenizer)


def model_config(config, tokenizer) -> dict:
  cfg = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  resolved = paligemma.resolve_config(cfg)
  if resolved["llm"]["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.llm.vocab_size={resolved['llm']['vocab_size']} is smaller "
                     f"than the tokenizer's {tokenizer.vocab_size} ids")
  return cfg


def make_model(model_config: Mapping) -> paligemma.Model:
  return paligemma.Model(**model_config)


def _dummy_inputs(model_config: Mapping, batch: int = 1, text_len: int = 8):
  size = paligemma.resolve_config(model_config)["img"]["image_size"]
  text = jnp.zeros((batch, text_len), jnp.int32)
  return jnp.zeros((batch, size, size, 3), jnp.float32), text, text


def abstract_params(model, config) -> Any:
  inputs = _dummy_inputs(dict(config.model))
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), *inputs)["params"]


def make_optimizer(config, abstract_params):
  """(tx, lr_fns, lora settings or None); with LoRA the optimizer sees the adapters only."""
  lora = None
  if config.lora.rank:
    from big_vision_lite import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora = {"rank": int(config.lora.rank), "alpha": float(config.lora.alpha),
            "targets": config.lora.targets or lora_lib.LLM_TARGETS}
    target = jax.eval_shape(lambda p: lora_lib.init_lora(jax.random.PRNGKey(0), p,
                                                         rank=lora["rank"],
                                                         targets=lora["targets"]),
                            abstract_params)
  else:
    target = abstract_params
  tx, lr_fns = optim.make_optimizer(config, target, total_steps=_known_total_steps(config))
  return tx, lr_fns, lora


def _known_total_steps(config) -> int:
  if config.total_steps is None:
    raise ValueError("total_epochs needs the dataset size: not supported for the optimizer's "
                     "schedule yet; set config.total_steps")
  return int(config.total_steps)


def state_shardings(config, abstract_state, mesh):
  rules = config.sharding_rules
  table = _RULE_TABLES[rules] if isinstance(rules, str) and rules in _RULE_TABLES else rules
  if isinstance(table, str):
    raise ValueError(f"config.sharding_rules={rules!r}: expected one of {sorted(_RULE_TABLES)} "
                     "or a list of (regex, rule)")
  return sharding.infer_shardings(abstract_state, [tuple(r) for r in table], mesh)


def abstract_batch(config, model_config) -> dict:
  """Shapes of one global training batch (for the dry run)."""
  b = config.input.batch_size
  size = paligemma.resolve_config(model_config)["img"]["image_size"]
  t = config.input.text_len + 1
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  return {"image": spec((b, size, size, 3), jnp.float32), "text": spec((b, t), jnp.int32),
          "mask_ar": spec((b, t), jnp.int32), "mask_loss": spec((b, t), jnp.int32),
          "mask_input": spec((b, t), jnp.int32)}


# --------------------------------------------------------------- state on disk


def make_run_state(config, workdir):
  from big_vision_lite.run_state import RunState  # pylint: disable=g-import-not-at-top
  return RunState(workdir, keep_last=config.keep_ckpts, keep_every=config.keep_ckpt_every)


def write_run_config(workdir, config, model_config, lora) -> None:
  """workdir/config.json: what `big_vision_lite.load(workdir)` needs to rebuild the model."""
  payload = {"model": model_config, "lora": lora, "tokenizer": config.tokenizer,
             "vqvae": config.vqvae, "config": json.loads(config.to_json_best_effort())}
  tmp = os.path.join(workdir, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=1, default=str)
  os.replace(tmp, os.path.join(workdir, "config.json"))


def restore(run_state, step, abstract_state, shardings):
  targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
  return run_state.restore(step, targets)


def save(run_state, step, state, rng, data_state: bytes) -> None:
  run_state.save(step, state, {"data_state": data_state,
                               "rng": np.asarray(jax.random.key_data(rng)).tolist()})


def rng_from(saved) -> jax.Array:
  return jnp.asarray(saved, jnp.uint32)


def initial_state(config, model, model_config, tx, lora, abstract_state, shardings, rng):
  """Random init (or init from config.model_init), created directly in its shardings."""
  params_rng, lora_rng = jax.random.split(jax.random.fold_in(rng, 1))
  inputs = _dummy_inputs(model_config)
  init_params = lambda r: model.init(r, *inputs)["params"]
  params = jax.jit(init_params, out_shardings=shardings["params"])(params_rng)
  if config.model_init:
    from big_vision_lite import model_init  # pylint: disable=g-import-not-at-top
    load_cfg = config.model_load.to_dict() if hasattr(config.model_load, "to_dict") else dict(
        config.model_load)
    params, report = model_init.init_params(model_config, params, model_init=config.model_init,
                                            load=load_cfg, shardings=shardings["params"])
    logging.info("model_init %s:\n%s", config.model_init, report)
  return jax.jit(lambda p, r: ts.init_state(p, tx, lora=lora, rng=r),
                 out_shardings=shardings, donate_argnums=(0,))(params, lora_rng)


def eval_params(state, lora):
  if not lora:
    return state["params"]
  from big_vision_lite import lora as lora_lib  # pylint: disable=g-import-not-at-top
  return lora_lib.apply_lora(state["params"], state["lora"], lora["alpha"], lora["rank"])


class NonFiniteLossError(FloatingPointError):
  pass


def check_finite(metrics, step, run_state) -> None:
  """A NaN/Inf loss stops the run, naming the step and the last good checkpoint."""
  if metrics is None:
    return
  loss = float(jax.device_get(metrics["loss"]))
  if math.isfinite(loss):
    return
  good = run_state.latest_step()
  where = f"step {good} in {run_state.directory}" if good is not None else "none saved yet"
  raise NonFiniteLossError(f"loss is {loss} at step {step}; last good checkpoint: {where}")


# ------------------------------------------------------------------- data


class MaskEncoder:
  """float32[N,64,64,1] masks in [0,1] -> int32[N,16] <seg> codes with a VQ-VAE file.

  Picklable (grain workers rebuild it from the path) and loads the weights on first use.
  """

  def __init__(self, path: str):
    self.path, self._params = path, None

  def __getstate__(self):
    return {"path": self.path, "_params": None}

  def __call__(self, masks: np.ndarray) -> np.ndarray:
    from big_vision_lite.models import vqvae  # pylint: disable=g-import-not-at-top
    if self._params is None:
      _, self._params = vqvae.load(self.path)
    return np.asarray(vqvae.encode(self._params, masks))


def vqvae_path(config) -> str | None:
  if config.vqvae == "demo":
    from big_vision_lite.data import demo  # pylint: disable=g-import-not-at-top
    return demo.DEMO_VQVAE
  return config.vqvae or None


def mask_encoder(config) -> MaskEncoder | None:
  """Masks -> <seg> codes for segmentation targets (None when the config has no VQ-VAE)."""
  path = vqvae_path(config)
  if path is None:
    return None
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.vqvae={config.vqvae!r}: no VQ-VAE file at {path}")
  return MaskEncoder(path)


def make_train_iterator(config, tokenizer, data_sharding, encode_masks):
  from big_vision_lite.data import pipeline  # pylint: disable=g-import-not-at-top
  input_cfg = config.input.to_dict()
  input_cfg.pop("text_len", None)  # Read by the config's pp helpers, not by the pipeline.
  return pipeline.make_train_iterator(input_cfg, tokenizer=tokenizer, seed=config.seed,
                                      data_sharding=data_sharding, encode_masks=encode_masks)


def total_steps(config, train_iter) -> int:
  del train_iter  # total_epochs is rejected in make_optimizer until schedules can use it.
  return int(config.total_steps)


# ------------------------------------------------------------ evaluation


def make_eval_runner(config, tokenizer, model_config, mesh, workdir, encode_masks):
  if not config.evals:
    return None
  from big_vision_lite.eval_runner import EvalRunner  # pylint: disable=g-import-not-at-top
  return EvalRunner(config, tokenizer=tokenizer, model_config=model_config, mesh=mesh,
                    workdir=workdir, encode_masks=encode_masks)


def write_eval_outputs(evals, workdir, step, logger, names) -> None:
  if jax.process_index() != 0:
    return
  out = os.path.join(workdir, "eval", f"step_{step}")
  evals.write_predictions(out, names=names)
  if config_images := evals.rendered(names=names):
    for name, images in config_images.items():
      logger.log_images(step, name, images)


def write_final_metrics(workdir, evals) -> None:
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(evals.final_metrics(), f, indent=1, sort_keys=True)


# --------------------------------------------------------------- logging


def make_logger(config, workdir, total_steps):
  from big_vision_lite.metrics_log import MetricsLogger  # pylint: disable=g-import-not-at-top
  return MetricsLogger(workdir, total_steps=total_steps,
                       is_primary=jax.process_index() == 0)


def step_flops(compiled_step, state, train_iter, model_config, config) -> float | None:
  """Model FLOPs of one train step (analytic count; XLA's when that is unavailable)."""
  from big_vision_lite import flops  # pylint: disable=g-import-not-at-top
  del compiled_step, state, train_iter
  size = paligemma.resolve_config(model_config)["img"]["image_size"]
  return flops.paligemma_train_flops(model_config, config.input.batch_size,
                                     config.input.text_len, size)


class Meter:
  """Throughput, MFU and the input-wait fraction over each logging interval."""

  def __init__(self, *, flops: float | None, num_devices: int, tokens_per_example=None):
    from big_vision_lite import flops as flops_lib  # pylint: disable=g-import-not-at-top
    self._flops, self._devices = flops, num_devices
    self._peak = flops_lib.device_peak_flops()
    self._t0, self._steps, self._examples, self._tokens = time.perf_counter(), 0, 0, 0
    self._wait0 = 0.0

  def step(self, batch) -> None:
    self._steps += 1
    self._examples += batch["text"].shape[0]
    self._tokens += batch["text"].shape[0] * batch["text"].shape[1]

  def pause(self) -> None:
    """Evaluation and checkpointing are not training time: restart the interval."""
    self._t0, self._steps, self._examples, self._tokens = time.perf_counter(), 0, 0, 0

  def summary(self, metrics: Mapping, input_stats: Mapping) -> dict:
    now = time.perf_counter()
    dt = max(now - self._t0, 1e-9)
    out = {k: float(np.asarray(v)) for k, v in metrics.items()}
    if self._steps:
      out["examples_per_s"] = self._examples / dt
      out["tokens_per_s"] = self._tokens / dt
      out["step_time_s"] = dt / self._steps
      if self._flops and self._peak:
        out["mfu"] = self._flops * self._steps / dt / (self._peak * self._devices)
    wait = input_stats.get("wait_s", 0.0)
    out["input_wait_frac"] = min(1.0, (wait - self._wait0) / dt)
    self._wait0 = wait
    out["skipped_examples"] = input_stats.get("skipped", 0)
    out["truncated_examples"] = input_stats.get("truncated", 0)
    self._t0, self._steps, self._examples, self._tokens = now, 0, 0, 0
    return out
