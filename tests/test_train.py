"""train.py end to end: exact resume after kill -9, NaN stop, config errors, dry run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import big_vision_lite as bvl
from big_vision_lite import checkpoints

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "tests" / "configs" / "tiny_demo.py")


def train_cmd(workdir, arg="", *flags):
  return [sys.executable, str(REPO / "train.py"), f"--config={CONFIG}:{arg}" if arg
          else f"--config={CONFIG}", f"--workdir={workdir}", *flags]


def env():
  e = dict(os.environ)
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
  e["PYTHONPATH"] = str(REPO)
  return e


def run(cmd, **kw):
  out = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600,
                       **kw)
  return out


@pytest.mark.slow
def test_kill_and_restart_resumes_bit_exactly(tmp_path):
  arg = "steps=24,ckpt=4"
  ref = run(train_cmd(tmp_path / "ref", arg))
  assert ref.returncode == 0, ref.stderr[-3000:]

  work = tmp_path / "killed"
  proc = subprocess.Popen(train_cmd(work, arg), env=env(), cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first = work / "checkpoints" / "4" / "commit_success.txt"
  deadline = time.time() + 300
  while not first.exists():
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint at step 4 after 300 s"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = sorted(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit())
  assert 24 not in done, f"the run finished before the kill ({done}): nothing was resumed"

  resumed = run(train_cmd(work, arg))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step" in resumed.stderr
  _, p_ref = bvl.load(tmp_path / "ref")
  _, p_res = bvl.load(work)
  flat_ref, flat_res = checkpoints.flatten(p_ref), checkpoints.flatten(p_res)
  assert flat_ref.keys() == flat_res.keys()
  for name in flat_ref:
    np.testing.assert_array_equal(flat_res[name], flat_ref[name], err_msg=name)
  # The logged losses after the resume point are the uninterrupted run's too.
  losses = lambda d: {r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl")
                                                        .read_text().splitlines()) if "loss" in r}
  ref_losses, res_losses = losses(tmp_path / "ref"), losses(work)
  assert ref_losses[24] == res_losses[24]


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_last_checkpoint(tmp_path):
  out = run(train_cmd(tmp_path, "steps=12,ckpt=2,lr=1e30"))
  assert out.returncode != 0
  assert "NonFiniteLossError: loss is" in out.stderr
  assert "last good checkpoint" in out.stderr


def test_unknown_config_override_is_an_error(tmp_path):
  out = run(train_cmd(tmp_path, "", "--config.not_a_key=3"))
  assert out.returncode != 0
  assert "not_a_key" in out.stderr


def test_unknown_config_arg_is_an_error(tmp_path):
  out = run(train_cmd(tmp_path, "stepz=3"))
  assert out.returncode != 0
  assert "stepz" in out.stderr
