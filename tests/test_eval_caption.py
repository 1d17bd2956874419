"""Caption metrics: hand-computed BLEU-1/ROUGE-L, an independent CIDEr-D, PTB tokenisation
(Java reference outputs, and the pure-Python stand-in), the evaluator and its registry."""
import collections
import logging
import math
import shutil

import numpy as np
import pytest

from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import caption

HAS_JAVA = shutil.which("java") is not None
needs_java = pytest.mark.skipif(not HAS_JAVA, reason="needs java")

# Reference outputs of pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1 jar, run with
# -preserveLines -lowerCase, punctuation tokens then dropped as pycocoevalcap does).
PTB_REFERENCE = [
    ("A man riding a horse.", "a man riding a horse"),
    ("A man's T-shirt, isn't it?  \"Quoted\" words (in parens) and {braces} [brackets]",
     "a man 's t-shirt is n't it quoted words -lrb- in parens -rrb- and -lcb- braces "
     "-rcb- -lsb- brackets -rsb-"),
    ("The dog -- running... fast! Don't stop; you'll see: 3.5 m/s at 10:30 & 5%.",
     "the dog running fast do n't stop you 'll see 3.5 m/s at 10:30 & 5 %"),
    ("", ""),
    ("A  group of people  standing around a kitchen .",
     "a group of people standing around a kitchen"),
    ("Café naïve résumé 1,000 people ... 'single quotes' `backtick'",
     "café naïve résumé 1,000 people single quotes backtick"),
    ("In a kitchen. The dog sits.", "in a kitchen the dog sits"),
    ("A sign reads \"stop.\" on the road", "a sign reads stop on the road"),
    ("mr. smith and dr. jones at 3 p.m. today", "mr. smith and dr. jones at 3 p.m. today"),
    ("a man (wearing a hat).", "a man -lrb- wearing a hat -rrb-"),
    ("a b.c. d", "a b.c. d"),
    ("x.", "x."),
    ("a dog!!", "a dog !!"),
    ("a tennis player swings her racket,preparing to hit",
     "a tennis player swings her racket preparing to hit"),
    ("people's faces; 'twas 90's style", "people 's faces 't was 90 's style"),
    ("a 3-way stop sign,red", "a 3-way stop sign red"),
    ("this is ok?yes", "this is ok?yes"),
    ("cats', dogs'", "cats dogs"),
    ("a 50\" tv", "a 50 tv"),
    ("U.S.A. e-mail me@x.com $5 #1 50/50 can't won't gonna it's I'm we're they've I'd",
     # PTB joins "1 50/50" into one fraction token with a no-break space.
     "u.s.a. e-mail me@x.com $ 5 # 1\xa050/50 ca n't wo n't gon na it 's i 'm we 're "
     "they 've i 'd"),
]


@pytest.mark.parametrize("sentence,expected", PTB_REFERENCE)
def test_python_tokenizer_reproduces_ptb_reference(sentence, expected):
  assert caption.ptb_tokenize_python(sentence) == expected


@needs_java
def test_java_tokenizer_reproduces_ptb_reference_and_python_agrees():
  sentences = [s for s, _ in PTB_REFERENCE] + [
      "Two giraffes standing next to each other in a field with trees in the background.",
      "A bathroom with a toilet, sink, and shower.", "A group of people playing frisbee "
      "in a park.", "There's a cat sitting on the man's laptop!", "A red double-decker "
      "bus drives down the street (London).", "Someone's eating a hot-dog; it's 5:45.",
      "add 1 1/2 cups of flour, then 2 eggs"]
  got = caption.ptb_tokenize_java(sentences)
  assert got[:len(PTB_REFERENCE)] == [e for _, e in PTB_REFERENCE]
  assert [caption.ptb_tokenize_python(s) for s in sentences] == got


# A tiny corpus without punctuation, so tokenisation is the identity (lower-case words).
REFS = {"a": ["a man is riding a horse", "a person rides a brown horse"],
        "b": ["a dog runs on grass"]}
PREDS = {"a": "a man riding a horse", "b": "a dog running"}


