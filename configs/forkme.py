r"""Fine-tune PaliGemma on your own data in JSON-lines files: the config to copy and edit.

  python train.py --workdir runs/mine --config \
      configs/forkme.py:train_data=data/train.jsonl,val_data=data/val.jsonl,variant=pg2_3b
  # Offline smoke run: a tiny random model and the demo tokenizer (no checkpoint needed).
  python train.py --workdir /tmp/forkme_smoke --config \
      configs/forkme.py:train_data=data/train.jsonl,variant=tiny,res=56,mode=local

Data: one JSON object per line, e.g.
  {"image": "images/0001.jpg", "prefix": "caption en", "suffix": "A dog on a red sofa."}
"image" is a path relative to the .jsonl file's folder; "prefix" is the prompt the model
sees, "suffix" the text it learns to produce (an "id" field is optional). Lines are counted
when the config is built: an epoch is one pass over train_data.

args (what changes several settings at once; tune the rest with --config.lr=3e-5 etc.):
  train_data  path of the training .jsonl (required)
  val_data    path of a validation .jsonl ("" = no evals)
  variant     pg1_3b | pg2_3b | pg2_10b | pg2_28b (configs/transfer_common.py: pretrained
              checkpoint and tokenizer from $BVL_CHECKPOINT_DIR), or tiny: a small random
              model, the demo SentencePiece tokenizer (trained in the workdir, offline), no
              model_init, lr 1e-3: only to check that data and pipeline work end to end
  res         image size: 224 | 448 | 896 for the pretrained variants, any multiple of 14
              for tiny
  mode        full | local (batch 8, 10 steps, 16 validation examples)
  text_len    prefix + suffix tokens (longer examples are truncated and counted)
  batch_size, epochs, freeze_vit / freeze_llm (no updates for img/* or llm/* params)

Hyper-parameters: big_vision's forkme.py (designed for small JSONL datasets): 15 epochs,
batch 32, lr 1e-5, wd 3e-7, scale_by_adam, cosine with 5% warmup, grad clip 1.
Evals on val_data: teacher-forced perplexity every 10% of the run, and decoding with
exact-match / ANLS of the prediction against the suffix every 50% (predictions.jsonl in
the workdir's eval folders holds every prediction next to its prefix).
"""
from big_vision_lite.data import pp_text
from big_vision_lite.data import sources
from configs import common
from configs import transfer_common as tc

TINY_VOCAB = 512 + 1024 + 128  # The demo tokenizer's pieces + <loc> + <seg>.
TINY_MODEL = dict(
    img=dict(patch_size=(14, 14), width=64, depth=2, mlp_dim=128, num_heads=2,
             head_zeroinit=False, scan=True),
    llm=dict(vocab_size=TINY_VOCAB, width=64, depth=2, mlp_dim=128, num_heads=2,
             num_kv_heads=1, head_dim=32, scan=True),
)


def _image(res: int) -> str:
  return f"decode|resize({res}, antialias=True)|value_range(-1, 1)"


def train_pp(res: int, text_len: int) -> str:
  # The prefix and suffix come straight from the JSON line.
  return "|".join([_image(res), pp_text.combine_and_keep_train(text_len)])


def eval_pp(res: int) -> str:
  """Prompt + the suffix as the one reference answer of the vqa evaluator."""
  return "|".join([_image(res), 'copy("suffix", "answer")',
                   'keep("image", "prefix", "id", "answer")'])


def _jsonl(path: str) -> dict:
  return dict(name="jsonl", path=path, split=None)


def get_config(arg=None):
  a = tc.parse_args(arg, "configs/forkme.py", variants=(*tc.VARIANTS, "tiny"),
                    train_data="", val_data="", variant="pg1_3b", res=224, mode="full",
                    text_len=128, batch_size=32, epochs=15.0, freeze_vit=False,
                    freeze_llm=False)
  if not a.train_data:
    raise ValueError("configs/forkme.py: pass train_data=path/to/train.jsonl (one JSON object "
                     'per line: {"image": ..., "prefix": ..., "suffix": ...})')
  if a.variant == "tiny" and (a.res < 14 or a.res % 14):
    raise ValueError(f"configs/forkme.py: variant=tiny needs res a multiple of 14, got {a.res}")
  for key in ("text_len", "batch_size"):
    if a[key] < 1:
      raise ValueError(f"configs/forkme.py: {key} must be >= 1, got {a[key]}")
  if a.epochs <= 0:
    raise ValueError(f"configs/forkme.py: epochs must be > 0, got {a.epochs}")
  local = a.mode == "local"

  if a.variant == "tiny":
    c = common.base_config()
    c.name = f"forkme_tiny_{a.res}"
    c.model = {"img": dict(TINY_MODEL["img"], image_size=a.res), "llm": TINY_MODEL["llm"]}
    c.model_init = None
    c.tokenizer = "demo"
    c.sharding_rules = "replicate"
    c.optax_name = "scale_by_adam"
    c.wd_mults = [(".*/kernel$", 1.0)]
    c.input.skip_bad_examples = True
  else:
    c = tc.base_config(a, task="forkme")

  num_examples = len(sources.JsonlSource(a.train_data))  # Also: the file must exist.
  c.input.data = _jsonl(a.train_data)
  c.input.pp = train_pp(a.res, a.text_len)
  c.input.text_len = a.text_len
  c.input.batch_size = a.batch_size
  c.input.shuffle_buffer_size = 1000
  c.total_steps = tc.train_steps(a.epochs, num_examples, a.batch_size)

  # A random tiny model needs a from-scratch learning rate to show its loss going down.
  c.lr = 1e-3 if a.variant == "tiny" else 1e-5
  c.wd = 3e-7
  c.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  sched = dict(decay_type="cosine", warmup_percent=0.05)
  if a.freeze_vit or a.freeze_llm:
    # (regex, schedule | None) rules: None freezes the matching params (optim.py).
    del c["schedule"]  # A list replaces the base config's dict (ConfigDict keeps types).
    c.schedule = [("img/.*", None if a.freeze_vit else sched),
                  ("llm/.*", None if a.freeze_llm else sched)]
  else:
    c.schedule = sched
  c.log_steps = 1  # Small datasets: few steps, log all of them.
  c.ckpt_steps = 200

  pplx_every, decode_every = tc.every(0.1, c.total_steps), tc.every(0.5, c.total_steps)
  c.eval_steps = pplx_every
  c.evals = {}
  if a.val_data:
    # Eval batches by resolution (tc.EVAL_BATCH); tiny takes the smallest (896's).
    res = a.res if a.res in tc.EVAL_BATCH else max(tc.EVAL_BATCH)
    val = dict(_jsonl(a.val_data), split="[:]")
    c.evals = {
        "val_pplx": tc.perplexity_eval(val, train_pp(a.res, a.text_len), res=res,
                                       every_steps=pplx_every, local=local),
        "val": tc.decode_eval("vqa", val, eval_pp(a.res), res=res, max_decode_len=a.text_len,
                              every_steps=decode_every, local=local,
                              metrics=("exact_match", "anls")),
    }
  return tc.finish(c, local)


def sweep(add, arg=None):
  """python -m big_vision_lite.sweep --config configs/forkme.py:train_data=...,... --workdir ROOT

  The learning rate x1/3, x1, x3.
  """
  tc.add_sweep(add, get_config(arg))


def metrics(arg=None):
  """The sweep report's columns (the first one ranks the runs): val metrics when there are."""
  if get_config(arg).evals:
    return ["val/anls", "val/exact_match", "val_pplx/perplexity"]
  return ["loss"]
