"""Device mesh, parameter placement by a (regex -> rule) table, global batches.

Mesh axes come from the config as a list of (name, size) pairs, size -1 meaning
"all remaining devices": `[("data", -1)]`, `[("data", 2), ("fsdp", -1), ("tensor", 2)]`.
Axes are `AxisType.Auto` (GSPMD propagation), so `with_sharding_constraint` works.

Parameter placement follows big_vision: a table of (regex, rule) pairs; each
regex is `re.fullmatch`ed against a leaf's "/"-joined path (e.g.
"llm/layers/attn/q_einsum/w", or "opt/0/mu/llm/..." for optimizer state: write
".*llm/..." to cover both); the first match wins; a leaf no regex matches is an
error. Rules:

  "replicate"                      every device holds the whole array.
  ("fsdp", axes[, opts])           shard the largest dim whose size is divisible
                                   by the product of `axes` (a name or a tuple of
                                   names) and not yet sharded; replicate (and log)
                                   when none is. opts: {"exclude_dims": (0,)} never
                                   shards those dims (e.g. the leading scan axis L
                                   of stacked layers), {"min_size_mb": 4.0} leaves
                                   smaller arrays replicated.
  ("shard", dim, axes[, opts])     shard `dim` (negative counts from the end, so
                                   one rule fits the scanned [L, ...] and the
                                   unscanned layout) over `axes`; an error when the
                                   size is not divisible, unless
                                   opts = {"skip_if_indivisible": True}.
  [rule, rule, ...]                applied in order, e.g. tensor parallel on the
                                   heads dim, then fsdp on the largest remaining.

Dims count from the start of the stored array, so for scanned layers dim 0 is
the scan axis L and a table can shard (or exclude) it explicitly.
"""
from collections.abc import Mapping, Sequence
import math
import os
import re
from typing import Any

from absl import logging
import jax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

MeshAxes = Sequence[tuple[str, int]]
Rule = Any  # "replicate" | ("fsdp", axes[, opts]) | ("shard", dim, axes[, opts]) | list of rules
RuleTable = Sequence[tuple[str, Rule]]

# Stacked (scanned) layers carry the layer axis L first; sharding it would make
# every scan iteration gather a slice owned by other devices.
_SCANNED = r".*(img/Transformer/encoderblock|llm/layers)/(?!\d+/).*"

# ZeRO-3 style: every parameter (and optimizer-state copy) split over "fsdp".
FSDP_RULES: RuleTable = (
    (_SCANNED, ("fsdp", "fsdp", {"exclude_dims": (0,)})),
    (".*", ("fsdp", "fsdp")),
)

# Megatron-style tensor parallelism on "tensor" for attention heads and the MLP
# hidden dim F (the dims whose einsums need no communication until the output
# projection), then fsdp on the largest remaining dim. Gemma 2B's single KV head
# (MQA) cannot be split: it stays replicated over "tensor".
_TENSOR_DIMS = (  # (stack: "llm" | "img", path below the layer, heads/F dim, strict)
    ("llm", r"attn/(q_einsum|qkv_einsum|attn_vec_einsum)/w", -3, True),
    ("llm", r"attn/kv_einsum/w", -3, False),
    ("llm", r"mlp/gating_einsum", -1, True),
    ("llm", r"mlp/linear", -2, True),
    ("img", r"MultiHeadDotProductAttention_0/(query|key|value)/kernel", -2, True),
    ("img", r"MultiHeadDotProductAttention_0/out/kernel", -3, True),
    ("img", r"MlpBlock_0/Dense_0/kernel", -1, True),
    ("img", r"MlpBlock_0/Dense_1/kernel", -2, True),
)
_LAYER_PREFIX = {  # stack -> (scanned layer prefix, unscanned layer prefix)
    "llm": (r"llm/layers", r"llm/layers/\d+"),
    "img": (r"img/Transformer/encoderblock", r"img/Transformer/encoderblock_\d+"),
}


def _tensor_rules() -> list[tuple[str, Rule]]:
  rules = []
  for stack, tail, dim, strict in _TENSOR_DIMS:
    shard = ("shard", dim, "tensor") if strict else (
        "shard", dim, "tensor", {"skip_if_indivisible": True})
    scanned, unscanned = _LAYER_PREFIX[stack]
    rules.append((f".*{scanned}/{tail}", [shard, ("fsdp", "fsdp", {"exclude_dims": (0,)})]))
    rules.append((f".*{unscanned}/{tail}", [shard, ("fsdp", "fsdp")]))
  return rules


