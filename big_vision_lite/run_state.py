"""Training state on disk: resumable orbax checkpoints of a run, readable by load().

Layout of a training workdir (train.py writes it through this module):

  <workdir>/config.json                the run config (write_config): {"model": model_config,
                                       "lora": {"rank": r, "alpha": a, ...} | None, ...}
  <workdir>/checkpoints/<step>/        one orbax CheckpointManager step:
      params/ opt/ [lora/]             one StandardSave item per key of the train state
                                       (OCDBT; every process writes its own shards)
      extra/metadata                   JSON written by the primary process: the trainer's
                                       `extra` dict (rng key, config, metrics, ...)
      data/process_<i>-of-<n>.bin      each process's input-pipeline state (get_state() bytes:
                                       processes read different shards, so one file each)
      commit_success.txt               written last, just before the atomic rename

Atomicity: orbax writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every
item (of every process) is complete, so a crash mid-save leaves the earlier steps usable. Tmp
folders are never listed (a writable RunState deletes stale ones before its first save).
A `<step>` folder without commit_success.txt (copied by hand, half deleted) is skipped with
a warning; a committed step that cannot be read is a clear error naming it, never a silent
fallback to an older step.

    mgr = RunState(workdir, keep_last=2, keep_every=1000)
    mgr.save(step, {"params": p, "opt": o}, extra={"rng": key, "loss": 1.5},
             data_state=train_iter.get_state())      # returns once arrays are off the devices
    ...
    if mgr.latest_step() is not None:                # resume
      r = mgr.restore(target=abstract_tree(state_shapes, state_shardings))
      state, rng = r.state, r.extra["rng"]; train_iter.set_state(r.data_state)
    mgr.close()                                      # waits for the last async save

`extra` values: JSON types, bytes, numpy/jax arrays (restored as numpy) and typed PRNG keys
(restored as typed keys); tuples come back as lists.
"""
from collections.abc import Mapping, Sequence
import base64
import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, NamedTuple

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from big_vision_lite import checkpoints as ckpt
from big_vision_lite import checkpoints_config as cc
from big_vision_lite import param_tree
from big_vision_lite import lora as lora_lib
from big_vision_lite.models import gemma, siglip

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CONFIG_FILE = "config.json"
_EXTRA, _DATA = "extra", "data"
_COMMITTED = "commit_success.txt"  # orbax writes it last, before the rename.
_BYTES, _ARRAY, _KEY = "__bytes__", "__array__", "__prng_key__"
_pp = ocp.checkpoint_managers


# ---------------------------------------------------------------------------------------
# `extra`: JSON with bytes, arrays and PRNG keys.

def _host(x: Any, where: str) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.is_fully_replicated:
      raise ValueError(f"extra{where}: a jax.Array sharded across processes; save it in the "
                       "state (orbax) or pass a replicated / host value")
    x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(x))


