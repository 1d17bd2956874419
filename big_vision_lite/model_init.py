"""Initial params for fine-tuning: a pretrained checkpoint, partly or wholly, over a fresh init.

    params, report = init_params(config.model, init_fn, model_init=config.model_init,
                                 load=config.model_load, shardings=param_shardings, rng=rng)
    logging.info("%s", report)

`model_init`: None (everything fresh), a path (big_vision .npz, Hugging Face folder, training
workdir; see checkpoints.open_checkpoint) or a big_vision vanity name resolved in the folder
named by $BVL_CHECKPOINT_DIR (see VANITY_FILES), e.g. "pt_224", "pt_3b_448", "pt_10b_896.bf16".

`load` (config.model_load; every key optional, unknown keys are errors):
  only             "img" | "llm" | None: load one tower; the other keeps its fresh init.
  skip             [regex, ...] fullmatched against "/"-joined param names of the model's tree
                   (e.g. "img/head/.*"): those params keep their fresh init. A regex that
                   matches no param is an error (a typo would silently load everything).
  resample_posemb  (default True) a checkpoint pos_embedding grid other than the model's is
                   resized (checkpoints.resample_posemb, as big_vision); False: an error.

Shapes must match, except the grid above and a token table with fewer rows than the model's
vocab_size, which gets new rows ~ N(0, 0.02^2) (as big_vision's gemma.load), drawn from `rng`
so that every process computes the same ones. Dtypes follow the model (casts are reported).

Memory: only the fresh params are computed (one jit whose outputs are just those leaves, placed
by `shardings`), and each loaded array is read, adjusted and put on its devices before the next
is read, so the host holds about one array at a time; skipped towers are never read.
"""
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import math
import os
import re
from typing import Any

import jax
import numpy as np

from big_vision_lite import checkpoints as ckpt
from big_vision_lite import checkpoints_config as cc
from big_vision_lite import param_tree

Params = dict[str, Any]
LOAD_DEFAULTS = dict(only=None, skip=(), resample_posemb=True)
EMBEDDING = "llm/embedder/input_embedding"
POSEMB = "img/pos_embedding"
NEW_ROWS_STD = 0.02

# Official file (or folder) names of a vanity name, tried in order; {v} = the vanity name,
# {base} = "paligemma-3b-pt-224" (PaliGemma 1) / "paligemma2-10b-pt-448" (PaliGemma 2).
# big_vision itself expects "{v}.npz"; Kaggle ships "{base}.npz"/".bf16"/".f16" (PaliGemma 1)
# and "{base}.b16.npz" (PaliGemma 2); Hugging Face repos are folders named {base}.
VANITY_FILES = {
    None: ("{v}.npz", "{base}.npz", "{base}.b16.npz", "{base}.bf16.npz", "{base}.f16.npz",
           "{base}"),
    "bf16": ("{v}.npz", "{base}.bf16.npz", "{base}.b16.npz"),
    "f16": ("{v}.npz", "{base}.f16.npz"),
}
_VANITY_RE = re.compile(r"(pt|mix)_(?:(3b|10b|28b)_)?(224|448|896)(?:\.(bf16|f16))?")


# ---------------------------------------------------------------------------------------
# Where the checkpoint is.

def vanity_candidates(name: str) -> list[str] | None:
  """File/folder names that vanity `name` may have on disk, or None if it is not one."""
  m = _VANITY_RE.fullmatch(name)
  if not m:
    return None
  kind, size, res, precision = m.groups()
  base = f"paligemma2-{size}-{kind}-{res}" if size else f"paligemma-3b-{kind}-{res}"
  return [f.format(v=name, base=base) for f in VANITY_FILES[precision]]