FSDP_TENSOR_RULES: RuleTable = (*_tensor_rules(), *FSDP_RULES)

REPLICATE_RULES: RuleTable = ((".*", "replicate"),)


# ---------------------------------------------------------------------------- mesh


def mesh_shape(axes: MeshAxes, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Resolves `[(name, size), ...]` (one size may be -1) against a device count."""
  try:
    names, sizes = zip(*[(str(n), int(s)) for n, s in axes]) if axes else ((), ())
  except (TypeError, ValueError) as e:
    raise ValueError(f"mesh axes must be a list of (name, size) pairs, got {axes!r}") from e
  if not names:
    raise ValueError("mesh axes are empty: give e.g. [('data', -1)]")
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError("mesh axis sizes must be positive, with at most one -1 (= the rest): "
                     f"{axes!r}")
  fixed = math.prod(s for s in sizes if s != -1)
  if num_devices % fixed:
    raise ValueError(f"mesh {axes!r}: the product of the fixed sizes ({fixed}) does not "
                     f"divide the {num_devices} devices")
  sizes = tuple(num_devices // fixed if s == -1 else s for s in sizes)
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {axes!r} covers {math.prod(sizes)} devices but there are "
                     f"{num_devices}: add a -1 axis, or pass the subset as `devices`")
  return names, sizes


def make_mesh(axes: MeshAxes, devices: Sequence[Any] | int | None = None) -> Mesh | AbstractMesh:
  """Builds a mesh with Auto axes.

  Args:
    axes: [(name, size), ...]; one size may be -1 (all remaining devices).
    devices: None = all (global) devices; a sequence of devices = a mesh over just
      those (e.g. disjoint subsets for concurrent sweep runs, or the fake devices
      of `jax.experimental.topologies.get_topology_desc`); an int = an
      `AbstractMesh` of that many devices for ahead-of-time dry runs (lower with
      `jit(f).trace(...).lower(lowering_platforms=("tpu",))`).
  """
  if isinstance(devices, int):
    names, sizes = mesh_shape(axes, devices)
    return AbstractMesh(sizes, names, axis_types=(AxisType.Auto,) * len(names))
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  return jax.make_mesh(sizes, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


# ----------------------------------------------------------------- param placement


def _axis_tuple(axes: Any, mesh_axes: Mapping[str, int], name: str, rule: Any) -> tuple[str, ...]:
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  for a in axes:
    if a not in mesh_axes:
      raise ValueError(f"param {name}: rule {rule!r} names mesh axis {a!r}, but the mesh has "
                       f"axes {tuple(mesh_axes)}")
  return axes


def _spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...]:
  return axes[0] if len(axes) == 1 else axes


def _used_axes(spec: list) -> set[str]:
  used = set()
  for s in spec:
    if s is not None:
      used.update((s,) if isinstance(s, str) else s)
  return used


def _apply_rule(rule: Rule, spec: list, shape: tuple[int, ...], nbytes: int,
                mesh_axes: Mapping[str, int], name: str) -> list:
  """Returns the spec (one entry per dim) after applying `rule`."""
  if isinstance(rule, list) and rule and rule[0] in ("fsdp", "shard"):
    rule = tuple(rule)  # A single rule that went through a JSON/config round trip.
  if isinstance(rule, list):
    for r in rule:
      spec = _apply_rule(r, spec, shape, nbytes, mesh_axes, name)
    return spec
  if rule == "replicate":
    if any(s is not None for s in spec):
      raise ValueError(f"param {name}: 'replicate' after another rule sharded it ({spec})")
    return spec
  if not isinstance(rule, tuple) or not rule or rule[0] not in ("fsdp", "shard"):
    raise ValueError(f"param {name}: unknown sharding rule {rule!r}; expected 'replicate', "
                     "('fsdp', axes[, opts]), ('shard', dim, axes[, opts]) or a list of them")
  kind, *args = rule
  opts = dict(args.pop().items()) if args and hasattr(args[-1], "items") else {}
  if kind == "fsdp":
    if len(args) != 1 or set(opts) - {"exclude_dims", "min_size_mb"}:
      raise ValueError(f"param {name}: bad fsdp rule {rule!r}; expected ('fsdp', axes, "
                       "{'exclude_dims': (...), 'min_size_mb': float})")
    axes = _axis_tuple(args[0], mesh_axes, name, rule)
    if _used_axes(spec) & set(axes):
      raise ValueError(f"param {name}: rule {rule!r} reuses a mesh axis already in {spec}")
    size = math.prod(mesh_axes[a] for a in axes)
    if nbytes < opts.get("min_size_mb", 0.0) * 2**20:
      return spec
    excluded = {d % len(shape) for d in opts.get("exclude_dims", ())} if shape else set()
    # Largest first; ties go to the earlier dim so the choice is deterministic.
    for d in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
      if d not in excluded and spec[d] is None and shape[d] % size == 0:
        spec = list(spec)
        spec[d] = _spec_entry(axes)
        return spec
    if shape:  # Scalars (step counters) are replicated without noise.
      logging.info("sharding: fsdp rule %r cannot shard param %s %s (no free dim divisible by "
                   "%d): replicated over %s", rule, name, shape, size, axes)
    return spec
  # "shard"
  if len(args) != 2 or not isinstance(args[0], int) or set(opts) - {"skip_if_indivisible"}:
    raise ValueError(f"param {name}: bad shard rule {rule!r}; expected ('shard', dim:int, axes"
                     "[, {'skip_if_indivisible': bool}])")
  dim, axes = args[0], _axis_tuple(args[1], mesh_axes, name, rule)
  if not -len(shape) <= dim < len(shape):
    raise ValueError(f"param {name} {shape}: rule {rule!r} shards dim {dim}, which it lacks")
  dim %= len(shape)
  size = math.prod(mesh_axes[a] for a in axes)
  if spec[dim] is not None or _used_axes(spec) & set(axes):
    raise ValueError(f"param {name}: rule {rule!r} conflicts with the spec so far {spec}")
  if shape[dim] % size:
    if opts.get("skip_if_indivisible", False):
      logging.info("sharding: %s %s dim %d (%d) not divisible by %s=%d: left unsharded",
                   name, shape, dim, shape[dim], axes, size)
      return spec
    raise ValueError(f"param {name} {shape}: rule {rule!r} cannot shard dim {dim} of size "
                     f"{shape[dim]} over mesh axes {axes} of size {size} (not divisible)")
  spec = list(spec)
  spec[dim] = _spec_entry(axes)
  return spec


def partition_specs(tree: Any, rules: RuleTable, mesh_axes: Mapping[str, int]) -> Any:
  """Like `infer_shardings` but returns PartitionSpecs; `mesh_axes` maps name -> size."""
  compiled = []
  for entry in rules:
    try:
      pattern, rule = entry
      compiled.append((re.compile(pattern), rule))
    except (TypeError, ValueError, re.error) as e:
      raise ValueError(f"sharding table entry {entry!r} is not a (regex, rule) pair: {e}") from e

  def one(path, x):
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    shape = tuple(np.shape(x))
    for pattern, rule in compiled:
      if pattern.fullmatch(name):
        nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize if hasattr(x, "dtype") else 0
        spec = _apply_rule(rule, [None] * len(shape), shape, nbytes, mesh_axes, name)
        return P(*spec)
    raise ValueError(f"param {name} {shape} matches no regex of the sharding table "
                     f"{[p.pattern for p, _ in compiled]}: add a catch-all ('.*', rule)")

  return jax.tree_util.tree_map_with_path(one, tree)


def infer_shardings(tree: Any, rules: RuleTable, mesh: Mesh | AbstractMesh) -> Any:
  """NamedShardings for every leaf of `tree` (arrays or jax.ShapeDtypeStruct).

  Args:
    tree: pytree of arrays or shape structs (e.g. `jax.eval_shape(init, ...)`,
      or {"params": ..., "opt": ...}).
    rules: (regex, rule) table, see the module docstring.
    mesh: from `make_mesh`.
  Returns:
    The same tree structure with a `NamedSharding` per leaf.
  """
  specs = partition_specs(tree, rules, dict(mesh.shape))
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


# ------------------------------------------------------------------------- batches


def _data_axes(mesh: Mesh | AbstractMesh, data_axes: Sequence[str] | None) -> tuple[str, ...]:
  if data_axes is None:  # Default: whichever of the usual batch axes the mesh has.
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if not axes:
      raise ValueError(f"mesh axes {mesh.axis_names} contain neither 'data' nor 'fsdp': "
                       "pass data_axes explicitly")
    return axes
  axes = (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"data_axes {axes}: {missing} not in the mesh axes {mesh.axis_names}")
  return axes


def batch_sharding(mesh: Mesh | AbstractMesh,
                   data_axes: Sequence[str] | None = None) -> NamedSharding:
  """Sharding of the leading (batch) dim over the data axes.

  data_axes=None takes those of ("data", "fsdp") that the mesh has (with FSDP the
  fsdp devices also split the batch, as in ZeRO); other dims are replicated.
  """
  return NamedSharding(mesh, P(_data_axes(mesh, data_axes)))


def constrain_batch(tree: Any, mesh: Mesh | AbstractMesh,
                    data_axes: Sequence[str] | None = None) -> Any:
  """`with_sharding_constraint` of every leaf's leading dim to the data axes (inside jit)."""
  sharding = batch_sharding(mesh, data_axes)
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


def make_global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh,
                      sharding: NamedSharding | None = None) -> dict[str, jax.Array]:
  """Assembles process-local rows into global arrays sharded over the data axes.

  Args:
    local_batch: {key: array[b_local, ...]}, this process's rows only (rows of
      process p come after those of process p-1 in the global batch).
    mesh: the global mesh.
    sharding: default `batch_sharding(mesh)`.
  Returns:
    {key: jax.Array[b_local * num_processes, ...]}.
  """
  sharding = sharding or batch_sharding(mesh)
  shards = math.prod(mesh.shape[a] for a in _spec_axes(sharding.spec[0])) if sharding.spec else 1
  out = {}
  for key, x in local_batch.items():
    x = np.asarray(x)
    if x.ndim == 0:
      raise ValueError(f"batch[{key!r}] is a scalar: every batch entry needs a leading batch dim")
    global_rows = x.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ValueError(f"batch[{key!r}]: global batch {global_rows} ({x.shape[0]} rows x "
                       f"{jax.process_count()} processes) is not divisible by the {shards} "
                       f"data shards of {sharding.spec}")
    out[key] = jax.make_array_from_process_local_data(sharding, x)
  return out


