"""Gemma 1 and Gemma 2 decoder: one module, flags for the Gemma 2 additions.

Parameter names and layouts are big_vision's (`models/ppp/gemma.py`), so its checkpoints
load unchanged. Gemma 2 adds post-attention / post-ffw norms, attention and final logit
soft-caps, sliding-window attention on even layers and per-variant query scaling.

Axis legend: B batch, T query length, S key length (cache size), L layers, N query heads,
K kv heads, G query heads per kv head (N = K*G), H head dim, D width, F mlp dim, V vocab.

The KV cache is an explicit pytree (see `init_cache`) that `prefill` fills and `extend`
advances one token at a time; keys are stored with their positions and validity so that
ragged (right-padded) prompts decode in one batch.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import matmul
from big_vision_lite.models.siglip import remat_policy

_GEMMA2 = dict(final_logits_softcap=30.0, attn_logits_softcap=50.0, post_norms=True,
               sliding_window=4096, query_pre_attn_norm="rsqrt_head_dim")

VARIANTS: dict[str, dict[str, Any]] = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_7b": dict(width=3072, depth=28, mlp_dim=24576, num_heads=16, num_kv_heads=16,
                     head_dim=256),
    "gemma2_2b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4,
                      head_dim=256, **_GEMMA2),
    "gemma2_9b": dict(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8,
                      head_dim=256, **_GEMMA2),
    "gemma2_27b": dict(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16,
                       head_dim=128, **{**_GEMMA2, "query_pre_attn_norm": "rsqrt_emb_per_head"}),
}

DEFAULTS: dict[str, Any] = dict(
    variant=None, vocab_size=257152, width=None, depth=None, mlp_dim=None, num_heads=None,
    num_kv_heads=None, head_dim=None, norm_eps=1e-6, final_logits_softcap=None,
    attn_logits_softcap=None, post_norms=False, query_pre_attn_norm="rsqrt_head_dim",
    sliding_window=None, scan=True, remat_policy="none", dropout=0.0, dropout_bdims=(),
    dtype="float32", param_dtype="float32", cache_dtype=None, embed_init_std=0.01,
)
_NUMBERS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim", "vocab_size")
_QUERY_NORMS = ("rsqrt_head_dim", "rsqrt_emb_per_head")
# big_vision's mask value: finite, so that a fully masked row (padding) gives a uniform softmax.
_NEG_INF = -2.3819763e38


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Fills a big_vision-style Gemma config from its variant and defaults; checks it."""
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"model.llm: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  out = dict(DEFAULTS)
  if (variant := cfg.get("variant")):
    if variant not in VARIANTS:
      raise ValueError(f"model.llm.variant={variant!r}: unknown; known: {sorted(VARIANTS)}")
    out.update(VARIANTS[variant])
  out.update({k: v for k, v in cfg.items() if v is not None or k not in _NUMBERS})
  for key in _NUMBERS:
    if not isinstance(out[key], int) or out[key] <= 0:
      raise ValueError(f"model.llm.{key}={out[key]!r}: expected a positive int (or a variant)")
  if out["num_heads"] % out["num_kv_heads"]:
    raise ValueError(f"model.llm: num_heads {out['num_heads']} is not a multiple of "
                     f"num_kv_heads {out['num_kv_heads']}")
  if out["query_pre_attn_norm"] not in _QUERY_NORMS:
    raise ValueError(f"model.llm.query_pre_attn_norm={out['query_pre_attn_norm']!r}: "
                     f"expected one of {_QUERY_NORMS}")
  for key in ("final_logits_softcap", "attn_logits_softcap", "sliding_window"):
    out[key] = out[key] or None  # 0 means off, as in big_vision's transfer configs.
  out["dropout_bdims"] = tuple(out["dropout_bdims"])
  return out


