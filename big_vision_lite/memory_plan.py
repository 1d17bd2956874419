"""Per-device memory plan of the train step, for `train.py --dry_run`: does it fit a chip?

    python train.py --config configs/cococap.py:variant=pg2_28b,res=448 --workdir /tmp/plan \
        --dry_run --dry_run_devices=256 --dry_run_chip=v5p

train.py builds the state abstractly (jax.ShapeDtypeStruct, no weights) with its shardings
and the jitted train step, then calls `report(...)`, which prints and returns:

  1. State bytes per device, EXACT: every leaf's shard shape under its NamedSharding
     (params, optimizer state, LoRA adapters, and the batch), summed per device, max over
     devices. Leaves that stay whole on every device (no dim divisible by the mesh axes)
     are listed: they are where FSDP silently saves nothing.
  2. XLA's memory analysis of the AOT-compiled step (`lower(...).compile()`), per device:
     arguments, outputs, donated (aliased) bytes and temporaries. With fake CPU devices
     (`--dry_run_devices`, XLA_FLAGS=--xla_force_host_platform_device_count) this is the
     CPU backend's buffer assignment. The SPMD partitioning (what each device holds, which
     activations end up unsharded) comes from the same partitioner as on TPU/GPU, but
     fusion, layouts, rematerialisation and scheduling differ per backend, so the
     temporaries are an ESTIMATE: TPU/GPU fuse more elementwise work and usually need
     less, and have buffers of their own (collective scratch, padding to tile sizes).
     Run without --dry_run_devices on the target accelerator for that backend's numbers.
     The largest per-device buffers of the compiled program are listed (with the jax op
     that made them): an activation whose leading dim is the *global* batch, or [B*T, V]
     logits, shows at once that activations were not sharded over the batch.
  3. FLOPs per device: XLA's cost analysis of the lowered (global / devices) and compiled
     (per-device) program, which counts a scan body once (an undercount by ~depth with
     scanned layers), and the analytic model FLOPs (`flops.paligemma_train_flops`).
  4. A table of chips (HBM per chip) with the headroom and "fits" (need <= 90% of HBM),
     "tight" (90-100%: runtime reservations and fragmentation may tip it) or "does not fit".

Cost: lowering takes seconds. Compiling the 27B Gemma 2 + So400m step for 256 fake CPU
devices took ~45 CPU-seconds (1.5-2 minutes on 2 busy cores) and < 2 GiB of host RAM (no
weights are allocated; LLVM's optimisation of the never-run CPU code is skipped, which
halves the time and does not change the buffer assignment). `report(...,
compile_step=False)` skips the compile and plans with the exact state bytes only.
"""
import collections
from collections.abc import Mapping
import math
import re
import time
from typing import Any

import jax
import numpy as np

GiB = 2 ** 30

# HBM per chip in GiB as the vendors state it (usable memory is a little less: the TPU
# runtime and CUDA reserve some; JAX on GPU preallocates 75% unless
# XLA_PYTHON_CLIENT_MEM_FRACTION is raised).
CHIPS: dict[str, float] = {
    "v4": 32, "v5e": 16, "v5p": 95, "v6e": 32,
    "a100-40gb": 40, "a100-80gb": 80, "h100": 80, "h200": 141, "l4": 24,
}
_ALIASES = {"v5lite": "v5e", "v5litepod": "v5e", "v6lite": "v6e", "trillium": "v6e",
            "a10040": "a100-40gb", "a10080": "a100-80gb", "h100sxm": "h100", "h200sxm": "h200"}
FIT_FRACTION = 0.9  # "fits" leaves 10% of HBM for runtime reservations and fragmentation.

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_HLO_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (\w+)\[([\d,]*)\](?:\{[^}]*\})?\s+"
                        r"([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Ops whose value is an input or a view of another buffer (bitcast: a reshape in place).
_NO_NEW_BUFFER = ("parameter", "constant", "bitcast", "get-tuple-element", "tuple")


