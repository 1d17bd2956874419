"""The embedded demo dataset: procedurally drawn shapes, four PaliGemma tasks, no download.

Record i of a split is a pure function of (split, i): 1-3 shapes of distinct kinds and distinct
colours (possibly overlapping, later ones on top) on a solid, gradient or noisy background.
The layout is sampled in [0, 1] coordinates, so image i shows the same scene at every size.
Raw record (what `DemoSource[i]` returns; see `demo_pp` for the task pp strings):
  image       uint8[S, S, 3]
  id, height, width
  objects     {"label": list[str] kind, "colour": list[str],
               "bbox": float32[N, 4] y1 x1 y2 x2 normalised (of the visible pixels),
               "bbox_pixels": float32[N, 4] the same in pixels,
               "mask": bool[N, S, S] visible pixels}      objects sorted left to right
  captions    list[str] all reference captions ("a red circle left of a blue square", ...)
  qa          {"question": list[str], "answer": list[str]} every question about the scene
  question, answers   the record's own VQA question and its accepted answers [answer]

The vocabulary is small on purpose (`demo_sentences()` trains the demo SentencePiece model,
`demo_tokenizer(workdir)` trains it once and caches it), so tiny models learn it quickly.
"""
import hashlib
import math
import os

import numpy as np
import PIL.Image
import PIL.ImageDraw

from big_vision_lite.data.sources import parse_split, slice_bounds

KINDS = ("circle", "square", "triangle", "star", "hexagon", "diamond")
COLOURS = {
    "red": (215, 38, 38), "green": (36, 160, 60), "blue": (40, 80, 215),
    "yellow": (240, 215, 40), "purple": (135, 55, 185), "orange": (245, 135, 25),
}
COLOUR_NAMES = tuple(COLOURS)
TASKS = ("caption", "vqa", "detect", "segment")
# The demo's mask VQ-VAE, trained on these shapes by `python -m big_vision_lite.tools.demo_vqvae`.
DEMO_VQVAE = os.path.join(os.path.dirname(__file__), "assets", "demo_vqvae.npz")
# The demo's pretrained image encoder (ViT + projector of configs/demo.py at 64px, patch 16),
# made by `python -m big_vision_lite.tools.demo_encoder`.
DEMO_ENCODER = os.path.join(os.path.dirname(__file__), "assets", "demo_encoder.npz")
_SPLIT_SALT = {"train": 0x7EA1, "val": 0x5A1D}
_RADIUS = (0.10, 0.22)  # Shape radius as a fraction of the image size.


def _unit_polygon(kind: str) -> np.ndarray | None:
  """float64[K, 2] (x, y) vertices on the unit circle (y down); None for the circle."""
  if kind == "square":
    a = np.deg2rad([45, 135, 225, 315])
  elif kind == "diamond":
    a = np.deg2rad([0, 90, 180, 270])
  elif kind == "triangle":
    a = np.deg2rad([-90, 30, 150])
  elif kind == "hexagon":
    a = np.deg2rad(np.arange(6) * 60.0)
  elif kind == "star":
    a = np.deg2rad(-90 + np.arange(10) * 36.0)
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)
  else:
    return None
  return np.stack([np.cos(a), np.sin(a)], axis=1)


_POLYGONS = {k: _unit_polygon(k) for k in KINDS}


def sample_layout(rng: np.random.Generator) -> dict:
  """The scene in [0, 1] units: background parameters and shapes sorted left to right."""
  n = int(rng.integers(1, 4))
  kinds = rng.choice(len(KINDS), n, replace=False)
  colours = rng.choice(len(COLOUR_NAMES), n, replace=False)
  shapes = []
  for k, c in zip(kinds, colours):
    for _ in range(50):  # Rejection: overlaps are allowed, hiding a shape is not.
      r = rng.uniform(*_RADIUS)
      cx, cy = rng.uniform(r, 1 - r, size=2)
      if all(math.hypot(cx - s["cx"], cy - s["cy"]) >= 0.75 * (r + s["r"]) for s in shapes):
        break
    shapes.append(dict(kind=KINDS[k], colour=COLOUR_NAMES[c], cx=cx, cy=cy, r=r))
  background = dict(
      style=int(rng.integers(3)),  # 0 solid, 1 gradient, 2 noise.
      c1=np.clip(rng.uniform(70, 190) + rng.normal(0, 14, 3), 0, 255),
      c2=np.clip(rng.uniform(70, 190) + rng.normal(0, 14, 3), 0, 255),
      angle=rng.uniform(0, 2 * np.pi), noise=rng.uniform(6, 18),
      noise_seed=int(rng.integers(2**31)))
  draw_order = [dict(s) for s in shapes]  # Drawn in sampling order (later on top) ...
  shapes = sorted(shapes, key=lambda s: s["cx"])  # ... but described left to right.
  return dict(shapes=shapes, draw_order=draw_order, background=background)


