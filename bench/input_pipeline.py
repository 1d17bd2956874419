"""Input pipeline throughput: examples/s of the demo and of a JSONL folder of JPEGs.

  python bench/input_pipeline.py                      # 224px, 0 and 2 workers
  python bench/input_pipeline.py --image_size=112 --workers=0,2,4 --step_ms=50

For each source and worker count it builds the real training iterator (make_train_iterator,
caption task, PaliGemma text layout, batch --batch_size, prefetch 2), skips --warmup batches
(worker start-up) and times --batches more. With --step_ms it also plays a training loop whose
steps take that long (a sleep: the GIL is free, as during an XLA step) and reports the
fraction of the time next() waited, the number the trainer logs.
The JPEG folder holds --num_images demo scenes rendered at 640x480, quality 90 (COCO-like).

Prints a table, then (last line) one JSON object: {"bench": "input_pipeline", "rows":
{"demo/0": {"examples_per_s": ..., "startup_s": ...}, ...}} (no reference: no ratio).
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import PIL.Image  # noqa: E402

from big_vision_lite.data import demo, pipeline  # noqa: E402
from big_vision_lite.data.pp_text import combine_and_keep_train  # noqa: E402


def make_jpeg_folder(folder: str, num_images: int) -> str:
  path = os.path.join(folder, "train.jsonl")
  if os.path.isfile(path):
    return path
  os.makedirs(os.path.join(folder, "images"), exist_ok=True)
  src = demo.DemoSource("train", image_size=640)
  with open(path, "w") as f:
    for i in range(num_images):
      r = src[i]
      name = f"images/{i:06d}.jpg"
      PIL.Image.fromarray(r["image"][80:560]).save(os.path.join(folder, name), quality=90)
      f.write(json.dumps({"image": name, "captions": r["captions"]}) + "\n")
  return path


def input_config(name: str, size: int, batch_size: int, workers: int, jsonl: str) -> dict:
  text = ('choice(inkey="captions", outkey="suffix")|strfmt("caption en", outkey="prefix")|'
          + combine_and_keep_train(32))
  if name == "demo":
    data = dict(name="demo", split="train", image_size=size)
    pp = f"resize({size})|value_range(-1, 1)|" + text
  else:
    data = dict(name="jsonl", path=jsonl)
    pp = f"decode|resize({size})|value_range(-1, 1)|" + text
  return dict(data=data, pp=pp, batch_size=batch_size, shuffle_buffer_size=10_000,
              num_workers=workers, skip_bad_examples=False, prefetch=2)


def measure(cfg: dict, tok, warmup: int, batches: int, step_ms: float) -> dict:
  it = pipeline.make_train_iterator(cfg, tokenizer=tok, seed=0, process_index=0,
                                    process_count=1)
  t0 = time.perf_counter()
  for _ in range(warmup):
    next(it)
  startup = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t0
  out = {"examples_per_s": batches * cfg["batch_size"] / elapsed, "startup_s": startup}
  if step_ms:
    wait0, t0 = it.stats()["wait_s"], time.perf_counter()
    for _ in range(batches):
      next(it)
      time.sleep(step_ms / 1000)
    out["wait_fraction"] = (it.stats()["wait_s"] - wait0) / (time.perf_counter() - t0)
  it.close()
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--workers", default="0,2")
  parser.add_argument("--sources", default="demo,jsonl")
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--num_images", type=int, default=256)
  parser.add_argument("--step_ms", type=float, default=0.0)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bvl_bench_input"))
  args = parser.parse_args()
  os.makedirs(args.workdir, exist_ok=True)
  tok = demo.demo_tokenizer(args.workdir)
  jsonl = make_jpeg_folder(os.path.join(args.workdir, "jpegs"), args.num_images)
  print(f"cpus={os.cpu_count()} image_size={args.image_size} batch_size={args.batch_size}")
  print(f"{'source':8s} {'workers':>7s} {'examples/s':>11s} {'startup_s':>10s}"
        + (f" {'wait@' + str(args.step_ms) + 'ms':>12s}" if args.step_ms else ""))
  rows = {}
  for name in args.sources.split(","):
    for workers in (int(w) for w in args.workers.split(",")):
      cfg = input_config(name, args.image_size, args.batch_size, workers, jsonl)
      r = measure(cfg, tok, args.warmup, args.batches, args.step_ms)
      rows[f"{name}/{workers}"] = {k: round(v, 3) for k, v in r.items()}
      line = f"{name:8s} {workers:7d} {r['examples_per_s']:11.1f} {r['startup_s']:10.2f}"
      if args.step_ms:
        line += f" {r['wait_fraction']:12.3f}"
      print(line, flush=True)
  print(json.dumps({"bench": "input_pipeline", "image_size": args.image_size,
                    "batch_size": args.batch_size, "cpus": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
  main()