def resolve_checkpoint(model_init: str) -> str:
  """A path as is; a vanity name -> the first existing candidate in $BVL_CHECKPOINT_DIR."""
  model_init = os.fspath(model_init)
  if os.path.exists(model_init):
    return model_init
  candidates = vanity_candidates(model_init)
  if candidates is None:
    raise FileNotFoundError(
        f"model_init={model_init!r}: no such file or folder, and not a vanity name (pt_224, "
        "pt_448, pt_896, pt_3b_224, pt_10b_448, pt_28b_896, mix_..., optionally .bf16/.f16)")
  folder = os.environ.get("BVL_CHECKPOINT_DIR")
  if not folder:
    raise FileNotFoundError(f"model_init={model_init!r} is a vanity name: set BVL_CHECKPOINT_DIR "
                            f"to the folder holding one of {candidates}")
  paths = [os.path.join(folder, c) for c in candidates]
  for path in paths:
    if os.path.exists(path):
      return path
  raise FileNotFoundError(f"model_init={model_init!r}: none of these exist: {paths} "
                          f"(BVL_CHECKPOINT_DIR={folder!r})")


# ---------------------------------------------------------------------------------------
# The report.

@dataclasses.dataclass
class InitReport:
  """What init_params did; str(report) is a table for the log."""
  source: str | None = None
  loaded: dict[str, tuple[tuple[int, ...], str]] = dataclasses.field(default_factory=dict)
  loaded_bytes: int = 0
  fresh: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> why
  resampled: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # side->side
  extended: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)  # rows->rows
  cast: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)  # from, to

  def __str__(self) -> str:
    lines = [f"model init from {self.source or '(nothing: every param freshly initialised)'}"]
    row = lambda what, n, rest: lines.append(f"  {what:<10} {n:>5} params  {rest}")
    count = sum(math.prod(s) for s, _ in self.loaded.values())
    row("loaded", len(self.loaded), f"{count:,} values, {self.loaded_bytes / 2**20:,.1f} MiB")
    for name, (old, new) in self.resampled.items():
      row("resampled", 1, f"{name}: {old}x{old} -> {new}x{new} grid")
    for name, (old, new) in self.extended.items():
      row("extended", 1, f"{name}: {old} -> {new} rows (new rows ~ N(0, {NEW_ROWS_STD}^2))")
    pairs: dict[tuple[str, str], int] = {}
    for pair in self.cast.values():
      pairs[pair] = pairs.get(pair, 0) + 1
    for (a, b), n in sorted(pairs.items()):
      row("cast", n, f"{a} -> {b}")
    reasons: dict[str, list[str]] = {}
    for name, why in self.fresh.items():
      reasons.setdefault(why, []).append(name)
    for why, names in reasons.items():
      row("fresh", len(names), f"({why}): " + ", ".join(names))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# init_params.

def parse_load(load: Mapping[str, Any] | None) -> dict[str, Any]:
  """config.model_load with defaults filled; unknown keys and bad values are errors."""
  if load is not None and not isinstance(load, Mapping):
    load = load.to_dict() if hasattr(load, "to_dict") else load
  load = dict(load or {})
  unknown = sorted(set(load) - set(LOAD_DEFAULTS))
  if unknown:
    raise ValueError(f"model_load: unknown key(s) {unknown}; known: {sorted(LOAD_DEFAULTS)}")
  out = {**LOAD_DEFAULTS, **load}
  if out["only"] not in (None, "img", "llm"):
    raise ValueError(f"model_load.only={out['only']!r}; expected 'img', 'llm' or None")
  skip = out["skip"]
  if isinstance(skip, str) or not isinstance(skip, Sequence):
    raise ValueError(f"model_load.skip={skip!r}; expected a list of regexes")
  try:
    out["skip"] = [re.compile(s) for s in skip]
  except (TypeError, re.error) as e:
    raise ValueError(f"model_load.skip={list(skip)!r}: not a list of regexes: {e}") from e
  if not isinstance(out["resample_posemb"], bool):
    raise ValueError(f"model_load.resample_posemb={out['resample_posemb']!r}; expected a bool")
  return out


