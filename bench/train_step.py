"""One PaliGemma training step, big_vision_lite vs transformers + torch, in one process.

  python bench/train_step.py                    # CPU, the issue's shapes, float32
  python bench/train_step.py --ablate --profile /tmp/trace   # + each perf fix, + profile
  python bench/train_step.py --device gpu       # PaliGemma 3B shapes, bfloat16, CUDA

Both sides run the same model with the same weights (bench/paligemma_pair.py), the same batch
(8 x [224 px image + 64 text tokens: 16 prefix, 48 suffix]), the same loss (mean token
cross-entropy over the suffix, logits over the whole vocabulary in float32) and the same
optimizer (Adam, no weight decay; float32 states on CPU). Ours: the trainer's own step
(train_step.make_train_step + optim.make_optimizer), AOT-compiled with the state donated.
Reference: PaliGemmaForConditionalGeneration(logits_to_keep=text) + F.cross_entropy +
torch.optim.Adam. The fastest reference transformers offers here is picked by timing
(--hf_attn/--hf_adam auto): Adam "foreach" vs "fused" on the optimizer step alone, then
"eager" vs "sdpa" attention on one full step each.

Timing: after warm-up, ours, the reference (and with --ablate our step without each perf
fix) and a matmul chain alternate --runs times; reported are medians and the median of
per-round ratios. MFU = analytic model FLOPs (flops.paligemma_train_flops) / (median step
time x matmul peak). CPU peak: measured in the same run (flops.measure_peak_flops, best of
a [2048]^2 matmul chain), also reported against the median of that chain timed between the
steps (it sees the same machine load as the steps). GPU peak: the data sheet's
(flops.device_peak_flops), the measured one reported beside it.

The last line of stdout is one JSON object: {"bench": "train_step", "ratio": ...,
"mfu": ..., "ours_s": ..., "ref_s": ..., ...}.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import paligemma_pair as pair  # noqa: E402  pylint: disable=g-import-not-at-top
import xprof  # noqa: E402  pylint: disable=g-import-not-at-top


def our_step(cfg, params, batch_size, text_len, ablations=()):
  """Big_vision_lite's train step, jitted with the state donated.

  Returns ({name: step_fn() -> metrics}, optimised HLO text, compile seconds): "ours" and
  one function per ablation (the same step compiled without a perf fix, see `_ablated`).
  All share one train state (same tree), so that they may alternate without more memory.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from big_vision_lite import optim, train_step  # pylint: disable=g-import-not-at-top
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  model = paligemma.Model(**cfg)
  opt_cfg = {"optax_name": "scale_by_adam", "lr": 1e-5, "schedule": {"decay_type": "constant"},
             "total_steps": 1000}
  tx, _ = optim.make_optimizer(opt_cfg, params)
  holder = {"state": jax.jit(lambda p: train_step.init_state(p, tx))(params)}
  batch = jax.device_put(pair.make_batch(cfg, batch_size, text_len))
  rng = jax.random.key(0)

  def compile_step():
    return jax.jit(train_step.make_train_step(model, tx, reduction="per_token"),
                   donate_argnums=(0,)).lower(holder["state"], batch, rng).compile()

  def runner(step):
    def run():
      holder["state"], metrics = step(holder["state"], batch, rng)
      return metrics
    return run

  t0 = time.perf_counter()
  step = compile_step()
  compile_s = time.perf_counter() - t0
  fns = {"ours": runner(step)}
  for name in ablations:
    with _ablated(name):
      fns[f"ablate_{name}"] = runner(compile_step())
  return fns, step.as_text(), compile_s


# Our step without a perf fix, to measure what each one buys (bench only: it swaps private
# functions while the step is traced).
ABLATIONS = {
    "no_fused_xent": "without the fused cross-entropy gradient (optim._token_xent)",
    "before_fixes": "without it and without the matmul-friendly weight gradients "
                    "(models/matmul.py): the code before the perf work",
}


