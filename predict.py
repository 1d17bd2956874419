"""Runs a checkpoint on images and prompts: text, objects in pixels, masks, drawn images.

  python predict.py --checkpoint runs/demo --image photo.jpg --prompt "detect cat ; dog"
  python predict.py --checkpoint pg2_3b_mix_224.npz --tokenizer paligemma_tokenizer.model \\
      --vqvae vae-oid.npz --image a.jpg,b.jpg --prompt "segment cat" --out /tmp/pred

Several images (--image repeated or comma-separated) run as one batch; give one --prompt for
all of them or one per image. Images are preprocessed as the eval pipelines do
(decode|resize(S)|value_range(-1, 1), S the model's image_size). For each image it prints
the decoded text and, for detection / segmentation output, every parsed object with its box
in pixels of the original image (y1, x1, y2, x2) and, with a VQ-VAE, its mask (decoded and
pasted into the box as big_vision's segmentation evaluator does). With --out it writes the
image with boxes and masks drawn (big_vision_lite/render.py) and predictions.jsonl.

Tokenizer and VQ-VAE default to the run config of a training workdir (its config.json).
"""
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import numpy as np
import PIL.Image

from big_vision_lite import checkpoints
from big_vision_lite import decode
from big_vision_lite import eval_runner
from big_vision_lite import render
from big_vision_lite import tokenizer as tok_lib
from big_vision_lite.data.pp_parse import Preprocess
from big_vision_lite.models import vqvae as vqvae_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script, see evaluate.py)."""
  flags.DEFINE_string("checkpoint", None, "A .npz, a Hugging Face folder or a training workdir.")
  flags.DEFINE_multi_string("image", None, "Image file(s); repeat the flag or separate by ','.")
  flags.DEFINE_multi_string("prompt", None, "One prompt for all images, or one per image.")
  flags.DEFINE_string("tokenizer", None, "SentencePiece model, or 'demo' (default: the "
                      "workdir's).")
  flags.DEFINE_string("vqvae", None, "Mask VQ-VAE .npz for <seg> output, or 'demo' (default: "
                      "the workdir's).")
  flags.DEFINE_string("out", None, "Folder for the drawn images and predictions.jsonl.")
  flags.DEFINE_integer("max_decode_len", 64, "Most tokens generated per image.")
  flags.DEFINE_string("sampler", "greedy", "greedy | sample | beam | temperature(t) | "
                      "nucleus(p).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")


def run_config(checkpoint: str) -> dict[str, Any] | None:
  """The run config (model, tokenizer, vqvae) of a training workdir or one of its step
  folders (<workdir>/config.json), or None for other checkpoints."""
  workdir, _ = eval_runner.run_dir(checkpoint)
  path = os.path.join(workdir or checkpoint, "config.json")
  if not os.path.isfile(path):
    return None
  with open(path, encoding="utf-8") as f:
    cfg = json.load(f)
  return cfg if isinstance(cfg, dict) and "model" in cfg and "tokenizer" in cfg else None


def split_images(values: Sequence[str] | None) -> list[str]:
  out = [p.strip() for v in values or () for p in v.split(",") if p.strip()]
  if not out:
    raise ValueError("--image: give at least one image file")
  for p in out:
    if not os.path.isfile(p):
      raise FileNotFoundError(f"--image {p}: no such file")
  return out


def match_prompts(prompts: Sequence[str] | None, n: int) -> list[str]:
  prompts = list(prompts or ())
  if len(prompts) == 1:
    return prompts * n
  if len(prompts) != n:
    raise ValueError(f"--prompt: give one prompt for all {n} images or one per image, got "
                     f"{len(prompts)}")
  return prompts


def load_image(path: str, size: int) -> tuple[Any, Any]:
  """(uint8[H,W,3] original, float32[S,S,3] in [-1,1] model input) of an image file."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    with PIL.Image.open(path) as im:
      original = np.asarray(im.convert("RGB"))
  except (OSError, ValueError) as e:
    raise ValueError(f"--image {path}: not a readable image ({e})") from None
  pp = Preprocess(f"decode|resize({size})|value_range(-1, 1)")
  return original, np.asarray(pp({"image": data})["image"], np.float32)


def describe(text: str, hw: tuple[int, int], vq_params) -> dict[str, Any]:
  """Parsed objects with pixel boxes (of an image of size hw) and masks (with a VQ-VAE)."""
  objects = tok_lib.parse_objects(text)
  masks = [None] * len(objects)
  if vq_params is not None:
    masks = eval_runner.object_masks(objects, hw,
                                     lambda codes: vqvae_lib.decode(vq_params, codes))
  rows = [{"label": o.label, "valid": o.valid,
           "box_pixels": None if o.box is None else list(o.box_pixels(*hw)),
           "mask_pixels": None if m is None else int(m.sum()),
           "seg_codes": None if o.seg_codes is None else list(o.seg_codes)}
          for o, m in zip(objects, masks)]
  return {"objects": rows, "parsed": objects, "masks": masks}


