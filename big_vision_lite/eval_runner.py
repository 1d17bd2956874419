"""The evaluators of a run config, built once and run on any params (train.py, evaluate.py).

  runner = EvalRunner(config, tokenizer=tok, model_config=model_config, mesh=mesh,
                      workdir=workdir, encode_masks=None)
  runner.due(step, total_steps)                 # ["caption", ...]: every N steps + the end
  metrics = runner.run(params, step=step)       # {"caption/cider": 0.41, ...}
  runner.predictions["caption"]                 # one JSON-able record per example
  runner.write_predictions(out_dir)             # predictions.jsonl (one folder per eval)
  runner.run(params, blank_images=True)         # "baseline/<name>/...": images blanked
  runner.rendered()                             # {name: uint8[N,H,W,3]} drawn predictions

config.evals is a dict name -> dict(
    type="caption" | "vqa" | "detection" | "refcoco" | "segmentation" | "perplexity" | ...,
    data=dict(name=..., split=...), pp="...", batch_size=int (examples per call, per process),
    max_decode_len=int (decoding evaluators only),
    every=int | None (None: config.eval_steps; 0: only at the end of training),
    rename={evaluator metric: reported name} (optional; e.g. the demo reports VQA
      "exact_match" as "accuracy"; unlisted metrics keep their names),
    sampler=..., ... (decoding options, see decode.make_predict_fn),
    **evaluator kwargs)   (passed to evaluators.create; unknown keys are its errors)
Examples come from data.pipeline.eval_examples (this process's shard). Decoding evaluators
get a predict function from decode.make_predict_fn; "perplexity" gets a teacher-forced
`score_fn` (TeacherForcedScorer, train layout: pp ending in combine_and_keep_train);
"segmentation" decodes <seg> codes with the VQ-VAE of config.vqvae.

Records gain the example's "prefix" and its other small JSON-able fields (questions,
answers, labels, boxes; never images or masks) before they are gathered, so that
predictions.jsonl can be read on its own.
"""
from collections.abc import Callable, Mapping, Sequence
import functools
import glob
import inspect
import json
import logging
import os
from typing import Any

import jax
import numpy as np

from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.evaluators import base as ev_base
from big_vision_lite.evaluators.perplexity import TeacherForcedScorer

log = logging.getLogger(__name__)

RUNNER_KEYS = ("type", "data", "pp", "batch_size", "max_decode_len", "every", "rename")
# Run-config keys the runner reads (config.eval_steps too, for evals with every=None).
CONFIG_KEYS = ("seed", "vqvae", "evals", "render_predictions")
# Example fields never copied into records (pixels, token arrays, masks).
_SKIP_FIELDS = frozenset({"image", "text", "mask_ar", "mask_loss", "mask_input", "masks",
                          "mask", "septok", "suffix_tokens"})
_MAX_ARRAY_SIZE = 64  # Larger numeric arrays (masks, images) stay out of the records.
Progress = Callable[[str, int, int | None], None]  # (eval name, done, total or None)


# ---------------------------------------------------------------------------------------
# Config pieces shared with evaluate.py and predict.py.
# ---------------------------------------------------------------------------------------
def load_tokenizer(spec: str | None, cache_dir: str | None):
  """config.tokenizer -> Tokenizer: a SentencePiece path, or "demo" (trained once into
  cache_dir, as train.py does in its workdir)."""
  if spec == "demo":
    from big_vision_lite.data import demo  # pylint: disable=g-import-not-at-top
    if not cache_dir:
      raise ValueError("tokenizer 'demo' needs a folder to cache the trained model in")
    os.makedirs(cache_dir, exist_ok=True)
    return demo.demo_tokenizer(cache_dir)
  if not isinstance(spec, str) or not os.path.isfile(spec):
    raise FileNotFoundError(f"tokenizer={spec!r}: not a SentencePiece model file (nor 'demo')")
  return tok_lib.Tokenizer(spec)


def run_dir(checkpoint: str) -> tuple[str | None, int | None]:
  """(training workdir, step) when `checkpoint` is a workdir (step None: its latest) or one
  of its <workdir>/checkpoints/<step> folders (see run_state.py); (None, None) otherwise."""
  path = os.path.abspath(checkpoint)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return path, None
  parent, name = os.path.split(path)
  if os.path.basename(parent) == "checkpoints" and name.isdigit():
    return os.path.dirname(parent), int(name)
  return None, None


