"""Pieces shared by the configs: every run-config key with its default, and arg parsing.

A config file's `get_config(arg)` starts from `base_config()` and overrides what its task
needs; train.py rejects keys that are not listed here (big_vision_lite/train_lib.py).
"""
import ml_collections
from ml_collections.config_dict import placeholder


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"res=448,variant=pg2_3b" -> ConfigDict over `defaults`; values take the defaults' types.

  An unknown name or a value of the wrong type is an error naming the config file's args.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in defaults:
      raise ValueError(f"config arg {item!r}: expected name=value with name in {sorted(defaults)}")
    default = defaults[key]
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        out[key] = value.lower() in ("true", "1")
      elif isinstance(default, int):
        out[key] = int(value)
      elif isinstance(default, float):
        out[key] = float(value)
      else:
        out[key] = value
    except ValueError:
      raise ValueError(f"config arg {key}={value!r}: expected a {type(default).__name__}") from None
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every run-config key train.py reads, with a default or None."""
  c = ml_collections.ConfigDict()
  c.name = "run"
  c.seed = 0
  # Keys whose default is None are typed placeholders, so --config.key=value can set them.
  c.total_steps = placeholder(int)  # Task configs derive it from epochs and the split size.
  c.log_steps = 50
  c.ckpt_steps = 1000
  c.eval_steps = 1000
  c.keep_ckpts = 2           # Keep the last K checkpoints ...
  c.keep_ckpt_every = placeholder(int)  # ... plus every M-th step (None: none).

  c.input = ml_collections.ConfigDict()
  c.input.data = None
  c.input.pp = None
  c.input.batch_size = 32
  c.input.text_len = 64      # Used by the pp helpers; the pipeline pads text to text_len + 1.
  c.input.shuffle_buffer_size = 50_000
  c.input.num_workers = 0
  c.input.skip_bad_examples = False
  c.input.prefetch = 2

  c.tokenizer = placeholder(str)  # SentencePiece model path, or "demo".
  c.vqvae = placeholder(str)  # Mask VQ-VAE npz for segmentation targets/evals, or "demo".
  c.model = ml_collections.ConfigDict()
  c.model_init = placeholder(str)  # Path (npz / HF folder / workdir) or vanity name (pt_224, ...).
  c.model_load = ml_collections.ConfigDict(dict(only=None, skip=[], resample_posemb=True))

  c.mesh = (("data", -1),)  # A tuple, so that --config.mesh='(("fsdp", -1),)' works.
  c.sharding_rules = "fsdp"  # "fsdp" | "fsdp_tensor" | "replicate" | [(regex, rule), ...]

  c.optax_name = "adam"
  c.optax = ml_collections.ConfigDict()
  c.lr = 1e-5
  c.wd = 0.0
  c.wd_mults = placeholder(tuple)  # ((regex, mult), ...): which params decay.
  c.lr_mults = placeholder(tuple)
  c.schedule = ml_collections.ConfigDict(dict(decay_type="cosine", warmup_percent=0.05))
  c.grad_clip_norm = 1.0
  c.grad_accum_steps = 1
  c.label_smoothing = 0.0
  c.loss_reduction = "per_example"  # big_vision's; or "per_token".
  c.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=None))  # rank 0 = off.

  c.evals = ml_collections.ConfigDict()
  c.render_predictions = 4   # Validation predictions drawn into TensorBoard per eval.
  c.final_baseline = False   # Also evaluate on blank images at the end (the demo does).
  return c
