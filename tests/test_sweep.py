"""Sweeps: search spaces, names, flags, the launcher with a fake trainer (interrupt/resume,
--print, --parallel), the report; one slow sweep of the demo config through train.py."""
import csv
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from big_vision_lite import sweep
from big_vision_lite import sweep_launch
from big_vision_lite import sweep_report

REPO = pathlib.Path(__file__).resolve().parents[1]

# A config in the style of configs/*.py: a 2 x 2 grid and a headline metric.
FAKE_CONFIG = '''
import ml_collections
from big_vision_lite import sweep as sweep_lib

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.lr, c.wd, c.total_steps, c.ckpt_steps, c.step_s = 0.1, 0.0, 6, 2, 0.15
  c.fail_above_lr = 1.0
  c.res = int(dict(kv.split("=") for kv in (arg or "res=8").split(","))["res"])
  c.input = ml_collections.ConfigDict(dict(batch_size=8, name="demo"))
  c.patch = (8, 8)
  c.use_ema = False
  return c

def sweep(add, arg=None):
  for point in sweep_lib.grid(lr=[0.01, 0.03], wd=[0.0, 0.001]):
    add(**point)

def metrics():
  return ["val/score", "loss"]
'''

# Writes what train.py writes (metrics.jsonl, checkpoints/<step>/, final_metrics.json),
# resumes from its last checkpoint, parses its flags with the same config_flags as train.py.
FAKE_TRAINER = '''
import json, os, sys, time
sys.path.insert(0, {repo!r})
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "", lock_config=True)
flags.DEFINE_string("workdir", None, "")
FLAGS = flags.FLAGS

def main(_):
  c, wd = FLAGS.config, FLAGS.workdir
  os.makedirs(os.path.join(wd, "checkpoints"), exist_ok=True)
  with open(os.path.join(wd, "times.jsonl"), "a") as f:
    f.write(json.dumps({{"start": time.time()}}) + "\\n")
  steps = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
  step = steps[-1] if steps else 0
  if step:
    print(f"resumed from step {{step}} in {{wd}}")
  log = open(os.path.join(wd, "metrics.jsonl"), "a")
  while step < c.total_steps:
    step += 1
    time.sleep(c.step_s)
    if c.lr > c.fail_above_lr:
      raise ValueError(f"lr {{c.lr}} diverged at step {{step}}")
    loss = 1.0 / (1.0 + 100 * c.lr * step) + c.wd
    log.write(json.dumps({{"step": step, "time": time.time(), "loss": loss}}) + "\\n")
    if step == c.total_steps // 2:  # A mid-training eval: the lr=0.01,wd=0 run peaks here.
      peak = 0.5 if (c.lr, c.wd) == (0.01, 0.0) else 0.0
      log.write(json.dumps({{"step": step, "val/score": 10 * c.lr - 100 * c.wd + peak}}) + "\\n")
    log.flush()
    if step % c.ckpt_steps == 0:
      tmp = os.path.join(wd, "checkpoints", f"{{step}}.orbax-checkpoint-tmp-1")
      os.makedirs(tmp)
      open(os.path.join(tmp, "commit_success.txt"), "w").close()
      os.rename(tmp, os.path.join(wd, "checkpoints", str(step)))
  score = 10 * c.lr - 100 * c.wd
  log.write(json.dumps({{"step": step, "val/score": score}}) + "\\n")
  with open(os.path.join(wd, "final_metrics.json"), "w") as f:
    json.dump({{"val/score": score, "baseline/val/score": -1.0}}, f)

app.run(main)
'''


@pytest.fixture
def fake(tmp_path):
  config = tmp_path / "fake_config.py"
  config.write_text(FAKE_CONFIG)
  trainer = tmp_path / "fake_train.py"
  trainer.write_text(FAKE_TRAINER.format(repo=str(REPO)))
  return config, trainer


def _sweep_cmd(config, root, trainer, *extra):
  return [sys.executable, "-m", "big_vision_lite.sweep", f"--config={config}",
          f"--workdir={root}", f"--train_script={trainer}", "--poll_s=0.05",
          "--platform=cpu", *extra]


def _run(cmd, timeout=120):
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout, what):
  t0 = time.time()
  while not predicate():
    if time.time() - t0 > timeout:
      raise AssertionError(f"timed out after {timeout} s waiting for {what}")
    time.sleep(0.02)


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie (killed, not yet reaped by init) counts as dead.
  with open(f"/proc/{pid}/stat") as f:
    return f.read().split(") ")[-1][0] != "Z"


