"""The preprocessing string DSL and the op registry (big_vision's pp "minilanguage").

A pp string chains ops with "|": `decode|resize(224)|value_range(-1, 1)|strfmt("caption en",
outkey="prefix")`. Each op is a registered factory called with Python-literal arguments; it
returns a function `fn(data: dict, rt: Runtime) -> dict` over one example (numpy values, no
TF). Unknown ops, bad arguments and non-literal values are `PPError`s that show the pp string
with a caret under the offending op. Failures while an op runs on an example become
`ExampleError`s that name the op (the pipeline adds the source and the record's location).

Keys may address nested dicts with "/" ("objects/bbox" reads data["objects"]["bbox"] when there
is no flat "objects/bbox" key), so `flatten` is optional; big_vision configs that flatten first
work unchanged.
"""
import ast
import dataclasses
import difflib
import functools
import inspect
from typing import Any, Callable

import numpy as np

Example = dict[str, Any]
OpFn = Callable[[Example, "Runtime"], Example]

_REGISTRY: dict[str, Callable[..., OpFn]] = {}


class PPError(ValueError):
  """A pp string that cannot be built: unknown op, bad argument, syntax."""


class ExampleError(Exception):
  """One example cannot be read or preprocessed (skippable with skip_bad_examples)."""

  def __init__(self, reason: str, *, op: str | None = None, where: str | None = None):
    self.reason, self.op, self.where = reason, op, where
    super().__init__(self._message())

  def _message(self) -> str:
    msg = self.reason
    if self.op:
      msg = f"pp op {self.op}: {msg}"
    if self.where:
      msg = f"{self.where}: {msg}"
    return msg

  def at(self, where: str) -> "ExampleError":
    """The same error located at a record ("file.jsonl:12", "tfds:coco_captions/train[5]")."""
    self.where = where if not self.where else self.where
    self.args = (self._message(),)
    return self


class TextTooLongError(ExampleError):
  """Tokens longer than the requested length while truncation is off."""


@dataclasses.dataclass
class PPContext:
  """What ops get from the pipeline rather than from the pp string.

  Attributes:
    tokenizer: a big_vision_lite.tokenizer.Tokenizer for `tok` (model= names in the pp string
      are checked, then mapped to this one tokenizer).
    encode_masks: float32[N,64,64,1] masks in [0, 1] -> int[N,16] VQ-VAE codes, for the
      segmentation target ops.
    truncate: over-long text is truncated and counted (True) or an ExampleError (False).
  """
  tokenizer: Any = None
  encode_masks: Callable[[np.ndarray], np.ndarray] | None = None
  truncate: bool = False


class Runtime:
  """Per-example state handed to every op: deterministic randomness and counters.

  The rng depends only on (seed, source index, epoch), never on worker or process count, so a
  resumed or resharded run preprocesses each record identically.
  """

  def __init__(self, seed: int = 0, index: int = 0, epoch: int = 0, ctx: PPContext | None = None):
    self.seed, self.index, self.epoch = int(seed), int(index), int(epoch)
    self.ctx = ctx or PPContext()
    self.truncated = False  # Set by tolen/tok when they cut tokens (counted by the pipeline).
    self._rng = None

  @property
  def rng(self) -> np.random.Generator:
    if self._rng is None:  # Lazy: most eval pps never draw a random number.
      self._rng = np.random.default_rng([self.seed, self.index, self.epoch])
    return self._rng


