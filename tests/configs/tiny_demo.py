"""A seconds-long demo run for trainer tests: tiny model, no evaluators (tests pass args)."""
from configs import common
from configs import demo


def get_config(arg=None):
  a = common.parse_arg(arg, steps=8, ckpt=4, lr=1e-3, evals=False)
  c = demo.get_config("mode=smoke,res=32,encoder=scratch")  # A smaller tower than the shipped one.
  c.total_steps = a.steps
  c.ckpt_steps = a.ckpt
  c.log_steps = 2
  c.lr = a.lr
  c.input.batch_size = 4
  c.input.prefetch = 1
  c.model.img.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  c.model.llm.update(width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)
  if not a.evals:
    c.evals = {}
    c.final_baseline = False
  return c
