"""PaliGemma checkpoints: big_vision .npz files and Hugging Face folders, both ways.

  load(path, **overrides) -> (model_config, params)
  save(path, model_config, params, format="npz" | "hf")

`model_config` speaks big_vision's vocabulary ({"img": siglip config, "llm": gemma config},
see big_vision_lite/models/{siglip,gemma}.py); `params` is the nested dict of arrays of
big_vision's own trees. The canonical layout is the scanned one (layers stacked on a leading
axis L: `img/Transformer/encoderblock/...`, `llm/layers/...`); with `scan=False` a tower's
layers are `img/Transformer/encoderblock_{i}/...` / `llm/layers/{i}/...` without that axis.

Memory: arrays are streamed one at a time. Reading, each stored npz member (or safetensors
tensor) is read straight into its final preallocated array (per-layer entries into their
slice of the stacked array; zip CRCs are checked); writing, our own zip / safetensors writers
take one array at a time. With `shardings` every array goes to its devices as soon as it is
read, so the host holds at most about one array (plus one temporary copy of it for a
transpose or a cast) at any time. bench/load_checkpoint.py measures it: peak RSS of a
5.85 GB PaliGemma-3B bf16 npz load is the file size + the interpreter (x1.04).

Formats are recognised by `_FORMATS` (detect -> Reader): to teach load() another format
(e.g. training workdirs with orbax checkpoints) add a Reader subclass and an entry there.
The Hugging Face mapping lives in checkpoints_hf.py, the tree helpers (flatten, layer
stacking, posemb resizing; re-exported here) in param_tree.py.
"""
from collections.abc import Callable, Mapping
import logging
import math
import os
import pathlib
import zipfile
import zlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

from big_vision_lite import checkpoints_config as cc
# Re-exported: the config side of the public API.
from big_vision_lite.checkpoints_config import IMG_BLOCK, LLM_LAYERS, ModelConfig, Shape  # pylint: disable=g-importing-member
from big_vision_lite.checkpoints_config import merge_config, param_shapes  # pylint: disable=g-importing-member
from big_vision_lite import param_tree as pt
# Re-exported: the tree helpers of the public API (they live in param_tree.py).
from big_vision_lite.param_tree import flatten, resample_posemb, stack_layers, unflatten, unstack_layers  # pylint: disable=g-importing-member

log = logging.getLogger(__name__)

Params = pt.Params
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), BFLOAT16, np.dtype(np.float64))

# ---------------------------------------------------------------------------------------
# Readers: one per format. load() only uses this interface.

class Reader:
  """A checkpoint opened for reading.

  Attributes:
    path: what was opened (for error messages).
    config: the model config inferred from the checkpoint alone (None for an image-tower-only
      npz, see NpzReader).
    shapes: {scanned-layout name: (shape, stored dtype)} of every parameter.
  """
  path: str
  config: ModelConfig | None
  shapes: dict[str, tuple[Shape, np.dtype]]

  def read(self, name: str) -> np.ndarray:
    """The array of one scanned-layout parameter, in its stored dtype."""
    raise NotImplementedError

  def close(self) -> None:
    pass


def _npy_header(zf: zipfile.ZipFile, member: str) -> tuple[Shape, np.dtype, bool, int]:
  """(shape, dtype, fortran_order, header bytes) of one .npy member, without its data."""
  with zf.open(member) as f:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), dtype, fortran, f.tell()


