"""tools/seg_targets.py: COCO json and image/mask folders -> segmentation jsonl targets."""
import json
import re

import numpy as np
import PIL.Image
from pycocotools import mask as mask_utils
import pytest

from big_vision_lite.models import vqvae
from big_vision_lite.tools import seg_targets

# pycocotools' RLE decode trips a numpy 2 copy-keyword DeprecationWarning (not ours).
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:pycocotools")


@pytest.fixture(scope="module")
def vq(fixtures_dir):
  path = fixtures_dir / "bv_vqvae" / "params.npz"
  return path, vqvae.load(path)[1]


def _parse(suffix):
  """[(loc bins [4], seg codes [16], label)] of a suffix."""
  out = []
  for obj in suffix.split(" ; "):
    m = re.fullmatch(r"((?:<loc\d{4}>){4})((?:<seg\d{3}>){16}) (.+)", obj)
    assert m, obj
    out.append(([int(v) for v in re.findall(r"\d+", m[1])],
                [int(v) for v in re.findall(r"\d+", m[2])], m[3]))
  return out


def _expect(params, mask, box):
  codes = vqvae.encode(params, vqvae.crop_mask_to_box(mask, box)[None])
  return np.asarray(codes)[0].tolist()


def _write_image(path, h, w):
  path.parent.mkdir(parents=True, exist_ok=True)
  PIL.Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_coco(tmp_path, vq):
  vq_path, params = vq
  images = tmp_path / "images"
  _write_image(images / "a.jpg", 40, 60)
  _write_image(images / "sub" / "b.png", 50, 30)
  # Image a: a dog disc as RLE (exact pixels), two cats as a polygon and an uncompressed RLE.
  yy, xx = np.mgrid[:40, :60]
  dog = (yy - 20) ** 2 + (xx - 41) ** 2 <= 81  # Disc r=9: rows 11..29, cols 32..50.
  cat2 = np.zeros((40, 60), bool)
  cat2[3:9, 2:30] = True
  rle_dog = mask_utils.encode(np.asfortranarray(dog.astype(np.uint8)))
  rle_dog["counts"] = rle_dog["counts"].decode()
  poly = [[10.0, 12.0, 25.0, 12.0, 25.0, 35.0, 10.0, 35.0]]  # x, y pairs.
  cat1 = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly, 40, 60))).astype(bool)
  counts, run, prev = [], 0, False  # Uncompressed RLE: column-major run lengths from 0s.
  for v in cat2.T.reshape(-1):
    if v != prev:
      counts.append(run)
      run, prev = 0, v
    run += 1
  counts.append(run)
  # Image b: one cat rectangle, one crowd annotation (skipped), one empty polygon (skipped).
  cat3 = np.zeros((50, 30), bool)
  cat3[5:45, 10:21] = True
  rle3 = mask_utils.encode(np.asfortranarray(cat3.astype(np.uint8)))
  rle3["counts"] = rle3["counts"].decode()
  coco = {
      "images": [{"id": 7, "file_name": "sub/b.png", "height": 50, "width": 30},
                 {"id": 3, "file_name": "a.jpg", "height": 40, "width": 60}],
      "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
      "annotations": [
          {"id": 1, "image_id": 3, "category_id": 1, "segmentation": poly, "iscrowd": 0},
          {"id": 2, "image_id": 3, "category_id": 2, "segmentation": rle_dog, "iscrowd": 0},
          {"id": 3, "image_id": 3, "category_id": 1, "iscrowd": 0,
           "segmentation": {"size": [40, 60], "counts": counts}},
          {"id": 4, "image_id": 7, "category_id": 1, "segmentation": rle3, "iscrowd": 0},
          {"id": 5, "image_id": 7, "category_id": 2, "segmentation": rle3, "iscrowd": 1},
          {"id": 6, "image_id": 7, "category_id": 2, "segmentation": [], "iscrowd": 0},
      ]}
  (tmp_path / "ann.json").write_text(json.dumps(coco))
  out = tmp_path / "out.jsonl"
  assert seg_targets.main(["--vqvae", str(vq_path), "--coco", str(tmp_path / "ann.json"),
                           "--images", str(images), "--out", str(out)]) == 0
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(l["image"], l["prefix"]) for l in lines] == [
      ("a.jpg", "segment cat"), ("a.jpg", "segment dog"), ("sub/b.png", "segment cat")]
  cats_a, dog_a, cat_b = (_parse(l["suffix"]) for l in lines)
  # Tight pixel boxes, normalised by the image size, round(v * 1023).
  box1 = vqvae.tight_box(cat1)
  assert box1[0] in (11, 12) and box1[1] in (9, 10)  # Sanity of the polygon raster.
  want1 = [round(box1[0] / 40 * 1023), round(box1[1] / 60 * 1023),
           round(box1[2] / 40 * 1023), round(box1[3] / 60 * 1023)]
  assert cats_a[0][0] == want1 and cats_a[0][2] == "cat"
  assert cats_a[1][0] == [round(3 / 40 * 1023), round(2 / 60 * 1023), round(9 / 40 * 1023),
                          round(30 / 60 * 1023)]
  assert dog_a[0][0] == [round(11 / 40 * 1023), round(32 / 60 * 1023), round(30 / 40 * 1023),
                         round(51 / 60 * 1023)]
  assert cat_b == [([round(5 / 50 * 1023), round(10 / 30 * 1023), round(45 / 50 * 1023),
                     round(21 / 30 * 1023)], _expect(params, cat3, (5, 10, 45, 21)), "cat")]
  assert cats_a[0][1] == _expect(params, cat1, box1)
  assert cats_a[1][1] == _expect(params, cat2, (3, 2, 9, 30))
  assert dog_a[0][1] == _expect(params, dog, (11, 32, 30, 51))


