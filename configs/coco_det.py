r"""PaliGemma transfer to COCO object detection (boxes via the detect prompt, all 80 classes).

  python train.py --config configs/coco_det.py:variant=pg2_3b,res=448 --workdir runs/cocodet

args: variant = pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py), res = 224 |
448 | 896 (default 448), mode = full | local (batch 8, 10 steps, 16 eval examples).

Task: prefix "detect person ; bicycle ; ... ; toothbrush" (all 80 COCO category names, the
same prompt for every image, so that evaluation asks for every class without using the
ground truth), suffix "<loc>"x4 + " <name>" per object, " ; " between objects, in the
dataset's order (PaliGemma's detection output format). About 185 prompt tokens; text_len
512 leaves room for ~50 objects; longer targets are truncated and counted
(truncated_examples in the train log). Images without objects (~1% of train) are skipped
and counted. Crowd boxes are targets too (TFDS keeps them; there is no filter op).

Data: TFDS coco/2017 (`tfds build coco/2017`, $TFDS_DATA_DIR): train 118,287 images,
validation 5,000.

Hyper-parameters: big_vision publishes no COCO detection transfer. We use its refcoco_seg
recipe (configs/refcoco_seg.py: lr / LLM dropout / batch per resolution, label smoothing 0.3,
scale_by_adam(b2=0.999), cosine 5% warmup, grad clip 1, no weight decay) for 10 epochs:
224 / 448: batch 256 -> 4,621 steps; 896: batch 64 -> 18,482 steps.

Evals: teacher-forced perplexity on train[:1%] and validation, every 10% of the run.
COCO mAP (the `detection` evaluator) is not configured yet: coco/2017 examples carry class
ids and no original image size, and the pipeline has no op yet to turn ids into names or to
record the image's height/width, which the evaluator needs (pixel boxes, COCO areas).
"""
from big_vision_lite.data import pp_text
from configs import refcoco_seg
from configs import transfer_common as tc

TEXT_LEN = 512
EPOCHS = 10
TRAIN_SIZE = 118_287
DATA = "coco/2017"
# TFDS coco/2017 ClassLabel names (the annotation file's categories, in category-id order).
CATEGORIES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
PROMPT = "detect " + " ; ".join(CATEGORIES)


def train_pp(res: int, text_len: int = TEXT_LEN) -> str:
  return "|".join([
      "decode", f"resize({res})", "value_range(-1, 1)",
      # Boxes + names -> suffix; the prefix it writes (the image's own classes) is then
      # replaced by the fixed all-classes prompt.
      'detection_target(bbox_key="objects/bbox", label_key="objects/label", '
      f"label_names={list(CATEGORIES)!r})",
      f'strfmt("{PROMPT}", outkey="prefix")',
      pp_text.combine_and_keep_train(text_len),
  ])


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/coco_det.py", variant="pg1_3b", res=448, mode="full")
  local = a.mode == "local"
  lr, llm_dropout, batch_size = refcoco_seg.PER_RES[a.res]
  c = tc.base_config(a, task="coco_det", llm_dropout=llm_dropout)

  c.input.data = dict(name=DATA, split="train")
  c.input.pp = train_pp(a.res)
  c.input.text_len = TEXT_LEN
  c.input.batch_size = batch_size
  c.total_steps = tc.train_steps(EPOCHS, TRAIN_SIZE, batch_size)

  c.optax = dict(b2=0.999)
  c.lr = lr
  c.wd = 0.0
  c.label_smoothing = 0.3

  period = tc.every(0.1, c.total_steps)
  c.eval_steps = period
  c.evals = {
      name: tc.perplexity_eval(dict(name=DATA, split=split), train_pp(a.res), res=a.res,
                               every_steps=period, local=local)
      for name, split in (("minitrain_pplx", "train[:1%]"), ("val_pplx", "validation"))
  }
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/coco_det.py[:arg] --workdir ROOT"""
  tc.add_sweep(add, get_config(arg))


def metrics(arg=None):
  """The sweep report's columns; the first one ranks the runs."""
  del arg
  return ["val_pplx/perplexity", "minitrain_pplx/perplexity"]
