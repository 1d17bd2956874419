"""Evaluator protocol, registry and multi-process gathering.

An evaluator is a small class registered by name and built from config kwargs:

  ev = create("caption", examples=examples, batch_size=16)
  metrics = ev.run(predict_fn)   # {"cider": 1.02, ...}: plain Python floats
  ev.last_predictions            # one JSON-able dict per example (all processes)

Evaluators never see the model. They get
  examples:   an iterable of dicts, one per example, with at least "id", "image"
              (float32[H,W,3] in [-1,1], already preprocessed for the model), "prefix"
              (the prompt) and the ground-truth fields of the task; or a zero-argument
              callable returning a fresh such iterable (so that `run` can be repeated
              on a stream). A one-shot iterator can be run once.
  predict_fn: list[example dict] -> list[str], the decoded suffix of each example, in
              order. The caller wires it to decoding (batching, padding, sharding).

Multi-process: every process passes its own shard of the examples. `run` makes all
processes call `predict_fn` the same number of times (a process whose shard is done
calls it with an empty list, so that collective decoding lines up: predict_fn must
accept `[]` and return `[]` in multi-process runs), scores its own examples, then
all-gathers the per-example records once (`gather_records`). Metrics are computed from
the gathered records on every process, so they equal those of a single-process run.
Records must therefore carry everything the metrics need (no arrays: JSON values).
"""
import abc
import importlib
import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

Example = dict[str, Any]
Record = dict[str, Any]
PredictFn = Callable[[list[Example]], Sequence[str]]
GatherFn = Callable[[list[Record]], list[Record]]
SyncFn = Callable[[bool], bool]

_REGISTRY: dict[str, type["Evaluator"]] = {}
# Modules that register evaluators; imported lazily on the first lookup by name.
_BUILTIN_MODULES = ("caption", "vqa", "detection", "segmentation", "perplexity")


class MalformedExampleError(ValueError):
  """An example lacks a ground-truth field or has one of the wrong type/shape."""

  def __init__(self, example_id: Any, field: str, problem: str):
    super().__init__(f"example id={example_id!r}, field {field!r}: {problem}")
    self.example_id, self.field = example_id, field


def register(name: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
  """Class decorator: makes the evaluator constructible as `create(name, ...)`."""

  def decorator(cls: type["Evaluator"]) -> type["Evaluator"]:
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
      raise TypeError(f"@register({name!r}) expects an Evaluator subclass, got {cls!r}")
    old = _REGISTRY.get(name)
    # Re-registering the same class (module reloaded) is fine; a second class is a bug.
    if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                   cls.__qualname__):
      raise ValueError(f"evaluator name {name!r} is already registered by "
                       f"{old.__module__}.{old.__qualname__}")
    _REGISTRY[name] = cls
    cls.registered_name = name
    return cls

  return decorator


def _import_builtins() -> None:
  for mod in _BUILTIN_MODULES:
    full = f"{__package__}.{mod}"
    try:
      importlib.import_module(full)
    except ModuleNotFoundError as e:
      if e.name != full:  # A missing dependency inside an existing module is a real error.
        raise


def get_class(name: str) -> type["Evaluator"]:
  """The evaluator class registered as `name`."""
  if name not in _REGISTRY:
    _import_builtins()
  if name not in _REGISTRY:
    raise KeyError(f"unknown evaluator {name!r}; registered: {sorted(_REGISTRY)}")
  return _REGISTRY[name]


def registered_names() -> list[str]:
  _import_builtins()
  return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> "Evaluator":
  """Builds the evaluator registered as `name` from config kwargs."""
  return get_class(name)(**kwargs)