def test_folder_with_label_folders_and_csv(tmp_path, vq):
  vq_path, params = vq
  images, masks = tmp_path / "images", tmp_path / "masks"
  _write_image(images / "cat" / "x.jpg", 32, 48)
  _write_image(images / "dog" / "y.jpg", 20, 20)
  _write_image(images / "dog" / "nomask.jpg", 20, 20)  # No mask file: skipped.
  m = np.zeros((32, 48), np.uint8)
  m[4:20, 6:30] = 255
  m[25:30, 40:46] = 255  # Binary mode: both blobs are one instance.
  (masks / "cat").mkdir(parents=True)
  PIL.Image.fromarray(m).save(masks / "cat" / "x.png")
  ids = np.zeros((20, 20), np.uint8)
  ids[2:8, 2:8], ids[10:19, 5:15] = 1, 2  # ids mode: two instances.
  (masks / "dog").mkdir()
  PIL.Image.fromarray(ids).save(masks / "dog" / "y.png")
  out = tmp_path / "out.jsonl"
  seg_targets.main(["--vqvae", str(vq_path), "--images", str(images), "--masks", str(masks),
                    "--mask_mode", "ids", "--out", str(out)])
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(l["image"], l["prefix"]) for l in lines] == [("cat/x.jpg", "segment cat"),
                                                        ("dog/y.jpg", "segment dog")]
  (cat,), dogs = _parse(lines[0]["suffix"]), _parse(lines[1]["suffix"])
  # ids mode on a 0/255 mask: one instance (value 255) spanning both blobs.
  assert cat[0] == [round(4 / 32 * 1023), round(6 / 48 * 1023), round(30 / 32 * 1023),
                    round(46 / 48 * 1023)]
  assert cat[1] == _expect(params, m > 0, (4, 6, 30, 46))
  assert [d[0] for d in dogs] == [[round(v / 20 * 1023) for v in (2, 2, 8, 8)],
                                  [round(v / 20 * 1023) for v in (10, 5, 19, 15)]]
  assert dogs[1][1] == _expect(params, ids == 2, (10, 5, 19, 15))
  # Binary mode + labels from a CSV (by file name or relative path).
  (tmp_path / "labels.csv").write_text("image,label\nx.jpg,tabby cat\ndog/y.jpg,puppy\n")
  seg_targets.main(["--vqvae", str(vq_path), "--images", str(images), "--masks", str(masks),
                    "--labels", str(tmp_path / "labels.csv"), "--out", str(out)])
  lines = [json.loads(l) for l in out.read_text().splitlines()]
  assert [l["prefix"] for l in lines] == ["segment tabby cat", "segment puppy"]
  (dog,) = _parse(lines[1]["suffix"])  # Binary: values > max / 2, i.e. id 2 only.
  assert dog[0] == [round(v / 20 * 1023) for v in (10, 5, 19, 15)] and dog[2] == "puppy"
  assert dog[1] == _expect(params, ids == 2, (10, 5, 19, 15))


