"""predict.py with a scripted tiny model (its output is known): text, objects in pixels of
each original image, VQ-VAE masks pasted into the boxes, drawn images, the command line."""
import glob
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

import predict
from big_vision_lite import checkpoints
from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data import demo
from big_vision_lite.models import vqvae
from test_eval_runner import scripted_params, tiny_model, write_vqvae, write_workdir

REPO = pathlib.Path(__file__).resolve().parents[1]
DET = ("<loc0100><loc0200><loc0500><loc0600> circle ; "
       "<loc0300><loc0400><loc0700><loc0900> square")
CODES = np.arange(16) * 5 + 1
SEG = tok_lib.objects_to_text([[0.25, 0.125, 0.75, 0.5]], ["star"], seg_codes=[CODES])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("predict")
  tok = demo.demo_tokenizer(str(tmp))
  model = tiny_model(tok.vocab_size)
  sep = tok.encode("\n")[-1]
  for name, text in (("det", DET), ("seg", SEG)):
    params = scripted_params(model, sep, tok.encode(text) + [tok.eos_id])
    checkpoints.save(str(tmp / f"{name}.npz"), model, params)
  vq = write_vqvae(str(tmp / "vq.npz"))
  tok_path = glob.glob(str(tmp / "demo_tokenizer_*.model"))[0]
  # The segmentation model as a training workdir: tokenizer and VQ-VAE from its config.
  write_workdir(tmp / "run", model, params, tokenizer_file=tok_path, vqvae_path=vq)
  images = []
  for i, (w, h) in enumerate(((40, 30), (20, 50))):
    rng = np.random.RandomState(i)
    path = tmp / f"img{i}.{'png' if i == 0 else 'jpg'}"
    PIL.Image.fromarray(rng.randint(0, 255, (h, w, 3), np.uint8)).save(path)
    images.append(str(path))
  return {"tmp": tmp, "tok_path": tok_path, "images": images, "vq": vq}


def test_detection_objects_in_pixels_and_drawn_images(env, tmp_path):
  stream = io.StringIO()
  res = predict.predict(str(env["tmp"] / "det.npz"), env["images"], ["detect circle ; square"],
                        tokenizer=env["tok_path"], out=str(tmp_path), max_decode_len=24,
                        stream=stream)
  printed = stream.getvalue()
  for r, (w, h) in zip(res, ((40, 30), (20, 50))):
    assert r["text"] == DET
    assert [o["label"] for o in r["objects"]] == ["circle", "square"]
    assert all(o["valid"] for o in r["objects"])
    for o, locs in zip(r["objects"], ((100, 200, 500, 600), (300, 400, 700, 900))):
      want = [t / 1023 * s for t, s in zip(locs, (h, w, h, w))]
      assert o["box_pixels"] == pytest.approx(want, rel=1e-9)
      assert f"object {o['label']!r}: y1 x1 y2 x2 = " + ", ".join(
          f"{v:.1f}" for v in o["box_pixels"]) in printed
    drawn = np.asarray(PIL.Image.open(r["drawn"]))
    assert drawn.ndim == 3 and drawn.shape[2] == 3 and drawn.shape[1] >= 256
  assert [os.path.basename(r["drawn"]) for r in res] == ["0_img0.png", "1_img1.png"]
  lines = [json.loads(l) for l in open(tmp_path / "predictions.jsonl")]
  assert [l["text"] for l in lines] == [DET, DET] and lines[1]["image"] == env["images"][1]


def test_segmentation_masks_with_a_vqvae(env):
  stream = io.StringIO()
  path = str(env["tmp"] / "seg.npz")
  (r,) = predict.predict(path, env["images"][1:], ["segment star"], tokenizer=env["tok_path"],
                         vqvae=env["vq"], max_decode_len=24, stream=stream)
  assert r["text"] == SEG
  (o,) = r["objects"]
  assert o["seg_codes"] == CODES.tolist() and o["valid"]
  _, params = vqvae.load(env["vq"])
  logits = np.asarray(vqvae.decode(params, CODES[None].astype(np.int32)))[0]
  box = tok_lib.parse_objects(SEG)[0].box
  h, w = 50, 20
  mask = vqvae.mask_in_box(logits, (int(box[0] * h), int(box[1] * w), int(box[2] * h),
                                    int(box[3] * w)), (h, w))
  assert o["mask_pixels"] == int(mask.sum())
  assert f"mask: {int(mask.sum())} px" in stream.getvalue()
  # A workdir: the same, with tokenizer and VQ-VAE from its config.json.
  (w,) = predict.predict(str(env["tmp"] / "run"), env["images"][1:], ["segment star"],
                         max_decode_len=24, stream=io.StringIO())
  assert w["text"] == SEG and w["objects"][0]["mask_pixels"] == int(mask.sum())
  # Without a VQ-VAE the codes are reported, not decoded.
  (r,) = predict.predict(path, env["images"][1:], ["segment star"], tokenizer=env["tok_path"],
                         max_decode_len=24, stream=io.StringIO())
  assert r["objects"][0]["mask_pixels"] is None


def test_command_line(env, tmp_path):
  cmd = [sys.executable, str(REPO / "predict.py"), f"--checkpoint={env['tmp'] / 'det.npz'}",
         f"--tokenizer={env['tok_path']}", f"--image={','.join(env['images'])}",
         "--prompt=detect circle ; square", f"--out={tmp_path}", "--max_decode_len=24"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.count(f"text: {DET}") == 2
  assert proc.stdout.count("object 'circle': y1 x1 y2 x2 = ") == 2
  assert sorted(os.listdir(tmp_path)) == ["0_img0.png", "1_img1.png", "predictions.jsonl"]
  bad = subprocess.run(cmd[:4] + ["--image=nope.png", "--prompt=x"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "--image nope.png: no such file" in bad.stderr


def test_inputs_and_workdir_config(env, tmp_path):
  assert predict.split_images([f"{env['images'][0]}, {env['images'][1]}"]) == env["images"]
  assert predict.match_prompts(["a"], 3) == ["a", "a", "a"]
  with pytest.raises(ValueError, match="one per image"):
    predict.match_prompts(["a", "b"], 3)
  with pytest.raises(FileNotFoundError, match="no such file"):
    predict.split_images([str(tmp_path / "x.png")])
  with pytest.raises(ValueError, match="--tokenizer is required"):
    predict.predict(str(env["tmp"] / "det.npz"), env["images"], ["x"])
  # A training workdir's config.json names its tokenizer; an HF config.json does not.
  (tmp_path / "config.json").write_text(json.dumps(
      {"model": {}, "tokenizer": "demo", "vqvae": None, "config": {}}))
  assert predict.run_config(str(tmp_path))["tokenizer"] == "demo"
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "paligemma"}))
  assert predict.run_config(str(tmp_path)) is None
