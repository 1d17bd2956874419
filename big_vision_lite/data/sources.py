"""Random-access data sources: TFDS, JSONL + image files, and the synthetic demo.

Every source is a picklable sequence of raw example dicts (numpy/Python values) with
  len(src), src[i] -> dict (raises ExampleError for a bad record), src.where(i) -> str
(the record's location for error messages: "data.jsonl:12", "tfds:coco_captions/train[5]").
`make_source(data_cfg)` builds one from a config's `data` dict:

  dict(name="demo", split="train" | "val" | "val[:64]", image_size=224, ...)   (see demo.py)
  dict(name="jsonl", path="/data/train.jsonl", split=None | "[:1000]" | "[10%:]",
       image_keys=("image",), base_dir=None)
      One JSON object per line; values of image_keys are file paths relative to base_dir
      (default: the .jsonl file's folder), read as bytes (then `decode` in the pp).
  dict(name="tfds:coco_captions" | "coco_captions", split="train[:98%]+restval",
       data_dir=None, skip_decode=("image",))
      data_dir None -> $TFDS_DATA_DIR (TFDS's own default otherwise). Datasets prepared in
      TFDS's default tfrecord format are read by record offsets (an index built on first
      use, no TensorFlow input pipeline); array_record datasets through tfds' data source.
      Features in skip_decode stay encoded bytes (decode them with the `decode` pp op).
"""
import json
import os
import re
import struct
from typing import Any, Mapping

import numpy as np

from big_vision_lite.data.pp_parse import ExampleError

_SPLIT_RE = re.compile(r"^\s*([A-Za-z0-9_\-]*)\s*(?:\[\s*([^:\]]*)\s*:\s*([^\]]*)\s*\])?\s*$")


def parse_split(split: str | None, what: str) -> tuple[str, str | None, str | None]:
  """"val[:16]" -> ("val", None, "16"); no "+" (only TFDS splits can be added)."""
  if split is None:
    return "", None, None
  m = _SPLIT_RE.match(split)
  if not m:
    raise ValueError(f"{what}: split {split!r} must look like 'name', 'name[a:b]' or '[a:b]' "
                     "(a, b ints or percentages)")
  return m.group(1), m.group(2) or None, m.group(3) or None


def slice_bounds(n: int, start: str | None, stop: str | None, what: str) -> tuple[int, int]:
  """Resolves "10", "-5", "2%" bounds against n records, as TFDS does."""
  def one(v, default):
    if v is None:
      return default
    try:
      if v.endswith("%"):
        return int(round(n * float(v[:-1]) / 100))
      return int(v)
    except ValueError:
      raise ValueError(f"{what}: bad split bound {v!r}") from None
  lo, hi = one(start, 0), one(stop, n)
  lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
  lo, hi = min(max(lo, 0), n), min(max(hi, 0), n)
  return lo, max(lo, hi)


class JsonlSource:
  """One JSON object per line (big_vision's bv:jsonl); image paths read as bytes."""

  def __init__(self, path: str, *, split: str | None = None, image_keys=("image",),
               base_dir: str | None = None):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"jsonl source: file not found: {path}")
    if isinstance(image_keys, str):
      image_keys = (image_keys,)
    self.path = os.path.abspath(path)
    self.image_keys = tuple(image_keys)
    self.base_dir = os.path.abspath(base_dir or os.path.dirname(self.path))
    name, start, stop = parse_split(split, f"jsonl source {path}")
    if name:
      raise ValueError(f"jsonl source {path}: split takes only a slice like '[:100]', got "
                       f"{split!r}")
    # Byte offsets of the non-empty lines: records are parsed lazily (bad lines are found,
    # and counted, when the stream reaches them) and workers pickle two small arrays.
    offsets, lengths, lines = [], [], []
    with open(self.path, "rb") as f:
      pos = 0
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          offsets.append(pos)
          lengths.append(len(line))
          lines.append(lineno)
        pos += len(line)
    lo, hi = slice_bounds(len(offsets), start, stop, f"jsonl source {path}")
    self._offsets = np.asarray(offsets[lo:hi], np.int64)
    self._lengths = np.asarray(lengths[lo:hi], np.int64)
    self._lines = np.asarray(lines[lo:hi], np.int64)
    self._first = lo  # Default ids count records of the whole file, whatever the slice.
    self._fd = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"] = None  # File descriptors do not travel to worker processes.
    return state

  def __len__(self) -> int:
    return len(self._offsets)

  def where(self, i: int) -> str:
    return f"{self.path}:{int(self._lines[i])}"

  def __getitem__(self, i: int) -> dict[str, Any]:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    # pread: thread-safe (grain reads with several threads), no shared file position.
    raw = os.pread(self._fd, int(self._lengths[i]), int(self._offsets[i]))
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ExampleError(f"malformed JSON line: {e}") from None
    if not isinstance(record, dict):
      raise ExampleError(f"a line must hold a JSON object, got {type(record).__name__}")
    for key in self.image_keys:
      if key not in record:
        raise ExampleError(f"missing field {key!r} (image_keys); the line has keys "
                           f"{sorted(record)}")
      if not isinstance(record[key], str):
        raise ExampleError(f"field {key!r} must be a file path string, got {record[key]!r:.80}")
      file = os.path.join(self.base_dir, record[key])
      try:
        with open(file, "rb") as f:
          record[key] = f.read()
      except FileNotFoundError:
        raise ExampleError(f"image file not found: {file}") from None
      except OSError as e:
        raise ExampleError(f"cannot read image file {file}: {e}") from None
    record.setdefault("id", self._first + int(i))
    return record


