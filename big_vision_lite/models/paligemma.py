"""PaliGemma: SigLIP image tokens + Gemma prefix-LM.

The sequence is [image tokens][bos prefix "\\n"][suffix eos][pad]. Image tokens (projected by
`img/head`, not scaled) and the text prefix (embeddings scaled by sqrt(width)) attend to each
other fully; the suffix is causal (big_vision's `make_attn_mask(input_mask, mask_ar)`).

    model = Model(**model_config)
    text_logits, aux = model.apply({"params": params}, image, text, mask_ar, input_mask)

Decoding: `prefill` runs [image + prompt] once and returns a KV cache; `extend` feeds one
token per example. Axis legend as in gemma.py; F frames (several images per example).
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_vision_lite.models import gemma, siglip


def resolve_config(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The complete model config (variants expanded, defaults filled); unknown keys are errors."""
  unknown = set(model_config) - {"img", "llm", "img_model", "llm_model"}
  if unknown:
    raise ValueError(f"model: unknown key(s) {sorted(unknown)}; expected 'img' and 'llm'")
  llm = gemma.resolve_config(model_config.get("llm", {}))
  img = siglip.resolve_config({**model_config.get("img", {}), "num_classes": llm["width"]})
  return {"img": img, "llm": llm}


def positions_from_mask(input_mask: jax.Array) -> jax.Array:
  """int32[B,T]: 0-based positions that skip invalid (padding) tokens."""
  return jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)


class Model(nn.Module):
  """PaliGemma. `img` / `llm` are big_vision-style configs (see resolve_config)."""
  img: Mapping[str, Any]
  llm: Mapping[str, Any]
  img_model: str = "vit"  # Accepted so that big_vision model configs work unchanged.
  llm_model: str = "gemma"

  def setup(self):
    cfg = resolve_config({"img": self.img, "llm": self.llm})
    self.vit = siglip.ViT(**cfg["img"], name="img")
    self.decoder = gemma.Gemma(**cfg["llm"], name="llm")

  def embed_image(self, image: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """float32[B,H,W,3] or [B,F,H,W,3] in [-1,1] -> (image tokens [B,F*N,D], aux)."""
    if image.ndim == 5:  # Frames are folded into one longer image-token sequence.
      b, f = image.shape[:2]
      zimg, aux = self.vit(image.reshape(b * f, *image.shape[2:]), train=train)
      return zimg.reshape(b, f * zimg.shape[1], zimg.shape[2]), aux
    if image.ndim != 4:
      raise ValueError(f"image: expected [B,H,W,3] or [B,F,H,W,3], got shape {image.shape}")
    return self.vit(image, train=train)

  def embed_image_and_text(self, image, text, *, input_mask=None, mask_ar=None, train=False):
    """Returns (x [B,N+T,D], input_mask bool[B,N+T], mask_ar int32[B,N+T], aux)."""
    zimg, aux = self.embed_image(image, train=train)
    ztxt = self.decoder.embed(text)
    b, n = zimg.shape[:2]
    if input_mask is None:
      input_mask = jnp.ones(text.shape, bool)
    if mask_ar is None:
      mask_ar = jnp.zeros(text.shape, jnp.int32)
    x = jnp.concatenate([zimg.astype(ztxt.dtype), ztxt], axis=1)
    input_mask = jnp.concatenate([jnp.ones((b, n), bool), input_mask.astype(bool)], axis=1)
    mask_ar = jnp.concatenate([jnp.zeros((b, n), jnp.int32), mask_ar.astype(jnp.int32)], axis=1)
    aux = {"img/encoded": aux["encoded"], "img/zimg": zimg}
    return x, input_mask, mask_ar, aux

  def __call__(self, image: jax.Array, text: jax.Array, mask_ar: jax.Array,
               input_mask: jax.Array | None = None, train: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Teacher-forced forward.

    Args:
      image: float32[B,H,W,3] (or [B,F,H,W,3]) in [-1, 1].
      text: int32[B,T] token ids.
      mask_ar: int32[B,T]; 0 = prefix (full attention), 1 = causal.
      input_mask: bool[B,T]; False on padding. None: all tokens are real.
      train: enables dropout (needs a "dropout" rng).

    Returns:
      text_logits float32[B,T,V] (position t predicts text[t+1]), aux dict.
    """
    x, full_mask, full_ar, aux = self.embed_image_and_text(
        image, text, input_mask=input_mask, mask_ar=mask_ar, train=train)
    pre_logits, _ = self.decoder(x, full_ar, full_mask, deterministic=not train)
    text_pre_logits = pre_logits[:, x.shape[1] - text.shape[1]:]
    aux["llm/pre_logits"] = text_pre_logits
    return self.decoder.logits(text_pre_logits), aux

  def prefill(self, image, text, mask_ar, input_mask, *, cache_size: int):
    """Encodes [image + prompt] and fills a KV cache of `cache_size` (>= N+T) entries.

    Prompts are right-padded (input_mask False on padding); each example's next token is
    predicted from its own last real token.

    Returns:
      logits float32[B,V] for the first generated token, and the cache pytree.
    """
    x, full_mask, full_ar, _ = self.embed_image_and_text(
        image, text, input_mask=input_mask, mask_ar=mask_ar)
    b, s = x.shape[:2]
    if cache_size < s:
      raise ValueError(f"cache_size={cache_size} is smaller than image + prompt length {s}")
    pre_logits, (k, v) = self.decoder(x, full_ar, full_mask,
                                      kv_cache=self.decoder.init_kv(b, cache_size))
    lengths = full_mask.sum(axis=1)
    last = jnp.take_along_axis(pre_logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    pad = ((0, 0), (0, cache_size - s))
    cache = dict(k=k, v=v, valid=jnp.pad(full_mask, pad),
                 pos=jnp.pad(positions_from_mask(full_mask), pad),
                 index=jnp.asarray(s, jnp.int32), next_pos=lengths.astype(jnp.int32))
    return self.decoder.logits(last), cache

  def extend(self, tokens: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """int32[B] tokens appended (causally) -> (logits float32[B,V] for the next one, cache)."""
    pre_logits, cache = self.decoder.extend(self.decoder.embed(tokens[:, None]), cache)
    return self.decoder.logits(pre_logits[:, 0]), cache
