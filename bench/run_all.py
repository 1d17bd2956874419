"""Runs every benchmark and regenerates bench/RESULTS.md (never edit that file by hand).

  python bench/run_all.py                  # CPU, full sizes (~25 min on 2 busy cores)
  python bench/run_all.py --quick          # fewer runs, 5% checkpoint, smaller input bench
  python bench/run_all.py --device gpu     # train step + decode at PaliGemma 3B, bf16
                                           # -> bench/RESULTS_gpu.md

Each benchmark runs as its own process (so that one's memory and threads do not disturb the
next); its last stdout line is its JSON result. RESULTS.md (RESULTS_gpu.md for --device gpu)
gets one table (ours vs the reference: ratio = our speed over
the reference's, higher is better), the machine, each benchmark's details, the profile of
our train step and what limits MFU, all filled from this run's numbers.
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent


def run(script: str, args: list[str], timeout: int, env: dict[str, str]
        ) -> tuple[str, str | int, float]:
  """(stdout, stderr, exit code or "timeout", seconds) of `python bench/<script> args`."""
  cmd = [sys.executable, str(BENCH / script), *args]
  print("$ " + " ".join(cmd[1:]), flush=True)
  t0 = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    out, err, code = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
    err, code = "", "timeout"
  seconds = time.perf_counter() - t0
  print(f"  -> exit {code} in {seconds:.0f} s", flush=True)
  return out, err, code, seconds


def parse(out: str, err: str, code) -> tuple[dict | None, str]:
  """(the last stdout line as JSON, or None if the run failed; stdout or the failure's tail)."""
  lines = [line for line in out.strip().splitlines() if line.strip()]
  result = None
  if code == 0 and lines:
    try:
      result = json.loads(lines[-1])
    except json.JSONDecodeError:
      pass
  if result is None:
    return None, f"exit {code}\n" + "\n".join((out + err).strip().splitlines()[-15:])
  return result, out


def fmt(x, spec=".2f", unit=""):
  return "n/a" if x is None else f"{x:{spec}}{unit}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--only", default=None,
                      help="comma-separated benchmarks (default: all four on CPU; train_step,"
                      "decode on GPU, the others do not use the accelerator)")
  parser.add_argument("--out", default=None,
                      help="default bench/RESULTS.md, bench/RESULTS_gpu.md for --device gpu")
  parser.add_argument("--timeout", type=int, default=None,
                      help="seconds per benchmark (default 5400 train step, 3600 the others)")
  parser.add_argument("--logs", default=None, help="folder for each benchmark's full output")
  parser.add_argument("--from_logs", default=None,
                      help="re-render from a folder that --logs wrote (e.g. on a GPU machine) "
                      "instead of running the benchmarks")
  args = parser.parse_args()
  gpu = args.device == "gpu"
  args.out = args.out or str(BENCH / ("RESULTS_gpu.md" if gpu else "RESULTS.md"))
  known = ("train_step", "decode", "load_checkpoint", "input_pipeline")
  only = (args.only or ("train_step,decode" if gpu else ",".join(known))).split(",")
  if unknown := set(only) - set(known):
    parser.error(f"--only: unknown benchmark(s) {sorted(unknown)}; known: {list(known)}")
  if args.logs:
    os.makedirs(args.logs, exist_ok=True)
  env = dict(os.environ)
  if gpu:
    # Both frameworks share the GPU in one process: XLA's default pool (75% of the memory,
    # kept) leaves torch too little for the 3B step. The platform allocator returns what XLA
    # frees (each allocation a cudaMalloc: if anything, slower for ours).
    env.setdefault("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")
  quick = args.quick
  commands = {
      # The ablations and the op-category profile are about XLA CPU (models/matmul.py is a
      # CPU-only fix; the profile reads CPU thunk names). On GPU one Adam kernel (fused):
      # timing both would hold two sets of 3B Adam states.
      "train_step": (["--hf_adam", "fused"] if gpu else
                     ["--ablate", "--profile", tempfile.mkdtemp(prefix="bvl_trace_")])
                    + (["--runs", "2"] if quick else []),
      "decode": (["--runs", "3"] if quick else [])
                + ([] if gpu else ["--profile", tempfile.mkdtemp(prefix="bvl_trace_")]),
      "load_checkpoint": ["--scale", "0.05" if quick else "1.0"],
      "input_pipeline": ["--batches", "5", "--num_images", "64"] if quick else [],
  }
  if args.from_logs:
    missing = [n for n in only if not pathlib.Path(args.from_logs, f"{n}.log").is_file()]
    if missing:
      parser.error(f"--from_logs {args.from_logs}: no {', '.join(m + '.log' for m in missing)} "
                   "(written by --logs); pick the benchmarks with --only")
  load_before = os.getloadavg()
  started = datetime.datetime.now(datetime.timezone.utc)
  results, raw, secs = {}, {}, {}
  for name in only:
    log = pathlib.Path(args.from_logs or args.logs or ".", f"{name}.log")
    if args.from_logs:
      out, err, code, secs[name] = log.read_text(), "", 0, float("nan")
    else:
      dev = ["--device", args.device] if name in ("train_step", "decode") else []
      out, err, code, secs[name] = run(f"{name}.py", dev + commands[name],
                                       args.timeout or (5400 if name == "train_step" else 3600),
                                       env)
      if args.logs:  # stderr first: the JSON result stays the last line.
        log.write_text(f"{err}\n{out}" if err else out)
    results[name], raw[name] = parse(out, err, code)
  machine = next((r["machine"] for r in results.values() if r and "machine" in r), {})
  text = render(results, raw, secs, machine, args, started, load_before, os.getloadavg())
  pathlib.Path(args.out).write_text(text)
  print(f"wrote {args.out}")


