"""Where an XLA CPU program spends its time: one traced run (jax profiler), ops by category.

Shared by bench/train_step.py and bench/decode.py (`--profile DIR`). The categories read XLA
CPU thunk names, so they mean something on the CPU backend only.
"""
import pathlib
import re
import time

# Trace events that contain other ops (counting them would count time twice).
_CONTAINERS = ("ThunkExecutor", "SlinkyThreadPool", "while", "conditional", "call")


def _instructions(hlo_text: str) -> tuple[set[str], dict[str, str]]:
  """(names of the instructions that are, or fuse, a dot / convolution (e.g. "ynn_fusion.3"),
  {instruction name: the jax op it came from (metadata op_name)})."""
  comps, calls, origin, roots, current = {}, {}, {}, {}, None
  for line in hlo_text.splitlines():
    if line and not line.startswith(" ") and "{" in line and "(" in line:
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      comps[current] = False
    elif " = " in line and current is not None:
      name = line.split(" = ")[0].split()[-1].lstrip("%")
      body = line.split(" = ", 1)[1]
      if re.search(r"\b(dot|convolution)\(", body):
        comps[current] = True
        calls[name] = None
      for callee in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", body):
        calls.setdefault(name, callee)
      if m := re.search(r'op_name="([^"]+)"', body):
        origin.setdefault(name, m.group(1))
        if line.lstrip().startswith("ROOT"):
          roots[current] = m.group(1)
  for name, callee in calls.items():  # A fusion without metadata: its root's.
    if name not in origin and callee in roots:
      origin[name] = roots[callee]
  return {n for n, c in calls.items() if c is None or comps.get(c, False)}, origin


def _short(op_name: str) -> str:
  """'jit(_run)/while/body/Model.extend/llm.logits/...D,VD->...V/dot_general' ->
  'Model.extend/llm.logits/...D,VD->...V/dot_general' (the jit/while/body prefix dropped)."""
  parts = [p for p in op_name.split("/")
           if not (p.startswith("jit(") or p in ("while", "body", "closed_call", "cond"))]
  return "/".join(parts)


def profile(run, sync, hlo_text: str, folder: str, top: int = 8) -> dict:
  """Traces one call of run(); returns thread-seconds per category and the heaviest ops.

  matmul: dots and convolutions (and fusions around them); fill: broadcasts of a constant
  (zero-initialised buffers, e.g. of scan residuals); copy: copies, transposes and
  (dynamic-)slice / update-slice data movement; other: elementwise and reductions.
  ops: the `top` heaviest instructions with their total seconds, number of executions and
  the jax op they came from.
  """
  import jax  # pylint: disable=g-import-not-at-top
  matmuls, origin = _instructions(hlo_text)
  jax.profiler.start_trace(folder)
  t0 = time.perf_counter()
  sync(run())
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()
  files = sorted(pathlib.Path(folder).rglob("*.xplane.pb"), key=lambda f: f.stat().st_mtime)
  data = jax.profiler.ProfileData.from_file(str(files[-1]))
  cats = {"matmul": 0.0, "copy": 0.0, "fill": 0.0, "other": 0.0}
  secs, calls = {}, {}
  for plane in data.planes:
    for line in plane.lines:
      if "XLA" not in line.name and "PjRt" not in line.name:
        continue
      for ev in line.events:
        name = ev.name
        if name.startswith(_CONTAINERS) or " " in name:
          continue
        sec = ev.duration_ns / 1e9
        if name in matmuls:
          cat = "matmul"
        elif name.startswith("wrapped_broadcast"):
          cat = "fill"
        elif re.search(r"copy|transpose|slice|concatenate|pad", name):
          cat = "copy"
        else:
          cat = "other"
        cats[cat] += sec
        secs[name] = secs.get(name, 0.0) + sec
        calls[name] = calls.get(name, 0) + 1
  total = sum(cats.values())
  if not total:
    raise RuntimeError(f"no XLA op events in the trace under {folder} (the categories read "
                       f"XLA CPU thunk events; backend: {jax.default_backend()})")
  heaviest = sorted(secs, key=lambda n: -secs[n])[:top]
  return {"wall_s": round(wall, 3), "op_thread_s": round(total, 3),
          "fractions": {k: round(v / total, 3) for k, v in cats.items()},
          "top_ops": {n: round(secs[n], 3) for n in heaviest},
          "ops": [{"name": n, "s": round(secs[n], 4), "calls": calls[n],
                   "matmul": n in matmuls, "what": _short(origin.get(n, ""))}
                  for n in heaviest]}
