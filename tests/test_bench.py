"""bench/: the side-by-side scripts run end to end on a tiny model (ours == transformers on
the same weights), and run_all.py renders RESULTS.md from their JSON lines."""
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = json.dumps({
    "img": {"variant": "mu/16", "image_size": 64},
    "llm": {"vocab_size": 1000, "width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 2,
            "num_kv_heads": 1, "head_dim": 32},
})


def _bench(script: str, *args: str) -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's fake devices: the benches time one device.
  proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_train_step_bench_same_loss_and_gradients_as_transformers(tmp_path):
  r = _bench("train_step.py", "--model", TINY, "--runs", "1", "--peak_n", "256",
             "--hf_attn", "sdpa", "--ablate", "--profile", str(tmp_path / "trace"))
  assert r["bench"] == "train_step" and r["vocab"] == 1000
  # Same weights, batch and loss: the first step's loss and gradient norm agree, up to the
  # 64 zero rows that the HF export appends to the vocabulary (the <image> token and
  # padding): their logits are 0 and only add to transformers' softmax denominator, a
  # visible effect with this 1000-token vocabulary (2e-5 relative at 257152).
  pad_bound = math.log((1000 + 64) / 1000) * 2
  assert 0 <= r["ref_loss"] - r["ours_loss"] < pad_bound, r
  assert abs(r["ours_grad_norm"] - r["ref_grad_norm"]) < 0.05 * r["ref_grad_norm"], r
  assert r["ratio"] > 0 and 0 < r["mfu"] and r["ref_s"] > 0
  assert set(r["ablation"]) == {"no_fused_xent", "before_fixes"}
  prof = r["profile"]
  assert abs(sum(prof["fractions"].values()) - 1) < 0.01 and prof["fractions"]["matmul"] > 0


@pytest.mark.slow
def test_decode_bench_same_tokens_as_transformers_generate(tmp_path):
  r = _bench("decode.py", "--model", TINY, "--runs", "1", "--new_tokens", "6", "--profile",
             str(tmp_path / "trace"))
  assert r["bench"] == "decode" and r["new_tokens"] == 6 and r["llm_width"] == 64
  assert r["tokens_equal_fraction"] == 1.0 and r["rows_equal"] == 8, r
  assert r["ratio_end_to_end"] > 0 and r["ours_tok_s"] > 0 and r["ref_tok_s"] > 0
  # After-prefill rates are differences of two timings: None, never negative, when a tiny
  # model's 1-token call is not faster than the 6-token one.
  for key in ("ratio", "ours_decode_tok_s", "ref_decode_tok_s"):
    assert r[key] is None or r[key] > 0, (key, r)
  # The profile names each heavy op's jax origin; the logits product runs once per step.
  prof = r["profile"]
  assert prof["steps"] == 5 and abs(sum(prof["fractions"].values()) - 1) < 0.01
  logits = [op for op in prof["ops"] if "llm.logits" in op["what"] and "Model.extend" in op["what"]]
  assert logits and logits[0]["calls"] == 5 and logits[0]["matmul"], prof["ops"]
  assert logits[0]["ms_per_step"] > 0


def test_bad_model_override_names_the_flag():
  sys.path.insert(0, str(REPO / "bench"))
  try:
    import paligemma_pair  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(str(REPO / "bench"))
  assert paligemma_pair.model_config("cpu", '{"llm": {"depth": 1}}')["llm"]["depth"] == 1
  for bad in ("{", '{"vit": {}}', '{"llm": 3}'):
    with pytest.raises(ValueError, match="--model"):
      paligemma_pair.model_config("cpu", bad)


def _train_result(device: str) -> dict:
  return {
      "bench": "train_step", "device": device, "dtype": "float32", "batch_size": 8,
      "text_len": 64, "vocab": 257152, "ours_s": 2.0, "ours_runs_s": [2.0], "compile_s": 9.0,
      "model_tflops": 1.0, "peak_gflops": 200.0, "measured_peak_gflops": 200.0,
      "peak_gflops_median_interleaved": 190.0, "mfu": 0.45, "mfu_vs_interleaved_peak": 0.47,
      "ours_loss": 12.5, "ours_grad_norm": 2.5, "ref_s": 3.0, "ref_runs_s": [3.0],
      "ratio": 1.5, "ratio_paired": 1.5, "ref_mfu": 0.3, "hf_attn": "sdpa", "hf_adam": "fused",
      "hf_choice_s": {}, "ref_loss": 12.5, "ref_grad_norm": 2.5, "loss_rel_diff": 1e-6,
      "machine": {"cpu": "Test CPU", "cores": 2, "load_avg_1m": 0.5}}


