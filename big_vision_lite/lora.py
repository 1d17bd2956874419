"""LoRA: low-rank adapters kept in their own tree, applied to the params in the train step.

W' = W + alpha / rank * (A @ B), with A initialised uniformly in +-1/sqrt(fan_in)
and B at zero (so step 0 is the base model exactly). The model code never sees
LoRA: the train step calls `apply_lora(base, lora, ...)` and differentiates with
respect to `lora` only (the base stays frozen and takes no optimizer state).

Factorisation of a weight with more than two dims: each layout rule names the
'in' dims (contracted with the layer input) and the 'out' dims (the layer's
output), counted from the end so one rule fits the scanned [L, ...] and the
unscanned layout. Every other dim is a batch dim with its own adapter: the
scan axis L, and the stacked k/v (kv_einsum), q/k/v (qkv_einsum) and gate/up
(gating_einsum) projections, so "q, k, v, gate, up" each get their own rank-r
adapter as in HF PEFT. With I = prod(in dims), O = prod(out dims):
  a: [*batch, I, r],  b: [*batch, r, O]
e.g. q_einsum/w [L, N, D, H]: a [L, D, r], b [L, r, N*H];
kv_einsum/w [L, 2, K, D, H]: a [L, 2, D, r], b [L, 2, r, K*H];
attn_vec_einsum/w [L, N, H, D]: a [L, N*H, r], b [L, r, D].

The LoRA tree mirrors the nesting of params: lora["llm"]["layers"]["attn"]
["q_einsum"]["w"] = {"a": ..., "b": ...}, only for the targeted params.
"""
from collections.abc import Sequence
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Layout = tuple[str, tuple[int, ...], tuple[int, ...]]  # (regex, in dims, out dims)

LORA_LAYOUTS: Sequence[Layout] = (
    (r".*attn/q_einsum/w", (-2,), (-3, -1)),  # [L, N, D, H]
    (r".*attn/(kv|qkv)_einsum/w", (-2,), (-3, -1)),  # [L, 2|3, K, D, H]
    (r".*attn/attn_vec_einsum/w", (-3, -2), (-1,)),  # [L, N, H, D]
    (r".*mlp/gating_einsum", (-2,), (-1,)),  # [L, 2, D, F]
    (r".*mlp/linear", (-2,), (-1,)),  # [L, F, D]
    (r".*embedder/input_embedding", (-2,), (-1,)),  # [V, D]
    (r".*MultiHeadDotProductAttention_0/(query|key|value)/kernel", (-3,), (-2, -1)),  # [L, W, n, h]
    (r".*MultiHeadDotProductAttention_0/out/kernel", (-3, -2), (-1,)),  # [L, n, h, W]
    (r".*img/embedding/kernel", (-4, -3, -2), (-1,)),  # conv HWIO [P, P, 3, W]
    (r".*/kernel", (-2,), (-1,)),  # Dense [L, in, out] and img/head [W, D]
)

# Attention and MLP projections of the Gemma decoder (the usual PaliGemma LoRA).
LLM_TARGETS = (r"llm/layers/(\d+/)?(attn/(q_einsum|kv_einsum|qkv_einsum|attn_vec_einsum)/w"
               r"|mlp/(gating_einsum|linear))")


def _name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _layout(name: str, shape: tuple[int, ...], layouts: Sequence[Layout]):
  """(batch dims, in dims, out dims) as non-negative indices of `shape`."""
  for pattern, ins, outs in layouts:
    if re.fullmatch(pattern, name):
      if any(not -len(shape) <= d < 0 for d in (*ins, *outs)):
        raise ValueError(f"LoRA layout {pattern!r} ({ins} -> {outs}) does not fit param "
                         f"{name} of shape {shape}")
      ins, outs = tuple(d % len(shape) for d in ins), tuple(d % len(shape) for d in outs)
      batch = tuple(d for d in range(len(shape)) if d not in ins + outs)
      return batch, ins, outs
  raise ValueError(f"LoRA target {name} {shape} has no layout: add (regex, in dims, out dims) "
                   "to the layouts")


