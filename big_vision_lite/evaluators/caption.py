"""Captioning metrics (COCO caption evaluation): CIDEr, BLEU-1..4, ROUGE-L, METEOR, SPICE.

The scores come from pycocoevalcap's own scorers, applied as big_vision's coco_caption
evaluator does: predictions and references are first tokenised by the Stanford
PTBTokenizer (lowercased, punctuation tokens dropped), then scored over the whole set
(CIDEr's IDF and BLEU's brevity penalty are corpus-level, hence metrics come from the
records of all processes, see base.py).

Java: pycocoevalcap's PTBTokenizer, METEOR and SPICE are Java programs.
  * Tokenisation: with `java` on the PATH we run the bundled Stanford CoreNLP 3.4.1
    PTBTokenizer exactly as pycocoevalcap does (but with its temporary file in the system
    temp dir, so a read-only site-packages works). Without Java, `ptb_tokenize_python`
    reproduces its output on caption-like text (clitics "man 's" / "is n't", sentence and
    word-final periods, commas/colons except inside numbers, brackets as -lrb- ...,
    which pycocoevalcap keeps since its punctuation list is upper case); a notice is
    logged once. Rare constructs (unlisted abbreviations, "rock'n'roll") can
    tokenise differently, so Java-less scores may differ slightly from official ones.
  * METEOR needs Java; SPICE needs Java and the Stanford CoreNLP 3.6.0 jars that
    pycocoevalcap downloads on first use (pycocoevalcap/spice/lib). When missing, they
    are skipped with a logged notice and left out of the metrics.
"""
import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

from big_vision_lite.evaluators import base

_log = logging.getLogger(__name__)

# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS: tokens removed after tokenisation.
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".",
                          "?", "!", ",", ":", "-", "--", "...", ";"])
METRICS = ("cider", "bleu-1", "bleu-2", "bleu-3", "bleu-4", "rouge-l", "meteor", "spice")
_JAVA_METRICS = ("meteor", "spice")

_notices_given: set[str] = set()


def _notice_once(key: str, msg: str) -> None:
  if key not in _notices_given:
    _notices_given.add(key)
    _log.warning(msg)


def java_available() -> bool:
  return shutil.which("java") is not None


def _pycocoevalcap_dir() -> str:
  # A namespace package (no __init__.py): locate it through one of its modules.
  from pycocoevalcap.tokenizer import ptbtokenizer  # pylint: disable=import-outside-toplevel
  return os.path.dirname(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)))


# ---------------------------------------------------------------------------------------
# Tokenisation.
# ---------------------------------------------------------------------------------------
def ptb_tokenize_java(sentences: Sequence[str]) -> list[str]:
  """pycocoevalcap's PTBTokenizer: one space-joined lowercase token string per sentence."""
  jar = os.path.join(_pycocoevalcap_dir(), "tokenizer", "stanford-corenlp-3.4.1.jar")
  if not os.path.exists(jar):
    raise FileNotFoundError(f"PTBTokenizer jar not found at {jar} (pycocoevalcap install)")
  text = "".join(s.replace("\r", " ").replace("\n", " ") + "\n" for s in sentences)
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False,
                                   encoding="utf-8") as f:
    f.write(text)
  try:
    out = subprocess.run(
        ["java", "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
         "-lowerCase", "-encoding", "utf-8", f.name],
        capture_output=True, check=True).stdout.decode("utf-8")
  finally:
    os.remove(f.name)
  lines = out.split("\n")[:len(sentences)]
  lines += [""] * (len(sentences) - len(lines))  # Trailing empty lines may be dropped.
  return [" ".join(w for w in line.rstrip().split(" ") if w and w not in PUNCTUATIONS)
          for line in lines]


_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-",
             "}": "-rcb-"}
# Word-final periods PTBLexer keeps (a subset of its list: those plausible in captions).
_ABBREVIATIONS = frozenset(
    "mr. mrs. ms. dr. st. jr. sr. vs. etc. inc. ltd. co. corp. mt. ft. prof. gen. no. "
    "lt. sgt. capt. col. rev. ave. jan. feb. mar. apr. jun. jul. aug. sep. sept. oct. "
    "nov. dec. approx. dept. est. fig.".split())
