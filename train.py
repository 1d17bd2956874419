"""Fine-tunes (or trains from scratch) a PaliGemma model from a config file.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/cococap.py:variant=pg2_3b,res=224 --workdir runs/cap \
      --config.lr=1e-5
  python train.py --config configs/cococap.py --workdir /tmp/plan --dry_run --dry_run_devices=256

Re-running the same command resumes from the workdir's latest checkpoint, data stream
included. The loop reads top to bottom in phases: config, mesh, tokenizer, model, optimizer,
state (init / restore), data, evaluators, compiled step, loop (log / eval / checkpoint).
"""
import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:arg=val,...]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, metrics.")
flags.DEFINE_bool("dry_run", False, "Build and AOT-compile the train step abstractly for the "
                  "configured mesh, print per-device memory, allocate no weights, exit.")
flags.DEFINE_integer("dry_run_devices", None, "Fake devices standing in for the real ones "
                     "in --dry_run (default: the local device count).")
flags.DEFINE_string("dry_run_chip", None, "Chip to check the --dry_run plan against "
                    "(e.g. v5e, v5p, h100); default: a table of common chips.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if FLAGS.dry_run and FLAGS.dry_run_devices:  # Before jax starts its backends.
    # Fake CPU devices stand in for the chips (also on an accelerator host).
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={FLAGS.dry_run_devices}")
  # pylint: disable=g-import-not-at-top  (XLA_FLAGS must be set before jax initialises)
  import jax
  import numpy as np
  from big_vision_lite import optim, sharding, train_lib
  from big_vision_lite import train_step as ts

  config = FLAGS.config
  if config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  train_lib.check_config(config)
  sharding.maybe_initialize_distributed()
  workdir = FLAGS.workdir
  primary = jax.process_index() == 0

  # ------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  data_sharding = sharding.batch_sharding(mesh)
  logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  # ------------------------------------------------------ tokenizer, model
  os.makedirs(workdir, exist_ok=True)
  tokenizer = train_lib.make_tokenizer(config, workdir)
  model_config = train_lib.model_config(config, tokenizer)
  model = train_lib.make_model(model_config)
  abstract_params = train_lib.abstract_params(model, config)

  # ------------------------------------------------------------- optimizer
  tx, lr_fns, lora = train_lib.make_optimizer(config, abstract_params)
  abstract_state = jax.eval_shape(
      lambda p, r: ts.init_state(p, tx, lora=lora, rng=r), abstract_params,
      jax.random.PRNGKey(0))
  state_shardings = train_lib.state_shardings(config, abstract_state, mesh)
  step_fn = ts.make_train_step(
      model, tx, label_smoothing=config.label_smoothing, reduction=config.loss_reduction,
      grad_accum_steps=config.grad_accum_steps, lora=lora, micro_batch_sharding=data_sharding,
      lr_fn=next(iter(lr_fns.values())) if len(lr_fns) == 1 else None,
      frozen=optim.frozen_mask(config, abstract_state["lora" if lora else "params"]))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train_step = jax.jit(step_fn, in_shardings=(state_shardings, data_sharding, replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))

  if FLAGS.dry_run:
    from big_vision_lite import memory_plan
    abstract_batch = train_lib.abstract_batch(config, model_config)
    memory_plan.report(train_step, abstract_state, state_shardings, abstract_batch,
                       data_sharding, mesh, chip=FLAGS.dry_run_chip, config=config)
    return

  # ---------------------------------------------------- state: restore/init
  run_state = train_lib.make_run_state(config, workdir)
  train_lib.write_run_config(workdir, config, model_config, lora)
  rng = jax.random.PRNGKey(config.seed)
  step, data_state = 0, None
  if run_state.latest_step() is not None:
    restored = train_lib.restore(run_state, abstract_state, state_shardings)
    state, step, data_state = restored.state, restored.step, restored.data_state
    rng = jax.numpy.asarray(restored.extra["rng"], jax.numpy.uint32)
    logging.info("resumed from step %d in %s", step, workdir)
  else:
    state = train_lib.initial_state(config, model, model_config, tx, lora, state_shardings, rng)

  # ------------------------------------------------------------------- data
  encode_masks = train_lib.mask_encoder(config)
  train_iter = train_lib.make_train_iterator(config, tokenizer, data_sharding, encode_masks)
  if data_state is not None:
    train_iter.set_state(data_state)
  total_steps = config.total_steps

  # ------------------------------------------------------------ evaluators
  evals = train_lib.make_eval_runner(config, tokenizer, model_config, mesh, workdir,
                                     encode_masks)

  # ------------------------------------------------------------------- loop
  logger = train_lib.make_logger(workdir, total_steps)
  meter = train_lib.Meter(config, model_config, total_steps, step, num_devices=mesh.size)
  prev_metrics = None
  while step < total_steps:
    rng, step_rng = jax.random.split(rng)
    with meter.waiting():
      batch = next(train_iter)
    state, metrics = train_step(state, batch, step_rng)
    step += 1
    # Checked one step late, so that the host does not wait for the device every step.
    train_lib.check_finite(prev_metrics, step - 1, run_state)
    prev_metrics = metrics
    meter.count(metrics)
    if step % config.log_steps == 0 or step == total_steps or meter.first_step(step):
      train_lib.check_finite(metrics, step, run_state)
      logger.log(step, meter.summary(step, metrics, train_iter.stats()))
    if evals is not None and (names := evals.due(step, total_steps)):
      with meter.paused():
        logger.log(step, evals.run(train_lib.eval_params(state, lora), step=step, names=names))
        train_lib.write_eval_outputs(evals, workdir, step, logger, names)
    if step % config.ckpt_steps == 0 or step == total_steps:
      with meter.paused():
        train_lib.check_finite(metrics, step, run_state)
        train_lib.save(run_state, step, state, rng, train_iter.get_state())

  run_state.close()  # Waits for the last asynchronous save.
  train_iter.close()
  if evals is not None and config.final_baseline:
    logger.log(step, train_lib.blank_image_baseline(evals, train_lib.eval_params(state, lora)))
  if evals is not None:
    train_lib.write_final_metrics(workdir, evals)
    if config.final_baseline:
      train_lib.print_final_table(evals)
  logger.close()
  logging.info("done: %d steps in %s", total_steps, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
