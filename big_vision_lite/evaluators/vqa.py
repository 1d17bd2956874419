"""VQA metrics: exact match, official VQAv2 accuracy, ANLS (DocVQA), relaxed accuracy (ChartQA).

* exact_match: 1 when the stripped prediction equals any stripped ground-truth answer
  (case-sensitive unless `to_lower`).
* vqa_accuracy: the official VQA evaluation (github.com/GT-Vision-Lab/VQA, vqaEval.py,
  current version, which big_vision's vqav2 evaluator follows): tabs/newlines -> spaces,
  strip; only when the annotators disagree (more than one distinct answer) are the
  prediction and the answers normalised (punctuation, number words -> digits, articles
  dropped, contractions restored, lowercase). With 10 answers the accuracy is the mean
  over the 10 leave-one-out subsets of min(#matches among the other 9 / 3, 1); with
  another number of answers (OK-VQA style sets with duplicates removed, a single answer)
  it is min(#matches / 3, 1), as big_vision's generic VQA evaluator.
* anls: Average Normalized Levenshtein Similarity (Biten et al. 2019, eq. 1): per
  question the max over answers of 1 - NL if NL < 0.5 else 0, NL = edit distance /
  max(len); answers compared lowercased and stripped, as the DocVQA/ST-VQA evaluation.
* relaxed_accuracy: ChartQA (Masry et al. 2022, after Methani et al. 2020): when both
  answer and prediction parse as numbers ("12.5", "40%" -> 0.4) a relative error <= 5%
  counts as correct (a zero target needs an exact match); otherwise exact string match.
  Max over answers.

Each metric is also reported per "answer_type" when examples carry one
("vqa_accuracy/yes/no", ...), as the official VQAv2 summary does.
"""
import re
from collections.abc import Sequence

from big_vision_lite.evaluators import base

METRICS = ("exact_match", "vqa_accuracy", "anls", "relaxed_accuracy")

# Answer normalisation of the official VQA evaluation (vqaEval.py).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = frozenset(["a", "an", "the"])
_PUNCT = [";", "/", "[", "]", "\"", "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">",
          "<", "@", "`", ",", "?", "!"]
# Sic: "(?!<=\d)" is a (meaningless) lookahead in the official script, not a lookbehind;
# kept so that "2.5" keeps its point and "5." loses it exactly as officially scored.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
  out = text
  has_digit_comma = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:
    # Official quirk: a digit comma anywhere makes every punctuation mark vanish.
    if f"{p} " in text or f" {p}" in text or has_digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  words = [w for w in words if w not in _ARTICLES]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
  """The official VQA answer normalisation (punctuation, digits, articles, contractions)."""
  return _process_digit_article(_process_punctuation(_strip_space(text)))


def _strip_space(text: str) -> str:
  return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """Official VQA accuracy of one prediction against the annotators' answers."""
  if not answers:
    raise ValueError("vqa_accuracy: no ground-truth answers")
  pred = _strip_space(prediction)
  gts = [_strip_space(a) for a in answers]
  if len(set(gts)) > 1:  # The official script normalises only when annotators disagree.
    pred = normalize_vqa_answer(pred)
    gts = [normalize_vqa_answer(a) for a in gts]
  matches = [g == pred for g in gts]
  if len(gts) != 10:
    return min(1.0, sum(matches) / 3)
  total = sum(matches)
  return sum(min(1.0, (total - m) / 3) for m in matches) / len(matches)