def render(results, raw, secs, machine, args, started, load_before, load_after) -> str:
  tr, dc = results.get("train_step"), results.get("decode")
  lc, ip = results.get("load_checkpoint"), results.get("input_pipeline")
  out = [
      "# big_vision_lite benchmarks",
      "",
      f"Generated by `python bench/run_all.py{' --quick' if args.quick else ''}"
      f"{' --device gpu' if args.device == 'gpu' else ''}` on "
      + (f"{started:%Y-%m-%d %H:%M} UTC" if not args.from_logs else
         f"the logs in `{os.path.relpath(args.from_logs, REPO)}/` (rendered "
         f"{started:%Y-%m-%d %H:%M} UTC with --from_logs)")
      + "; do not edit by hand, rerun it.",
      "Ratios are our speed over the reference's (higher is better), from medians of runs "
      "that alternate ours and the reference's in one process after warm-up.",
      "",
      "## Summary",
      "",
      "| benchmark | ours | reference | ratio | MFU |",
      "|---|---|---|---|---|",
  ]
  if tr:
    out.append(
        f"| train step ({tr['device']}, {tr['dtype']}, batch {tr['batch_size']} x text "
        f"{tr['text_len']}, vocab {tr['vocab']}) | {tr['ours_s']:.2f} s/step | "
        f"{fmt(tr.get('ref_s'))} s/step (transformers, {tr.get('hf_attn', '-')} attention, "
        f"{tr.get('hf_adam', '-')} Adam) | **{fmt(tr.get('ratio'))}x** | "
        + (f"**{tr['mfu']:.1%}** of {tr['peak_gflops']:.0f} GFLOP/s measured "
           f"({tr['mfu_vs_interleaved_peak']:.1%} of the interleaved median "
           f"{tr['peak_gflops_median_interleaved']:.0f})" if tr["device"] == "cpu" else
           f"**{tr['mfu']:.1%}** of the data-sheet {tr['peak_gflops'] / 1e3:.0f} TFLOP/s "
           f"(measured matmul peak {tr['measured_peak_gflops'] / 1e3:.0f})")
        + f"; transformers {fmt(tr.get('ref_mfu'), '.1%')} |")
  else:
    out.append("| train step | failed (see below) | | | |")
  if dc:
    out.append(
        f"| greedy decode ({dc['device']}, batch {dc['batch_size']}, {dc['new_tokens']} new "
        f"tokens) | {fmt(dc['ours_decode_tok_s'], '.1f')} tok/s after prefill; {dc['ours_s']:.2f} s "
        f"end to end | {fmt(dc.get('ref_decode_tok_s'), '.1f')} tok/s; "
        f"{fmt(dc.get('ref_s'))} s (transformers generate, {dc.get('hf_attn', '-')}, "
        f"{dc.get('hf_cache', '-')} cache) | **{fmt(dc.get('ratio'))}x** after prefill, "
        f"{fmt(dc.get('ratio_end_to_end'))}x end to end | - |")
  else:
    out.append("| greedy decode | failed (see below) | | | |")
  if lc:
    out.append(
        f"| load checkpoint ({lc['shapes']} x{lc['scale']:g}, bf16 npz, {lc['file_gb']:.2f} GB) | "
        f"{lc['load_s']:.2f} s, {lc['load_gb_per_s']:.2f} GB/s, peak RSS "
        f"{lc['rss_over_file']:.2f}x the file | - | - | - |")
  elif "load_checkpoint" in raw:
    out.append("| load checkpoint | failed (see below) | | | |")
  if ip:
    cells = ", ".join(f"{k}: {v['examples_per_s']:.0f}" for k, v in ip["rows"].items())
    out.append(f"| input pipeline (examples/s, source/workers) | {cells} | - | - | - |")
  elif "input_pipeline" in raw:
    out.append("| input pipeline | failed (see below) | | | |")

  out += ["", "## Machine", ""]
  for key in ("cpu", "cores", "gpu", "jax", "torch", "transformers", "jax_devices",
              "torch_threads"):
    if key in machine:
      out.append(f"- {key}: {machine[key]}")
  if args.from_logs:
    out.append("- load average at each benchmark's end (1 min): " + ", ".join(
        f"{k} {r['machine']['load_avg_1m']}" for k, r in results.items()
        if r and "load_avg_1m" in r.get("machine", {})))
  else:
    out.append(f"- load average (1/5/15 min) before: "
               f"{', '.join(f'{x:.1f}' for x in load_before)}; after: "
               f"{', '.join(f'{x:.1f}' for x in load_after)} (other jobs share the machine: "
               "absolute times move with them, the interleaved ratios much less)")
    out.append(f"- python {platform.python_version()}, wall time per benchmark: "
               + ", ".join(f"{k} {v:.0f} s" for k, v in secs.items()))

  if tr:
    out += train_section(tr)
  if dc:
    out += decode_section(dc)
  if lc:
    out += ["", "## Checkpoint loading", "", "```json", json.dumps(lc, indent=1), "```"]
  if ip:
    table = raw["input_pipeline"].strip().splitlines()[:-1]  # Without the JSON line.
    out += ["", "## Input pipeline", "", "```", *table, "```"]
  gpu_md = BENCH / "RESULTS_gpu.md"
  if args.device == "cpu" and gpu_md.exists():
    out += ["", "## GPU", "", "The GPU variant (`python bench/run_all.py --device gpu`, "
            "PaliGemma 3B shapes, bfloat16) wrote [RESULTS_gpu.md](RESULTS_gpu.md) on "
            + gpu_md.read_text().split(" on ", 2)[1].split(";", 1)[0] + "; its summary:", "",
            gpu_md.read_text().split("## Summary", 1)[-1].split("## Machine", 1)[0].strip()]
  failed = [k for k in raw if not results.get(k)]
  for k in failed:
    out += ["", f"## {k}: no result", "", "```", raw[k][-3000:], "```"]
  return "\n".join(out) + "\n"


