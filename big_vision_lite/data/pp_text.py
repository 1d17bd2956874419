"""Text pp ops (big_vision's ops_text.py and proj/paligemma/ops.py) and the PaliGemma layout.

Ops: strfmt, lower, tok, masked_concat, tolen. `tok(model=...)` accepts big_vision's tokenizer
spec strings ('gemma(tokensets=("loc", "seg"))') and maps them to the one Tokenizer the
pipeline was given; other tokenizer names are errors.

Over-long token sequences (tolen, tok with length=) are an ExampleError unless the pipeline
truncates (input.skip_bad_examples=True); truncation is always counted (rt.truncated).

`combine_and_keep_train` / `combine_and_keep_eval` build the standard PaliGemma text layout as
in big_vision's transfers/common.py:
  train: text = [bos prefix] ["\\n"] [suffix eos] [pad...], text_len + 1 tokens (the trainer
         feeds text[:, :-1] and predicts text[:, 1:]); mask_ar 0,0,1 (+1 on padding);
         mask_loss 0,0,1 (0 on padding); mask_input 1 on real tokens (our addition).
  eval:  text = [bos prefix] ["\\n"] [pad...], text_len tokens; mask_ar 0 (+1 on padding);
         mask_input 1 on real tokens; the suffix is left for decoding.
"""
import string

import numpy as np

from big_vision_lite.data.pp_parse import (ExampleError, TextTooLongError, get_key, inkey_outkey,
                                           parse, register, set_key, to_str)

TOKENIZER = 'gemma(tokensets=("loc", "seg"))'
_KNOWN_TOKENIZERS = ("gemma",)
_TOKENSETS = ("loc", "seg")


def check_tokenizer_spec(model) -> None:
  """Accepts None and big_vision's gemma(tokensets=...) spec; anything else is an error."""
  if model is None:
    return
  if not isinstance(model, str):
    raise ValueError(f"model must be a tokenizer spec string, got {model!r}")
  try:
    (spec,) = parse(model)
  except ValueError:
    raise ValueError(f"model={model!r} is not a tokenizer spec like {TOKENIZER}") from None
  if spec.name not in _KNOWN_TOKENIZERS or spec.args or set(spec.kwargs) - {"tokensets"}:
    raise ValueError(f"unknown tokenizer model={model!r}: the pipeline maps only "
                     f"{TOKENIZER} (or no model=) to its configured Tokenizer")
  sets = spec.kwargs.get("tokensets", ())
  if isinstance(sets, str) or not set(sets) <= set(_TOKENSETS):
    raise ValueError(f"model={model!r}: tokensets must be a subset of {_TOKENSETS}")


def _tokenizer(ctx, op: str):
  if ctx is None or ctx.tokenizer is None:
    raise ValueError(f"{op} needs a tokenizer: pass tokenizer= to the input pipeline")
  return ctx.tokenizer


def fit_length(tokens: np.ndarray, length: int, pad_value, *, sticky_end: bool, rt,
               what: str) -> np.ndarray:
  """Pads with pad_value or truncates (keeping the last token when sticky_end) to `length`."""
  n = len(tokens)
  if n > length:
    if not rt.ctx.truncate:
      raise TextTooLongError(
          f"{what} has {n} tokens, more than the allowed {length}: raise text_len, or set "
          f"input.skip_bad_examples=True to truncate (counted)")
    rt.truncated = True
    return np.concatenate([tokens[:length - 1], tokens[-1:]]) if sticky_end else tokens[:length]
  pad = np.full(length - n, pad_value, dtype=tokens.dtype)
  return np.concatenate([tokens, pad])


@register("strfmt")
def get_strfmt(template, outkey="text"):
  """Formats `template` with fields from the example: strfmt("answer en {question_text}")."""
  if not isinstance(template, str):
    raise ValueError(f"template must be a string, got {template!r}")
  parts = list(string.Formatter().parse(template))
  for _, field, spec, conversion in parts:
    if spec or conversion:
      raise ValueError(f"format specs/conversions are not supported: {template!r}")
    if field == "":
      raise ValueError(f"positional {{}} fields are not supported, name the key: {template!r}")

  def _strfmt(data, rt):
    out = []
    for literal, field, _, _ in parts:
      out.append(literal)
      if field is not None:
        value = get_key(data, field)
        if isinstance(value, (str, bytes)) or (isinstance(value, np.ndarray) and value.ndim == 0
                                               and value.dtype.kind in "SUO"):
          out.append(to_str(value, f"field {field!r}"))
        else:
          out.append(str(np.asarray(value).tolist()))
    set_key(data, outkey, "".join(out))
    return data
  return _strfmt


@register("lower")
@inkey_outkey(indefault="text", outdefault="text")
def get_lower():
  def _lower(text, rt, data):
    return to_str(text, "text").lower()
  return _lower