# ------------------------------------------------------------------ search space


def test_grid_order_and_scalars():
  assert sweep.grid(lr=[1, 2], wd=[0, 3], seed=7) == [
      {"lr": 1, "wd": 0, "seed": 7}, {"lr": 1, "wd": 3, "seed": 7},
      {"lr": 2, "wd": 0, "seed": 7}, {"lr": 2, "wd": 3, "seed": 7}]
  with pytest.raises(ValueError, match="axis 'wd' has no values"):
    sweep.grid(lr=[1], wd=[])


def test_random_is_seeded_rounded_and_in_range():
  space = dict(lr=sweep.loguniform(1e-5, 1e-3), drop=sweep.uniform(0, 0.5),
               bs=sweep.choice(16, 32), steps=100)
  points = sweep.random(50, seed=3, **space)
  assert points == sweep.random(50, seed=3, **space) != sweep.random(50, seed=4, **space)
  lrs = [p["lr"] for p in points]
  assert all(1e-5 <= x <= 1e-3 for x in lrs)
  assert all(float(f"{x:.3g}") == x for x in lrs)  # 3 significant digits
  # Log-uniform: about half of the draws lie below the geometric middle 1e-4.
  assert 15 <= sum(x < 1e-4 for x in lrs) <= 35
  assert all(0 <= p["drop"] <= 0.5 for p in points)
  assert {p["bs"] for p in points} == {16, 32} and {p["steps"] for p in points} == {100}
  with pytest.raises(ValueError, match="0 < low < high"):
    sweep.loguniform(0, 1)
  with pytest.raises(ValueError, match="at least one value"):
    sweep.choice()


def test_names_and_flag_values():
  assert sweep.run_name({"wd": 0.0001, "lr": 0.001}) == "lr=0.001,wd=0.0001"
  assert sweep.run_name({"lr": 1e-05, "input.batch_size": 16}) == "input.batch_size=16,lr=1e-05"
  assert sweep.run_name({"model_init": "/ckpt/pt 224.npz", "patch": (14, 14)}) == (
      "model_init=_ckpt_pt_224.npz,patch=14_14")
  assert sweep.run_name({}, "res=448") == "res=448"
  long = sweep.run_name({"name": "x" * 300})
  assert len(long) <= 120 and long == sweep.run_name({"name": "x" * 300})
  assert long != sweep.run_name({"name": "x" * 299 + "y"})
  assert [sweep.flag_value(v) for v in (True, 3, 1e-05, 0.1, (8, 8), "a b", None)] == [
      "true", "3", "1e-05", "0.1", "(8, 8)", "a b", "None"]
  assert sweep.arg(res=448, mode="smoke") == {"config_arg": "res=448,mode=smoke"}


def test_expand_round_trips_through_train_flags(tmp_path):
  path = tmp_path / "typed.py"
  path.write_text(FAKE_CONFIG.replace(
      "  for point in", "  add(lr=3e-05, input=dict(batch_size=16, name='coco'), patch=(4, 2),\n"
      "      use_ema=True, **sweep_lib.arg(res=32))\n  for point in"))
  runs, metrics = sweep.expand(f"{path}:res=16", ["--config.total_steps=3"])
  assert metrics == ["val/score", "loss"]
  assert [r.name for r in runs] == [
      "res=32,input.batch_size=16,input.name=coco,lr=3e-05,patch=4_2,use_ema=True",
      "lr=0.01,wd=0.0", "lr=0.01,wd=0.001", "lr=0.03,wd=0.0", "lr=0.03,wd=0.001"]
  first = runs[0]
  assert first.config_arg == "res=32" and first.total_steps == 3
  # The flags parse back (with train.py's parser) to exactly the values given to add().
  parsed = sweep.validated_config(f"{path}:{first.config_arg}", first.flags, "test")
  assert (parsed.lr, parsed.input.batch_size, parsed.input.name, parsed.patch, parsed.use_ema,
          parsed.res) == (3e-05, 16, "coco", (4, 2), True, 32)
  assert runs[1].flags == ["--config.lr=0.01", "--config.wd=0.0"]
  assert runs[1].config_arg == "res=16"


