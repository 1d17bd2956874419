"""Hugging Face PaliGemma folders <-> big_vision params (checkpoints.load / save use this).

Read: `config.json` (PaliGemmaConfig; text_config gemma or gemma2, vision_config
siglip_vision_model) and `model.safetensors` or a sharded `model.safetensors.index.json`.
Three key styles are accepted: the files of transformers 5 (`language_model.model.*`,
`vision_tower.*`, `multi_modal_projector.*`), the hub checkpoints of transformers 4
(`vision_tower.vision_model.*`), and transformers 5's in-memory names (`model.language_model.*`,
`model.vision_tower.*`, `model.multi_modal_projector.*`, `lm_head.weight`). A stored lm_head
must equal the token table (PaliGemma ties them); it is then ignored.

Mapping (HF Linear weights are [out, in]; head-major rows): q_proj [N*H,D] -> q_einsum/w
[N,D,H]; k/v_proj [K*H,D] -> kv_einsum/w [2,K,D,H] (qkv_einsum/w [3,N,D,H] when K == N);
o_proj [D,N*H] -> attn_vec_einsum/w [N,H,D]; gate/up_proj [F,D] -> gating_einsum [2,D,F];
down_proj [D,F] -> linear [F,D]; Gemma 1 post_attention_layernorm is big_vision's
pre_ffw_norm, Gemma 2's is post_attention_norm (+ pre/post_feedforward_layernorm). SigLIP:
patch_embedding [W,3,P,P] -> HWIO kernel; q/k/v_proj [W,W] -> [W,nh,hd]; out_proj ->
[nh,hd,W]; fc1/fc2 -> Dense_0/1; layer_norm1/2 -> LayerNorm_0/1; post_layernorm ->
encoder_norm; position_embedding [N,W] -> [1,N,W]; multi_modal_projector.linear -> img/head.

Vocabulary: an HF table has text_config.vocab_size rows with `<image>` (image_token_index)
among them; big_vision's table has no `<image>` row. save_hf writes the big_vision rows, then
zero rows up to a multiple of 64 with at least one extra row (`<image>` = the big_vision
vocab size: 257152 -> 257216 as the official checkpoints). Reading keeps every HF row (logits
then match HF) EXCEPT when all rows from image_token_index on are exactly zero (all bits 0):
that is our own padding, which is dropped, so npz -> hf -> npz is bit-exact.

Safetensors are read and written here directly (8-byte header length, JSON header, raw
little-endian data): tensor by tensor with plain file reads into preallocated arrays, so
neither a whole file nor an mmap of it is ever resident.
"""
from collections.abc import Callable, Iterator, Mapping
import dataclasses
import json
import math
import os
import pathlib
import struct
import sys
from typing import Any

import numpy as np

from big_vision_lite import checkpoints as ckpt
from big_vision_lite import checkpoints_config as cc
from big_vision_lite.models import gemma
from big_vision_lite.models import siglip

_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": ckpt.BFLOAT16,
              "F64": np.dtype(np.float64)}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_EMBED = "language_model.model.embed_tokens.weight"
_LM_HEAD = "lm_head.weight"
_INDEX = "model.safetensors.index.json"

# ---------------------------------------------------------------------------------------
# safetensors, streamed.

