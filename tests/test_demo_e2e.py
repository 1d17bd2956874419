"""The README's main job, `train.py --config configs/demo.py`, end to end: it trains, reads
the image for all four tasks (clearly above what the same model scores on blank images),
prints the final table with the blank-image baseline, writes final_metrics.json, logs,
checkpoints and drawings; `predict.py` then runs on a new demo image from that workdir.

One training run (6-8 minutes on a free 2-core machine, see configs/demo.py) is shared by
the tests of this file.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from big_vision_lite.data import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
# Required margins over the blank-image baseline, about half of the measured gaps (caption
# CIDEr 5.54 vs 0.47, VQA accuracy 0.71 vs 0.29, detection AP50 0.878 vs 0.001 and mAP
# 0.462 vs 0.000, segmentation mIoU 0.417 vs 0.014, on 256 examples each; configs/demo.py).
MARGINS = {"caption/cider": 2.5, "vqa/accuracy": 0.2, "detection/ap50": 0.4,
           "detection/map": 0.2, "segmentation/miou": 0.2}
KEYS = ("caption/cider", "vqa/accuracy", "detection/ap50", "detection/map", "segmentation/miou")


def _env() -> dict:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices would split every batch 8 ways.
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo_e2e") / "run"
  proc = subprocess.run(
      [sys.executable, "train.py", "--config=configs/demo.py", f"--workdir={workdir}"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc.stdout


@pytest.mark.slow
def test_demo_reads_the_image_and_reports_against_blank_images(demo_run):
  workdir, stdout = demo_run
  final = json.loads((workdir / "final_metrics.json").read_text())
  for key in KEYS:
    assert key in final and f"baseline/{key}" in final, sorted(final)
  gaps = {k: round(final[k] - final[f"baseline/{k}"], 3) for k in KEYS}
  for key, margin in MARGINS.items():
    assert final[key] >= final[f"baseline/{key}"] + margin, (key, gaps, final)
  # The final table: one row per metric with its model and blank-image values.
  for key in KEYS:
    row = f"{final[key]:8.4f}  {final['baseline/' + key]:8.4f}"
    assert any(line.startswith(key + " ") and line.endswith(row)
               for line in stdout.splitlines()), (key, stdout[-2000:])
  # What the README promises the workdir holds.
  assert (workdir / "metrics.jsonl").stat().st_size > 0
  assert list((workdir / "tensorboard").rglob("events.out.tfevents.*"))
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  drawn = {p.name for p in (workdir / "predictions").rglob("*.png")}
  for task in ("caption", "vqa", "detection", "segmentation"):
    assert any(task in name for name in drawn), (task, sorted(drawn))


def _new_scene(size: int):
  """A scene no split holds: a red circle on the left, a blue square on the right."""
  shapes = [dict(kind="circle", colour="red", cx=0.27, cy=0.40, r=0.17),
            dict(kind="square", colour="blue", cx=0.72, cy=0.62, r=0.17)]
  background = dict(style=0, c1=np.array([150.0, 140.0, 120.0]), c2=np.zeros(3), angle=0.0,
                    noise=0.0, noise_seed=0)
  image, _ = demo.render(dict(shapes=shapes, draw_order=shapes, background=background), size)
  return image


@pytest.mark.slow
def test_predict_on_a_new_image_from_the_workdir(demo_run, tmp_path):
  """predict.py reads the workdir (relative path, as in the README) and returns parsed,
  drawn objects whose boxes hold their shapes' centres."""
  workdir, _ = demo_run
  image = _new_scene(128)  # Twice the model's size: predict.py resizes it.
  path = tmp_path / "scene.png"
  PIL.Image.fromarray(image).save(path)
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, str(REPO / "predict.py"), f"--checkpoint={workdir.name}",
       f"--image={path}", "--prompt=detect circle ; square", f"--out={out}"],
      cwd=workdir.parent, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (result,) = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
  assert f"text: {result['text']}" in proc.stdout
  objects = result["objects"]
  assert [o["label"] for o in objects] == ["circle", "square"], result["text"]
  # Measured (configs/demo.py's run): circle [30 10 76 60], square [66 66 102 102].
  for o, (cy, cx) in zip(objects, [(0.40, 0.27), (0.62, 0.72)]):
    assert o["valid"], result["text"]
    y1, x1, y2, x2 = o["box_pixels"]  # In the input image's pixels.
    assert 0 <= y1 < y2 <= 128 and 0 <= x1 < x2 <= 128, o
    assert y1 < cy * 128 < y2 and x1 < cx * 128 < x2, (o, result["text"])
  assert (out / "0_scene.png").exists()
