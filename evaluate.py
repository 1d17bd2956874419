"""Runs a config's evaluators on a checkpoint: metrics.json, predictions.jsonl and a table.

  python evaluate.py --config configs/demo.py --checkpoint runs/demo
  python evaluate.py --config configs/cococap.py:variant=pg2_3b,res=224 \\
      --checkpoint /ckpt/pg2_3b_cococap.npz --evals=minival --out /tmp/ev \\
      --config.evals.minival.batch_size=16

The checkpoint is a big_vision .npz, a Hugging Face PaliGemma folder or a training workdir
(whatever big_vision_lite.load reads). The evaluators are those train.py runs
(big_vision_lite/eval_runner.py), built from config.evals (--evals picks some of them).

Model config: the architecture is the checkpoint's own. From config.model come what a
checkpoint cannot encode: img.image_size (the eval pp resizes to it; load() resamples the
position embedding if it differs) and the compute dtypes, and, when the config describes
the same architecture, Gemma's behaviour settings (soft-caps, query scaling, window): e.g.
a PaliGemma 2 transfer trained without the final soft-cap is scored without it.

Outputs (process 0) in --out; default: <workdir>/eval for a training workdir (its latest
step), <workdir>/eval/step_<N> for one of its step folders, eval/<name> beside a checkpoint
file or HF folder:
  metrics.json         {"<eval>/<metric>": value}
  predictions.jsonl    one JSON object per example (id, prefix, prediction, JSON-able
                       ground truth); <eval>/predictions.jsonl when several evals ran
  rendered/<eval>_<i>.png   the first config.render_predictions examples of each decoding
                       eval, drawn (big_vision_lite/render.py)
"""
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import PIL.Image

from big_vision_lite import checkpoints
from big_vision_lite import eval_runner
from big_vision_lite import sharding
from big_vision_lite.models import gemma

FLAGS = flags.FLAGS

# Keys of config.model.llm that shapes cannot tell, and those that shapes fix.
LLM_BEHAVIOUR = ("final_logits_softcap", "attn_logits_softcap", "query_pre_attn_norm",
                 "sliding_window", "norm_eps")
LLM_SHAPE = ("vocab_size", "width", "depth", "mlp_dim", "num_heads", "num_kv_heads",
             "head_dim", "post_norms")
COMPUTE_KEYS = ("dtype", "cache_dtype")
CONFIG_KEYS = ("model", "tokenizer", "vqvae", "seed", "evals", "mesh", "sharding_rules",
               "render_predictions")


def define_flags() -> None:
  """The command line (defined only when run as a script: the functions stay importable
  next to train.py / predict.py, whose flags share names)."""
  config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:arg=val,...]",
                                  lock_config=False)
  flags.DEFINE_string("checkpoint", None, "A .npz, a Hugging Face folder or a training "
                      "workdir.")
  flags.DEFINE_string("out", None, "Output folder (default: see the module docstring).")
  flags.DEFINE_list("evals", None, "Names in config.evals to run (default: all).")


def default_out_dir(checkpoint: str) -> str:
  """<workdir>/eval (a workdir's latest step), <workdir>/eval/step_<N> (one of its steps), or
  eval/<name> beside a checkpoint file or Hugging Face folder."""
  workdir, step = eval_runner.run_dir(checkpoint)
  if workdir is not None:
    return os.path.join(workdir, "eval", *([] if step is None else [f"step_{step}"]))
  path = os.path.abspath(checkpoint).rstrip(os.sep)
  name = os.path.splitext(os.path.basename(path))[0] if os.path.isfile(path) else (
      os.path.basename(path))
  return os.path.join(os.path.dirname(path), "eval", name)


def model_overrides(config_model: Mapping[str, Any], ckpt_model: Mapping[str, Any]
                    ) -> dict[str, dict[str, Any]]:
  """load() overrides taken from config.model (see the module docstring)."""
  raw = {t: dict(config_model.get(t) or {}) for t in ("img", "llm")}
  out = {"img": {k: raw["img"][k] for k in ("image_size", "dtype")
                 if raw["img"].get(k) is not None},
         "llm": {k: raw["llm"][k] for k in COMPUTE_KEYS if raw["llm"].get(k) is not None}}
  if not raw["llm"]:
    return out
  try:
    cfg_llm = gemma.resolve_config(raw["llm"])
  except ValueError as e:
    logging.warning("config.model.llm does not resolve (%s): using the checkpoint's "
                    "settings", e)
    return out
  ckpt_llm = gemma.resolve_config(ckpt_model["llm"])
  differ = {k: (cfg_llm[k], ckpt_llm[k]) for k in LLM_SHAPE if cfg_llm[k] != ckpt_llm[k]}
  if differ:
    logging.warning("config.model.llm is not the checkpoint's architecture (config, "
                    "checkpoint): %s; using the checkpoint's soft-caps/window settings", differ)
  else:
    out["llm"].update({k: cfg_llm[k] for k in LLM_BEHAVIOUR})
  return out


def _rules(config):
  tables = {"fsdp": sharding.FSDP_RULES, "fsdp_tensor": sharding.FSDP_TENSOR_RULES,
            "replicate": sharding.REPLICATE_RULES}
  rules = config.sharding_rules
  if isinstance(rules, str):
    if rules not in tables:
      raise ValueError(f"config.sharding_rules={rules!r}: expected one of {sorted(tables)} "
                       "or a list of (regex, rule)")
    return tables[rules]
  return [tuple(r) for r in rules]