# ---------------------------------------------------------------------------------------------
# TFDS.
# ---------------------------------------------------------------------------------------------
def _tfrecord_offsets(filename: str) -> tuple[np.ndarray, np.ndarray]:
  """(offsets, lengths) of the records' payloads in a TFRecord file (headers only read)."""
  offsets, lengths = [], []
  with open(filename, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    pos = 0
    while pos < size:
      header = f.read(12)  # uint64 length, uint32 masked crc of the length.
      if len(header) < 12:
        raise ValueError(f"truncated TFRecord header at byte {pos} of {filename}")
      (length,) = struct.unpack("<Q", header[:8])
      offsets.append(pos + 12)
      lengths.append(length)
      pos += 12 + length + 4  # payload + uint32 masked crc of the payload.
      f.seek(pos)
    if pos != size:
      raise ValueError(f"TFRecord file {filename} ends inside a record (corrupt or truncated)")
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class TfdsSource:
  """A TFDS split by name (big_vision split syntax), read with random access."""

  def __init__(self, name: str, split: str, *, data_dir: str | None = None,
               skip_decode=("image",)):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self.name, self.split = name, split
    self.data_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or None
    builder = tfds.builder(name, data_dir=self.data_dir)
    self.skip_decode = tuple(k for k in skip_decode if k in builder.info.features)
    decoders = {k: tfds.decode.SkipDecoding() for k in self.skip_decode}
    self._features = None
    self._ds = None
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if builder.info.splits and fmt in (None, "tfrecord"):
      try:
        instructions = builder.info.splits[split].file_instructions
      except (KeyError, ValueError) as e:
        raise ValueError(f"tfds source {name}: bad split {split!r}: {e}") from None
      files, file_ids, offsets, lengths = [], [], [], []
      for ins in instructions:
        off, ln = _tfrecord_offsets(os.fspath(ins.filename))
        sel = slice(ins.skip, ins.skip + ins.take)
        files.append(os.fspath(ins.filename))
        file_ids.append(np.full(len(off[sel]), len(files) - 1, np.int32))
        offsets.append(off[sel])
        lengths.append(ln[sel])
      self._files = files
      self._file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
      self._offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
      self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
      self._features = builder.info.features
      self._decoders = decoders
      self._fds = {}
    else:  # array_record files, or tfds.testing.mock_data.
      try:
        self._ds = builder.as_data_source(split, decoders=decoders)
      except Exception as e:  # TFDS raises several types for "not prepared".
        raise ValueError(
            f"tfds source {name} split {split!r}: cannot open it ({type(e).__name__}: {e}). "
            f"Prepare it first with `tfds build {name.split(':')[0]}` (data_dir="
            f"{self.data_dir or '$TFDS_DATA_DIR or ~/tensorflow_datasets'})") from e

  def __getstate__(self):
    state = dict(self.__dict__)
    if "_fds" in state:
      state["_fds"] = {}
    return state

  def __len__(self) -> int:
    return len(self._ds) if self._ds is not None else len(self._offsets)

  def where(self, i: int) -> str:
    return f"tfds:{self.name}/{self.split}[{i}]"

  def __getitem__(self, i: int) -> dict[str, Any]:
    if self._ds is not None:
      return dict(self._ds[int(i)])
    fid = int(self._file_ids[i])
    fd = self._fds.get(fid)
    if fd is None:
      fd = self._fds[fid] = os.open(self._files[fid], os.O_RDONLY)
    raw = os.pread(fd, int(self._lengths[i]), int(self._offsets[i]))
    try:
      return dict(self._features.deserialize_example_np(raw, decoders=self._decoders))
    except Exception as e:  # A corrupt record: protobuf/decoder errors of many types.
      raise ExampleError(f"cannot parse the TFDS record: {type(e).__name__}: {e}") from None


def make_source(data: Mapping[str, Any]):
  """A source from a config's data dict (see the module docstring)."""
  data = dict(data)
  if "name" not in data or not isinstance(data["name"], str):
    raise ValueError(f"input data config needs name='demo' | 'jsonl' | 'tfds:<dataset>', "
                     f"got {data}")
  name = data.pop("name")
  try:
    if name == "demo":
      from big_vision_lite.data import demo  # pylint: disable=g-import-not-at-top
      return demo.DemoSource(**data)
    if name == "jsonl":
      return JsonlSource(**data)
    if name.startswith("tfds:"):
      name = name[len("tfds:"):]
    if "split" not in data:
      raise ValueError(f"tfds source {name}: needs split=")
    return TfdsSource(name, **data)
  except TypeError as e:  # Unknown/missing keyword: name the source and the keys.
    raise ValueError(f"input data config for {name!r}: {e}; got keys {sorted(data)}") from None
