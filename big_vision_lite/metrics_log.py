"""What the user sees of a training run: metrics.jsonl, TensorBoard, one log line per call.

    logger = MetricsLogger(workdir, total_steps=4000)
    tput = Throughput(total_steps=4000)
    ...  # first (compiling) step
    tput.reset(step)
    for step in ...:
      with tput.waiting():  # Input-pipeline wait, reported as "input_wait".
        batch = next(it)
      metrics = train_step(...)
      if step % log_every == 0:
        rates = tput.update(step, examples=global_batch * log_every, tokens=tokens_since_last)
        logger.log(step, {**jax.device_get(metrics), **rates, "mfu": flops.mfu(...)})
      with tput.paused():  # Evaluation / checkpoint time is not step time.
        ...
    logger.close()

Metric names the log line knows (others follow them as "name value"; all go to the files):
  loss (or training_loss, train/loss), lr (learning_rate, train/lr), grad_norm (gnorm,
  l2_grads, train/grad_norm), examples_per_s, tokens_per_s, mfu (a fraction), input_wait
  (input_wait_frac; a fraction of wall time), eta_s (seconds). step_time_s is written to the files only.

Only the primary process (jax.process_index() == 0) writes files or prints.
"""
from collections.abc import Iterator, Mapping
import contextlib
import json
import math
import os
import pathlib
import re
import sys
import time
from typing import Any, Callable, TextIO

import numpy as np
import PIL.Image


