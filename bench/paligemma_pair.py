"""One random PaliGemma in big_vision_lite and in transformers, for side-by-side benchmarks.

The same weights in both: params are initialised by our model, written with
`checkpoints.save(format="hf")` and opened by transformers' PaliGemmaForConditionalGeneration,
so any speed difference is the frameworks', not the models'. Shared by bench/train_step.py
and bench/decode.py.

Shapes (CPU, the issue's configuration): image 224 px through a SigLIP S/16 tower (196 image
tokens, width 384, 12 layers), Gemma width 512 x 6 layers (8 query heads of 64, MQA, GeGLU
4096) with the full 257152-token vocabulary, float32. GPU: PaliGemma 3B (So400m/14 +
gemma_2b, 256 image tokens), bfloat16.
"""
from collections.abc import Callable
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

CPU_CONFIG = {
    "img": {"variant": "S/16", "image_size": 224, "head_zeroinit": False, "scan": True,
            "remat_policy": "none"},
    "llm": {"vocab_size": 257152, "width": 512, "depth": 6, "mlp_dim": 4096, "num_heads": 8,
            "num_kv_heads": 1, "head_dim": 64, "scan": True, "remat_policy": "none"},
}
GPU_CONFIG = {
    "img": {"variant": "So400m/14", "image_size": 224, "head_zeroinit": False, "scan": True,
            "remat_policy": "none", "dtype": "bfloat16", "param_dtype": "bfloat16"},
    "llm": {"variant": "gemma_2b", "scan": True, "remat_policy": "none", "dtype": "bfloat16",
            "param_dtype": "bfloat16"},
}
PREFIX_LEN = 16  # bos + prompt + "\n"; the rest of the text is the suffix (loss tokens).


def model_config(device: str, model_json: str | None = None) -> dict[str, Any]:
  """The benchmark's model config for "cpu" or "gpu"; `model_json` ('{"llm": {"vocab_size":
  1000}}', from --model) overrides its keys, tower by tower (tests run tiny models)."""
  if device not in ("cpu", "gpu"):
    raise ValueError(f"--device={device!r}: expected 'cpu' or 'gpu'")
  cfg = json.loads(json.dumps(CPU_CONFIG if device == "cpu" else GPU_CONFIG))
  if model_json:
    try:
      override = json.loads(model_json)
    except json.JSONDecodeError as e:
      raise ValueError(f"--model: not JSON ({e}): {model_json!r}") from None
    if not isinstance(override, dict) or set(override) - {"img", "llm"} or not all(
        isinstance(v, dict) for v in override.values()):
      raise ValueError(f"--model: expected {{\"img\": {{...}}, \"llm\": {{...}}}}, got "
                       f"{model_json!r}")
    for tower, keys in override.items():
      cfg[tower].update(keys)
  return cfg


def vocab_size(cfg: dict[str, Any]) -> int:
  """The model's vocabulary (a variant's, e.g. gemma_2b, or the config's own); checkpoints.save
  appends the <image> token to the HF export at this id."""
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  return paligemma.resolve_config(cfg)["llm"]["vocab_size"]


def torch_dtype(cfg: dict[str, Any]):
  import torch  # pylint: disable=g-import-not-at-top
  return {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg["llm"].get("dtype", "float32")]


def init_params(cfg: dict[str, Any], seed: int = 0) -> Any:
  """Random params of `cfg` (our init: truncated-normal fan-in kernels, random projector)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  model = paligemma.Model(**cfg)
  size = paligemma.resolve_config(cfg)["img"]["image_size"]
  image = jnp.zeros((1, size, size, 3), jnp.float32)
  text = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda rng: model.init(rng, image, text, jnp.zeros_like(text))["params"])
  params = init(jax.random.key(seed))
  # RMSNorm scales start at 0 (= x1): perturb them so that a missing (1 + scale) would show.
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = jax.random.key(seed + 1)
  out = []
  for i, (path, x) in enumerate(leaves):
    if "norm" in jax.tree_util.keystr(path) and "scale" in jax.tree_util.keystr(path):
      x = x + (0.1 * jax.random.normal(jax.random.fold_in(rng, i), x.shape)).astype(x.dtype)
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def to_transformers(cfg: dict[str, Any], params: Any, folder: str, *, device: str = "cpu",
                    attn_implementation: str = "eager"):
  """Our params -> an HF folder (checkpoints.save format="hf") -> transformers model."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from big_vision_lite import checkpoints  # pylint: disable=g-import-not-at-top
  checkpoints.save(folder, cfg, params, format="hf")
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      folder, attn_implementation=attn_implementation, dtype=torch_dtype(cfg))
  return model.to("cuda" if device == "gpu" else "cpu")


