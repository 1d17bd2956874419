"""Tests for big_vision_lite/tokenizer.py on a tiny SentencePiece model trained here."""
import pickle
import random

import numpy as np
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
  assert tok.decode(np.asarray(ids, np.int32)) == "cat<loc0007>"
  assert tok.decode(ids, stop_at_eos=False) == "cat<loc0007>dog"
  assert tok.encode("cat", add_bos=True, add_eos=True) == [2] + cat + [1]
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([tok.vocab_size])
  with pytest.raises(ValueError, match=r"int\[T\]"):
    tok.decode(np.zeros((2, 3), np.int32))


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


def test_non_atomic_pieces_rejected(tok):
  proto = sp_pb2.ModelProto()
  proto.ParseFromString(tok.proto_bytes)
  for p in proto.pieces[tok.loc_offset:]:
    p.type = sp_pb2.ModelProto.SentencePiece.NORMAL
  with pytest.raises(ValueError, match="USER_DEFINED"):
    tk.Tokenizer(proto.SerializeToString())


def test_unigram_model(tmp_path):
  t = tk.Tokenizer(tk.train_sentencepiece(_corpus(500), tmp_path / "u.model", 512,
                                          model_type="unigram"))
  assert (t.pad_id, t.eos_id, t.bos_id) == (0, 1, 2)
  assert t.encode("<seg001>\ncat") == [t.seg_offset + 1, t.piece_to_id("\n")] + t.encode("cat")
  assert t.decode(t.encode("über <loc0042> cat\n")) == "über <loc0042> cat\n"


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


# --- boxes <-> loc ---------------------------------------------------------------------------

def test_boxes_to_loc_normalised_rounding_and_clipping():
  # 0.5 * 1023 = 511.5 -> 512 (half to even, as tf.round); 0.25 * 1023 = 255.75 -> 256;
  # 1.0 -> 1023; values outside [0, 1] are clipped.
  assert tk.boxes_to_loc([0.5, 0.25, 1.0, 0.0]) == "<loc0512><loc0256><loc1023><loc0000>"
  assert tk.boxes_to_loc([-0.2, 1.7, 0.1, 0.0004]) == "<loc0000><loc1023><loc0102><loc0000>"
  two = tk.boxes_to_loc([[0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]])
  assert two == "<loc0000><loc0000><loc1023><loc1023><loc0102><loc0205><loc0307><loc0409>"


def test_boxes_to_loc_pixels():
  # H=200, W=400: y 50/200=0.25 -> 256, x 100/400 -> 256, y 200/200 -> 1023, x 300/400=0.75 -> 767
  assert tk.boxes_to_loc([50, 100, 200, 300], image_size=(200, 400)) == (
      "<loc0256><loc0256><loc1023><loc0767>")


def test_loc_to_boxes_1023_convention():
  boxes = tk.loc_to_boxes("<loc0512><loc0000><loc1023><loc0256> cat")
  np.testing.assert_allclose(boxes, [[512 / 1023, 0.0, 1.0, 256 / 1023]])
  assert boxes[0, 0] == pytest.approx(0.50048876)  # 0.5 -> 512 -> 0.5005 (not 0.5).
  pix = tk.loc_to_boxes("<loc0512><loc0000><loc1023><loc0256>", image_size=(100, 300))
  np.testing.assert_allclose(pix, [[51200 / 1023, 0.0, 100.0, 76800 / 1023]])
  assert tk.loc_to_boxes("no boxes").shape == (0, 4)


def test_loc_round_trip_within_half_bin():
  rng = np.random.default_rng(0)
  boxes = rng.uniform(0, 1, (50, 4))
  back = tk.loc_to_boxes(tk.boxes_to_loc(boxes))
  assert np.abs(back - boxes).max() <= 0.5 / 1023 + 1e-12


def test_loc_to_boxes_from_ids(tok):
  ids = tok.encode("dog <loc0001><loc0002><loc0003><loc0004> x")
  np.testing.assert_allclose(tk.loc_to_boxes(ids, loc_offset=tok.loc_offset),
                             [[1 / 1023, 2 / 1023, 3 / 1023, 4 / 1023]])
  with pytest.raises(ValueError, match="loc_offset"):
    tk.loc_to_boxes(ids)


def test_box_helpers_bad_input():
  with pytest.raises(ValueError, match=r"float\[N, 4\]"):
    tk.boxes_to_loc([0.1, 0.2, 0.3])
  with pytest.raises(ValueError, match="finite"):
    tk.boxes_to_loc([0.1, float("nan"), 0.3, 0.4])
  with pytest.raises(ValueError, match="image_size"):
    tk.boxes_to_loc([1, 2, 3, 4], image_size=(0, 10))
  with pytest.raises(ValueError, match="multiple of 4"):
    tk.loc_to_boxes("<loc0001><loc0002><loc0003>")
  with pytest.raises(ValueError, match="<loc1023>"):
    tk.loc_to_boxes("<loc0001><loc0002><loc0003><loc2000>")


