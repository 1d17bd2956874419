"""Perplexity evaluator: hand-computed metrics, uniform logits -> perplexity V, the jitted
teacher-forced scorer against a direct log-softmax of the model's logits (padding, meshes),
record numbering across processes and errors."""
import math

import jax
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite import sharding
from big_vision_lite.evaluators import base
from big_vision_lite.evaluators import perplexity
from big_vision_lite.models import paligemma

V = 97
MODEL = {"img": dict(patch_size=(8, 8), width=16, depth=1, mlp_dim=32, num_heads=2,
                     image_size=16, head_zeroinit=False),
         "llm": dict(vocab_size=V, width=24, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1,
                     head_dim=8)}
T = 9  # Train layout: text has T + 1 tokens.


def _params(seed=0):
  """Random float32 params from the checkpoint shape table (no init to compile)."""
  rng = np.random.RandomState(seed)
  flat = {name: (0.3 * rng.randn(*shape)).astype(np.float32)
          for name, shape in sorted(checkpoints.param_shapes(MODEL).items())}
  return checkpoints.unflatten(flat)


def _examples(n, seed=0, with_id=True):
  """Train-layout examples: [bos prefix][sep][suffix eos][pad] with varied lengths."""
  rng = np.random.RandomState(seed)
  out = []
  for i in range(n):
    prefix, suffix = int(rng.randint(1, 4)), int(rng.randint(1, 5))
    real = prefix + 1 + suffix
    text = np.zeros(T + 1, np.int32)
    text[:real] = rng.randint(3, V, real)
    ar = np.ones(T + 1, np.int32)
    ar[:prefix + 1] = 0
    loss = np.zeros(T + 1, np.int32)
    loss[prefix + 1:real] = 1
    inp = np.zeros(T + 1, np.int32)
    inp[:real] = 1
    ex = {"image": rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32), "text": text,
          "mask_ar": ar, "mask_loss": loss, "mask_input": inp}
    if with_id:
      ex["id"] = 100 + i
    out.append(ex)
  return out