def _flat_shardings(shardings: Any, names: Sequence[str]) -> dict[str, Any]:
  if shardings is None:
    return dict.fromkeys(names)
  flat = ckpt.flatten(shardings)
  missing = [n for n in names if n not in flat]
  if missing:
    raise ValueError(f"init_params: shardings has no entry for {missing[:3]} (it must mirror "
                     "the params tree)")
  return {n: flat[n] for n in names}


def _fresh_init(init_fn: Callable, rng: jax.Array, names: list[str], shardings: dict[str, Any]
                ) -> dict[str, jax.Array]:
  """Only `names` of init_fn(rng); XLA drops the unused rest, so nothing else is allocated."""
  def subset(r):
    flat = ckpt.flatten(init_fn(r))
    return {n: flat[n] for n in names}
  out_shardings = None if all(s is None for s in shardings.values()) else {
      n: shardings[n] for n in names}
  return jax.jit(subset, out_shardings=out_shardings)(rng)


def init_params(model_config: Mapping[str, Any], init_fn: Callable[[jax.Array], Params], *,
                model_init: str | os.PathLike | None, load: Mapping[str, Any] | None = None,
                shardings: Any = None, rng: jax.Array) -> tuple[Params, InitReport]:
  """The model's params: loaded from `model_init` where asked, freshly initialised elsewhere.

  Args:
    model_config: the model config (`Model(**model_config)`); names sizes in messages.
    init_fn: rng -> params tree of the model (e.g. `lambda r: model.init(r, ...)["params"]`);
      traced with jax.eval_shape for the target shapes/dtypes, and jitted for fresh params.
    model_init: None, a checkpoint path or a vanity name (see the module docstring).
    load: config.model_load (see the module docstring).
    shardings: a tree of jax.sharding.Sharding mirroring params, or None (default device).
    rng: PRNG key of the fresh init (and of new vocabulary rows).
  Returns:
    (params in the layout, dtypes and shardings of init_fn's tree, the report).
  """
  opts = parse_load(load)
  abstract = ckpt.flatten(jax.eval_shape(init_fn, rng))
  flat_shardings = _flat_shardings(shardings, list(abstract))
  for regex in opts["skip"]:
    if not any(regex.fullmatch(n) for n in abstract):
      raise ValueError(f"model_load.skip: {regex.pattern!r} matches no param (names look like "
                       f"{sorted(abstract)[:2]})")
  report = InitReport()
  for name in abstract:
    if model_init is None:
      report.fresh[name] = "no model_init"
    elif opts["only"] and cc.tower(name) != opts["only"]:
      report.fresh[name] = f"model_load.only={opts['only']!r}"
    elif any(r.fullmatch(name) for r in opts["skip"]):
      report.fresh[name] = "model_load.skip"
  reader = None
  if model_init is not None:
    report.source = resolve_checkpoint(model_init)
    reader = ckpt.open_checkpoint(report.source)
  try:
    # Every check before the (possibly long) fresh init and the first read.
    plans = _plan_load(reader, abstract, report, model_config, opts) if reader else {}
    fresh = [n for n in abstract if n in report.fresh]
    out = _fresh_init(init_fn, rng, fresh, flat_shardings) if fresh else {}
    if reader:
      _read_into(out, reader, plans, abstract, flat_shardings, report, rng)
  finally:
    if reader:
      reader.close()
  return ckpt.unflatten({n: out[n] for n in abstract}), report


