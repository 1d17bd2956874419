"""Benchmark: load a PaliGemma-3B-shaped bfloat16 big_vision .npz; time and peak memory.

Writes a synthetic checkpoint with the shapes of an official one (default
../shared/fixtures/param_shapes/pt_224.json: PaliGemma 1 3B at 224 px, ~5.8 GB in bf16)
into a temporary folder, loads it with big_vision_lite.checkpoints.load in a fresh
subprocess (so the writer's memory does not count), and deletes it. Peak memory is the
loader's VmHWM (/proc/self/status). The loader returns every array on the host, so the
floor is about one file size; rss_over_file near 1 means it never held a second copy of
anything big.

  python bench/load_checkpoint.py                 # full size (~5.8 GB disk and RAM)
  python bench/load_checkpoint.py --scale 0.05    # 5% of the layers and vocab (~0.3 GB)

The last line of stdout is one JSON object:
  {"bench": "load_checkpoint", "file_gb": ..., "load_s": ..., "peak_rss_gb": ...,
   "rss_over_file": ..., ...}
"""
import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get("BVL_FIXTURES", REPO.parent / "shared" / "fixtures"))
_BF16_ONE = 0x3F80  # bfloat16 bits of 1.0: a non-zero fill, so nothing can be sparse


def scaled_shapes(shapes: dict[str, list[int]], scale: float) -> dict[str, tuple[int, ...]]:
  """Scales the layer count of both towers and the vocab size (all other dims stay)."""
  def size(n):
    return max(1, round(n * scale))
  out = {}
  for name, shape in shapes.items():
    shape = list(shape)
    if name.startswith(("img/Transformer/encoderblock/", "llm/layers/")):
      shape[0] = size(shape[0])
    if name == "llm/embedder/input_embedding":
      shape[0] = size(shape[0])
    out[name] = tuple(shape)
  return out


def write_npz(path: pathlib.Path, shapes: dict[str, tuple[int, ...]], chunk_bytes: int = 64 << 20):
  """big_vision layout: "params/"-prefixed keys, bfloat16 as '|V2', streamed in chunks."""
  chunk = np.full(chunk_bytes // 2, _BF16_ONE, np.uint16)
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, shape in sorted(shapes.items()):
      with zf.open(f"params/{name}.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(
            f, {"descr": "|V2", "fortran_order": False, "shape": shape})
        left = math.prod(shape)
        while left:
          n = min(left, chunk.size)
          f.write(chunk[:n].data)
          left -= n


def _vm_hwm_gb() -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmHWM:"):
      return int(line.split()[1]) * 1024 / 1e9
  raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_gb() -> float:
  for line in pathlib.Path("/proc/self/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) * 1024 / 1e9
  raise RuntimeError("no VmRSS in /proc/self/status")


def load_child(path: str) -> None:
  """Runs in the subprocess: load, check, report JSON on stdout."""
  sys.path.insert(0, str(REPO))
  from big_vision_lite import checkpoints  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  baseline = _rss_gb()
  t0 = time.perf_counter()
  config, params = checkpoints.load(path)
  load_s = time.perf_counter() - t0
  flat = checkpoints.flatten(params)
  nbytes = sum(a.nbytes for a in flat.values())
  probe = flat["llm/layers/mlp/gating_einsum"]
  assert probe.dtype == ml_dtypes.bfloat16 and float(probe[0, 0, 0, 0]) == 1.0
  print(json.dumps({"load_s": load_s, "peak_rss_gb": _vm_hwm_gb(), "baseline_rss_gb": baseline,
                    "params_gb": nbytes / 1e9, "llm_variant": config["llm"]["variant"],
                    "img_variant": config["img"]["variant"]}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", default=str(FIXTURES / "param_shapes" / "pt_224.json"),
                      help="param_shapes JSON of an official checkpoint")
  parser.add_argument("--scale", type=float, default=1.0,
                      help="fraction of layers and vocab rows to keep (1.0 = full size)")
  parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
  parser.add_argument("--keep", action="store_true", help="keep the written file")
  parser.add_argument("--_load", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._load:  # pylint: disable=protected-access
    load_child(args._load)  # pylint: disable=protected-access
    return

  ref = json.loads(pathlib.Path(args.shapes).read_text())
  shapes = scaled_shapes(ref["params"], args.scale)
  folder = pathlib.Path(tempfile.mkdtemp(prefix="bvl_bench_", dir=args.dir))
  path = folder / f"{ref['vanity_name']}_x{args.scale:g}.bf16.npz"
  try:
    t0 = time.perf_counter()
    write_npz(path, shapes)
    write_s = time.perf_counter() - t0
    file_gb = path.stat().st_size / 1e9
    print(f"wrote {path} ({file_gb:.2f} GB) in {write_s:.1f} s", flush=True)
    child = subprocess.run([sys.executable, __file__, "--_load", str(path)], check=True,
                           capture_output=True, text=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
  finally:
    if not args.keep:
      shutil.rmtree(folder, ignore_errors=True)
  peak = result["peak_rss_gb"]
  print(f"loaded in {result['load_s']:.1f} s, peak RSS {peak:.2f} GB "
        f"(baseline {result['baseline_rss_gb']:.2f} GB) for a {file_gb:.2f} GB file")
  print(json.dumps({
      "bench": "load_checkpoint", "shapes": ref["vanity_name"], "scale": args.scale,
      "file_gb": round(file_gb, 3), "write_s": round(write_s, 2),
      "load_s": round(result["load_s"], 2), "load_gb_per_s": round(file_gb / result["load_s"], 3),
      "peak_rss_gb": round(peak, 3), "baseline_rss_gb": round(result["baseline_rss_gb"], 3),
      "rss_over_file": round(peak / file_gb, 3),
      "extra_rss_over_file": round((peak - result["baseline_rss_gb"]) / file_gb, 3),
      "llm_variant": result["llm_variant"], "img_variant": result["img_variant"]}))


if __name__ == "__main__":
  main()
