"""Tests for big_vision_lite/tokenizer.py on a tiny SentencePiece model trained here."""
import pickle
import random

import pytest
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from big_vision_lite import tokenizer as tk

WORDS = ("the a cat dog person sat on mat red blue green big small runs jumps over under "
         "house tree car detect segment caption answer en what is in this image 0 1 2 42").split()


def _corpus(n=3000, seed=0):
  rng = random.Random(seed)
  out = []
  for i in range(n):
    s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
    out.append(s + "\n" + rng.choice(WORDS) if i % 7 == 0 else s)
  return out


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
  return tk.train_sentencepiece(_corpus(), tmp_path_factory.mktemp("spm") / "tiny.model", 1024)


@pytest.fixture(scope="session")
def tok(model_path):
  return tk.Tokenizer(model_path)


def test_special_and_appended_ids(tok):
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.id_to_piece(3) == "<unk>"
  base = tok.vocab_size - 1024 - 128
  assert tok.loc_offset == base and tok.seg_offset == base + 1024
  assert tok.piece_to_id("<loc0000>") == base
  assert tok.piece_to_id("<loc1023>") == base + 1023
  assert tok.piece_to_id("<seg000>") == base + 1024
  assert tok.piece_to_id("<seg127>") == tok.vocab_size - 1
  assert tok.id_to_piece(base + 517) == "<loc0517>"
  assert tok.is_loc(base) and tok.is_loc(base + 1023) and not tok.is_loc(base + 1024)
  assert tok.is_seg(base + 1024) and not tok.is_seg(base + 1023) and not tok.is_seg(tok.vocab_size)
  with pytest.raises(KeyError, match="not in the vocabulary"):
    tok.piece_to_id("<loc9999>")


def test_newline_is_one_piece(tok):
  assert tok.encode("\n") == [tok.piece_to_id("\n")]
  assert tok.encode("a\nb") == tok.encode("a") + tok.encode("\n") + tok.encode("b")


def test_loc_seg_atomic_inside_text(tok):
  ids = tok.encode("<loc0100><loc0200> cat")
  assert ids == [tok.loc_offset + 100, tok.loc_offset + 200] + tok.encode(" cat")
  ids = tok.encode("x<seg005>y<loc1023>")
  assert ids == tok.encode("x") + [tok.seg_offset + 5] + tok.encode("y") + [tok.loc_offset + 1023]


@pytest.mark.parametrize("text", [
    "a cat sat on the mat", "  two  spaces  ", "line one\nline two\n", "",
    "café naïve 猫 ünïcödé 🙂", "<loc0001><loc0002><loc1000><loc1023> dog ; <seg127> x",
])
def test_round_trip(tok, text):
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode(text, add_bos=True, add_eos=True)) == text


def test_unicode_uses_byte_fallback(tok):
  ids = tok.encode("猫")
  assert [tok.id_to_piece(i) for i in ids] == ["<0xE7>", "<0x8C>", "<0xAB>"]
  assert tok.processor.unk_id() not in ids


def test_decode_drops_specials_and_stops_at_eos(tok):
  cat = tok.encode("cat")
  ids = [tok.bos_id] + cat + [tok.loc_offset + 7, tok.eos_id] + tok.encode("dog") + [0, 0]
  assert tok.decode(ids) == "cat<loc0007>"
  assert tok.decode(ids, stop_at_eos=False) == "cat<loc0007>dog"
  assert tok.encode("cat", add_bos=True, add_eos=True) == [2] + cat + [1]
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])


def test_pickle_round_trip(tok):
  tok.encode("warm up")  # The processor exists before pickling.
  tok2 = pickle.loads(pickle.dumps(tok))
  assert tok2._sp is None  # Rebuilt lazily.
  text = "<loc0010> a red car\nend"
  assert tok2.encode(text) == tok.encode(text)
  assert (tok2.vocab_size, tok2.loc_offset, tok2.seg_offset) == (
      tok.vocab_size, tok.loc_offset, tok.seg_offset)


def test_extended_model_passes_through(tok, model_path, tmp_path):
  again = tk.Tokenizer(tok.proto_bytes)
  assert again.proto_bytes == tok.proto_bytes
  assert again.vocab_size == tok.vocab_size and again.loc_offset == tok.loc_offset
  with open(model_path, "rb") as f:
    assert f.read() == tok.proto_bytes  # train_sentencepiece already wrote the extended model.


def test_misordered_or_partial_pieces_rejected(tok):
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(tok.proto_bytes)
  a, b = tok.loc_offset + 3, tok.loc_offset + 4
  proto.pieces[a].piece, proto.pieces[b].piece = "<loc0004>", "<loc0003>"
  with pytest.raises(ValueError, match="expected <loc0003> at id"):
    tk.Tokenizer(proto.SerializeToString())
  proto.ParseFromString(tok.proto_bytes)
  del proto.pieces[tok.seg_offset:]
  with pytest.raises(ValueError, match="lacks <seg000>"):
    tk.Tokenizer(proto.SerializeToString())


def test_bad_inputs(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tk.Tokenizer(tmp_path / "nope.model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tk.Tokenizer(b"\x00garbage\xff")
  with pytest.raises(ValueError, match="model_type"):
    tk.train_sentencepiece(["a"], tmp_path / "x.model", model_type="wordpiece")


def test_train_is_deterministic(tmp_path, model_path):
  p = tk.train_sentencepiece(_corpus(), tmp_path / "again.model", 1024)
  with open(p, "rb") as f1, open(model_path, "rb") as f2:
    assert f1.read() == f2.read()