def tokenizer_cache(checkpoint: str, out: str | None) -> str:
  """Where the "demo" tokenizer is cached: a workdir (train.py trained it there), a folder
  that already holds one (the checkpoint's, or the one beside a file), else `out`."""
  workdir, _ = run_dir(checkpoint)
  if workdir is not None:
    return workdir
  path = os.path.abspath(checkpoint)
  where = path if os.path.isdir(path) else os.path.dirname(path)
  if glob.glob(os.path.join(where, "demo_tokenizer_*.model")) or not out:
    return where
  return out


def vqvae_path(spec: str | None) -> str | None:
  """config.vqvae -> the VQ-VAE .npz path (None: no VQ-VAE; "demo": the bundled one)."""
  if not spec:
    return None
  if spec == "demo":
    from big_vision_lite.data import demo  # pylint: disable=g-import-not-at-top
    spec = demo.DEMO_VQVAE
  if not os.path.isfile(spec):
    raise FileNotFoundError(f"config.vqvae={spec!r}: no such VQ-VAE .npz file")
  return spec


def jsonable(value: Any) -> tuple[bool, Any]:
  """(ok, value as JSON types) for small ground-truth values; (False, None) otherwise."""
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, np.generic):
    value = value.item()
  if isinstance(value, bytes):
    try:
      return True, value.decode("utf-8")
    except UnicodeDecodeError:
      return False, None
  if value is None or isinstance(value, (str, bool, int, float)):
    return True, value
  if isinstance(value, np.ndarray):
    if value.dtype.kind in "biuf" and value.size > _MAX_ARRAY_SIZE:
      return False, None
    value = value.tolist()
  if isinstance(value, (list, tuple)):
    out = []
    for v in value:
      ok, v = jsonable(v)
      if not ok:
        return False, None
      out.append(v)
    return True, out
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      ok, v = jsonable(v)
      if ok and str(k) not in _SKIP_FIELDS:
        out[str(k)] = v
    return True, out
  return False, None


def example_fields(example: Mapping[str, Any]) -> dict[str, Any]:
  """The example's small JSON-able fields (prefix, question, answers, boxes, labels...)."""
  out = {}
  for k, v in example.items():
    if k in _SKIP_FIELDS:
      continue
    ok, v = jsonable(v)
    if ok:
      out[k] = v
  return out


# ---------------------------------------------------------------------------------------
# The runner.
# ---------------------------------------------------------------------------------------
def _decode_keys() -> frozenset[str]:
  """Decoding options an eval entry may set: Decoder.decode's keyword arguments."""
  from big_vision_lite import decode  # pylint: disable=g-import-not-at-top
  sig = inspect.signature(decode.Decoder.decode)
  return frozenset(n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY
                   ) - {"max_decode_len", "rng", "eos_id"}


def _as_dict(x: Any) -> dict:
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


class _Spec:
  """One checked config.evals entry."""

  def __init__(self, name: str, entry: Mapping[str, Any], decode_keys: frozenset[str]):
    where = f"config.evals.{name}"
    if not isinstance(entry, Mapping) and not hasattr(entry, "to_dict"):
      raise ValueError(f"{where}: expected a dict(type=..., data=..., pp=..., ...), got "
                       f"{entry!r}")
    entry = _as_dict(entry)
    missing = [k for k in ("type", "data", "pp", "batch_size") if k not in entry]
    if missing:
      raise ValueError(f"{where}: missing key(s) {missing} (has {sorted(entry)})")
    self.name, self.type = name, entry["type"]
    if not isinstance(self.type, str):
      raise ValueError(f"{where}.type: expected an evaluator name, got {self.type!r}")
    self.cls = ev_base.get_class(self.type)
    self.decodes = getattr(self.cls, "needs_predict_fn", True)
    if not isinstance(entry["data"], Mapping):
      raise ValueError(f"{where}.data: expected dict(name=..., split=...), got "
                       f"{entry['data']!r}")
    self.data = dict(entry["data"])
    if not isinstance(entry["pp"], str):
      raise ValueError(f"{where}.pp: expected a pp string, got {entry['pp']!r}")
    self.pp = entry["pp"]
    self.batch_size = entry["batch_size"]
    if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) \
        or self.batch_size < 1:
      raise ValueError(f"{where}.batch_size: expected an int >= 1, got {self.batch_size!r}")
    self.every = entry.get("every")
    if self.every is not None and (isinstance(self.every, bool) or not isinstance(
        self.every, int) or self.every < 0):
      raise ValueError(f"{where}.every: expected None or an int >= 0, got {self.every!r}")
    self.max_decode_len = entry.get("max_decode_len")
    if self.decodes and (not isinstance(self.max_decode_len, int) or self.max_decode_len < 1):
      raise ValueError(f"{where}.max_decode_len: a decoding evaluator ({self.type!r}) needs "
                       f"an int >= 1, got {self.max_decode_len!r}")
    if not self.decodes and self.max_decode_len is not None:
      raise ValueError(f"{where}.max_decode_len: {self.type!r} does not decode; remove it")
    self.rename = _as_dict(entry.get("rename") or {})
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in self.rename.items()):
      raise ValueError(f"{where}.rename: expected {{metric: new name}} strings, got "
                       f"{self.rename!r}")
    rest = {k: v for k, v in entry.items() if k not in RUNNER_KEYS}
    self.decode_kw = {k: rest.pop(k) for k in list(rest) if self.decodes and k in decode_keys}
    self.kwargs = rest  # For the evaluator's constructor, which rejects unknown keys.