def _spec_axes(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


# ---------------------------------------------------------------------- multi-host


def maybe_initialize_distributed() -> bool:
  """Calls `jax.distributed.initialize()` when the launcher asks for several processes.

  Must run before anything touches a jax backend. Recognised, in order:
    BVL_COORDINATOR (host:port), BVL_NUM_PROCESSES, BVL_PROCESS_ID: explicit,
      e.g. for local multi-process tests;
    JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID where the
      cluster cannot be detected): jax's own variables;
    SLURM_NTASKS > 1, OMPI_COMM_WORLD_SIZE > 1 (mpirun), TPU_WORKER_HOSTNAMES
      or TPU_PROCESS_ADDRESSES listing several hosts: jax auto-detects the rest.
  Returns True when it initialised the distributed runtime, False otherwise
  (single process, or already initialised).
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return False
  if "BVL_COORDINATOR" in env:
    try:
      num, pid = int(env["BVL_NUM_PROCESSES"]), int(env["BVL_PROCESS_ID"])
    except (KeyError, ValueError) as e:
      raise ValueError("BVL_COORDINATOR is set: BVL_NUM_PROCESSES and BVL_PROCESS_ID must be "
                       f"integers too ({e})") from e
    jax.distributed.initialize(coordinator_address=env["BVL_COORDINATOR"], num_processes=num,
                               process_id=pid)
    return True
  if "JAX_COORDINATOR_ADDRESS" in env:
    kw = {}
    if "JAX_NUM_PROCESSES" in env:
      kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
      kw["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kw)
    return True
  many = lambda var: int(env.get(var, "1") or 1) > 1
  hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES") or ""
  if many("SLURM_NTASKS") or many("OMPI_COMM_WORLD_SIZE") or "," in hosts:
    jax.distributed.initialize()
    return True
  return False