def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions; unit costs)."""
  if len(a) < len(b):
    a, b = b, a
  prev = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    cur = [i]
    for j, cb in enumerate(b, 1):
      cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
  """ANLS of one prediction: max over answers of 1 - NL if NL < threshold else 0."""
  if not answers:
    raise ValueError("anls: no ground-truth answers")
  pred = " ".join(prediction.strip().lower().split())
  best = 0.0
  for a in answers:
    gt = " ".join(a.strip().lower().split())
    n = max(len(gt), len(pred))
    nl = levenshtein(gt, pred) / n if n else 0.0
    best = max(best, 1.0 - nl if nl < threshold else 0.0)
  return best


def _to_float(text: str) -> float | None:
  try:
    if text.endswith("%"):
      return float(text[:-1]) / 100.0
    return float(text)
  except ValueError:
    return None


def relaxed_match(prediction: str, target: str, max_relative_error: float = 0.05) -> bool:
  """ChartQA relaxed correctness of one prediction against one target."""
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:  # A zero target needs an exact (string) match.
    return abs(p - t) / abs(t) <= max_relative_error
  return prediction == target


def exact_match(prediction: str, answers: Sequence[str]) -> float:
  p = prediction.strip()
  return float(any(p == a.strip() for a in answers))


# ---------------------------------------------------------------------------------------
@base.register("vqa")
class VQAEvaluator(base.Evaluator):
  """Question answering evaluator.

  Examples need "id" and "answers" (list[str]; VQAv2 has 10) or a single "answer" str;
  "answer_type" (and "question_type") are optional. Records: {"id", "prediction",
  "answers", "answer_type"?, "question_type"?, <metric>: per-example score}. Metrics:
  the mean of each requested metric, "<metric>/<answer_type>" per answer type, and
  "num" (examples evaluated).
  """
  default_metrics: tuple[str, ...] = ("exact_match", "vqa_accuracy")

  def __init__(self, examples, *, metrics: Sequence[str] | None = None,
               to_lower: bool = False, anls_threshold: float = 0.5,
               relaxed_tolerance: float = 0.05, **kw):
    """Args:
      examples, batch_size, gather, sync: see base.Evaluator.
      metrics: subset of METRICS (default: the class's default_metrics).
      to_lower: lowercase prediction and answers first (exact_match, relaxed_accuracy;
        vqa_accuracy and anls normalise case themselves).
      anls_threshold: ANLS's tau (0.5 for DocVQA).
      relaxed_tolerance: relative error accepted by relaxed_accuracy (0.05 for ChartQA).
    """
    super().__init__(examples, **kw)
    metrics = self.default_metrics if metrics is None else metrics
    if isinstance(metrics, str):
      metrics = (metrics,)
    if not metrics or any(m not in METRICS for m in metrics):
      raise ValueError(f"{type(self).__name__}: metrics must be a non-empty subset of "
                       f"{list(METRICS)}, got {list(metrics)}")
    if not 0 < anls_threshold <= 1:
      raise ValueError(f"anls_threshold must be in (0, 1], got {anls_threshold}")
    if relaxed_tolerance < 0:
      raise ValueError(f"relaxed_tolerance must be >= 0, got {relaxed_tolerance}")
    self.metrics = tuple(metrics)
    self.to_lower = to_lower
    self.anls_threshold, self.relaxed_tolerance = anls_threshold, relaxed_tolerance

  def _answers(self, example, eid) -> list[str]:
    if "answers" in example:
      return base.as_str_list(example["answers"], eid, "answers")
    if "answer" in example:
      return [base.as_str(example["answer"], eid, "answer")]
    raise base.MalformedExampleError(
        eid, "answers", f"missing (expected list[str] 'answers' or str 'answer'; keys: "
        f"{sorted(example)})")

  def score_example(self, example, prediction):
    eid = base.example_id(example)
    answers = self._answers(example, eid)
    rec = {"id": eid, "prediction": prediction, "answers": answers}
    for key in ("answer_type", "question_type"):
      if key in example:
        rec[key] = base.as_str(example[key], eid, key)
    low = (lambda s: s.lower()) if self.to_lower else (lambda s: s)
    for m in self.metrics:
      if m == "exact_match":
        rec[m] = exact_match(low(prediction), [low(a) for a in answers])
      elif m == "vqa_accuracy":
        rec[m] = vqa_accuracy(prediction, answers)
      elif m == "anls":
        rec[m] = anls(prediction, answers, self.anls_threshold)
      else:
        rec[m] = float(max(relaxed_match(low(prediction.strip()), low(a.strip()),
                                         self.relaxed_tolerance) for a in answers))
    return rec

  def compute_metrics(self, records):
    out = {}
    for m in self.metrics:
      out[m] = sum(r[m] for r in records) / len(records)
      by_type: dict[str, list[float]] = {}
      for r in records:
        if "answer_type" in r:
          by_type.setdefault(r["answer_type"], []).append(r[m])
      for t, v in sorted(by_type.items()):
        out[f"{m}/{t}"] = sum(v) / len(v)
    out["num"] = len(records)
    return out


@base.register("vqav2")
class VQAv2Evaluator(VQAEvaluator):
  """VQAv2 / OK-VQA / TextVQA: the official VQA accuracy (and exact match)."""
  default_metrics = ("vqa_accuracy", "exact_match")


@base.register("docvqa")
class DocVQAEvaluator(VQAEvaluator):
  """DocVQA / InfographicVQA / ST-VQA: ANLS (and exact match)."""
  default_metrics = ("anls", "exact_match")


@base.register("chartqa")
class ChartQAEvaluator(VQAEvaluator):
  """ChartQA: relaxed accuracy (and exact match)."""
  default_metrics = ("relaxed_accuracy", "exact_match")
