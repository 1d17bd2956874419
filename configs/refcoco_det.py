r"""PaliGemma transfer to RefCOCO referring-expression detection (boxes via the detect prompt).

  python train.py --config configs/refcoco_det.py:variant=pg2_3b,res=448 --workdir runs/rec

args: variant = pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py), res = 224 |
448 | 896 (default 448), mode = full | local (batch 8, 10 steps, 16 eval examples).

Task: prefix "detect <sentence>", suffix "<loc>"x4 + " <sentence>" (PaliGemma's detection
output format, the referring sentence as the label). big_vision publishes no detection-only
RefCOCO transfer: data, splits and hyper-parameters are those of its refcoco_seg transfer
(configs/refcoco_seg.py: refcocox_combined train, about 24,400 images, 100 epochs, label
smoothing 0.3, lr/dropout/batch per resolution), with the segmentation target replaced by
the box. Texts are longer (the sentence appears twice): text_len 64.

Evals (the splits of big_vision's refcoco_seg evaluator; ref_coco_bv *_flat splits, one
example per sentence): RefCOCO accuracy@0.5 IoU of the first predicted box (+ mean IoU) on
refcoco val every 20% of the run, and on refcoco testA/testB, refcoco+ val/testA/testB,
refcocog val/test at the end; perplexity on train[:5%] and the combined validation split.
"""
from big_vision_lite.data import pp_text
from configs import refcoco_seg
from configs import transfer_common as tc

TEXT_LEN = 64
PROMPT = "detect"
# (eval name, TFDS dataset, split, evaluated every 20% of the run or only at the end).
EVAL_SPLITS = (
    ("refcoco_val", "ref_coco_bv/refcoco_unc:1.4.0", "validation_flat", True),
    ("refcoco_testA", "ref_coco_bv/refcoco_unc:1.4.0", "testA_flat", False),
    ("refcoco_testB", "ref_coco_bv/refcoco_unc:1.4.0", "testB_flat", False),
    ("refcocop_val", "ref_coco_bv/refcocoplus_unc:1.4.0", "validation_flat", False),
    ("refcocop_testA", "ref_coco_bv/refcocoplus_unc:1.4.0", "testA_flat", False),
    ("refcocop_testB", "ref_coco_bv/refcocoplus_unc:1.4.0", "testB_flat", False),
    ("refcocog_val", "ref_coco_bv/refcocog_umd:1.4.0", "validation_flat", False),
    ("refcocog_test", "ref_coco_bv/refcocog_umd:1.4.0", "test_flat", False),
)


def train_pp(res: int, text_len: int = TEXT_LEN) -> str:
  return "|".join([
      "flatten",
      'choice_no_replacement(key=["objects/bbox", "objects/refs/sentence"])',
      'choice(key=["objects/refs/sentence"])',
      "decode", f"resize({res})", "value_range(-1, 1)",
      'detection_target(bbox_key="objects/bbox", label_key="objects/refs/sentence", '
      f'prompt="{PROMPT}")',
      pp_text.combine_and_keep_train(text_len),
  ])


def eval_pp(res: int) -> str:
  """Prompt + ground truth for the refcoco evaluator (nested "objects", bbox float[1,4]).

  A *_flat example holds one object with one sentence; the two choices turn its
  objects/refs/{sentence,id} from [[x]] into x. The sentence id is unique per example (the
  image id is not: an image has several referred objects).
  """
  refs = '["objects/refs/sentence", "objects/refs/id"]'
  return "|".join([
      f"choice(key={refs})", f"choice(key={refs})", 'copy("objects/refs/id", "id")',
      "decode", f"resize({res})", "value_range(-1, 1)",
      f'strfmt("{PROMPT} {{objects/refs/sentence}}", outkey="prefix")',
      'keep("image", "prefix", "id", "objects", "height", "width")',
  ])


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/refcoco_det.py", variant="pg1_3b", res=448, mode="full")
  local = a.mode == "local"
  lr, llm_dropout, batch_size = refcoco_seg.PER_RES[a.res]
  c = tc.base_config(a, task="refcoco_det", llm_dropout=llm_dropout)

  c.input.data = dict(name=refcoco_seg.TRAIN_DATA, split="train")
  c.input.pp = train_pp(a.res)
  c.input.text_len = TEXT_LEN
  c.input.batch_size = batch_size
  c.total_steps = tc.train_steps(refcoco_seg.EPOCHS, refcoco_seg.TRAIN_SIZE, batch_size)

  c.optax = dict(b2=0.999)
  c.lr = lr
  c.wd = 0.0
  c.label_smoothing = 0.3

  decode_every, pplx_every = tc.every(0.2, c.total_steps), tc.every(0.05, c.total_steps)
  c.eval_steps = decode_every
  evals = {}
  for name, dataset, split, periodic in EVAL_SPLITS:
    evals[name] = tc.decode_eval(
        "refcoco", dict(name=dataset, split=split), eval_pp(a.res), res=a.res,
        max_decode_len=TEXT_LEN, every_steps=decode_every if periodic else 0, local=local,
        iou_thresholds=(0.5,))
  for name, split in (("minitrain_pplx", "train[:5%]"), ("val_pplx", "validation")):
    evals[name] = tc.perplexity_eval(dict(name=refcoco_seg.TRAIN_DATA, split=split),
                                     train_pp(a.res), res=a.res, every_steps=pplx_every,
                                     local=local)
  c.evals = evals
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/refcoco_det.py[:arg] --workdir ROOT"""
  tc.add_sweep(add, get_config(arg))


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["refcoco_val/acc@0.5", "refcoco_val/mean_iou", "val_pplx/perplexity"]