def predict(checkpoint: str, images: Sequence[str], prompts: Sequence[str], *,
            tokenizer: str | None = None, vqvae: str | None = None, out: str | None = None,
            max_decode_len: int = 64, sampler: str = "greedy", seed: int = 0,
            stream=None) -> list[dict[str, Any]]:
  """Decodes every (image, prompt), prints the results to `stream`, writes --out files.

  Returns one dict per image: image, prompt, text, objects [{label, valid, box_pixels
  (y1, x1, y2, x2 in pixels of the original image), mask_pixels, seg_codes}], drawn (path).
  """
  stream = stream or sys.stdout
  prompts = match_prompts(prompts, len(images))
  workdir_cfg = run_config(checkpoint)
  if tokenizer is None:
    if workdir_cfg is None:
      raise ValueError("--tokenizer is required unless --checkpoint is a training workdir")
    tokenizer = workdir_cfg["tokenizer"]
  if vqvae is None and workdir_cfg is not None:
    vqvae = workdir_cfg.get("vqvae")
  # "demo" is trained once: train.py's copy in a workdir, one beside the checkpoint, or new.
  tok = eval_runner.load_tokenizer(tokenizer, eval_runner.tokenizer_cache(checkpoint, out))
  vq_path = eval_runner.vqvae_path(vqvae)
  vq_params = vqvae_lib.load(vq_path)[1] if vq_path else None

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  model_config, params = checkpoints.load(checkpoint, shardings=lambda name: device)
  if tok.vocab_size > model_config["llm"]["vocab_size"]:
    raise ValueError(f"tokenizer has {tok.vocab_size} ids, more than the checkpoint's "
                     f"vocab_size {model_config['llm']['vocab_size']}")
  decoder = decode.get_decoder(model_config)
  loaded = [load_image(p, decoder.resolved_config["img"]["image_size"]) for p in images]
  predict_fn = decode.make_predict_fn(
      decoder, params, tok, max_decode_len=max_decode_len, batch_size=len(images),
      rng=jax.random.key(seed), sampler=sampler)
  texts = predict_fn([{"image": x, "prefix": p} for (_, x), p in zip(loaded, prompts)])

  results = []
  if out:
    os.makedirs(out, exist_ok=True)
  for i, (path, prompt, text, (original, _)) in enumerate(zip(images, prompts, texts, loaded)):
    hw = original.shape[:2]
    info = describe(text, hw, vq_params)
    res = {"image": path, "prompt": prompt, "text": text, "objects": info["objects"],
           "drawn": None}
    print(f"[{i}] {path} ({hw[1]}x{hw[0]}) prompt: {prompt!r}", file=stream)
    print(f"  text: {text}", file=stream)
    for o in info["objects"]:
      box = ("no box" if o["box_pixels"] is None
             else "y1 x1 y2 x2 = " + ", ".join(f"{v:.1f}" for v in o["box_pixels"]))
      extra = "" if o["valid"] else "  (invalid)"
      if o["mask_pixels"] is not None:
        extra += f"  mask: {o['mask_pixels']} px"
      elif o["seg_codes"] is not None:
        extra += "  mask: 16 <seg> codes (pass --vqvae to decode them)"
      print(f"  object {o['label']!r}: {box}{extra}", file=stream)
    if out:
      canvas = render.draw_prediction(original, text, prompt=prompt, objects=info["parsed"],
                                      masks=info["masks"])
      stem = os.path.splitext(os.path.basename(path))[0]
      res["drawn"] = os.path.join(out, f"{i}_{stem}.png")
      PIL.Image.fromarray(canvas).save(res["drawn"])
      print(f"  drawn: {res['drawn']}", file=stream)
    results.append(res)
  if out:
    with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
      for r in results:
        f.write(json.dumps(r, ensure_ascii=False) + "\n")
  return results


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.checkpoint or not FLAGS.image or not FLAGS.prompt:
    raise app.UsageError("--checkpoint, --image and --prompt are required")
  try:
    predict(FLAGS.checkpoint, split_images(FLAGS.image), FLAGS.prompt,
            tokenizer=FLAGS.tokenizer, vqvae=FLAGS.vqvae, out=FLAGS.out,
            max_decode_len=FLAGS.max_decode_len, sampler=FLAGS.sampler, seed=FLAGS.seed)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
