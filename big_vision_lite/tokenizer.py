"""SentencePiece tokenizer with PaliGemma's <loc>/<seg> pieces, and box/segment helpers.

PaliGemma's vocabulary is Gemma's (256000 pieces; pad 0, eos 1, bos 2, "\\n" 108) followed by
1024 location pieces `<loc0000>`..`<loc1023>` (ids base+0..1023) and 128 segmentation pieces
`<seg000>`..`<seg127>` (ids base+1024..1151): 257152 ids in all. `Tokenizer` appends those
pieces to any SentencePiece model that lacks them (as big_vision does for the plain Gemma
model), and checks their order in models that already have them (the PaliGemma tokenizer).

Box tokens are y1 x1 y2 x2, each `round(v * 1023)` clipped to [0, 1023], decoded as `t / 1023`.
"""
import dataclasses
import io
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

NUM_LOC = 1024
NUM_SEG = 128
LOC_PIECES = tuple(f"<loc{i:04d}>" for i in range(NUM_LOC))
SEG_PIECES = tuple(f"<seg{i:03d}>" for i in range(NUM_SEG))

# Gemma's special ids; trained test models use the same so that batches look alike.
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3


def _extend_proto(proto: sp_pb2.ModelProto, where: str) -> sp_pb2.ModelProto:
  """Appends <loc>/<seg> as USER_DEFINED pieces, or checks the ones already there.

  USER_DEFINED pieces are matched greedily before segmentation, so "<loc0100>" inside text
  always becomes one id whatever the surrounding characters are.
  """
  index = {p.piece: i for i, p in enumerate(proto.pieces)}
  if not any(p in index for p in LOC_PIECES + SEG_PIECES):
    for piece in LOC_PIECES + SEG_PIECES:
      proto.pieces.add(piece=piece, score=0.0, type=sp_pb2.ModelProto.SentencePiece.USER_DEFINED)
    return proto
  for pieces in (LOC_PIECES, SEG_PIECES):
    if pieces[0] not in index:
      raise ValueError(f"SentencePiece model {where} has some <loc>/<seg> pieces but lacks "
                       f"{pieces[0]}: expected all 1024 <loc> and 128 <seg> pieces or none")
    start = index[pieces[0]]
    for k, piece in enumerate(pieces):
      if index.get(piece) != start + k:
        raise ValueError(
            f"SentencePiece model {where}: expected {piece} at id {start + k} (contiguous after "
            f"{pieces[0]} = {start}), found id {index.get(piece)}")
  if index[SEG_PIECES[0]] != index[LOC_PIECES[0]] + NUM_LOC:
    raise ValueError(f"SentencePiece model {where}: <seg000> must directly follow <loc1023> "
                     f"(id {index[LOC_PIECES[0]] + NUM_LOC}), found id {index[SEG_PIECES[0]]}")
  return proto


