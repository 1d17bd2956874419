"""The embedded default: a tiny PaliGemma trained from scratch on the demo's four tasks.

  python train.py --config configs/demo.py --workdir runs/demo
  python train.py --config configs/demo.py:mode=smoke --workdir /tmp/demo_smoke

The synthetic shapes dataset (big_vision_lite/data/demo.py) needs no download; the demo
tokenizer is trained on first use and the demo mask VQ-VAE ships with the repository.
args: mode = full (the README's main job, ~10 CPU minutes) | smoke (tests: seconds);
res = image size in pixels.
"""
from configs import common
from big_vision_lite.data import demo

TEXT_LEN = 40  # Longest demo target: 3 detected objects (3 x (4 <loc> + label) + separators).


def get_config(arg=None):
  a = common.parse_arg(arg, mode="full", res=64)
  smoke = a.mode == "smoke"
  if a.mode not in ("full", "smoke"):
    raise ValueError(f"configs/demo.py: mode must be 'full' or 'smoke', got {a.mode!r}")
  c = common.base_config()
  c.name = "demo"
  c.total_steps = 20 if smoke else 3000
  c.log_steps = 5 if smoke else 100
  c.ckpt_steps = 10 if smoke else 1000
  c.eval_steps = 20 if smoke else 1000

  c.input.batch_size = 8 if smoke else 32
  c.input.text_len = TEXT_LEN
  c.input.update(demo.demo_mixture(image_size=a.res, text_len=TEXT_LEN))
  c.input.shuffle_buffer_size = 0  # The demo stream is already random per index.
  c.tokenizer = "demo"
  c.vqvae = "demo"

  c.model = dict(
      img=dict(patch_size=(8, 8), width=128, depth=3, mlp_dim=384, num_heads=4,
               image_size=a.res, head_zeroinit=False, scan=True),
      llm=dict(vocab_size=1664, width=192, depth=3, mlp_dim=512, num_heads=3,
               num_kv_heads=1, head_dim=64, scan=True),
  )
  c.sharding_rules = "replicate"
  c.optax_name = "adam"
  c.optax = dict(b2=0.98)
  c.lr = 2e-3
  c.schedule = dict(decay_type="cosine", warmup_steps=100 if not smoke else 2)
  c.grad_clip_norm = 1.0
  c.loss_reduction = "per_token"

  n_val = 16 if smoke else 200
  val = lambda task: dict(name="demo", split=f"val[:{n_val}]", image_size=a.res)
  common_eval = dict(batch_size=16 if smoke else 50, max_decode_len=TEXT_LEN)
  c.evals = dict(
      caption=dict(type="caption", data=val("caption"),
                   pp=demo.demo_pp("caption", image_size=a.res, text_len=TEXT_LEN, train=False),
                   **common_eval),
      vqa=dict(type="vqa", data=val("vqa"),
               pp=demo.demo_pp("vqa", image_size=a.res, text_len=TEXT_LEN, train=False),
               **common_eval),
      detection=dict(type="detection", data=val("detect"),
                     pp=demo.demo_pp("detect", image_size=a.res, text_len=TEXT_LEN, train=False),
                     **common_eval),
      segmentation=dict(type="segmentation", data=val("segment"),
                        pp=demo.demo_pp("segment", image_size=a.res, text_len=TEXT_LEN,
                                        train=False),
                        **common_eval),
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
  return ["caption/cider", "vqa/vqa_accuracy", "detection/map", "segmentation/miou", "loss"]
