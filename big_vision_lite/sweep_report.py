"""What a sweep root holds, read back: manifest, each run's status and metrics, the report.

  python -m big_vision_lite.sweep --report ROOT [--metric NAME[:min|:max]]

ROOT/sweep.json (written by big_vision_lite/sweep.py) lists the runs, their overrides and
the config's headline metrics; each run's folder ROOT/<run> holds what train.py writes
(metrics.jsonl, final_metrics.json, checkpoints/<step>/) and the launcher's train.log.
The report ranks the runs by the headline metric's final value (final_metrics.json, else the
last logged value; ties go to the next metrics in order) and also shows each metric's best
logged value; failed runs keep their error. It writes ROOT/report.csv, ROOT/report.md and
ROOT/report.png (the headline metric against each swept hyperparameter).
"""
from collections.abc import Mapping, Sequence
import csv
import json
import math
import os
import re
from typing import Any

MANIFEST = "sweep.json"
LOG_NAME = "train.log"
ATTEMPT_MARK = "==== sweep attempt"
# Metric names whose smaller values are better (the last path component is matched).
_MIN_PATTERN = re.compile(r"(loss|perplexity|ppl|error|err|invalid)", re.IGNORECASE)
# "pkg.mod.SomeError: message" or "ValueError: message" (the exception line of a traceback).
_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)?(Error|Exception|Interrupt|Exit)\b.*")


# ----------------------------------------------------------------------------- manifest


def read_manifest(root: str) -> dict:
  path = os.path.join(root, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no sweep manifest (start the sweep with "
                            "`python -m big_vision_lite.sweep --config ... --workdir ROOT`)")
  with open(path) as f:
    try:
      manifest = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(manifest, dict) or not isinstance(manifest.get("runs"), list):
    raise ValueError(f"{path}: expected an object with a 'runs' list")
  return manifest


def write_manifest(root: str, manifest: Mapping) -> None:
  """Atomic: a reader (--report while the sweep runs) never sees half a file."""
  tmp = os.path.join(root, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(root, MANIFEST))


# ------------------------------------------------------------------------ run status


def checkpoint_steps(workdir: str) -> list[int]:
  """Steps of the committed checkpoints in workdir/checkpoints: run_state.committed_steps'
  rule (a <step> folder holding orbax's commit_success.txt), without importing JAX/orbax."""
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder)
                if n.isdigit() and os.path.isfile(os.path.join(folder, n, "commit_success.txt")))


def finished_reason(workdir: str, total_steps: int | None) -> str | None:
  """Why a run counts as finished (None: it does not): train.py's final files."""
  if os.path.isfile(os.path.join(workdir, "final_metrics.json")):
    return "final_metrics.json"
  steps = checkpoint_steps(workdir)
  if total_steps is not None and steps and steps[-1] >= total_steps:
    return f"checkpoint at step {steps[-1]} = total_steps"
  return None


def error_from_log(path: str, max_chars: int = 300) -> str:
  """The failure of the log's last attempt: its exception line, else its last line."""
  if not os.path.isfile(path):
    return f"no log at {path}"
  with open(path, errors="replace") as f:
    f.seek(max(0, os.path.getsize(path) - 200_000))
    text = f.read()
  last_attempt = text.rsplit(ATTEMPT_MARK, 1)[-1]
  lines = [l.rstrip() for l in last_attempt.splitlines() if l.strip()]
  lines = [l for l in lines if not l.startswith("=" * 4)]
  for line in reversed(lines):
    if _EXC_LINE.match(line):
      return line[:max_chars]
  return lines[-1][:max_chars] if lines else "(empty log)"


# --------------------------------------------------------------------------- metrics


def direction(metric: str) -> str:
  """'min' for losses, perplexities, error and invalid rates; 'max' for everything else."""
  return "min" if _MIN_PATTERN.search(metric.rsplit("/", 1)[-1]) else "max"