# Words PTBLexer splits in two (its list is longer; these occur in captions).
_SPLIT_WORDS = {"gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "'twas": ["'t", "was"], "cannot": ["can", "not"]}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'m|'d|'re|'ve|'ll)$")
_INITIALS = re.compile(r"^(?:[^\W\d_]\.)+$")  # u.s.a. / p.m. / single initial "b."
_SUBS = [
    (re.compile(r"\.{3,}"), " ... "),
    (re.compile(r"--+"), " -- "),
    (re.compile(r"\""), " '' "),
    (re.compile(r"[()\[\]{}]"), lambda m: f" {_BRACKETS[m.group()]} "),
    (re.compile(r";"), " ; "),
    # , and : split off, except inside numbers (1,000 / 10:30).
    (re.compile(r"(?<!\d)([,:])|([,:])(?!\d)"), lambda m: f" {m.group()} "),
    # ! and ? runs split off at a word end only ("ok?yes" stays one token).
    (re.compile(r"([!?]+)(?=\s|$|')"), r" \1 "),
    (re.compile(r"([$#%])"), r" \1 "),
    # PTBLexer reads "1 1/2" as one fraction token, joined by a no-break space.
    (re.compile(r"(?<![^\s])(\d+) (\d+/\d+)(?!\S)"), "\\1\x00\\2"),
]


def _split_token(tok: str) -> list[str]:
  if tok in _SPLIT_WORDS:
    return list(_SPLIT_WORDS[tok])
  out_tail = []
  if len(tok) > 1 and tok[0] in "'`" and not _CLITIC.match("x" + tok):
    return [tok[0]] + _split_token(tok[1:])  # Opening single quote.
  if tok.endswith(".") and len(tok) > 1 and tok != "...":
    if tok not in _ABBREVIATIONS and not _INITIALS.match(tok):
      tok, out_tail = tok[:-1], ["."]
  if len(tok) > 1 and tok.endswith("'") and not tok.endswith("''"):
    tok, out_tail = tok[:-1], ["'"] + out_tail  # Closing quote / plural possessive.
  m = _CLITIC.match(tok)
  if m:
    return [m.group(1), m.group(2)] + out_tail
  return [tok] + out_tail


def ptb_tokenize_python(sentence: str) -> str:
  """Pure-Python stand-in for pycocoevalcap's PTBTokenizer (see the module docstring)."""
  s = sentence.lower()
  for pattern, repl in _SUBS:
    s = pattern.sub(repl, s)
  tokens = [t.replace("\x00", "\xa0") for tok in s.split() for t in _split_token(tok)]
  return " ".join(t for t in tokens if t and t not in PUNCTUATIONS)


def tokenize(sentences: Sequence[str], backend: str = "auto") -> list[str]:
  """PTB-tokenises sentences. backend: "auto" (Java when present), "java" or "python"."""
  if backend not in ("auto", "java", "python"):
    raise ValueError(f"tokenizer backend must be 'auto', 'java' or 'python', got "
                     f"{backend!r}")
  if backend == "auto":
    backend = "java" if java_available() else "python"
    if backend == "python":
      _notice_once("tokenizer", "caption metrics: `java` not found; tokenising with "
                   "big_vision_lite's pure-Python PTBTokenizer equivalent (scores can "
                   "differ slightly from the official Java tokenizer on unusual text)")
  if backend == "java":
    if not java_available():
      raise RuntimeError("caption tokenizer='java' but no `java` on the PATH")
    return ptb_tokenize_java(sentences)
  return [ptb_tokenize_python(s) for s in sentences]


# ---------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------
def _spice_available() -> bool:
  lib = os.path.join(_pycocoevalcap_dir(), "spice", "lib")
  return all(os.path.exists(os.path.join(lib, f)) for f in (
      "stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"))


def available_metrics(metrics: Iterable[str]) -> list[str]:
  """The requested metrics that can run here (Java ones dropped with a notice)."""
  out = []
  for m in metrics:
    if m in _JAVA_METRICS and not java_available():
      _notice_once(m, f"caption metrics: {m.upper()} needs Java (no `java` on the "
                   "PATH): skipped")
      continue
    if m == "spice" and not _spice_available():
      _notice_once("spice-models", "caption metrics: SPICE needs the Stanford CoreNLP "
                   "3.6.0 jars in pycocoevalcap/spice/lib (python -c 'from pycocoevalcap"
                   ".spice.get_stanford_models import get_stanford_models as g; g()' "
                   "downloads them): skipped")
      continue
    out.append(m)
  return out


