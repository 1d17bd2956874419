r"""Instance masks -> PaliGemma segmentation targets (jsonl), as big_vision's refcoco_seg.

  python -m big_vision_lite.tools.seg_targets --vqvae vae-oid.npz \
      --coco instances.json --images IMAGES_DIR --out train.jsonl
  python -m big_vision_lite.tools.seg_targets --vqvae vae-oid.npz \
      --images IMAGES_DIR --masks MASKS_DIR [--labels labels.csv] --out train.jsonl

Each line: {"image": path relative to --images, "prefix": "segment <label>",
"suffix": "<loc>x4<seg>x16 <label> ; ..."}: one line per (image, label), its instances
in input order. Box = the mask's tight box (y1 x1 y2 x2, end-exclusive pixels) normalised
by the image size; codes = vqvae.encode of the mask cropped to that box and resized to
64x64 (bilinear, antialiased), which is what big_vision's `refcoco_mask2str` op does.

--masks mode: for IMAGES_DIR/a/b.jpg the mask is MASKS_DIR/a/b.png; its pixels > max/2
form one instance (--mask_mode binary), or every distinct nonzero value is an instance
(--mask_mode ids). The label is the CSV's (columns `image`, `label`; image = relative
path or file name) or else the image's folder name. Images without a mask are skipped.
COCO mode: polygons and RLE through pycocotools; crowd and empty annotations are skipped.
"""
import argparse
import collections
import csv
import json
import os
import pathlib
import sys
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import PIL.Image

from big_vision_lite import tokenizer
from big_vision_lite.models import vqvae

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_BATCH = 32  # Fixed encode batch (padded) so the jitted encoder compiles once.


class Instance(NamedTuple):
  image: str  # Relative path, "/"-separated.
  image_hw: tuple[int, int]
  label: str
  mask: np.ndarray  # bool[H,W].


class Stats(collections.Counter):
  """Counts of what was read and skipped (printed at the end)."""


def coco_instances(ann_path: str | os.PathLike, images_dir: str | os.PathLike | None,
                   stats: Stats) -> Iterator[Instance]:
  """Instances of a COCO instances json (polygons / RLE); crowd and empty ones skipped."""
  from pycocotools import mask as mask_utils  # Only this mode needs it.
  try:
    with open(ann_path) as f:
      coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    cats = {c["id"]: c["name"] for c in coco["categories"]}
    anns = coco["annotations"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{ann_path}: not a COCO instances json with images/categories/"
                     f"annotations ({e!r})") from e
  by_image = collections.defaultdict(list)
  for a in anns:
    if a.get("image_id") not in images or a.get("category_id") not in cats:
      raise ValueError(f"{ann_path}: annotation {a.get('id')} has unknown image_id "
                       f"{a.get('image_id')} or category_id {a.get('category_id')}")
    by_image[a["image_id"]].append(a)
  for image_id in sorted(by_image, key=lambda i: str(images[i]["file_name"])):
    im = images[image_id]
    h, w = int(im["height"]), int(im["width"])
    if images_dir is not None and not (pathlib.Path(images_dir) / im["file_name"]).is_file():
      raise FileNotFoundError(f"{ann_path}: image {im['file_name']!r} not found under {images_dir}")
    for a in by_image[image_id]:
      if a.get("iscrowd", 0):
        stats["skipped_crowd"] += 1
        continue
      segm = a.get("segmentation")
      if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w)) if segm else None
      elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, h, w)
      elif isinstance(segm, dict):
        rle = segm
      else:
        raise ValueError(f"{ann_path}: annotation {a.get('id')} has no polygon/RLE segmentation")
      mask = mask_utils.decode(rle).astype(bool) if rle is not None else np.zeros((h, w), bool)
      if mask.shape != (h, w):
        raise ValueError(f"{ann_path}: annotation {a.get('id')} mask is {mask.shape}, image "
                         f"{im['file_name']!r} is {(h, w)}")
      yield Instance(im["file_name"], (h, w), cats[a["category_id"]], mask)