def _relation(a: dict, b: dict) -> str:
  """Where a is relative to b, from the centres (y grows downwards)."""
  dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
  if abs(dx) >= abs(dy):
    return "left of" if dx > 0 else "right of"
  return "above" if dy > 0 else "below"


def _a(name: str) -> str:
  return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def captions_of(shapes: list[dict]) -> list[str]:
  """Reference captions; the first is the canonical one."""
  n = [_a(f"{s['colour']} {s['kind']}") for s in shapes]
  bare = [f"{s['colour']} {s['kind']}" for s in shapes]
  if len(shapes) == 1:
    return [n[0], f"one {bare[0]}", f"a single {bare[0]}"]
  if len(shapes) == 2:
    a, b = shapes
    return [f"{n[0]} {_relation(a, b)} {n[1]}",
            f"{n[1]} {_relation(b, a)} {n[0]}",
            f"{n[0]} and {n[1]}",
            f"two shapes: {n[0]} and {n[1]}"]
  a, b, c = shapes
  return [f"{n[0]} {_relation(a, b)} {n[1]} and {n[2]}",
          f"{n[0]}, {n[1]} and {n[2]}",
          f"three shapes: {n[0]}, {n[1]} and {n[2]}",
          f"{n[2]} {_relation(c, b)} {n[1]} and {n[0]}"]


def qa_of(shapes: list[dict], rng: np.random.Generator) -> list[tuple[str, str]]:
  present = [s["kind"] for s in shapes]
  absent = [k for k in KINDS if k not in present]
  qa = [(f"what colour is the {s['kind']}?", s["colour"]) for s in shapes]
  qa += [(f"which shape is {s['colour']}?", s["kind"]) for s in shapes]
  qa.append(("how many shapes are there?", str(len(shapes))))
  qa.append((f"is there a {present[int(rng.integers(len(present)))]}?", "yes"))
  qa.append((f"is there a {absent[int(rng.integers(len(absent)))]}?", "no"))
  return qa


def _background(bg: dict, size: int) -> np.ndarray:
  c1 = bg["c1"].astype(np.float32)
  if bg["style"] == 1:  # Linear gradient c1 -> c2 along `angle`: a sum of a row and a column.
    t = np.linspace(-1, 1, size, dtype=np.float32)
    d = (bg["c2"].astype(np.float32) - c1) / 3.0
    rows = (np.float32(np.sin(bg["angle"])) * t)[:, None] * d
    cols = (np.float32(np.cos(bg["angle"])) * t)[:, None] * d
    img = ((c1 + 1.5 * d) + rows[:, None, :] + cols[None, :, :]).astype(np.uint8)
  else:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = c1.astype(np.uint8)
  if bg["style"] == 2:
    amp = int(bg["noise"])
    noise = np.random.default_rng(bg["noise_seed"]).integers(-amp, amp + 1, (size, size, 1),
                                                             dtype=np.int16)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
  return img


