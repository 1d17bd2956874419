r"""PaliGemma transfer to COCO captions (big_vision's transfers/cococap.py).

  python train.py --config configs/cococap.py:variant=pg2_3b,res=448 --workdir runs/cococap
  python train.py --config configs/cococap.py:mode=local --workdir /tmp/cococap_try

args: variant = pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py), res = 224 |
448 | 896, mode = full | local (batch 8, 10 steps, 16 eval examples), final_split = train on
train+restval (default: train[:98%]+restval, keeping train[-2%:] as minival), beam_size =
caption decoding beams (big_vision: 2; 1 = greedy).

Data: TFDS coco_captions (Karpathy splits; `tfds build coco_captions`, $TFDS_DATA_DIR).
One epoch = one random caption per image; choice_no_replacement cycles through each
image's (about 5) captions, so the 5 epochs see every caption about once.
Split sizes: train 82,783, restval 30,504, val 5,000; train[:98%] = 81,127 (TFDS rounds
percent slices to the closest record).

Hyper-parameters: big_vision's sweep_best (the published PaliGemma 1 numbers, CIDEr 141.9
at 224 / 144.6 at 448): lr 1e-5, wd 1e-6, 5 epochs, batch 256, scale_by_adam(b2=0.999),
cosine with 5% warmup, grad clip 1, no label smoothing, no dropout. big_vision's configs
give no 896 or PaliGemma 2 per-size settings for this task: they use the same recipe (the
PaliGemma 2 report sweeps the learning rate per model size: sweep it for pg2_10b/pg2_28b).
Steps: 5 * 111,631 / 256 = 2,180 (final_split: 5 * 113,287 / 256 = 2,213).

Evals (big_vision's, without nocaps, which needs big_vision's own TFDS builder): caption
metrics (CIDEr, BLEU-4, ROUGE-L) on minitrain train[:2%], minival train[-2%:] and val every
10% of the run; teacher-forced perplexity on the same splits every 5%.
"""
from big_vision_lite.data import pp_text
from configs import transfer_common as tc

TEXT_LEN = 32
BATCH_SIZE = 256
EPOCHS = 5
TRAIN_SIZE = 82_783
RESTVAL_SIZE = 30_504
TRAIN_98_SIZE = 81_127  # round(0.98 * 82,783), TFDS's "closest" rounding of train[:98%].
PREFIX = "caption en"


def train_split(final_split: bool) -> tuple[str, int]:
  """(TFDS split, number of images) of the training data."""
  if final_split:
    return "train+restval", TRAIN_SIZE + RESTVAL_SIZE
  return "train[:98%]+restval", TRAIN_98_SIZE + RESTVAL_SIZE


def train_pp(res: int, text_len: int = TEXT_LEN) -> str:
  return "|".join([
      "flatten", "decode", f"resize({res})", "value_range(-1, 1)",
      'choice_no_replacement(inkey="captions/text", outkey="suffix")',
      f'strfmt("{PREFIX}", outkey="prefix")',
      pp_text.combine_and_keep_train(text_len),
  ])


def eval_pp(res: int) -> str:
  """Prompt + ground truth for the caption evaluator: id, captions (all references)."""
  return "|".join([
      "flatten", 'copy("captions/text", "captions")', 'copy("image/id", "id")',
      "decode", f"resize({res})", "value_range(-1, 1)",
      f'strfmt("{PREFIX}", outkey="prefix")',
      'keep("image", "prefix", "id", "captions")',
  ])


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/cococap.py", variant="pg1_3b", res=224, mode="full",
                    final_split=False, beam_size=2)
  if a.beam_size < 1:
    raise ValueError(f"configs/cococap.py: beam_size must be >= 1, got {a.beam_size}")
  local = a.mode == "local"
  c = tc.base_config(a, task="cococap")

  split, num_images = train_split(a.final_split)
  c.input.data = dict(name="coco_captions", split=split)
  c.input.pp = train_pp(a.res)
  c.input.text_len = TEXT_LEN
  c.input.batch_size = BATCH_SIZE
  c.total_steps = tc.train_steps(EPOCHS, num_images, BATCH_SIZE)

  c.optax = dict(b2=0.999)
  c.lr = 1e-5
  c.wd = 1e-6
  c.label_smoothing = 0.0

  decode_every, pplx_every = tc.every(0.1, c.total_steps), tc.every(0.05, c.total_steps)
  c.eval_steps = decode_every
  evals = {}
  for name, eval_split in (("minitrain", "train[:2%]"), ("minival", "train[-2%:]"),
                           ("val", "val")):
    data = dict(name="coco_captions", split=eval_split)
    evals[name] = tc.decode_eval(
        "caption", data, eval_pp(a.res), res=a.res, max_decode_len=TEXT_LEN,
        every_steps=decode_every, local=local, beam_size=a.beam_size)
    evals[f"{name}_pplx"] = tc.perplexity_eval(
        data, train_pp(a.res), res=a.res, every_steps=pplx_every, local=local)
  c.evals = evals
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/cococap.py[:arg] --workdir ROOT"""
  tc.add_sweep(add, get_config(arg), published_res=(224, 448))


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["val/cider", "minival/cider", "minival_pplx/perplexity"]