def make_attn_mask(input_mask: jax.Array, mask_ar: jax.Array) -> jax.Array:
  """big_vision's prefix-LM mask: bool[B,T,T], query i sees key j iff cumsum(mask_ar)[j] <= [i].

  Tokens with mask_ar 0 after the start share a block and see each other fully (image and
  prefix); mask_ar 1 starts a new block (the causal suffix). Invalid tokens see and are seen
  by nothing.
  """
  c = jnp.cumsum(mask_ar, axis=1)
  valid = input_mask.astype(bool)
  return (c[:, None, :] <= c[:, :, None]) & valid[:, None, :] & valid[:, :, None]


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float = 10_000.) -> jax.Array:
  """Rotary embedding of x[B,T,N,H] at int positions[B,T]; halves rotated as in Gemma."""
  h = x.shape[-1]
  timescale = max_wavelength ** (2 * jnp.arange(h // 2, dtype=jnp.float32) / h)
  radians = positions[..., None, None].astype(jnp.float32) / timescale[None, None, None]
  sin, cos = jnp.sin(radians), jnp.cos(radians)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def constrain(x: jax.Array) -> jax.Array:
  """Names the activation axes [batch, length, ...] for sharding.

  A no-op unless the caller sets `nn.logical_axis_rules` (and a mesh): the trainer maps
  "act_batch" to the data axes, so that with FSDP-sharded weights XLA still splits the
  activations over the batch instead of replicating them.
  """
  return nn.with_logical_constraint(x, ("act_batch", "act_len") + (None,) * (x.ndim - 2))


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  return x if not cap else jnp.tanh(x / cap) * cap


class RMSNorm(nn.Module):
  eps: float = 1e-6
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = (1 + scale.astype(jnp.float32)).reshape((1,) * (x.ndim - 1) + (-1,))
    return (normed * scale).astype(x.dtype)


class Einsum(nn.Module):
  """A weight `w` of the given shape, contracted with `jnp.einsum(eqn, x, w)`."""
  shape: tuple[int, ...]
  in_axis: tuple[int, ...]
  out_axis: tuple[int, ...]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, eqn, x):
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=self.in_axis,
                                            out_axis=self.out_axis, batch_axis=())
    w = self.param("w", init, self.shape, self.param_dtype)
    return matmul.einsum(eqn, x.astype(self.dtype), w.astype(self.dtype))


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  features: int
  query_scale: float
  attn_logits_softcap: float | None
  dtype: Any
  param_dtype: Any

  def setup(self):
    n, k, d, h = self.num_heads, self.num_kv_heads, self.features, self.head_dim
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if n == k:  # big_vision stores one fused projection for multi-head attention.
      self.qkv_einsum = Einsum((3, n, d, h), (2,), (0, 1, 3), **kw)
    else:
      self.q_einsum = Einsum((n, d, h), (1,), (0, 2), **kw)
      self.kv_einsum = Einsum((2, k, d, h), (2,), (0, 1, 3), **kw)
    self.attn_vec_einsum = Einsum((n, h, d), (0, 1), (2,), **kw)

  def __call__(self, x, positions, mask, kv_cache, cache_index):
    """x[B,T,D], positions int[B,T], mask bool[B,T,S] -> (out [B,T,D], (k, v) [B,S,K,H] or None).

    Without a cache S == T. With one, this step's keys/values are written at `cache_index`
    and the step attends over the whole cache (the mask says which entries are real).
    """
    if self.num_heads == self.num_kv_heads:
      q, k, v = self.qkv_einsum("BTD,SNDH->SBTNH", x)
    else:
      q = self.q_einsum("BTD,NDH->BTNH", x)
      k, v = self.kv_einsum("BSD,CKDH->CBSKH", x)
    q = apply_rope(q, positions) * jnp.asarray(self.query_scale, q.dtype)
    k = apply_rope(k, positions)
    if kv_cache is not None:
      ck, cv = kv_cache
      k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
      kv_cache = (k, v)
    b, t, _, h = q.shape
    q = q.reshape(b, t, self.num_kv_heads, self.num_heads // self.num_kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    logits = softcap(logits, self.attn_logits_softcap)
    logits = jnp.where(mask[:, None, None], logits, _NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    encoded = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(self.dtype))
    encoded = encoded.reshape(b, t, self.num_heads, h)
    return self.attn_vec_einsum("BTNH,NHD->BTD", encoded), kv_cache


class Block(nn.Module):
  """Pre-norm transformer block (+ Gemma 2 post-norms)."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  width: int
  mlp_dim: int
  query_scale: float
  attn_logits_softcap: float | None
  post_norms: bool
  norm_eps: float
  dropout: float
  dropout_bdims: tuple[int, ...]
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, is_local, kv_cache, positions, masks, cache_index, deterministic):
    """One layer. `masks` = (global bool[B,T,S], local or None); `is_local` picks one."""
    norm = lambda name: RMSNorm(self.norm_eps, self.param_dtype, name=name)
    drop = nn.Dropout(self.dropout, self.dropout_bdims)
    x = constrain(x)
    global_mask, local_mask = masks
    mask = global_mask if local_mask is None else jnp.where(is_local, local_mask, global_mask)
    y, kv_cache = Attention(
        self.num_heads, self.num_kv_heads, self.head_dim, self.width, self.query_scale,
        self.attn_logits_softcap, self.dtype, self.param_dtype, name="attn",
    )(norm("pre_attention_norm")(x), positions, mask, kv_cache, cache_index)
    if self.post_norms:
      y = norm("post_attention_norm")(y)
    x = x + drop(y, deterministic)

    h = norm("pre_ffw_norm")(x).astype(self.dtype)
    mlp = MlpParams(self.width, self.mlp_dim, self.param_dtype, name="mlp")
    gating, linear = (w.astype(self.dtype) for w in mlp())
    y = (nn.gelu(matmul.einsum("BTD,DF->BTF", h, gating[0]), approximate=True)
         * matmul.einsum("BTD,DF->BTF", h, gating[1]))
    y = matmul.einsum("BTF,FD->BTD", y, linear)
    if self.post_norms:
      y = norm("post_ffw_norm")(y)
    return constrain(x + drop(y, deterministic)), kv_cache


class MlpParams(nn.Module):
  """The GeGLU weights under big_vision's names: gating_einsum [2,D,F], linear [F,D]."""
  width: int
  mlp_dim: int
  param_dtype: Any

  @nn.compact
  def __call__(self):
    init = lambda i, o: nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                         in_axis=i, out_axis=o, batch_axis=())
    gating = self.param("gating_einsum", init((1,), (0, 2)), (2, self.width, self.mlp_dim),
                        self.param_dtype)
    linear = self.param("linear", init((0,), (1,)), (self.mlp_dim, self.width), self.param_dtype)
    return gating, linear


