"""SigLIP ViT image encoder, as PaliGemma uses it: every patch token, no pooling head.

Parameter names and layouts are big_vision's (`models/vit.py`), so its checkpoints load
unchanged. Axis legend:
  B batch, N patches (tokens), D width, M mlp dim, nh heads, hd head dim, P patch size.
"""
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import matmul

# width, depth, mlp_dim, num_heads of big_vision's ViT variants ("So400m/14" = shape-optimised 400M).
VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(width=32, depth=1, mlp_dim=128, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "So400m": dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
}

DEFAULTS: dict[str, Any] = dict(
    variant=None, patch_size=(14, 14), width=None, depth=None, mlp_dim=None, num_heads=None,
    image_size=224, num_classes=None, posemb="learn", pool_type="none", head_zeroinit=True,
    scan=True, remat_policy="none", dropout=0.0, dtype="float32", param_dtype="float32",
    dtype_mm=None,  # big_vision's name for the matmul dtype; an alias of `dtype`.
)


def resolve_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Fills a big_vision-style ViT config from its variant ("So400m/14") and defaults.

  Explicit keys override the variant; unknown keys are an error.
  """
  unknown = set(cfg) - set(DEFAULTS)
  if unknown:
    raise ValueError(f"model.img: unknown key(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
  out = dict(DEFAULTS)
  variant = cfg.get("variant")
  if variant:
    name, _, patch = variant.partition("/")
    if name not in VARIANTS:
      raise ValueError(f"model.img.variant={variant!r}: unknown; known: {sorted(VARIANTS)} (+ '/patch')")
    out.update(VARIANTS[name])
    if patch:
      out["patch_size"] = (int(patch), int(patch))
  out.update({k: v for k, v in cfg.items() if v is not None})
  if out["dtype_mm"] is not None:
    out["dtype"] = out["dtype_mm"]
  out["dtype_mm"] = None
  ps = out["patch_size"]
  out["patch_size"] = (ps, ps) if isinstance(ps, int) else tuple(int(p) for p in ps)
  for key in ("width", "depth", "mlp_dim", "num_heads"):
    if not isinstance(out[key], int) or out[key] <= 0:
      raise ValueError(f"model.img.{key}={out[key]!r}: expected a positive int (or a variant)")
  if out["width"] % out["num_heads"]:
    raise ValueError(f"model.img: width {out['width']} not divisible by num_heads {out['num_heads']}")
  if out["pool_type"] != "none" or out["posemb"] != "learn":
    raise ValueError("model.img: PaliGemma uses pool_type='none' and posemb='learn'; got "
                     f"pool_type={out['pool_type']!r}, posemb={out['posemb']!r}")
  return out


def constrain(x: jax.Array) -> jax.Array:
  """Names activation axes [batch, tokens, width] (see gemma.constrain; no-op without rules)."""
  return nn.with_logical_constraint(x, ("act_batch", "act_len", None))


_REMAT_FACTORIES = ("save_only_these_names", "save_any_names_but_these",
                    "save_anything_except_these_names")


def remat_policy(name: str) -> Callable | None:
  """Resolves a model config's `remat_policy` string.

  "none" -> None: do not wrap the block in remat at all. "full" -> save nothing
  (recompute everything). Any policy of `jax.checkpoint_policies` by name
  ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", ...);
  "save_only_these_names:a,b" (and the other name-list policies) with names
  given to `checkpoint_name`. Pass the result as nn.remat(..., policy=...).
  """
  if name == "none":
    return None
  if name == "full":
    return jax.checkpoint_policies.nothing_saveable
  base, _, args = name.partition(":")
  if base in _REMAT_FACTORIES:
    return getattr(jax.checkpoint_policies, base)(*[a for a in args.split(",") if a])
  policy = getattr(jax.checkpoint_policies, base, None)
  valid = sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))
  if args or policy is None or base.startswith("save_") or base.startswith("offload"):
    raise ValueError(f"remat_policy {name!r} is unknown; use 'none', 'full', one of {valid}, "
                     f"or '<{'|'.join(_REMAT_FACTORIES)}>:name1,name2'")
  return policy


class MlpBlock(nn.Module):
  mlp_dim: int
  dropout: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                                     dot_general=matmul.dot_general,
                                     kernel_init=nn.initializers.xavier_uniform(),
                                     bias_init=nn.initializers.normal(stddev=1e-6))
    d = x.shape[-1]
    x = nn.gelu(dense(self.mlp_dim, "Dense_0")(x), approximate=True)
    x = nn.Dropout(self.dropout)(x, deterministic)
    return dense(d, "Dense_1")(x)


class Attention(nn.Module):
  """Full (unmasked) multi-head self-attention with big_vision's MHA parameter layout."""
  num_heads: int
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    hd = d // self.num_heads
    proj = lambda name: nn.DenseGeneral((self.num_heads, hd), dtype=self.dtype,
                                        param_dtype=self.param_dtype, name=name,
                                        dot_general=matmul.dot_general,
                                        kernel_init=nn.initializers.xavier_uniform())
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)  # [B,N,nh,hd]
    logits = jnp.einsum("BQnh,BKnh->BnQK", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits * hd ** -0.5, axis=-1).astype(v.dtype)
    out = jnp.einsum("BnQK,BKnh->BQnh", probs, v)
    return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
                           dot_general=matmul.dot_general,
                           kernel_init=nn.initializers.xavier_uniform(), name="out")(out)