def load_model(config, checkpoint: str, mesh) -> tuple[dict, Any]:
  """(model_config, params placed on the mesh by config.sharding_rules)."""
  reader = checkpoints.open_checkpoint(checkpoint)
  try:
    ckpt_model = reader.config
  finally:
    reader.close()
  config_model = config.model.to_dict() if hasattr(config.model, "to_dict") else config.model
  overrides = model_overrides(config_model or {}, ckpt_model)
  merged = checkpoints.merge_config(ckpt_model, overrides)
  shapes = checkpoints.param_shapes(merged)
  abstract = checkpoints.unflatten({n: jax.ShapeDtypeStruct(s, "float32")
                                    for n, s in shapes.items()})
  flat = checkpoints.flatten(sharding.infer_shardings(abstract, _rules(config), mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Unscanned (per-layer) names are not in the scanned shape table: replicated.
  model_config, params = checkpoints.load(
      checkpoint, shardings=lambda name: flat.get(name, replicated), **overrides)
  logging.info("model config (checkpoint %s, overrides from the config %s): %s",
               checkpoint, overrides, json.dumps(model_config, default=str))
  return model_config, params


def _select(config, names: Sequence[str] | None):
  """config with config.evals restricted to `names` (all when None)."""
  evals = config.evals.to_dict() if hasattr(config.evals, "to_dict") else dict(config.evals)
  if not evals:
    raise ValueError("config.evals is empty: nothing to evaluate")
  if names:
    unknown = [n for n in names if n not in evals]
    if unknown:
      raise ValueError(f"--evals: unknown name(s) {unknown}; config.evals has {sorted(evals)}")
    evals = {n: evals[n] for n in names}
  config = config.copy_and_resolve_references()
  with config.unlocked():
    del config["evals"]
    config.evals = ml_collections.ConfigDict(evals)
  return config


class _Progress:
  """"caption: 12/50 examples" on stderr: in place on a terminal, every ~10% otherwise."""

  def __init__(self, enabled: bool):
    self.enabled, self.tty = enabled, sys.stderr.isatty()
    self._last, self._t0 = {}, {}

  def __call__(self, name: str, done: int, total: int | None) -> None:
    if not self.enabled:
      return
    if done == 0:  # Called before the first batch: the clock starts.
      self._t0[name], self._last[name] = time.time(), 0
      return
    t0 = self._t0.setdefault(name, time.time())
    step = max(1, (total or 10) // 10)
    last = self._last.get(name, 0)
    end = total is not None and done >= total
    if not (self.tty or end or done - last >= step):
      return
    self._last[name] = done
    rate = done / max(time.time() - t0, 1e-9)
    msg = f"{name}: {done}/{total if total is not None else '?'} examples ({rate:.1f}/s)"
    sys.stderr.write(("\r" + msg + ("\n" if end else "")) if self.tty else msg + "\n")
    sys.stderr.flush()


def format_table(metrics: Mapping[str, float]) -> str:
  width = max([len("metric")] + [len(k) for k in metrics])
  lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 10}"]
  lines += [f"{k:<{width}}  {v:.6g}" for k, v in metrics.items()]
  return "\n".join(lines)


def evaluate(config, checkpoint: str, *, out: str | None = None,
             evals: Sequence[str] | None = None, show_progress: bool = True
             ) -> dict[str, float]:
  """Runs config.evals (or those named) on the checkpoint and writes the outputs.

  Returns {"<eval>/<metric>": value} (on every process; process 0 writes the files).
  """
  missing = [k for k in CONFIG_KEYS if k not in config]
  if missing:
    raise ValueError(f"config: missing key(s) {missing} (configs/common.py sets them)")
  if not os.path.exists(checkpoint):
    raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file or folder")
  config = _select(config, evals)
  out = out or default_out_dir(checkpoint)
  primary = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  model_config, params = load_model(config, checkpoint, mesh)
  tokenizer = eval_runner.load_tokenizer(config.tokenizer,
                                         eval_runner.tokenizer_cache(checkpoint, out))
  vocab = model_config["llm"]["vocab_size"]
  if tokenizer.vocab_size > vocab:
    raise ValueError(f"config.tokenizer has {tokenizer.vocab_size} ids, more than the "
                     f"checkpoint's vocab_size {vocab}")
  runner = eval_runner.EvalRunner(config, tokenizer=tokenizer, model_config=model_config,
                                  mesh=mesh, workdir=out)
  metrics = runner.run(params, progress=_Progress(show_progress and primary))
  if primary:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
      json.dump(metrics, f, indent=1)
    runner.write_predictions(out)
    for name, images in runner.rendered().items():
      os.makedirs(os.path.join(out, "rendered"), exist_ok=True)
      for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(os.path.join(out, "rendered", f"{name}_{i}.png"))
    logging.info("wrote metrics.json and predictions to %s", out)
  return metrics


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.config is None or not FLAGS.checkpoint:
    raise app.UsageError("--config and --checkpoint are required")
  sharding.maybe_initialize_distributed()
  metrics = evaluate(FLAGS.config, FLAGS.checkpoint, out=FLAGS.out, evals=FLAGS.evals)
  if jax.process_index() == 0:
    print(format_table(metrics))
    print(f"outputs in {FLAGS.out or default_out_dir(FLAGS.checkpoint)}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