def chip_capacity(chip: str) -> tuple[str, int]:
  """'v5p', 'TPU v5e', 'H100', 'a100-40gb', ... -> (canonical name, HBM bytes per chip)."""
  norm = lambda s: re.sub(r"^tpu|[\s_\-]|gb$", "", s.lower())
  table = {norm(k): k for k in CHIPS} | {k: v for k, v in _ALIASES.items()}
  name = table.get(norm(str(chip)))
  if name is None:
    raise ValueError(f"--dry_run_chip={chip!r}: unknown chip; known: {sorted(CHIPS)}")
  return name, int(CHIPS[name] * GiB)


def fmt_bytes(n: float | None) -> str:
  if n is None:
    return "-"
  sign, n = ("-" if n < 0 else ""), abs(n)
  for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if n >= scale:
      return f"{sign}{n / scale:.2f} {unit}"
  return f"{sign}{int(n)} B"


# ------------------------------------------------------------------ exact sharded bytes


def _shard_sizes(shape: tuple[int, ...], sharding) -> dict[Any, int]:
  """{device (or its position in an AbstractMesh): elements of the array it holds}."""
  mesh = getattr(sharding, "mesh", None)
  if isinstance(mesh, jax.sharding.AbstractMesh):  # No devices: NamedShardings split evenly.
    return dict.fromkeys(range(mesh.size), math.prod(sharding.shard_shape(shape)))
  return {device: math.prod(len(range(*sl.indices(d))) for sl, d in zip(index, shape))
          for device, index in sharding.devices_indices_map(shape).items()}


def sharded_bytes(tree: Any, shardings: Any) -> dict[str, Any]:
  """Exact bytes of a pytree of shape structs under matching shardings.

  Args:
    tree: pytree of jax.ShapeDtypeStruct (or arrays), e.g. {"params", "opt"[, "lora"]}.
    shardings: the same structure with a jax.sharding.Sharding per leaf.
  Returns:
    {"per_device": max over devices of the bytes each holds, "by_group": {top-level key:
     max over devices of its bytes}, "global": unsharded bytes, "replicated": [(bytes,
     name, shape)] of the non-scalar leaves that every device holds whole, largest first}.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  sh_leaves = treedef.flatten_up_to(shardings)
  groups = collections.defaultdict(collections.Counter)  # group -> device -> bytes
  global_bytes, replicated, cache = 0, [], {}
  for (path, x), s in zip(leaves, sh_leaves):
    shape, itemsize = tuple(x.shape), np.dtype(x.dtype).itemsize
    if (s, shape) not in cache:
      cache[(s, shape)] = _shard_sizes(shape, s)
    sizes = cache[(s, shape)]
    group = jax.tree_util.keystr(path[:1], simple=True, separator="/") if path else "state"
    groups[group].update({dev: n * itemsize for dev, n in sizes.items()})
    full = math.prod(shape) * itemsize
    global_bytes += full
    if shape and len(sizes) > 1 and min(sizes.values()) * itemsize == full:
      replicated.append((full, jax.tree_util.keystr(path, simple=True, separator="/"), shape))
  replicated.sort(key=lambda r: -r[0])
  total = collections.Counter()
  for per_device in groups.values():
    total.update(per_device)
  return {"per_device": max(total.values(), default=0),
          "by_group": {g: max(v.values(), default=0) for g, v in groups.items()},
          "global": global_bytes, "replicated": replicated}


# ------------------------------------------------------------------- compiled program


def compiled_memory(compiled) -> dict[str, int] | None:
  """XLA's per-device memory analysis of a Compiled step (None when the backend has none).

  peak_estimate = arguments + outputs - aliased (donated inputs reused as outputs) +
  temporaries: arguments and outputs live throughout the step; temporaries are the packed
  peak of everything else in XLA's buffer assignment.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
         "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes),
         "generated_code": int(stats.generated_code_size_in_bytes)}
  out["peak_estimate"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                          + out["generated_code"])
  return out