def train_section(tr: dict) -> list[str]:
  out = ["", "## Train step", "",
         f"One optimizer step (forward, backward, Adam, {tr['dtype']}) of the same PaliGemma "
         f"(bench/paligemma_pair.py) on the same batch; model FLOPs {tr['model_tflops']:.3f} "
         "TFLOP per step (flops.paligemma_train_flops: 3 x forward matmuls). Loss check: ours "
         f"{tr['ours_loss']:.6f}, transformers {fmt(tr.get('ref_loss'), '.6f')} (relative "
         f"difference {fmt(tr.get('loss_rel_diff'), '.1e')}: the HF export appends 64 zero "
         "rows to the vocabulary, the <image> token and padding, which join the softmax).",
         "",
         f"- ours: {tr['ours_s']:.2f} s/step (runs {tr['ours_runs_s']}), compiled in "
         f"{tr['compile_s']:.0f} s",
         f"- transformers: {fmt(tr.get('ref_s'))} s/step (runs {tr.get('ref_runs_s')}); "
         f"reference picked by timing: {tr.get('hf_choice_s')}",
         f"- ratio {fmt(tr.get('ratio'))}x (median of per-round ratios "
         f"{fmt(tr.get('ratio_paired'))}x)",
         (f"- matmul peak: {tr['peak_gflops']:.0f} GFLOP/s (flops.measure_peak_flops, best of "
          f"10 [2048]^2 chains), {tr['peak_gflops_median_interleaved']:.0f} GFLOP/s median of "
          "the same chain timed between the steps" if tr["device"] == "cpu" else
          f"- MFU denominator: the data-sheet {tr['dtype']} peak {tr['peak_gflops'] / 1e3:.0f} "
          "TFLOP/s (flops.device_peak_flops); measured on an [8192]^2 matmul chain: "
          f"{tr['measured_peak_gflops'] / 1e3:.0f} TFLOP/s best, "
          f"{tr['peak_gflops_median_interleaved'] / 1e3:.0f} median between the steps")]
  ab = tr.get("ablation")
  if ab:
    out += ["", "### Perf fixes, measured in this run (same process, interleaved)", "",
            "| variant | s/step | our speed-up from the fix |", "|---|---|---|"]
    for name, row in ab.items():
      out.append(f"| {row['what']} | {row['s']:.2f} | {row['speedup']:.2f}x |")
  prof = tr.get("profile")
  if prof:
    f = prof["fractions"]
    matmul_s = f["matmul"] * prof["op_thread_s"]
    eff = tr["model_tflops"] * 1e12 / matmul_s / 1e9 if matmul_s else None
    out += ["", "### Where the time goes (jax profiler, one step)", "",
            f"Traced step: {prof['wall_s']:.2f} s wall, {prof['op_thread_s']:.2f} s of XLA op "
            "time summed over threads.", "",
            "| category | share of op time |", "|---|---|"]
    for k, label in (("matmul", "matmuls (dot / convolution fusions: YNNPACK, Eigen)"),
                     ("copy", "data movement (copies, transposes, slices, scan stacking)"),
                     ("fill", "zero fills (broadcast constants: scan residual / gradient "
                      "buffers)"),
                     ("other", "elementwise + reductions (norms, GeLU, softmax, Adam)")):
      out.append(f"| {label} | {f[k]:.1%} |")
    out += ["", "Largest ops (thread-seconds): " + ", ".join(
        f"`{k}` {v:.2f}" for k, v in prof["top_ops"].items()), "",
            "### What limits MFU and the ratio", "",
            f"- Matmuls take {f['matmul']:.0%} of the op time and run at ~{fmt(eff, '.0f')} "
            f"GFLOP/s of model FLOPs while busy, against {tr['peak_gflops']:.0f} measured on a "
            "square [2048]^2 chain: the step's products are thin ([tokens x 512] x [512 x "
            "4096] MLPs, 64-wide attention heads, 384-wide SigLIP) or very long (the "
            "257152-row vocabulary: logits, their input gradient contracts over 257k), which "
            "XLA's CPU matmul (YNNPACK / Eigen) tiles less efficiently than a square product.",
            f"- The other {1 - f['matmul']:.0%} is memory-bound work that MFU does not count: "
            "the softmax over 257k logits (forward logsumexp, one fused backward pass), "
            "RMSNorm/LayerNorm/GeLU elementwise, the Adam update (several passes over 195 M "
            "parameters, 135 M of them the tied embedding), and the scan over layers, which "
            "stacks each layer's residuals into [L, ...] buffers that XLA zero-fills first "
            "(the 'fill' row) and writes with dynamic-update-slice.",
            ("- The reference's matmul library is faster on this CPU: the same [2048]^2 chain, "
             f"timed between the steps, ran at {tr['torch_peak_gflops_median_interleaved']:.0f} "
             f"GFLOP/s in torch (MKL / oneDNN) and {tr['peak_gflops_median_interleaved']:.0f} "
             "in XLA, and transformers' step is mostly such library calls (its MFU above). A "
             f"1.5x ratio ({tr['ref_s'] / 1.5:.2f} s/step) would need the whole step, "
             "memory-bound work included, to run at "
             f"{tr['model_tflops'] * 1e3 * 1.5 / tr['ref_s']:.0f} GFLOP/s of model FLOPs = "
             f"{tr['model_tflops'] * 1e3 * 1.5 / tr['ref_s'] / tr['peak_gflops_median_interleaved']:.0%}"
             " of that XLA chain: not reachable in float32 on this CPU with XLA's matmuls."
             if tr.get("torch_peak_gflops_median_interleaved") and tr.get("ref_s") else
             "- (no torch matmul chain in this run)"),
            "- Fixed here (measured above, 'Perf fixes'): weight gradients whose left matmul "
            "operand was contracted over its major axis (XLA CPU then used Eigen on a "
            "transposed copy fused with the GeLU/softmax backward; models/matmul.py) and the "
            "cross-entropy's log-softmax + gather autodiff (log-probs, exp, a zero [B, T, V] "
            "array and a scatter into it; optim._token_xent).",
            "- HLO: `XLA_FLAGS=--xla_dump_to=DIR python bench/train_step.py --skip_ref "
            "--runs 1` writes the optimised module (`*jit_step*after_optimizations.txt`)."]
  return out


