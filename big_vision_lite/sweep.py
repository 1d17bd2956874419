"""Hyperparameter sweeps: a config's `sweep(add, arg)` expanded into train.py runs.

  python -m big_vision_lite.sweep --config configs/demo.py:mode=smoke --workdir runs/sw
  python -m big_vision_lite.sweep --config ... --workdir ROOT --parallel 4   # disjoint devices
  python -m big_vision_lite.sweep --config ... --workdir ROOT --print        # commands only
  python -m big_vision_lite.sweep --report ROOT [--metric caption/cider[:max]]
Extra `--config.key=value` flags apply to every run (e.g. `--config.total_steps=100`).

A config file may define (big_vision's vocabulary, whose launcher is not public):

  from big_vision_lite import sweep as sweep_lib
  def sweep(add, arg=None):            # arg: the config's arg string ("mode=smoke")
    for point in sweep_lib.grid(lr=[1e-5, 3e-5], wd=[0.0, 1e-6]):
      add(**point)                     # one run per add(); keys are config paths
    add(lr=1e-5, **{"input.batch_size": 64}, **sweep_lib.arg(res=448))  # config arg too
  def metrics(arg=None):
    return ["caption/cider", ("val/loss", "min")]   # the first one is the headline

Each run is `train.py --config=<file>:<arg> --workdir=ROOT/<name> --config.k=v ...` with its
name made of its overrides ("lr=1e-05,wd=0.0"), its stdout/stderr appended to
ROOT/<name>/train.log, and its status in ROOT/sweep.json. Every override is checked against
the config (with train.py's own flag parser) before anything runs. Re-running the same
command skips finished runs (final_metrics.json, or a checkpoint at total_steps) and lets
train.py resume the others from their checkpoints; failed runs are retried.

By default the runs go one after another, each on every device (on a multi-host slice, start
the same command on every host); `--parallel N` runs N at once on disjoint device subsets
(big_vision_lite/sweep_launch.py says how, per platform). `--report` is sweep_report.py.
"""
from collections.abc import Callable, Iterator, Mapping, Sequence
import argparse
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import os
import random as _random
import re
import shlex
import signal
import sys
from typing import Any
import warnings

from big_vision_lite import sweep_launch
from big_vision_lite import sweep_report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPO, "train.py")
_NAME_MAX = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]+")
Value = bool | int | float | str | None | tuple


# ----------------------------------------------------------------- search spaces


@dataclasses.dataclass(frozen=True)
class Distribution:
  """One axis of a random search: loguniform(a, b), uniform(a, b) or choice(*values)."""
  kind: str
  low: float = 0.0
  high: float = 0.0
  values: tuple = ()

  def sample(self, rng: _random.Random, digits: int) -> Value:
    if self.kind == "choice":
      return self.values[rng.randrange(len(self.values))]
    u = rng.random()
    if self.kind == "loguniform":
      x = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
    else:
      x = self.low + u * (self.high - self.low)
    # Rounded so that run names stay short and the flag carries exactly the named value.
    return float(f"{x:.{digits}g}")


def loguniform(low: float, high: float) -> Distribution:
  if not 0 < low < high:
    raise ValueError(f"loguniform({low}, {high}): expected 0 < low < high")
  return Distribution("loguniform", float(low), float(high))


def uniform(low: float, high: float) -> Distribution:
  if not low < high:
    raise ValueError(f"uniform({low}, {high}): expected low < high")
  return Distribution("uniform", float(low), float(high))


def choice(*values: Value) -> Distribution:
  if not values:
    raise ValueError("choice(): expected at least one value")
  return Distribution("choice", values=tuple(values))


