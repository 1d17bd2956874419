"""The embedded default: a tiny PaliGemma trained from scratch on the demo's four tasks.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:mode=smoke --workdir /tmp/demo_smoke

The synthetic shapes dataset (big_vision_lite/data/demo.py) needs no download; the demo
tokenizer is trained on first use and the demo mask VQ-VAE ships with the repository.
args: mode = full (the README's main job: 7-8 minutes on 2 free CPU cores, final evaluation
and blank-image baseline included) | smoke (tests: seconds); res = image size in pixels;
patch = ViT patch size in pixels.

Measured (full, 2026-11-27, 2 cores): 7m10s; model / blank images: caption CIDEr 1.88 / 0.47,
VQA accuracy 0.43 / 0.33, detection AP50 0.014 / 0.010, segmentation mIoU 0.065 / 0.063.
The model reads the image for captions and, partly, for VQA, but does not localise yet: its
boxes follow the prompt's object order and count, not the image (an open problem).
Measured on detection-only training (600-3000 steps): the loss on every <loc> slot equals
the blank-image loss to 0.01 nats, also with a frozen random ViT or a zero-init projector;
the LLM's attention from the box tokens to the image is spread evenly or sinks on one image
token, and the projector's output turns near-constant across images.
"""
from configs import common
from big_vision_lite.data import demo

# Longest demo sequence: bos + "detect a ; b ; c" (6) + "\n" + 3 x (4 <loc> + label) +
# 2 x " ;" " " + eos = 28 tokens = TEXT_LEN + 1 (the trainer shifts inputs and targets).
TEXT_LEN = 27
# Most generated tokens per task, EOS included (caption 14 + 1, answer 1 + 1, three boxes
# 19 + 1, one mask 4 <loc> + 16 <seg> + label + 1), with a little room.
MAX_DECODE_LEN = dict(caption=16, vqa=4, detection=20, segmentation=24)
_VAL_SPLIT = dict(caption="caption", vqa="vqa", detection="detect", segmentation="segment")
# steps, batch size, validation examples per task; every mode has the same model.
_MODES = dict(full=(3000, 16, 256), smoke=(20, 8, 16))
# Twice as many caption and VQA examples as detection and segmentation ones: captions are
# where a from-scratch model first learns to read the image (measured: a caption-only run
# beats blank images within 400 steps; the equal four-task mix showed none in 800).
_TASK_WEIGHTS = dict(caption=2.0, vqa=2.0, detect=1.0, segment=1.0)
_LLM_WIDTH = 192


def get_config(arg=None):
  a = common.parse_arg(arg, mode="full", res=64, patch=16)
  if a.mode not in _MODES:
    raise ValueError(f"configs/demo.py: mode must be one of {sorted(_MODES)}, got {a.mode!r}")
  if a.res % a.patch:
    raise ValueError(f"configs/demo.py: res={a.res} is not a multiple of patch={a.patch}")
  steps, batch, n_val = _MODES[a.mode]
  smoke = a.mode == "smoke"
  c = common.base_config()
  c.name = "demo"
  c.total_steps = steps
  c.log_steps = 5 if smoke else 100
  c.ckpt_steps = 10 if smoke else 1000
  c.eval_steps = steps  # One evaluation, at the end (it is part of the time budget).

  c.input.batch_size = batch
  c.input.text_len = TEXT_LEN
  c.input.update(demo.demo_mixture(image_size=a.res, text_len=TEXT_LEN, weights=_TASK_WEIGHTS))
  # A full shuffle of the record indices per task (grain needs no buffer): without it the
  # four tasks read the same records in step, so a batch holds 4x fewer distinct images.
  c.input.shuffle_buffer_size = 100_000
  c.tokenizer = "demo"
  c.vqvae = "demo"

  c.model = dict(
      img=dict(patch_size=(a.patch, a.patch), width=128, depth=3, mlp_dim=384, num_heads=4,
               image_size=a.res, head_zeroinit=False, scan=True),
      # Token embeddings start at unit RMS after Gemma's x sqrt(width), like the image tokens.
      # With big_vision's 0.01 they are 7x smaller: attention outputs (mostly the 16 image
      # tokens' values) drown each text token's identity, and training makes the image
      # tokens constant (the ViT collapses, the model ignores the image).
      llm=dict(vocab_size=1664, width=_LLM_WIDTH, depth=3, mlp_dim=512, num_heads=3,
               num_kv_heads=1, head_dim=64, scan=True, embed_init_std=_LLM_WIDTH ** -0.5),
  )
  c.sharding_rules = "replicate"
  c.optax_name = "adam"
  c.optax = dict(b2=0.98)
  c.lr = 2e-3
  c.schedule = dict(decay_type="cosine", warmup_steps=2 if smoke else 100)
  c.grad_clip_norm = 1.0
  c.loss_reduction = "per_token"

  def val(name):
    task = _VAL_SPLIT[name]
    return dict(data=dict(name="demo", split=f"val[:{n_val}]", image_size=a.res),
                pp=demo.demo_pp(task, image_size=a.res, text_len=TEXT_LEN, train=False),
                batch_size=min(n_val, 64), max_decode_len=MAX_DECODE_LEN[name])

  c.evals = dict(
      caption=dict(type="caption", metrics=("cider",), **val("caption")),
      # Demo answers are single words with one reference: exact match is the accuracy
      # (VQAv2's accuracy needs 10 annotators and would cap at 1/3).
      vqa=dict(type="vqa", metrics=("exact_match",), rename={"exact_match": "accuracy"},
               **val("vqa")),
      detection=dict(type="detection", **val("detection")),
      segmentation=dict(type="segmentation", **val("segmentation")),
  )
  c.final_baseline = True
  return c


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/demo.py[:mode=smoke] --workdir ROOT

  A 2 x 2 grid around the demo's learning rate, with and without label smoothing.
  """
  del arg  # The same grid in both modes.
  from big_vision_lite import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  for point in sweep_lib.grid(lr=[1e-3, 3e-3], label_smoothing=[0.0, 0.1]):
    add(**point)


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["caption/cider", "vqa/accuracy", "detection/map", "segmentation/miou", "loss"]
