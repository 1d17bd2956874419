"""Shared pieces of the PaliGemma transfer configs (cococap, vqav2, refcoco_*, coco_det, forkme).

Model variants (config arg `variant`) and the pretrained checkpoint each starts from (config arg
`res` picks the resolution, 224 / 448 / 896):

  variant   LLM          model_init (vanity name)   params (pt_<..>_224)
  pg1_3b    gemma_2b     pt_224 / pt_448 / pt_896     2.92B   PaliGemma 1
  pg2_3b    gemma2_2b    pt_3b_224 / ...              3.03B   PaliGemma 2
  pg2_10b   gemma2_9b    pt_10b_224 / ...             9.66B   (LLM remat: nothing_saveable)
  pg2_28b   gemma2_27b   pt_28b_224 / ...            27.65B   (LLM remat: nothing_saveable)

Files the user provides (the checkpoints are behind a licence click-through, so nothing is
downloaded): vanity names are resolved by big_vision_lite/model_init.py in $BVL_CHECKPOINT_DIR,
and the tokenizer and mask VQ-VAE are read from the same folder:

  $BVL_CHECKPOINT_DIR/paligemma_tokenizer.model   (gs://big_vision/paligemma_tokenizer.model)
  $BVL_CHECKPOINT_DIR/vae-oid.npz                 (gs://big_vision/paligemma/vae-oid.npz; seg)
  $BVL_CHECKPOINT_DIR/<vanity name> checkpoints    (Kaggle / HF; model_init.py lists the
                                                   file and folder names it accepts)

The paths are resolved when the config is built; with the variable unset they keep the
literal "$BVL_CHECKPOINT_DIR/..." so that the file-not-found error says what to set. Any of
them can be overridden: --config.tokenizer=/path/tok.model, --config.model_init=/path.npz.

Sweeps (python -m big_vision_lite.sweep --config configs/<task>.py:<arg> --workdir ROOT): for
pg1_3b, big_vision's sweep_best (the published runs: one per resolution it reports); for the
PaliGemma 2 variants, whose per-size learning rates big_vision's configs do not give, and for
our own recipes (refcoco_det, coco_det, forkme), the learning rate x1/3, x1, x3.

Steps: train.py needs config.total_steps; big_vision's configs give total_epochs. We convert
with big_vision's rule (utils.steps): max(1, round(epochs * num_examples / batch_size)), from
the split sizes written in each config.
"""
import os
from typing import Any

import ml_collections

from configs import common

# variant -> (LLM variant, vanity-name pattern). The PaliGemma 2 names are big_vision's.
VARIANTS = {
    "pg1_3b": ("gemma_2b", "pt_{res}"),
    "pg2_3b": ("gemma2_2b", "pt_3b_{res}"),
    "pg2_10b": ("gemma2_9b", "pt_10b_{res}"),
    "pg2_28b": ("gemma2_27b", "pt_28b_{res}"),
}
# Activations of the 9B/27B LLMs at transfer batch sizes do not fit without rematerialisation.
REMAT_VARIANTS = ("pg2_10b", "pg2_28b")
RESOLUTIONS = (224, 448, 896)
MODES = ("full", "local")
VOCAB_SIZE = 256_000 + 1024 + 128  # Gemma + <loc> + <seg>.
CHECKPOINT_DIR_ENV = "BVL_CHECKPOINT_DIR"

# Decoding-eval examples per call and process (big_vision's 1024 is global over a pod slice).
EVAL_BATCH = {224: 64, 448: 32, 896: 16}
# mode=local: a quick try of the whole loop (big_vision's mode=runlocal).
LOCAL_BATCH = 8
LOCAL_STEPS = 10
LOCAL_EVAL_EXAMPLES = 16


def checkpoint_file(filename: str) -> str:
  """A file in $BVL_CHECKPOINT_DIR (the literal "$BVL_CHECKPOINT_DIR/<file>" when unset)."""
  return os.path.join(os.environ.get(CHECKPOINT_DIR_ENV, "$" + CHECKPOINT_DIR_ENV), filename)


def parse_args(arg: str | None, config_file: str, *, variants=tuple(VARIANTS),
               **defaults) -> ml_collections.ConfigDict:
  """Parses `arg` over defaults (variant, res, mode + the task's own) and checks the values."""
  a = common.parse_arg(arg, **defaults)
  if a.variant not in variants:
    raise ValueError(f"{config_file}: variant must be one of {list(variants)}, got "
                     f"{a.variant!r}")
  if a.variant in VARIANTS and a.res not in RESOLUTIONS:
    raise ValueError(f"{config_file}: res must be one of {list(RESOLUTIONS)} (the pretrained "
                     f"checkpoints' resolutions), got {a.res}")
  if a.mode not in MODES:
    raise ValueError(f"{config_file}: mode must be one of {list(MODES)}, got {a.mode!r}")
  return a


def vanity_name(variant: str, res: int) -> str:
  """The pretrained checkpoint of a variant at a resolution: "pt_224", "pt_10b_448", ..."""
  return VARIANTS[variant][1].format(res=res)