def decode_section(dc: dict) -> list[str]:
  out = ["", "## Greedy decoding", "",
         f"Batch {dc['batch_size']}, prompt {dc['prompt_len']} tokens after the image tokens, "
         f"{dc['new_tokens']} new tokens, greedy, the same weights. 'after prefill' = "
         "(time of the 32-token call - time of a 1-token call) for the 31 later tokens.", "",
         f"- ours: {dc['ours_s']:.3f} s end to end (runs {dc['ours_runs_s']}), 1-token call "
         f"{dc['ours_prefill_s']:.3f} s, {fmt(dc['ours_decode_tok_s'], '.1f')} tok/s after prefill; "
         f"compiled in {dc['compile_s']:.0f} s",
         f"- transformers generate: {fmt(dc.get('ref_s'), '.3f')} s (runs "
         f"{dc.get('ref_runs_s')}), 1-token call {fmt(dc.get('ref_prefill_s'), '.3f')} s, "
         f"{fmt(dc.get('ref_decode_tok_s'), '.1f')} tok/s after prefill",
         f"- ratios: {fmt(dc.get('ratio'))}x after prefill, {fmt(dc.get('ratio_end_to_end'))}x "
         f"end to end (paired {fmt(dc.get('ratio_end_to_end_paired'))}x), "
         f"{fmt(dc.get('ratio_prefill'))}x on the 1-token call",
         f"- same tokens as transformers: {fmt(dc.get('tokens_equal_fraction'), '.1%')} "
         f"({dc.get('rows_equal', 'n/a')} of {dc['batch_size']} rows identical)"]
  if "ours_weight_gb_per_s" in dc:
    out += ["", "What limits it: each decoding step reads all the LLM's weights "
            f"({dc['llm_weight_gb']:.2f} GB in {'float32' if dc['device'] == 'cpu' else 'bfloat16'}, "
            f"the tied vocabulary table included, for the logits) for {dc['batch_size']} "
            f"tokens: a memory-bound step. Ours takes {dc['ours_step_s'] * 1e3:.1f} ms "
            f"({fmt(dc['ours_weight_gb_per_s'], '.1f')} GB/s of weights), transformers "
            f"{fmt(dc.get('ref_step_s', 0) * 1e3, '.1f')} ms "
            f"({fmt(dc.get('ref_weight_gb_per_s'), '.1f')} GB/s); a plain read of 256 MiB "
            f"(jitted sum, timed between the runs) reaches {dc['read_gb_per_s']:.1f} GB/s. "
            "A 3x ratio would need "
            f"{3 * dc['ref_weight_gb_per_s'] if dc.get('ref_weight_gb_per_s') else float('nan'):.1f}"
            " GB/s of weight reads."]
  out += decode_profile(dc)
  return out