def encode_extra(value: Any, where: str = "") -> Any:
  """JSON-able form of `value` (see the module docstring for what is accepted)."""
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str) or k in (_BYTES, _ARRAY, _KEY):
        raise TypeError(f"extra{where}: key {k!r} must be a str other than "
                        f"{_BYTES}/{_ARRAY}/{_KEY}")
      out[k] = encode_extra(v, f"{where}[{k!r}]")
    return out
  if isinstance(value, (list, tuple)):
    return [encode_extra(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  if isinstance(value, (bytes, bytearray)):
    return {_BYTES: base64.b64encode(value).decode("ascii")}
  if isinstance(value, np.generic) and value.ndim == 0 and value.dtype.kind in "biuf":
    return value.item()
  if isinstance(value, (np.ndarray, jax.Array)):
    if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):
      return {_KEY: encode_extra(jax.random.key_data(value), where),
              "impl": str(jax.random.key_impl(value))}
    a = _host(value, where)
    return {_ARRAY: base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.name,
            "shape": list(a.shape)}
  raise TypeError(f"extra{where}: {type(value).__name__} cannot be stored; use JSON types, "
                  "bytes, arrays or PRNG keys")


def decode_extra(value: Any) -> Any:
  """Inverse of `encode_extra`."""
  if isinstance(value, dict):
    if set(value) == {_BYTES}:
      return base64.b64decode(value[_BYTES])
    if set(value) == {_ARRAY, "dtype", "shape"}:
      data = base64.b64decode(value[_ARRAY])
      return np.frombuffer(data, jax.numpy.dtype(value["dtype"])).reshape(value["shape"]).copy()
    if set(value) == {_KEY, "impl"}:
      return jax.random.wrap_key_data(decode_extra(value[_KEY]), impl=value["impl"])
    return {k: decode_extra(v) for k, v in value.items()}
  if isinstance(value, list):
    return [decode_extra(v) for v in value]
  return value


# ---------------------------------------------------------------------------------------
# Per-process bytes (the input pipeline's position) as an orbax item.

def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.bin"


class _ProcessBytesHandler(ocp.CheckpointHandler):
  """Each process writes and reads back its own file (JsonSave would keep process 0's only)."""

  def save(self, directory: epath.Path, args: "_DataSave") -> None:
    (epath.Path(directory) / _process_file()).write_bytes(args.data)

  def restore(self, directory: epath.Path, args: "_DataRestore | None" = None) -> bytes:
    path = epath.Path(directory) / _process_file()
    if not path.exists():
      found = sorted(p.name for p in epath.Path(directory).iterdir())
      raise ValueError(f"{directory}: no input state {path.name} for this process (found "
                       f"{found}); resuming the data stream exactly needs the same process count")
    return path.read_bytes()

  def metadata(self, directory: epath.Path) -> None:
    return None

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


@ocp.args.register_with_handler(_ProcessBytesHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  data: bytes


@ocp.args.register_with_handler(_ProcessBytesHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------------------------------
# Steps on disk.

def _anchored(path: str | os.PathLike) -> str:
  """A local path made absolute (URLs such as gs://... unchanged). Orbax's array reader and
  writer (OCDBT) refuse relative paths ("runs/demo", the README's commands); the writer
  fails only in its background thread."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def committed_steps(directory: str | os.PathLike) -> list[int]:
  """Sorted steps under `directory` (= <workdir>/checkpoints) whose save completed."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  steps = []
  for d in directory.iterdir():
    if not d.name.isdigit() or not d.is_dir():
      continue  # orbax tmp folders ("<step>.orbax-checkpoint-tmp") and stray files.
    if (d / _COMMITTED).exists():
      steps.append(int(d.name))
    else:
      log.warning("checkpoints: skipping %s: no %s (an incomplete or damaged save)", d,
                  _COMMITTED)
  return sorted(steps)


def abstract_tree(tree: Any, shardings: Any = None) -> Any:
  """jax.ShapeDtypeStruct per leaf (with the given shardings, else each array's own)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree,
                      shardings)


class Restored(NamedTuple):
  step: int
  state: dict[str, Any]      # the restored items, in the target's structure and shardings
  extra: dict[str, Any]      # decoded `extra`
  data_state: bytes | None   # this process's input state (None if none was saved)


class RunState:
  """Checkpoints of a training run under <workdir>/checkpoints (see the module docstring).

  Args:
    workdir: the run's folder (local path or anything etils.epath opens).
    keep_last: keep the newest K steps (None: keep all).
    keep_every: also keep every step that is a multiple of M (None: none).
    async_save: save() returns once the arrays are on the host; the files are written in the
      background (orbax waits for the previous save before starting the next one).
    read_only: never write or delete (e.g. an evaluator following a running job).
  """

  def __init__(self, workdir: str | os.PathLike, *, keep_last: int | None = 2,
               keep_every: int | None = None, async_save: bool = True, read_only: bool = False):
    for name, v in (("keep_last", keep_last), ("keep_every", keep_every)):
      if v is not None and (not isinstance(v, int) or v < 1):
        raise ValueError(f"RunState: {name}={v!r}; expected a positive int or None")
    policies = [_pp.LatestN(keep_last)] + ([_pp.EveryNSteps(keep_every)] if keep_every else [])
    self.directory = epath.Path(_anchored(workdir)) / CHECKPOINTS
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_pp.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, read_only=read_only, create=not read_only,
        cleanup_tmp_directories=not read_only)
    self._mgr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    """The steps whose save completed, oldest first."""
    return committed_steps(self.directory)

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Mapping[str, Any], *, extra: Mapping[str, Any] | None = None,
           data_state: bytes | str | None = None) -> bool:
    """Saves the train state (asynchronously unless async_save=False).

    Args:
      step: the step number (the folder name).
      state: {"params": tree, "opt": tree, ...}: each key becomes an item, restored on its
        own (load() reads "params" and "lora" only). Arrays may be sharded across processes.
      extra: small metadata (see the module docstring), written by the primary process.
      data_state: this process's input-pipeline state (TrainIterator.get_state()).
    Returns:
      False if `step` was already saved (nothing written), True otherwise.
    """
    if self.read_only:
      raise ValueError(f"{self.directory}: RunState is read_only")
    bad = sorted(set(state) & {_EXTRA, _DATA}) or [k for k in state if not k.isidentifier()]
    if bad:
      raise ValueError(f"RunState.save: state keys {bad} are reserved or not identifiers")
    if step in self._mgr.all_steps():  # also counts a save of this step still in flight
      log.warning("checkpoints: step %d is already saved; not saving it again", step)
      return False
    items = {k: ocp.args.StandardSave(v) for k, v in state.items()}
    items[_EXTRA] = ocp.args.JsonSave(encode_extra(dict(extra or {})))
    if data_state is not None:
      items[_DATA] = _DataSave(data_state.encode() if isinstance(data_state, str)
                               else bytes(data_state))
    return self._mgr.save(step, args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int | None = None, *, target: Mapping[str, Any]) -> Restored:
    """Restores the items named by `target` (default: the latest step).

    Args:
      step: which step; None = the latest complete one.
      target: {"params": abstract tree, "opt": ..., ...}, a subset of the saved items: leaves
        jax.ShapeDtypeStruct with .sharding, restored straight into those shardings (any mesh;
        see `abstract_tree`). Leaves without one get the sharding recorded at save time
        (orbax's fallback: only where the same devices exist).
    """
    self.wait()
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise FileNotFoundError(f"{self.directory}: no complete checkpoint to restore")
      step = steps[-1]
    elif step not in steps:
      raise ValueError(f"{self.directory}: no complete checkpoint for step {step}; complete "
                       f"steps: {steps}")
    step_dir = self.directory / str(step)
    present = {p.name for p in step_dir.iterdir()}
    missing = sorted(set(target) - present)
    if missing:
      raise ValueError(f"{step_dir}: holds no item {missing} (it has "
                       f"{sorted(p for p in present if (step_dir / p).is_dir())})")
    items = {k: ocp.args.StandardRestore(v) for k, v in target.items()}
    items[_EXTRA] = ocp.args.JsonRestore()
    if _DATA in present:
      items[_DATA] = _DataRestore()
    self._mgr.reload()  # another process (the trainer) may have written new steps
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise ValueError(f"{step_dir}: cannot restore {sorted(target)} into the given target "
                       f"(changed model, optimizer or sharding tree?): {e}") from e
    return Restored(step, {k: out[k] for k in target}, decode_extra(out[_EXTRA]),
                    out[_DATA] if _DATA in present else None)

  def wait(self) -> None:
    """Blocks until the last async save is on disk."""
    self._mgr.wait_until_finished()

  def close(self) -> None:
    self._mgr.close()

  def __enter__(self) -> "RunState":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ---------------------------------------------------------------------------------------
# The run config beside the checkpoints.

def write_config(workdir: str | os.PathLike, config: Mapping[str, Any]) -> None:
  """Writes <workdir>/config.json (primary process; tmp + rename), {"model": ..., ...}."""
  if jax.process_index() != 0:
    return
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
    config = config.to_dict()
  if not isinstance(config.get("model"), Mapping):
    raise ValueError("write_config: config['model'] must be the model config dict")
  try:
    text = json.dumps(config, indent=2, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"write_config: the config is not JSON serialisable: {e}") from e
  path = epath.Path(workdir) / CONFIG_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def _run_config(step_dir: pathlib.Path, extra: Mapping[str, Any]) -> dict[str, Any]:
  """<workdir>/config.json; else extra["config"] if the trainer stored a run config there."""
  path = step_dir.parent.parent / CONFIG_FILE
  config, where = extra.get("config"), f"{step_dir}/{_EXTRA}: config"
  if path.is_file():
    config, where = path.read_text(), str(path)
  elif config is None:
    raise ValueError(f"{step_dir}: no run config: expected {path} (written by train.py) or "
                     "extra['config'] in the checkpoint")
  if isinstance(config, str):
    try:
      config = json.loads(config)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON: {e}") from e
  if not isinstance(config, Mapping) or not isinstance(config.get("model"), Mapping):
    raise ValueError(f"{where}: expected a run config object with a 'model' dict")
  return dict(config)


def _full_model_config(model: Mapping[str, Any], where: str) -> cc.ModelConfig:
  """The run's model config with every key that load() returns (variant and defaults filled)."""
  unknown = set(model) - {"img", "llm"}
  if unknown:
    raise ValueError(f"{where}: model config has unknown key(s) {sorted(unknown)}")
  try:
    img = siglip.resolve_config(model.get("img", {}))
    llm = gemma.resolve_config(model.get("llm", {}))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{where}: bad model config: {e}") from e
  img = {k: img[k] for k in cc.IMG_CONFIG}
  img["patch_size"] = list(img["patch_size"])
  return {"img": img, "llm": {k: llm[k] for k in cc.LLM_CONFIG}}


# ---------------------------------------------------------------------------------------
# load(WORKDIR): a checkpoints.Reader over one step's params (+ LoRA merged).

class WorkdirReader(ckpt.Reader):
  """The params of a training workdir's latest step (or of one `<workdir>/checkpoints/<step>`).

  Reads only the "params" (and "lora") items, array by array as numpy, without the optimizer
  state. With LoRA (a "lora" item), read() returns W + alpha / rank * A @ B (lora.merge_lora)
  with rank and alpha from the run config's "lora" section.
  """

  def __init__(self, path: str):
    p = pathlib.Path(_anchored(path))
    if (p / CHECKPOINTS).is_dir():
      steps = committed_steps(p / CHECKPOINTS)
      if not steps:
        raise ValueError(f"{path}: a training workdir without a complete checkpoint in "
                         f"{CHECKPOINTS}/")
      p = p / CHECKPOINTS / str(steps[-1])
    elif not (p / _COMMITTED).is_file():
      raise ValueError(f"{path}: not a complete checkpoint step (no {_COMMITTED}: the save "
                       "did not finish)")
    self.path = str(p)
    self._handler = ocp.PyTreeCheckpointHandler()
    extra_file = p / _EXTRA / "metadata"
    extra = decode_extra(json.loads(extra_file.read_text())) if extra_file.is_file() else {}
    run = _run_config(p, extra)
    self._flat = self._leaves(p / "params")
    self._lora = self._leaves(p / "lora") if (p / "lora").is_dir() else {}
    if self._lora:
      lora_cfg = run.get("lora") or {}
      if not all(isinstance(lora_cfg.get(k), (int, float)) for k in ("rank", "alpha")):
        raise ValueError(f"{p}: the checkpoint holds LoRA adapters but the run config has no "
                         f"lora.rank / lora.alpha to merge them with (lora={run.get('lora')!r})")
      self._rank, self._alpha = int(lora_cfg["rank"]), float(lora_cfg["alpha"])
      owners = {n.rpartition("/")[0] for n in self._lora}
      unknown = sorted(owners - set(self._flat))
      if unknown:
        raise ValueError(f"{p}/lora: adapters for {unknown}, which are not params")
    self._groups = param_tree.group_layers(self._flat, self.path)
    self.shapes = {}
    for stacked, parts in self._groups.items():
      shape, dtype = self._flat[parts[0][1]]
      self.shapes[stacked] = ((len(parts),) + shape if parts[0][0] is not None else shape, dtype)
    config = _full_model_config(run["model"], self.path)
    for tower in ("img", "llm"):
      config[tower]["param_dtype"] = cc.stored_dtype(self.shapes, tower)
    self.config = config

  def _leaves(self, item: pathlib.Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    try:
      tree = self._handler.metadata(epath.Path(item)).tree
    except (FileNotFoundError, ValueError, OSError) as e:
      raise ValueError(f"{item}: cannot read the orbax metadata: {e}") from e
    return {n: (tuple(m.shape), np.dtype(m.dtype)) for n, m in ckpt.flatten(tree).items()}

  def _restore(self, item: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Reads only `names` of one item, as host numpy arrays."""
    as_np = ocp.RestoreArgs(restore_type=np.ndarray)
    args = ocp.args.PyTreeRestore(item=ckpt.unflatten(dict.fromkeys(names, 0)),
                                  restore_args=ckpt.unflatten(dict.fromkeys(names, as_np)),
                                  partial_restore=True)
    try:
      out = self._handler.restore(epath.Path(self.path) / item, args=args)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
      raise ValueError(f"{self.path}/{item}: cannot read {list(names)[:3]}...: {e}") from e
    flat = ckpt.flatten(out)
    return {n: np.asarray(flat[n]) for n in names}

  def read(self, name: str) -> np.ndarray:
    parts = self._groups[name]
    leaves = self._restore("params", [leaf for _, leaf in parts])  # every layer in one call
    arrays = []
    for _, leaf in parts:
      w = leaves.pop(leaf)
      if f"{leaf}/a" in self._lora:
        ab = self._restore("lora", [f"{leaf}/a", f"{leaf}/b"])
        merged = lora_lib.merge_lora(ckpt.unflatten({leaf: w}), ckpt.unflatten(ab),
                                     self._alpha, self._rank)
        w = np.asarray(ckpt.flatten(merged)[leaf])
      arrays.append(w)
    return arrays[0] if parts[0][0] is None else np.stack(arrays)

  def close(self) -> None:
    self._handler.close()
