"""Input pipeline: grain over the sources, pp per example, process shards, batches, resume.

Trainer API
-----------
  it = make_train_iterator(config.input, tokenizer=tok, seed=config.seed,
                           data_sharding=NamedSharding(mesh, P("data")), encode_masks=None)
  batch = next(it)        # {"image": f32[B,H,W,3], "text": i32[B,T+1], "mask_ar", "mask_loss",
                          #  "mask_input": i32[B,T+1]} global jax.Arrays, B = input.batch_size
  blob = it.get_state()   # bytes (JSON): store beside the checkpoint
  it.set_state(blob)      # the next batches are exactly those an uninterrupted run would see
  it.stats()              # {"wait_s", "batches", "examples", "skipped", "truncated"}
  it.num_examples         # records per epoch over all processes (sum over a mixture)
  it.close()

Input wait: `stats()["wait_s"]` is the cumulative time `next()` spent blocked; the fraction of
a logging interval spent waiting is delta(wait_s) / delta(wall time). Batches are made (and
put on the devices) by a background thread `input.prefetch` batches ahead; with
`input.num_workers` > 0 grain preprocesses in that many (spawned, CPU-only) worker processes:
everything in the pp (tokenizer, encode_masks) must then be picklable.

Config (every key required; unknown keys are errors):
  input.data = dict(name=..., split=..., ...)  one source (see sources.py), with input.pp
  input.data = {"cap": 0.5, "vqa": 0.5}         a mixture: input.cap = dict(data=..., pp=...)
                                               for each name (weight 0 drops a component)
  input.pp, input.batch_size (global), input.shuffle_buffer_size (None/0: file order; > 0: a
  full per-epoch shuffle of the record indices: grain needs no buffer), input.num_workers,
  input.skip_bad_examples, input.prefetch (batches).

Determinism: every process reads the contiguous slice [n*p/P, n*(p+1)/P) of each source,
shuffled per epoch by a seed derived from (seed, component); an example's pp randomness
depends only on (seed, component, record, epoch). Resuming needs the same batch size,
process count and num_workers (checked). Epochs repeat forever; the trainer stops.
"""
import json
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Iterator, Mapping

import grain
import numpy as np

from big_vision_lite.data.pp_parse import ExampleError, PPContext, Preprocess, Runtime
from big_vision_lite.data.sources import make_source

log = logging.getLogger(__name__)

INPUT_KEYS = ("data", "pp", "batch_size", "shuffle_buffer_size", "num_workers",
              "skip_bad_examples", "prefetch")
_READ_THREADS = 8  # Threads per process for reading + pp (PIL and file reads release the GIL).
_MAX_BAD_IN_A_ROW = 1000
_STATE_VERSION = 1


class InputError(RuntimeError):
  """A bad example while skip_bad_examples is off, or too many bad examples in a row."""