def _plan_load(reader: ckpt.Reader, abstract: Mapping[str, Any], report: InitReport,
               model_config: Mapping[str, Any], opts: Mapping[str, Any]
               ) -> dict[str, tuple[str, list[tuple[int | None, str]]]]:
  """{stacked name: (how, [(layer, model name)])} of the params not in report.fresh."""
  groups = param_tree.group_layers(abstract, "model params")
  towers = {cc.tower(n) for n in abstract if n not in report.fresh}
  extra = sorted(n for n in reader.shapes if cc.tower(n) in towers and n not in groups)
  if extra:
    raise ValueError(f"{reader.path}: parameter(s) {extra} are in the checkpoint but not in the "
                     "model: the model config differs (post_norms? num_kv_heads?)")
  plans = {}
  for stacked, parts in groups.items():
    first = abstract[parts[0][1]]
    want = (len(parts),) + tuple(first.shape) if parts[0][0] is not None else tuple(first.shape)
    parts = [(layer, n) for layer, n in parts if n not in report.fresh]
    if not parts:
      continue
    if stacked not in reader.shapes:
      raise ValueError(f"{reader.path}: parameter {stacked} {list(want)} is missing from the "
                       "checkpoint (list it in model_load.skip to keep its fresh init)")
    how = _plan(stacked, reader.shapes[stacked][0], want, reader.path, model_config, opts)
    plans[stacked] = (how, parts)
  return plans


def _read_into(out: dict[str, Any], reader: ckpt.Reader, plans: Mapping[str, Any],
               abstract: Mapping[str, Any], shardings: Mapping[str, Any], report: InitReport,
               rng: jax.Array) -> None:
  """Reads, adjusts, casts and places each planned param, one stored array at a time."""
  for stacked, (how, parts) in plans.items():
    array = reader.read(stacked)
    if how == "resample":
      old, new = math.isqrt(array.shape[1]), math.isqrt(abstract[stacked].shape[1])
      array = ckpt.resample_posemb(array, new * new)
      report.resampled[stacked] = (old, new)
    elif how == "extend":
      old, new = array.shape[0], abstract[stacked].shape[0]
      key = jax.random.fold_in(rng, 0x70CAB)  # not the init's own stream
      rows = np.asarray(jax.random.normal(key, (new - old, array.shape[1]), np.float32))
      array = np.concatenate([array, (rows * NEW_ROWS_STD).astype(array.dtype)])
      report.extended[stacked] = (old, new)
    for layer, name in parts:
      piece = array if layer is None else array[layer]
      dtype = np.dtype(abstract[name].dtype)
      if piece.dtype != dtype:
        report.cast[name] = (piece.dtype.name, dtype.name)
        piece = piece.astype(dtype)
      if (sharding := shardings[name]) is not None:
        out[name] = jax.make_array_from_callback(piece.shape, sharding, lambda i, a=piece: a[i])
      else:
        out[name] = jax.device_put(piece)
      report.loaded[name] = (tuple(piece.shape), dtype.name)
      report.loaded_bytes += piece.nbytes
    del array


def _plan(name: str, got: tuple[int, ...], want: tuple[int, ...], path: str,
          model_config: Mapping[str, Any], opts: Mapping[str, Any]) -> str:
  """"copy" | "resample" | "extend" for one stacked param, or a ValueError saying why not."""
  got, want = tuple(got), tuple(want)
  if got == want:
    return "copy"
  if name == POSEMB and len(got) == len(want) == 3 and got[::2] == want[::2]:
    old, new = math.isqrt(got[1]), math.isqrt(want[1])
    if old * old != got[1] or new * new != want[1]:
      raise ValueError(f"{path}: {name} {list(got)} -> {list(want)}: only square grids can be "
                       "resampled")
    if not opts["resample_posemb"]:
      img = model_config.get("img", {})
      raise ValueError(f"{path}: {name} is a {old}x{old} grid {list(got)}, the model's "
                       f"(image_size {img.get('image_size')}, patch {img.get('patch_size')}) is "
                       f"{new}x{new} {list(want)}; set model_load.resample_posemb=True")
    return "resample"
  if name == EMBEDDING and len(got) == len(want) == 2 and got[1] == want[1]:
    if got[0] > want[0]:
      raise ValueError(f"{path}: {name} has {got[0]} rows (vocabulary), more than the model's "
                       f"llm.vocab_size {want[0]}: set vocab_size >= {got[0]}")
    return "extend"
  raise ValueError(f"{path}: parameter {name}: the checkpoint has shape {list(got)}, the model "
                   f"expects {list(want)}")