class Tokenizer:
  """A SentencePiece model with PaliGemma's <loc>/<seg> pieces (appended when absent).

  Picklable: only the serialized model travels; the processor is rebuilt lazily, so grain
  worker processes get a working copy cheaply.
  """

  def __init__(self, path_or_proto_bytes: "str | os.PathLike | bytes"):
    if isinstance(path_or_proto_bytes, (bytes, bytearray)):
      raw, where = bytes(path_or_proto_bytes), "<bytes>"
    else:
      where = os.fspath(path_or_proto_bytes)
      if not os.path.isfile(where):
        raise FileNotFoundError(f"SentencePiece model file not found: {where}")
      with open(where, "rb") as f:
        raw = f.read()
    proto = sp_pb2.ModelProto()
    try:
      proto.ParseFromString(raw)
    except Exception as e:  # protobuf raises DecodeError, a bare Exception subclass.
      raise ValueError(f"{where} is not a SentencePiece model (ModelProto): {e}") from e
    if not proto.pieces:
      raise ValueError(f"{where} is not a SentencePiece model: it has no pieces")
    num_pieces = len(proto.pieces)
    proto = _extend_proto(proto, where)
    # Already-extended models keep their exact bytes.
    self._proto_bytes = raw if len(proto.pieces) == num_pieces else proto.SerializeToString()
    self._where = where
    self._sp = None
    sp = self.processor
    self._vocab_size = sp.get_piece_size()
    self._loc_offset = sp.piece_to_id(LOC_PIECES[0])
    self._seg_offset = sp.piece_to_id(SEG_PIECES[0])
    self._pad_id, self._bos_id, self._eos_id = sp.pad_id(), sp.bos_id(), sp.eos_id()
    # A model shipping <loc> as NORMAL pieces would split them: check they stay atomic.
    probe = LOC_PIECES[0] + SEG_PIECES[-1] + LOC_PIECES[-1]
    got = sp.encode(probe)
    want = [self._loc_offset, self._seg_offset + NUM_SEG - 1, self._loc_offset + NUM_LOC - 1]
    if got != want:
      raise ValueError(f"SentencePiece model {where}: {probe!r} encodes to {got}, expected "
                       f"{want}; <loc>/<seg> pieces must be USER_DEFINED to stay atomic")

  # Pickling: keep the bytes, drop the C++ processor (not picklable).
  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sp"] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)

  def __repr__(self) -> str:
    return (f"Tokenizer({self._where!r}, vocab_size={self._vocab_size}, "
            f"loc_offset={self._loc_offset}, seg_offset={self._seg_offset})")

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The underlying sentencepiece processor (built on first use)."""
    if self._sp is None:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto_bytes)
    return self._sp

  @property
  def proto_bytes(self) -> bytes:
    """The serialized ModelProto, <loc>/<seg> pieces included (write it to get a .model)."""
    return self._proto_bytes

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def bos_id(self) -> int:
    return self._bos_id

  @property
  def eos_id(self) -> int:
    return self._eos_id

  @property
  def loc_offset(self) -> int:
    """Id of <loc0000>; <locNNNN> is loc_offset + NNNN."""
    return self._loc_offset

  @property
  def seg_offset(self) -> int:
    """Id of <seg000>; <segNNN> is seg_offset + NNN."""
    return self._seg_offset

  def is_loc(self, token_id: int) -> bool:
    return self._loc_offset <= token_id < self._loc_offset + NUM_LOC

  def is_seg(self, token_id: int) -> bool:
    return self._seg_offset <= token_id < self._seg_offset + NUM_SEG

  def id_to_piece(self, token_id: int) -> str:
    self._check_ids([token_id])
    return self.processor.id_to_piece(int(token_id))

  def piece_to_id(self, piece: str) -> int:
    """Id of `piece`; KeyError when the vocabulary lacks it (sentencepiece would give unk)."""
    token_id = self.processor.piece_to_id(piece)
    if token_id == self.processor.unk_id() and piece != self.processor.id_to_piece(token_id):
      raise KeyError(f"piece {piece!r} is not in the vocabulary of {self._where}")
    return token_id

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Text -> ids; <loc>/<seg> pieces inside the text become single ids."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
    return self.processor.encode(text, add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
    """Ids -> text: pad/bos dropped, text ends at the first eos (when stop_at_eos).

    <loc>/<seg> pieces come back as their text ("<loc0100>"); byte-fallback pieces are
    joined back into UTF-8 characters.
    """
    arr = np.asarray(ids)  # Also accepts numpy/jax arrays.
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
      raise ValueError(f"Tokenizer.decode expects int[T] ids, got {arr.dtype}{list(arr.shape)}")
    ids = arr.astype(np.int64).tolist()
    if stop_at_eos and self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    self._check_ids(ids)
    drop = {self.pad_id, self.bos_id, self.eos_id}
    return self.processor.decode([i for i in ids if i not in drop])

  def _check_ids(self, ids: Sequence[int]) -> None:
    bad = [i for i in ids if not 0 <= i < self._vocab_size]
    if bad:
      raise ValueError(f"token ids {bad[:5]} out of range [0, {self._vocab_size}) for the "
                       f"tokenizer {self._where}")


def train_sentencepiece(
    sentences: Iterable[str],
    out_path: "str | os.PathLike",
    vocab_size: int = 2048,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    hard_vocab_limit: bool = False,
    user_defined_symbols: Sequence[str] = (),
) -> str:
  """Trains a small SentencePiece model in-process, Gemma-style, with <loc>/<seg> appended.

  Like Gemma's model: pad 0, eos 1, bos 2, unk 3; "\\n" a single piece (id 4 here, 108 in
  Gemma); no normalization, no dummy prefix, whitespace kept, digits split, byte fallback,
  so any text round-trips through encode/decode. Deterministic (one thread): the same
  sentences give the same file bytes.

  Args:
    sentences: training text, one sentence per item.
    out_path: where to write the .model file (parent folders are created).
    vocab_size: size before the 1152 <loc>/<seg> pieces. With hard_vocab_limit=False (the
      default) it is an upper bound, so small corpora still train.
    model_type: "bpe" (as Gemma) or "unigram".
    byte_fallback: unknown characters become <0xNN> byte pieces instead of <unk>.
    hard_vocab_limit: fail unless exactly vocab_size pieces can be made.
    user_defined_symbols: extra atomic pieces (after "\\n").
  Returns:
    out_path as a str.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(
        f"train_sentencepiece: model_type must be 'bpe' or 'unigram', got {model_type!r}")
  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["\n", *user_defined_symbols], byte_fallback=byte_fallback,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        hard_vocab_limit=hard_vocab_limit, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    raise ValueError(f"train_sentencepiece (vocab_size={vocab_size}, model_type={model_type}) "
                     f"failed: {e}") from e
  tok = Tokenizer(writer.getvalue())
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "wb") as f:
    f.write(tok.proto_bytes)
  return out_path


