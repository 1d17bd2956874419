r"""PaliGemma transfer to RefCOCO referring segmentation (big_vision's transfers/refcoco_seg.py).

  python train.py --config configs/refcoco_seg.py:variant=pg1_3b,res=448 --workdir runs/seg

args: variant = pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py), res = 224 |
448 | 896 (default 448, as big_vision), mode = full | local (batch 8, 10 steps, 16 eval
examples).

Task (exactly big_vision's refcoco_mask2str): prefix = the referring sentence (no "segment"
keyword), suffix = "<loc>"x4 box + "<seg>"x16 VQ-VAE codes of the mask cropped to its box.
The mask encoder is the VQ-VAE of config.vqvae ($BVL_CHECKPOINT_DIR/vae-oid.npz, big_vision's
gs://big_vision/paligemma/vae-oid.npz).

Data: big_vision's TFDS builder ref_coco_bv (big_vision/datasets/refcoco/refcoco.py, v1.4.0):
train on refcocox_combined (RefCOCO + RefCOCO+ + RefCOCOg-umd, val/test images removed), one
random object (and one of its sentences) per image and epoch. Its train split has about
24,400 images: big_vision lists train[:5%] as 1,220, so 24,390 <= n < 24,410 (TFDS rounds to
the closest record); we use 24,400, at most 1 step per 25 epochs off.

Hyper-parameters: big_vision's sweep_best (PaliGemma 1 mIoU refcoco/+/g val: 73.4/68.3/67.7 at
224, 75.6/69.8/70.2 at 448, 76.9/72.2/72.2 at 896): 100 epochs, label smoothing 0.3,
scale_by_adam(b2=0.999), cosine 5% warmup, grad clip 1, no weight decay; per resolution
  224: lr 3e-5, LLM dropout 0.1, batch 256 -> 9,531 steps
  448: lr 1e-5, no dropout,      batch 256 -> 9,531 steps
  896: lr 1e-5, no dropout,      batch 64  -> 38,125 steps.
PaliGemma 2 variants use the same recipe (no per-size settings are published in
big_vision's configs; sweep the learning rate for pg2_10b / pg2_28b).

Evals: teacher-forced perplexity on train[:5%] and the combined validation split, every 5%.
big_vision's decoding evaluator (mIoU on refcoco/+/g val/test) is not configured yet: its
ground-truth masks are uint8[1,H,W,3] in {0, 255} (big_vision reads mask[..., 0] > 0), which
big_vision_lite's segmentation evaluator does not accept yet (it wants bool[1,H,W]).
"""
from big_vision_lite.data import pp_text
from configs import transfer_common as tc

TEXT_LEN = 48
EPOCHS = 100
TRAIN_SIZE = 24_400  # refcocox_combined train images (see the module docstring).
TRAIN_DATA = "ref_coco_bv/refcocox_combined:1.4.0"
# res -> (lr, LLM dropout, batch size) of big_vision's sweep_best.
PER_RES = {224: (3e-5, 0.1, 256), 448: (1e-5, 0.0, 256), 896: (1e-5, 0.0, 64)}
OBJECT_KEYS = '["objects/mask", "objects/bbox", "objects/refs/sentence"]'


def train_pp(res: int, text_len: int = TEXT_LEN) -> str:
  return "|".join([
      "flatten",
      f"choice_no_replacement(key={OBJECT_KEYS})",  # One object per image and epoch.
      'choice(key=["objects/refs/sentence"])',       # One of its sentences.
      "decode", f"resize({res})", "value_range(-1, 1)",
      "refcoco_mask2str",
      pp_text.combine_and_keep_train(text_len),
  ])


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/refcoco_seg.py", variant="pg1_3b", res=448, mode="full")
  local = a.mode == "local"
  lr, llm_dropout, batch_size = PER_RES[a.res]
  c = tc.base_config(a, task="refcoco_seg", llm_dropout=llm_dropout)
  c.vqvae = tc.checkpoint_file("vae-oid.npz")

  c.input.data = dict(name=TRAIN_DATA, split="train")
  c.input.pp = train_pp(a.res)
  c.input.text_len = TEXT_LEN
  c.input.batch_size = batch_size
  c.total_steps = tc.train_steps(EPOCHS, TRAIN_SIZE, batch_size)

  c.optax = dict(b2=0.999)
  c.lr = lr
  c.wd = 0.0
  c.label_smoothing = 0.3

  period = tc.every(0.05, c.total_steps)
  c.eval_steps = period
  c.evals = {
      name: tc.perplexity_eval(dict(name=TRAIN_DATA, split=split), train_pp(a.res), res=a.res,
                               every_steps=period, local=local)
      for name, split in (("minitrain_pplx", "train[:5%]"), ("val_pplx", "validation"))
  }
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/refcoco_seg.py[:arg] --workdir ROOT"""
  tc.add_sweep(add, get_config(arg), published_res=tc.RESOLUTIONS)


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["val_pplx/perplexity", "minitrain_pplx/perplexity"]