def register(name: str):
  """Decorator: registers an op factory under `name` (one name, one factory)."""
  def deco(factory):
    if name in _REGISTRY:
      raise KeyError(f"pp op {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory
  return deco


def registered_ops() -> list[str]:
  _import_ops()
  return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------
# Nested-key access shared by the ops.
# ---------------------------------------------------------------------------------------------
_MISSING = object()


def get_key(data: Example, key: str, default=_MISSING):
  """data[key], or the nested value at the "a/b" path; KeyError naming the keys there."""
  if key in data:
    return data[key]
  node = data
  for part in key.split("/"):
    if isinstance(node, dict) and part in node:
      node = node[part]
    else:
      if default is not _MISSING:
        return default
      raise KeyError(key)
  return node


def set_key(data: Example, key: str, value) -> None:
  """Writes a flat key, or into an existing nested dict along the "a/b" path (copied first)."""
  if key in data or "/" not in key:
    data[key] = value
    return
  head, _, rest = key.partition("/")
  if isinstance(data.get(head), dict):
    data[head] = dict(data[head])  # Never mutate a dict that the source may share.
    set_key(data[head], rest, value)
  else:
    data[key] = value


def inkey_outkey(indefault: str | None = "image", outdefault: str | None = "image"):
  """Adds big_vision's `key` / `inkey` / `outkey` arguments to a single-value op factory.

  The factory returns `fn(value, rt, data) -> value`; the decorated factory returns the usual
  `fn(data, rt) -> data`. The combined signature is kept so that bad arguments are caught when
  the pp string is built.
  """
  def deco(factory):
    @functools.wraps(factory)
    def wrapped(*args, key=None, inkey=indefault, outkey=outdefault, **kw):
      src, dst = key or inkey, key or outkey
      if not src or not dst:
        raise TypeError("needs key= (or inkey= and outkey=)")
      fn = factory(*args, **kw)

      def _op(data, rt):
        set_key(data, dst, fn(get_key(data, src), rt, data))
        return data
      return _op

    params = [p for p in inspect.signature(factory).parameters.values()
              if p.kind != p.VAR_KEYWORD]
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d)
             for n, d in (("key", None), ("inkey", indefault), ("outkey", outdefault))]
    positional = [p for p in params if p.kind != p.KEYWORD_ONLY]
    keyword = [p for p in params if p.kind == p.KEYWORD_ONLY]
    wrapped.__signature__ = inspect.Signature(positional + keyword + extra)
    return wrapped
  return deco


# ---------------------------------------------------------------------------------------------
# Parsing.
# ---------------------------------------------------------------------------------------------
def split_ops(pp: str) -> list[tuple[str, int]]:
  """Splits at top-level "|" (not inside quotes or brackets): [(op_text, start_offset)]."""
  parts, depth, quote, start, i = [], 0, None, 0, 0
  while i < len(pp):
    c = pp[i]
    if quote:
      if c == "\\":
        i += 1
      elif c == quote:
        quote = None
    elif c in "'\"":
      quote = c
    elif c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "|" and depth == 0:
      parts.append((pp[start:i], start))
      start = i + 1
    i += 1
  parts.append((pp[start:], start))
  return parts


def _pointer(pp: str, start: int, length: int) -> str:
  """The pp string (or the window around the op) with ^^^ under [start, start+length)."""
  lo = max(0, start - 60)
  hi = min(len(pp), start + length + 60)
  prefix = "..." if lo else ""
  suffix = "..." if hi < len(pp) else ""
  shown = prefix + pp[lo:hi] + suffix
  caret = " " * (len(prefix) + start - lo) + "^" * max(1, min(length, hi - start))
  return f"  {shown}\n  {caret}"


@dataclasses.dataclass(frozen=True)
class OpSpec:
  """One parsed op: name, literal arguments, and where it sits in the pp string."""
  name: str
  args: tuple
  kwargs: dict
  text: str
  start: int


def parse(pp: str) -> list[OpSpec]:
  """Parses a pp string into OpSpecs (no registry lookup yet)."""
  if not isinstance(pp, str):
    raise PPError(f"pp must be a string, got {type(pp).__name__}: {pp!r}")
  specs = []
  for raw, offset in split_ops(pp):
    text = raw.strip()
    if not text:
      continue  # big_vision skips empty sections ("a||b", trailing "|").
    start = offset + len(raw) - len(raw.lstrip())
    where = _pointer(pp, start, len(text))
    try:
      expr = ast.parse(text, mode="eval").body
    except SyntaxError as e:
      raise PPError(f"pp syntax error in op {text!r}: {e.msg}\n{where}") from None
    if isinstance(expr, ast.Name):
      specs.append(OpSpec(expr.id, (), {}, text, start))
      continue
    if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
      raise PPError(f"pp op must be a name or a call like resize(224), got {text!r}\n{where}")
    try:
      args = tuple(ast.literal_eval(a) for a in expr.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in expr.keywords}
    except ValueError:
      raise PPError(f"pp op {expr.func.id}: arguments must be Python literals (numbers, "
                    f"strings, lists, tuples, dicts, True/False/None), got {text!r}\n"
                    f"{where}") from None
    if any(k.arg is None for k in expr.keywords):
      raise PPError(f"pp op {expr.func.id}: **kwargs are not supported\n{where}")
    specs.append(OpSpec(expr.func.id, args, kwargs, text, start))
  return specs


def _import_ops() -> None:
  # The op modules register themselves on import; imported here so that parse-only users
  # (and worker processes unpickling a Preprocess) always see the full registry.
  from big_vision_lite.data import pp_ops, pp_targets, pp_text  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import


