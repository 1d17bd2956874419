"""Trains the demo's mask VQ-VAE on the demo's own object masks (cropped to their boxes).

  python -m big_vision_lite.tools.demo_vqvae --out big_vision_lite/data/assets/demo_vqvae.npz

The shipped file (data/assets/demo_vqvae.npz, < 1 MB) was made with this command, so the
demo never trains it at run time; rerun it after changing the demo's shapes.
"""
import argparse
import itertools
import os
import shutil
import tempfile

import numpy as np

from big_vision_lite import vqvae_train
from big_vision_lite.data import demo
from big_vision_lite.data.pp_targets import crop_masks_64
from configs import vqvae_masks


def demo_masks(image_size: int = 128, split: str = "train"):
  """Endless float32[64,64,1] masks of demo objects, cropped to their boxes as seg targets are."""
  source = demo.DemoSource(split, image_size=image_size)
  for i in itertools.count():
    objects = source[i % len(source)]["objects"]
    yield from crop_masks_64(objects["mask"], objects["bbox"])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="where to write the VQ-VAE npz")
  parser.add_argument("--steps", type=int, default=1500)
  args = parser.parse_args(argv)
  config = vqvae_masks.get_config(f"size=demo,steps={args.steps}")
  with tempfile.TemporaryDirectory() as workdir:
    metrics = vqvae_train.train(config, workdir, masks=lambda: demo_masks())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    shutil.copy(os.path.join(workdir, "vqvae.npz"), args.out)
  print(f"wrote {args.out}: {metrics}")


if __name__ == "__main__":
  main()