# ---------------------------------------------------------------------------------------------
# Boxes, segment codes and model outputs as <loc>/<seg> text.
# ---------------------------------------------------------------------------------------------
_LOC_RE = re.compile(r"<loc(\d{4})>")
_LEADING_LOC_RE = re.compile(r"\s*<loc(\d{4})>")
_LEADING_SEG_RE = re.compile(r"\s*<seg(\d{3})>")


def _scale(image_size: "tuple[int, int] | None", what: str) -> np.ndarray:
  """float64[4] multiplier from normalised y1,x1,y2,x2 to pixels (ones when no image_size)."""
  if image_size is None:
    return np.ones(4)
  if len(image_size) != 2 or not all(s > 0 for s in image_size):
    raise ValueError(f"{what}: image_size must be (height, width) > 0, got {image_size!r}")
  h, w = image_size
  return np.array([h, w, h, w], np.float64)


def boxes_to_loc(boxes, *, image_size: "tuple[int, int] | None" = None) -> str:
  """Boxes -> "<locY1><locX1><locY2><locX2>" per box, concatenated.

  Args:
    boxes: float[4] or float[N, 4], y1 x1 y2 x2 normalised to [0, 1], or in pixels when
      image_size=(height, width) is given.
    image_size: (height, width) of the image the pixel boxes refer to.
  Returns:
    4 * N loc pieces; each coordinate is round(v * 1023) (half to even, as tf.round) clipped
    to [0, 1023].
  """
  arr = np.asarray(boxes, dtype=np.float64)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] != 4:
    raise ValueError(f"boxes_to_loc: boxes must be float[4] or float[N, 4] (y1, x1, y2, x2), "
                     f"got shape {np.shape(boxes)}")
  if not np.isfinite(arr).all():
    raise ValueError(f"boxes_to_loc: boxes must be finite, got {arr.tolist()}")
  bins = np.clip(np.round(arr / _scale(image_size, "boxes_to_loc") * (NUM_LOC - 1)),
                 0, NUM_LOC - 1).astype(np.int64)
  return "".join(LOC_PIECES[b] for b in bins.reshape(-1))


def loc_to_boxes(text_or_ids, *, image_size: "tuple[int, int] | None" = None,
                 loc_offset: "int | None" = None) -> np.ndarray:
  """Inverse of boxes_to_loc: every 4 loc pieces (other text/ids ignored) -> one box.

  Args:
    text_or_ids: str with <locNNNN> pieces, or token ids (then loc_offset is required).
    image_size: (height, width): return pixel boxes instead of normalised ones.
    loc_offset: id of <loc0000> (Tokenizer.loc_offset) when passing ids.
  Returns:
    float64[N, 4] y1 x1 y2 x2: t / 1023, times height/width when image_size is given.
  """
  if isinstance(text_or_ids, str):
    bins = [int(m) for m in _LOC_RE.findall(text_or_ids)]
    if any(b >= NUM_LOC for b in bins):
      raise ValueError(f"loc_to_boxes: loc pieces must be <loc0000>..<loc1023>, got bins {bins}")
  else:
    if loc_offset is None:
      raise ValueError("loc_to_boxes: pass loc_offset (Tokenizer.loc_offset) with token ids")
    bins = [int(i) - loc_offset for i in np.asarray(text_or_ids).reshape(-1)
            if 0 <= int(i) - loc_offset < NUM_LOC]
  if len(bins) % 4:
    raise ValueError(f"loc_to_boxes: {len(bins)} loc tokens is not a multiple of 4 "
                     f"(y1 x1 y2 x2 per box) in {text_or_ids!r}")
  boxes = np.asarray(bins, np.float64).reshape(-1, 4) / (NUM_LOC - 1)
  return boxes * _scale(image_size, "loc_to_boxes")