def _reference_token_xent(logits, labels, label_smoothing):
  """optim._token_xent as plain autodiff of log_softmax + take_along_axis (the old code)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
  if label_smoothing:
    off = label_smoothing / (logits.shape[-1] - 1)
    loss = (1.0 - label_smoothing - off) * loss - off * jnp.sum(logp, axis=-1)
  return loss


@contextlib.contextmanager
def _ablated(name: str):
  import jax  # pylint: disable=g-import-not-at-top
  from big_vision_lite import optim  # pylint: disable=g-import-not-at-top
  from big_vision_lite.models import matmul  # pylint: disable=g-import-not-at-top
  if name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}; known: {sorted(ABLATIONS)}")
  # jnp.einsum caches its trace per (equation, shapes, dot_general function): without
  # clearing, a variant would silently reuse the other's.
  jax.clear_caches()
  saved = optim._token_xent, matmul._use_custom  # pylint: disable=protected-access
  optim._token_xent = _reference_token_xent  # pylint: disable=protected-access
  if name == "before_fixes":
    matmul._use_custom = lambda dimension_numbers: False  # pylint: disable=protected-access
  try:
    yield
  finally:
    optim._token_xent, matmul._use_custom = saved  # pylint: disable=protected-access
    jax.clear_caches()


def ref_step(cfg, model, batch_size, text_len, device):
  """(step_fn() -> loss, {"foreach"|"fused": Adam}, probe) for transformers + torch.

  step_fn(probe=True) also records the gradient norm; step_fn.adam picks the optimizer.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  inputs = pair.hf_train_inputs(cfg, pair.make_batch(cfg, batch_size, text_len), device)
  labels = inputs.pop("labels")
  model.train()
  params = list(model.parameters())
  adams = {name: torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, fused=fused,
                                  foreach=None if fused else True)
           for name, fused in (("foreach", False), ("fused", True))}
  state = {"adam": "fused", "grad_norm": None}

  def run(probe=False):
    opt = adams[state["adam"]]
    opt.zero_grad(set_to_none=True)
    out = model(**inputs, logits_to_keep=text_len, use_cache=False)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    if probe:
      state["grad_norm"] = float(torch.linalg.vector_norm(torch.stack(
          [torch.linalg.vector_norm(p.grad.float()) for p in params if p.grad is not None])))
    opt.step()
    return loss.detach()
  return run, adams, state


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--text_len", type=int, default=64)
  parser.add_argument("--model", default=None,
                      help='JSON overriding model config keys, e.g. \'{"llm": {"vocab_size": '
                      '1000}}\' (tests run tiny models)')
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--hf_attn", default="auto", choices=("auto", "eager", "sdpa"))
  parser.add_argument("--hf_adam", default="auto", choices=("auto", "foreach", "fused"))
  parser.add_argument("--peak_n", type=int, default=None,
                      help="size of the peak-measuring matmuls (default 2048 CPU, 8192 GPU)")
  parser.add_argument("--skip_ref", action="store_true", help="time ours only")
  parser.add_argument("--ablate", action="store_true",
                      help="also time our step without each perf fix (see ABLATIONS)")
  parser.add_argument("--profile", default=None,
                      help="folder: trace one more of our steps (jax profiler) and report where "
                      "the time goes by op category")
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from big_vision_lite import flops  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  if args.device == "gpu" and jax.devices()[0].platform != "gpu":
    raise SystemExit(f"--device gpu: jax sees {jax.devices()}, no GPU")
  cfg = pair.model_config(args.device, args.model)
  dtype = cfg["llm"].get("dtype", "float32")
  b, t = args.batch_size, args.text_len
  print(f"config: {json.dumps(cfg)}  batch {b} x text {t}", flush=True)

  params = pair.init_params(cfg)
  folder = tempfile.mkdtemp(prefix="bvl_bench_hf_")
  sync_jax = jax.block_until_ready
  sync_torch = (lambda x: torch.cuda.synchronize()) if args.device == "gpu" else (lambda x: x)
  ref_model = None if args.skip_ref else pair.to_transformers(
      cfg, params, folder, device=args.device,
      attn_implementation="eager" if args.hf_attn == "auto" else args.hf_attn)

  ablations = tuple(ABLATIONS) if args.ablate else ()
  fns, hlo_text, compile_s = our_step(cfg, params, b, t, ablations)
  ours = fns["ours"]
  del params
  first = jax.device_get(ours())
  print(f"ours: compiled in {compile_s:.1f} s; first step loss {first['loss']:.6f}, "
        f"grad_norm {first['grad_norm']:.6f}", flush=True)
  for k in fns:
    if k.startswith("ablate_"):
      sync_jax(fns[k]())  # Warm-up.
  ref_choice, check = {}, {}
  if ref_model is not None:
    run, adams, state = ref_step(cfg, ref_model, b, t, args.device)
    loss = float(run(probe=True))  # Also the reference's warm-up.
    check = {"ref_loss": loss, "ref_grad_norm": state["grad_norm"]}
    print(f"ref: first step loss {loss:.6f}, grad_norm {state['grad_norm']:.6f}", flush=True)
    # The fastest reference: Adam kernel timed on the optimizer step alone (gradients of
    # the last step are still there), attention implementations one full step each.
    names = ("foreach", "fused") if args.hf_adam == "auto" else (args.hf_adam,)
    adam_s = pair.interleaved({n: adams[n].step for n in names}, 3, sync_torch)
    state["adam"] = min(names, key=lambda n: pair.median(adam_s[n]))
    print("ref Adam step: " + ", ".join(f"{n} {pair.median(adam_s[n]):.3f} s" for n in names),
          flush=True)
    attns = ("eager", "sdpa") if args.hf_attn == "auto" else (args.hf_attn,)
    attn_s = {}
    for attn in attns:
      ref_model.set_attn_implementation(attn)
      # The second of two steps: a kernel's first call may pay a one-off set-up (seen: sdpa
      # on CUDA, 5.8 s, then well under a second).
      attn_s[attn] = pair.interleaved({"ref": run}, 2 if len(attns) > 1 else 1,
                                      sync_torch)["ref"][-1]
    best = min(attns, key=attn_s.get)
    print("ref attention, one step after one warm-up: "
          + ", ".join(f"{a} {attn_s[a]:.2f} s" for a in attns), flush=True)
    ref_model.set_attn_implementation(best)
    ref_choice = {"hf_attn": best, "hf_adam": state["adam"],
                  "hf_choice_s": {**{f"attn_{a}": round(v, 2) for a, v in attn_s.items()},
                                  **{f"adam_{n}": round(pair.median(v), 3)
                                     for n, v in adam_s.items()}}}
    fns["ref"] = run
  for _ in range(args.warmup):
    sync_jax(ours())

  # The matmul peak, measured now (CPU: the only peak there is; GPU: the data-sheet peak of
  # flops.device_peak_flops is the MFU denominator and the measured one is reported too).
  peak_n = args.peak_n or (2048 if args.device == "cpu" else 8192)
  measured_peak = flops.measure_peak_flops(dtype=dtype, n=peak_n, repeats=10)
  peak = measured_peak if args.device == "cpu" else flops.device_peak_flops(dtype=dtype)
  chain_fn = jax.jit(lambda a: ((a @ a) @ a) @ a)
  x = jnp.ones((peak_n, peak_n), dtype) / peak_n
  sync_jax(chain_fn(x))
  fns["peak_chain"] = lambda: chain_fn(x)
  if ref_model is not None:
    # The same chain in torch (MKL / oneDNN on CPU, cuBLAS on GPU): how fast the reference's
    # matmul library is on this machine, part of any gap between the two steps.
    tx = torch.full((peak_n, peak_n), 1.0 / peak_n, dtype=pair.torch_dtype(cfg),
                    device="cuda" if args.device == "gpu" else "cpu")
    fns["torch_peak_chain"] = lambda: ((tx @ tx) @ tx) @ tx
    sync_torch(fns["torch_peak_chain"]())

  def sync(out):
    return sync_torch(out) if isinstance(out, torch.Tensor) else sync_jax(out)
  times = pair.interleaved(fns, args.runs, sync)
  ours_s = pair.median(times["ours"])
  chain_peak = 3 * 2 * peak_n ** 3 / pair.median(times["peak_chain"])
  model_flops = flops.paligemma_train_flops(cfg, b, t)
  result = {"bench": "train_step", "device": args.device, "dtype": dtype,
            "batch_size": b, "text_len": t, "vocab": pair.vocab_size(cfg),
            "ours_s": round(ours_s, 4), "ours_runs_s": [round(x, 3) for x in times["ours"]],
            "compile_s": round(compile_s, 1), "model_tflops": round(model_flops / 1e12, 4),
            "peak_gflops": round(peak / 1e9, 1),
            "measured_peak_gflops": round(measured_peak / 1e9, 1),
            "peak_gflops_median_interleaved": round(chain_peak / 1e9, 1),
            "mfu": round(model_flops / (ours_s * peak), 4),
            "mfu_vs_interleaved_peak": round(model_flops / (ours_s * chain_peak), 4),
            "ours_loss": float(first["loss"]), "ours_grad_norm": float(first["grad_norm"])}
  if "ref" in times:
    ref_s = pair.median(times["ref"])
    result.update(ref_s=round(ref_s, 4), ref_runs_s=[round(x, 3) for x in times["ref"]],
                  ratio=round(ref_s / ours_s, 3),
                  ratio_paired=round(pair.paired_ratio(times["ref"], times["ours"]), 3),
                  ref_mfu=round(model_flops / (ref_s * peak), 4), **ref_choice, **check,
                  torch_peak_gflops_median_interleaved=round(
                      3 * 2 * peak_n ** 3 / pair.median(times["torch_peak_chain"]) / 1e9, 1),
                  loss_rel_diff=abs(check["ref_loss"] - result["ours_loss"]) / result["ours_loss"])
  if ablations:
    result["ablation"] = {
        name: {"what": ABLATIONS[name], "s": round(pair.median(times[f"ablate_{name}"]), 4),
               "runs_s": [round(x, 3) for x in times[f"ablate_{name}"]],
               "speedup": round(pair.median(times[f"ablate_{name}"]) / ours_s, 3),
               "speedup_paired": round(pair.paired_ratio(times[f"ablate_{name}"],
                                                         times["ours"]), 3)}
        for name in ablations}
  if args.profile:
    result["profile"] = xprof.profile(ours, sync_jax, hlo_text, args.profile)
  result["machine"] = pair.machine_info()
  print(f"ours {ours_s:.3f} s/step"
        + (f", transformers {result['ref_s']:.3f} s/step ({ref_choice}), ratio "
           f"{result['ratio']:.2f}x" if "ref" in times else "")
        + f"; MFU {result['mfu']:.1%} of {peak / 1e9:.0f} GFLOP/s "
        f"({result['mfu_vs_interleaved_peak']:.1%} of the interleaved median "
        f"{chain_peak / 1e9:.0f})", flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
