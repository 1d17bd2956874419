"""Beam search inside one `jax.lax.while_loop` (used by decode.Decoder when beam_size > 1).

Each example keeps `n` = beam_size live hypotheses (no EOS yet) and a pool of the `n` best
finished ones. At every step each live hypothesis is extended by every token:
  * extensions by EOS are finished hypotheses, scored sum(logp) / lp(len) with
    lp(len) = ((5 + len) / 6) ** alpha (GNMT length penalty, Wu et al. 2016, as in T5X and
    flax; len counts the EOS; alpha = length_penalty, 0 = plain sums as big_vision) and
    merged into the finished pool (top n kept);
  * the n best other extensions (by log-prob sum) become the live hypotheses.
After max_decode_len steps the live hypotheses (length M, no EOS) are complete too and join
the pool. An example is done early once its best finished score beats any score a live
hypothesis could still reach; the loop ends when all are. The result is the pool's best.

The KV cache of the prefilled prompts is tiled to B * n rows once; rows b * n .. b * n + n - 1
belong to example b, and each step gathers them by the surviving hypotheses' parents.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# Batch axis of each entry of the model's cache pytree (paligemma.Model.prefill); "index"
# is a scalar shared by all rows.
CACHE_BATCH_AXIS = {"k": 1, "v": 1, "valid": 0, "pos": 0, "next_pos": 0}


def length_norm(length: jax.Array, alpha: jax.Array) -> jax.Array:
  """GNMT length normaliser ((5 + len) / 6) ** alpha; 1 when alpha == 0."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _tile_cache(cache: dict, n: int) -> dict:
  return {k: v if k not in CACHE_BATCH_AXIS else jnp.repeat(v, n, axis=CACHE_BATCH_AXIS[k])
          for k, v in cache.items()}


def _gather_cache(cache: dict, parents: jax.Array) -> dict:
  """Rows [B*n] of the cache reordered so that row (b, j) is old row (b, parents[b, j])."""
  b, n = parents.shape
  out = {}
  for key, x in cache.items():
    if key not in CACHE_BATCH_AXIS:
      out[key] = x
      continue
    ax = CACHE_BATCH_AXIS[key]
    x = x.reshape(x.shape[:ax] + (b, n) + x.shape[ax + 1:])
    idx = parents.reshape((1,) * ax + (b, n) + (1,) * (x.ndim - ax - 2))
    x = jnp.take_along_axis(x, idx, axis=ax + 1, mode="promise_in_bounds")
    out[key] = x.reshape(x.shape[:ax] + (b * n,) + x.shape[ax + 2:])
  return out


def _top_n(scores: jax.Array, n: int, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """The n best along axis 1 of scores[B,C], and the matching entries of arrays[B,C,...]."""
  top, idx = jax.lax.top_k(scores, n)
  pick = lambda a: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)
  return (top, *(pick(a) for a in arrays))