def test_seg_to_text(tok):
  text = tk.seg_to_text(np.arange(16) * 8 + 7)
  assert text.startswith("<seg007><seg015>") and text.endswith("<seg127>")
  assert tok.encode(text) == [tok.seg_offset + 8 * k + 7 for k in range(16)]
  with pytest.raises(ValueError, match=r"int\[16\]"):
    tk.seg_to_text(range(15))
  with pytest.raises(ValueError, match=r"\[0, 127\]"):
    tk.seg_to_text([128] * 16)


# --- parse_objects ---------------------------------------------------------------------------

L = lambda *bins: "".join(f"<loc{b:04d}>" for b in bins)  # noqa: E731
S = lambda *codes: "".join(f"<seg{c:03d}>" for c in codes)  # noqa: E731


def test_parse_detection_and_segmentation():
  text = f"{L(100, 200, 300, 400)} cat ; {L(0, 0, 1023, 1023)}{S(*range(16))} hot dog"
  a, b = tk.parse_objects(text)
  assert a == tk.DetectedObject(box=(100 / 1023, 200 / 1023, 300 / 1023, 400 / 1023),
                                label="cat", seg_codes=None, valid=True,
                                raw=f"{L(100, 200, 300, 400)} cat")
  assert b.valid and b.label == "hot dog" and b.box == (0.0, 0.0, 1.0, 1.0)
  assert b.seg_codes == tuple(range(16))
  assert a.box_pixels(1023, 2046) == pytest.approx((100, 400, 300, 800))


def test_parse_tolerates_spacing():
  want = [("cat", (1, 2, 3, 4)), ("dog", (5, 6, 7, 8))]
  for text in [f"{L(1, 2, 3, 4)}cat;{L(5, 6, 7, 8)}dog",
               f"  {L(1, 2)} {L(3, 4)}   cat  ;   {L(5, 6, 7, 8)} dog ;",
               f"{L(1, 2, 3, 4)} cat ; ; {L(5, 6, 7, 8)} dog\n"]:
    objs = tk.parse_objects(text)
    assert [(o.label, tuple(round(v * 1023) for v in o.box)) for o in objs] == want, text
    assert all(o.valid for o in objs)


@pytest.mark.parametrize("text, box, segs", [
    (f"{L(1, 2, 3)} cat", None, None),                       # fewer than 4 locs
    (f"{L(1, 2, 3, 4, 5)} cat", None, None),                 # more than 4 locs
    (f"{L(1, 2, 3, 4)}{S(*range(10))} cat", (1, 2, 3, 4), None),  # truncated segs
    (f"{L(1, 2, 3, 4)}{S(*range(17))} cat", (1, 2, 3, 4), None),  # too many segs
    (f"{L(300, 2, 100, 4)} cat", (300, 2, 100, 4), None),    # y2 < y1
    (f"{L(1, 40, 3, 40)} cat", (1, 40, 3, 40), None),        # zero width
    (f"{L(1, 2, 3, 4)}", (1, 2, 3, 4), None),                # no label (truncated)
    (f"{L(1, 2, 3, 4)}{S(*range(16))}", (1, 2, 3, 4), tuple(range(16))),  # no label
    (f"{L(1, 2, 3, 4)} cat {L(5, 6, 7, 8)} dog", (1, 2, 3, 4), None),  # missing separator
    ("<loc0001><loc0002><loc0003><loc9999> cat", None, None),  # loc out of range
    ("<loc0001><loc0002><loc00", None, None),                 # truncated mid-piece
    ("the answer is 42", None, None),                         # garbage
])
def test_parse_malformed_is_invalid(text, box, segs):
  objs = tk.parse_objects(text)
  assert len(objs) == 1
  (obj,) = objs
  assert not obj.valid and obj.raw == text.strip()
  assert obj.box == (None if box is None else tuple(b / 1023 for b in box))
  assert obj.seg_codes == segs


def test_parse_mixed_and_empty():
  assert tk.parse_objects("") == [] and tk.parse_objects("  ;  ") == []
  objs = tk.parse_objects(f"{L(1, 2, 3, 4)} cat ; junk ; {L(5, 6, 7, 8)} dog")
  assert [(o.label, o.valid) for o in objs] == [("cat", True), ("junk", False), ("dog", True)]
  assert objs[1].box is None and objs[1].raw == "junk"
  with pytest.raises(ValueError, match="no box"):
    objs[1].box_pixels(10, 10)


def test_objects_to_text_round_trip(tok):
  boxes = [[10, 20, 110, 220], [0, 0, 200, 400]]
  codes = np.arange(32).reshape(2, 16)
  text = tk.objects_to_text(boxes, ["red car", "tree"], seg_codes=codes, image_size=(200, 400))
  assert text == (f"{L(51, 51, 563, 563)}{S(*range(16))} red car ; "
                  f"{L(0, 0, 1023, 1023)}{S(*range(16, 32))} tree")
  objs = tk.parse_objects(tok.decode(tok.encode(text, add_bos=True, add_eos=True)))
  assert [(o.label, o.valid, o.seg_codes) for o in objs] == [
      ("red car", True, tuple(range(16))), ("tree", True, tuple(range(16, 32)))]
  assert tk.objects_to_text([], []) == ""
  with pytest.raises(ValueError, match="';'"):
    tk.objects_to_text([[0, 0, 1, 1]], ["a;b"])