def model_config(variant: str, res: int, *, llm_dropout: float = 0.0,
                 img_dropout: float = 0.0) -> dict[str, Any]:
  """big_vision's transfer model config: SigLIP So400m/14 at `res` + the variant's Gemma."""
  llm = dict(variant=VARIANTS[variant][0], vocab_size=VOCAB_SIZE, dropout=llm_dropout)
  if variant != "pg1_3b":
    # big_vision's PaliGemma 2 transfers train without the final logit soft-cap (0 = off).
    llm["final_logits_softcap"] = 0.0
  if variant in REMAT_VARIANTS:
    llm["remat_policy"] = "nothing_saveable"
  img = dict(variant="So400m/14", pool_type="none", scan=True, image_size=res,
             dropout=img_dropout)
  return dict(img=img, llm=llm)


def base_config(a: ml_collections.ConfigDict, *, task: str, llm_dropout: float = 0.0
                ) -> ml_collections.ConfigDict:
  """common.base_config() with the model, checkpoint, tokenizer and FSDP sharding of `a`."""
  c = common.base_config()
  c.name = f"{task}_{a.variant}_{a.res}"
  c.seed = 0
  c.model = model_config(a.variant, a.res, llm_dropout=llm_dropout)
  c.model_init = vanity_name(a.variant, a.res)
  c.tokenizer = checkpoint_file("paligemma_tokenizer.model")
  # FSDP over one data axis, as big_vision's transfers ('.*' -> fsdp(axis="data")).
  c.mesh = (("data", -1),)
  c.sharding_rules = "fsdp"
  c.optax_name = "scale_by_adam"
  c.schedule = dict(decay_type="cosine", warmup_percent=0.05)
  c.grad_clip_norm = 1.0
  # big_vision's default wd_mults: only "kernel" params decay, i.e. the ViT and its
  # projection head (Gemma's params are named w / *_einsum / linear / input_embedding).
  c.wd_mults = [(".*/kernel$", 1.0)]
  c.input.shuffle_buffer_size = 50_000
  # big_vision truncates over-long texts silently; we truncate too, and count them (and skip,
  # counted, records no target can be made of, e.g. COCO images without objects).
  c.input.skip_bad_examples = True
  c.log_steps = 50
  c.ckpt_steps = 1000
  return c


def train_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """big_vision's epochs -> steps: max(1, round(epochs * num_examples / batch_size))."""
  return max(1, round(epochs * num_examples / batch_size))


def every(fraction: float, total_steps: int) -> int:
  """Eval period of big_vision's log_percent: every `fraction` of the run."""
  return max(1, round(fraction * total_steps))


def eval_split(split: str, local: bool) -> str:
  """The split itself, or its first LOCAL_EVAL_EXAMPLES records in mode=local."""
  if not local:
    return split
  return split.split("[")[0] + f"[:{LOCAL_EVAL_EXAMPLES}]"


def decode_eval(kind: str, data: dict, pp: str, *, res: int, max_decode_len: int,
                every_steps: int | None, local: bool, **kw) -> dict[str, Any]:
  """A decoding evaluator entry of config.evals (see big_vision_lite/eval_runner.py)."""
  data = dict(data, split=eval_split(data["split"], local))
  return dict(type=kind, data=data, pp=pp, max_decode_len=max_decode_len,
              batch_size=LOCAL_BATCH if local else EVAL_BATCH[res],
              every=0 if local else every_steps, **kw)


def perplexity_eval(data: dict, pp: str, *, res: int, every_steps: int | None,
                    local: bool) -> dict[str, Any]:
  """A teacher-forced perplexity entry; `pp` is the train layout (combine_and_keep_train)."""
  data = dict(data, split=eval_split(data["split"], local))
  return dict(type="perplexity", data=data, pp=pp,
              batch_size=LOCAL_BATCH if local else EVAL_BATCH[res],
              every=0 if local else every_steps)


def add_sweep(add, c: ml_collections.ConfigDict, *, published_res: tuple[int, ...] = ()
              ) -> None:
  """Adds the runs of a task's sweep (module docstring) for the built config `c`."""
  from big_vision_lite import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  if published_res and c.model.llm.variant == VARIANTS["pg1_3b"][0]:
    for res in published_res:  # The config's defaults at each res are big_vision's.
      add(**sweep_lib.arg(res=res))
    return
  for lr in sweep_lib.grid(lr=[float(f"{c.lr * m:.2g}") for m in (1 / 3, 1, 3)]):
    add(**lr)


def finish(c: ml_collections.ConfigDict, local: bool) -> ml_collections.ConfigDict:
  """mode=local: tiny batches, LOCAL_STEPS steps, file-order data, every log line."""
  if local:
    c.input.batch_size = LOCAL_BATCH
    c.input.shuffle_buffer_size = 0
    c.total_steps = LOCAL_STEPS
    c.log_steps = 1
    c.ckpt_steps = LOCAL_STEPS
  c.eval_steps = c.total_steps if local else min(c.eval_steps, c.total_steps)
  return c