def largest_buffers(hlo_text: str, top: int = 8) -> list[dict[str, Any]]:
  """The largest array values of a (per-device, post-SPMD) HLO module's text.

  Returns [{"bytes", "shape" (e.g. "f32[16384,257152]"), "op" (HLO opcode), "count"
  (instructions of that shape), "source" (the jax op_name of the first one)}], largest
  first, one entry per distinct shape. Values that are no new buffer (parameters,
  constants, bitcasts, tuples and their elements) are skipped.
  """
  by_shape: dict[str, dict[str, Any]] = {}
  for line in hlo_text.splitlines():
    m = _HLO_VALUE.match(line)
    if not m or m.group(1) not in _DTYPE_BYTES or m.group(3) in _NO_NEW_BUFFER:
      continue
    dims = [int(d) for d in m.group(2).split(",") if d]
    shape = f"{m.group(1)}[{m.group(2)}]"
    if shape in by_shape:
      by_shape[shape]["count"] += 1
      continue
    src = _OP_NAME.search(line)
    by_shape[shape] = {"bytes": _DTYPE_BYTES[m.group(1)] * math.prod(dims), "shape": shape,
                       "op": m.group(3), "count": 1, "source": src.group(1) if src else ""}
  return sorted(by_shape.values(), key=lambda b: -b["bytes"])[:top]


def global_batch_buffers(buffers: list[dict[str, Any]], batch_size: int, text_len: int,
                         data_shards: int) -> list[dict[str, Any]]:
  """The buffers of `largest_buffers` whose leading dim is the GLOBAL batch (or batch x text).

  Each device should hold batch_size / data_shards examples of every activation; a leading
  dim of batch_size (e.g. f32[256,1088,4608]) or batch_size * text_len (flattened logits
  f32[16384,257152]) hints that GSPMD propagated the weights' FSDP sharding into the
  activations instead of the batch sharding. A hint only: a weight can have such a dim.
  """
  if data_shards <= 1:
    return []
  suspicious = {batch_size, batch_size * text_len}
  out = []
  for b in buffers:
    lead = re.match(r"\w+\[(\d+)", b["shape"])
    if lead and int(lead.group(1)) in suspicious:
      out.append(b)
  return out


def _cost_flops(cost: Any) -> float | None:
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def chip_table(need: int, chip: str | None = None) -> dict[str, dict[str, Any]]:
  """{chip: {"capacity", "headroom" (bytes, negative = short), "verdict"}} for `need` bytes."""
  names = [chip_capacity(chip)[0]] if chip else sorted(CHIPS, key=lambda c: (CHIPS[c], c))
  table = {}
  for name in names:
    cap = chip_capacity(name)[1]
    verdict = ("fits" if need <= FIT_FRACTION * cap else
               "tight" if need <= cap else "does not fit")
    table[name] = {"capacity": cap, "headroom": cap - need, "verdict": verdict}
  return table


# --------------------------------------------------------------------------- report