@pytest.mark.parametrize("line, error", [
    ("add(lrr=0.1)", r"sweep run lrr=0.1: train.py would reject .*lrr.*Did you mean \"lr\""),
    ("add(lr='fast')", r"sweep run lr=fast: .*could not convert string to float"),
    ("add(lr=0.1); add(lr=0.1)", r"added run lr=0.1 twice"),
    ("add(total_steps=2)", r"\['--config.total_steps'\] given on the command line and swept"),
    ("add(lr=object())", r"override lr=<object.*expected a bool, int, float"),
    ("pass", r"called add\(\) for no run"),
])
def test_expand_rejects_bad_sweeps(tmp_path, line, error):
  path = tmp_path / "bad.py"
  path.write_text(FAKE_CONFIG.replace(
      "  for point in sweep_lib.grid(lr=[0.01, 0.03], wd=[0.0, 0.001]):\n    add(**point)",
      f"  {line}"))
  with pytest.raises((ValueError, TypeError), match=error):
    sweep.expand(str(path), ["--config.total_steps=3"])


def test_expand_needs_a_sweep_function(tmp_path):
  path = tmp_path / "nosweep.py"
  path.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(ValueError, match="nosweep.py defines no sweep"):
    sweep.expand(str(path))


# ----------------------------------------------------------------------- devices


