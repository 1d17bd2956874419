"""Validation predictions drawn as images (TensorBoard, predictions/<step>/*.png, predict.py).

    canvas = draw_prediction(image, "<loc0256><loc0256><loc0768><loc0768> cat",
                             prompt="detect cat", target="...")

The image is upscaled (nearest, by an integer factor) so that small training resolutions
stay readable; predicted boxes are drawn with their labels, masks as translucent overlays in
the box's colour, and the prompt / prediction / target text is wrapped in a band below.
"""
from collections.abc import Sequence
import math
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from big_vision_lite.tokenizer import DetectedObject, parse_objects

# Tableau 10: distinct on photos; object i gets PALETTE[i % 10] for its box and mask.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
BACKGROUND = (255, 255, 255)  # The text band and render_batch's padding.
TEXT_COLOR = (0, 0, 0)
MASK_ALPHA = 0.5
_MARGIN = 4


def _font(size: int) -> PIL.ImageFont.ImageFont:
  try:
    return PIL.ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType.
  except TypeError:
    return PIL.ImageFont.load_default()


def to_uint8(image: Any, where: str = "image") -> np.ndarray:
  """float[H,W,3] in [-1, 1] or uint8[H,W,3] (also [H,W] / [H,W,1] gray) -> uint8[H,W,3]."""
  x = np.asarray(image)
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3) or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{where}: expected [H,W,3] (or gray [H,W]), got shape {list(x.shape)}")
  if x.dtype == np.uint8:
    out = x
  elif np.issubdtype(x.dtype, np.floating):
    # The model's value range; anything outside (a bad value_range op upstream) is clipped.
    out = np.clip(np.round((x.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  else:
    raise ValueError(f"{where}: expected float in [-1, 1] or uint8, got {x.dtype}")
  return np.repeat(out, 3, axis=-1) if out.shape[-1] == 1 else out


def _wrap(text: str, font, width: int, max_lines: int) -> list[str]:
  """Greedy word wrap to `width` pixels; a word wider than a line (e.g. a run of <loc>
  tokens) continues the current line and is split where the line is full."""
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}" if line else word
    if font.getlength(candidate) <= width:
      line = candidate
      continue
    if font.getlength(word) <= width:
      lines.append(line)
      line = word
      continue
    line = f"{line} " if line else ""
    for ch in word:
      if line.strip() and font.getlength(line + ch) > width:
        lines.append(line.rstrip())
        line = ""
      line += ch
  if line:
    lines.append(line)
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    last = lines[-1]
    while last and font.getlength(last + " ...") > width:
      last = last[:-1]
    lines[-1] = last + " ..."
  return lines or [""]


def _text_color_on(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
  luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
  return (0, 0, 0) if luma > 150 else (255, 255, 255)


def _check_masks(masks, hw, where):
  out = []
  for i, m in enumerate(masks):
    if m is None:
      out.append(None)
      continue
    m = np.asarray(m)
    if m.ndim == 3 and m.shape[-1] == 1:
      m = m[..., 0]
    if m.shape != hw:
      raise ValueError(f"{where}: masks[{i}] must be bool[{hw[0]},{hw[1]}] (the image's size), "
                       f"got shape {list(m.shape)}")
    out.append(m.astype(bool))
  return out


def draw_prediction(image: Any, text: str, *, prompt: str = "",
                    objects: Sequence[DetectedObject] | None = None,
                    masks: Sequence[Any] | None = None, target: str | None = None,
                    min_size: int = 256, font_size: int = 13,
                    max_text_lines: int = 8) -> np.ndarray:
  """Draws one prediction.

  Args:
    image: float32[H,W,3] in [-1, 1] (the model input) or uint8[H,W,3].
    text: the decoded prediction.
    prompt: the prefix the model saw.
    objects: boxes to draw (object i in PALETTE[i]; those without a box are skipped, invalid
      ones get a "?" after the label). None: parsed from `text` when it has <loc> tokens.
    masks: bool[H,W] per object (same order; None entries for objects without one), e.g.
      from vqvae.mask_in_box(..., image_hw=(H, W)); drawn translucent in the object's colour.
    target: the reference text, if any.
    min_size: the longer image side is upscaled (nearest, integer factor) to at least this.
    font_size: pixels, of PIL's default font.
    max_text_lines: per text field; longer text ends in "...".
  Returns:
    uint8[H', W', 3]: the upscaled image (width max(W*k, min_size)) above the text band.
  """
  img = to_uint8(image, "draw_prediction: image")
  h, w = img.shape[:2]
  if not isinstance(text, str):
    raise TypeError(f"draw_prediction: text must be a str, got {type(text).__name__}")
  if objects is None:
    objects = parse_objects(text) if "<loc" in text else []
  masks = _check_masks(masks or [], (h, w), "draw_prediction")

  k = max(1, math.ceil(min_size / max(h, w)))
  big = np.repeat(np.repeat(img, k, axis=0), k, axis=1).astype(np.float32)
  for i, m in enumerate(masks):
    if m is not None:
      m = np.repeat(np.repeat(m, k, axis=0), k, axis=1)
      color = np.asarray(PALETTE[i % len(PALETTE)], np.float32)
      big[m] = (1 - MASK_ALPHA) * big[m] + MASK_ALPHA * color
  pil = PIL.Image.fromarray(np.round(big).astype(np.uint8))
  draw = PIL.ImageDraw.Draw(pil)
  font = _font(font_size)
  hh, ww = h * k, w * k
  line_w = max(2, round(min(hh, ww) / 128))
  for i, obj in enumerate(objects):
    if obj.box is None:
      continue
    color = PALETTE[i % len(PALETTE)]
    y1, x1, y2, x2 = obj.box_pixels(hh, ww)
    x1, x2 = sorted((min(max(x1, 0), ww - 1), min(max(x2, 0), ww - 1)))
    y1, y2 = sorted((min(max(y1, 0), hh - 1), min(max(y2, 0), hh - 1)))
    draw.rectangle([x1, y1, x2, y2], outline=color, width=line_w)
    label = (obj.label or "") + ("" if obj.valid else "?")
    if label:
      l, t, r, b = draw.textbbox((0, 0), label, font=font)
      lw, lh = r - l + 4, b - t + 4
      ly = y1 - lh if y1 - lh >= 0 else y1  # Above the box, or inside at the image's top.
      lx = max(0, min(x1, ww - lw))  # Shifted left rather than cut off at the right edge.
      draw.rectangle([lx, ly, lx + lw, ly + lh], fill=color)
      draw.text((lx + 2 - l, ly + 2 - t), label, fill=_text_color_on(color), font=font)

  # The text band, as wide as the (at least min_size) canvas.
  canvas_w = max(ww, min_size)
  fields = [("prompt", prompt), ("pred", text)] + ([("target", target)] if target is not None
                                                   else [])
  ascent, descent = font.getmetrics()
  line_h = ascent + descent + 2
  lines = [line for name, value in fields
           for line in _wrap(f"{name}: {value}", font, canvas_w - 2 * _MARGIN, max_text_lines)]
  band_h = len(lines) * line_h + 2 * _MARGIN
  canvas = PIL.Image.new("RGB", (canvas_w, hh + band_h), BACKGROUND)
  canvas.paste(pil, (0, 0))
  cdraw = PIL.ImageDraw.Draw(canvas)
  for j, line in enumerate(lines):
    cdraw.text((_MARGIN, hh + _MARGIN + j * line_h), line, fill=TEXT_COLOR, font=font)
  return np.asarray(canvas)


def render_batch(images: Any, texts: Sequence[str], *, prompts: Sequence[str] | None = None,
                 objects: Sequence[Sequence[DetectedObject] | None] | None = None,
                 masks: Sequence[Sequence[Any] | None] | None = None,
                 targets: Sequence[str | None] | None = None, **kwargs: Any) -> np.ndarray:
  """`draw_prediction` for each example, padded (bottom/right, BACKGROUND) to one size.

  Args:
    images: float32[N,H,W,3] in [-1, 1] or uint8, or a list of differently sized images.
    texts, prompts, objects, masks, targets: one entry per example (None: none for all).
    **kwargs: passed to draw_prediction (min_size, font_size, max_text_lines).
  Returns:
    uint8[N, H', W', 3] for MetricsLogger.log_images.
  """
  n = len(texts)
  per_example = {"prompts": prompts, "objects": objects, "masks": masks, "targets": targets,
                 "images": images}
  for name, value in per_example.items():
    if value is not None and len(value) != n:
      raise ValueError(f"render_batch: {len(value)} {name} for {n} texts")
  pick = lambda seq, i, default=None: default if seq is None else seq[i]
  drawn = [draw_prediction(images[i], texts[i], prompt=pick(prompts, i, ""),
                           objects=pick(objects, i), masks=pick(masks, i),
                           target=pick(targets, i), **kwargs) for i in range(n)]
  if not drawn:
    return np.zeros((0, 1, 1, 3), np.uint8)
  out_h, out_w = max(d.shape[0] for d in drawn), max(d.shape[1] for d in drawn)
  out = np.empty((n, out_h, out_w, 3), np.uint8)
  out[...] = BACKGROUND
  for i, d in enumerate(drawn):
    out[i, :d.shape[0], :d.shape[1]] = d
  return out