def parse_metric(spec: Any) -> tuple[str, str]:
  """"name", "name:min", ("name", "max") -> (name, "min" | "max")."""
  if isinstance(spec, (tuple, list)) and len(spec) == 2:
    name, mode = spec
  elif isinstance(spec, str):
    name, _, mode = spec.partition(":")
    mode = mode or direction(name)
  else:
    raise ValueError(f"metric {spec!r}: expected 'name', 'name:min|max' or (name, 'min'|'max')")
  if mode not in ("min", "max") or not name:
    raise ValueError(f"metric {spec!r}: the direction must be 'min' or 'max'")
  return str(name), mode


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def read_history(workdir: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl -> {step: {metric: value}}; values logged again for a step (a resumed run
  redoes the steps after its last checkpoint) replace the interrupted attempt's ones."""
  path = os.path.join(workdir, "metrics.jsonl")
  history: dict[int, dict[str, float]] = {}
  if not os.path.isfile(path):
    return history
  with open(path, errors="replace") as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by a kill.
      if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        continue
      values = {k: float(v) for k, v in record.items()
                if k not in ("step", "time") and _is_number(v)}
      history.setdefault(record["step"], {}).update(values)
  return history


def read_final(workdir: str) -> dict[str, float]:
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected an object {{metric: value}}, got {type(data).__name__}")
  return {k: float(v) for k, v in data.items() if _is_number(v)}


def summarize(history: Mapping[int, Mapping[str, float]], final: Mapping[str, float],
              metric: str, mode: str) -> dict:
  """{final, best, best_step} of one metric (None where the run never logged it)."""
  points = [(step, vals[metric]) for step, vals in sorted(history.items()) if metric in vals]
  last = final.get(metric, points[-1][1] if points else None)
  if metric in final:
    points.append((max(history, default=0), final[metric]))
  best, best_step = None, None
  for step, value in points:
    if best is None or (value < best if mode == "min" else value > best):
      best, best_step = value, step
  return {"final": last, "best": best, "best_step": best_step}


# ---------------------------------------------------------------------------- collect


def collect(root: str, metric: str | None = None, lock_held: bool = False) -> dict:
  """Every run's status and metrics, ranked by the headline metric.

  Args:
    root: the sweep root (holds sweep.json).
    metric: headline override "name[:min|max]" (default: the config's metrics()[0], else
      "loss").
    lock_held: another process runs the sweep now ("running" runs are then not
      "interrupted").
  Returns:
    {"headline": (name, mode), "metrics": [(name, mode)], "keys": [swept keys],
     "rows": [row, ...] best first}; row = {name, status, overrides, error, steps,
     elapsed_s, metrics: {name: {final, best, best_step}}}.
  """
  manifest = read_manifest(root)
  runs = []
  for index, run in enumerate(manifest["runs"]):
    workdir = os.path.join(root, run["name"])
    status, error = run.get("status", "pending"), run.get("error")
    if finished_reason(workdir, run.get("total_steps")):
      status, error = "done", None
    elif status == "running" and not lock_held:
      status = "interrupted"
    elif status == "failed" and not error:
      error = error_from_log(os.path.join(workdir, LOG_NAME))
    runs.append((index, run, status, error, read_history(workdir), read_final(workdir)))

  specs = [parse_metric(m) for m in manifest.get("metrics") or []]
  if not specs:  # No metrics() in the config: the loss, then every final metric.
    finals = sorted({k for *_, final in runs for k in final if not k.startswith("baseline/")})
    specs = [("loss", "min")] + [(k, direction(k)) for k in finals if k != "loss"]
  if metric:
    specs = [parse_metric(metric)] + [s for s in specs if s[0] != parse_metric(metric)[0]]
  headline = specs[0]

  rows = [{"index": index, "name": run["name"], "status": status, "error": error,
           "overrides": run.get("overrides", {}), "steps": max(history, default=None),
           "elapsed_s": run.get("elapsed_s"),
           "metrics": {m: summarize(history, final, m, mode) for m, mode in specs}}
          for index, run, status, error, history, final in runs]
  rows.sort(key=lambda r: _rank_key(r, specs))
  return {"headline": headline, "metrics": specs,
          "keys": swept_keys([run.get("overrides", {}) for _, run, *_ in runs]),
          "rows": rows, "root": root}


def _rank_key(row, specs):
  """Finished runs first, then runs still going, then failed ones; within a tier by the
  headline's final value, ties broken by the other metrics in order, then sweep order."""
  key = [{"done": 0, "failed": 2}.get(row["status"], 1)]
  for name, mode in specs:
    value = row["metrics"][name]["final"]
    has = value is not None and not math.isnan(value)
    key += [not has, (value if mode == "min" else -value) if has else 0.0]
  return (*key, row["index"])


def swept_keys(overrides: Sequence[Mapping]) -> list[str]:
  """Keys whose value differs between runs (constant overrides are not hyperparameters)."""
  keys = list(dict.fromkeys(k for o in overrides for k in o))
  return [k for k in keys if len({json.dumps(o.get(k), sort_keys=True) for o in overrides}) > 1]


# ----------------------------------------------------------------------------- output


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return "(" + ", ".join(_fmt(x) for x in v) + ")"
  return str(v)


def table(report: Mapping) -> tuple[list[str], list[list[str]]]:
  """(header, rows of strings) of the ranking, as printed, CSV'd and markdown'd."""
  header = ["rank", "run", "status", *report["keys"]]
  for m, _ in report["metrics"]:
    header += [m, f"best {m}", f"best {m} step"]
  header += ["steps", "elapsed_s", "error"]
  out = []
  for rank, row in enumerate(report["rows"], 1):
    cells = [str(rank), row["name"], row["status"]]
    cells += [_fmt(row["overrides"].get(k)) for k in report["keys"]]
    for m, _ in report["metrics"]:
      s = row["metrics"].get(m) or {}
      cells += [_fmt(s.get("final")), _fmt(s.get("best")), _fmt(s.get("best_step"))]
    cells += [_fmt(row["steps"]), _fmt(row["elapsed_s"]), row["error"] or ""]
    out.append(cells)
  return header, out


def format_text(report: Mapping) -> str:
  """The terminal table (headline first; errors listed under it)."""
  header, rows = table(report)
  keep = [i for i, h in enumerate(header) if h not in ("error", "elapsed_s")
          and not h.endswith(" step")]
  cols = [[header[i]] + [r[i] for r in rows] for i in keep]
  widths = [max(len(c) for c in col) for col in cols]
  lines = ["  ".join(c[j].ljust(w) for c, w in zip(cols, widths)).rstrip()
           for j in range(len(rows) + 1)]
  lines.insert(1, "  ".join("-" * w for w in widths))
  name, mode = report["headline"]
  lines.insert(0, f"sweep {report['root']}: {len(rows)} runs ranked by {name} ({mode})")
  failed = [r for r in report["rows"] if r["status"] == "failed"]
  if failed:
    lines.append("failed runs:")
    lines += [f"  {r['name']}: {r['error']}" for r in failed]
  return "\n".join(lines)


def write_csv(report: Mapping, path: str) -> None:
  header, rows = table(report)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def write_markdown(report: Mapping, path: str) -> None:
  header, rows = table(report)
  keep = [i for i, h in enumerate(header) if h != "error"]
  esc = lambda s: s.replace("|", "\\|")
  name, mode = report["headline"]
  lines = [f"# Sweep {report['root']}", "", f"Ranked by `{name}` ({mode}).", "",
           "| " + " | ".join(esc(header[i]) for i in keep) + " |",
           "|" + "---|" * len(keep)]
  lines += ["| " + " | ".join(esc(r[i]) for i in keep) + " |" for r in rows]
  failed = [r for r in report["rows"] if r["status"] == "failed"]
  if failed:
    lines += ["", "## Failed runs", ""]
    lines += [f"- `{r['name']}`: `{esc(r['error'] or '')}`" for r in failed]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot(report: Mapping, path: str) -> bool:
  """Headline metric (final) against each swept hyperparameter, one panel each; the best
  run is starred. Returns False (and writes nothing) when no run has a value yet."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  name, mode = report["headline"]
  rows = [r for r in report["rows"] if r["metrics"][name]["final"] is not None]
  keys = report["keys"] or ["run"]
  if not rows:
    return False
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    xs = [r["name"] if key == "run" else r["overrides"].get(key) for r in rows]
    ys = [r["metrics"][name]["final"] for r in rows]
    numeric = all(_is_number(x) for x in xs)
    if numeric and len(set(xs)) > 6:  # Random search: a real axis, log for log-spread values.
      positive = sorted(x for x in xs if x > 0)
      if positive and max(positive) >= 10 * min(positive) and _log_spread(positive):
        ax.set_xscale("symlog" if len(positive) < len(xs) else "log",
                      **({"linthresh": min(positive)} if len(positive) < len(xs) else {}))
      pos = xs
    else:  # A grid: evenly spaced categories in sorted order (failed runs' values too).
      every = [r["name"] if key == "run" else r["overrides"].get(key) for r in report["rows"]]
      cats = sorted(set(map(json.dumps, every)), key=lambda s: _sort_value(json.loads(s)))
      pos = [cats.index(json.dumps(x)) for x in xs]
      ax.set_xticks(range(len(cats)), [_fmt(json.loads(c)) for c in cats], rotation=30)
    done = [r["status"] == "done" for r in rows]
    ax.scatter([p for p, d in zip(pos, done) if d], [y for y, d in zip(ys, done) if d],
               c="tab:blue", label="done")
    if not all(done):
      ax.scatter([p for p, d in zip(pos, done) if not d], [y for y, d in zip(ys, done) if not d],
                 c="tab:gray", marker="x", label="unfinished")
    if rows[0]["status"] == "done":
      ax.scatter([pos[0]], [ys[0]], marker="*", s=220, c="tab:red", label="best", zorder=3)
    ax.set_xlabel(key)
    ax.set_ylabel(f"{name} ({mode})")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8)
  fig.suptitle(f"{report['root']}: {name} of {len(rows)}/{len(report['rows'])} runs", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return True


def _log_spread(xs: Sequence[float]) -> bool:
  """True when the median sits nearer the geometric than the arithmetic middle (a
  loguniform draw such as a learning rate, not a uniform one such as a dropout rate)."""
  lo, hi, median = xs[0], xs[-1], xs[len(xs) // 2]
  return abs(math.log(median / math.sqrt(lo * hi))) < abs(math.log(median / ((lo + hi) / 2)))


def _sort_value(v):
  return (0, v, "") if _is_number(v) else (1, 0, json.dumps(v))


def write_report(root: str, metric: str | None = None, lock_held: bool = False) -> dict:
  """collect() + ROOT/report.{csv,md,png}; returns the report (with its "text")."""
  report = collect(root, metric, lock_held=lock_held)
  write_csv(report, os.path.join(root, "report.csv"))
  write_markdown(report, os.path.join(root, "report.md"))
  report["plot"] = os.path.join(root, "report.png") if plot(
      report, os.path.join(root, "report.png")) else None
  report["text"] = format_text(report)
  return report