def grid(**axes: Any) -> list[dict]:
  """Cartesian product, the first axis varying slowest: grid(lr=[1, 2], wd=[0, 3]) ->
  [{lr: 1, wd: 0}, {lr: 1, wd: 3}, {lr: 2, wd: 0}, {lr: 2, wd: 3}]. A list, tuple or range
  holds an axis's values, anything else is one value (so a tuple-valued field's values go
  in a list: patch=[(14, 14), (16, 16)])."""
  lists = {k: list(v) if isinstance(v, (list, tuple, range)) else [v] for k, v in axes.items()}
  for k, v in lists.items():
    if not v:
      raise ValueError(f"grid(): axis {k!r} has no values")
  return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]


def random(n: int, seed: int = 0, digits: int = 3, **distributions: Any) -> list[dict]:
  """n points drawn from the distributions (plain values are constants); floats rounded to
  `digits` significant digits. The same seed gives the same points (stable run names)."""
  if n < 1:
    raise ValueError(f"random(n={n}): expected n >= 1")
  rng = _random.Random(seed)
  return [{k: d.sample(rng, digits) if isinstance(d, Distribution) else d
           for k, d in distributions.items()} for _ in range(n)]


def arg(**kw: Any) -> dict:
  """add(**arg(res=448), lr=...): the run uses the config file's arg res=448 (merged over the
  sweep's own arg, e.g. configs/x.py:mode=smoke -> mode=smoke,res=448)."""
  for k, v in kw.items():
    if "," in str(v) or "=" in str(v):
      raise ValueError(f"arg({k}={v!r}): config arg values cannot hold ',' or '='")
  return {"config_arg": ",".join(f"{k}={v}" for k, v in kw.items())}


# ---------------------------------------------------------------------- expansion


@dataclasses.dataclass
class Run:
  """One train.py run of a sweep."""
  name: str
  overrides: dict            # Flattened config path -> value (as given to add()).
  config_arg: str            # The config file's arg for this run ("" for none).
  flags: list                # ["--config.lr=1e-05", ...]
  total_steps: int | None    # From the run's own config (for the finished check).


def _plain(key: str, v: Any) -> Value:
  if hasattr(v, "item") and callable(v.item) and getattr(v, "shape", None) == ():
    v = v.item()  # numpy scalars
  if v is None or isinstance(v, (bool, int, float, str)):
    return v
  if isinstance(v, (list, tuple)):
    return tuple(_plain(key, x) for x in v)
  raise TypeError(f"sweep override {key}={v!r}: expected a bool, int, float, str, None or "
                  "tuple (a flag value train.py can parse)")


def _flatten(overrides: Mapping, prefix: str = "") -> Iterator[tuple[str, Value]]:
  for k, v in overrides.items():
    if isinstance(v, Mapping):  # add(input=dict(batch_size=8)) == input.batch_size=8
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", _plain(f"{prefix}{k}", v)


def flag_value(v: Value) -> str:
  """A value as ml_collections' config_flags parses it back (float/int/bool/tuple/str)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  if isinstance(v, (int, float)) or v is None:
    return repr(v)
  if isinstance(v, tuple):
    return repr(v)
  return v


def _name_value(v: Value) -> str:
  if isinstance(v, tuple):
    return "_".join(_name_value(x) for x in v)
  return repr(v) if isinstance(v, float) else str(v)


def run_name(overrides: Mapping[str, Value], config_arg: str = "") -> str:
  """Stable, filesystem-safe: "res=448,lr=1e-05,wd=0.0" (the arg first, then sorted keys)."""
  parts = [config_arg] if config_arg else []
  parts += [f"{k}={_name_value(overrides[k])}" for k in sorted(overrides)]
  name = _UNSAFE.sub("_", ",".join(parts)).strip("._") or "default"
  if len(name) > _NAME_MAX:
    name = f"{name[:_NAME_MAX - 9]}-{_digest(overrides, config_arg)}"
  return name


def _digest(overrides, config_arg) -> str:
  blob = json.dumps([config_arg, sorted(overrides.items())], default=str)
  return hashlib.sha1(blob.encode()).hexdigest()[:8]


def _merge_arg(base: str, extra: str) -> str:
  pairs = {}
  for item in filter(None, base.split(",") + extra.split(",")):
    key, _, value = item.partition("=")
    pairs[key] = value
  return ",".join(f"{k}={v}" if v else k for k, v in pairs.items())


def load_config_module(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--config {path}: no such config file")
  if REPO not in sys.path:  # Configs import `configs.common` and `big_vision_lite`.
    sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location("_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _call(fn: Callable, *args):
  """big_vision's sweep(add) and metrics() may or may not take the config arg."""
  params = inspect.signature(fn).parameters.values()
  if any(p.kind == p.VAR_POSITIONAL for p in params):
    return fn(*args)
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  return fn(*args[:len(positional)])