def test_bleu1_and_rouge_l_by_hand():
  got = caption.caption_scores(REFS, PREDS, metrics=("bleu-1", "rouge-l"),
                               tokenizer="python")
  # BLEU-1 (corpus): clipped unigram matches 5/5 + 2/3 ("a", "dog"); hypothesis length 8;
  # closest reference lengths 6 + 5 = 11; brevity penalty exp(1 - 11/8).
  assert got["bleu-1"] == pytest.approx(7 / 8 * math.exp(1 - 11 / 8), rel=1e-6)

  # ROUGE-L (beta 1.2), per image with the best LCS precision/recall over references:
  def f(p, r, beta2=1.2**2):
    return (1 + beta2) * p * r / (r + beta2 * p)

  # image a: LCS 5 with ref 1 -> P 1, R 5/6 (ref 2: LCS 3 -> P .6, R .5);
  # image b: LCS 2 ("a dog") -> P 2/3, R 2/5.
  assert got["rouge-l"] == pytest.approx((f(1, 5 / 6) + f(2 / 3, 2 / 5)) / 2, rel=1e-9)
  assert set(got) == {"bleu-1", "rouge-l"}


def _ngrams(words, n):
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _cider_d(refs, preds, sigma=6.0):
  """CIDEr-D from Vedantam et al. 2015 + the coco-caption conventions (raw n-gram counts,
  IDF over the images' reference sets, clipped tf-idf dot products, x10)."""
  keys = list(refs)
  n_img = len(keys)
  df = collections.Counter()
  for k in keys:
    df.update({g for r in refs[k] for n in range(1, 5) for g in _ngrams(r.split(), n)})

  def vecs(words):
    return [{g: c * (math.log(n_img) - math.log(max(1.0, df[g])))
             for g, c in _ngrams(words, n).items()} for n in range(1, 5)]

  scores = []
  for k in keys:
    hw = preds[k].split()
    hv = vecs(hw)
    total = 0.0
    for r in refs[k]:
      rw = r.split()
      rv = vecs(rw)
      for n in range(4):
        nh = math.sqrt(sum(v * v for v in hv[n].values()))
        nr = math.sqrt(sum(v * v for v in rv[n].values()))
        dot = sum(min(v, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, v in hv[n].items())
        cos = dot / (nh * nr) if nh and nr else 0.0
        total += cos * math.exp(-((len(hw) - len(rw))**2) / (2 * sigma**2)) / 4
    scores.append(10 * total / len(refs[k]))
  return float(np.mean(scores))


def test_cider_matches_independent_cider_d():
  refs = dict(REFS, c=["two cats sleep on a red couch", "a pair of cats asleep on a couch",
                       "cats sleeping on the sofa"])
  preds = dict(PREDS, c="two cats sleeping on a couch")
  want = _cider_d(refs, preds)
  assert want > 0.5  # Not a degenerate corpus.
  got = caption.caption_scores(refs, preds, metrics=("cider",), tokenizer="python")
  assert got["cider"] == pytest.approx(want, rel=1e-9)


def _examples(refs):
  return [{"id": k, "image": np.zeros((4, 4, 3), np.float32), "prefix": "caption en",
           "captions": v} for k, v in refs.items()]


def _predict(preds):
  calls = []

  def predict_fn(batch):
    calls.append(len(batch))
    return [preds[ex["id"]] for ex in batch]

  return predict_fn, calls


def test_evaluator_end_to_end_and_registry():
  refs = dict(REFS, c=["two cats sleep on a red couch.", "Cats sleeping on the sofa!"])
  preds = dict(PREDS, c="Two cats, sleeping on a couch.")
  ev = base.create("caption", examples=_examples(refs), batch_size=2,
                   metrics=("cider", "bleu-4", "rouge-l"), tokenizer="python")
  assert isinstance(ev, caption.CaptionEvaluator)
  predict_fn, calls = _predict(preds)
  metrics = ev.run(predict_fn)
  assert calls == [2, 1]
  assert set(metrics) == {"cider", "bleu-4", "rouge-l"}
  assert metrics == caption.caption_scores(refs, preds, metrics=("cider", "bleu-4",
                                                                  "rouge-l"),
                                           tokenizer="python")
  assert [r["id"] for r in ev.last_predictions] == ["a", "b", "c"]
  assert ev.last_predictions[2] == {"id": "c", "prediction": preds["c"],
                                    "captions": refs["c"]}
  # Running again gives the same numbers (the example list is re-iterable).
  assert ev.run(predict_fn) == metrics


def test_sharded_run_gathers_to_single_process_result():
  refs = dict(REFS, c=["two cats sleep on a red couch", "cats sleeping on the sofa"],
              d=["a red bus on a street"])
  preds = dict(PREDS, c="two cats sleeping on a couch", d="a bus on the street")
  full = caption.CaptionEvaluator(_examples(refs), tokenizer="python").run(
      _predict(preds)[0])
  exs = _examples(refs)
  other = caption.CaptionEvaluator(exs[2:], tokenizer="python")
  other.run(_predict(preds)[0])
  # CIDEr's IDF is corpus-wide: each process must score the gathered records.
  shard0 = caption.CaptionEvaluator(
      exs[:2], tokenizer="python", gather=lambda recs: recs + other.last_predictions)
  assert shard0.run(_predict(preds)[0]) == pytest.approx(full, rel=1e-12)
  alone = caption.CaptionEvaluator(exs[:2], tokenizer="python").run(_predict(preds)[0])
  assert alone["cider"] != pytest.approx(full["cider"])


def test_without_java_uses_python_tokenizer_and_skips_java_metrics(monkeypatch, caplog):
  monkeypatch.setattr(caption.shutil, "which", lambda name: None)
  monkeypatch.setattr(caption, "_notices_given", set())

  def no_java(*a, **k):
    raise AssertionError("Java must not be called")

  monkeypatch.setattr(caption, "ptb_tokenize_java", no_java)
  refs = {1: ["A man riding a horse."], 2: ["A dog, running."]}
  preds = {1: "a man riding a horse", 2: "A dog runs."}
  ev = caption.CaptionEvaluator(_examples(refs), metrics=caption.METRICS)
  with caplog.at_level(logging.WARNING, logger=caption.__name__):
    metrics = ev.run(_predict(preds)[0])
    ev.run(_predict(preds)[0])
  assert set(metrics) == {"cider", "bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-l"}
  msgs = [r.getMessage() for r in caplog.records]
  assert sum("pure-Python" in m for m in msgs) == 1  # Said once.
  assert sum("METEOR needs Java" in m for m in msgs) == 1
  assert sum("SPICE needs Java" in m for m in msgs) == 1
  # ROUGE-L of image 1 is 1 (identical after tokenisation); image 2: "a dog runs" vs
  # "a dog running": LCS 2 of 3 and 3 tokens.
  p = r = 2 / 3
  assert metrics["rouge-l"] == pytest.approx((1 + 2.44 * p * r / (r + 1.44 * p)) / 2)
  with pytest.raises(RuntimeError, match="no `java`"):
    caption.tokenize(["x"], backend="java")


@needs_java
def test_java_tokenizer_is_used_when_present(monkeypatch):
  seen = []
  real = caption.ptb_tokenize_java
  monkeypatch.setattr(caption, "ptb_tokenize_java", lambda s: seen.append(s) or real(s))
  got = caption.tokenize(["A man's hat.", "rock'n'roll!"])
  assert seen and got == ["a man 's hat", "rock 'n' roll"]


@needs_java
def test_meteor_with_java():
  # METEOR 1.5 gives 1 to a hypothesis identical to its reference; here every image
  # matches one of its references exactly.
  refs = {1: ["a man is riding a horse", "someone on a horse"], 2: ["a dog runs on grass"]}
  preds = {1: "a man is riding a horse", 2: "a dog runs on grass"}
  got = caption.caption_scores(refs, preds, metrics=("meteor",), tokenizer="python")
  assert got == {"meteor": pytest.approx(1.0, abs=1e-9)}


def test_bad_ground_truth_and_config_errors():
  ev = caption.CaptionEvaluator([{"id": 7, "image": None, "prefix": "caption en",
                                  "captions": "just one string"}])
  with pytest.raises(base.MalformedExampleError, match=r"id=7, field 'captions'"):
    ev.run(lambda b: ["x"] * len(b))
  ev = caption.CaptionEvaluator([{"id": 8, "image": None, "prefix": "caption en"}])
  with pytest.raises(base.MalformedExampleError, match=r"id=8, field 'captions': missing"):
    ev.run(lambda b: ["x"] * len(b))
  ev = caption.CaptionEvaluator([{"id": 9, "captions": []}])
  with pytest.raises(base.MalformedExampleError, match=r"id=9.*empty"):
    ev.run(lambda b: ["x"] * len(b))
  with pytest.raises(ValueError, match="metrics must be"):
    caption.CaptionEvaluator([], metrics=("cidre",))
  with pytest.raises(ValueError, match="tokenizer must be"):
    caption.CaptionEvaluator([], tokenizer="nltk")
