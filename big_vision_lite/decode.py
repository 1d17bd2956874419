"""Batched, cached decoding: prefill [image + prompt] once, then one jitted loop over tokens.

    tokens = generate(model_config, params, images, prompts, max_decode_len=32)
    decoder = Decoder(model_config, mesh=mesh)      # keeps its compiled functions
    out = decoder.decode(params, images, prompts, max_decode_len=32, sampler="sample",
                         rng=jax.random.key(0), top_p=0.9)   # DecodeOutput (numpy arrays)

`prompts` are ragged token-id lists (bos + prefix + "\\n" separator); they are right-padded
to a multiple of `prompt_bucket` so that calls with other prompt lengths reuse the compiled
function. The whole generation (every step, sampling, EOS bookkeeping, early exit when all
examples are done) runs in one `jax.lax.while_loop` inside one `jax.jit`: no host round trip
per token.

Samplers: "greedy" (argmax) and "sample" (temperature, then top-k, then top-p, as in HF
transformers) in decode_sample.py; beam search when beam_size > 1 in decode_beam.py.
big_vision's sampler strings "temperature(t)" and "nucleus(p)" are accepted too.
Log-probs: each token's log-probability under the model's distribution after the logit mask
(allowed_tokens / forbidden_tokens / logits_fn), i.e. log_softmax of the masked logits;
temperature, top-k and top-p change what is drawn, not the reported log-probs (as big_vision).
A sequence's score is the sum of its token log-probs, EOS included.

Axis legend: B batch (rows), T prompt length, M max_decode_len, V vocab.
"""
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from big_vision_lite import decode_beam
from big_vision_lite import decode_sample
from big_vision_lite import sharding as sharding_lib
from big_vision_lite.models import paligemma

LogitsFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
_SAMPLERS = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the compiled loop depends on (hashable: one jitted function per distinct value)."""
  max_decode_len: int
  sampler: str
  beam_size: int
  top_k: int
  use_top_p: bool
  has_token_mask: bool
  logits_fn: LogitsFn | None
  eos_id: int


@dataclasses.dataclass
class DecodeOutput:
  """Decoding results for the B input rows (host numpy arrays).

  tokens:   int32[B,M] generated ids, EOS included, 0 after it.
  logp:     float32[B,M] log-probability of each token (0 after EOS).
  lengths:  int32[B] number of tokens before EOS (= M when none was produced).
  finished: bool[B] whether EOS was produced.
  scores:   float32[B] sum of logp over the tokens up to and including EOS (beam search
            ranks by the length-penalised score; this is the plain sum).
  steps:    decoding steps the loop ran (< M when every row stopped early).
  """
  tokens: np.ndarray
  logp: np.ndarray
  lengths: np.ndarray
  finished: np.ndarray
  scores: np.ndarray
  steps: int

  def token_lists(self) -> list[list[int]]:
    """The generated ids of each row, EOS and everything after it excluded."""
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def parse_sampler(sampler: str) -> tuple[str, dict[str, float]]:
  """"greedy" | "sample" | "beam" | big_vision's "temperature(t)" / "nucleus(p)" ->
  (kind, settings implied by the string)."""
  if not isinstance(sampler, str):
    raise TypeError(f"sampler must be a str such as 'greedy', got {sampler!r}")
  if sampler in _SAMPLERS:
    return sampler, {}
  m = re.fullmatch(r"\s*(temperature|nucleus)\(\s*(?:[tp]\s*=\s*)?([0-9.eE+-]+)\s*\)\s*", sampler)
  if not m:
    raise ValueError(f"sampler={sampler!r}: expected one of {_SAMPLERS}, 'temperature(t)' or "
                     "'nucleus(p)'")
  key = "temperature" if m.group(1) == "temperature" else "top_p"
  try:
    return "sample", {key: float(m.group(2))}
  except ValueError:
    raise ValueError(f"sampler={sampler!r}: {m.group(2)!r} is not a number") from None


def _freeze(x: Any) -> Any:
  """A hashable form of a (nested) config (dicts, lists, ml_collections.ConfigDict)."""
  x = x.to_dict() if hasattr(x, "to_dict") else x
  if isinstance(x, Mapping):
    return tuple(sorted((str(k), _freeze(v)) for k, v in x.items()))
  if isinstance(x, (list, tuple)):
    return tuple(_freeze(v) for v in x)
  return x


class Decoder:
  """Compiled decoding for one model config (and optionally a mesh).

  Holds one jitted function per sampler setting (`_Static`); jax caches the compiled
  executables per input shapes. Prompts are padded to a multiple of `prompt_bucket` and the
  batch to a multiple of the mesh's data shards, so repeated calls reuse compilations.

  With a mesh, params may be sharded in any way (e.g. FSDP from sharding.py; pass them
  already placed) and the batch is split over `data_axes` (default: those of "data" /
  "fsdp" the mesh has). In a multi-process run every process passes its own rows (the same
  number on every process) and gets its own rows back; all processes must call together.
  compiler_options go to jax.jit (e.g. {"xla_backend_optimization_level": 0} compiles ~3x
  faster on CPU, for tests). The KV cache uses model_config llm.cache_dtype.
  """

  def __init__(self, model_config: Mapping[str, Any], *, mesh: jax.sharding.Mesh | None = None,
               data_axes: Sequence[str] | None = None, prompt_bucket: int = 16,
               compiler_options: Mapping[str, Any] | None = None):
    if hasattr(model_config, "to_dict"):
      model_config = model_config.to_dict()
    self.model_config = dict(model_config)
    self.resolved_config = paligemma.resolve_config(self.model_config)
    self.model = paligemma.Model(**self.model_config)
    self.vocab_size = self.resolved_config["llm"]["vocab_size"]
    if not isinstance(prompt_bucket, int) or prompt_bucket < 1:
      raise ValueError(f"Decoder: prompt_bucket={prompt_bucket!r}: expected a positive int")
    self.prompt_bucket = prompt_bucket
    self.mesh = mesh
    self.compiler_options = dict(compiler_options or {})
    self.trace_count = 0  # Traces of the decoding function so far (tests check reuse).
    self._fns: dict[_Static, Callable] = {}
    if mesh is None:
      self._batch_sharding, self._row_multiple = None, 1
    else:
      axes = sharding_lib._data_axes(mesh, data_axes)  # pylint: disable=protected-access
      self._data_axes = axes
      self._batch_sharding = NamedSharding(mesh, P(axes))
      shards = math.prod(mesh.shape[a] for a in axes)
      self._row_multiple = max(1, shards // jax.process_count())

  # ------------------------------------------------------------------------- device side

  def _constrain(self, tree: Any) -> Any:
    """Keeps loop-carried arrays split over the data axes along their batch axis."""
    if self.mesh is None:
      return tree

    def one(path, x):
      axis = decode_beam.CACHE_BATCH_AXIS.get(getattr(path[-1], "key", None), 0) if path else 0
      sharding = NamedSharding(self.mesh, P(*[None] * axis, self._data_axes))
      return x if x.ndim == 0 else jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree_util.tree_map_with_path(one, tree)

  def _run(self, st: _Static, params, images, text, input_mask, live, token_mask, rng,
           temperature, top_p, length_penalty):
    self.trace_count += 1
    model, variables = self.model, {"params": params}
    n_img = jax.eval_shape(
        lambda p, im: model.apply({"params": p}, im, method=model.embed_image)[0],
        params, images).shape[1]
    # The last token is never fed back, so M - 1 cache slots suffice for the generated ones.
    cache_size = n_img + text.shape[1] + st.max_decode_len - 1
    logits, cache = model.apply(variables, images, text, jnp.zeros_like(text), input_mask,
                                method=model.prefill, cache_size=cache_size)
    cache = self._constrain(cache)

    def extend(tokens, cache):
      logits, cache = model.apply(variables, tokens, cache, method=model.extend)
      return logits, self._constrain(cache)

    mask = token_mask if st.has_token_mask else None
    process = functools.partial(decode_sample.mask_logits, token_mask=mask,
                                logits_fn=st.logits_fn)
    common = dict(max_decode_len=st.max_decode_len, eos_id=st.eos_id, constrain=self._constrain)
    if st.sampler == "beam":
      return decode_beam.beam_search(logits, cache, extend, process, live,
                                     beam_size=st.beam_size, length_penalty=length_penalty,
                                     **common)
    return decode_sample.sample_loop(
        logits, cache, extend, process, live, greedy=st.sampler == "greedy", rng=rng,
        temperature=temperature, top_k=st.top_k, top_p=top_p if st.use_top_p else None,
        **common)

  def _fn(self, st: _Static) -> Callable:
    if st not in self._fns:
      kw = {"compiler_options": self.compiler_options or None}
      if self.mesh is not None:
        rows = self._batch_sharding
        kw["out_shardings"] = (rows, rows, NamedSharding(self.mesh, P()))
      self._fns[st] = jax.jit(functools.partial(self._run, st), **kw)
    return self._fns[st]

  # --------------------------------------------------------------------------- host side

  def _static(self, max_decode_len, sampler, beam_size, temperature, top_k, top_p,
              token_mask, logits_fn, eos_id, rng) -> tuple[_Static, float, float]:
    kind, implied = parse_sampler(sampler)
    given = {"temperature": temperature, "top_p": top_p}
    for key, value in implied.items():
      if given[key] not in (1.0, value):
        raise ValueError(f"sampler={sampler!r} sets {key}={value} but {key}={given[key]} was "
                         "passed too")
    temperature, top_p = implied.get("temperature", temperature), implied.get("top_p", top_p)
    if not isinstance(max_decode_len, int) or max_decode_len < 1:
      raise ValueError(f"max_decode_len={max_decode_len!r}: expected a positive int")
    if not isinstance(beam_size, int) or beam_size < 1:
      raise ValueError(f"beam_size={beam_size!r}: expected a positive int")
    if beam_size > 1 and kind == "sample":
      raise ValueError(f"beam_size={beam_size} with sampler={sampler!r}: beam search is "
                       "deterministic; use sampler='greedy' (or 'beam')")
    if beam_size > 1:
      kind = "beam"
    if not temperature > 0:
      raise ValueError(f"temperature={temperature!r}: expected > 0")
    if not isinstance(top_k, int) or not 0 <= top_k <= self.vocab_size:
      raise ValueError(f"top_k={top_k!r}: expected an int in [0, {self.vocab_size}] (0 = off)")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p!r}: expected 0 < top_p <= 1 (1 = off)")
    if not 0 <= eos_id < self.vocab_size:
      raise ValueError(f"eos_id={eos_id!r}: expected an id in [0, {self.vocab_size})")
    if logits_fn is not None and not callable(logits_fn):
      raise TypeError(f"logits_fn must be callable (logits, tokens, step) -> logits, got "
                      f"{type(logits_fn).__name__}")
    if kind == "sample" and rng is None:
      raise ValueError(f"sampler={sampler!r} draws random tokens: pass rng=jax.random.key(...)")
    st = _Static(max_decode_len, kind, beam_size, top_k if kind == "sample" else 0,
                 kind == "sample" and top_p < 1, token_mask is not None, logits_fn, int(eos_id))
    return st, float(temperature), float(top_p)

  def _token_mask(self, allowed_tokens, forbidden_tokens) -> np.ndarray | None:
    """bool[V] of the tokens that may be generated, or None (all)."""
    if allowed_tokens is None and not forbidden_tokens:
      return None
    v = self.vocab_size
    mask = np.ones(v, bool)
    if allowed_tokens is not None:
      allowed = np.asarray(allowed_tokens)
      if allowed.dtype != bool or allowed.shape != (v,):
        raise ValueError(f"allowed_tokens: expected bool[{v}] (the model's vocab_size), got "
                         f"{allowed.dtype}{list(allowed.shape)}")
      mask &= allowed
    forbidden = np.asarray(list(forbidden_tokens), np.int64)
    if forbidden.size and (forbidden.min() < 0 or forbidden.max() >= v):
      raise ValueError(f"forbidden_tokens: ids must be in [0, {v}), got {forbidden_tokens!r}")
    mask[forbidden] = False
    if not mask.any():
      raise ValueError("allowed_tokens / forbidden_tokens leave no token to generate")
    return mask

  def _prompt_arrays(self, prompts, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32[B,T] and its bool[B,T] mask, T a multiple of prompt_bucket."""
    if len(prompts) != batch:
      raise ValueError(f"prompts: got {len(prompts)} prompts for {batch} images")
    for i, p in enumerate(prompts):
      arr = np.asarray(p)
      if arr.ndim != 1 or not arr.size or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {p!r}")
      if arr.min() < 0 or arr.max() >= self.vocab_size:
        raise ValueError(f"prompts[{i}]: token ids must be in [0, {self.vocab_size}), got "
                         f"{arr.min()}..{arr.max()}")
    longest = max(len(p) for p in prompts)
    if jax.process_count() > 1:  # Every process must compile the same shapes.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      sizes = multihost_utils.process_allgather(np.array([batch, longest]))
      if len(set(sizes[:, 0].tolist())) > 1:
        raise ValueError(f"Decoder: every process must pass the same number of rows, got "
                         f"{sizes[:, 0].tolist()}")
      longest = int(sizes[:, 1].max())
    t = -(-longest // self.prompt_bucket) * self.prompt_bucket
    text = np.zeros((batch, t), np.int32)
    mask = np.zeros((batch, t), bool)
    for i, p in enumerate(prompts):
      text[i, :len(p)], mask[i, :len(p)] = p, True
    return text, mask

  def _put_rows(self, x: np.ndarray) -> Any:
    if self.mesh is None:
      return x
    return jax.make_array_from_process_local_data(self._batch_sharding, x)

  def _local_rows(self, x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order."""
    if self.mesh is None:
      return np.asarray(jax.device_get(x))
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)], axis=0)

  def decode(self, params: Any, images: Any, prompts: Sequence[Sequence[int]], *,
             max_decode_len: int, sampler: str = "greedy", beam_size: int = 1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, length_penalty: float = 0.0,
             allowed_tokens: Any = None, forbidden_tokens: Sequence[int] = (),
             logits_fn: LogitsFn | None = None, eos_id: int = 1) -> DecodeOutput:
    """Generates up to max_decode_len tokens after each prompt.

    Args:
      params: the model's parameter tree ({"img": ..., "llm": ...}), optionally sharded.
      images: float32[B,H,W,3] (or [B,F,H,W,3]) in [-1, 1].
      prompts: B token-id lists (bos + prefix + "\\n"), any lengths.
      max_decode_len: M, the most tokens generated per example (EOS included).
      sampler: "greedy", "sample" (uses temperature / top_k / top_p and rng), "beam", or
        big_vision's "temperature(t)" / "nucleus(p)".
      beam_size: > 1 runs beam search (decode_beam.py).
      temperature, top_k, top_p: sampling settings (top_k 0 and top_p 1 are off).
      rng: a jax PRNG key; needed when sampling. Results do not depend on the mesh.
      length_penalty: beam search alpha: scores are sum(logp) / ((5 + len) / 6) ** alpha
        (GNMT, Wu et al. 2016; as T5X / flax), len counting EOS; 0 (default) ranks by
        plain log-prob sums as big_vision's beam decoder.
      allowed_tokens: bool[V], False for tokens that must never be generated (e.g. only
        <loc> tokens); forbidden_tokens: ids that must never be generated. Keep eos_id
        allowed if decoding should be able to stop early.
      logits_fn: optional (logits float32[R,V], tokens int32[R,M] generated so far (0 from
        the current step on), step int32) -> float32[R,V], applied before the masks; R is B
        (B * beam_size in beam search). Part of the compile key: reuse the same function.
      eos_id: the token that ends a sequence (Gemma: 1).

    Returns:
      A DecodeOutput for the B rows.
    """
    token_mask = self._token_mask(allowed_tokens, forbidden_tokens)
    if not isinstance(length_penalty, (int, float)):
      raise ValueError(f"length_penalty={length_penalty!r}: expected a number (alpha)")
    st, temperature, top_p = self._static(max_decode_len, sampler, beam_size, temperature,
                                          top_k, top_p, token_mask, logits_fn, eos_id, rng)
    images = np.asarray(images, np.float32)
    if images.ndim not in (4, 5) or images.shape[-1] != 3:
      raise ValueError(f"images: expected float32[B,H,W,3] or [B,F,H,W,3], got shape "
                       f"{images.shape}")
    b = images.shape[0]
    if b == 0:
      raise ValueError("Decoder.decode: got an empty batch")
    text, input_mask = self._prompt_arrays(prompts, b)
    pad = -(-b // self._row_multiple) * self._row_multiple - b
    live = np.arange(b + pad) < b
    if pad:  # Padding rows repeat the last real one and are done from the start.
      rep = lambda x: np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
      images, text, input_mask = rep(images), rep(text), rep(input_mask)
    rng = jax.random.key(0) if rng is None else rng
    tokens, logp, steps = self._fn(st)(
        params, self._put_rows(images), self._put_rows(text), self._put_rows(input_mask),
        self._put_rows(live), None if token_mask is None else jnp.asarray(token_mask), rng,
        jnp.float32(temperature), jnp.float32(top_p), jnp.float32(length_penalty))
    tokens, logp = self._local_rows(tokens)[:b], self._local_rows(logp)[:b]
    is_eos = tokens == st.eos_id
    finished = is_eos.any(axis=1)
    lengths = np.where(finished, is_eos.argmax(axis=1), tokens.shape[1]).astype(np.int32)
    return DecodeOutput(tokens=tokens, logp=logp, lengths=lengths, finished=finished,
                        scores=logp.sum(axis=1), steps=int(jax.device_get(steps)))

  def generate(self, params: Any, images: Any, prompts: Sequence[Sequence[int]], *,
               return_scores: bool = False, **kwargs
               ) -> list[list[int]] | tuple[list[list[int]], list[float]]:
    """Like `decode`, but returns token-id lists (EOS excluded) [and their log-prob sums]."""
    out = self.decode(params, images, prompts, **kwargs)
    if return_scores:
      return out.token_lists(), out.scores.tolist()
    return out.token_lists()


_DECODERS: dict[Any, Decoder] = {}
_MAX_DECODERS = 8


def get_decoder(model_config: Mapping[str, Any], *, mesh: jax.sharding.Mesh | None = None,
                data_axes: Sequence[str] | None = None, prompt_bucket: int = 16) -> Decoder:
  """A Decoder shared by every caller with an equal config and mesh (module-level cache)."""
  key = (_freeze(model_config), mesh, None if data_axes is None else tuple(data_axes),
         prompt_bucket)
  if key not in _DECODERS:
    if len(_DECODERS) >= _MAX_DECODERS:  # Oldest first: dicts keep insertion order.
      del _DECODERS[next(iter(_DECODERS))]
    _DECODERS[key] = Decoder(model_config, mesh=mesh, data_axes=data_axes,
                             prompt_bucket=prompt_bucket)
  return _DECODERS[key]


def generate(model_config: Mapping[str, Any], params: Any, images: Any,
             prompts: Sequence[Sequence[int]], max_decode_len: int = 32,
             sampler: str = "greedy", beam_size: int = 1, *, return_scores: bool = False,
             mesh: jax.sharding.Mesh | None = None, **kwargs
             ) -> list[list[int]] | tuple[list[list[int]], list[float]]:
  """Decodes a batch; returns the generated token-id lists (EOS excluded).

  See Decoder.decode for the arguments. The compiled functions are cached per model config
  (and mesh), so repeated calls do not recompile. return_scores=True also returns each
  sequence's log-prob sum (EOS included).
  """
  decoder = get_decoder(model_config, mesh=mesh)
  return decoder.generate(params, images, prompts, max_decode_len=max_decode_len,
                          sampler=sampler, beam_size=beam_size, return_scores=return_scores,
                          **kwargs)


def make_predict_fn(decoder: Decoder, params: Any, tokenizer: Any, *, max_decode_len: int,
                    batch_size: int, rng: jax.Array | None = None, **decode_kwargs
                    ) -> Callable[[list[dict[str, Any]]], list[str]]:
  """An evaluator predict_fn: list of {"image": float32[H,W,3], "prefix": str} -> texts.

  Prompts are [bos] + encode(prefix) + encode("\\n"); every call decodes batches of exactly
  `batch_size` rows (the last example repeated, padded outputs dropped), so one compiled
  function serves the whole evaluation. With rng, call c samples with fold_in(rng, c).
  In multi-process runs an empty list still runs one (dummy) batch, so that processes
  stay in lock-step, and returns []; give at most batch_size examples per call there.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"make_predict_fn: batch_size={batch_size!r}: expected a positive int")
  sep = tokenizer.encode("\n")
  calls = [0]
  size = decoder.resolved_config["img"]["image_size"]
  last_shape = [(size, size, 3)]

  def run(images, prompts):
    kw = dict(decode_kwargs)
    if rng is not None:
      kw["rng"] = jax.random.fold_in(rng, calls[0])
    calls[0] += 1
    n = len(prompts)
    images = images + [images[-1]] * (batch_size - n)
    prompts = prompts + [prompts[-1]] * (batch_size - n)
    kw.setdefault("eos_id", tokenizer.eos_id)
    out = decoder.decode(params, np.stack(images), prompts, max_decode_len=max_decode_len, **kw)
    return [tokenizer.decode(t) for t in out.token_lists()[:n]]

  def predict_fn(examples: list[dict[str, Any]]) -> list[str]:
    if not examples:
      if jax.process_count() > 1:
        run([np.zeros(last_shape[0], np.float32)], [[tokenizer.bos_id, *sep]])
      return []
    texts = []
    for start in range(0, len(examples), batch_size):
      chunk = examples[start:start + batch_size]
      images, prompts = [], []
      for ex in chunk:
        if "image" not in ex or "prefix" not in ex:
          raise KeyError(f"predict_fn: example {ex.get('id', '?')!r} needs 'image' and "
                         f"'prefix', has {sorted(ex)}")
        images.append(np.asarray(ex["image"], np.float32))
        prompts.append([tokenizer.bos_id, *tokenizer.encode(ex["prefix"]), *sep])
      last_shape[0] = images[-1].shape
      texts += run(images, prompts)
    return texts

  return predict_fn