class SafetensorsFile:
  """Header of one .safetensors file; `read` fetches one tensor (or a range of its rows)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
      if not 2 <= n <= min(size - 8, 1 << 28):
        raise ValueError(f"{path}: not a safetensors file (or truncated): bad header length")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file: its header is not JSON ({e})") from e
    header.pop("__metadata__", None)
    self.entries: dict[str, tuple[cc.Shape, np.dtype, int]] = {}
    for key, e in header.items():
      if e.get("dtype") not in _ST_DTYPES:
        raise ValueError(f"{path}: tensor {key} has dtype {e.get('dtype')}; expected one of "
                         f"{sorted(_ST_DTYPES)}")
      dtype, shape = _ST_DTYPES[e["dtype"]], tuple(e["shape"])
      begin, end = e["data_offsets"]
      if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: tensor {key}: {end - begin} bytes for {e['dtype']}{list(shape)}")
      if 8 + n + end > size:
        raise ValueError(f"{path}: truncated: tensor {key} ends at byte {8 + n + end}, the file "
                         f"has {size}")
      self.entries[key] = (shape, dtype, 8 + n + begin)
    self._file = open(path, "rb")  # pylint: disable=consider-using-with

  def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    shape, dtype, offset = self.entries[key]
    if rows is not None:
      offset += rows[0] * math.prod(shape[1:]) * dtype.itemsize
      shape = (rows[1] - rows[0],) + shape[1:]
    out = np.empty(shape, dtype)
    self._file.seek(offset)
    if self._file.readinto(out.reshape(-1).view(np.uint8)) != out.nbytes:
      raise ValueError(f"{self.path}: truncated while reading {key}")
    return out

  def close(self) -> None:
    self._file.close()


def write_safetensors(path: str, plan: list[tuple[str, cc.Shape, np.dtype]],
                      arrays: Iterator[np.ndarray | tuple[np.ndarray, ...]]) -> None:
  """Writes the tensors of `plan` in order, taking each one's data from `arrays` (an array
  or a tuple of row chunks) only when it is written."""
  if sys.byteorder != "little":
    raise NotImplementedError("safetensors are little-endian; writing from a big-endian host")
  header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
  offset = 0
  for name, shape, dtype in plan:
    nbytes = math.prod(shape) * dtype.itemsize
    header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path + ".tmp", "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dtype in plan:
      chunks = next(arrays)
      chunks = chunks if isinstance(chunks, tuple) else (chunks,)
      rows = sum(c.shape[0] for c in chunks) if shape else None
      if any(c.dtype != dtype or c.shape[1:] != shape[1:] for c in chunks) or (
          shape and rows != shape[0]):
        raise AssertionError(f"{name}: data {[c.shape for c in chunks]} does not match {shape}")
      for c in chunks:
        f.write(np.ascontiguousarray(c).reshape(-1).view(np.uint8).data)
  os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------
# The mapping.

@dataclasses.dataclass(frozen=True)
class _Rule:
  hf: str  # key in the files transformers 5 writes
  bv: str  # scanned-layout big_vision name
  index: tuple[int, ...]  # part of the bv array this tensor fills: () all, (layer,), (layer, slot)
  shape: cc.Shape  # HF tensor shape
  to_bv: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
  return x


def _t(x):
  return x.T


def _rules(img: Mapping[str, Any], llm: Mapping[str, Any], vocab_rows: int) -> list[_Rule]:
  """Every HF tensor of a PaliGemma with these (resolved) configs, and how it maps."""
  rules = []

  def add(hf, bv, index, shape, to_bv=_same, to_hf=_same):
    rules.append(_Rule(hf, bv, index, tuple(shape), to_bv, to_hf))

  d, n, k, h, f = (llm[x] for x in ("width", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"))

  def heads(num):  # [num*H, D] <-> [num, D, H]
    return (lambda w: w.reshape(num, h, d).transpose(0, 2, 1),
            lambda x: x.transpose(0, 2, 1).reshape(num * h, d))

  lm, la = "language_model.model.", "llm/layers/"
  add(_EMBED, "llm/embedder/input_embedding", (), (vocab_rows, d))
  add(lm + "norm.weight", "llm/final_norm/scale", (), (d,))
  norms = {"input_layernorm": "pre_attention_norm"}
  if llm["post_norms"]:
    norms.update(post_attention_layernorm="post_attention_norm",
                 pre_feedforward_layernorm="pre_ffw_norm", post_feedforward_layernorm="post_ffw_norm")
  else:
    norms["post_attention_layernorm"] = "pre_ffw_norm"
  for i in range(llm["depth"]):
    p = f"{lm}layers.{i}."
    for hf_norm, bv_norm in norms.items():
      add(f"{p}{hf_norm}.weight", f"{la}{bv_norm}/scale", (i,), (d,))
    if k == n:
      for slot, x in enumerate("qkv"):
        add(f"{p}self_attn.{x}_proj.weight", f"{la}attn/qkv_einsum/w", (i, slot), (n * h, d), *heads(n))
    else:
      add(f"{p}self_attn.q_proj.weight", f"{la}attn/q_einsum/w", (i,), (n * h, d), *heads(n))
      for slot, x in enumerate("kv"):
        add(f"{p}self_attn.{x}_proj.weight", f"{la}attn/kv_einsum/w", (i, slot), (k * h, d), *heads(k))
    add(f"{p}self_attn.o_proj.weight", f"{la}attn/attn_vec_einsum/w", (i,), (d, n * h),
        lambda w: w.T.reshape(n, h, d), lambda x: x.reshape(n * h, d).T)
    add(f"{p}mlp.gate_proj.weight", f"{la}mlp/gating_einsum", (i, 0), (f, d), _t, _t)
    add(f"{p}mlp.up_proj.weight", f"{la}mlp/gating_einsum", (i, 1), (f, d), _t, _t)
    add(f"{p}mlp.down_proj.weight", f"{la}mlp/linear", (i,), (d, f), _t, _t)

  w, nh, m, (p0, p1) = img["width"], img["num_heads"], img["mlp_dim"], img["patch_size"]
  hd, size = w // nh, img["image_size"]
  add("vision_tower.embeddings.patch_embedding.weight", "img/embedding/kernel", (), (w, 3, p0, p1),
      lambda x: x.transpose(2, 3, 1, 0), lambda x: x.transpose(3, 2, 0, 1))
  add("vision_tower.embeddings.patch_embedding.bias", "img/embedding/bias", (), (w,))
  add("vision_tower.embeddings.position_embedding.weight", "img/pos_embedding", (),
      ((size // p0) * (size // p1), w), lambda x: x[None], lambda x: x[0])
  for i in range(img["depth"]):
    p, b = f"vision_tower.encoder.layers.{i}.", cc.IMG_BLOCK + "/"
    for j in (0, 1):
      add(f"{p}layer_norm{j + 1}.weight", f"{b}LayerNorm_{j}/scale", (i,), (w,))
      add(f"{p}layer_norm{j + 1}.bias", f"{b}LayerNorm_{j}/bias", (i,), (w,))
    a = f"{b}MultiHeadDotProductAttention_0/"
    for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
      add(f"{p}self_attn.{x}_proj.weight", f"{a}{name}/kernel", (i,), (w, w),
          lambda y: y.T.reshape(w, nh, hd), lambda y: y.reshape(w, w).T)
      add(f"{p}self_attn.{x}_proj.bias", f"{a}{name}/bias", (i,), (w,),
          lambda y: y.reshape(nh, hd), lambda y: y.reshape(w))
    add(f"{p}self_attn.out_proj.weight", f"{a}out/kernel", (i,), (w, w),
        lambda y: y.T.reshape(nh, hd, w), lambda y: y.reshape(w, w).T)
    add(f"{p}self_attn.out_proj.bias", f"{a}out/bias", (i,), (w,))
    for j in (0, 1):
      shape = (m, w) if j == 0 else (w, m)
      add(f"{p}mlp.fc{j + 1}.weight", f"{b}MlpBlock_0/Dense_{j}/kernel", (i,), shape, _t, _t)
      add(f"{p}mlp.fc{j + 1}.bias", f"{b}MlpBlock_0/Dense_{j}/bias", (i,), shape[:1])
  add("vision_tower.post_layernorm.weight", "img/Transformer/encoder_norm/scale", (), (w,))
  add("vision_tower.post_layernorm.bias", "img/Transformer/encoder_norm/bias", (), (w,))
  add("multi_modal_projector.linear.weight", "img/head/kernel", (), (d, w), _t, _t)
  add("multi_modal_projector.linear.bias", "img/head/bias", (), (d,))
  return rules


def normalize_key(key: str) -> str:
  """Any accepted key style -> the names transformers 5 writes to files (and save_hf writes)."""
  if key in ("lm_head.weight", "language_model.lm_head.weight"):
    return _LM_HEAD
  if key.startswith("model.language_model."):
    key = "language_model.model." + key[len("model.language_model."):]
  elif key.startswith("model."):
    key = key[len("model."):]
  if key.startswith("vision_tower.vision_model."):
    key = "vision_tower." + key[len("vision_tower.vision_model."):]
  return key


# ---------------------------------------------------------------------------------------
# Reading.

def _read_json(path: pathlib.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: unreadable JSON: {e}") from e


def _weight_files(folder: pathlib.Path) -> list[str]:
  if (folder / _INDEX).is_file():
    weight_map = _read_json(folder / _INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise ValueError(f"{folder / _INDEX}: no weight_map")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not (folder / name).is_file():
        raise ValueError(f"{folder / _INDEX}: names shard {name}, which does not exist")
    return [str(folder / name) for name in files]
  if (folder / "model.safetensors").is_file():
    return [str(folder / "model.safetensors")]
  raise ValueError(f"{folder}: has config.json but neither model.safetensors nor {_INDEX} "
                   "(PyTorch .bin weights are not read: they are pickles)")


class HfReader(ckpt.Reader):
  """A Hugging Face PaliGemma folder, read tensor by tensor."""

  def __init__(self, path: str):
    self.path = path
    folder = pathlib.Path(path)
    self._files = []
    self._tensors: dict[str, tuple[SafetensorsFile, str]] = {}
    try:
      self._open(folder)
    except BaseException:
      self.close()
      raise

  def _open(self, folder: pathlib.Path) -> None:
    config, image_token_index = cc.config_from_hf(_read_json(folder / "config.json"),
                                               str(folder / "config.json"))
    for file in _weight_files(folder):
      self._files.append(st := SafetensorsFile(file))
      for key in st.entries:
        if (norm := normalize_key(key)) in self._tensors:
          raise ValueError(f"{self.path}: {key} and {self._tensors[norm][1]} are the same tensor")
        self._tensors[norm] = (st, key)
    if _EMBED not in self._tensors:
      raise ValueError(f"{self.path}: no token table ({_EMBED}): not a PaliGemma checkpoint")
    rows = self._shape(_EMBED)[0]
    if rows != config["llm"]["vocab_size"]:
      raise ValueError(f"{self.path}: {_EMBED} has {rows} rows, text_config.vocab_size is "
                       f"{config['llm']['vocab_size']}")
    self._rows = rows
    if 0 <= image_token_index < rows:
      tail = self._read(_EMBED, (image_token_index, rows))
      if not tail.view(f"u{tail.dtype.itemsize}").any():  # bit-exact zeros: our padding.
        self._rows = image_token_index
    config["llm"]["vocab_size"] = self._rows
    img, llm = siglip.resolve_config(config["img"]), gemma.resolve_config(config["llm"])
    self._rules: dict[str, list[_Rule]] = {}
    for rule in _rules(img, llm, rows):
      self._rules.setdefault(rule.bv, []).append(rule)
      if rule.hf not in self._tensors:
        raise ValueError(f"{self.path}: tensor {rule.hf} {list(rule.shape)} (required by "
                         "config.json) is missing")
      if self._shape(rule.hf) != rule.shape:
        raise ValueError(f"{self.path}: tensor {rule.hf}: the file has shape "
                         f"{list(self._shape(rule.hf))}, config.json implies {list(rule.shape)}")
    known = {r.hf for rs in self._rules.values() for r in rs} | {_LM_HEAD}
    unexpected = sorted(set(self._tensors) - known)
    if unexpected:
      raise ValueError(f"{self.path}: unexpected tensor(s) {unexpected[:5]} for this config.json")
    expected = cc.param_shapes(config)
    self.shapes = {}
    for bv, rules in self._rules.items():
      dtypes = {self._tensors[r.hf][0].entries[self._tensors[r.hf][1]][1] for r in rules}
      if len(dtypes) > 1:
        raise ValueError(f"{self.path}: the tensors of {bv} have different dtypes {dtypes}")
      self.shapes[bv] = (expected[bv], dtypes.pop())
    for tower in config:
      config[tower]["param_dtype"] = cc.stored_dtype(self.shapes, tower)
    self.config = config

  def _shape(self, name: str) -> cc.Shape:
    st, key = self._tensors[name]
    return st.entries[key][0]

  def _read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
    st, key = self._tensors[name]
    return st.read(key, rows)

  def read(self, name: str) -> np.ndarray:
    rules = self._rules[name]
    if rules[0].index == ():  # one tensor: no preallocation, no second copy unless transposed.
      rows = (0, self._rows) if name == "llm/embedder/input_embedding" else None
      array = self._read(rules[0].hf, rows)
      if rows and _LM_HEAD in self._tensors:
        if self._shape(_LM_HEAD) != self._shape(_EMBED) or not np.array_equal(
            self._read(_LM_HEAD, rows).view(np.uint8), array.view(np.uint8)):
          raise ValueError(f"{self.path}: lm_head.weight differs from the token table; untied "
                           "output embeddings are not supported")
      return np.ascontiguousarray(rules[0].to_bv(array))
    shape, dtype = self.shapes[name]
    out = np.empty(shape, dtype)
    for rule in rules:
      out[rule.index] = rule.to_bv(self._read(rule.hf))
    return out

  def close(self) -> None:
    for st in self._files:
      st.close()


# ---------------------------------------------------------------------------------------
# Writing.

def save_hf(path: str, model_config: cc.ModelConfig,
            arrays: Mapping[str, tuple[cc.Shape, np.dtype, Callable[[], np.ndarray]]], *,
            max_shard_bytes: int, image_token_index: int | None) -> None:
  """Writes an HF PaliGemma folder: config.json, generation_config.json, safetensors weights.

  `image_token_index` (default: the big_vision vocab size, i.e. an appended `<image>` row)
  may name an existing row, for tables that came from HF with their `<image>` row. Files
  larger than `max_shard_bytes` are split into model-0000i-of-0000n.safetensors shards with
  an index. Earlier weight files in the folder are removed.
  """
  img = siglip.resolve_config(model_config["img"])
  llm = gemma.resolve_config(model_config["llm"])
  vocab = llm["vocab_size"]
  index = vocab if image_token_index is None else image_token_index
  if not 0 <= index <= vocab:
    raise ValueError(f"save hf: image_token_index={index} must lie in [0, vocab_size={vocab}]")
  rows = max(vocab, -(-(index + 1) // 64) * 64)
  dtypes = {dtype for _, dtype, _ in arrays.values()}
  config = cc.hf_config(model_config, index, rows, dtypes.pop() if len(dtypes) == 1 else "float32")
  config["dtype"] = str(config["dtype"])

  groups: dict[str, list[_Rule]] = {}
  for rule in _rules(img, llm, rows):
    groups.setdefault(rule.bv, []).append(rule)
  plan = [(r.hf, r.shape, arrays[bv][1]) for bv in sorted(groups) for r in groups[bv]]

  def tensors():
    for bv in sorted(groups):
      array = arrays[bv][2]()
      for rule in groups[bv]:
        if bv == "llm/embedder/input_embedding":
          yield (array, np.zeros((rows - vocab, array.shape[1]), array.dtype))
        else:
          yield rule.to_hf(array[rule.index])
      del array

  shards, size = [[]], 0
  for entry in plan:
    nbytes = math.prod(entry[1]) * entry[2].itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(entry)
    size += nbytes
  folder = pathlib.Path(path)
  folder.mkdir(parents=True, exist_ok=True)
  for old in [*folder.glob("model-*-of-*.safetensors"), folder / "model.safetensors", folder / _INDEX]:
    old.unlink(missing_ok=True)
  stream = tensors()
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for name, shard in zip(names, shards):
    write_safetensors(str(folder / name), shard, stream)
  if len(shards) > 1:
    total = sum(math.prod(s) * d.itemsize for _, s, d in plan)
    weight_map = {key: name for name, shard in zip(names, shards) for key, _, _ in shard}
    (folder / _INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  (folder / "config.json").write_text(json.dumps(config, indent=2))
  (folder / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}, indent=2))