def report(train_step, abstract_state: Any, state_shardings: Any, abstract_batch: Mapping,
           data_sharding, mesh, *, chip: str | None = None, config=None,
           compile_step: bool = True, print_fn=print) -> dict[str, Any]:
  """Plans the per-device memory of one train step; prints a summary and returns numbers.

  Args:
    train_step: `jax.jit(step, in_shardings=(state, data, replicated), ...)` taking
      (state, batch, rng).
    abstract_state: pytree of jax.ShapeDtypeStruct {"params", "opt"[, "lora"]}.
    state_shardings: matching NamedShardings.
    abstract_batch: {key: jax.ShapeDtypeStruct[B, ...]} of one global batch.
    data_sharding: the batch's sharding.
    mesh: the device mesh (fake CPU devices in a dry run).
    chip: one chip of CHIPS to judge (None: all of them).
    config: the run config (optional): model FLOPs and the header.
    compile_step: False plans from the exact state bytes only (no temporaries), skipping the
      compile (minutes for a 27B model on 256 fake devices).
    print_fn: where the summary lines go.
  Returns:
    {"num_devices", "mesh", "state": sharded_bytes(...) of the state, "batch_bytes",
     "compiled": compiled_memory(...) or None, "largest_buffers", "global_batch_buffers"
     (see `global_batch_buffers`), "flops": {per-device counts, "xla_counts_scan_once"},
     "need_bytes", "need_is_lower_bound", "chips": chip_table(...), "lower_s",
     "compile_s"}; byte counts are per device.
  """
  if chip is not None:
    chip_capacity(chip)  # A bad chip name fails before minutes of compiling.
  num_devices = int(mesh.size)
  _check_batch(abstract_batch, data_sharding)
  state = sharded_bytes(abstract_state, state_shardings)
  batch = sharded_bytes(abstract_batch, jax.tree.map(lambda _: data_sharding, abstract_batch))
  rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))

  t0 = time.perf_counter()
  lowered = train_step.lower(abstract_state, abstract_batch, rng)
  lower_s = time.perf_counter() - t0
  flops = {"xla_lowered_per_device": None, "xla_compiled_per_device": None,
           "model_per_device": _model_flops(config, num_devices)}
  if (f := _cost_flops(lowered.cost_analysis())) is not None:
    flops["xla_lowered_per_device"] = f / num_devices
  compiled_stats, buffers, suspects, compile_s, has_loop = None, [], [], None, None
  if compile_step:
    # The CPU code is never run: skip LLVM's optimisation of it (halves the compile time).
    # XLA's HLO passes and buffer assignment, which give the numbers, are unaffected.
    devices = np.ravel(getattr(mesh, "devices", []))
    on_cpu = devices.size > 0 and all(d.platform == "cpu" for d in devices)
    options = {"xla_backend_optimization_level": 0} if on_cpu else None
    t0 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options)
    compile_s = time.perf_counter() - t0
    compiled_stats = compiled_memory(compiled)
    text = compiled.as_text() or ""
    buffers = largest_buffers(text)
    text_len = abstract_batch["text"].shape[1] - 1 if "text" in abstract_batch else 1
    suspects = global_batch_buffers(buffers, _batch_size(abstract_batch),
                                    max(text_len, 1), _data_shards(data_sharding))
    has_loop = " while(" in text
    flops["xla_compiled_per_device"] = _cost_flops(compiled.cost_analysis())
  flops["xla_counts_scan_once"] = has_loop

  if compiled_stats is not None:
    need, lower_bound = compiled_stats["peak_estimate"], False
  else:  # Without XLA's buffer assignment only the resident state is known.
    need, lower_bound = state["per_device"] + batch["per_device"], True
  result = {"num_devices": num_devices, "mesh": dict(mesh.shape), "state": state,
            "batch_bytes": batch["per_device"], "compiled": compiled_stats,
            "largest_buffers": buffers, "global_batch_buffers": suspects, "flops": flops,
            "need_bytes": need, "need_is_lower_bound": lower_bound, "chips": chip_table(need, chip),
            "lower_s": lower_s, "compile_s": compile_s}
  for line in summary_lines(result, config):
    print_fn(line)
  return result


def _data_axes(data_sharding) -> tuple[str, ...]:
  spec0 = data_sharding.spec[0] if len(data_sharding.spec) else None
  return (spec0,) if isinstance(spec0, str) else tuple(spec0 or ())


def _data_shards(data_sharding) -> int:
  return math.prod(data_sharding.mesh.shape[a] for a in _data_axes(data_sharding))


def _batch_size(abstract_batch: Mapping) -> int:
  return int(next(iter(abstract_batch.values())).shape[0])


def _check_batch(abstract_batch: Mapping, data_sharding) -> None:
  axes, shards = _data_axes(data_sharding), _data_shards(data_sharding)
  for key, x in abstract_batch.items():
    if not x.shape or x.shape[0] % shards:
      raise ValueError(f"batch[{key!r}] {tuple(x.shape)}: the global batch (config "
                       f"input.batch_size) must be divisible by the {shards} data shards "
                       f"of mesh axes {axes}")


def _model_flops(config, num_devices: int) -> float | None:
  if config is None or "model" not in config or "input" not in config:
    return None
  from big_vision_lite import flops as flops_lib  # pylint: disable=g-import-not-at-top
  model = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  total = flops_lib.paligemma_train_flops(model, int(config.input.batch_size),
                                          int(config.input.text_len))
  return total / num_devices