def read_mask_png(path: str | os.PathLike, mode: str = "binary") -> np.ndarray:
  """int32[H,W] instance ids (0 = background) of a mask image.

  binary: pixels > max/2 are instance 1 (0/1 and 0/255 masks alike); ids: each distinct
  nonzero value (an RGB colour counts as one value) is an instance.
  """
  try:
    with PIL.Image.open(path) as im:
      a = np.asarray(im)
  except (OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable mask image ({e})") from e
  if a.ndim == 3:  # Drop alpha; RGB colours -> one integer each.
    a = a[..., :3].astype(np.int64)
    a = (a[..., 0] << 16) | (a[..., 1] << 8) | a[..., 2] if a.shape[-1] == 3 else a[..., 0]
  a = a.astype(np.int64)
  if mode == "binary":
    return (a > a.max() / 2).astype(np.int32) if a.max() > 0 else np.zeros(a.shape, np.int32)
  if mode == "ids":
    _, inv = np.unique(a, return_inverse=True)
    ids = inv.reshape(a.shape).astype(np.int32)
    return ids if (a == 0).any() else ids + 1  # Value 0 -> id 0 (background).
  raise ValueError(f"mask mode must be 'binary' or 'ids', got {mode!r}")


def _read_labels(path) -> dict[str, str]:
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise ValueError(f"{path}: cannot read labels CSV ({e})") from e
  if not rows or not {"image", "label"} <= set(rows[0]):
    raise ValueError(f"{path}: labels CSV needs a header with columns 'image' and 'label'")
  return {r["image"].strip(): r["label"].strip() for r in rows}


def folder_instances(images_dir: str | os.PathLike, masks_dir: str | os.PathLike,
                     labels_csv: str | None, mode: str, stats: Stats) -> Iterator[Instance]:
  """Instances of images + same-named mask PNGs (see the module docstring)."""
  images_dir, masks_dir = pathlib.Path(images_dir), pathlib.Path(masks_dir)
  if not images_dir.is_dir() or not masks_dir.is_dir():
    raise ValueError(f"--images {images_dir} and --masks {masks_dir} must be folders")
  labels = _read_labels(labels_csv) if labels_csv else None
  masks_abs = masks_dir.resolve()  # The mask folder may sit inside the image folder.
  files = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                 and masks_abs not in p.resolve().parents)
  if not files:
    raise ValueError(f"--images {images_dir}: no images ({', '.join(IMAGE_EXTS)})")
  for path in files:
    rel = path.relative_to(images_dir)
    mask_path = masks_dir / rel.with_suffix(".png")
    if not mask_path.is_file():
      stats["skipped_no_mask"] += 1
      continue
    if labels is not None:
      label = labels.get(rel.as_posix(), labels.get(rel.name))
      if label is None:
        raise ValueError(f"{labels_csv}: no label for image {rel.as_posix()!r}")
    elif len(rel.parts) > 1:
      label = rel.parts[-2]
    else:
      raise ValueError(f"{path}: no label (pass --labels, or put images in label-named folders)")
    with PIL.Image.open(path) as im:
      w, h = im.size
    ids = read_mask_png(mask_path, mode)
    if ids.shape != (h, w):
      raise ValueError(f"{mask_path}: mask is {ids.shape[1]}x{ids.shape[0]} (WxH), image "
                       f"{rel.as_posix()} is {w}x{h}")
    for i in np.unique(ids[ids > 0]):
      yield Instance(rel.as_posix(), (h, w), label, ids == i)


def targets(instances: Iterable[Instance], params: dict, stats: Stats | None = None,
            prefix: str = "segment {label}") -> list[dict]:
  """One {"image", "prefix", "suffix"} dict per (image, label), in input order."""
  stats = Stats() if stats is None else stats
  groups = {}  # (image, label) -> [[box, codes or None]] (dicts keep insertion order).
  sizes, pending = {}, []  # pending: (entry, crop) not encoded yet; crops are 16 KB each.

  def flush():
    codes = _encode_batch(params, [crop for _, crop in pending])
    for (entry, _), c in zip(pending, codes):
      entry[1] = c
    pending.clear()

  for inst in instances:
    if ";" in inst.label or not inst.label.strip():
      raise ValueError(f"{inst.image}: label {inst.label!r} must be non-empty without ';'")
    box = vqvae.tight_box(inst.mask)
    if box is None:
      stats["skipped_empty"] += 1
      continue
    entry = [box, None]
    groups.setdefault((inst.image, inst.label), []).append(entry)
    pending.append((entry, vqvae.crop_mask_to_box(inst.mask, box)))
    sizes[inst.image] = inst.image_hw
    stats["instances"] += 1
    if len(pending) == _BATCH:
      flush()
  if pending:
    flush()
  out = []
  for (image, label), entries in groups.items():
    suffix = tokenizer.objects_to_text([b for b, _ in entries], [label] * len(entries),
                                       seg_codes=[c for _, c in entries], image_size=sizes[image])
    out.append({"image": image, "prefix": prefix.format(label=label), "suffix": suffix})
  stats["lines"] += len(out)
  return out


def _encode_batch(params, crops: Sequence[np.ndarray]) -> np.ndarray:
  """int32[N,16] codes of N <= _BATCH crops, padded to _BATCH (one jit compile)."""
  chunk = np.stack(crops)
  pad = np.zeros((_BATCH - len(chunk),) + chunk.shape[1:], np.float32)
  return np.asarray(vqvae.encode(params, np.concatenate([chunk, pad])))[:len(crops)]


def main(argv: Sequence[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--vqvae", required=True, help="VQ-VAE .npz (official vae-oid.npz or ours)")
  ap.add_argument("--out", required=True, help="output .jsonl")
  ap.add_argument("--images", help="image folder (paths in the output are relative to it)")
  ap.add_argument("--coco", help="COCO instances json (polygons / RLE)")
  ap.add_argument("--masks", help="folder of mask PNGs named like the images")
  ap.add_argument("--labels", help="CSV with columns image,label (--masks mode)")
  ap.add_argument("--mask_mode", default="binary", choices=("binary", "ids"))
  ap.add_argument("--prefix", default="segment {label}", help="prefix template")
  args = ap.parse_args(argv)
  if bool(args.coco) == bool(args.masks):
    ap.error("pass exactly one of --coco or --masks")
  if args.masks and not args.images:
    ap.error("--masks needs --images")
  _, params = vqvae.load(args.vqvae)
  stats = Stats()
  if args.coco:
    insts = coco_instances(args.coco, args.images, stats)
  else:
    insts = folder_instances(args.images, args.masks, args.labels, args.mask_mode, stats)
  lines = targets(insts, params, stats, args.prefix)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    for line in lines:
      f.write(json.dumps(line) + "\n")
  os.replace(tmp, args.out)
  print(f"{args.out}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.items())), file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