def make_batch(cfg: dict[str, Any], batch_size: int, text_len: int, seed: int = 0
               ) -> dict[str, np.ndarray]:
  """A train batch in the input pipeline's layout: text int32[B, text_len + 1] (the model
  reads text_len tokens), prefix of PREFIX_LEN tokens, the rest suffix; no padding."""
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  rcfg = paligemma.resolve_config(cfg)
  size, vocab = rcfg["img"]["image_size"], rcfg["llm"]["vocab_size"]
  rs = np.random.RandomState(seed)
  t = text_len + 1
  text = rs.randint(3, vocab, (batch_size, t)).astype(np.int32)
  text[:, 0] = 2  # bos
  text[:, PREFIX_LEN - 1] = 108  # "\n"
  text[:, -1] = 1  # eos
  suffix = (np.arange(t) >= PREFIX_LEN)[None].repeat(batch_size, 0)
  return {
      "image": rs.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32),
      "text": text, "mask_ar": suffix.astype(np.int32), "mask_loss": suffix.astype(np.int32),
      "mask_input": np.ones((batch_size, t), np.int32)}


def num_image_tokens(cfg: dict[str, Any]) -> int:
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  img = paligemma.resolve_config(cfg)["img"]
  return (img["image_size"] // img["patch_size"][0]) * (img["image_size"] // img["patch_size"][1])


def hf_train_inputs(cfg: dict[str, Any], batch: dict[str, np.ndarray], device: str = "cpu"
                    ) -> dict[str, Any]:
  """The same batch for transformers: [<image> x N][text], token_type_ids = mask_ar (0 on
  image + prefix: bidirectional; 1 on the suffix: causal), labels -100 off the loss."""
  import torch  # pylint: disable=g-import-not-at-top
  n = num_image_tokens(cfg)
  b = batch["text"].shape[0]
  text = batch["text"][:, :-1].astype(np.int64)
  image_token = vocab_size(cfg)
  ids = np.concatenate([np.full((b, n), image_token), text], 1)
  types = np.concatenate([np.zeros((b, n), np.int64), batch["mask_ar"][:, :-1]], 1)
  labels = np.where(batch["mask_loss"][:, 1:] == 1, batch["text"][:, 1:], -100).astype(np.int64)
  dev = "cuda" if device == "gpu" else "cpu"
  as_t = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(dev)
  return {
      "input_ids": as_t(ids), "token_type_ids": as_t(types),
      "attention_mask": as_t(np.ones_like(ids)),
      "pixel_values": as_t(batch["image"].transpose(0, 3, 1, 2)).to(torch_dtype(cfg)),
      "labels": as_t(labels)}


# ------------------------------------------------------------------------------ timing


def interleaved(fns: dict[str, Callable[[], Any]], runs: int, sync: Callable[[Any], Any]
                ) -> dict[str, list[float]]:
  """Seconds of each fn, `runs` times, the fns alternating (A B A B ...), so that a burst of
  load from other jobs on a shared machine hits both sides alike."""
  times = {k: [] for k in fns}
  for _ in range(runs):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      sync(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def median(xs: list[float]) -> float:
  return float(statistics.median(xs))


def paired_ratio(ref: list[float], ours: list[float]) -> float:
  """Median over rounds of ref_time / our_time (each round's two runs ran back to back)."""
  return float(statistics.median(r / o for r, o in zip(ref, ours)))


def machine_info() -> dict[str, Any]:
  """CPU model, cores, load and library versions (for the results table)."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  info = {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
          "jax": jax.__version__, "torch": torch.__version__,
          "transformers": transformers.__version__, "jax_devices": str(jax.devices()),
          "torch_threads": torch.get_num_threads()}
  try:
    info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    info["gpu"] = None
  return info
