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
    "seed", "total_steps", "log_steps", "ckpt_steps", "eval_steps",
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
  missing = sorted(k for k in CONFIG_KEYS - {"name"} if k not in config)
  if missing:
    raise ValueError(f"config: missing key(s) {missing} (configs/common.py sets them all)")
  if not isinstance(config.total_steps, int) or config.total_steps <= 0:
    raise ValueError(f"config.total_steps={config.total_steps!r}: expected a positive int "
                     "(configs derive it from epochs and the split size)")
  for key in ("log_steps", "ckpt_steps", "eval_steps"):
    if not isinstance(config[key], int) or config[key] <= 0:
      raise ValueError(f"config.{key}={config[key]!r}: expected a positive int")


def make_tokenizer(config, workdir: str):
  """config.tokenizer: a SentencePiece model path, or "demo" (trained once into the workdir)."""
  from big_vision_lite.eval_runner import load_tokenizer  # pylint: disable=g-import-not-at-top
  return load_tokenizer(config.tokenizer, workdir)


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
  tx, lr_fns = optim.make_optimizer(config, target, total_steps=config.total_steps)
  return tx, lr_fns, lora


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
  from big_vision_lite import run_state  # pylint: disable=g-import-not-at-top
  run_state.write_config(workdir, {
      "model": model_config, "lora": lora, "tokenizer": config.tokenizer,
      "vqvae": config.vqvae, "config": json.loads(config.to_json_best_effort())})


def restore(run_state, abstract_state, shardings):
  from big_vision_lite.run_state import abstract_tree  # pylint: disable=g-import-not-at-top
  return run_state.restore(target=abstract_tree(abstract_state, shardings))


def save(run_state, step, state, rng, data_state: bytes) -> None:
  run_state.save(step, state, extra={"rng": np.asarray(jax.device_get(rng))},
                 data_state=data_state)


def initial_state(config, model, model_config, tx, lora, shardings, rng):
  """Random init (or init from config.model_init), created directly in its shardings."""
  params_rng, lora_rng = jax.random.split(jax.random.fold_in(rng, 1))
  inputs = _dummy_inputs(model_config)
  init_fn = jax.jit(lambda r: model.init(r, *inputs)["params"],
                    out_shardings=shardings["params"])
  if config.model_init:
    from big_vision_lite import model_init  # pylint: disable=g-import-not-at-top
    params, report = model_init.init_params(
        model_config, init_fn, rng=params_rng, model_init=config.model_init,
        load=config.model_load.to_dict(), shardings=shardings["params"])
    logging.info("model_init %s:\n%s", config.model_init, report)
  else:
    params = init_fn(params_rng)
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


def mask_encoder(config) -> MaskEncoder | None:
  """Masks -> <seg> codes for segmentation targets (None when the config has no VQ-VAE)."""
  from big_vision_lite.eval_runner import vqvae_path  # pylint: disable=g-import-not-at-top
  path = vqvae_path(config.vqvae)
  return None if path is None else MaskEncoder(path)


def make_train_iterator(config, tokenizer, data_sharding, encode_masks):
  from big_vision_lite.data import pipeline  # pylint: disable=g-import-not-at-top
  input_cfg = config.input.to_dict()
  input_cfg.pop("text_len", None)  # Read by the config's pp helpers, not by the pipeline.
  if input_cfg.get("pp") is None and "name" not in input_cfg["data"]:
    input_cfg.pop("pp")  # A mixture: each component has its own pp.
  return pipeline.make_train_iterator(input_cfg, tokenizer=tokenizer, seed=config.seed,
                                      data_sharding=data_sharding, encode_masks=encode_masks)


# ------------------------------------------------------------ evaluation


def make_eval_runner(config, tokenizer, model_config, mesh, workdir, encode_masks):
  if not config.evals:
    return None
  from big_vision_lite.eval_runner import EvalRunner  # pylint: disable=g-import-not-at-top
  return EvalRunner(config, tokenizer=tokenizer, model_config=model_config, mesh=mesh,
                    workdir=workdir, encode_masks=encode_masks)


