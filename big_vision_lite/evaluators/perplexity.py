"""Teacher-forced perplexity of the suffix tokens on an eval split.

The evaluator gets the model through a `score_fn`, not a predict function:

  score_fn(examples: list[dict]) -> (loss_sum float[n], token_count float[n])

one entry per example: the summed cross-entropy (nats) of the example's loss tokens and how
many there are. Examples are in the train layout (`data/pp_text.combine_and_keep_train`:
"text" int32[T+1], "mask_loss" 1 on suffix + eos, ...); the model reads text[:-1] and is
scored on predicting text[1:] where mask_loss[1:] is 1, exactly as the train loss.
`TeacherForcedScorer` (below) computes it with a model and its params (jitted once, batches
padded to a fixed size with zero-weight rows); the eval runner binds the params. In a
multi-process run score_fn is called in lock step, possibly with `[]` on a process whose
shard is done, and must then return empty arrays.

Metrics over all processes' examples (token-weighted, as a language-model perplexity):
  loss = sum of token losses / number of loss tokens;  perplexity = exp(loss);
  num_tokens, num (examples).
A uniform model over V tokens scores loss = log V, perplexity = V.

Records: {"id", "loss_sum", "num_tokens", "loss"} (loss = the example's mean; NaN-free: 0
for an example without loss tokens). Examples without "id" (the train layout keeps none)
are numbered by their position in the gathered split (shards are contiguous and gathered
in process order, so the number is the example's index in the split).
"""
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from big_vision_lite import optim
from big_vision_lite.evaluators import base
from big_vision_lite.models import paligemma

SCORE_KEYS = ("image", "text", "mask_ar", "mask_loss", "mask_input")
ScoreFn = Callable[[list[base.Example]], tuple[Sequence[float], Sequence[float]]]


def _as_vector(x: Any, n: int, what: str) -> np.ndarray:
  arr = np.asarray(x, np.float64)
  if arr.shape != (n,):
    raise ValueError(f"perplexity: score_fn returned {what} of shape {arr.shape} for {n} "
                     f"examples; expected float[{n}] (one value per example)")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"perplexity: score_fn returned {what} with negative or non-finite "
                     f"values: {arr.tolist()}")
  return arr


