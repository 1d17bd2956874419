"""Model configs of checkpoints: inferred from parameter shapes, from/to HF config.json.

checkpoints.load() infers a config from a checkpoint: from big_vision .npz shapes
(`config_from_shapes`; settings that shapes cannot tell come from a Gemma variant with the
same shapes, else the defaults of LLM_CONFIG) or from a Hugging Face config.json
(`config_from_hf`), then deep-merges overrides (`merge_config`). `param_shapes` gives the
scanned-layout shape of every parameter of a config. Variant tables are the models' own
(models/gemma.py, models/siglip.py `VARIANTS`).
"""
from collections.abc import Mapping
import logging
import math
from typing import Any

import numpy as np

from big_vision_lite.models import gemma
from big_vision_lite.models import siglip

log = logging.getLogger(__name__)

ModelConfig = dict[str, dict[str, Any]]
Shape = tuple[int, ...]
IMG_BLOCK = "img/Transformer/encoderblock"
LLM_LAYERS = "llm/layers"

# Every key of model_config["img"] / ["llm"] that load() fills, with the values that the
# checkpoint shapes cannot tell (contracts.md). Overrides may set any key the model accepts.
IMG_CONFIG = dict(
    variant=None, patch_size=[14, 14], width=None, depth=None, mlp_dim=None, num_heads=None,
    image_size=224, posemb="learn", pool_type="none", head_zeroinit=True, scan=True,
    remat_policy="none", dropout=0.0, dtype="float32", param_dtype="float32")
LLM_CONFIG = dict(
    variant=None, vocab_size=None, width=None, depth=None, mlp_dim=None, num_heads=None,
    num_kv_heads=None, head_dim=None, norm_eps=1e-6, final_logits_softcap=None,
    attn_logits_softcap=None, post_norms=False, query_pre_attn_norm="rsqrt_head_dim",
    sliding_window=None, scan=True, remat_policy="none", dropout=0.0, dtype="float32",
    param_dtype="float32", cache_dtype=None)
# Settings of a Gemma variant that the shapes do not determine (taken from a matching variant).
_LLM_BEHAVIOUR = ("final_logits_softcap", "attn_logits_softcap", "query_pre_attn_norm",
                  "sliding_window")
_LLM_SHAPE_KEYS = ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim",
                   "post_norms")
_GELU_TANH = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")  # all the tanh approximation
# transformers' class defaults for keys a config.json may omit (hub configs omit many).
_TEXT_DEFAULTS = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                  head_dim=256, rms_norm_eps=1e-6, hidden_activation=None, attention_bias=False),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                   num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
                   attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                   layer_types=None, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
}
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                        layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False)


def tower(name: str) -> str:
  """"img/..." -> "img"."""
  return name.split("/", 1)[0]