def beam_search(first_logits: jax.Array, cache: dict, extend: Callable, process: Callable,
                live: jax.Array, *, beam_size: int, max_decode_len: int, eos_id: int,
                length_penalty: jax.Array, constrain: Callable[[Any], Any]
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search from prefilled logits.

  Args:
    first_logits: float32[B,V] logits of the first generated token.
    cache: the prefilled cache of the B prompts.
    extend: (tokens int32[R], cache) -> (logits float32[R,V], cache), R = B * beam_size.
    process: (logits [R,V], tokens int32[R,M], step) -> masked logits [R,V].
    live: bool[B], False for batch-padding rows (done from the start).
    beam_size, max_decode_len, eos_id: n, M and the stop token.
    length_penalty: alpha (float32 scalar).
    constrain: applied to the loop state (sharding constraints).

  Returns:
    (tokens int32[B,M], logp float32[B,M]) of each example's best hypothesis (EOS included,
    0 after it), and the number of steps run (int32).
  """
  b, v = first_logits.shape
  n, m = beam_size, max_decode_len
  alpha = jnp.asarray(length_penalty, jnp.float32)
  neg_inf = jnp.float32(-jnp.inf)
  zeros = lambda dtype: jnp.zeros((b, n, m), dtype)
  # Only hypothesis 0 is real at the start: the others (copies of it) start at -inf so the
  # first step does not pick the same extension n times.
  live_sum = jnp.where(jnp.arange(n) == 0, 0.0, neg_inf)[None].repeat(b, axis=0)
  state = dict(i=jnp.int32(0), cache=_tile_cache(cache, n), live_tok=zeros(jnp.int32),
               live_logp=zeros(jnp.float32), live_sum=live_sum, fin_tok=zeros(jnp.int32),
               fin_logp=zeros(jnp.float32), fin_score=jnp.full((b, n), neg_inf), done=~live)

  def select(s, logits):
    i = s["i"]
    logits = process(logits, s["live_tok"].reshape(b * n, m), i)
    logprobs = jax.nn.log_softmax(logits, axis=-1).reshape(b, n, v)
    total = s["live_sum"][..., None] + logprobs  # [B,n,V]
    at_i = jax.nn.one_hot(i, m, dtype=jnp.bool_)  # [M]: where this step's token goes.

    # Hypotheses that end here with EOS join the finished pool.
    eos_tok = jnp.where(at_i, eos_id, s["live_tok"])
    eos_logp = jnp.where(at_i, logprobs[..., eos_id, None], s["live_logp"])
    eos_score = total[..., eos_id] / length_norm(i + 1, alpha)
    fin_score, fin_tok, fin_logp = _top_n(
        jnp.concatenate([s["fin_score"], eos_score], axis=1), n,
        jnp.concatenate([s["fin_tok"], eos_tok], axis=1),
        jnp.concatenate([s["fin_logp"], eos_logp], axis=1))

    # The n best non-EOS extensions: the top n of each hypothesis, then of those n*k.
    k = min(n, v)
    cand, cand_tok = jax.lax.top_k(total.at[..., eos_id].set(neg_inf), k)  # [B,n,k]
    cand_logp = jnp.take_along_axis(logprobs, cand_tok, axis=2)
    parent_of = jnp.broadcast_to(jnp.arange(n)[:, None], (b, n, k))
    flat = lambda a: a.reshape(b, n * k)
    live_sum, tok, parent, tok_logp = _top_n(flat(cand), n, flat(cand_tok), flat(parent_of),
                                             flat(cand_logp))
    take = lambda a: jnp.take_along_axis(a, parent[..., None], axis=1)
    live_tok = jnp.where(at_i, tok[..., None], take(s["live_tok"]))
    live_logp = jnp.where(at_i, tok_logp[..., None], take(s["live_logp"]))

    # Done when no live hypothesis can beat the best finished one: sums only decrease, so
    # a live one's best future score is live_sum / the largest lp(len) over len in i+2..M.
    best_norm = jnp.maximum(length_norm(i + 2, alpha), length_norm(jnp.int32(m), alpha))
    bound = live_sum.max(axis=1) / best_norm
    done = s["done"] | (fin_score[:, 0] >= bound)
    return constrain(dict(i=i + 1, cache=_gather_cache(s["cache"], parent), live_tok=live_tok,
                          live_logp=live_logp, live_sum=live_sum, fin_tok=fin_tok,
                          fin_logp=fin_logp, fin_score=fin_score, done=done))

  state = select(state, jnp.repeat(first_logits, n, axis=0))

  def cond(s):
    return (s["i"] < m) & ~jnp.all(s["done"])

  def body(s):
    tokens = jax.lax.dynamic_index_in_dim(s["live_tok"], s["i"] - 1, 2, keepdims=False)
    logits, cache = extend(tokens.reshape(b * n), s["cache"])
    return select({**s, "cache": cache}, logits)

  s = jax.lax.while_loop(cond, body, state)
  # Live hypotheses that reached M tokens are complete; earlier exits leave them out (a
  # shorter live one is not a candidate, and cannot beat the pool anyway).
  live_score = jnp.where(s["i"] >= m, s["live_sum"] / length_norm(jnp.int32(m), alpha), neg_inf)
  _, tok, logp = _top_n(jnp.concatenate([s["fin_score"], live_score], axis=1), 1,
                        jnp.concatenate([s["fin_tok"], s["live_tok"]], axis=1),
                        jnp.concatenate([s["fin_logp"], s["live_logp"]], axis=1))
  return tok[:, 0], logp[:, 0], s["i"]