class Embedder(nn.Module):
  """The token table, shared by the input embedding and the (tied) output logits."""
  vocab_size: int
  width: int
  param_dtype: Any
  init_std: float = 0.01

  @nn.compact
  def table(self):
    return self.param("input_embedding", nn.initializers.normal(stddev=self.init_std),
                      (self.vocab_size, self.width), self.param_dtype)


class Layers(nn.Module):
  """The layer stack, per-layer (`layers/{i}/...`) when scan=False; cache stacked on axis 0."""
  depth: int
  block_kw: Mapping[str, Any]
  remat_policy: str

  @nn.compact
  def __call__(self, x, is_local, kv_cache, positions, masks, cache_index, deterministic):
    block = _maybe_remat(self.remat_policy, scan=False)
    new_cache = []
    for i in range(self.depth):
      layer_cache = None if kv_cache is None else jax.tree.map(lambda c: c[i], kv_cache)
      x, layer_cache = block(name=str(i), **self.block_kw)(
          x, is_local[i], layer_cache, positions, masks, cache_index, deterministic)
      new_cache.append(layer_cache)
    if kv_cache is None:
      return x, None
    return x, jax.tree.map(lambda *c: jnp.stack(c), *new_cache)


def _maybe_remat(policy_name, scan):
  policy = remat_policy(policy_name)
  if policy is None:
    return Block
  # argnums: 0 self, 1 x, 2 is_local, 3 kv_cache, 4 positions, 5 masks, 6 cache_index, 7 det.
  return nn.remat(Block, policy=policy, prevent_cse=not scan, static_argnums=(7,))


