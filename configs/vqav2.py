r"""PaliGemma transfer to VQAv2 (big_vision's transfers/vqav2.py).

  python train.py --config configs/vqav2.py:variant=pg2_3b,res=224 --workdir runs/vqav2

args: variant = pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py), res = 224 |
448 | 896, mode = full | local (batch 8, 10 steps, 16 eval examples), final_split = train on
train+validation (default: keep validation[-10240:] out as minival).

Data: big_vision's TFDS builder "vqa" (big_vision/datasets/vqa/vqa.py: one example per
question, COCO 2014 images; build it with `tfds build` into $TFDS_DATA_DIR). Split sizes:
train 443,757, validation 214,354 questions (the official VQAv2 counts).

Hyper-parameters: big_vision's sweep_best (PaliGemma 1: 83.2 at 224 / 85.6 at 448 on
test-std): lr 1e-5, 10 epochs, batch 256, wd 1e-6 at 224 and 0 at 448 (896 uses 448's),
scale_by_adam, cosine with 5% warmup, grad clip 1, no label smoothing or dropout.
PaliGemma 2 variants use the same recipe (no per-size settings are published in
big_vision's configs; sweep the learning rate for pg2_10b / pg2_28b).
Steps: 10 * 647,871 / 256 = 25,307 (final_split: 10 * 658,111 / 256 = 25,707).

Evals: VQAv2 accuracy (+ exact match, per answer type) on minitrain train[:5120] and minival
validation[-10240:] every 25% of the run; perplexity on train[:20864] and minival, every 25%.
big_vision's test/test-dev prediction dump for the evaluation server is not an evaluator
here: those splits have no answers (use evaluate.py/predict.py to write predictions).
"""
from big_vision_lite.data import pp_text
from configs import transfer_common as tc

TEXT_LEN = 32
BATCH_SIZE = 256
EPOCHS = 10
TRAIN_SIZE = 443_757
VALIDATION_SIZE = 214_354
MINIVAL_SIZE = 10_240
PROMPT = "answer en {question_text}"


def train_split(final_split: bool) -> tuple[str, int]:
  """(TFDS split, number of questions) of the training data."""
  if final_split:
    return "train+validation", TRAIN_SIZE + VALIDATION_SIZE
  return f"train+validation[:-{MINIVAL_SIZE}]", TRAIN_SIZE + VALIDATION_SIZE - MINIVAL_SIZE


def _image(res: int) -> str:
  return f"decode|resize({res}, antialias=True)|value_range(-1, 1)"


def train_pp(res: int, text_len: int = TEXT_LEN) -> str:
  return "|".join([
      _image(res),
      f'strfmt("{PROMPT}", outkey="prefix")',
      'choice_no_replacement(inkey="answers", outkey="suffix")',
      pp_text.combine_and_keep_train(text_len),
  ])


def eval_pp(res: int) -> str:
  """Prompt + ground truth for the vqav2 evaluator: id (question_id), the 10 answers, types."""
  return "|".join([
      _image(res),
      f'strfmt("{PROMPT}", outkey="prefix")',
      'copy("question_id", "id")',
      'keep("image", "prefix", "id", "answers", "answer_type", "question_type", '
      '"question_text")',
  ])


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/vqav2.py", variant="pg1_3b", res=224, mode="full",
                    final_split=False)
  local = a.mode == "local"
  c = tc.base_config(a, task="vqav2")

  split, num_questions = train_split(a.final_split)
  c.input.data = dict(name="vqa", split=split)
  c.input.pp = train_pp(a.res)
  c.input.text_len = TEXT_LEN
  c.input.batch_size = BATCH_SIZE
  c.total_steps = tc.train_steps(EPOCHS, num_questions, BATCH_SIZE)

  c.optax = {}
  c.lr = 1e-5
  c.wd = 1e-6 if a.res == 224 else 0.0
  c.label_smoothing = 0.0

  period = tc.every(0.25, c.total_steps)
  c.eval_steps = period
  minival = f"validation[-{MINIVAL_SIZE}:]"
  evals = {}
  for name, split in (("minitrain", "train[:5120]"), ("minival", minival)):
    evals[name] = tc.decode_eval(
        "vqav2", dict(name="vqa", split=split), eval_pp(a.res), res=a.res,
        max_decode_len=TEXT_LEN, every_steps=period, local=local)
  for name, split in (("minitrain_pplx", "train[:20864]"), ("minival_pplx", minival)):
    evals[name] = tc.perplexity_eval(dict(name="vqa", split=split), train_pp(a.res),
                                     res=a.res, every_steps=period, local=local)
  c.evals = evals
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/vqav2.py[:arg] --workdir ROOT"""
  tc.add_sweep(add, get_config(arg), published_res=(224, 448))


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["minival/vqa_accuracy", "minitrain/vqa_accuracy", "minival_pplx/perplexity"]