def write_eval_outputs(evals, workdir, step, logger, names) -> None:
  """Predictions (jsonl) under workdir/eval/step_<step>/ and a few drawn into TensorBoard."""
  if jax.process_index() != 0:
    return
  evals.write_predictions(os.path.join(workdir, "eval", f"step_{step}"), names=names)
  for name, images in evals.rendered(names=names).items():
    logger.log_images(step, f"predictions/{name}", images)


def blank_image_baseline(evals, params) -> dict:
  """The same evaluators on blank images: what the model scores without looking."""
  return evals.run(params, names=None, blank_images=True)


def write_final_metrics(workdir, evals) -> None:
  if jax.process_index() != 0:
    return
  with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
    json.dump(evals.final_metrics(), f, indent=1, sort_keys=True)


def final_table(metrics: Mapping[str, float]) -> str:
  """A plain-text table: metric | model | blank-image baseline, for every metric that has a
  "baseline/<metric>" counterpart (counts such as "num" and "num_gt" left out)."""
  rows = [(k, v, metrics[f"baseline/{k}"]) for k, v in metrics.items()
          if not k.startswith("baseline/") and f"baseline/{k}" in metrics
          and not k.rsplit("/", 1)[-1].startswith("num")]
  width = max([len("metric")] + [len(k) for k, _, _ in rows])
  lines = [f"{'metric':<{width}}  {'model':>8}  {'baseline':>8}"]
  lines += [f"{k:<{width}}  {v:8.4f}  {b:8.4f}" for k, v, b in rows]
  return "\n".join(lines)


def print_final_table(evals) -> None:
  """Prints final_table of the runner's latest metrics (primary process only)."""
  if jax.process_index() == 0:
    print(final_table(evals.final_metrics()), flush=True)


# --------------------------------------------------------------- logging


def make_logger(workdir, total_steps):
  from big_vision_lite.metrics_log import MetricsLogger  # pylint: disable=g-import-not-at-top
  return MetricsLogger(workdir, total_steps=total_steps)


class Meter:
  """Throughput, MFU, input wait and ETA over each logging interval (metrics_log.Throughput).

  The first step (compilation) is left out of every rate.
  """

  def __init__(self, config, model_config, total_steps: int, start_step: int, *,
               num_devices: int):
    from big_vision_lite import flops  # pylint: disable=g-import-not-at-top
    from big_vision_lite.metrics_log import Throughput  # pylint: disable=g-import-not-at-top
    resolved = paligemma.resolve_config(model_config)
    self._flops = flops.paligemma_train_flops(model_config, config.input.batch_size,
                                              config.input.text_len,
                                              resolved["img"]["image_size"])
    self._peak = flops.device_peak_flops(dtype=resolved["llm"]["dtype"]) * num_devices
    self._batch = config.input.batch_size
    self._throughput = Throughput(total_steps, start_step=start_step)
    self._start, self._last, self._tokens = start_step, start_step, 0
    self.waiting, self.paused = self._throughput.waiting, self._throughput.paused

  def first_step(self, step: int) -> bool:
    return step == self._start + 1

  def count(self, metrics) -> None:
    self._tokens = self._tokens + metrics["tokens"]  # Stays on the device until logged.

  def summary(self, step: int, metrics, input_stats: Mapping) -> dict:
    out = {k: v for k, v in jax.device_get(metrics).items() if k != "tokens"}
    out = {k: float(v) for k, v in out.items()}
    tokens = float(jax.device_get(self._tokens))
    if self.first_step(step):  # Compilation: restart the clock after it.
      self._throughput.reset(step)
    else:
      rates = self._throughput.update(step, (step - self._last) * self._batch, tokens)
      out.update(rates)
      out["mfu"] = self._flops / rates["step_time_s"] / self._peak
    out["skipped_examples"] = input_stats.get("skipped", 0)
    out["truncated_examples"] = input_stats.get("truncated", 0)
    self._last, self._tokens = step, 0
    return out