def decode_profile(dc: dict) -> list[str]:
  """The traced call's heaviest ops per decoding step, and what they say about the gap."""
  prof = dc.get("profile")
  if not prof:
    return ([] if "profile_error" not in dc else
            ["", f"(The decoding profile failed: {dc['profile_error']})"])
  per_step = [op for op in prof["ops"] if "ms_per_step" in op]
  out = ["", f"### Where a decoding step goes (jax profiler, one {dc['new_tokens']}-token call)",
         "", f"Traced call: {prof['wall_s']:.2f} s wall (untraced median {dc['ours_s']:.2f} s), "
         f"{prof['op_thread_s']:.2f} s of XLA op time summed over threads. The heaviest ops "
         "that run once per step (or per layer and step) after the first token, in "
         "milliseconds per step summed over threads:", "",
         "| op | from | thread-ms per step |", "|---|---|---|"]
  out += [f"| `{op['name']}` | {op['what'] or '-'} | {op['ms_per_step']:.2f} |"
          for op in per_step]
  logits = next((op for op in per_step if "llm.logits" in op["what"]), None)
  slices = sum(op["ms_per_step"] for op in per_step
               if not op["matmul"] and re.search(r"layers/slice|dynamic_slice", op["what"]))
  layer_mm = sum(op["ms_per_step"] for op in per_step
                 if op["matmul"] and "/layers/" in op["what"])
  out.append("")
  if logits and dc["device"] == "cpu" and dc.get("llm_width"):
    table_gb = dc["vocab"] * dc["llm_width"] * 4 / 1e9
    gflops = 2 * dc["batch_size"] * dc["vocab"] * dc["llm_width"] / (
        logits["ms_per_step"] / 1e3) / 1e9
    out.append(
        f"- The logits product ({dc['batch_size']} rows x the {dc['vocab']}-row table) takes "
        f"{logits['ms_per_step']:.1f} ms per step in the trace: {table_gb:.2f} GB of table at "
        f"{table_gb / (logits['ms_per_step'] / 1e3):.1f} GB/s, {gflops:.0f} GFLOP/s. With only "
        f"{dc['batch_size']} rows each table element feeds {dc['batch_size']} multiply-adds, "
        "and XLA's CPU matmul (YNNPACK) runs this shape below both the plain-read bandwidth "
        "and the square-matmul peak (bench/train_step.py): the largest single item of the gap.")
  if layer_mm or slices:
    out.append(
        f"- The layers' matmuls take {layer_mm:.1f} ms per step over their weights (the same "
        f"thin {dc['batch_size']}-row shape), and the scan over layers copies each layer's "
        f"weights out of the stacked [depth, ...] arrays every step ({slices:.1f} ms: the "
        "'slice' ops above). The copies were measured against alternatives on this CPU (a 6-layer "
        "[8 x 512] x [512 x 4096] GeGLU chain in a 31-step loop, 2026-11-27): an unrolled "
        "layer loop, or separate per-layer arrays with no slicing, ran 1.3-2x slower than "
        "the scan, so the copies stay.")
  reduce = sum(op["ms_per_step"] for op in per_step if op["what"] in ("reduce", "argmax"))
  if reduce:
    out.append(f"- Greedy's argmax over the vocabulary is a variadic (value, index) reduce "
               f"({reduce:.1f} ms per step, 'reduce' above).")
  return out


if __name__ == "__main__":
  main()