class Gemma(nn.Module):
  """Gemma decoder over already-embedded inputs (PaliGemma prepends image tokens)."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int
  norm_eps: float = 1e-6
  final_logits_softcap: float | None = None
  attn_logits_softcap: float | None = None
  post_norms: bool = False
  query_pre_attn_norm: str = "rsqrt_head_dim"
  sliding_window: int | None = None
  scan: bool = True
  remat_policy: str = "none"
  dropout: float = 0.0
  dropout_bdims: tuple[int, ...] = ()
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  cache_dtype: Any = None
  # Only for training from scratch: big_vision's 0.01 makes token embeddings (x sqrt(width))
  # tiny next to the image tokens in a small model; see configs/demo.py.
  embed_init_std: float = 0.01
  variant: str | None = None

  def setup(self):
    self.embedder = Embedder(self.vocab_size, self.width, self.param_dtype, self.embed_init_std)
    if self.query_pre_attn_norm == "rsqrt_head_dim":
      query_scale = self.head_dim ** -0.5
    else:
      query_scale = (self.width // self.num_heads) ** -0.5
    block_kw = dict(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        width=self.width, mlp_dim=self.mlp_dim, query_scale=query_scale,
        attn_logits_softcap=self.attn_logits_softcap, post_norms=self.post_norms,
        norm_eps=self.norm_eps, dropout=self.dropout, dropout_bdims=self.dropout_bdims,
        dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      self.layers = nn.scan(
          _maybe_remat(self.remat_policy, scan=True),
          variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(0, 0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
          length=self.depth)(**block_kw)
    else:
      self.layers = Layers(self.depth, block_kw, self.remat_policy)
    self.final_norm = RMSNorm(self.norm_eps, self.param_dtype)

  def _is_local(self):
    # Gemma 2 alternates local (sliding-window) and global layers, starting with local.
    return jnp.arange(self.depth) % 2 == 0

  def embed(self, tokens: jax.Array) -> jax.Array:
    """int[B,T] -> [B,T,D] token embeddings scaled by sqrt(width), in the compute dtype."""
    x = jnp.take(self.embedder.table(), tokens, axis=0).astype(self.dtype)
    return x * jnp.sqrt(self.width).astype(self.dtype)

  def logits(self, pre_logits: jax.Array) -> jax.Array:
    """[..., D] (after final_norm) -> float32[..., V] with the final soft-cap, if any."""
    table = self.embedder.table().astype(self.dtype)
    logits = matmul.einsum("...D,VD->...V", pre_logits.astype(self.dtype), table,
                           preferred_element_type=jnp.float32)
    if logits.ndim == 3:
      logits = constrain(logits)
    return softcap(logits, self.final_logits_softcap)

  def _local_mask(self, mask, q_pos, k_pos, same_block=None):
    if not self.sliding_window:
      return None
    near = q_pos[:, :, None] - k_pos[:, None, :] < self.sliding_window
    return mask & (near if same_block is None else near | same_block)

  def __call__(self, x, mask_ar, input_mask, *, deterministic=True, kv_cache=None):
    """Full forward of x[B,T,D] -> (pre_logits [B,T,D], kv). kv_cache: (k, v) [L,B,S,K,H]
    to fill from index 0 (prefill), else None (training / scoring)."""
    input_mask = input_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(input_mask, axis=1) - 1, 0)
    mask = make_attn_mask(input_mask, mask_ar)
    c = jnp.cumsum(mask_ar, axis=1)
    local = self._local_mask(mask, positions, positions, c[:, :, None] == c[:, None, :])
    if kv_cache is not None:  # Keys live in a cache longer than T: pad the masks.
      pad = lambda m: None if m is None else jnp.pad(
          m, ((0, 0), (0, 0), (0, kv_cache[0].shape[2] - m.shape[2])))
      mask, local = pad(mask), pad(local)
    x, kv_cache = self.layers(x.astype(self.dtype), self._is_local(), kv_cache, positions,
                              (mask, local), 0, deterministic)
    return self.final_norm(x), kv_cache

  def extend(self, x, cache):
    """One step: x[B,1,D] at the cache's next position -> (pre_logits [B,1,D], cache)."""
    index, positions = cache["index"], cache["next_pos"][:, None]
    valid = jax.lax.dynamic_update_slice_in_dim(
        cache["valid"], jnp.ones_like(cache["valid"][:, :1]), index, axis=1)
    k_pos = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions, index, axis=1)
    mask = valid[:, None, :]
    local = self._local_mask(mask, positions, k_pos)
    x, (k, v) = self.layers(x.astype(self.dtype), self._is_local(), (cache["k"], cache["v"]),
                            positions, (mask, local), index, True)
    cache = dict(k=k, v=v, valid=valid, pos=k_pos, index=index + 1, next_pos=cache["next_pos"] + 1)
    return self.final_norm(x), cache

  def init_kv(self, batch_size: int, cache_size: int):
    dtype = self.cache_dtype or self.dtype
    shape = (self.depth, batch_size, cache_size, self.num_kv_heads, self.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