def _render(tmp_path, logs, *args: str) -> str:
  """RESULTS.md as run_all.py renders it from the logs in `logs` (--from_logs)."""
  out = tmp_path / "R.md"
  proc = subprocess.run([sys.executable, "bench/run_all.py", *args, "--from_logs", str(logs),
                         "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr
  return out.read_text()


def test_run_all_renders_results_from_logs(tmp_path):
  logs = tmp_path / "logs"
  logs.mkdir()
  result = dict(_train_result("gpu"), peak_gflops=989_000.0, measured_peak_gflops=700_000.0)
  (logs / "train_step.log").write_text("some stderr\nours 2.0 s/step\n" + json.dumps(result)
                                       + "\n")
  (logs / "decode.log").write_text("Traceback (most recent call last):\nKeyError: 'x'\n")
  text = _render(tmp_path, logs, "--device", "gpu")
  assert "| train step (gpu, float32, batch 8 x text 64, vocab 257152) | 2.00 s/step" in text
  assert "**1.50x**" in text and "**45.0%** of the data-sheet 989 TFLOP/s" in text
  # A failed benchmark is reported with its output, not dropped.
  assert "| greedy decode | failed (see below) |" in text
  assert "## decode: no result" in text and "KeyError: 'x'" in text
  assert "- cpu: Test CPU" in text


def test_run_all_renders_the_decode_profile(tmp_path):
  logs = tmp_path / "logs"
  logs.mkdir()
  ops = [
      {"name": "ynn_fusion.36", "s": 1.24, "calls": 31, "matmul": True, "ms_per_step": 40.0,
       "what": "Model.extend/llm.logits/...D,VD->...V/dot_general"},
      {"name": "slice_bitcast_fusion.3", "s": 0.186, "calls": 186, "matmul": False,
       "ms_per_step": 6.0, "what": "Model.extend/llm.extend/layers/slice"},
      {"name": "ynn_fusion.25", "s": 0.31, "calls": 186, "matmul": True, "ms_per_step": 10.0,
       "what": "Model.extend/llm.extend/layers/BTD,DF->BTF/dot_general"},
      {"name": "ynn_fusion.41", "s": 0.5, "calls": 1, "matmul": True,
       "what": "Model.prefill/img/embedding/conv_general_dilated"},
  ]
  dc = {"bench": "decode", "device": "cpu", "batch_size": 8, "prompt_len": 16, "new_tokens": 32,
        "vocab": 257152, "llm_width": 512, "ours_s": 4.0, "ours_runs_s": [4.0],
        "ours_prefill_s": 1.5, "ours_tok_s": 64.0, "ours_decode_tok_s": 100.0, "ours_steps": 32,
        "compile_s": 20.0, "llm_weight_gb": 0.69, "read_gb_per_s": 25.0, "ours_step_s": 0.08,
        "ours_weight_gb_per_s": 8.6, "profile": {"wall_s": 4.1, "op_thread_s": 6.0,
        "fractions": {"matmul": 0.7, "copy": 0.2, "fill": 0.0, "other": 0.1},
        "top_ops": {}, "ops": ops, "steps": 31}, "machine": {"cpu": "Test CPU", "cores": 2}}
  (logs / "decode.log").write_text(json.dumps(dc) + "\n")
  text = _render(tmp_path, logs, "--only", "decode")
  # Per-step rows only (the prefill's conv runs once), with their jax origin.
  assert "| `ynn_fusion.36` | Model.extend/llm.logits/...D,VD->...V/dot_general | 40.00 |" in text
  assert "ynn_fusion.41" not in text
  # 8 x 257152 x 512 float32 table: 0.53 GB in 40 ms = 13.2 GB/s, 53 GFLOP/s.
  assert "takes 40.0 ms per step in the trace: 0.53 GB of table at 13.2 GB/s, 53 GFLOP/s" in text
  assert "The layers' matmuls take 10.0 ms per step" in text and "(6.0 ms: the" in text


def test_run_all_rejects_unknown_benchmarks(tmp_path):
  proc = subprocess.run([sys.executable, "bench/run_all.py", "--only", "train_step,nope",
                         "--out", str(tmp_path / "R.md")], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "unknown benchmark(s) ['nope']" in proc.stderr
  assert not (tmp_path / "R.md").exists()
  proc = subprocess.run([sys.executable, "bench/run_all.py", "--from_logs", str(tmp_path),
                         "--out", str(tmp_path / "R.md")], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "no train_step.log" in proc.stderr, proc.stderr