def summary_lines(r: Mapping[str, Any], config=None) -> list[str]:
  """The printed summary of a `report` result."""
  s, lines = r["state"], []
  name = f" {config.name}" if config is not None and "name" in config else ""
  rules = f", sharding_rules={config.sharding_rules!r}" if config is not None and \
      isinstance(config.get("sharding_rules"), str) else ""
  lines.append(f"=== memory plan{name}: {r['num_devices']} devices, mesh {r['mesh']}{rules} ===")
  lines.append("state per device (exact, from the shardings; max over devices):")
  for group, nbytes in sorted(s["by_group"].items()):
    lines.append(f"  {group:<10} {fmt_bytes(nbytes):>12}")
  lines.append(f"  {'batch':<10} {fmt_bytes(r['batch_bytes']):>12}")
  lines.append(f"  {'total':<10} {fmt_bytes(s['per_device'] + r['batch_bytes']):>12}   "
               f"(unsharded state: {fmt_bytes(s['global'])})")
  if s["replicated"]:
    rep = sum(b for b, _, _ in s["replicated"])
    lines.append(f"  {fmt_bytes(rep)} of it is held whole by every device "
                 f"({len(s['replicated'])} leaves no rule could shard), largest:")
    for nbytes, leaf, shape in s["replicated"][:3]:
      lines.append(f"    {fmt_bytes(nbytes):>12}  {leaf} {list(shape)}")
  c = r["compiled"]
  if c is not None:
    lines.append(f"compiled step (XLA buffer assignment, compile {r['compile_s']:.0f} s; on fake "
                 "CPU devices the temporaries are an estimate: TPU/GPU fuse differently):")
    lines.append(f"  arguments {fmt_bytes(c['argument'])}, outputs {fmt_bytes(c['output'])}, "
                 f"donated/aliased {fmt_bytes(c['alias'])}, temporaries {fmt_bytes(c['temp'])}")
    lines.append(f"  peak estimate = arguments + outputs - aliased + temporaries = "
                 f"{fmt_bytes(c['peak_estimate'])} per device")
  else:
    why = "not compiled" if r["compile_s"] is None else "the backend gives no memory analysis"
    lines.append(f"compiled step: {why}; the need below is the state + batch only (a lower "
                 "bound: no gradients, activations or temporaries)")
  if r["largest_buffers"]:
    lines.append("  largest per-device buffers of the compiled program:")
    for b in r["largest_buffers"][:6]:
      src = b["source"].rsplit("/", 2)
      src = "/".join(src[-2:]) if len(src) > 1 else b["source"]
      lines.append(f"    {fmt_bytes(b['bytes']):>12}  {b['shape']} {b['op']} x{b['count']}"
                   f"  ({src})")
  if r.get("global_batch_buffers"):
    shapes = ", ".join(b["shape"] for b in r["global_batch_buffers"][:3])
    lines.append(f"  ! {shapes}: the leading dim is the global batch, not the per-device "
                 "share: activations are probably not sharded over the batch (constrain them "
                 "with jax.lax.with_sharding_constraint)")
  f = r["flops"]
  parts = []
  if f["model_per_device"]:
    parts.append(f"model (analytic) {f['model_per_device']:.3g}")
  if f["xla_lowered_per_device"]:
    parts.append(f"XLA lowered {f['xla_lowered_per_device']:.3g}")
  if f["xla_compiled_per_device"]:
    parts.append(f"XLA compiled {f['xla_compiled_per_device']:.3g}")
  if parts:
    note = " (XLA counts each scan body once: an undercount)" if f["xla_counts_scan_once"] else ""
    lines.append("FLOPs per device per step: " + ", ".join(parts) + note)
  bound = " (lower bound)" if r["need_is_lower_bound"] else ""
  lines.append(f"chips (need {fmt_bytes(r['need_bytes'])} per device{bound}; fits = within "
               f"{FIT_FRACTION:.0%} of HBM):")
  for name, row in r["chips"].items():
    used = r["need_bytes"] / row["capacity"]
    lines.append(f"  {name:<10} {fmt_bytes(row['capacity']):>11}  uses {used:5.0%}  headroom "
                 f"{fmt_bytes(row['headroom']):>12}  {row['verdict']}")
  return lines