def param_shapes(model_config: Mapping[str, Any]) -> dict[str, Shape]:
  """{name: shape} of every parameter, scanned layout, for a model config (variants resolved)."""
  img = siglip.resolve_config(model_config["img"])
  llm = gemma.resolve_config(model_config["llm"])
  w, depth, m, nh = img["width"], img["depth"], img["mlp_dim"], img["num_heads"]
  p0, p1 = img["patch_size"]
  size = img["image_size"]
  h_img, w_img = (size, size) if isinstance(size, int) else tuple(size)
  b, a = IMG_BLOCK, f"{IMG_BLOCK}/MultiHeadDotProductAttention_0"
  d, n, k, h, f = llm["width"], llm["num_heads"], llm["num_kv_heads"], llm["head_dim"], llm["mlp_dim"]
  ll = llm["depth"]
  shapes = {
      "img/embedding/kernel": (p0, p1, 3, w), "img/embedding/bias": (w,),
      "img/pos_embedding": (1, (h_img // p0) * (w_img // p1), w),
      f"{b}/LayerNorm_0/scale": (depth, w), f"{b}/LayerNorm_0/bias": (depth, w),
      f"{b}/LayerNorm_1/scale": (depth, w), f"{b}/LayerNorm_1/bias": (depth, w),
      f"{b}/MlpBlock_0/Dense_0/kernel": (depth, w, m), f"{b}/MlpBlock_0/Dense_0/bias": (depth, m),
      f"{b}/MlpBlock_0/Dense_1/kernel": (depth, m, w), f"{b}/MlpBlock_0/Dense_1/bias": (depth, w),
      **{f"{a}/{x}/kernel": (depth, w, nh, w // nh) for x in ("query", "key", "value")},
      **{f"{a}/{x}/bias": (depth, nh, w // nh) for x in ("query", "key", "value")},
      f"{a}/out/kernel": (depth, nh, w // nh, w), f"{a}/out/bias": (depth, w),
      "img/Transformer/encoder_norm/scale": (w,), "img/Transformer/encoder_norm/bias": (w,),
      "img/head/kernel": (w, d), "img/head/bias": (d,),
      "llm/embedder/input_embedding": (llm["vocab_size"], d), "llm/final_norm/scale": (d,),
      f"{LLM_LAYERS}/attn/attn_vec_einsum/w": (ll, n, h, d),
      f"{LLM_LAYERS}/mlp/gating_einsum": (ll, 2, d, f), f"{LLM_LAYERS}/mlp/linear": (ll, f, d),
  }
  if k == n:  # big_vision's Attention fuses q, k, v when there is one kv head per query head.
    shapes[f"{LLM_LAYERS}/attn/qkv_einsum/w"] = (ll, 3, n, d, h)
  else:
    shapes[f"{LLM_LAYERS}/attn/q_einsum/w"] = (ll, n, d, h)
    shapes[f"{LLM_LAYERS}/attn/kv_einsum/w"] = (ll, 2, k, d, h)
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if llm["post_norms"]:
    norms += ["post_attention_norm", "post_ffw_norm"]
  shapes.update({f"{LLM_LAYERS}/{x}/scale": (ll, d) for x in norms})
  return shapes


def match_llm_variant(cfg: Mapping[str, Any]) -> str | None:
  """Name of the gemma.VARIANTS entry with the same shape numbers and post_norms, else None."""
  for name, numbers in gemma.VARIANTS.items():
    full = {**gemma.DEFAULTS, **numbers}
    if all(full[k] == cfg[k] for k in _LLM_SHAPE_KEYS):
      return name
  return None


def match_img_variant(cfg: Mapping[str, Any]) -> str | None:
  """"So400m/14"-style name of the siglip.VARIANTS entry with the same numbers, else None."""
  p0, p1 = cfg["patch_size"]
  for name, numbers in siglip.VARIANTS.items():
    if all(numbers[k] == cfg[k] for k in ("width", "depth", "mlp_dim", "num_heads")):
      return f"{name}/{p0}" if p0 == p1 else None
  return None


def fill_llm_behaviour(llm: dict[str, Any]) -> dict[str, Any]:
  """Sets `variant` and what shapes cannot tell (soft-caps, query scaling, window) from it."""
  llm["variant"] = match_llm_variant(llm)
  if llm["variant"]:
    full = {**gemma.DEFAULTS, **gemma.VARIANTS[llm["variant"]]}
    llm.update({k: full[k] for k in _LLM_BEHAVIOUR})
  return llm


def config_from_shapes(shapes: Mapping[str, tuple[Shape, np.dtype]], where: str) -> ModelConfig:
  """Infers a model config from the scanned-layout shapes (and dtypes) of a checkpoint."""
  def shape(name, ndim):
    if name not in shapes:
      raise ValueError(f"{where}: not a PaliGemma checkpoint: no parameter {name}")
    s = shapes[name][0]
    if len(s) != ndim:
      raise ValueError(f"{where}: parameter {name} has shape {s}, expected {ndim} dims")
    return s

  p0, p1, _, width = shape("img/embedding/kernel", 4)
  n = shape("img/pos_embedding", 3)[1]
  side = math.isqrt(n)
  if side * side != n or p0 != p1:
    raise ValueError(f"{where}: img/pos_embedding has {n} positions and patch {p0}x{p1}: "
                     "expected a square grid of square patches")
  img = dict(IMG_CONFIG, patch_size=[p0, p1], width=width, image_size=side * p0,
             depth=shape(f"{IMG_BLOCK}/MlpBlock_0/Dense_0/kernel", 3)[0],
             mlp_dim=shape(f"{IMG_BLOCK}/MlpBlock_0/Dense_0/kernel", 3)[2],
             num_heads=shape(f"{IMG_BLOCK}/MultiHeadDotProductAttention_0/query/kernel", 4)[2])
  img["variant"] = match_img_variant(img)

  vocab, d = shape("llm/embedder/input_embedding", 2)
  depth, f, _ = shape(f"{LLM_LAYERS}/mlp/linear", 3)
  if f"{LLM_LAYERS}/attn/qkv_einsum/w" in shapes:
    _, _, n_heads, _, head_dim = shape(f"{LLM_LAYERS}/attn/qkv_einsum/w", 5)
    kv_heads = n_heads
  else:
    _, n_heads, _, head_dim = shape(f"{LLM_LAYERS}/attn/q_einsum/w", 4)
    kv_heads = shape(f"{LLM_LAYERS}/attn/kv_einsum/w", 5)[2]
  llm = dict(LLM_CONFIG, vocab_size=vocab, width=d, depth=depth, mlp_dim=f, num_heads=n_heads,
             num_kv_heads=kv_heads, head_dim=head_dim,
             post_norms=f"{LLM_LAYERS}/post_attention_norm/scale" in shapes)
  fill_llm_behaviour(llm)
  config = {"img": img, "llm": llm}
  for name in config:
    config[name]["param_dtype"] = stored_dtype(shapes, name)
  return config


def stored_dtype(shapes: Mapping[str, tuple[Shape, np.dtype]], which: str) -> str:
  """The tower's dtype when uniform, else float32 (float64 if present): load() then upcasts,
  losslessly."""
  dtypes = {np.dtype(d) for name, (_, d) in shapes.items() if tower(name) == which}
  if len(dtypes) == 1:
    return dtypes.pop().name
  log.info("checkpoint: %s parameters have dtypes %s; loading them as one wider dtype", which,
           sorted(map(str, dtypes)))
  return "float64" if np.dtype(np.float64) in dtypes else "float32"


def merge_config(base: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
  """Deep-merges {"img": {...}, "llm": {...}} overrides over a config; checks every key."""
  unknown = set(overrides) - {"img", "llm"}
  if unknown:
    raise ValueError(f"load: unknown override(s) {sorted(unknown)}; expected 'img' and/or 'llm' "
                     "dicts (or the keyword arguments param_dtype=, shardings=)")
  out = {name: dict(cfg) for name, cfg in base.items()}
  for name, cfg in overrides.items():
    if not isinstance(cfg, Mapping):
      raise ValueError(f"load: override {name}= must be a dict, got {type(cfg).__name__}")
    out[name].update(cfg)
  siglip.resolve_config(out["img"])  # raises on unknown keys or inconsistent numbers
  gemma.resolve_config(out["llm"])
  return out


def config_from_hf(hf: Mapping[str, Any], where: str) -> tuple[ModelConfig, int]:
  """PaliGemmaConfig dict -> (model config, image_token_index). Unsupported settings raise."""
  if not isinstance(hf, Mapping) or hf.get("model_type") != "paligemma":
    got = hf.get("model_type") if isinstance(hf, Mapping) else type(hf).__name__
    raise ValueError(f"{where}: model_type is {got!r}, expected 'paligemma'")
  text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}
  text_type = text.get("model_type", "gemma")
  if text_type not in _TEXT_DEFAULTS:
    raise ValueError(f"{where}: text_config.model_type {text_type!r}: only 'gemma' (PaliGemma 1) "
                     "and 'gemma2' (PaliGemma 2) are supported")
  t = {**_TEXT_DEFAULTS[text_type], **text}
  v = {**_VISION_DEFAULTS, **vision}

  def need(ok, what):
    if not ok:
      raise ValueError(f"{where}: {what} is not supported (the model config cannot express it)")

  need(v["hidden_act"] in _GELU_TANH, f"vision_config.hidden_act={v['hidden_act']!r}")
  need(v["layer_norm_eps"] == 1e-6, f"vision_config.layer_norm_eps={v['layer_norm_eps']}")
  need(v["num_channels"] == 3, f"vision_config.num_channels={v['num_channels']}")
  need(not v["vision_use_head"], "vision_config.vision_use_head=true")
  need(t["hidden_activation"] in (None,) + _GELU_TANH,
       f"text_config.hidden_activation={t['hidden_activation']!r}")
  need(not t["attention_bias"], "text_config.attention_bias=true")
  rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
  theta = rope.get("rope_theta", t.get("rope_theta", 10000.0))
  need(rope.get("rope_type", "default") == "default" and theta == 10000.0,
       f"text_config rope {rope or theta} (only the default RoPE with theta 10000)")
  size, patch = v["image_size"], v["patch_size"]
  size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
  patch = patch[0] if isinstance(patch, (list, tuple)) and len(set(patch)) == 1 else patch
  need(isinstance(size, int) and isinstance(patch, int), f"non-square image_size {size} / patch {patch}")
  img = dict(IMG_CONFIG, patch_size=[patch, patch], image_size=size, width=v["hidden_size"],
             depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
             num_heads=v["num_attention_heads"])
  img["variant"] = match_img_variant(img)

  n = t["num_attention_heads"]
  llm = dict(LLM_CONFIG, vocab_size=t["vocab_size"], width=t["hidden_size"],
             depth=t["num_hidden_layers"], mlp_dim=t["intermediate_size"], num_heads=n,
             num_kv_heads=t["num_key_value_heads"] or n, head_dim=t["head_dim"] or t["hidden_size"] // n,
             norm_eps=t["rms_norm_eps"], post_norms=text_type == "gemma2")
  if text_type == "gemma2":
    scalar = t["query_pre_attn_scalar"]
    if scalar == llm["head_dim"]:
      llm["query_pre_attn_norm"] = "rsqrt_head_dim"
    elif scalar == llm["width"] // n:
      llm["query_pre_attn_norm"] = "rsqrt_emb_per_head"
    else:
      raise ValueError(f"{where}: text_config.query_pre_attn_scalar={scalar} is neither head_dim "
                       f"({llm['head_dim']}) nor hidden_size // num_attention_heads ({llm['width'] // n})")
    llm["attn_logits_softcap"] = t["attn_logit_softcapping"] or None
    llm["final_logits_softcap"] = t["final_logit_softcapping"] or None
    depth = llm["depth"]
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(depth)]
    layer_types = t["layer_types"] or alternating
    if layer_types == ["full_attention"] * depth:
      llm["sliding_window"] = None
    elif layer_types == alternating:
      llm["sliding_window"] = t["sliding_window"] or None
    else:
      raise ValueError(f"{where}: text_config.layer_types={layer_types}: only sliding/full "
                       "alternating from layer 0 (Gemma 2) or all full_attention are supported")
  filled = fill_llm_behaviour(dict(llm))
  if all(filled[k] == llm[k] for k in filled if k != "variant"):  # a label only when all agrees
    llm["variant"] = filled["variant"]
  index = hf.get("image_token_index", hf.get("image_token_id", 256000))
  return {"img": img, "llm": llm}, index


def hf_config(model_config: ModelConfig, image_token_index: int, vocab_rows: int,
              dtype: str) -> dict[str, Any]:
  """The PaliGemmaConfig (config.json) of a model config."""
  img = siglip.resolve_config(model_config["img"])
  llm = gemma.resolve_config(model_config["llm"])
  d, n, depth = llm["width"], llm["num_heads"], llm["depth"]
  (p0, p1), size = img["patch_size"], img["image_size"]
  if p0 != p1 or not isinstance(size, int):
    raise ValueError(f"save hf: HF SigLIP needs square patches and images; got patch "
                     f"{img['patch_size']}, image_size {size}")
  text = dict(
      model_type="gemma2" if llm["post_norms"] else "gemma", vocab_size=vocab_rows,
      hidden_size=d, intermediate_size=llm["mlp_dim"], num_hidden_layers=depth,
      num_attention_heads=n, num_key_value_heads=llm["num_kv_heads"], head_dim=llm["head_dim"],
      hidden_activation="gelu_pytorch_tanh", rms_norm_eps=llm["norm_eps"],
      max_position_embeddings=8192, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"},
      attention_bias=False, attention_dropout=0.0, pad_token_id=0, bos_token_id=2,
      eos_token_id=1, tie_word_embeddings=True, num_image_tokens=(size // p0) ** 2)
  scalar = llm["head_dim"] if llm["query_pre_attn_norm"] == "rsqrt_head_dim" else d // n
  if llm["post_norms"]:
    window = llm["sliding_window"]
    text.update(
        query_pre_attn_scalar=scalar, attn_logit_softcapping=llm["attn_logits_softcap"],
        final_logit_softcapping=llm["final_logits_softcap"], sliding_window=window,
        layer_types=["sliding_attention" if window and i % 2 == 0 else "full_attention"
                     for i in range(depth)])
  else:
    extra = {k: llm[k] for k in ("attn_logits_softcap", "final_logits_softcap", "sliding_window")
             if llm[k]}
    if extra or scalar != llm["head_dim"]:
      raise ValueError(f"save hf: a model without post_norms is HF Gemma 1, which has no "
                       f"{extra or 'query scaling other than head_dim ** -0.5'}")
  vision = dict(
      model_type="siglip_vision_model", hidden_size=img["width"], intermediate_size=img["mlp_dim"],
      num_hidden_layers=img["depth"], num_attention_heads=img["num_heads"], num_channels=3,
      image_size=size, patch_size=p0, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
      attention_dropout=0.0, projection_dim=d, vision_use_head=False)
  return dict(
      architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
      text_config=text, vision_config=vision, image_token_index=image_token_index,
      vocab_size=vocab_rows, projection_dim=d, hidden_size=d, pad_token_id=0, bos_token_id=2,
      eos_token_id=1, tie_word_embeddings=True, dtype=dtype)