class NpzReader(Reader):
  """big_vision .npz: "/"-joined keys, optional "params/" prefix, scanned or per-layer layers.

  A file with only "img/..." params is an image-encoder checkpoint (config None): it feeds
  model_init with model_load.only="img", not `load`.
  """

  def __init__(self, path: str):
    self.path = path
    try:
      npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
      raise ValueError(f"{path}: not a readable .npz checkpoint (truncated, corrupt or not a zip "
                       f"file): {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise ValueError(f"{path}: holds a single array, not a checkpoint (.npz of named arrays)")
    self._npz = npz
    names = list(npz.files)
    prefixed = [n.startswith("params/") for n in names]
    if any(prefixed) and not all(prefixed):
      raise ValueError(f"{path}: some keys start with 'params/' and some do not")
    strip = len("params/") if names and all(prefixed) else 0
    members = {n[strip:]: n for n in names}
    self._groups = pt.group_layers(members, path)
    self._members = members
    self._file = open(path, "rb")  # pylint: disable=consider-using-with
    self._headers = {}
    self.shapes = {}
    for stacked, parts in self._groups.items():
      infos = []
      for _, name in parts:
        try:
          shape, dtype, fortran, nbytes = _npy_header(npz.zip, members[name] + ".npy")
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
          raise ValueError(f"{path}: cannot read the header of {members[name]}: {e}") from e
        dtype = BFLOAT16 if dtype == np.dtype("V2") else dtype
        if dtype not in _FLOAT_DTYPES:
          raise ValueError(f"{path}: {members[name]} has dtype {dtype}; expected a float "
                           "(float32/float16/bfloat16 stored as |V2)")
        self._headers[name] = (fortran, nbytes)
        infos.append((name, shape, dtype))
      for name, shape, dtype in infos[1:]:
        if (shape, dtype) != infos[0][1:]:
          raise ValueError(f"{path}: {name} is {dtype}{list(shape)} but {infos[0][0]} is "
                           f"{infos[0][2]}{list(infos[0][1])}; layers must agree")
      _, shape, dtype = infos[0]
      self.shapes[stacked] = ((len(parts),) + shape if parts[0][0] is not None else shape, dtype)
    towers = {cc.tower(n) for n in self.shapes}
    self.config = None if towers == {"img"} else cc.config_from_shapes(self.shapes, path)

  def _read_into(self, name: str, out: np.ndarray) -> None:
    """Reads one member into `out` (C-contiguous, right shape and dtype)."""
    member = self._members[name] + ".npy"
    info = self._npz.zip.getinfo(member)
    fortran, header_bytes = self._headers[name]
    try:
      if info.compress_type != zipfile.ZIP_STORED or fortran:  # rare: numpy's own reader
        array = self._npz[self._members[name]]
        out[...] = array.view(out.dtype) if array.dtype == np.dtype("V2") else array
        return
      # np.savez stores members uncompressed: read the bytes straight into `out` (no zip
      # streaming and no temporary copy), then check the member's CRC as zipfile would.
      self._file.seek(info.header_offset)
      local = self._file.read(30)
      if local[:4] != b"PK\x03\x04":
        raise ValueError("bad local file header")
      self._file.seek(info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                      + int.from_bytes(local[28:30], "little"))
      crc = zlib.crc32(self._file.read(header_bytes))
      data = out.reshape(-1).view(np.uint8)
      if self._file.readinto(data) != data.nbytes:
        raise EOFError("file ends inside the array data")
      if zlib.crc32(data, crc) != info.CRC:
        raise ValueError("CRC mismatch")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
      raise ValueError(f"{self.path}: cannot read {member} (truncated or corrupt file?): {e}") from e

  def read(self, name: str) -> np.ndarray:
    parts = self._groups[name]
    shape, dtype = self.shapes[name]
    out = np.empty(shape, dtype)  # per-layer files fill it layer by layer: one stacked copy.
    for i, member in parts:
      self._read_into(member, out if i is None else out[i])
    return out

  def close(self) -> None:
    self._npz.close()
    self._file.close()


def _hf_reader(path: str) -> Reader:
  from big_vision_lite import checkpoints_hf  # pylint: disable=g-import-not-at-top
  return checkpoints_hf.HfReader(path)


def _is_npz(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04" or path.suffix == ".npz"


def _workdir_reader(path: str) -> Reader:
  from big_vision_lite import run_state  # pylint: disable=g-import-not-at-top
  return run_state.WorkdirReader(path)


# (name, detect(path) -> bool, open(path) -> Reader), tried in order.
_FORMATS: list[tuple[str, Callable[[pathlib.Path], bool], Callable[[str], Reader]]] = [
    ("npz", lambda p: p.is_file() and _is_npz(p), NpzReader),
    # A training workdir (run_state.py) or one of its <workdir>/checkpoints/<step> folders;
    # before "hf" because a workdir holds a config.json too.
    ("workdir", lambda p: p.is_dir() and ((p / "checkpoints").is_dir() or (
        p.parent.name == "checkpoints" and p.name.isdigit())), _workdir_reader),
    ("hf", lambda p: p.is_dir() and (p / "config.json").is_file(), _hf_reader),
]


def open_checkpoint(path: str | os.PathLike) -> Reader:
  """Detects the format of `path` and opens it (see _FORMATS)."""
  p = pathlib.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{path}: no such checkpoint file or directory")
  for _, detect, opener in _FORMATS:
    if detect(p):
      return opener(str(p))
  if p.is_dir():
    raise ValueError(f"{path}: a directory without config.json: not a Hugging Face PaliGemma "
                     "folder (nor another known checkpoint layout)")
  raise ValueError(f"{path}: not a checkpoint: expected a big_vision .npz (zip) file or a Hugging "
                   "Face folder with config.json")


# ---------------------------------------------------------------------------------------
# load / save.

def _shardings_by_name(shardings: Any, names: list[str]) -> dict[str, Any]:
  """{output name: Sharding or None}, checked before anything is read."""
  if shardings is None:
    return dict.fromkeys(names)
  if callable(shardings):
    return {name: shardings(name) for name in names}
  flat = flatten(shardings)
  for name in names:
    if name not in flat:
      raise ValueError(f"load: shardings has no entry for parameter {name}")
  return {name: flat[name] for name in names}


def load(path: str | os.PathLike, *, param_dtype: str | None = None, shardings: Any = None,
         **overrides: Mapping[str, Any]) -> tuple[ModelConfig, Params]:
  """Reads a checkpoint (big_vision .npz or Hugging Face folder) and infers its model config.

  Args:
    path: a big_vision .npz file, a Hugging Face PaliGemma folder (config.json +
      model.safetensors or a sharded model.safetensors.index.json), or a training workdir
      (its latest step) or <workdir>/checkpoints/<step> (params only, LoRA merged).
    param_dtype: cast every parameter to this dtype (sets both towers' param_dtype).
    shardings: None (numpy arrays on the host), a pytree of jax.sharding.Sharding matching
      the returned params, or a callable "img/embedding/kernel" -> Sharding. Each array is
      placed as soon as it is read.
    **overrides: img={...} and/or llm={...}, deep-merged over the inferred config (e.g.
      llm={"final_logits_softcap": 30.0}); scan=False returns that tower per layer; a
      param_dtype casts that tower; img.image_size other than the file's resamples
      img/pos_embedding (see resample_posemb).

  Returns:
    (model_config, params): params in the stored dtype unless cast (bfloat16 as
    ml_dtypes.bfloat16), bit-exact; the config's param_dtype names the returned dtype.
  """
  reader = open_checkpoint(path)
  try:
    if reader.config is None:
      raise ValueError(f"{path}: holds only the image tower (img/...), not a whole PaliGemma: "
                       "load it with config.model_init and model_load.only='img'")
    overrides = {t: dict(o) if isinstance(o, Mapping) else o for t, o in overrides.items()}
    if param_dtype is not None:
      for tower in ("img", "llm"):
        tower_cfg = overrides.setdefault(tower, {})
        if isinstance(tower_cfg, dict) and tower_cfg.setdefault("param_dtype", param_dtype) != param_dtype:
          raise ValueError(f"load: param_dtype={param_dtype!r} but {tower}.param_dtype="
                           f"{tower_cfg['param_dtype']!r}")
    config = merge_config(reader.config, overrides)
    expected = param_shapes(config)
    _check_shapes(reader, expected)
    layout = {name: ([pt.layer_name(name, i) for i in range(expected[name][0])]
                     if pt.is_stacked(name) and not config[cc.tower(name)]["scan"] else [name])
              for name in sorted(expected)}
    targets = _shardings_by_name(shardings, [n for names in layout.values() for n in names])
    out = {}
    for name, out_names in layout.items():
      array = reader.read(name)
      if array.shape != expected[name]:  # only img/pos_embedding passes _check_shapes so.
        log.info("load: resampling img/pos_embedding from %d to %d positions for image_size %s",
                 array.shape[1], expected[name][1], config["img"]["image_size"])
        array = resample_posemb(array, expected[name][1])
      dtype = np.dtype(config[cc.tower(name)]["param_dtype"])
      if array.dtype != dtype:
        array = array.astype(dtype)
      pieces = [array] if out_names == [name] else list(array)  # per layer: views
      for out_name, piece in zip(out_names, pieces):
        if (sharding := targets[out_name]) is not None:
          piece = jax.make_array_from_callback(piece.shape, sharding, lambda idx, a=piece: a[idx])
        out[out_name] = piece
      del array, pieces
  finally:
    reader.close()
  return config, unflatten(out)


def _check_shapes(reader: Reader, expected: Mapping[str, Shape]) -> None:
  for name, (shape, _) in reader.shapes.items():
    if name not in expected:
      raise ValueError(f"{reader.path}: parameter {name} {list(shape)} in the checkpoint is not "
                       "part of the model config (wrong overrides, or not a PaliGemma checkpoint?)")
  for name, want in expected.items():
    if name not in reader.shapes:
      raise ValueError(f"{reader.path}: parameter {name} (shape {list(want)}) is missing from "
                       "the checkpoint")
    got = reader.shapes[name][0]
    resample = (name == "img/pos_embedding" and got[0] == 1 and got[2] == want[2]
                and math.isqrt(got[1]) ** 2 == got[1])
    if got != want and not resample:
      raise ValueError(f"{reader.path}: parameter {name}: the checkpoint has shape {list(got)}, the "
                       f"model config expects {list(want)}")


def canonical_arrays(model_config: ModelConfig, params: Mapping[str, Any],
                     ) -> dict[str, tuple[Shape, np.dtype, Callable[[], np.ndarray]]]:
  """{scanned name: (shape, dtype, get)} of params in any layout, checked against the config.

  `get()` gives the host numpy array (per-layer leaves are stacked only then), so that a
  writer holds one array at a time.
  """
  flat = flatten(params)
  expected = param_shapes(model_config)
  out = {}
  for stacked, parts in pt.group_layers(flat, "save").items():
    leaves = [flat[name] for _, name in parts]
    shape = tuple(leaves[0].shape)
    shape = (len(parts),) + shape if parts[0][0] is not None else shape
    dtype = np.dtype(leaves[0].dtype)
    for (_, name), leaf in zip(parts, leaves):
      if np.dtype(leaf.dtype) != dtype or tuple(leaf.shape) != tuple(leaves[0].shape):
        raise ValueError(f"save: {name} is {leaf.dtype}{list(leaf.shape)} but {parts[0][1]} is "
                         f"{dtype}{list(leaves[0].shape)}")
    if dtype not in _FLOAT_DTYPES:
      raise ValueError(f"save: parameter {stacked} has dtype {dtype}; expected a float dtype")
    if stacked not in expected:
      raise ValueError(f"save: parameter {stacked} {list(shape)} is not part of the model config")
    if shape != expected[stacked]:
      raise ValueError(f"save: parameter {stacked} has shape {list(shape)}, the model config "
                       f"expects {list(expected[stacked])}")
    if parts[0][0] is None:
      get = lambda leaf=leaves[0]: np.asarray(leaf)
    else:
      get = lambda ls=tuple(leaves): np.stack([np.asarray(x) for x in ls])
    out[stacked] = (shape, dtype, get)
  missing = sorted(set(expected) - set(out))
  if missing:
    raise ValueError(f"save: params lack {missing[0]} (shape {list(expected[missing[0]])})"
                     + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
  return out


def save(path: str | os.PathLike, model_config: ModelConfig, params: Mapping[str, Any], *,
         format: str = "npz", max_shard_bytes: int = 4 << 30,  # pylint: disable=redefined-builtin
         image_token_index: int | None = None) -> None:
  """Writes params (any layout; numpy or jax arrays) as a big_vision .npz or an HF folder.

  npz: flat "params/"-prefixed "/"-joined keys, scanned layout, bfloat16 as '|V2' raw bits
  (big_vision's encoding). hf: a folder for transformers' PaliGemmaForConditionalGeneration
  (see checkpoints_hf.save_hf; `max_shard_bytes` and `image_token_index` apply there).
  Files are written under a temporary name and renamed when complete.
  """
  arrays = canonical_arrays(model_config, params)
  if format == "npz":
    _save_npz(str(path), arrays)
  elif format == "hf":
    from big_vision_lite import checkpoints_hf  # pylint: disable=g-import-not-at-top
    checkpoints_hf.save_hf(str(path), model_config, arrays, max_shard_bytes=max_shard_bytes,
                           image_token_index=image_token_index)
  else:
    raise ValueError(f"save: format={format!r}; expected 'npz' or 'hf'")


def _save_npz(path: str, arrays: Mapping[str, tuple[Shape, np.dtype, Callable[[], np.ndarray]]]):
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, (_, _, get) in sorted(arrays.items()):
      array = np.ascontiguousarray(get())
      if array.dtype == BFLOAT16:
        array = array.view(np.dtype("V2"))
      with zf.open(f"params/{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, array, allow_pickle=False)
      del array
  os.replace(tmp, path)