def _direct_losses(params, examples):
  """Per example: sum over loss tokens of -log softmax, from an unpadded single forward."""
  apply = jax.jit(paligemma.Model(**MODEL).apply)
  sums, counts = [], []
  for e in examples:
    logits, _ = apply({"params": params}, e["image"][None], e["text"][None, :-1],
                      e["mask_ar"][None, :-1], e["mask_input"][None, :-1].astype(bool))
    logits = np.asarray(logits[0], np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    target, w = e["text"][1:], e["mask_loss"][1:]
    nll = -logp[np.arange(T), target]
    sums.append(float((nll * w).sum()))
    counts.append(float(w.sum()))
  return np.array(sums), np.array(counts)


def test_metrics_are_token_weighted_hand_computed():
  exs = [{"id": i} for i in range(3)]
  table = {0: (2.0, 1.0), 1: (3.0, 4.0), 2: (0.0, 0.0)}  # (loss sum, tokens) per example.

  def score_fn(batch):
    return [table[e["id"]][0] for e in batch], [table[e["id"]][1] for e in batch]

  ev = base.create("perplexity", examples=exs, batch_size=2, score_fn=score_fn)
  m = ev.run(None)
  assert m["loss"] == pytest.approx(5.0 / 5.0)
  assert m["perplexity"] == pytest.approx(math.e)
  assert m["num_tokens"] == 5 and m["num"] == 3
  recs = {r["id"]: r for r in ev.last_predictions}
  assert recs[1]["loss"] == pytest.approx(0.75) and recs[2]["loss"] == 0.0
  assert recs[0] == {"id": 0, "loss_sum": 2.0, "num_tokens": 1.0, "loss": 2.0}


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
  params = _params()
  # RMSNorm scales are used as (1 + scale): -1 zeroes the final pre-logits, so every logit
  # is 0 and each token costs exactly log V.
  params["llm"]["final_norm"]["scale"] = -np.ones_like(params["llm"]["final_norm"]["scale"])
  scorer = perplexity.TeacherForcedScorer(MODEL, batch_size=4)
  exs = _examples(6)
  ev = perplexity.PerplexityEvaluator(exs, batch_size=4)
  m = ev.run(score_fn=lambda b: scorer(params, b))
  assert m["loss"] == pytest.approx(math.log(V), rel=1e-6)
  assert m["perplexity"] == pytest.approx(V, rel=1e-5)
  assert m["num_tokens"] == sum(int(e["mask_loss"][1:].sum()) for e in exs)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scorer_matches_direct_log_softmax_with_padding(batch_size):
  params = _params(1)
  exs = _examples(5, seed=3)
  want_sum, want_count = _direct_losses(params, exs)
  scorer = perplexity.TeacherForcedScorer(MODEL, batch_size=batch_size)
  ev = perplexity.PerplexityEvaluator(exs, batch_size=batch_size,
                                      score_fn=lambda b: scorer(params, b))
  m = ev.run()
  got = {r["id"]: r for r in ev.last_predictions}
  np.testing.assert_allclose([got[e["id"]]["loss_sum"] for e in exs], want_sum, rtol=1e-5)
  np.testing.assert_allclose([got[e["id"]]["num_tokens"] for e in exs], want_count)
  assert m["loss"] == pytest.approx(want_sum.sum() / want_count.sum(), rel=1e-5)
  assert m["perplexity"] == pytest.approx(math.exp(want_sum.sum() / want_count.sum()),
                                          rel=1e-5)


def test_scorer_on_a_mesh_equals_single_device():
  params = _params(2)
  exs = _examples(5, seed=4)
  mesh = sharding.make_mesh([("data", -1)])
  on_mesh = perplexity.TeacherForcedScorer(MODEL, batch_size=5, mesh=mesh)  # 8 rows.
  plain = perplexity.TeacherForcedScorer(MODEL, batch_size=8)
  a = on_mesh(params, exs)
  b = plain(params, exs)
  assert a[0].shape == (5,)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
  np.testing.assert_array_equal(a[1], b[1])
  # After a real batch, an empty lock-step call is all padding and returns nothing.
  assert on_mesh(params, [])[0].shape == (0,)


def test_examples_without_ids_are_numbered_in_gathered_order():
  exs = _examples(3, with_id=False)
  # Process 0's view of a 2-process run: its records come first, then process 1's 2 records.
  other = [{"id": None, "loss_sum": 1.0, "num_tokens": 1.0, "loss": 1.0}] * 2
  ev = perplexity.PerplexityEvaluator(
      exs, batch_size=2, score_fn=lambda b: ([0.5] * len(b), [1.0] * len(b)),
      gather=lambda recs: recs + [dict(r) for r in other])
  m = ev.run()
  assert [r["id"] for r in ev.last_predictions] == [0, 1, 2, 3, 4]
  assert m["loss"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_bad_input_is_a_clear_error():
  exs = [{"id": 0}, {"id": 1}]
  with pytest.raises(ValueError, match=r"float\[2\]"):
    perplexity.PerplexityEvaluator(exs, score_fn=lambda b: ([1.0], [1.0])).run()
  with pytest.raises(ValueError, match="negative or non-finite"):
    perplexity.PerplexityEvaluator(
        exs, score_fn=lambda b: ([float("nan")] * len(b), [1.0] * len(b))).run()
  with pytest.raises(ValueError, match="no loss tokens"):
    perplexity.PerplexityEvaluator(exs, score_fn=lambda b: ([0.0] * len(b),) * 2).run()
  with pytest.raises(ValueError, match="no score_fn"):
    perplexity.PerplexityEvaluator(exs).run()
  with pytest.raises(ValueError, match="duplicate"):
    perplexity.PerplexityEvaluator(
        [{"id": 0}, {"id": 0}], score_fn=lambda b: ([1.0] * len(b),) * 2).run()
  with pytest.raises(ValueError, match="some examples have an 'id'"):
    perplexity.PerplexityEvaluator(
        [{"id": 0}, {}], score_fn=lambda b: ([1.0] * len(b),) * 2).run()
  scorer = perplexity.TeacherForcedScorer(MODEL, batch_size=2)
  with pytest.raises(ValueError, match="combine_and_keep_train"):
    scorer(_params(), [{"image": np.zeros((16, 16, 3)), "text": np.zeros(T + 1, np.int32)}])