@register("tok")
def get_tok(model=None, length=None, *, bos="no", eos="no", text=None, key=None, inkey=None,
            outkey=None, ctx=None):
  """Tokenizes a string key (or the constant `text`) to int32[n], optionally to `length`.

  bos: "no"/"yes"; eos: "no"/"yes"/"sticky" (sticky keeps eos as the last token when cut).
  """
  if bos not in ("no", "yes") or eos not in ("no", "yes", "sticky"):
    raise ValueError(f"bos must be 'no'/'yes' and eos 'no'/'yes'/'sticky', got bos={bos!r}, "
                     f"eos={eos!r}")
  if length is not None and (not isinstance(length, int) or length <= 0):
    raise ValueError(f"length must be a positive int or None, got {length!r}")
  check_tokenizer_spec(model)
  tokenizer = _tokenizer(ctx, "tok")
  src, dst = inkey or key, outkey or key
  if text is not None and inkey is not None:
    raise ValueError("either inkey or text, not both")
  if dst is None or (text is None and src is None):
    raise ValueError("needs key= (or inkey=/outkey=, or text= with key=/outkey=)")
  add_bos, add_eos = bos == "yes", eos in ("yes", "sticky")
  const = None
  if text is not None:  # Constant: tokenized once (and still fit to length per example).
    const = np.asarray(tokenizer.encode(str(text), add_bos=add_bos, add_eos=add_eos), np.int32)

  def _tok(data, rt):
    if const is not None:
      toks = const
    else:
      s = to_str(get_key(data, src), f"tok input {src!r}")
      toks = np.asarray(tokenizer.encode(s, add_bos=add_bos, add_eos=add_eos), np.int32)
    if length is not None:
      toks = fit_length(toks, length, tokenizer.pad_id, sticky_end=eos == "sticky", rt=rt,
                        what=f"tok {src or 'text'!r}")
    set_key(data, dst, toks)
    return data
  return _tok


@register("masked_concat")
def get_masked_concat(keys, outkey="text", **masks):
  """Concatenates token keys into `outkey`; each mask kwarg gives one value per key.

  masked_concat(["prefix", "septok", "suffix"], mask_ar=[0, 0, 1], mask_loss=[0, 0, 1])
  """
  if isinstance(keys, str) or not keys:
    raise ValueError(f"keys must be a non-empty list of keys, got {keys!r}")
  for name, vals in masks.items():
    if not isinstance(vals, (list, tuple)) or len(vals) != len(keys):
      raise ValueError(f"{name} must give one value per key ({len(keys)} keys), got {vals!r}")

  def _masked_concat(data, rt):
    parts = []
    for k in keys:
      x = np.asarray(get_key(data, k))
      if x.ndim != 1 or not (np.issubdtype(x.dtype, np.integer) or x.size == 0):
        raise ExampleError(f"key {k!r} must hold int[n] tokens (missing tok?), got "
                           f"{x.dtype}{list(x.shape)}")
      parts.append(x.astype(np.int32))
    set_key(data, outkey, np.concatenate(parts))
    for name, vals in masks.items():
      set_key(data, name, np.concatenate(
          [np.full(len(p), v, np.int32) for p, v in zip(parts, vals)]))
    return data
  return _masked_concat


@register("tolen")
@inkey_outkey(indefault=None, outdefault=None)
def get_tolen(length, *, sticky_end=False, pad_value=None, pad_key=None):
  """Pads (pad_value, or the first value of data[pad_key]) or truncates to `length`."""
  if not isinstance(length, int) or length < 0:
    raise ValueError(f"length must be an int >= 0, got {length!r}")
  if pad_value is None and pad_key is None:
    raise ValueError("tolen needs pad_value= or pad_key=")

  def _tolen(x, rt, data):
    x = np.asarray(x)
    if not length:
      return x
    if x.ndim != 1:
      raise ExampleError(f"expected a 1-D sequence, got shape {list(x.shape)}")
    pad = pad_value
    if pad_key is not None:
      pad = np.asarray(get_key(data, pad_key)).reshape(-1)[0]
    return fit_length(x, length, pad, sticky_end=sticky_end, rt=rt, what="sequence")
  return _tolen


# ---------------------------------------------------------------------------------------------
# pp-string builders (the strings big_vision's transfers/common.py builds).
# ---------------------------------------------------------------------------------------------
def tok(**kw) -> str:
  """A `tok(...)` pp op string with the default tokenizer spec."""
  kw.setdefault("model", TOKENIZER)
  return "tok(" + ", ".join(f"{k}={v!r}" for k, v in kw.items()) + ")"


def combine_and_keep_train(text_len: int, before=(), sep: str = "\n") -> str:
  """Prefix (bos) + sep + suffix (eos) -> text/mask_ar/mask_loss/mask_input of text_len+1."""
  n = text_len + 1  # The trainer drops one token when shifting inputs and targets.
  return "|".join([
      *before,
      tok(key="prefix", bos="yes"),
      tok(key="suffix", eos="yes"),
      tok(key="septok", text=sep),
      'masked_concat(["prefix", "septok", "suffix"], mask_ar=[0, 0, 1], '
      'mask_loss=[0, 0, 1], mask_input=[1, 1, 1])',
      f'tolen({n}, pad_value=0, key="text")',
      f'tolen({n}, pad_value=1, key="mask_ar")',
      f'tolen({n}, pad_value=0, key="mask_loss")',
      f'tolen({n}, pad_value=0, key="mask_input")',
      'keep("image", "text", "mask_ar", "mask_loss", "mask_input")',
  ])


def combine_and_keep_eval(text_len: int, keep=(), before=(), sep: str = "\n") -> str:
  """Prefix (bos) + sep, padded to text_len; the suffix is left to the decoder."""
  keys = ("image", "text", "mask_ar", "mask_input", *keep)
  return "|".join([
      *before,
      tok(key="prefix", bos="yes"),
      tok(key="septok", text=sep),
      'masked_concat(["prefix", "septok"], mask_ar=[0, 0], mask_input=[1, 1])',
      f'tolen({text_len}, pad_value=0, key="text")',
      f'tolen({text_len}, pad_value=1, key="mask_ar")',
      f'tolen({text_len}, pad_value=0, key="mask_input")',
      "keep(" + ", ".join(f'"{k}"' for k in keys) + ")",
  ])