def _targets(params: Any, targets: str) -> dict[str, Any]:
  try:
    pattern = re.compile(targets)
  except (TypeError, re.error) as e:
    raise ValueError(f"LoRA targets {targets!r} is not a regex: {e}") from e
  flat = {_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  hits = {n: x for n, x in flat.items() if pattern.fullmatch(n)}
  if not hits:
    raise ValueError(f"LoRA targets {targets!r} match no param (names look like "
                     f"{sorted(flat)[:3]} ...)")
  small = [n for n, x in hits.items() if np.ndim(x) < 2]
  if small:
    raise ValueError(f"LoRA targets {targets!r} match params with < 2 dims: {small}")
  return hits


def _insert(tree: dict, name: str, value: Any) -> None:
  *parents, leaf = name.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def init_lora(rng: jax.Array, params: Any, *, rank: int, targets: str = LLM_TARGETS,
              layouts: Sequence[Layout] = LORA_LAYOUTS) -> dict:
  """Creates the LoRA tree for the params whose "/"-joined name fullmatches `targets`.

  Args:
    rng: PRNG key.
    params: nested dicts of arrays or jax.ShapeDtypeStruct (only shapes/dtypes used).
    rank: r.
    targets: regex over param names.
    layouts: (regex, in dims, out dims) table, first match wins.
  Returns:
    {...nested like params...: {"a": dtype[*batch, I, r] uniform(+-1/sqrt(I)),
                                "b": dtype[*batch, r, O] zeros}}, dtype = the param's.
  """
  if rank < 1:
    raise ValueError(f"LoRA rank must be >= 1, got {rank}")
  hits = _targets(params, targets)
  lora = {}
  for key, (name, x) in zip(jax.random.split(rng, len(hits)), sorted(hits.items())):
    shape = tuple(x.shape)
    batch, ins, outs = _layout(name, shape, layouts)
    bshape = tuple(shape[d] for d in batch)
    fan_in, fan_out = math.prod(shape[d] for d in ins), math.prod(shape[d] for d in outs)
    bound = 1.0 / math.sqrt(fan_in)
    a = jax.random.uniform(key, (*bshape, fan_in, rank), jnp.float32, -bound, bound)
    _insert(lora, name, {"a": a.astype(x.dtype), "b": jnp.zeros((*bshape, rank, fan_out), x.dtype)})
  return lora


def lora_delta(w_shape: tuple[int, ...], a: jax.Array, b: jax.Array, name: str,
               layouts: Sequence[Layout] = LORA_LAYOUTS) -> jax.Array:
  """float32[w_shape]: A @ B arranged like the weight (without the alpha / r scale)."""
  batch, ins, outs = _layout(name, w_shape, layouts)
  bshape = tuple(w_shape[d] for d in batch)
  fan_in, fan_out = math.prod(w_shape[d] for d in ins), math.prod(w_shape[d] for d in outs)
  if a.shape[:-1] != (*bshape, fan_in) or b.shape[-2:] != (a.shape[-1], fan_out) or (
      b.shape[:-2] != bshape):
    raise ValueError(f"LoRA of {name} {w_shape}: a {a.shape} / b {b.shape} do not match "
                     f"[*{bshape}, {fan_in}, r] / [*{bshape}, r, {fan_out}]")
  delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
  delta = delta.reshape(*bshape, *(w_shape[d] for d in ins), *(w_shape[d] for d in outs))
  return jnp.transpose(delta, np.argsort(batch + ins + outs))


def apply_lora(base_params: Any, lora_params: dict, alpha: float, rank: int,
               layouts: Sequence[Layout] = LORA_LAYOUTS) -> Any:
  """Effective params W + alpha / rank * A @ B (in W's dtype) for every LoRA'd param.

  Use inside the train step: `model.apply({"params": apply_lora(base, lora, ...)}, ...)`
  and take gradients with respect to `lora_params` only.
  """
  flat = {}
  for path, x in jax.tree_util.tree_flatten_with_path(lora_params)[0]:
    name = _name(path)
    owner, _, ab = name.rpartition("/")
    if ab not in ("a", "b"):
      raise ValueError(f"LoRA tree leaf {name} is not .../a or .../b")
    flat.setdefault(owner, {})[ab] = x
  seen = set()
  scale = alpha / rank

  def one(path, w):
    name = _name(path)
    if name not in flat:
      return w
    seen.add(name)
    a, b = flat[name]["a"], flat[name]["b"]
    if a.shape[-1] != rank:
      raise ValueError(f"LoRA of {name}: a {a.shape} has rank {a.shape[-1]}, expected {rank}")
    delta = lora_delta(tuple(w.shape), a, b, name, layouts)
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

  out = jax.tree_util.tree_map_with_path(one, base_params)
  missing = sorted(set(flat) - seen)
  if missing:
    raise ValueError(f"LoRA params {missing} have no base param of that name")
  return out


def merge_lora(base_params: Any, lora_params: dict, alpha: float, rank: int,
               layouts: Sequence[Layout] = LORA_LAYOUTS) -> Any:
  """Plain params with the adapters folded in (for export/inference), in the base dtypes."""
  return jax.jit(apply_lora, static_argnums=(2, 3, 4))(
      base_params, lora_params, alpha, rank, tuple(layouts))