@base.register("perplexity")
class PerplexityEvaluator(base.Evaluator):
  """Teacher-forced loss and perplexity (see the module docstring)."""

  needs_predict_fn = False  # The runner passes no decoder; `run` takes score_fn instead.

  def __init__(self, examples, *, score_fn: ScoreFn | None = None, **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      score_fn: list of examples -> (loss_sum float[n], token_count float[n]); may also be
        given to `run` (the runner does so, after building it from the params).
    """
    super().__init__(examples, **kw)
    if score_fn is not None and not callable(score_fn):
      raise TypeError(f"perplexity: score_fn must be callable, got {type(score_fn).__name__}")
    self.score_fn = score_fn

  def compute_metrics(self, records):
    loss_sum = sum(r["loss_sum"] for r in records)
    tokens = sum(r["num_tokens"] for r in records)
    if tokens <= 0:
      raise ValueError(f"perplexity: the {len(records)} examples have no loss tokens "
                       "(mask_loss is 0 everywhere: is the pp the train layout, "
                       "combine_and_keep_train, with a suffix?)")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "num_tokens": tokens,
            "num": len(records)}

  def run(self, predict_fn: Any = None, *, score_fn: ScoreFn | None = None
          ) -> dict[str, float]:
    """Scores every example, gathers the records, returns the metrics.

    predict_fn is accepted (and ignored) so that callers can run every evaluator alike;
    score_fn overrides the constructor's.
    """
    del predict_fn
    score_fn = score_fn or self.score_fn
    if score_fn is None:
      raise ValueError("perplexity: no score_fn (pass it to the constructor or to run)")
    records: list[base.Record] = []
    for batch in self._batches():
      loss_sum, count = score_fn(batch)
      loss_sum = _as_vector(loss_sum, len(batch), "loss_sum")
      count = _as_vector(count, len(batch), "token_count")
      for ex, l, c in zip(batch, loss_sum, count):
        rec = {"id": base.example_id(ex) if "id" in ex else None,
               "loss_sum": float(l), "num_tokens": float(c),
               "loss": float(l / c) if c else 0.0}
        records.append(rec)
    self._runs += 1
    records = self._gather(records)
    if not records:
      raise ValueError("PerplexityEvaluator: no examples were evaluated")
    if all(r["id"] is None for r in records):
      for i, r in enumerate(records):
        r["id"] = i
    elif any(r["id"] is None for r in records):
      raise ValueError("perplexity: some examples have an 'id' and others not; keep('id') "
                       "in every example's pp, or in none")
    ids = [(type(r["id"]).__name__, r["id"]) for r in records]
    if len(set(ids)) != len(ids):
      raise ValueError("PerplexityEvaluator: duplicate example ids (duplicate ids, or "
                       "shards that overlap across processes)")
    self.last_predictions = records
    return {k: float(v) for k, v in self.compute_metrics(records).items()}


# ---------------------------------------------------------------------------------------
# The model side: a jitted teacher-forced scorer (what the runner passes as score_fn).
# ---------------------------------------------------------------------------------------
class TeacherForcedScorer:
  """Per-example summed cross-entropy of the loss tokens, jitted once for a batch size.

  `scorer(params, examples) -> (loss_sum float64[n], token_count float64[n])` for n <=
  batch_size train-layout examples (SCORE_KEYS; text int32[T+1]): the model reads
  text[:-1] and is scored on text[1:] where mask_loss[1:] is 1, with optim's
  xent_sum_and_count as in training. Batches are padded to batch_size with rows whose
  mask_loss is 0 (they add nothing), so one compilation serves every call. With a mesh the
  rows of all processes form one global batch sharded over the data axes (every process
  calls in lock step; n may be 0).
  """

  def __init__(self, model_config: Mapping[str, Any], *, batch_size: int, mesh=None):
    self.model = paligemma.Model(**model_config)
    self.batch_size = int(batch_size)
    self.mesh = mesh
    self._template = None
    self.rows, out_shardings = self.batch_size, None
    if mesh is not None:
      from big_vision_lite import sharding  # pylint: disable=g-import-not-at-top
      spec = sharding.batch_sharding(mesh).spec[0]
      shards = int(np.prod([mesh.shape[a] for a in ((spec,) if isinstance(spec, str)
                                                    else spec)]))
      # Rows per process: a multiple of this process's share of the data shards.
      multiple = max(1, shards // jax.process_count())
      self.rows = -(-self.batch_size // multiple) * multiple
      out_shardings = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self._score = jax.jit(self._score_batch, out_shardings=out_shardings)

  def _score_batch(self, params, batch):
    logits, _ = self.model.apply(
        {"params": params}, batch["image"], batch["text"][:, :-1], batch["mask_ar"][:, :-1],
        batch["mask_input"][:, :-1].astype(bool))
    one = lambda l, y, m: optim.xent_sum_and_count(l[None], y[None], m[None],
                                                  reduction="per_token")
    return jax.vmap(one)(logits, batch["text"][:, 1:], batch["mask_loss"][:, 1:])

  def _stack(self, examples: list[dict]) -> dict[str, np.ndarray]:
    b, n = self.rows, len(examples)
    if n > self.batch_size:
      raise ValueError(f"perplexity scorer: {n} examples for batch_size {self.batch_size}")
    for k in SCORE_KEYS:
      if examples and k not in examples[0]:
        raise ValueError(f"perplexity: examples lack {k!r} (keys: {sorted(examples[0])}); the "
                         "pp must give the train layout (end it with combine_and_keep_train)")
    if not examples:  # Lock step after this shard ended: all-padding rows of known shapes.
      return None if self._template is None else dict(self._template)
    out = {}
    for k in SCORE_KEYS:
      rows = np.stack([np.asarray(e[k]) for e in examples])
      pad = np.zeros((b - n, *rows.shape[1:]), rows.dtype)
      out[k] = np.concatenate([rows, pad])
    self._template = {k: np.zeros_like(v) for k, v in out.items()}
    return out

  def __call__(self, params, examples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    n = len(examples)
    batch = self._stack(examples)
    if batch is None:
      if self.mesh is None or jax.process_count() == 1:
        return np.zeros(0), np.zeros(0)
      raise RuntimeError("perplexity: this process's shard of the split is empty, so its "
                         "lock-step batches have no shapes: evaluate more examples")
    if self.mesh is not None:
      from big_vision_lite import sharding  # pylint: disable=g-import-not-at-top
      batch = sharding.make_global_batch(batch, self.mesh)
    loss, count = (np.asarray(x, np.float64) for x in self._score(params, batch))
    lo = jax.process_index() * self.rows if self.mesh is not None else 0
    return loss[lo:lo + n], count[lo:lo + n]