def validated_config(config_spec: str, flags: Sequence[str], where: str):
  """Parses the run's flags exactly as train.py does (config_flags, locked config)."""
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ["train.py", f"--config={config_spec}", *flags]
  values = absl_flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    with warnings.catch_warnings():  # config_flags' own load_module() deprecation.
      warnings.simplefilter("ignore", DeprecationWarning)
      values(argv)
    return values.config
  except (absl_flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: train.py would reject `{' '.join(argv[1:])}`: "
                     f"{type(e).__name__}: {e}") from None


def expand(config_spec: str, extra_flags: Sequence[str] = ()) -> tuple[list[Run], list]:
  """--config spec -> (runs of its sweep(), metrics() specs or [])."""
  path, _, base_arg = config_spec.partition(":")
  module = load_config_module(path)
  if not callable(getattr(module, "sweep", None)):
    raise ValueError(f"{path} defines no sweep(add, arg=None) function")
  points = []
  _call(module.sweep, lambda **overrides: points.append(overrides), base_arg or None)
  if not points:
    raise ValueError(f"{path}: sweep() called add() for no run")
  common = {f.partition("=")[0] for f in extra_flags}
  runs, seen = [], {}
  for point in points:
    point = dict(point)
    run_arg = _merge_arg("", str(point.pop("config_arg", "") or ""))
    config_arg = _merge_arg(base_arg, run_arg)
    overrides = dict(_flatten(point))
    flags = [f"--config.{k}={flag_value(v)}" for k, v in overrides.items()]
    if clash := sorted(common & {f.partition("=")[0] for f in flags}):
      raise ValueError(f"{path}: {clash} given on the command line and swept by sweep()")
    name = run_name(overrides, run_arg)
    key = json.dumps([config_arg, sorted(overrides.items())], default=str)
    if seen.get(name, key) != key:  # Sanitising made two different runs look alike.
      name = f"{name[:_NAME_MAX - 9]}-{_digest(overrides, run_arg)}"
    if name in seen:
      raise ValueError(f"{path}: sweep() added run {name} twice")
    seen[name] = key
    spec = f"{path}:{config_arg}" if config_arg else path
    config = validated_config(spec, [*extra_flags, *flags], f"{path} sweep run {name}")
    total = config.get("total_steps") if hasattr(config, "get") else None
    runs.append(Run(name, {k: list(v) if isinstance(v, tuple) else v
                           for k, v in overrides.items()},
                    config_arg, flags, total if isinstance(total, int) else None))
  metrics = list(_call(module.metrics, base_arg or None)) if callable(
      getattr(module, "metrics", None)) else []
  for m in metrics:
    sweep_report.parse_metric(m)  # A malformed metrics() entry fails before any run.
  return runs, metrics


# ---------------------------------------------------------------------------- CLI