def _si(v: float) -> str:
  """3 significant digits with a k/M/G/T suffix: 812 -> "812", 41512 -> "41.5k"."""
  if not math.isfinite(v):
    return str(v)
  for suffix, scale in (("", 1.0), ("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
    s = f"{v / scale:.3g}"
    if abs(float(s)) < 1000:
      return s + suffix
  return f"{v:.3g}"


def format_duration(seconds: float) -> str:
  """45 -> "45s", 372 -> "6m12s", 3720 -> "1h02m", 180000 -> "2d02h"; "?" if unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  s = int(round(seconds))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  if s < 86400:
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
  return f"{s // 86400}d{s % 86400 // 3600:02d}h"


# (aliases, label, formatter) in log-line order; ETA goes last, after the unknown keys.
_FIELDS: list[tuple[tuple[str, ...], str, Callable[[float], str]]] = [
    (("loss", "training_loss", "train/loss"), "loss {}", lambda v: f"{v:.4g}"),
    (("lr", "learning_rate", "train/lr"), "lr {}", lambda v: f"{v:.1e}"),
    (("grad_norm", "gnorm", "l2_grads", "train/grad_norm"), "gnorm {}", lambda v: f"{v:.3g}"),
    (("examples_per_s",), "{} ex/s", _si),
    (("tokens_per_s",), "{} tok/s", _si),
    (("mfu",), "MFU {}", lambda v: f"{100 * v:.1f}%"),
    (("input_wait", "input_wait_frac"), "wait {}", lambda v: f"{100 * v:.1f}%"),
]
_HIDDEN = {"eta_s", "step_time_s"}  # eta_s is shown as "ETA ..."; step_time_s only in files.


def format_log_line(step: int, total_steps: int | None, metrics: Mapping[str, float]) -> str:
  """One human line: `step 120/4000 | loss 2.314 | lr 3.0e-04 | ... | ETA 6m12s`.

  Known metrics (module docstring) in a fixed order, then the other metrics sorted by name,
  then ETA; each part only when its metric is present.
  """
  parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
  used = set(_HIDDEN)
  for aliases, label, fmt in _FIELDS:
    key = next((k for k in aliases if k in metrics), None)
    if key is not None:
      parts.append(label.format(fmt(float(metrics[key]))))
    used.update(aliases)
  parts += [f"{k} {float(v):.4g}" for k, v in sorted(metrics.items()) if k not in used]
  if "eta_s" in metrics:
    parts.append(f"ETA {format_duration(float(metrics['eta_s']))}")
  return " | ".join(parts)


def _scalar(key: str, value: Any) -> "int | float":
  if not isinstance(key, str) or not key:
    raise ValueError(f"metric names must be non-empty strings, got {key!r}")
  arr = np.asarray(value)
  if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
    raise ValueError(f"metric {key!r} must be a real scalar, got {arr.dtype}{list(arr.shape)}")
  if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
    return int(arr.reshape(()))
  if np.iscomplexobj(arr):
    raise ValueError(f"metric {key!r} must be real, got {arr.dtype}")
  return float(arr.reshape(()))


def _default_is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  # Only when not told: keeps tests light.
  return jax.process_index() == 0


class MetricsLogger:
  """metrics.jsonl + TensorBoard scalars/images + a log line (and tqdm bar on a terminal).

  Files under `workdir`: metrics.jsonl (one {"step", "time", **metrics} object per `log`,
  appended, so a resumed run continues the file), tensorboard/ (event files),
  predictions/<step>/<name>_<i>.png (`log_images`).
  """

  def __init__(self, workdir: "str | os.PathLike", *, total_steps: int | None,
               is_primary: bool | None = None, tensorboard: bool = True,
               progress: bool | None = None, stream: TextIO | None = None):
    """
    Args:
      workdir: run directory (created if missing).
      total_steps: for "step i/total" and the progress bar; None if unknown.
      is_primary: whether this process writes; None: jax.process_index() == 0.
      tensorboard: write TensorBoard event files (tensorboardX).
      progress: tqdm bar above the log lines; None: when `stream` is a terminal.
      stream: where lines go; None: sys.stdout.
    """
    self.workdir = pathlib.Path(workdir)
    self.total_steps = total_steps
    self.is_primary = _default_is_primary() if is_primary is None else bool(is_primary)
    self._stream = stream or sys.stdout
    self._jsonl = self._writer = self._bar = None
    self._closed = False
    if not self.is_primary:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
    if tensorboard:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._writer = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=30)
    if progress is None:
      progress = hasattr(self._stream, "isatty") and self._stream.isatty()
    if progress:
      import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, file=self._stream, unit="step",
                            dynamic_ncols=True, leave=True)

  def _check_open(self, what: str) -> None:
    if self._closed:
      raise RuntimeError(f"MetricsLogger.{what} after close() ({self.workdir})")

  def log(self, step: int, metrics: Mapping[str, Any]) -> str:
    """Writes metrics (scalars: Python/numpy/jax) at `step`; returns the log line."""
    self._check_open("log")
    step = int(step)
    values = {k: _scalar(k, v) for k, v in metrics.items()}
    if {"step", "time"} & set(values):
      raise ValueError("metric names 'step' and 'time' are reserved for metrics.jsonl")
    line = format_log_line(step, self.total_steps, values)
    if not self.is_primary:
      return line
    record = {"step": step, "time": time.time(), **values}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()  # A crashed run keeps every line it logged.
    if self._writer is not None:
      for k, v in values.items():
        self._writer.add_scalar(k, v, step)
    if self._bar is not None:
      self._bar.update(max(0, step - self._bar.n))
      self._bar.write(line, file=self._stream)
    else:
      print(line, file=self._stream, flush=True)
    return line

  def log_images(self, step: int, name: str, images: Any) -> list[pathlib.Path]:
    """Images -> TensorBoard `name/i` and predictions/<step>/<name>_<i>.png.

    Args:
      step: training step.
      name: TensorBoard tag prefix (file names replace characters other than [A-Za-z0-9_.-]).
      images: uint8[N,H,W,3], or a sequence of uint8[H,W,3] of different sizes.
    Returns:
      The PNG paths written ([] on non-primary processes).
    """
    self._check_open("log_images")
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    if not isinstance(images, (list, tuple)):
      images = [np.asarray(images)]  # A single image, or an array of the wrong rank.
    images = [np.asarray(x) for x in images]
    for i, x in enumerate(images):
      if x.dtype != np.uint8 or x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"log_images({name!r}): expected uint8[N,H,W,3] or a list of "
                         f"uint8[H,W,3], got {x.dtype}{list(x.shape)} at index {i}")
    if not self.is_primary:
      return []
    out_dir = self.workdir / "predictions" / str(int(step))
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "image"
    paths = []
    for i, image in enumerate(images):
      paths.append(out_dir / f"{stem}_{i}.png")
      PIL.Image.fromarray(image).save(paths[-1])
      if self._writer is not None:
        self._writer.add_image(f"{name}/{i}", image, int(step), dataformats="HWC")
    return paths

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files and the bar; further log calls are errors."""
    if self._closed:
      return
    self._closed = True
    if self._writer is not None:
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
    if self._bar is not None:
      self._bar.close()

  def __enter__(self) -> "MetricsLogger":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Throughput:
  """Examples/s, tokens/s and input-wait over the last interval; ETA from an EMA of step time.

  Time spent in `paused()` blocks (evaluation, checkpointing) is not step time; time in
  `waiting()` blocks (next(iterator)) counts as step time and is reported as `input_wait`.
  """

  def __init__(self, total_steps: int | None = None, *, start_step: int = 0,
               ema_decay: float = 0.7, clock: Callable[[], float] = time.perf_counter):
    """
    Args:
      total_steps: the last step, for eta_s; None: no ETA.
      start_step: the step the clock starts at (e.g. the restored step).
      ema_decay: weight of the old average in the moving average of step time.
      clock: seconds (injectable for tests).
    """
    if not 0.0 <= ema_decay < 1.0:
      raise ValueError(f"Throughput: ema_decay must be in [0, 1), got {ema_decay}")
    self.total_steps = total_steps
    self.ema_decay = ema_decay
    self._clock = clock
    self.step_time_ema: float | None = None
    self.reset(start_step)

  def reset(self, step: int) -> None:
    """Restarts the interval at `step` now (call it after the compiling first step)."""
    self._step, self._t = int(step), self._clock()
    self._paused = self._wait = 0.0

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    t0 = self._clock()
    try:
      yield
    finally:
      self._paused += self._clock() - t0

  @contextlib.contextmanager
  def waiting(self) -> Iterator[None]:
    t0 = self._clock()
    try:
      yield
    finally:
      self._wait += self._clock() - t0

  def update(self, step: int, examples: float, tokens: float | None = None) -> dict[str, float]:
    """Closes the interval (previous update or reset) at `step`.

    Args:
      step: current step, larger than the previous one.
      examples: examples processed in the interval (all processes: the global batch).
      tokens: tokens processed in the interval (e.g. non-padding text tokens), or None.
    Returns:
      {"examples_per_s", ["tokens_per_s"], "step_time_s", "input_wait", ["eta_s"]}.
    """
    step = int(step)
    if step <= self._step:
      raise ValueError(f"Throughput.update: step {step} must be after the previous {self._step}")
    now = self._clock()
    dt = max(now - self._t - self._paused, 1e-9)
    step_time = dt / (step - self._step)
    d = self.ema_decay
    self.step_time_ema = (step_time if self.step_time_ema is None
                          else d * self.step_time_ema + (1 - d) * step_time)
    out = {"examples_per_s": examples / dt}
    if tokens is not None:
      out["tokens_per_s"] = tokens / dt
    out["step_time_s"] = step_time
    out["input_wait"] = min(self._wait / dt, 1.0)
    if self.total_steps is not None:
      out["eta_s"] = max(self.total_steps - step, 0) * self.step_time_ema
    self._step, self._t = step, now
    self._paused = self._wait = 0.0
    return out