class EvalRunner:
  """Builds config.evals once; runs them on params (see the module docstring).

  The run config needs CONFIG_KEYS (config.render_predictions: how many examples
  `rendered` draws; 0 = none).

  Attributes:
    predictions: {name: records of the latest run} (JSON-able, all processes').
    metrics: {name: {metric: value} of the latest run}; steps: {name: step of that run}.
  """

  def __init__(self, config, *, tokenizer, model_config: Mapping[str, Any], mesh=None,
               workdir: str | None = None, encode_masks: Callable | None = None):
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
      raise ValueError(f"EvalRunner: config lacks {missing} (configs/common.py sets them)")
    # workdir: where train.py keeps its outputs; the runner writes only when asked to.
    self.config, self.tokenizer, self.mesh, self.workdir = config, tokenizer, mesh, workdir
    self.model_config = _as_dict(model_config)
    self.seed = int(config.seed)
    self.render_count = int(config.render_predictions or 0)
    self._vq_params = None
    if (path := vqvae_path(config.vqvae)) is not None:
      from big_vision_lite.models import vqvae  # pylint: disable=g-import-not-at-top
      _, self._vq_params = vqvae.load(path)
      if encode_masks is None:
        encode_masks = functools.partial(_encode_masks, self._vq_params)
    evals = _as_dict(config.evals or {})
    decode_keys = _decode_keys()
    self.specs = {name: _Spec(name, entry, decode_keys) for name, entry in evals.items()}
    self.evaluators: dict[str, ev_base.Evaluator] = {}
    self._scorers: dict[str, TeacherForcedScorer] = {}
    self._decoder = None
    for name, spec in self.specs.items():
      examples = self._examples(spec, encode_masks)
      kwargs = dict(spec.kwargs)
      params = inspect.signature(spec.cls.__init__).parameters
      if "decode_masks" in params and not {"decode_masks", "vqvae_checkpoint"} & set(kwargs):
        if self._vq_params is None:
          raise ValueError(f"config.evals.{name}: {spec.type!r} decodes <seg> codes: set "
                           "config.vqvae (a VQ-VAE .npz, or 'demo')")
        kwargs["decode_masks"] = self.decode_masks
      try:
        ev = ev_base.create(spec.type, examples=examples, batch_size=spec.batch_size,
                            **kwargs)
      except TypeError as e:
        raise ValueError(f"config.evals.{name}: bad option for the {spec.type!r} evaluator: "
                         f"{e}") from None
      if spec.decodes:
        self._add_example_fields(ev)
      else:
        self._scorers[name] = TeacherForcedScorer(self.model_config,
                                                  batch_size=spec.batch_size, mesh=mesh)
      self.evaluators[name] = ev
    self.predictions: dict[str, list[dict]] = {}
    self.metrics: dict[str, dict[str, float]] = {}
    self.steps: dict[str, int | None] = {}
    self._shown: dict[str, list[dict]] = {}  # Examples kept for rendering, per eval.

  # -- construction helpers ----------------------------------------------------------------
  def _examples(self, spec: _Spec, encode_masks):
    from big_vision_lite.data import pipeline  # pylint: disable=g-import-not-at-top
    try:
      return pipeline.eval_examples(spec.data, spec.pp, tokenizer=self.tokenizer,
                                    encode_masks=encode_masks, seed=self.seed)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise type(e)(f"config.evals.{spec.name}: {e}") from e

  @staticmethod
  def _add_example_fields(ev: ev_base.Evaluator) -> None:
    """Records get the example's prefix and small ground-truth fields (before gathering)."""
    score_batch = ev.score_batch

    def with_fields(examples, predictions):
      records = score_batch(examples, predictions)
      out = []
      for ex, rec in zip(examples, records):
        head = {"id": rec["id"], "prefix": rec.get("prefix", ex.get("prefix"))}
        ok, head["prefix"] = jsonable(head["prefix"])
        extra = {k: v for k, v in example_fields(ex).items() if k not in rec and k != "prefix"}
        out.append({**head, **rec, **extra})
      return out

    ev.score_batch = with_fields  # An instance attribute: base.run calls it per batch.

  def decode_masks(self, codes) -> np.ndarray:
    """int32[N,16] <seg> codes -> float32[N,64,64,1] mask logits (config.vqvae)."""
    from big_vision_lite.models import vqvae  # pylint: disable=g-import-not-at-top
    if self._vq_params is None:
      raise ValueError("no VQ-VAE: set config.vqvae to decode <seg> codes")
    return np.asarray(vqvae.decode(self._vq_params, codes))

  def _get_decoder(self):
    if self._decoder is None:
      from big_vision_lite import decode  # pylint: disable=g-import-not-at-top
      self._decoder = decode.get_decoder(self.model_config, mesh=self.mesh)
    return self._decoder

  # -- scheduling --------------------------------------------------------------------------
  def due(self, step: int, total_steps: int) -> list[str]:
    """Evaluators to run after `step`: every `every` steps (None: config.eval_steps; 0:
    never before the end) and all of them at total_steps."""
    out = []
    for name, spec in self.specs.items():
      every = spec.every
      if every is None:
        every = self.config.get("eval_steps")
        if not isinstance(every, int) or every < 1:
          raise ValueError(f"config.evals.{name}.every is None, so config.eval_steps must be "
                           f"an int >= 1; got {every!r}")
      if step == total_steps or (every and step % every == 0):
        out.append(name)
    return out

  # -- running -----------------------------------------------------------------------------
  def run(self, params, step: int | None = None, names: Sequence[str] | None = None, *,
          progress: Progress | None = None, blank_images: bool = False
          ) -> dict[str, float]:
    """Runs the named evaluators (default: all) on params.

    Args:
      params: the model's params (on the devices / sharded, as the model expects).
      step: the training step, kept in `steps`.
      names: which evals (keys of config.evals).
      progress: called as progress(name, examples done on this process, this process's
        total or None) before the first batch (done 0) and after each batch.
      blank_images: the "no image" baseline: every image is replaced by zeros (mid-gray);
        metrics are keyed "baseline/<name>/<metric>" and predictions are not kept.
    Returns:
      {"<name>/<metric>": float}, the same on every process.
    """
    names = list(self.specs) if names is None else list(names)
    unknown = [n for n in names if n not in self.specs]
    if unknown:
      raise KeyError(f"unknown eval(s) {unknown}; config.evals has {sorted(self.specs)}")
    out = {}
    for name in names:
      spec, ev = self.specs[name], self.evaluators[name]
      examples = ev._examples  # pylint: disable=protected-access
      total = len(examples) if hasattr(examples, "__len__") else None
      done = [0]
      shown = [] if spec.decodes and not blank_images else None

      def wrap(fn, name=name, total=total, done=done, shown=shown):
        def call(examples):
          if blank_images:
            examples = [{**e, "image": np.zeros_like(np.asarray(e["image"]))}
                        for e in examples]
          result = fn(examples)
          if shown is not None and len(shown) < self.render_count:
            shown.extend(examples[:self.render_count - len(shown)])
          done[0] += len(examples)
          if progress is not None:
            progress(name, done[0], total)
          return result
        return call

      if progress is not None:
        progress(name, 0, total)
      if spec.decodes:
        predict_fn = self._predict_fn(spec, params)
        metrics = ev.run(wrap(predict_fn))
      else:
        scorer = self._scorers[name]
        metrics = ev.run(score_fn=wrap(functools.partial(scorer, params)))
      metrics = {spec.rename.get(k, k): v for k, v in metrics.items()}
      prefix = f"baseline/{name}" if blank_images else name
      out.update({f"{prefix}/{k}": v for k, v in metrics.items()})
      if blank_images:
        self.metrics[prefix] = dict(metrics)
        continue
      self.metrics[name], self.steps[name] = dict(metrics), step
      self.predictions[name] = list(ev.last_predictions)
      self._shown[name] = shown
      log.info("eval %s (step %s): %s", name, step,
               ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return out

  def _predict_fn(self, spec: _Spec, params):
    from big_vision_lite import decode  # pylint: disable=g-import-not-at-top
    return decode.make_predict_fn(
        self._get_decoder(), params, self.tokenizer, max_decode_len=spec.max_decode_len,
        batch_size=spec.batch_size, rng=jax.random.key(self.seed), **spec.decode_kw)

  def final_metrics(self) -> dict[str, float]:
    """The latest value of every metric: {"<name>/<metric>": value} (baselines included)."""
    return {f"{name}/{k}": v for name, m in self.metrics.items() for k, v in m.items()}

  # -- outputs -----------------------------------------------------------------------------
  def write_predictions(self, out_dir: str, names: Sequence[str] | None = None) -> list[str]:
    """Writes the latest predictions as JSON lines: out_dir/predictions.jsonl for one eval,
    out_dir/<name>/predictions.jsonl for several. Call on one process only. Returns paths."""
    names = [n for n in (names or self.predictions) if n in self.predictions]
    paths = []
    for name in names:
      folder = out_dir if len(names) == 1 else os.path.join(out_dir, name)
      os.makedirs(folder, exist_ok=True)
      path = os.path.join(folder, "predictions.jsonl")
      tmp = f"{path}.tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        for rec in self.predictions[name]:
          f.write(json.dumps(rec, ensure_ascii=False) + "\n")
      os.replace(tmp, path)
      paths.append(path)
    return paths

  def rendered(self, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """{name: uint8[N,H,W,3]}: this process's first config.render_predictions examples of
    each decoding eval, drawn with their predictions (boxes, masks) and references."""
    from big_vision_lite import render  # pylint: disable=g-import-not-at-top
    out = {}
    for name in names or list(self._shown):
      shown = self._shown.get(name)
      if not shown or not self.specs[name].decodes:
        continue
      by_id = {r["id"]: r for r in self.predictions[name]}
      images, texts, prompts, targets, masks = [], [], [], [], []
      for ex in shown:
        rec = by_id.get(ev_base.example_id(ex))
        if rec is None:
          continue
        image = np.asarray(ex["image"])
        images.append(image)
        texts.append(rec["prediction"])
        prompts.append(str(rec.get("prefix") or ""))
        targets.append(_target_text(rec))
        masks.append(self.masks_for(rec["prediction"], image.shape[:2]))
      if images:
        out[name] = render.render_batch(images, texts, prompts=prompts, targets=targets,
                                        masks=masks)
    return out

  def masks_for(self, text: str, hw: tuple[int, int]) -> list | None:
    """object_masks of the objects parsed from `text`, decoded with config.vqvae; None
    without a VQ-VAE or when no object has <seg> codes."""
    objects = tok_lib.parse_objects(text)
    if self._vq_params is None or not any(o.seg_codes and o.box for o in objects):
      return None
    return object_masks(objects, hw, self.decode_masks)


def object_masks(objects: Sequence[tok_lib.DetectedObject], hw: tuple[int, int],
                 decode_masks: Callable[[np.ndarray], Any]) -> list[np.ndarray | None]:
  """bool[H,W] per object with a box and 16 <seg> codes (None for the others): the codes'
  decoded mask pasted into the box (corners int(v * size)) as the segmentation evaluator
  does. decode_masks: int32[N,16] -> float32[N,64,64,1] logits."""
  from big_vision_lite.models import vqvae  # pylint: disable=g-import-not-at-top
  h, w = hw
  out = []
  for o in objects:
    if o.seg_codes is None or o.box is None:
      out.append(None)
      continue
    logits = np.asarray(decode_masks(np.asarray([o.seg_codes], np.int32)))[0]
    box = (int(o.box[0] * h), int(o.box[1] * w), int(o.box[2] * h), int(o.box[3] * w))
    out.append(vqvae.mask_in_box(logits, box, (h, w)))
  return out


def _encode_masks(vq_params, masks: np.ndarray) -> np.ndarray:
  from big_vision_lite.models import vqvae  # pylint: disable=g-import-not-at-top
  return np.asarray(vqvae.encode(vq_params, masks))


def _target_text(rec: Mapping[str, Any]) -> str | None:
  """A reference to show under a drawn prediction (the first caption, the answers)."""
  for key in ("captions", "answers"):
    if isinstance(rec.get(key), list) and rec[key]:
      return rec[key][0] if key == "captions" else " | ".join(map(str, rec[key]))
  if isinstance(rec.get("answer"), str):
    return rec["answer"]
  return None