def test_device_slices():
  gpu = sweep_launch.device_slices("gpu", ["4", "5", "6", "7"], 2)
  assert gpu == [{"CUDA_VISIBLE_DEVICES": "4,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
  tpu = sweep_launch.device_slices("tpu", [str(i) for i in range(8)], 4)
  assert [t["TPU_VISIBLE_CHIPS"] for t in tpu] == ["0,1", "2,3", "4,5", "6,7"]
  assert {t["TPU_CHIPS_PER_PROCESS_BOUNDS"] for t in tpu} == {"1,2,1"}
  assert len({t["TPU_PROCESS_PORT"] for t in tpu}) == 4
  assert sweep_launch.device_slices("cpu", [], 3) == [{}, {}, {}]
  assert sweep_launch.device_slices("gpu", ["0"], 1) == [{}]  # one at a time: every device
  with pytest.raises(ValueError, match="3 gpu device.* cannot be split into 2"):
    sweep_launch.device_slices("gpu", ["0", "1", "2"], 2)


def test_detect_devices_reads_visible_device_lists(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
  assert sweep_launch.detect_devices("auto") == ("gpu", ["3", "5"])
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
  monkeypatch.setenv("TPU_VISIBLE_CHIPS", "0,1,2,3")
  assert sweep_launch.detect_devices("tpu") == ("tpu", ["0", "1", "2", "3"])
  assert sweep_launch.detect_devices("cpu") == ("cpu", [])


# ------------------------------------------------------------ launcher (fake trainer)


def test_interrupt_resume_and_report(fake, tmp_path):
  config, trainer = fake
  root = tmp_path / "root"
  cmd = _sweep_cmd(config, root, trainer, "--config.step_s=0.25")
  runs = ["lr=0.01,wd=0.0", "lr=0.01,wd=0.001", "lr=0.03,wd=0.0", "lr=0.03,wd=0.001"]
  first, second = root / runs[0], root / runs[1]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _wait_for(lambda: (first / "final_metrics.json").exists() and
              (second / "checkpoints" / "2").exists(), 60, "run 1 done, run 2 at step 2")
    assert not (second / "final_metrics.json").exists()
    manifest = json.loads((root / "sweep.json").read_text())
    child = manifest["runs"][1]["pid"]
    proc.send_signal(signal.SIGKILL)  # The launcher only: its child must die with it.
    proc.wait(timeout=10)
  finally:
    proc.kill()
    proc.communicate()  # Reaps it and closes its pipes.
  _wait_for(lambda: not _alive(child), 10, "the orphaned trainer to die")
  assert not (second / "final_metrics.json").exists()
  assert sweep_report.collect(str(root))["rows"][0]["name"] == runs[0]
  done_mtime = (first / "final_metrics.json").stat().st_mtime_ns

  out = _run(cmd)
  assert out.returncode == 0, out.stderr
  assert f"[sweep] skip {runs[0]}: finished (final_metrics.json)" in out.stderr
  assert (first / "final_metrics.json").stat().st_mtime_ns == done_mtime
  assert (first / "train.log").read_text().count("==== sweep attempt") == 1
  second_log = (second / "train.log").read_text()
  assert second_log.count("==== sweep attempt") == 2
  assert "resumed from step 2" in second_log.split("==== sweep attempt 2")[1]
  manifest = json.loads((root / "sweep.json").read_text())
  assert [r["status"] for r in manifest["runs"]] == ["done"] * 4
  assert [r["attempts"] for r in manifest["runs"]] == [1, 2, 1, 1]

  # The report: ranked by final val/score = 10 lr - 100 wd (hand-computed), best first.
  assert out.stdout.splitlines()[0].endswith("4 runs ranked by val/score (max)")
  report = sweep_report.collect(str(root))
  assert [r["name"] for r in report["rows"]] == [runs[2], runs[3], runs[0], runs[1]]
  assert report["keys"] == ["lr", "wd"]
  top = report["rows"][0]["metrics"]
  assert top["val/score"]["final"] == pytest.approx(0.3)
  # The fake's loss 1 / (1 + 100 lr step) + wd falls: its best (min) is its final value.
  assert top["loss"]["final"] == top["loss"]["best"] == pytest.approx(1 / (1 + 100 * 0.03 * 6))
  peak = next(r for r in report["rows"] if r["name"] == runs[0])["metrics"]["val/score"]
  assert (peak["final"], peak["best"], peak["best_step"]) == (
      pytest.approx(0.1), pytest.approx(0.6), 3)
  with open(root / "report.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == [r["name"] for r in report["rows"]]
  assert float(rows[0]["val/score"]) == pytest.approx(0.3)
  assert rows[0]["lr"] == "0.03" and rows[0]["status"] == "done"
  md = (root / "report.md").read_text()
  assert f"| 1 | {runs[2]} | done | 0.03 | 0 |" in md
  assert (root / "report.png").read_bytes()[:4] == b"\x89PNG"

  # Another headline: the final training loss (min) ranks lr=0.03,wd=0 first, then lr=0.03,
  # wd=1e-3 (1/19 + 1e-3 < 1/7).
  out = _run([sys.executable, "-m", "big_vision_lite.sweep", f"--report={root}",
              "--metric=loss"])
  assert out.returncode == 0, out.stderr
  ranked = sweep_report.collect(str(root), metric="loss")["rows"]
  losses = [r["metrics"]["loss"]["final"] for r in ranked]
  assert losses == sorted(losses) and ranked[0]["name"] == runs[2]
  assert "ranked by loss (min)" in out.stdout


def test_failed_runs_are_listed_with_their_error(fake, tmp_path):
  config, trainer = fake
  root = tmp_path / "root"
  cmd = _sweep_cmd(config, root, trainer, "--config.fail_above_lr=0.02", "--config.step_s=0.0")
  out = _run(cmd)
  assert out.returncode == 1
  report = sweep_report.collect(str(root))
  assert [(r["name"], r["status"]) for r in report["rows"]] == [
      ("lr=0.01,wd=0.0", "done"), ("lr=0.01,wd=0.001", "done"),
      ("lr=0.03,wd=0.0", "failed"), ("lr=0.03,wd=0.001", "failed")]
  assert report["rows"][2]["error"] == (
      "exit code 1: ValueError: lr 0.03 diverged at step 1")
  assert "failed runs:\n  lr=0.03,wd=0.0: exit code 1: ValueError: lr 0.03 diverged" in (
      out.stdout)
  assert "## Failed runs" in (root / "report.md").read_text()
  assert _run(cmd).returncode == 1  # The same command retries the failed runs only.
  manifest = json.loads((root / "sweep.json").read_text())
  assert [r["attempts"] for r in manifest["runs"]] == [1, 1, 2, 2]
  # Other common overrides belong to another sweep.
  out = _run(_sweep_cmd(config, root, trainer, "--config.step_s=0.0"))
  assert out.returncode != 0 and "use another --workdir" in out.stderr


def test_parallel_runs_overlap(fake, tmp_path):
  config, trainer = fake
  root = tmp_path / "root"
  out = _run(_sweep_cmd(config, root, trainer, "--parallel=2", "--config.step_s=0.3"))
  assert out.returncode == 0, out.stderr
  spans = []
  for run in json.loads((root / "sweep.json").read_text())["runs"]:
    start = json.loads((root / run["name"] / "times.jsonl").read_text())["start"]
    end = json.loads((root / run["name"] / "metrics.jsonl").read_text().splitlines()[-2])["time"]
    spans.append((start, end))
  at_once = lambda t: sum(s <= t <= e for s, e in spans)
  assert max(at_once(s) for s, _ in spans) == 2  # Two at a time, never more.


def test_print_emits_commands_for_unfinished_runs(fake, tmp_path):
  config, trainer = fake
  root = tmp_path / "root"
  (root / "lr=0.01,wd=0.001").mkdir(parents=True)
  (root / "lr=0.01,wd=0.001" / "final_metrics.json").write_text('{"val/score": 0.0}')
  out = _run(_sweep_cmd(config, root, trainer, "--print", "--config.total_steps=4"))
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert len(lines) == 3 and "skip lr=0.01,wd=0.001" in out.stderr
  argv = shlex.split(lines[2])
  assert argv[0] == "python" and argv[1].endswith("fake_train.py")
  assert argv[2:] == [f"--config={config}", f"--workdir={root}/lr=0.03,wd=0.001",
                      "--config.total_steps=4", "--config.lr=0.03", "--config.wd=0.001"]
  assert [r["status"] for r in json.loads((root / "sweep.json").read_text())["runs"]] == [
      "pending"] * 4
  assert not (root / "lr=0.01,wd=0.0").exists()  # Nothing ran.


def test_second_launcher_on_the_same_root_is_refused(fake, tmp_path):
  config, trainer = fake
  root = tmp_path / "root"
  root.mkdir()
  with sweep_launch.Lock(str(root)):
    assert sweep_launch.lock_held(str(root))
    out = _run(_sweep_cmd(config, root, trainer))
  assert out.returncode != 0 and "another sweep process" in out.stderr
  assert not sweep_launch.lock_held(str(root))


def test_finished_means_final_metrics_or_a_committed_last_checkpoint(tmp_path):
  assert sweep_report.finished_reason(str(tmp_path), 6) is None
  (tmp_path / "checkpoints" / "6").mkdir(parents=True)  # Not committed (no orbax marker).
  (tmp_path / "checkpoints" / "8.orbax-checkpoint-tmp-3").mkdir()
  assert sweep_report.checkpoint_steps(str(tmp_path)) == []
  (tmp_path / "checkpoints" / "6" / "commit_success.txt").touch()
  assert sweep_report.checkpoint_steps(str(tmp_path)) == [6]
  assert sweep_report.finished_reason(str(tmp_path), 8) is None
  assert sweep_report.finished_reason(str(tmp_path), 6) == "checkpoint at step 6 = total_steps"
  (tmp_path / "final_metrics.json").write_text("{}")
  assert sweep_report.finished_reason(str(tmp_path), 8) == "final_metrics.json"


def test_ranking_tiers_and_tie_breaks(tmp_path):
  """Done runs by the headline (ties: next metric), then unfinished, then failed runs."""
  runs = {"a": ("done", 0.5, 2.0), "b": ("done", 0.5, 1.0), "c": ("done", 0.4, 0.1),
          "d": ("running", 0.9, 0.1), "e": ("failed", None, 5.0), "f": ("done", None, None)}
  manifest = {"config": "x.py", "extra_flags": [], "metrics": ["acc", "loss"], "runs": []}
  for name, (status, acc, loss) in runs.items():
    (tmp_path / name).mkdir()
    if loss is not None:
      (tmp_path / name / "metrics.jsonl").write_text(
          json.dumps({"step": 1, "loss": loss + 1}) + "\n" + json.dumps({"step": 2, "loss": loss})
          + "\n" + '{"step": 3, "lo')  # A line cut short by a kill is skipped.
    if acc is not None and status != "running":
      (tmp_path / name / "final_metrics.json").write_text(json.dumps({"acc": acc}))
    elif acc is not None:
      with open(tmp_path / name / "metrics.jsonl", "a") as f:
        f.write("\n" + json.dumps({"step": 2, "acc": acc}) + "\n")
    manifest["runs"].append({"name": name, "status": status, "overrides": {"x": name},
                             "error": "boom" if status == "failed" else None})
  sweep_report.write_manifest(str(tmp_path), manifest)
  report = sweep_report.collect(str(tmp_path), lock_held=True)
  assert [(r["name"], r["status"]) for r in report["rows"]] == [
      ("b", "done"), ("a", "done"), ("c", "done"), ("f", "done"), ("d", "running"),
      ("e", "failed")]
  assert report["rows"][0]["metrics"]["loss"] == {"final": 1.0, "best": 1.0, "best_step": 2}
  # Without a live launcher a "running" run was interrupted.
  assert sweep_report.collect(str(tmp_path))["rows"][4]["status"] == "interrupted"


def test_report_needs_a_manifest(tmp_path):
  with pytest.raises(FileNotFoundError, match="no sweep manifest"):
    sweep_report.collect(str(tmp_path))


def test_metric_directions():
  assert sweep_report.parse_metric("caption/cider") == ("caption/cider", "max")
  assert sweep_report.parse_metric("val/loss") == ("val/loss", "min")
  assert sweep_report.parse_metric("detection/invalid_rate") == ("detection/invalid_rate", "min")
  assert sweep_report.parse_metric("val/loss:max") == ("val/loss", "max")
  assert sweep_report.parse_metric(["acc", "min"]) == ("acc", "min")
  with pytest.raises(ValueError, match="'min' or 'max'"):
    sweep_report.parse_metric("acc:best")
  history = {1: {"loss": 3.0}, 2: {"loss": 1.0}, 3: {"loss": 2.0}}
  assert sweep_report.summarize(history, {}, "loss", "min") == {
      "final": 2.0, "best": 1.0, "best_step": 2}


# ------------------------------------------------------------- the real demo (slow)

# Tiny demo runs (32 px images): 6 steps, checkpoints at 2, 4, 6, one eval at the end on 4
# examples per task. Each run still compiles a train step and four decoders: ~1-3 CPU minutes.
DEMO_FLAGS = ["--config.total_steps=6", "--config.ckpt_steps=2", "--config.eval_steps=6",
              "--config.log_steps=2", "--config.final_baseline=false",
              *(f"--config.evals.{name}.data.split=val[:4]"
                for name in ("caption", "vqa", "detection", "segmentation"))]


@pytest.mark.slow
def test_demo_sweep_interrupted_resumed_and_reported(tmp_path):
  root = tmp_path / "demo_sweep"
  spec = "configs/demo.py:mode=smoke,res=32"
  cmd = [sys.executable, "-m", "big_vision_lite.sweep", f"--config={spec}",
         f"--workdir={root}", "--platform=cpu", "--poll_s=0.1", *DEMO_FLAGS]
  runs, metrics = sweep.expand(spec, DEMO_FLAGS)
  names = [r.name for r in runs]
  assert len(names) == 4 and metrics[0] == "caption/cider"
  first, second = root / names[0], root / names[1]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _wait_for(lambda: (first / "final_metrics.json").exists() and
              sweep_report.checkpoint_steps(str(second)) or proc.poll() is not None, 900,
              "run 1 done and run 2 checkpointed")
    assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
    child = json.loads((root / "sweep.json").read_text())["runs"][1]["pid"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
  finally:
    proc.kill()
    proc.communicate()  # Reaps it and closes its pipes.
  _wait_for(lambda: not _alive(child), 20, "the orphaned train.py to die")
  assert not (second / "final_metrics.json").exists(), "run 2 finished before the kill"
  saved = sweep_report.checkpoint_steps(str(second))[-1]
  done_mtime = (first / "final_metrics.json").stat().st_mtime_ns

  out = _run(cmd, timeout=1200)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"[sweep] skip {names[0]}: finished (final_metrics.json)" in out.stderr
  assert (first / "final_metrics.json").stat().st_mtime_ns == done_mtime
  assert (first / "train.log").read_text().count("==== sweep attempt") == 1
  resumed = (second / "train.log").read_text().split("==== sweep attempt 2")[1]
  assert f"resumed from step {saved}" in resumed
  manifest = json.loads((root / "sweep.json").read_text())
  assert [r["status"] for r in manifest["runs"]] == ["done"] * 4
  assert [r["attempts"] for r in manifest["runs"]] == [1, 2, 1, 1]

  # The report's ranking, against the runs' own files read here: by the final caption/cider,
  # ties broken by the next metrics() in order (vqa, detection, segmentation: max; loss: min).
  finals = {n: json.loads((root / n / "final_metrics.json").read_text()) for n in names}
  assert all(set(metrics[:4]) <= set(f) for f in finals.values())
  last_loss = {}
  for n in names:
    for line in (root / n / "metrics.jsonl").read_text().splitlines():
      record = json.loads(line)
      if "loss" in record and record["step"] == 6:
        last_loss[n] = record["loss"]
  expected = sorted(names, key=lambda n: (*(-finals[n][m] for m in metrics[:4]), last_loss[n],
                                          names.index(n)))
  report = sweep_report.collect(str(root))
  assert [r["name"] for r in report["rows"]] == expected
  ranked = sweep_report.collect(str(root), metric="loss")["rows"]
  assert ranked[0]["name"] == min(names, key=lambda n: (last_loss[n], names.index(n)))
  assert [r["metrics"]["loss"]["final"] for r in ranked] == sorted(last_loss.values())
  assert (root / "report.png").exists() and (root / "report.csv").exists()