# ---------------------------------------------------------------------------------------
# Multi-process helpers.
# ---------------------------------------------------------------------------------------
def allgather_records(records: list[Record], allgather: Callable[[np.ndarray], Any]
                      ) -> list[Record]:
  """Concatenates every process's records, in process order, via `allgather`.

  Args:
    records: this process's JSON-able records.
    allgather: stacks an array of the same shape from all processes:
      x[...] -> [P, ...] (jax.experimental.multihost_utils.process_allgather).
  """
  try:
    data = np.frombuffer(json.dumps(records).encode("utf-8"), np.uint8)
  except TypeError as e:
    raise TypeError(f"evaluator records must be JSON-able to be gathered: {e}") from e
  lengths = np.asarray(allgather(np.array(data.size, np.int64))).reshape(-1)
  # process_allgather needs equal shapes on all processes: pad to the longest payload.
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  stacked = np.asarray(allgather(padded))
  out = []
  for p, n in enumerate(lengths):
    out.extend(json.loads(stacked[p, :int(n)].tobytes().decode("utf-8")))
  return out


def gather_records(records: list[Record]) -> list[Record]:
  """All processes' records (identity when jax.process_count() == 1)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return list(records)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return allgather_records(records, multihost_utils.process_allgather)


def any_process_has_more(has_more: bool) -> bool:
  """True when any process still has a batch (identity on a single process)."""
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_count() == 1:
    return has_more
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  flags = multihost_utils.process_allgather(np.array(int(has_more), np.int32))
  return bool(np.asarray(flags).any())


# ---------------------------------------------------------------------------------------
# Small helpers for the evaluators' ground-truth checks.
# ---------------------------------------------------------------------------------------
def example_id(example: Example) -> int | str:
  """The example's "id" as a JSON-able int or str (tfds gives numpy scalars/bytes)."""
  if not isinstance(example, dict):
    raise TypeError(f"examples must be dicts, got {type(example).__name__}")
  if "id" not in example:
    raise MalformedExampleError(None, "id", f"missing (keys: {sorted(example)})")
  i = example["id"]
  if isinstance(i, np.ndarray) and i.ndim == 0:
    i = i.item()
  if isinstance(i, np.generic):
    i = i.item()
  if isinstance(i, bytes):
    i = i.decode("utf-8")
  if isinstance(i, bool) or not isinstance(i, (int, str)):
    raise MalformedExampleError(i, "id", f"expected int or str, got {type(i).__name__}")
  return i


def as_str(x: Any, eid: Any, field: str) -> str:
  """A text field as str (accepts bytes and numpy string scalars)."""
  if isinstance(x, np.ndarray) and x.ndim == 0:
    x = x.item()
  if isinstance(x, bytes):
    return x.decode("utf-8")
  if isinstance(x, str):
    return str(x)
  raise MalformedExampleError(eid, field, f"expected a string, got {type(x).__name__}")


def as_str_list(x: Any, eid: Any, field: str, *, allow_empty: bool = False) -> list[str]:
  """A list-of-strings field (list, tuple or 1-D numpy array of str/bytes)."""
  if isinstance(x, (str, bytes)):
    raise MalformedExampleError(eid, field, "expected a list of strings, got one string")
  if isinstance(x, np.ndarray):
    if x.ndim != 1:
      raise MalformedExampleError(eid, field, f"expected 1-D, got shape {x.shape}")
    x = x.tolist()
  if not isinstance(x, (list, tuple)):
    raise MalformedExampleError(
        eid, field, f"expected a list of strings, got {type(x).__name__}")
  out = [as_str(s, eid, f"{field}[{i}]") for i, s in enumerate(x)]
  if not out and not allow_empty:
    raise MalformedExampleError(eid, field, "empty list")
  return out


def get_field(example: Example, field: str, eid: Any, expected: str) -> Any:
  if field not in example:
    raise MalformedExampleError(
        eid, field, f"missing (expected {expected}; keys: {sorted(example)})")
  return example[field]