def seg_to_text(codes16) -> str:
  """16 VQ-VAE codebook indices in [0, 127] -> "<segNNN>" x 16."""
  codes = np.asarray(codes16)
  if codes.shape != (16,) or not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"seg_to_text: expected int[16] codebook indices, got {codes.dtype}"
                     f"{list(codes.shape)}")
  if codes.min() < 0 or codes.max() >= NUM_SEG:
    raise ValueError(f"seg_to_text: codes must be in [0, {NUM_SEG - 1}], got {codes.tolist()}")
  return "".join(SEG_PIECES[c] for c in codes)


@dataclasses.dataclass(frozen=True)
class DetectedObject:
  """One object parsed from model output ("<loc>x4 [<seg>x16] label").

  box and seg_codes are filled whenever they parsed, even when the object as a whole is not
  valid (for inspection); consumers should skip objects with valid=False.
  """
  box: "tuple[float, float, float, float] | None"  # y1 x1 y2 x2 in [0, 1].
  label: str
  seg_codes: "tuple[int, ...] | None"  # 16 codebook indices in [0, 127].
  valid: bool
  raw: str  # The object's text as it came (without the " ; " separators).

  def box_pixels(self, height: float, width: float) -> "tuple[float, float, float, float]":
    """(y1 * height, x1 * width, y2 * height, x2 * width)."""
    if self.box is None:
      raise ValueError(f"DetectedObject has no box (raw text {self.raw!r})")
    y1, x1, y2, x2 = self.box
    return (y1 * height, x1 * width, y2 * height, x2 * width)


def _parse_one(raw: str) -> DetectedObject:
  pos, locs, segs = 0, [], []
  for pattern, out in ((_LEADING_LOC_RE, locs), (_LEADING_SEG_RE, segs)):
    while m := pattern.match(raw, pos):
      out.append(int(m.group(1)))
      pos = m.end()
  label = raw[pos:].strip()
  box = None
  if len(locs) == 4 and max(locs) < NUM_LOC:
    box = tuple(b / (NUM_LOC - 1) for b in locs)
  seg_codes = tuple(segs) if len(segs) == 16 and max(segs) < NUM_SEG else None
  valid = (box is not None
           and (not segs or seg_codes is not None)
           # Zero-area boxes are invalid too, as in big_vision's segmentation evaluator.
           and locs[2] > locs[0] and locs[3] > locs[1]
           and bool(label) and "<loc" not in label and "<seg" not in label)
  return DetectedObject(box=box, label=label, seg_codes=seg_codes, valid=valid, raw=raw)


def parse_objects(text: str) -> list[DetectedObject]:
  """Parses detection/segmentation output: objects "<loc>x4 [<seg>x16] label" joined by " ; ".

  Spaces around pieces and separators are optional. Never raises on model output: anything
  that is not 4 in-range locs (y2 > y1, x2 > x1), then 0 or 16 segs, then a non-empty label
  free of further <loc>/<seg> pieces gives an entry with valid=False. Empty pieces between
  separators (e.g. a trailing ";") are skipped; an empty string gives [].
  """
  if not isinstance(text, str):
    raise TypeError(f"parse_objects expects the decoded str, got {type(text).__name__}")
  return [_parse_one(chunk.strip()) for chunk in text.split(";") if chunk.strip()]


def objects_to_text(boxes, labels: Sequence[str], *, seg_codes=None,
                    image_size: "tuple[int, int] | None" = None) -> str:
  """Training target in PaliGemma's format (the inverse of parse_objects).

  Args:
    boxes: float[N, 4] y1 x1 y2 x2 (normalised, or pixels with image_size).
    labels: N labels (without ";", which separates objects).
    seg_codes: optional int[N, 16] codebook indices.
    image_size: (height, width) when boxes are in pixels.
  Returns:
    "<loc>x4 [<seg>x16] label ; ..." ("" for N = 0).
  """
  boxes = np.asarray(boxes, np.float64)
  if boxes.size == 0:
    boxes = boxes.reshape(0, 4)
  if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(labels):
    raise ValueError(f"objects_to_text: boxes must be float[N, 4] for N = {len(labels)} labels, "
                     f"got shape {boxes.shape}")
  if seg_codes is not None and len(seg_codes) != len(labels):
    raise ValueError(f"objects_to_text: {len(seg_codes)} seg_codes but {len(labels)} labels")
  parts = []
  for i, (box, label) in enumerate(zip(boxes, labels)):
    if ";" in label or not label.strip():
      raise ValueError(f"objects_to_text: label {i} ({label!r}) must be non-empty without ';'")
    segs = "" if seg_codes is None else seg_to_text(seg_codes[i])
    parts.append(f"{boxes_to_loc(box, image_size=image_size)}{segs} {label}")
  return " ; ".join(parts)
