"""The embedded default: a tiny PaliGemma trained on the demo's four tasks.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:mode=smoke --workdir /tmp/demo_smoke

The synthetic shapes dataset (big_vision_lite/data/demo.py) needs no download; the demo
tokenizer is trained on first use. Two small models ship with the repository
(big_vision_lite/data/assets/): the mask VQ-VAE (tools/demo_vqvae.py) and, as PaliGemma starts
from a pretrained SigLIP, the image encoder (ViT + projector, pretrained for 17 minutes on the
demo's training scenes by tools/demo_encoder.py, whose docstring says why and how). The demo
keeps the tower frozen and trains its projector and the LLM, from scratch.
args: mode = full (the README's main job: 6-8 minutes on 2 CPU cores, final evaluation
and blank-image baseline included) | smoke (tests: seconds); res = image size in pixels;
patch = ViT patch size in pixels; encoder = pretrained (the shipped one: patch 16, another
res resamples its position embedding) | scratch (the image tower from scratch too).

Measured (full, 2026-11-28, 2 cores: 6m45s, 8m16s while the machine ran at half speed; the
metrics were the same to the digit); model / blank images: caption CIDEr 5.54 / 0.47, VQA
accuracy 0.71 / 0.29, detection AP50 0.878 / 0.001 (mAP 0.462 / 0.000), segmentation mIoU
0.417 / 0.014. Against the issue's prototype (model / prototype): caption word-F1 (best
reference) 0.955 / 0.82, count accuracy 1.00 / 0.80, detection F1 at IoU 0.5 0.92 / 0.55,
colour accuracy 0.58 / 0.72. Colour is short: "what colour is the star?" is always right
with one shape (17/17), near chance with two (8/20) or three (17/35): the LLM finds a shape
by its colour ("which shape is red?" 0.90) but hardly by its kind, although the encoder's
tokens name kinds (a linear probe: 0.82). With one key/value head (num_kv_heads=1) and with
the tower trained, colour stayed at 0.57-0.64; with twice the VQA examples, 0.50; on VQA
alone, 0.14; with detection prompts naming a random subset of the shapes (find by kind on a
third of the batch), 0.56 and detection AP50 fell to 0.73. The encoder before (6000 steps,
kind accuracy 0.27 against 0.875 now) gave caption word-F1 0.71, colour 0.36, detection
AP50 0.568.
With encoder=scratch (2026-11-27, then with twice the caption and VQA examples)
the model read the image for captions (CIDEr 1.88 / 0.47) but did not localise (AP50
0.014 / 0.010, mIoU 0.065 / 0.063): from step 50 on, the loss on <loc> tokens was the same
for real and blank images; the LLM learned to ignore an image tower with no usable positions.
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
# Twice as many detection and segmentation examples as caption and VQA ones: boxes are the
# slowest to learn (measured with a 2000-step encoder: detection AP50 0.18 after 1500 steps
# with this mix, 0.02 after 3000 with the reverse one); captions and answers come quickly.
_TASK_WEIGHTS = dict(caption=1.0, vqa=1.0, detect=2.0, segment=2.0)
LLM_WIDTH = 192
_ENCODER_PATCH = 16  # The patch size of the shipped encoder (data/assets/demo_encoder.npz).
# The params of the pretrained image tower that the demo does not train: all but the projector.
FROZEN_TOWER = "img/(Transformer|embedding|pos_embedding)(/.*)?"


def image_tower(res: int = 64, patch: int = 16) -> dict:
  """config.model.img of the demo (also what tools/demo_encoder.py pretrains)."""
  return dict(patch_size=(patch, patch), width=128, depth=3, mlp_dim=384, num_heads=4,
              image_size=res, head_zeroinit=False, scan=True)


def get_config(arg=None):
  a = common.parse_arg(arg, mode="full", res=64, patch=16, encoder="pretrained")
  if a.mode not in _MODES:
    raise ValueError(f"configs/demo.py: mode must be one of {sorted(_MODES)}, got {a.mode!r}")
  if a.encoder not in ("pretrained", "scratch"):
    raise ValueError(f"configs/demo.py: encoder must be 'pretrained' or 'scratch', got "
                     f"{a.encoder!r}")
  if a.encoder == "pretrained" and a.patch != _ENCODER_PATCH:
    raise ValueError(f"configs/demo.py: the shipped encoder ({demo.DEMO_ENCODER}) has patch "
                     f"{_ENCODER_PATCH}, not {a.patch}: pass encoder=scratch (and, for a pretrained "
                     f"tower, make one with python -m big_vision_lite.tools.demo_encoder --patch "
                     f"{a.patch} --out FILE, then add --config.model_init=FILE "
                     "--config.model_load.only=img)")
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
  if a.encoder == "pretrained":  # Another res than 64 resamples the encoder's posemb.
    c.model_init = demo.DEMO_ENCODER
    c.model_load.only = "img"

  c.model = dict(
      img=image_tower(a.res, a.patch),
      # Token embeddings start at unit RMS after Gemma's x sqrt(width), like the image tokens.
      # With big_vision's 0.01 they are 7x smaller: attention outputs (mostly the 16 image
      # tokens' values) drown each text token's identity, and training makes the image
      # tokens constant (the ViT collapses, the model ignores the image). A key/value head
      # per query head (Gemma 2B shares one): "which shape is red?" 0.90 vs 0.74 with one.
      llm=dict(vocab_size=1664, width=LLM_WIDTH, depth=3, mlp_dim=512, num_heads=3,
               num_kv_heads=3, head_dim=64, scan=True, embed_init_std=LLM_WIDTH ** -0.5),
  )
  c.sharding_rules = "replicate"
  c.optax_name = "adam"
  c.optax = dict(b2=0.98)
  c.lr = 2e-3
  schedule = dict(decay_type="cosine", warmup_steps=2 if smoke else 100)
  if a.encoder == "pretrained":
    # The pretrained tower stays as it is and its projector learns (XLA then skips the
    # tower's backward pass). Trained at the LLM's rate (with num_kv_heads=1) it did worse:
    # CIDEr 3.36 vs 5.36, AP50 0.81 vs 0.89; at a tenth of it, about the same as frozen.
    del c["schedule"]  # A list replaces the base config's dict (ConfigDict keeps types).
    c.schedule = [(FROZEN_TOWER, None), (".*", schedule)]
  else:
    c.schedule = schedule
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
