"""Runs a sweep's train.py commands: one after another, or N at once on disjoint devices.

big_vision_lite/sweep.py expands a config's sweep into runs; this module launches them.
Devices: by default each run uses every device. On a multi-host slice either start the same
sweep command on every host (ROOT on a filesystem they share; each host holds its own lock,
and their outputs interleave in train.log), or, simpler, print the commands with --print
and hand them to the slice's launcher. `parallel` > 1 gives each concurrent run an equal,
disjoint device subset: CUDA_VISIBLE_DEVICES on GPU; on a TPU VM TPU_VISIBLE_CHIPS with
single-process bounds (TPU_CHIPS_PER_PROCESS_BOUNDS for 1, 2, 4 or 8 chips, one host; not
tried on hardware here). On CPU the processes simply share the host's cores (tiny configs,
tests). The device count is read without starting JAX here (that would claim the chips).
Each child gets SIGKILL when the launcher dies (Linux prctl), so a killed sweep never leaves
a trainer writing behind it; re-running the sweep resumes the run from its checkpoint.
"""
from collections.abc import Mapping, Sequence
import fcntl
import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

from big_vision_lite import sweep_report

# ------------------------------------------------------------------------ devices


_TPU_BOUNDS = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}


def detect_devices(platform: str = "auto") -> tuple[str, list[str]]:
  """(platform, device ids) without starting JAX here (that would claim the chips)."""
  if platform in ("auto", "gpu"):
    ids = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not ids and "CUDA_VISIBLE_DEVICES" not in os.environ:
      try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        ids = [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith("GPU ")]
      except (OSError, subprocess.SubprocessError):
        ids = []
    if ids or platform == "gpu":
      return "gpu", ids
  if platform in ("auto", "tpu"):
    if chips := os.environ.get("TPU_VISIBLE_CHIPS"):
      return "tpu", chips.split(",")
    accel = [n for n in os.listdir("/dev") if re.fullmatch(r"accel\d+", n)] if os.path.isdir(
        "/dev") else []
    vfio = [n for n in os.listdir("/dev/vfio") if n.isdigit()] if os.path.isdir(
        "/dev/vfio") else []
    if accel or vfio or platform == "tpu":
      return "tpu", [str(i) for i in range(len(accel) or len(vfio))]
  return "cpu", []