def render(layout: dict, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[S, S, 3] image, bool[N, S, S] visible masks in layout["shapes"] order)."""
  ids = PIL.Image.new("L", (size, size), 0)
  draw = PIL.ImageDraw.Draw(ids)
  order = {(s["kind"]): i for i, s in enumerate(layout["shapes"])}
  for s in layout["draw_order"]:
    value = order[s["kind"]] + 1
    cx, cy, r = s["cx"] * size, s["cy"] * size, s["r"] * size
    poly = _POLYGONS[s["kind"]]
    if poly is None:
      draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=value)
    else:
      draw.polygon([(cx + x * r, cy + y * r) for x, y in poly], fill=value)
  ids = np.asarray(ids)
  img = _background(layout["background"], size)
  lut = np.zeros((len(layout["shapes"]) + 1, 3), np.uint8)
  for i, s in enumerate(layout["shapes"]):
    lut[i + 1] = COLOURS[s["colour"]]
  fg = ids > 0
  img[fg] = lut[ids[fg]]
  masks = ids[None] == np.arange(1, len(layout["shapes"]) + 1, dtype=np.uint8)[:, None, None]
  return img, masks


def _boxes(masks: np.ndarray) -> np.ndarray:
  """float32[N, 4] y1 x1 y2 x2 pixel boxes (exclusive ends) of the masks."""
  boxes = np.zeros((len(masks), 4), np.float32)
  for i, m in enumerate(masks):
    rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
    if not len(rows):
      raise AssertionError("demo: a shape is completely hidden (layout rejection failed)")
    boxes[i] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
  return boxes


def scene_rng(split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([_SPLIT_SALT[split], int(index)])


def scene_text(split: str, index: int) -> tuple[dict, list[str], list[tuple[str, str]], int]:
  """(layout, captions, qa pairs, index of the record's own question): no pixels drawn."""
  rng = scene_rng(split, index)
  layout = sample_layout(rng)
  qa = qa_of(layout["shapes"], rng)
  return layout, captions_of(layout["shapes"]), qa, int(rng.integers(len(qa)))


class DemoSource:
  """The demo split as a random-access source (see the module docstring for the fields)."""

  def __init__(self, split: str = "train", *, image_size: int = 224, train_size: int = 100_000,
               val_size: int = 512):
    name, start, stop = parse_split(split, "demo source")
    if name not in _SPLIT_SALT:
      raise ValueError(f"demo source: split must be 'train' or 'val' (optionally sliced, "
                       f"'val[:64]'), got {split!r}")
    if not isinstance(image_size, int) or image_size < 16:
      raise ValueError(f"demo source: image_size must be an int >= 16, got {image_size!r}")
    self.split, self.image_size = name, image_size
    total = train_size if name == "train" else val_size
    self._lo, self._hi = slice_bounds(total, start, stop, "demo source")

  def __len__(self) -> int:
    return self._hi - self._lo

  def where(self, i: int) -> str:
    return f"demo:{self.split}[{self._lo + int(i)}]"

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < len(self):
      raise IndexError(f"demo {self.split}: index {i} out of range [0, {len(self)})")
    index = self._lo + int(i)
    layout, captions, qa, own = scene_text(self.split, index)
    s = self.image_size
    image, masks = render(layout, s)
    boxes = _boxes(masks)
    shapes = layout["shapes"]
    return {
        "image": image, "id": index, "height": s, "width": s,
        "objects": {
            "label": [sh["kind"] for sh in shapes],
            "colour": [sh["colour"] for sh in shapes],
            "bbox": boxes / np.float32(s), "bbox_pixels": boxes, "mask": masks,
        },
        "captions": captions,
        "qa": {"question": [q for q, _ in qa], "answer": [a for _, a in qa]},
        "question": qa[own][0], "answers": [qa[own][1]],
    }


# ---------------------------------------------------------------------------------------------
# Text: tokenizer training data, pp strings for the four tasks.
# ---------------------------------------------------------------------------------------------
def demo_sentences(num_scenes: int = 2000) -> list[str]:
  """Every prompt and target text of the demo (tokenizer training data), deterministic."""
  out = ["caption en", "\n"]
  for i in range(num_scenes):
    layout, captions, qa, _ = scene_text("train", i)
    labels = [s["kind"] for s in layout["shapes"]]
    out += captions
    out += [f"answer en {q}" for q, _ in qa] + [a for _, a in qa]
    out.append("detect " + " ; ".join(labels))
    out += [f"segment {k}" for k in labels]
  for c in COLOUR_NAMES:  # Every word at least once, whatever num_scenes is.
    for k in KINDS:
      out += [_a(f"{c} {k}"), f"what colour is the {k}?", f"which shape is {c}?",
              f"is there a {k}?", f"segment {k}", f"{k} ; {k}"]
  return out


def demo_tokenizer(workdir: str, vocab_size: int = 512):
  """The demo SentencePiece model (+ <loc>/<seg>), trained once, cached in workdir.

  The file name carries a hash of the training text and settings, so a changed vocabulary
  never reuses a stale model.
  """
  from big_vision_lite import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  sentences = demo_sentences()
  digest = hashlib.sha256(("\x00".join(sentences) + f"|{vocab_size}").encode()).hexdigest()[:10]
  path = os.path.join(workdir, f"demo_tokenizer_{digest}.model")
  if not os.path.isfile(path):
    tmp = f"{path}.tmp{os.getpid()}"
    tok_lib.train_sentencepiece(sentences, tmp, vocab_size=vocab_size)
    os.replace(tmp, path)  # Atomic: concurrent processes never read half a file.
  return tok_lib.Tokenizer(path)


_OBJ_KEYS = '["objects/label", "objects/colour", "objects/bbox", "objects/bbox_pixels", ' \
            '"objects/mask"]'


def demo_pp(task: str, *, image_size: int, text_len: int, train: bool = True) -> str:
  """The pp string of one demo task (train: text/mask arrays; eval: prompt + ground truth).

  Eval examples carry what the evaluators need: caption -> captions; vqa -> answers, question;
  detect -> objects, height, width; segment -> masks bool[1,S,S], objects (the one object).
  """
  from big_vision_lite.data import pp_text  # pylint: disable=g-import-not-at-top
  if task not in TASKS:
    raise ValueError(f"demo task must be one of {TASKS}, got {task!r}")
  image = f"resize({image_size})|value_range(-1, 1)"
  if task == "caption":
    text = ['choice(inkey="captions", outkey="suffix")' if train else "",
            'strfmt("caption en", outkey="prefix")']
    keep = ("captions", "id")
  elif task == "vqa":
    text = (['choice(inkey=["qa/question", "qa/answer"], outkey=["question", "suffix"])']
            if train else [])
    text.append('strfmt("answer en {question}", outkey="prefix")')
    keep = ("answers", "question", "id")
  elif task == "detect":
    text = ["detection_target()"]
    keep = ("objects", "height", "width", "id")
  else:
    text = [f"choice(n=1, key={_OBJ_KEYS})"]
    # Eval needs only the prompt: detection_target writes the same "segment <label>" prefix
    # without running the mask encoder.
    text.append("segmentation_target()" if train else
                'detection_target(prompt="segment")|copy("objects/mask", "masks")')
    keep = ("masks", "objects", "height", "width", "id")
  parts = [image, *filter(None, text)]
  if train:
    return "|".join(parts + [pp_text.combine_and_keep_train(text_len)])
  return "|".join(parts + ["keep(" + ", ".join(f'"{k}"' for k in ("image", "prefix") + keep)
                           + ")"])


def demo_mixture(*, image_size: int, text_len: int, weights=None, split: str = "train",
                 train_size: int = 100_000) -> dict:
  """input.data + per-task entries for a demo task mixture (merge into config.input).

  weights: {task: weight}, default all four tasks equally. Returns e.g.
  {"data": {"demo_caption": 1.0, ...}, "demo_caption": {"data": {...}, "pp": "..."}, ...}.
  """
  weights = dict(weights or {t: 1.0 for t in TASKS})
  unknown = set(weights) - set(TASKS)
  if unknown:
    raise ValueError(f"demo_mixture: unknown tasks {sorted(unknown)}; known {TASKS}")
  out = {"data": {f"demo_{t}": float(w) for t, w in weights.items()}}
  for t in weights:
    out[f"demo_{t}"] = {
        "data": {"name": "demo", "split": split, "image_size": image_size,
                 "train_size": train_size},
        "pp": demo_pp(t, image_size=image_size, text_len=text_len, train=True),
    }
  return out
