"""vqvae_train.py: config, mask sources, metrics, and a short run that learns."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from big_vision_lite import vqvae_train
from big_vision_lite.models import vqvae

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("vqvae_masks", REPO / "configs" / "vqvae_masks.py")
vqvae_masks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(vqvae_masks)


def _config(size, steps, **overrides):
  c = vqvae_masks.get_config(f"size={size},steps={steps}")
  c.batch_size = 16
  c.data.val_size = 64
  c.log_every = c.eval_every = steps
  c.update_from_flattened_dict(overrides)
  return c


def test_config():
  c = vqvae_masks.get_config()
  assert vqvae_train._check_config(c) == vqvae.VQVAEConfig(**c.model.to_dict())
  assert c.model.num_codes == 128  # 16 <seg> tokens of 128 values, whatever the size.
  assert vqvae_train._check_config(vqvae_masks.get_config("size=official")) == vqvae.VQVAEConfig()
  c.unknown_key = 1
  with pytest.raises(ValueError, match=r"unknown keys \['unknown_key'\]"):
    vqvae_train._check_config(c)
  c = vqvae_masks.get_config()
  c.model.depth = 3
  with pytest.raises(ValueError, match="config.model.*depth"):
    vqvae_train._check_config(c)
  with pytest.raises(ValueError, match="size must be one of"):
    vqvae_masks.get_config("size=huge")


def test_synthetic_masks():
  a = list(zip(range(50), vqvae_train.synthetic_masks(seed=3, crop_to_box=0.0)))
  b = list(zip(range(50), vqvae_train.synthetic_masks(seed=3, crop_to_box=0.0)))
  for (_, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y)  # Deterministic in the seed.
  masks = np.stack([m for _, m in a])
  assert masks.shape == (50, 64, 64, 1) and masks.dtype == np.float32
  # Drawn at 128 px and halved (antialiased): soft only along the edges.
  assert masks.min() == 0.0 and masks.max() == 1.0
  assert np.mean((masks > 0.05) & (masks < 0.95)) < 0.05
  cover = masks.mean(axis=(1, 2, 3))
  assert (cover > 0).all() and np.median(cover) < 0.5 and len(np.unique(cover)) > 40
  # Cropped to the box: the shape touches all four borders.
  for m in (m for _, m in zip(range(20), vqvae_train.synthetic_masks(1, crop_to_box=1.0))):
    m = m[..., 0] > 0
    assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()


def test_iou_and_usage():
  t = np.zeros((3, 4, 4, 1), np.float32)
  t[0, :2] = 1  # 8 pixels.
  logits = -np.ones_like(t)
  logits[0, :1] = 1  # 4 of them predicted -> IoU .5.
  logits[1, 0, 0] = 1  # Predicted 1 pixel, target empty -> 0.
  np.testing.assert_allclose(vqvae_train.iou(logits, t), [0.5, 0.0, 1.0])  # Both empty -> 1.
  u = vqvae_train.usage_stats(np.array([2, 2, 0, 0]))
  assert u["used_codes"] == 2 and u["perplexity"] == pytest.approx(2.0)


@pytest.mark.slow  # ~30 CPU-seconds: compile + 100 steps of the demo model.
def test_training_improves_and_roundtrips(tmp_path):
  # The demo size (what configs/vqvae_masks.py trains by default), 1600 masks.
  c = _config("demo", 100, **{"reseed.every": 20, "optim.lr": 3e-3, "optim.warmup_steps": 10})
  res = vqvae_train.train(c, tmp_path)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [0, 100]
  assert res["reseeded"] >= 128  # Step 1 re-seeds every code (a data-dependent init).
  assert res["val_iou"] > res["init_val_iou"] + 0.2, res
  assert res["val_iou"] > 0.55 and res["val_used_codes"] > 10, res
  assert {"bce", "codebook_loss", "commitment_loss", "perplexity", "used_codes"} <= set(res)
  # The saved file reproduces the logged validation IoU through the public API.
  config, params = vqvae.load(tmp_path / "vqvae.npz")
  assert config == vqvae.VQVAEConfig(**c.model.to_dict())
  val = np.stack([m for _, m in zip(range(64), vqvae_train.synthetic_masks(10_000, 0.5))])
  logits = np.asarray(vqvae.decode(params, vqvae.encode(params, val)))
  assert vqvae_train.iou(logits, val).mean() == pytest.approx(res["val_iou"], abs=1e-3)


def test_given_sources(tmp_path):
  # A callable source is called again when it runs out; its first val_size masks are held out.
  rng = np.random.default_rng(0)
  masks = [vqvae_train.synthetic_mask(rng) for _ in range(40)]
  calls = []
  def gen():
    calls.append(1)
    yield from masks
  c = _config("tiny", 3, **{"data.val_size": 8})
  train, val = vqvae_train._sources(c, gen)
  np.testing.assert_array_equal(val, np.stack(masks[:8]))
  got = [next(train) for _ in range(40)]
  np.testing.assert_array_equal(got[:32], masks[8:])
  np.testing.assert_array_equal(got[32:], masks[:8])
  assert len(calls) == 2
  # A finite list: at most 20% held out, the rest cycled.
  train, val = vqvae_train._sources(c, masks[:10])
  assert len(val) == 2 and len({next(train).tobytes() for _ in range(30)}) == 8
  with pytest.raises(ValueError, match=r"masks: item 0 has shape \(32, 32, 1\)"):
    vqvae_train._sources(c, lambda: iter([np.zeros((32, 32, 1))]))
  with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
    vqvae_train._sources(c, [np.full((64, 64, 1), 2.0)] * 3)
  with pytest.raises(ValueError, match="ran out"):
    vqvae_train._sources(c, iter(masks[:5]))
  # A folder of mask PNGs (any size; cropped to their box).
  folder = tmp_path / "pngs" / "sub"
  folder.mkdir(parents=True)
  for i in range(12):
    m = np.zeros((40 + i, 50), np.uint8)
    m[5:20 + i, 3 + i:30] = 255
    PIL.Image.fromarray(m).save(folder / f"{i}.png")
  c = _config("tiny", 3, **{"data.source": "folder", "data.folder": str(tmp_path / "pngs"),
                            "data.crop_to_box": 1.0})
  train, val = vqvae_train._sources(c, None)
  assert val.shape == (2, 64, 64, 1)  # At most 20% held out.
  np.testing.assert_allclose(val, 1.0)  # Rectangles cropped to their box.
  np.testing.assert_allclose(next(train), 1.0)
  c.data.folder = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="no .png masks"):
    vqvae_train._sources(c, None)


def test_command_line(tmp_path):
  cmd = [sys.executable, "-m", "big_vision_lite.vqvae_train",
         "--config", "configs/vqvae_masks.py:size=tiny,steps=2", "--workdir", str(tmp_path),
         "--config.batch_size=8", "--config.data.val_size=8", "--config.log_every=1"]
  subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, timeout=120)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [0, 1, 2]
  vqvae.load(tmp_path / "vqvae.npz")
  bad = subprocess.run(cmd + ["--config.no_such_key=1"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
  assert bad.returncode != 0 and "no_such_key" in bad.stderr