def caption_scores(references: dict[Any, Sequence[str]], predictions: dict[Any, str], *,
                   metrics: Sequence[str] = ("cider", "bleu-4", "rouge-l"),
                   tokenizer: str = "auto") -> dict[str, float]:
  """Corpus-level caption metrics, as the COCO caption evaluation computes them.

  Args:
    references: key -> reference captions (>= 1 each), raw text.
    predictions: key -> predicted caption, raw text; the same keys as `references`.
    metrics: names from METRICS; METEOR/SPICE are skipped when they cannot run.
    tokenizer: "auto" | "java" | "python" (see `tokenize`).
  Returns:
    metric name -> score (pycocoevalcap's scale: CIDEr ~ 0..10, others 0..1).
  """
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise ValueError(f"unknown caption metrics {unknown}; known: {list(METRICS)}")
  if set(references) != set(predictions):
    raise ValueError("caption_scores: references and predictions have different keys")
  keys = list(references)
  for k in keys:
    if not references[k]:
      raise ValueError(f"caption_scores: no reference captions for key {k!r}")
  # pycocoevalcap scorers want int-like keys in a consistent order; use positions.
  flat = [c for k in keys for c in references[k]] + [predictions[k] for k in keys]
  toks = tokenize(flat, tokenizer)
  gts, res, pos = {}, {}, 0
  for i, k in enumerate(keys):
    n = len(references[k])
    gts[i], pos = toks[pos:pos + n], pos + n
  for i in range(len(keys)):
    res[i] = [toks[pos + i]]
  return _score_tokenized(gts, res, available_metrics(metrics))


def _score_tokenized(gts: dict[int, list[str]], res: dict[int, list[str]],
                     metrics: Sequence[str]) -> dict[str, float]:
  # pylint: disable=import-outside-toplevel
  from pycocoevalcap.bleu.bleu import Bleu
  from pycocoevalcap.cider.cider import Cider
  from pycocoevalcap.rouge.rouge import Rouge
  # pylint: enable=import-outside-toplevel
  out: dict[str, float] = {}
  if "cider" in metrics:
    out["cider"] = float(Cider().compute_score(gts, res)[0])
  bleus = [m for m in metrics if m.startswith("bleu-")]
  if bleus:
    b = Bleu(4).compute_score(gts, res, verbose=0)[0]
    for m in bleus:
      out[m] = float(b[int(m[-1]) - 1])
  if "rouge-l" in metrics:
    out["rouge-l"] = float(Rouge().compute_score(gts, res)[0])
  if "meteor" in metrics:
    out["meteor"] = _meteor(gts, res)
  if "spice" in metrics:
    from pycocoevalcap.spice.spice import Spice  # pylint: disable=import-outside-toplevel
    out["spice"] = float(Spice().compute_score(gts, res)[0])
  return out


def _meteor(gts, res) -> float:
  from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
  scorer = Meteor()
  try:
    return float(scorer.compute_score(gts, res)[0])
  finally:  # Its __del__ is unreliable; don't leave a 2 GB JVM behind.
    with scorer.lock:
      scorer.meteor_p.stdin.close()
      scorer.meteor_p.kill()
      scorer.meteor_p.wait()


# ---------------------------------------------------------------------------------------
@base.register("caption")
class CaptionEvaluator(base.Evaluator):
  """COCO-style caption evaluator.

  Examples need "id" and "captions" (list[str], >= 1 reference). Records:
  {"id", "prediction", "captions"}. Metrics: the requested subset of METRICS that can run
  (see the module docstring), e.g. {"cider": ..., "bleu-4": ..., "rouge-l": ...}.
  """

  def __init__(self, examples, *, metrics: Sequence[str] = ("cider", "bleu-4", "rouge-l"),
               tokenizer: str = "auto", **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      metrics: caption metrics to report (names in METRICS).
      tokenizer: "auto" (Java PTBTokenizer when present), "java" or "python".
    """
    super().__init__(examples, **kw)
    if isinstance(metrics, str):
      metrics = (metrics,)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
      raise ValueError(f"caption evaluator: metrics must be a non-empty subset of "
                       f"{list(METRICS)}, got {list(metrics)}")
    if tokenizer not in ("auto", "java", "python"):
      raise ValueError(f"caption evaluator: tokenizer must be 'auto', 'java' or "
                       f"'python', got {tokenizer!r}")
    self.metrics, self.tokenizer = tuple(metrics), tokenizer

  def score_example(self, example, prediction):
    eid = base.example_id(example)
    refs = base.as_str_list(
        base.get_field(example, "captions", eid, "list[str] of reference captions"),
        eid, "captions")
    return {"id": eid, "prediction": prediction, "captions": refs}

  def compute_metrics(self, records):
    refs = {i: r["captions"] for i, r in enumerate(records)}
    preds = {i: r["prediction"] for i, r in enumerate(records)}
    return caption_scores(refs, preds, metrics=self.metrics, tokenizer=self.tokenizer)