def _as_dict(cfg) -> dict:
  return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def parse_input_config(input_cfg) -> tuple[list[dict], dict]:
  """([{name, weight, data, pp}], settings) from config.input, with errors for bad keys."""
  cfg = _as_dict(input_cfg)
  if "data" not in cfg or not isinstance(cfg["data"], Mapping):
    raise ValueError(f"config.input.data must be a dict, got {cfg.get('data')!r}")
  data = dict(cfg["data"])
  if isinstance(data.get("name"), str):
    components = [dict(name=data["name"], weight=1.0, data=data, pp=cfg.get("pp"))]
    allowed = set(INPUT_KEYS)
  else:
    components, allowed = [], set(INPUT_KEYS) - {"pp"}
    for name, weight in data.items():
      allowed.add(name)
      if not isinstance(weight, (int, float)) or weight < 0:
        raise ValueError(f"config.input.data[{name!r}] must be a mixture weight >= 0, got "
                         f"{weight!r} (a single source needs data.name)")
      sub = cfg.get(name)
      if not isinstance(sub, Mapping) or set(sub) != {"data", "pp"}:
        raise ValueError(f"mixture component {name!r} needs config.input.{name} = "
                         f"dict(data=..., pp=...), got {sub!r}")
      if weight:
        components.append(dict(name=name, weight=float(weight), data=dict(sub["data"]),
                               pp=sub["pp"]))
    if not components:
      raise ValueError("config.input.data: every mixture weight is 0")
  unknown = sorted(set(cfg) - allowed)
  missing = sorted(allowed - set(cfg))
  if unknown or missing:
    raise ValueError(f"config.input: unknown keys {unknown}, missing keys {missing} "
                     f"(expected {sorted(allowed)})")
  for c in components:
    if not isinstance(c["pp"], str):
      raise ValueError(f"config.input pp of {c['name']!r} must be a string, got {c['pp']!r}")
  settings = {k: cfg[k] for k in INPUT_KEYS if k in cfg and k not in ("data", "pp")}
  for key in ("batch_size", "num_workers", "prefetch"):
    v = settings[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < (1 if key == "batch_size" else 0):
      raise ValueError(f"config.input.{key} must be an int >= "
                       f"{1 if key == 'batch_size' else 0}, got {v!r}")
  sbs = settings["shuffle_buffer_size"]
  if sbs is not None and (not isinstance(sbs, int) or sbs < 0):
    raise ValueError(f"config.input.shuffle_buffer_size must be None or an int >= 0, got {sbs!r}")
  if not isinstance(settings["skip_bad_examples"], bool):
    raise ValueError("config.input.skip_bad_examples must be True or False")
  return components, settings


def process_slice(n: int, process_index: int, process_count: int) -> tuple[int, int]:
  """The contiguous [lo, hi) share of n records of one process (as np.array_split)."""
  return n * process_index // process_count, n * (process_index + 1) // process_count


def _derive_seed(seed: int, component: int) -> int:
  return int(np.random.SeedSequence([int(seed), component]).generate_state(1)[0])


class _Load:
  """grain map_with_index fn: (position in the stream, record index) -> tagged example.

  Never raises for bad data: the main process decides between skipping and failing, so errors
  look the same with and without worker processes.
  """

  def __init__(self, source, pp: Preprocess, seed: int, shard_len: int):
    self.source, self.pp, self.seed, self.shard_len = source, pp, seed, shard_len

  def __call__(self, position: int, index: int):
    index = int(index)
    rt = Runtime(seed=self.seed, index=index, epoch=position // self.shard_len, ctx=self.pp.ctx)
    try:
      example = self.pp(self.source[index], rt)
      return ("ok", example, self.source.where(index) if rt.truncated else "")
    except ExampleError as e:
      return ("bad", str(e.at(self.source.where(index))), False)


def stack_examples(examples: list[dict], what: str = "batch") -> dict[str, np.ndarray]:
  """Stacks same-keyed example dicts into arrays [B, ...] (strings -> object arrays)."""
  keys = list(examples[0])
  out = {}
  for i, ex in enumerate(examples):
    if list(ex) != keys and set(ex) != set(keys):
      raise InputError(f"{what}: examples have different keys ({sorted(keys)} vs "
                       f"{sorted(ex)}): make every pp (and mixture component) keep() the same")
  for k in keys:
    values = [ex[k] for ex in examples]
    if isinstance(values[0], (str, bytes, dict, list)):
      arr = np.empty(len(values), object)
      for j, v in enumerate(values):  # Element-wise: numpy would broadcast nested lists.
        arr[j] = v
      out[k] = arr
      continue
    shapes = {np.shape(v) for v in values}
    if len(shapes) != 1:
      raise InputError(f"{what}: key {k!r} has different shapes {sorted(shapes)} across "
                       f"examples: make them equal in the pp (resize, tolen, keep)")
    out[k] = np.stack([np.asarray(v) for v in values])
  return out


class TrainIterator(Iterator[dict]):
  """Batches of the training stream with checkpointable state (see the module docstring)."""

  def __init__(self, dataset, *, local_batch: int, data_sharding, prefetch: int,
               skip_bad: bool, fingerprint: dict, num_examples: int):
    self._dataset = dataset
    self._it = iter(dataset)
    self.local_batch = local_batch
    self.num_examples = num_examples
    self._sharding = data_sharding
    self._prefetch = prefetch
    self._skip_bad = skip_bad
    self._fingerprint = fingerprint
    self._counters = dict(batches=0, examples=0, skipped=0, truncated=0)
    self._last_state = self._snapshot()
    self._wait_s = 0.0
    self._queue, self._thread, self._stop = None, None, None
    self._closed = False

  # --- producing (background thread, or inline when prefetch == 0) --------------------------
  def _note(self, key: str, message: str) -> None:
    n = self._counters[key] = self._counters[key] + 1
    if n & (n - 1) == 0:  # Log at 1, 2, 4, 8, ...: visible, but never a flood.
      log.warning("input: %s %d example(s) so far; latest: %s", key, n, message)

  def _local_batch(self) -> dict[str, np.ndarray]:
    examples, bad_in_a_row = [], 0
    while len(examples) < self.local_batch:
      tag, payload, truncated = next(self._it)
      if tag == "bad":
        if not self._skip_bad:
          raise InputError(f"bad input example: {payload}\n(set config.input.skip_bad_examples"
                           f"=True to skip and count such examples)")
        self._note("skipped", payload)
        bad_in_a_row += 1
        if bad_in_a_row >= _MAX_BAD_IN_A_ROW:
          raise InputError(f"{bad_in_a_row} bad examples in a row (the pp or the data is "
                           f"wrong, not single rows); latest: {payload}")
        continue
      bad_in_a_row = 0
      if truncated:
        self._note("truncated", f"{truncated}: text cut to the pp's length")
      examples.append(payload)
    batch = stack_examples(examples)
    self._counters["batches"] += 1
    self._counters["examples"] += len(examples)
    return batch

  def _snapshot(self) -> dict:
    return {"version": _STATE_VERSION, "grain": self._it.get_state(),
            "counters": dict(self._counters), "fingerprint": self._fingerprint}

  def _to_device(self, batch: dict[str, np.ndarray]) -> dict:
    if self._sharding is None:
      return batch
    import jax  # pylint: disable=g-import-not-at-top
    out = {}
    for k, v in batch.items():
      if v.dtype == object:
        out[k] = v  # Strings/ragged values stay on the host.
        continue
      try:
        out[k] = jax.make_array_from_process_local_data(self._sharding, v)
      except ValueError as e:
        raise InputError(f"cannot shard batch key {k!r} {v.dtype}{list(v.shape)} with "
                         f"{self._sharding}: {e} (local batch {self.local_batch} must divide "
                         f"evenly over this process's devices)") from e
    return out

  def _produce(self) -> tuple[dict, dict]:
    batch = self._local_batch()
    return self._to_device(batch), self._snapshot()

  def _worker(self, q: queue.Queue, stop: threading.Event) -> None:
    while not stop.is_set():
      try:
        item = self._produce()
      except BaseException as e:  # pylint: disable=broad-except
        item = e
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if isinstance(item, BaseException):
        return

  def _start(self) -> None:
    if self._prefetch and self._thread is None:
      self._queue = queue.Queue(maxsize=self._prefetch)
      self._stop = threading.Event()
      self._thread = threading.Thread(target=self._worker, args=(self._queue, self._stop),
                                      name="input-prefetch", daemon=True)
      self._thread.start()

  def _halt(self) -> None:
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = self._stop = None

  # --- public ---------------------------------------------------------------------------------
  def __next__(self) -> dict:
    if self._closed:
      raise RuntimeError("TrainIterator is closed")
    t0 = time.perf_counter()
    if self._prefetch:
      self._start()
      item = self._queue.get()
    else:
      try:
        item = self._produce()
      except BaseException as e:  # pylint: disable=broad-except
        item = e
    self._wait_s += time.perf_counter() - t0
    if isinstance(item, BaseException):
      self._halt()
      raise item
    batch, self._last_state = item
    return batch

  def get_state(self) -> bytes:
    """JSON bytes: the position after the last batch returned by next()."""
    return json.dumps(self._last_state).encode()

  def set_state(self, state: bytes | str | dict) -> None:
    """Restores a get_state() blob (batches prefetched before are discarded)."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
      raise ValueError(f"not an input pipeline state (version {_STATE_VERSION}): {state!r:.200}")
    if state["fingerprint"] != self._fingerprint:
      diff = {k: (state["fingerprint"].get(k), v) for k, v in self._fingerprint.items()
              if state["fingerprint"].get(k) != v}
      raise ValueError(f"input state was saved by a different pipeline (saved, now): {diff}; "
                       f"resuming exactly needs the same batch size, processes, workers, data")
    self._halt()
    self._it.set_state(state["grain"])
    self._counters = dict(state["counters"])
    self._last_state = state

  def stats(self) -> dict[str, float]:
    """Counters up to the last batch returned (not the prefetched ones), and the seconds
    next() spent waiting for input."""
    return {"wait_s": self._wait_s, **self._last_state["counters"]}

  def close(self) -> None:
    self._halt()
    self._closed = True
    close = getattr(self._it, "close", None)
    if close:
      close()

  def __del__(self):
    try:
      self._halt()
    except Exception:  # pylint: disable=broad-except
      pass


def _cpu_only_worker(worker_index: int, worker_count: int) -> None:
  """grain worker init: input workers never touch accelerators. A JAX mask encoder (or TF)
  running in a worker would otherwise initialise the GPU/TPU and take the trainer's memory."""
  del worker_index, worker_count
  os.environ["CUDA_VISIBLE_DEVICES"] = ""
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # Imported by the re-run main module, but no backend started yet.
    sys.modules["jax"].config.update("jax_platforms", "cpu")


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; scripts without absl.app never parse them.
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(input_cfg, *, tokenizer=None, seed: int = 0, data_sharding=None,
                        encode_masks=None, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The training iterator for config.input (see the module docstring).

  Args:
    input_cfg: config.input (ConfigDict or dict).
    tokenizer: the Tokenizer that `tok` ops use.
    seed: config.seed; shuffling and pp randomness derive from it.
    data_sharding: a jax Sharding for [global_batch, ...] arrays (e.g. NamedSharding(mesh,
      P("data"))): batches become global jax.Arrays. None: numpy arrays of the local batch.
    encode_masks: float32[N,64,64,1] -> int[N,16] VQ-VAE codes, for segmentation targets.
    process_index, process_count: this process's shard; default jax's.
  """
  components, settings = parse_input_config(input_cfg)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  batch_size = settings["batch_size"]
  if batch_size % process_count:
    raise ValueError(f"config.input.batch_size={batch_size} is not divisible by the "
                     f"{process_count} processes")
  local_batch = batch_size // process_count
  ctx = PPContext(tokenizer=tokenizer, encode_masks=encode_masks,
                  truncate=settings["skip_bad_examples"])
  datasets, weights, total, sizes = [], [], 0, []
  for i, comp in enumerate(components):
    source = make_source(comp["data"])
    pp = Preprocess(comp["pp"], ctx)
    lo, hi = process_slice(len(source), process_index, process_count)
    if hi <= lo:
      raise ValueError(f"input {comp['name']!r} has {len(source)} records: too few for "
                       f"{process_count} processes")
    cseed = _derive_seed(seed, i)
    ds = grain.MapDataset.range(lo, hi)
    if settings["shuffle_buffer_size"]:
      ds = ds.shuffle(seed=cseed)
    ds = ds.repeat(None).map_with_index(_Load(source, pp, cseed, hi - lo))
    datasets.append(ds)
    weights.append(comp["weight"])
    total += len(source)
    sizes.append(len(source))
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  buffer = max(16, local_batch * max(1, settings["prefetch"]))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                            prefetch_buffer_size=buffer))
  if settings["num_workers"]:
    _ensure_absl_flags_parsed()
    workers = settings["num_workers"]
    # Elements cross processes one by one: let each worker run a batch-share ahead.
    per_worker = max(2, -(-local_batch * max(1, settings["prefetch"]) // workers))
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=per_worker),
                        worker_init_fn=_cpu_only_worker)
  fingerprint = dict(batch_size=batch_size, process_index=process_index,
                     process_count=process_count, num_workers=settings["num_workers"],
                     components=[[c["name"], c["weight"], c["pp"]] for c in components],
                     sizes=sizes, seed=int(seed), shuffle=bool(settings["shuffle_buffer_size"]))
  return TrainIterator(ds, local_batch=local_batch, data_sharding=data_sharding,
                       prefetch=settings["prefetch"], skip_bad=settings["skip_bad_examples"],
                       fingerprint=fingerprint, num_examples=total)


class EvalExamples:
  """This process's shard of an eval split, preprocessed, in order; iterable many times.

  Yields one dict per example (numpy values) for the evaluators. Bad examples raise, or are
  skipped and counted in `.skipped` with skip_bad_examples=True.
  """

  def __init__(self, data_cfg: Mapping[str, Any], pp: str, *, tokenizer=None,
               encode_masks=None, seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, skip_bad_examples: bool = False):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.source = make_source(data_cfg)
    self.pp = Preprocess(pp, PPContext(tokenizer=tokenizer, encode_masks=encode_masks,
                                       truncate=skip_bad_examples))
    self.lo, self.hi = process_slice(len(self.source), process_index, process_count)
    self.total = len(self.source)
    self.seed = int(seed)
    self.skip_bad_examples = skip_bad_examples
    self.skipped = 0
    self.truncated = 0

  def __len__(self) -> int:
    return self.hi - self.lo

  def __iter__(self) -> Iterator[dict]:
    if self.hi <= self.lo:
      return
    ds = grain.MapDataset.range(self.lo, self.hi).map_with_index(
        _Load(self.source, self.pp, self.seed, self.hi - self.lo))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                              prefetch_buffer_size=32))
    for tag, payload, truncated in it:
      if tag == "bad":
        if not self.skip_bad_examples:
          raise InputError(f"bad eval example: {payload}")
        self.skipped += 1
        log.warning("eval input: skipped %d example(s); latest: %s", self.skipped, payload)
        continue
      self.truncated += bool(truncated)
      yield payload


def eval_examples(data_cfg: Mapping[str, Any], pp: str, **kw) -> EvalExamples:
  """EvalExamples(data_cfg, pp, tokenizer=, encode_masks=, seed=, process_index=,
  process_count=, skip_bad_examples=)."""
  return EvalExamples(data_cfg, pp, **kw)
