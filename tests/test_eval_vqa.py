"""VQA metrics against hand-computed values and the official VQA evaluation's rules; the
evaluator protocol of base.py (registry, batching, multi-process gathering, errors)."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import vqa


@pytest.mark.parametrize("n_match,want", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                          (9, 1.0)])
def test_vqa_accuracy_leave_one_out_by_hand(n_match, want):
  # With k matching annotators out of 10: leaving out a matching one leaves k-1, a
  # non-matching one k; acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10,
  # e.g. k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9.
  answers = ["red"] * n_match + ["blue"] * (10 - n_match)
  assert vqa.vqa_accuracy("red", answers) == pytest.approx(want)


@pytest.mark.parametrize("text,want", [
    ("Two dogs.", "2 dogs"),
    ("the cat", "cat"),
    ("An apple", "apple"),
    ("dont know", "don't know"),
    ("Isnt it", "isn't it"),
    ("3.5", "3.5"),
    ("100,978", "100978"),  # Official: the comma between digits is removed, not spaced.
    ("black-and-white", "black and white"),
    ("yes, it is", "yes it is"),
    ("hello?!", "hello"),
    ("none", "0"),
    ("  a\tTen\n", "10"),
    ("left side.", "left side"),
    ("mr.bean", "mrbean"),
    ("it's", "it's"),  # Apostrophes are kept.
])
def test_official_answer_normalisation(text, want):
  assert vqa.normalize_vqa_answer(text) == want


def test_vqa_accuracy_normalises_only_when_annotators_disagree():
  # The official script leaves answers alone when all 10 annotators agree.
  assert vqa.vqa_accuracy("two", ["2"] * 10) == 0.0
  assert vqa.vqa_accuracy("2", ["2"] * 10) == 1.0
  assert vqa.vqa_accuracy(" 2\n", ["2"] * 10) == 1.0  # Whitespace is always stripped.
  # One dissent: everything normalised, "Two." -> "2" matches 9 answers.
  assert vqa.vqa_accuracy("Two.", ["2"] * 9 + ["3"]) == 1.0
  assert vqa.vqa_accuracy("a Three", ["2"] * 9 + ["3"]) == pytest.approx(0.3)  # 1 match.
  # Non-10 answer lists: min(#matches / 3, 1) without leave-one-out.
  assert vqa.vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(1 / 3)
  assert vqa.vqa_accuracy("cat", ["cat"]) == pytest.approx(1 / 3)
  assert vqa.vqa_accuracy("cat", ["cat", "cat", "cats", "cat"]) == 1.0


def test_levenshtein_and_anls_by_hand():
  assert vqa.levenshtein("kitten", "sitting") == 3
  assert vqa.levenshtein("", "abc") == 3
  assert vqa.levenshtein("flaw", "lawn") == 2
  assert vqa.anls("hello word", ["hello world"]) == pytest.approx(1 - 1 / 11)
  assert vqa.anls("Hello World ", ["hello world"]) == 1.0  # Lowercased and stripped.
  assert vqa.anls("abcx", ["abcd"]) == pytest.approx(0.75)
  assert vqa.anls("abxy", ["abcd"]) == 0.0  # NL = 0.5 is not < 0.5.
  assert vqa.anls("xyz", ["abc"]) == 0.0
  assert vqa.anls("abcx", ["zzzz", "abcd", "abcx"]) == 1.0  # Max over answers.
  assert vqa.anls("", [""]) == 1.0
  assert vqa.anls("abcx", ["abcd"], threshold=0.2) == 0.0


@pytest.mark.parametrize("pred,target,want", [
    ("10.4", "10", True), ("9.5", "10", True), ("10.6", "10", False),
    ("40%", "0.41", True), ("0.4", "40%", True), ("45%", "40%", False),
    ("0", "0", True), ("0.0", "0", False),  # A zero target needs the exact string.
    ("-5.1", "-5", True), ("Yes", "yes", False), ("yes", "yes", True),
    ("1,000", "1000", False),  # Not a float: exact match only.
])
def test_relaxed_match(pred, target, want):
  assert vqa.relaxed_match(pred, target) is want


def _ex(i, answers, **kw):
  return dict({"id": i, "image": np.zeros((2, 2, 3), np.float32), "prefix": "answer en q",
               "answers": answers}, **kw)


def test_vqav2_evaluator_metrics_and_answer_types():
  examples = [
      _ex(1, ["yes"] * 10, answer_type="yes/no", question_type="is the"),
      _ex(2, ["2"] * 3 + ["3"] * 7, answer_type="number", question_type="how many"),
      _ex(3, ["red"] * 9 + ["dark red"], answer_type="other", question_type="what color"),
      _ex(4, ["no"] * 10, answer_type="yes/no", question_type="is the"),
  ]
  preds = {1: "yes", 2: "two", 3: "Red", 4: "yes"}
  ev = base.create("vqav2", examples=examples, batch_size=3)
  assert isinstance(ev, vqa.VQAv2Evaluator)
  m = ev.run(lambda b: [preds[e["id"]] for e in b])
  # 1: 1.0; 2: "two" -> "2", 3 matches -> 0.9; 3: "red" matches 9 -> 1.0; 4: 0.
  assert m["vqa_accuracy"] == pytest.approx((1 + 0.9 + 1 + 0) / 4)
  assert m["vqa_accuracy/yes/no"] == pytest.approx(0.5)
  assert m["vqa_accuracy/number"] == pytest.approx(0.9)
  assert m["vqa_accuracy/other"] == pytest.approx(1.0)
  # Exact match (case-sensitive, no normalisation): only example 1.
  assert m["exact_match"] == pytest.approx(0.25)
  assert m["num"] == 4
  rec = ev.last_predictions[1]
  assert rec == {"id": 2, "prediction": "two", "answers": ["2"] * 3 + ["3"] * 7,
                 "answer_type": "number", "question_type": "how many",
                 "vqa_accuracy": pytest.approx(0.9), "exact_match": 0.0}


def test_docvqa_and_chartqa_evaluators():
  docs = [{"id": "a", "answers": ["$1,250.00", "1250"]}, {"id": "b", "answers": ["Smith"]},
          {"id": "c", "answer": "March 3"}]
  preds = {"a": "1,250.00", "b": "smith", "c": "May 4"}
  m = base.create("docvqa", examples=docs).run(lambda b: [preds[e["id"]] for e in b])
  # a: vs "$1,250.00": NL 1/9; b: exact after lowercasing; c: NL 4/7 >= 0.5 -> 0.
  assert m["anls"] == pytest.approx((1 - 1 / 9 + 1 + 0) / 3)
  assert m["exact_match"] == 0.0

  charts = [{"id": 1, "answer": "12.5"}, {"id": 2, "answer": "Yes"},
            {"id": 3, "answer": "40%"}, {"id": 4, "answer": "0"}]
  preds = {1: "12.9", 2: "yes", 3: "0.42", 4: "0.0"}
  run = lambda ev: ev.run(lambda b: [preds[e["id"]] for e in b])
  m = run(base.create("chartqa", examples=charts))
  assert m["relaxed_accuracy"] == pytest.approx(2 / 4)  # 12.9 (3.2%), 0.42 (5%).
  m = run(base.create("chartqa", examples=charts, to_lower=True))
  assert m["relaxed_accuracy"] == pytest.approx(3 / 4)
  assert m["exact_match"] == pytest.approx(1 / 4)


def test_sharded_run_equals_single_process():
  examples = [_ex(i, [str(i % 3)] * 5 + ["x"] * 5, answer_type="number") for i in range(7)]
  predict = lambda b: [str(e["id"] % 2) for e in b]
  full = vqa.VQAEvaluator(examples, metrics=vqa.METRICS).run(predict)
  other = vqa.VQAEvaluator(examples[4:], metrics=vqa.METRICS)
  other.run(predict)
  shard = vqa.VQAEvaluator(examples[:4], metrics=vqa.METRICS, batch_size=3,
                           gather=lambda r: r + other.last_predictions)
  assert shard.run(predict) == pytest.approx(full)


def test_malformed_ground_truth_and_config():
  with pytest.raises(base.MalformedExampleError, match=r"id=5, field 'answers': missing"):
    vqa.VQAEvaluator([{"id": 5, "question": "q"}]).run(lambda b: ["a"] * len(b))
  with pytest.raises(base.MalformedExampleError, match=r"id=6, field 'answers': empty"):
    vqa.VQAEvaluator([_ex(6, [])]).run(lambda b: ["a"] * len(b))
  with pytest.raises(base.MalformedExampleError, match=r"id=7, field 'answers\[1\]'"):
    vqa.VQAEvaluator([_ex(7, ["a", 3])]).run(lambda b: ["a"] * len(b))
  with pytest.raises(base.MalformedExampleError, match=r"id=8, field 'answer_type'"):
    vqa.VQAEvaluator([_ex(8, ["a"], answer_type=None)]).run(lambda b: ["a"] * len(b))
  with pytest.raises(ValueError, match="metrics must be"):
    vqa.VQAEvaluator([], metrics=("accuracy",))
  # Byte strings (as tfds gives them) are accepted.
  m = vqa.VQAEvaluator([_ex(np.int64(9), np.array([b"cat", b"dog"]))],
                       metrics=("exact_match",)).run(lambda b: ["cat"])
  assert m["exact_match"] == 1.0


# ---------------------------------------------------------------------------------------
# The evaluator protocol (base.py), exercised through the VQA evaluator.
# ---------------------------------------------------------------------------------------
def _fake_allgather(other_records):
  """A 2-process process_allgather as seen from process 0; process 1 holds other_records."""
  other = np.frombuffer(json.dumps(other_records).encode("utf-8"), np.uint8)

  def allgather(x):
    x = np.asarray(x)
    if x.ndim == 0:
      return np.stack([x, np.array(other.size, x.dtype)])
    theirs = np.zeros_like(x)  # Both processes pad to the same (max) length.
    theirs[:other.size] = other
    return np.stack([x, theirs])

  return allgather


@pytest.mark.parametrize("mine,theirs", [
    ([{"id": 1, "prediction": "ünïcode ✓"}], [{"id": 2, "x": [1.5, None]}] * 3),
    ([{"id": "a" * 50}], [{"id": "b"}]),
    ([], [{"id": 3}]),
])
def test_allgather_records_concatenates_in_process_order(mine, theirs):
  assert base.allgather_records(mine, _fake_allgather(theirs)) == mine + theirs


def test_multi_process_steps_line_up_with_empty_batches():
  # This process has 3 examples (2 batches of 2); another has 5 (3 batches): the third
  # collective step must still call predict_fn, with an empty batch.
  steps = []

  def sync(has_more):
    steps.append(has_more)
    return has_more or len(steps) <= 3

  calls = []

  def predict(batch):
    calls.append(len(batch))
    return ["a"] * len(batch)

  ev = vqa.VQAEvaluator([_ex(i, ["a"]) for i in range(3)], batch_size=2, sync=sync,
                        metrics=("exact_match",))
  m = ev.run(predict)
  assert calls == [2, 1, 0] and steps == [True, True, False, False]
  assert m == {"exact_match": 1.0, "num": 3}


def test_examples_streams_callables_and_one_shot_iterators():
  exs = [_ex(i, ["yes"]) for i in range(5)]
  predict = lambda b: ["yes"] * len(b)
  gen_ev = vqa.VQAEvaluator((e for e in exs), batch_size=2)
  assert gen_ev.run(predict)["num"] == 5
  with pytest.raises(RuntimeError, match="one-shot iterator"):
    gen_ev.run(predict)
  fn_ev = vqa.VQAEvaluator(lambda: iter(exs), batch_size=4)
  assert fn_ev.run(predict)["num"] == 5 and fn_ev.run(predict)["num"] == 5


def test_run_errors():
  exs = [_ex(1, ["a"]), _ex(2, ["b"])]
  with pytest.raises(ValueError, match="returned 1 texts for a batch of 2"):
    vqa.VQAEvaluator(exs).run(lambda b: ["a"])
  with pytest.raises(TypeError, match="returned a bytes for example 1"):
    vqa.VQAEvaluator(exs).run(lambda b: [b"a", "b"])
  with pytest.raises(TypeError, match="must return a list of strings"):
    vqa.VQAEvaluator(exs).run(lambda b: "ab")
  with pytest.raises(ValueError, match="id 1 was evaluated twice"):
    vqa.VQAEvaluator(exs + [_ex(1, ["c"])]).run(lambda b: ["a"] * len(b))
  with pytest.raises(ValueError, match="no examples"):
    vqa.VQAEvaluator([]).run(lambda b: [])
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    vqa.VQAEvaluator(exs, batch_size=0)
  with pytest.raises(base.MalformedExampleError, match="field 'id': missing"):
    vqa.VQAEvaluator([{"answers": ["a"]}]).run(lambda b: ["a"])


def test_registry_and_predictions_file(tmp_path):
  names = base.registered_names()
  for n in ("caption", "vqa", "vqav2", "docvqa", "chartqa", "detection", "refcoco",
            "segmentation"):
    assert n in names
  with pytest.raises(KeyError, match="unknown evaluator 'vqa3'.*'vqav2'"):
    base.create("vqa3", examples=[])
  with pytest.raises(ValueError, match="already registered"):
    base.register("vqa")(type("Other", (vqa.VQAEvaluator,), {}))
  with pytest.raises(TypeError, match="Evaluator subclass"):
    base.register("thing")(dict)
  ev = base.create("vqa", examples=[_ex(1, ["a"]), _ex("q2", ["b"])])
  ev.run(lambda b: ["a"] * len(b))
  path = tmp_path / "predictions.jsonl"
  ev.write_predictions(path)
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  assert lines == ev.last_predictions and [l["id"] for l in lines] == [1, "q2"]


_WORKER = r'''
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
from big_vision_lite.evaluators import vqa
exs = [{"id": i, "answers": [str(i % 3)] * 7 + ["x"] * 3} for i in range(7)]
calls = []
def predict(batch):
  calls.append(len(batch))
  return [str(e["id"] % 2) for e in batch]
ev = vqa.VQAEvaluator(exs[pid::2], batch_size=3, metrics=("exact_match", "vqa_accuracy"))
metrics = ev.run(predict)
print("RESULT " + json.dumps({"count": jax.process_count(), "calls": calls,
                              "metrics": metrics, "ids": [r["id"] for r in ev.last_predictions]}))
'''


def test_real_two_process_run_gathers_all_records(tmp_path):
  """Two JAX processes (CPU, gloo): uneven shards, lock-step calls, identical metrics."""
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(p)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for p in range(2)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=120)
    finally:
      if p.poll() is None:
        p.kill()
    assert p.returncode == 0, err[-3000:]
    outs.append(json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:]))
  exs = [{"id": i, "answers": [str(i % 3)] * 7 + ["x"] * 3} for i in range(7)]
  want = vqa.VQAEvaluator(exs, metrics=("exact_match", "vqa_accuracy")).run(
      lambda b: [str(e["id"] % 2) for e in b])
  # Process 0 has 4 examples (batches of 3 and 1), process 1 has 3 (one batch, then an
  # empty call so that both make two calls).
  assert [o["calls"] for o in outs] == [[3, 1], [3, 0]]
  for o in outs:
    assert o["count"] == 2
    assert o["metrics"] == pytest.approx(want)
    assert o["ids"] == [0, 2, 4, 6, 1, 3, 5]