def _merge_manifest(root, config_spec, extra_flags, runs, metrics, train_cmd) -> dict:
  fresh = {"config": config_spec, "extra_flags": list(extra_flags), "metrics": metrics,
           "train_cmd": train_cmd, "runs": []}
  old = sweep_report.read_manifest(root) if os.path.isfile(
      os.path.join(root, sweep_report.MANIFEST)) else fresh
  for key in ("config", "extra_flags"):
    if old.get(key) != fresh[key]:
      raise ValueError(f"{root}/{sweep_report.MANIFEST} belongs to a sweep with {key}="
                       f"{old.get(key)!r}, not {fresh[key]!r}: use another --workdir")
  previous = {r["name"]: r for r in old["runs"]}
  fresh["runs"] = [{**previous.get(r.name, {"status": "pending", "attempts": 0}),
                    **dataclasses.asdict(r), "dropped": False} for r in runs]
  # Runs a changed sweep() no longer adds stay listed (their results are still results).
  fresh["runs"] += [{**r, "dropped": True} for n, r in previous.items()
                    if n not in {x.name for x in runs}]
  return fresh


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m big_vision_lite.sweep", allow_abbrev=False,
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--config", help="configs/<task>.py[:arg=val,...] defining sweep(add, arg)")
  p.add_argument("--workdir", help="sweep root: one sub-folder per run, sweep.json")
  p.add_argument("--report", metavar="ROOT", help="rank the runs of ROOT; write report.*")
  p.add_argument("--metric", help="headline metric name[:min|max] (default: metrics()[0])")
  p.add_argument("--print", action="store_true", dest="print_only",
                 help="print one command per unfinished run (for an external launcher)")
  p.add_argument("--parallel", type=int, default=1, help="runs at once, on disjoint devices")
  p.add_argument("--platform", default="auto", choices=("auto", "cpu", "gpu", "tpu"))
  p.add_argument("--python", help="interpreter for train.py (default: this one; with "
                 "--print: `python`)")
  p.add_argument("--train_script", default=TRAIN_SCRIPT, help="the trainer (train.py)")
  p.add_argument("--poll_s", type=float, default=0.5, help=argparse.SUPPRESS)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  parser = _parser()
  args, rest = parser.parse_known_args(argv)
  if bad := [a for a in rest if not re.match(r"--config\.[\w.]+=", a)]:
    parser.error(f"unrecognized arguments {bad} (config overrides are --config.key=value)")
  if args.report:
    report = sweep_report.write_report(args.report, args.metric,
                                       lock_held=sweep_launch.lock_held(args.report))
    print(report["text"])
    return 0
  if not args.config or not args.workdir:
    parser.error("--config and --workdir are required (or --report ROOT)")
  runs, metrics = expand(args.config, rest)
  root = args.workdir
  os.makedirs(root, exist_ok=True)
  with sweep_launch.Lock(root):
    return _run(args, rest, runs, metrics, root)


def _interrupt(signum, frame):
  del signum, frame
  raise KeyboardInterrupt  # SIGTERM (a scheduler's stop) ends the runs as Ctrl-C does.


def _run(args, rest, runs, metrics, root) -> int:
  if args.print_only:
    train_cmd = [args.python or "python", os.path.relpath(args.train_script)]
  else:
    train_cmd = [args.python or sys.executable, args.train_script]
  manifest = _merge_manifest(root, args.config, rest, runs, metrics, train_cmd)
  if args.print_only:
    path = args.config.partition(":")[0]
    for run in manifest["runs"]:
      if run.get("dropped"):
        continue
      if reason := sweep_report.finished_reason(os.path.join(root, run["name"]),
                                                run.get("total_steps")):
        sweep_launch.log(f"skip {run['name']}: finished ({reason})")
        continue
      print(shlex.join(sweep_launch.command(train_cmd, path, run, root, rest)), flush=True)
    sweep_report.write_manifest(root, manifest)
    return 0
  platform, ids = sweep_launch.detect_devices(args.platform)
  slots = sweep_launch.device_slices(platform, ids, args.parallel)
  sweep_launch.log(f"{len(runs)} runs in {root}; {args.parallel} at a time on {platform}"
                   f"{' ' + str(ids) if ids else ''}")
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    failed = sweep_launch.launch(manifest, root, slots, poll_s=args.poll_s)
  except KeyboardInterrupt:
    return 130
  finally:
    signal.signal(signal.SIGTERM, previous)
  report = sweep_report.write_report(root, args.metric, lock_held=True)
  print(report["text"])
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