class Encoder1DBlock(nn.Module):
  mlp_dim: int
  num_heads: int
  dropout: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    norm = lambda name: nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = constrain(x)
    y = Attention(self.num_heads, self.dtype, self.param_dtype,
                  name="MultiHeadDotProductAttention_0")(norm("LayerNorm_0")(x))
    x = x + nn.Dropout(self.dropout)(y, deterministic)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype,
                 name="MlpBlock_0")(norm("LayerNorm_1")(x), deterministic)
    return constrain(x + nn.Dropout(self.dropout)(y, deterministic)), None


class Encoder(nn.Module):
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float
  scan: bool
  remat_policy: str
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x, deterministic):
    block = Encoder1DBlock
    if (policy := remat_policy(self.remat_policy)) is not None:
      block = nn.remat(block, policy=policy, prevent_cse=not self.scan, static_argnums=(2,))
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype=self.dtype, param_dtype=self.param_dtype)
    if self.scan:
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=nn.broadcast, length=self.depth)(name="encoderblock", **kw)(x, deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", **kw)(x, deterministic)
    return nn.LayerNorm(1e-6, dtype=self.dtype, param_dtype=self.param_dtype, name="encoder_norm")(x)


class ViT(nn.Module):
  """SigLIP image tower + PaliGemma's linear projector (`head`).

  Attributes are the resolved config of `resolve_config`. `num_classes` is the projector's
  output width (the LLM width); None skips the projector.
  """
  patch_size: tuple[int, int]
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  image_size: int = 224
  num_classes: int | None = None
  head_zeroinit: bool = True
  scan: bool = True
  remat_policy: str = "none"
  dropout: float = 0.0
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  variant: str | None = None
  posemb: str = "learn"
  pool_type: str = "none"
  dtype_mm: str | None = None

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """float32[B,H,W,3] in [-1, 1] -> (tokens float[B,N,num_classes or D], aux)."""
    ph, pw = self.patch_size
    grid = self.image_size // ph, self.image_size // pw
    if image.shape[1] != grid[0] * ph or image.shape[2] != grid[1] * pw:
      raise ValueError(f"image of shape {image.shape[1:3]} does not match model.img.image_size="
                       f"{self.image_size} (patch {self.patch_size}); resize the input or set image_size")
    x = nn.Conv(self.width, self.patch_size, strides=self.patch_size, padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(image)
    b, h, w, d = x.shape
    x = x.reshape(b, h * w, d)
    posemb = self.param("pos_embedding", nn.initializers.normal(stddev=1 / d ** 0.5),
                        (1, h * w, d), self.param_dtype)
    x = x + posemb.astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, not train)
    x = Encoder(self.depth, self.mlp_dim, self.num_heads, self.dropout, self.scan,
                self.remat_policy, self.dtype, self.param_dtype, name="Transformer")(x, not train)
    aux = {"encoded": x}
    if self.num_classes:
      init = nn.initializers.zeros if self.head_zeroinit else nn.initializers.lecun_normal()
      x = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype,
                   param_dtype=self.param_dtype, dot_general=matmul.dot_general, name="head")(x)
    return x, aux