def test_masks_inside_images_folder(tmp_path, vq):
  vq_path, params = vq
  images = tmp_path / "data"
  _write_image(images / "cat" / "a.png", 16, 16)
  m = np.zeros((16, 16), np.uint8)
  m[2:9, 3:7] = 1  # A 0/1 mask.
  (images / "masks" / "cat").mkdir(parents=True)
  PIL.Image.fromarray(m).save(images / "masks" / "cat" / "a.png")
  out = tmp_path / "o.jsonl"
  seg_targets.main(["--vqvae", str(vq_path), "--images", str(images),
                    "--masks", str(images / "masks"), "--out", str(out)])
  (line,) = [json.loads(l) for l in out.read_text().splitlines()]
  (obj,) = _parse(line["suffix"])
  assert line["image"] == "cat/a.png"
  assert obj[0] == [round(v / 16 * 1023) for v in (2, 3, 9, 7)]
  assert obj[1] == _expect(params, m > 0, (2, 3, 9, 7))


def test_read_mask_png(tmp_path):
  a = np.array([[0, 1, 1], [0, 0, 1]], np.uint8)
  PIL.Image.fromarray(a).save(tmp_path / "01.png")
  np.testing.assert_array_equal(seg_targets.read_mask_png(tmp_path / "01.png"), a)
  rgb = np.zeros((2, 3, 3), np.uint8)
  rgb[0, 0] = (255, 0, 0)
  rgb[1, 2] = (0, 255, 0)
  rgb[0, 2] = (255, 0, 0)
  PIL.Image.fromarray(rgb).save(tmp_path / "rgb.png")
  np.testing.assert_array_equal(seg_targets.read_mask_png(tmp_path / "rgb.png", "ids"),
                                [[2, 0, 2], [0, 0, 1]])


def test_errors(tmp_path, vq):
  vq_path, _ = vq
  images, masks = tmp_path / "images", tmp_path / "masks"
  _write_image(images / "top.jpg", 10, 10)
  masks.mkdir()
  PIL.Image.fromarray(np.full((10, 12), 255, np.uint8)).save(masks / "top.png")
  args = ["--vqvae", str(vq_path), "--images", str(images), "--masks", str(masks),
          "--out", str(tmp_path / "o.jsonl")]
  with pytest.raises(ValueError, match="no label"):
    seg_targets.main(args)
  (tmp_path / "l.csv").write_text("image,label\ntop.jpg,thing\n")
  with pytest.raises(ValueError, match=r"masks/top.png: mask is 12x10"):
    seg_targets.main(args + ["--labels", str(tmp_path / "l.csv")])
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a COCO instances json"):
    seg_targets.main(["--vqvae", str(vq_path), "--coco", str(tmp_path / "bad.json"),
                      "--out", str(tmp_path / "o.jsonl")])
  (tmp_path / "bad2.json").write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}],
      "categories": [{"id": 1, "name": "cat"}],
      "annotations": [{"id": 9, "image_id": 2, "category_id": 1, "segmentation": []}]}))
  with pytest.raises(ValueError, match="annotation 9 has unknown image_id 2"):
    seg_targets.main(["--vqvae", str(vq_path), "--coco", str(tmp_path / "bad2.json"),
                      "--out", str(tmp_path / "o.jsonl")])
  with pytest.raises(SystemExit):
    seg_targets.main(["--vqvae", str(vq_path), "--out", "x"])  # Neither --coco nor --masks.


def test_many_instances_span_encode_batches(vq):
  _, params = vq
  ids = np.zeros((60, 80), np.int32)
  for i in range(40):  # 40 instances > the 32-crop encode batch.
    y, x = divmod(i, 8)
    ids[y * 12 + 1:y * 12 + 4 + y, x * 10 + 1:x * 10 + 9 - i % 3] = i + 1
  insts = [seg_targets.Instance("img.png", (60, 80), "box", ids == i + 1) for i in range(40)]
  stats = seg_targets.Stats()
  (line,) = seg_targets.targets(insts + [seg_targets.Instance("img.png", (60, 80), "box",
                                                              np.zeros((60, 80), bool))],
                                params, stats)
  objs = _parse(line["suffix"])
  assert len(objs) == 40 and stats == {"instances": 40, "skipped_empty": 1, "lines": 1}
  for i, (locs, codes, label) in enumerate(objs):
    box = vqvae.tight_box(ids == i + 1)
    assert locs == [round(box[0] / 60 * 1023), round(box[1] / 80 * 1023),
                    round(box[2] / 60 * 1023), round(box[3] / 80 * 1023)]
    assert codes == _expect(params, ids == i + 1, box) and label == "box"
