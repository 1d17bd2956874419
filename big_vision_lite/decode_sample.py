"""Greedy and sampled decoding inside one `jax.lax.while_loop` (used by decode.Decoder).

Sampling follows HF transformers' warper order: temperature, then top-k, then top-p on what
is left. Reported log-probs are those of the masked logits (before temperature / top-k /
top-p), as big_vision reports them.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def mask_logits(logits: jax.Array, tokens: jax.Array, step: jax.Array,
                token_mask: jax.Array | None, logits_fn: Callable | None) -> jax.Array:
  """float32[B,V] -> the logits the sampler sees: logits_fn, then token_mask (bool[V]);
  masked entries are -inf."""
  if logits_fn is not None:
    logits = logits_fn(logits, tokens, step).astype(jnp.float32)
  if token_mask is not None:
    logits = jnp.where(token_mask[None, :], logits, -jnp.inf)
  return logits


def sample(logits: jax.Array, rng: jax.Array, temperature: jax.Array, top_k: int,
           top_p: jax.Array | None) -> jax.Array:
  """Draws int32[B] from float32[B,V] logits: temperature, then top-k, then top-p (nucleus).

  top-p keeps the smallest set of most likely tokens whose probability reaches top_p (the
  most likely token always); tokens tied with the last kept one are kept too.
  """
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p is not None:
    desc = jnp.sort(logits, axis=-1, descending=True)
    probs = jax.nn.softmax(desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # mass before this token
    num_keep = jnp.maximum(keep.sum(axis=-1, keepdims=True), 1)
    cutoff = jnp.take_along_axis(desc, num_keep - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_loop(first_logits: jax.Array, cache: Any, extend: Callable, process: Callable,
                live: jax.Array, *, max_decode_len: int, eos_id: int, greedy: bool,
                rng: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array | None,
                constrain: Callable[[Any], Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Greedy (argmax) or sampled decoding from prefilled logits.

  Args:
    first_logits: float32[B,V] logits of the first generated token.
    cache: the prefilled cache of the B prompts.
    extend: (tokens int32[B], cache) -> (logits float32[B,V], cache).
    process: (logits [B,V], tokens int32[B,M], step) -> masked logits [B,V].
    live: bool[B], False for batch-padding rows (done from the start).
    max_decode_len, eos_id: M and the stop token.
    greedy: argmax; else `sample` with rng folded with the step, temperature, top_k (0 =
      off) and top_p (None = off).
    constrain: applied to the loop state (sharding constraints).

  Returns:
    tokens int32[B,M] (EOS included, 0 after it), their logp float32[B,M] (0 after EOS),
    and the number of steps run (int32; < M when every row stopped early).
  """
  b, m = first_logits.shape[0], max_decode_len

  def pick(state, logits):
    i, tokens, logp, done, cache = state
    logits = process(logits, tokens, i)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    if greedy:
      tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      tok = sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    tok_logp = jnp.take_along_axis(logprobs, tok[:, None], axis=-1)[:, 0]
    # Rows that are done (EOS already produced, or batch padding) write 0 and stay done.
    tok = jnp.where(done, 0, tok)
    tokens = tokens.at[:, i].set(tok)
    logp = logp.at[:, i].set(jnp.where(done, 0.0, tok_logp))
    return constrain((i + 1, tokens, logp, done | (tok == eos_id), cache))

  state = pick((jnp.int32(0), jnp.zeros((b, m), jnp.int32), jnp.zeros((b, m), jnp.float32),
                ~live, cache), first_logits)

  def cond(state):
    i, _, _, done, _ = state
    return (i < m) & ~jnp.all(done)

  def body(state):
    i, tokens, logp, done, cache = state
    logits, cache = extend(jax.lax.dynamic_index_in_dim(tokens, i - 1, 1, keepdims=False), cache)
    return pick((i, tokens, logp, done, cache), logits)

  steps, tokens, logp, _, _ = jax.lax.while_loop(cond, body, state)
  return tokens, logp, steps