def device_slices(platform: str, ids: Sequence[str], parallel: int) -> list[dict]:
  """Environment additions giving each of `parallel` concurrent runs its own devices."""
  if parallel < 1:
    raise ValueError(f"--parallel {parallel}: expected >= 1")
  if parallel == 1 or platform == "cpu":
    return [{} for _ in range(parallel)]
  if not ids or len(ids) % parallel:
    raise ValueError(f"--parallel {parallel}: the {len(ids)} {platform} device(s) {list(ids)} "
                     f"cannot be split into {parallel} equal subsets")
  k = len(ids) // parallel
  chunks = [list(ids[i * k:(i + 1) * k]) for i in range(parallel)]
  if platform == "gpu":
    return [{"CUDA_VISIBLE_DEVICES": ",".join(c)} for c in chunks]
  if k not in _TPU_BOUNDS:
    raise ValueError(f"--parallel {parallel}: {k} TPU chips per run; supported: "
                     f"{sorted(_TPU_BOUNDS)}")
  return [{"TPU_VISIBLE_CHIPS": ",".join(c), "TPU_CHIPS_PER_PROCESS_BOUNDS": _TPU_BOUNDS[k],
           "TPU_PROCESS_BOUNDS": "1,1,1", "TPU_PROCESS_PORT": str(8476 + i),
           "TPU_PROCESS_ADDRESSES": f"localhost:{8476 + i}", "CLOUD_TPU_TASK_ID": "0",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"} for i, c in enumerate(chunks)]


# ------------------------------------------------------------------------- launch


def log(msg: str) -> None:
  print(f"[sweep] {msg}", file=sys.stderr, flush=True)


def _die_with_parent(parent_pid: int) -> None:
  """Child side of Popen: SIGKILL when the sweep process dies (Linux prctl)."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass
  if os.getppid() != parent_pid:  # The parent died before prctl took effect.
    os._exit(1)


def _lock_path(root: str) -> str:
  # One lock per host: on a multi-host slice every host runs the same sweep command.
  return os.path.join(root, f".sweep.{socket.gethostname()}.lock")


class Lock:
  """ROOT/.sweep.<host>.lock: one launcher per sweep root and host (the kernel drops it if
  we die, so a killed sweep never blocks the next one)."""

  def __init__(self, root: str):
    self.root, self.fd = root, None

  def __enter__(self):
    self.fd = os.open(_lock_path(self.root), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      other = os.pread(self.fd, 32, 0).decode(errors="replace").strip()
      os.close(self.fd)
      raise RuntimeError(f"{self.root}: another sweep process (pid {other or '?'}) runs this "
                         "sweep; wait for it or stop it first") from None
    os.ftruncate(self.fd, 0)
    os.pwrite(self.fd, str(os.getpid()).encode(), 0)
    return self

  def __exit__(self, *exc):
    os.close(self.fd)  # Closing the descriptor releases the lock.


def lock_held(root: str) -> bool:
  """Whether a launcher (on this host) runs the sweep of `root` now."""
  path = _lock_path(root)
  if not os.path.exists(path):
    return False
  fd = os.open(path, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def command(train_cmd: Sequence[str], config_spec_path: str, run: Mapping, root: str,
            extra_flags: Sequence[str]) -> list[str]:
  spec = f"{config_spec_path}:{run['config_arg']}" if run["config_arg"] else config_spec_path
  return [*train_cmd, f"--config={spec}", f"--workdir={os.path.join(root, run['name'])}",
          *extra_flags, *run["flags"]]


def launch(manifest: dict, root: str, slots: Sequence[Mapping], poll_s: float = 0.5) -> int:
  """Runs every unfinished run of the manifest, len(slots) at a time; returns #failed.

  The manifest (ROOT/sweep.json) is rewritten at every change of a run's status.
  """
  save = lambda: sweep_report.write_manifest(root, manifest)
  path = manifest["config"].partition(":")[0]
  pending = []
  for run in manifest["runs"]:
    if run.get("dropped"):
      continue  # No longer in sweep(): reported, never launched.
    if reason := sweep_report.finished_reason(os.path.join(root, run["name"]),
                                              run.get("total_steps")):
      log(f"skip {run['name']}: finished ({reason})")
      run.update(status="done", error=None)
    else:
      pending.append(run)
  save()
  active, free = {}, list(range(len(slots)))
  try:
    while pending or active:
      while pending and free:
        slot, run = free.pop(0), pending.pop(0)
        active[slot] = _start(manifest, root, path, run, slots[slot])
        save()
      time.sleep(poll_s)
      for slot, (run, proc, logfile, t0) in list(active.items()):
        if (rc := proc.poll()) is None:
          continue
        logfile.close()
        del active[slot]
        free.append(slot)
        elapsed = time.time() - t0
        run.update(returncode=rc, elapsed_s=round((run.get("elapsed_s") or 0) + elapsed, 1),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"))
        if rc == 0:
          run.update(status="done", error=None)
          log(f"done {run['name']} in {elapsed:.1f} s")
        else:
          err = sweep_report.error_from_log(os.path.join(root, run["name"],
                                                         sweep_report.LOG_NAME))
          run.update(status="failed", error=f"exit code {rc}: {err}")
          log(f"FAILED {run['name']} (exit code {rc}): {err}")
        save()
  except KeyboardInterrupt:
    log(f"interrupted: stopping {len(active)} run(s); re-run the command to resume")
    for _, proc, _, _ in active.values():
      proc.terminate()
    for run, proc, logfile, _ in active.values():
      try:
        proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
      logfile.close()
      run.update(status="interrupted")
    save()
    raise
  return sum(r.get("status") == "failed" for r in manifest["runs"] if not r.get("dropped"))


def _start(manifest, root, path, run, slot_env):
  """Starts one run's train.py, its output appended to ROOT/<run>/train.log."""
  workdir = os.path.join(root, run["name"])
  os.makedirs(workdir, exist_ok=True)
  cmd = command(manifest["train_cmd"], path, run, root, manifest["extra_flags"])
  run["attempts"] = run.get("attempts", 0) + 1
  logfile = open(os.path.join(workdir, sweep_report.LOG_NAME), "a")
  logfile.write(f"{sweep_report.ATTEMPT_MARK} {run['attempts']} "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} env={dict(slot_env)}: "
                f"{shlex.join(cmd)}\n")
  logfile.flush()
  env = {**os.environ, **slot_env, "PYTHONUNBUFFERED": "1"}
  proc = subprocess.Popen(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env,
                          preexec_fn=functools.partial(_die_with_parent, os.getpid()))
  run.update(status="running", error=None, devices=dict(slot_env), pid=proc.pid)
  log(f"start {run['name']} (attempt {run['attempts']}, pid {proc.pid}"
      f"{', ' + str(dict(slot_env)) if slot_env else ''})")
  return run, proc, logfile, time.time()