# ---------------------------------------------------------------------------------------
class Evaluator(abc.ABC):
  """Base class: batches examples, calls predict_fn, scores, gathers, summarises.

  Subclasses implement `score_example` (or `score_batch` to vectorise, e.g. mask
  decoding) returning one JSON-able record per example with at least "id" and
  "prediction", and `compute_metrics(records) -> dict[str, float]`.
  """
  registered_name: str = ""

  def __init__(self, examples: Iterable[Example] | Callable[[], Iterable[Example]], *,
               batch_size: int = 8, gather: GatherFn | None = None,
               sync: SyncFn | None = None):
    """Args:
      examples: the examples (see the module docstring), this process's shard.
      batch_size: examples per predict_fn call.
      gather: combines per-process record lists (default `gather_records`); tests and
        callers with a shared filesystem may pass their own.
      sync: has_more -> does any process have more (default `any_process_has_more`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"{type(self).__name__}: batch_size must be an int >= 1, "
                       f"got {batch_size!r}")
    if not callable(examples) and not isinstance(examples, Iterable):
      raise TypeError(f"{type(self).__name__}: examples must be an iterable of dicts or "
                      f"a callable returning one, got {type(examples).__name__}")
    self._examples = examples
    self.batch_size = batch_size
    self._gather = gather or gather_records
    self._sync = sync or any_process_has_more
    self._runs = 0
    self.last_predictions: list[Record] = []

  # -- to implement ----------------------------------------------------------------------
  def score_example(self, example: Example, prediction: str) -> Record:
    raise NotImplementedError(f"{type(self).__name__} must implement score_example "
                              "or score_batch")

  def score_batch(self, examples: list[Example], predictions: list[str]) -> list[Record]:
    return [self.score_example(e, p) for e, p in zip(examples, predictions)]

  @abc.abstractmethod
  def compute_metrics(self, records: list[Record]) -> dict[str, float]:
    """Metrics from all processes' records (the same on every process)."""

  # -- driver --------------------------------------------------------------------------------
  def _iterable(self) -> Iterable[Example]:
    ex = self._examples
    if callable(ex) and not isinstance(ex, Iterable):
      return ex()
    if iter(ex) is ex and self._runs > 0:  # A one-shot iterator is exhausted by now.
      raise RuntimeError(
          f"{type(self).__name__}.run called again on a one-shot iterator of examples: "
          "pass a list, a re-iterable dataset or a zero-argument callable instead")
    return ex

  def _batches(self) -> Iterable[list[Example]]:
    it = iter(self._iterable())
    while True:
      batch = list(itertools.islice(it, self.batch_size))
      if not self._sync(bool(batch)):
        return
      yield batch

  def run(self, predict_fn: PredictFn) -> dict[str, float]:
    """Predicts every example, gathers the records, returns the metrics."""
    records: list[Record] = []
    for batch in self._batches():
      texts = predict_fn(batch)
      if isinstance(texts, (str, bytes)) or not isinstance(texts, Sequence):
        raise TypeError(f"predict_fn must return a list of strings, got "
                        f"{type(texts).__name__}")
      texts = list(texts)
      if len(texts) != len(batch):
        raise ValueError(f"predict_fn returned {len(texts)} texts for a batch of "
                         f"{len(batch)} examples")
      for i, t in enumerate(texts):
        if not isinstance(t, str):
          raise TypeError(f"predict_fn returned a {type(t).__name__} for example "
                          f"{example_id(batch[i])!r}; expected str")
      if batch:
        records.extend(self.score_batch(batch, texts))
    self._runs += 1
    records = self._gather(records)
    if not records:
      raise ValueError(f"{type(self).__name__}: no examples were evaluated")
    seen = set()
    for r in records:
      key = (type(r["id"]).__name__, r["id"])
      if key in seen:  # A padded/duplicated shard would bias every metric.
        raise ValueError(f"{type(self).__name__}: example id {r['id']!r} was evaluated "
                         "twice (duplicate ids, or shards that overlap across processes)")
      seen.add(key)
    self.last_predictions = records
    return {k: float(v) for k, v in self.compute_metrics(records).items()}

  def write_predictions(self, path: str | os.PathLike) -> None:
    """Writes `last_predictions` as JSON lines (call it on one process only)."""
    with open(path, "w", encoding="utf-8") as f:
      for r in self.last_predictions:
        f.write(json.dumps(r) + "\n")
