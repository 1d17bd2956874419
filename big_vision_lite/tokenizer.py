"""SentencePiece tokenizer with PaliGemma's <loc>/<seg> pieces, and box/segment helpers.

PaliGemma's vocabulary is Gemma's (256000 pieces; pad 0, eos 1, bos 2, "\\n" 108) followed by
1024 location pieces `<loc0000>`..`<loc1023>` (ids base+0..1023) and 128 segmentation pieces
`<seg000>`..`<seg127>` (ids base+1024..1151): 257152 ids in all. `Tokenizer` appends those
pieces to any SentencePiece model that lacks them (as big_vision does for the plain Gemma
model), and checks their order in models that already have them (the PaliGemma tokenizer).

Box tokens are y1 x1 y2 x2, each `round(v * 1023)` clipped to [0, 1023], decoded as `t / 1023`.
"""
import io
import os
import re
from typing import Iterable, Sequence

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
  has_loc = [p in index for p in (LOC_PIECES[0], LOC_PIECES[-1])]
  has_seg = [p in index for p in (SEG_PIECES[0], SEG_PIECES[-1])]
  if not any(has_loc + has_seg):
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
    self._proto_bytes = _extend_proto(proto, where).SerializeToString()
    self._where = where
    self._sp = None
    sp = self.processor
    self._vocab_size = sp.get_piece_size()
    self._loc_offset = sp.piece_to_id(LOC_PIECES[0])
    self._seg_offset = sp.piece_to_id(SEG_PIECES[0])
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
    return self.processor.pad_id()

  @property
  def bos_id(self) -> int:
    return self.processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self.processor.eos_id()

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
    ids = [int(i) for i in ids]  # Also accepts numpy arrays.
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
    raise ValueError(f"train_sentencepiece: model_type must be 'bpe' or 'unigram', got {model_type!r}")
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