def _build_op(spec: OpSpec, pp: str, ctx: PPContext) -> OpFn:
  where = _pointer(pp, spec.start, len(spec.text))
  factory = _REGISTRY.get(spec.name)
  if factory is None:
    close = difflib.get_close_matches(spec.name, _REGISTRY, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise PPError(f"unknown pp op {spec.name!r}{hint}\n{where}\n"
                  f"known ops: {', '.join(sorted(_REGISTRY))}")
  sig = inspect.signature(factory)
  kwargs = dict(spec.kwargs)
  if "ctx" in kwargs:
    raise PPError(f"pp op {spec.name}: ctx is supplied by the pipeline, not the pp string\n"
                  f"{where}")
  if "ctx" in sig.parameters:
    kwargs["ctx"] = ctx
  try:
    sig.bind(*spec.args, **kwargs)
  except TypeError as e:
    shown = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "ctx"])
    raise PPError(f"pp op {spec.name}: bad arguments ({e}); signature: {spec.name}{shown}\n"
                  f"{where}") from None
  try:
    return factory(*spec.args, **kwargs)
  except (ValueError, TypeError, KeyError) as e:
    raise PPError(f"pp op {spec.name}: {e}\n{where}") from None


class Preprocess:
  """A compiled pp string: `pp(example, rt) -> example` (picklable for grain workers)."""

  def __init__(self, pp: str, ctx: PPContext | None = None):
    _import_ops()
    self.pp = pp
    self.ctx = ctx or PPContext()
    self.specs = _apply_decode_drafts(parse(pp))
    self.ops = [(spec, _build_op(spec, pp, self.ctx)) for spec in self.specs]

  def __repr__(self) -> str:
    return f"Preprocess({self.pp!r})"

  def __call__(self, data: Example, rt: Runtime | None = None) -> Example:
    rt = rt or Runtime(ctx=self.ctx)
    data = dict(data)  # Ops write into the dict: never into the source's own record.
    for spec, op in self.ops:
      try:
        data = op(data, rt)
      except ExampleError as e:
        if e.op is None:
          e.op = spec.text
          e.args = (e._message(),)  # pylint: disable=protected-access
        raise
      except KeyError as e:
        key = e.args[0] if e.args else "?"
        raise ExampleError(f"missing field {key!r}; the example has {_describe_keys(data)}",
                           op=spec.text) from None
      except Exception as e:  # Anything else an op raises is about this example's data.
        raise ExampleError(f"{type(e).__name__}: {e}", op=spec.text) from e
      if not isinstance(data, dict):
        raise ExampleError(f"returned {type(data).__name__}, not a dict", op=spec.text)
    return data


def _describe_keys(data: Example) -> str:
  keys = []
  for k, v in data.items():
    keys.append(f"{k}/{{{', '.join(v)}}}" if isinstance(v, dict) else k)
  return f"keys [{', '.join(keys)}]"


def _apply_decode_drafts(specs: list[OpSpec]) -> list[OpSpec]:
  """decode directly followed by a downscaling resize(S)/resize_small(S) of the same key gets
  draft=S, so that JPEGs decode at a reduced DCT scale (still >= S, then resized exactly)."""
  out = list(specs)
  for i, (a, b) in enumerate(zip(specs, specs[1:])):
    if a.name != "decode" or "draft" in a.kwargs or b.name not in ("resize", "resize_small"):
      continue
    if (a.kwargs.get("key") or a.kwargs.get("outkey") or "image") != (
        b.kwargs.get("key") or b.kwargs.get("inkey") or "image"):
      continue
    size = b.args[0] if b.args else b.kwargs.get("size", b.kwargs.get("smaller_size"))
    sizes = [size] if isinstance(size, int) else size
    # Only valid sizes: a bad one is reported by resize itself, not by decode.
    if (isinstance(sizes, (list, tuple)) and len(sizes) in (1, 2)
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes)):
      out[i] = dataclasses.replace(a, kwargs={**a.kwargs, "draft": size})
  return out


def to_str(value, what: str = "value") -> str:
  """A text field as str (bytes are UTF-8, numpy 0-d arrays unwrapped)."""
  if isinstance(value, np.ndarray):
    if value.ndim:
      raise ExampleError(f"{what} must be one string, got an array of shape {value.shape}")
    value = value.item()
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise ExampleError(f"{what} is not valid UTF-8: {e}") from None
  if isinstance(value, str):
    return value
  raise ExampleError(f"{what} must be a string, got {type(value).__name__}: {value!r:.80}")
