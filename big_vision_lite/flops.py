"""Model FLOPs per train step, accelerator peaks and MFU.

MFU (model FLOPs utilisation), as in PaLM (Chowdhery et al. 2022, appendix B):

    mfu = step_flops / (step_time_s * num_devices * peak_flops_per_device)

with `step_flops` the *model* FLOPs of one optimizer step over the global batch (all devices),
`peak_flops_per_device` the dense matmul peak of one chip for the compute dtype, and
`num_devices` the chips that ran the step. Model FLOPs do not count rematerialisation (that
would be "hardware FLOPs utilisation"), elementwise ops or the optimizer update.

Two ways to get `step_flops`:
  * `paligemma_train_flops(model_config, batch_size, text_len)`: analytic, 3 x the forward
    matmul FLOPs (the backward pass costs two matmuls per forward one: activation and weight
    gradients). Always available; the trainer should prefer it.
  * `train_step_flops(lowered_or_compiled)`: XLA's HloCostAnalysis "flops". It counts
    2*m*n*k per dot/convolution plus ~1 FLOP per output element of elementwise ops and
    reductions (transcendentals are counted separately, not in "flops"), so it reads a few
    percent above the analytic count; it runs no code. Two traps, handled here:
      - a `while` loop's body is counted ONCE, whatever its trip count: with `scan=True`
        layers (the default) or scanned gradient accumulation, XLA undercounts by ~depth.
        `train_step_flops` then returns None;
      - a Compiled SPMD executable reports the FLOPs of ONE device's partitioned program; a
        Lowered one the global (unpartitioned) program. `train_step_flops` returns the global
        count for both (per-device x devices for Compiled, so replicated work counts per copy).
"""
from collections.abc import Mapping
import functools
import logging
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no structured sparsity) peak matmul FLOP/s of ONE chip, by compute dtype.
# "tf32" is what a float32 matmul runs at on NVIDIA tensor cores with XLA's default precision.
# Sources: Google Cloud TPU system-architecture pages (v4, v5e, v5p, v6e: bf16 per chip);
# NVIDIA data sheets (A100: 312 bf16 / 156 tf32 / 19.5 fp32; H100 SXM: 989 bf16 / 495 tf32 /
# 67 fp32; H100 PCIe: 756 / 378 / 51; H100 NVL and H200 NVL: 835 / 418 / 60; H200 SXM = H100
# SXM compute, as is GH200's GPU; L4: 121 / 60 / 30.3; V100 SXM2: 125 fp16 tensor / 15.7 fp32,
# no bf16 or tf32).
# The data sheets print sparse numbers (2x) for tensor cores: the dense halves are used here.
# TPUs have no float32 MXU mode: a float32 matmul runs as 1 (default), 3 ("high") or 6
# ("highest" precision) bf16 passes, see `table_peak_flops`.
_PEAKS: dict[str, dict[str, float]] = {
    "tpu v4": {"bfloat16": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12},  # v5e
    "tpu v5e": {"bfloat16": 197e12},
    "tpu v5p": {"bfloat16": 459e12},
    "tpu v5": {"bfloat16": 459e12},  # v5p reports device_kind "TPU v5".
    "tpu v6 lite": {"bfloat16": 918e12},  # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918e12},
    "h100 pcie": {"bfloat16": 756e12, "tf32": 378e12, "float32": 51.2e12},
    "h100 nvl": {"bfloat16": 835e12, "tf32": 417.5e12, "float32": 60e12},
    "h100": {"bfloat16": 989e12, "tf32": 494.5e12, "float32": 66.9e12},  # SXM
    "h200 nvl": {"bfloat16": 835e12, "tf32": 417.5e12, "float32": 60e12},
    "h200": {"bfloat16": 989e12, "tf32": 494.5e12, "float32": 66.9e12},  # SXM
    "gh200": {"bfloat16": 989e12, "tf32": 494.5e12, "float32": 66.9e12},  # Its H100/H200 GPU.
    "a100": {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12},
    "l4": {"bfloat16": 121e12, "tf32": 60e12, "float32": 30.3e12},
    "v100": {"float16": 125e12, "float32": 15.7e12},
}
# Most specific first, so that "h100 pcie" wins over "h100".
_PEAK_KEYS = sorted(_PEAKS, key=len, reverse=True)


# ---------------------------------------------------------------------------------- analytic

def _vit_forward_flops(img: Mapping[str, Any], llm_width: int) -> tuple[int, int]:
  """(matmul FLOPs of one image through the ViT + projector, image tokens per image)."""
  ph, pw = img["patch_size"]
  n = (img["image_size"] // ph) * (img["image_size"] // pw)
  w, m, depth = img["width"], img["mlp_dim"], img["depth"]
  patch_embed = 2 * n * (ph * pw * 3) * w  # The stride-P conv is a [N, P*P*3] x [P*P*3, W] matmul.
  per_layer = (2 * n * w * 3 * w  # q, k, v projections (heads * head_dim == width).
               + 2 * n * n * w  # scores q.k over all heads.
               + 2 * n * n * w  # probs . v
               + 2 * n * w * w  # output projection
               + 2 * 2 * n * w * m)  # MLP in and out
  projector = 2 * n * w * llm_width
  return patch_embed + depth * per_layer + projector, n


def _llm_forward_flops(llm: Mapping[str, Any], seq: int, text_len: int) -> int:
  """Matmul FLOPs of one sequence of `seq` (= image tokens + text) through Gemma + logits."""
  d, f, h = llm["width"], llm["mlp_dim"], llm["head_dim"]
  nq, nkv = llm["num_heads"], llm["num_kv_heads"]
  per_layer = (2 * seq * d * (nq + 2 * nkv) * h  # q, k, v projections (MQA/GQA: fewer kv heads).
               # Scores and probs . v over the full [seq, seq] block: the prefix-LM / causal /
               # sliding-window masks are applied to a dense product, which is what runs.
               + 2 * 2 * seq * seq * nq * h
               + 2 * seq * nq * h * d  # attn_vec_einsum
               + 2 * 3 * seq * d * f)  # GeGLU: gate, up, down
  # The tied embedding table gives logits for text positions only (image positions are cut
  # off before the logits); the input embedding is a gather, not a matmul.
  logits = 2 * text_len * d * llm["vocab_size"]
  return llm["depth"] * per_layer + logits


def paligemma_forward_flops(model_config: Mapping[str, Any], batch_size: int, text_len: int,
                            image_size: int | None = None, num_frames: int = 1) -> int:
  """Matmul FLOPs (2*m*n*k each) of one teacher-forced forward pass over a batch.

  Args:
    model_config: {"img": ..., "llm": ...} as `models.paligemma.Model` takes it.
    batch_size: examples (the global batch for MFU).
    text_len: T, the text length of the batch (prefix + suffix + padding).
    image_size: pixels per side; None: model_config's img.image_size.
    num_frames: images per example (their tokens are concatenated).
  """
  from big_vision_lite.models import paligemma  # pylint: disable=g-import-not-at-top
  for name, v in (("batch_size", batch_size), ("text_len", text_len), ("num_frames", num_frames)):
    if not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"paligemma_forward_flops: {name} must be a positive int, got {v!r}")
  cfg = paligemma.resolve_config(model_config)
  img = dict(cfg["img"])
  if image_size is not None:
    img["image_size"] = int(image_size)
  vit, n_img = _vit_forward_flops(img, cfg["llm"]["width"])
  seq = num_frames * n_img + text_len
  per_example = num_frames * vit + _llm_forward_flops(cfg["llm"], seq, text_len)
  return int(batch_size) * per_example


def paligemma_train_flops(model_config: Mapping[str, Any], batch_size: int, text_len: int,
                          image_size: int | None = None, num_frames: int = 1) -> int:
  """Model FLOPs of one train step: 3 x `paligemma_forward_flops` (forward + backward).

  Convention (PaLM's MFU): every matmul's backward costs twice its forward, even where a
  gradient is not needed (frozen towers, the patch embedding's input gradient), and
  rematerialised forwards are not counted.
  """
  return 3 * paligemma_forward_flops(model_config, batch_size, text_len, image_size, num_frames)


# --------------------------------------------------------------------------------- from XLA

def _cost_flops(cost: Any) -> float | None:
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per computation.
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  flops = float(cost["flops"])
  return flops if flops > 0 else None


def train_step_flops(lowered_or_compiled: Any) -> float | None:
  """Global FLOPs of one call of a jitted step, from XLA's cost analysis.

  Args:
    lowered_or_compiled: `jax.jit(step).lower(*args)` or its `.compile()`. Lowering alone
      is enough (and cheap: it can use jax.ShapeDtypeStruct arguments).
  Returns:
    FLOPs of the whole program over all devices, or None when XLA gives no count or the
    program has a `while` loop (scan, fori_loop), whose body XLA counts only once.
  """
  if not hasattr(lowered_or_compiled, "cost_analysis"):
    raise TypeError("train_step_flops expects a jax.stages.Lowered or Compiled, got "
                    f"{type(lowered_or_compiled).__name__}")
  is_compiled = isinstance(lowered_or_compiled, jax.stages.Compiled)
  try:
    text = lowered_or_compiled.as_text()
    flops = _cost_flops(lowered_or_compiled.cost_analysis())
  except Exception as e:  # pylint: disable=broad-except  # Backends may not implement it.
    logging.warning("train_step_flops: XLA cost analysis unavailable (%s)", e)
    return None
  if text is not None and ("stablehlo.while" in text or " while(" in text):
    logging.warning("train_step_flops: the step has a while loop (scan) whose FLOPs XLA counts "
                    "once; use the analytic count (paligemma_train_flops) instead")
    return None
  if flops is None:
    return None
  if is_compiled:  # Per-device partitioned program -> all devices.
    flops *= _num_devices(lowered_or_compiled)
  return flops


def _num_devices(compiled: Any) -> int:
  shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
  return max([s.num_devices for s in shardings if hasattr(s, "num_devices")], default=1)


# ------------------------------------------------------------------------------------ peaks

def _canonical_dtype(dtype: Any) -> str:
  try:
    name = "tf32" if isinstance(dtype, str) and dtype == "tf32" else str(jnp.dtype(dtype))
  except TypeError:
    name = None
  if name not in ("float32", "bfloat16", "float16", "tf32"):
    raise ValueError(f"peak FLOPs: dtype must be float32, bfloat16 or float16, got {dtype!r}")
  return name


def _precision() -> str:
  """jax_default_matmul_precision as "highest" (true f32), "high" (tf32 / 3 bf16 passes) or
  "default"."""
  p = str(jax.config.jax_default_matmul_precision or "default").lower()
  if p in ("highest", "float32", "f32_f32_f32", "bf16_bf16_f32_x6"):
    return "highest"
  if p in ("high", "tensorfloat32", "tf32_tf32_f32", "bf16_bf16_f32_x3"):
    return "high"
  return "default"


def table_peak_flops(device_kind: str, dtype: Any = "float32") -> float | None:
  """Per-chip dense peak FLOP/s from the table above; None for an unknown device kind.

  float32: on NVIDIA GPUs the TF32 tensor-core peak unless jax_default_matmul_precision is
  "highest" (then the CUDA-core fp32 peak); on TPUs the bf16 peak / number of bf16 passes.
  """
  dtype = _canonical_dtype(dtype)
  kind = device_kind.lower()
  # Whole words only: "l4" must not match an L40S.
  key = next((k for k in _PEAK_KEYS if re.search(rf"\b{re.escape(k)}\b", kind)), None)
  if key is None:
    return None
  peaks = _PEAKS[key]
  if key.startswith("tpu"):
    bf16 = peaks["bfloat16"]
    passes = {"highest": 6, "high": 3, "default": 1}[_precision()]
    return bf16 / passes if dtype in ("float32", "tf32") else bf16
  if dtype == "float32" and _precision() != "highest":
    dtype = "tf32" if "tf32" in peaks else "float32"
  if dtype in ("bfloat16", "float16"):
    return peaks.get(dtype) or peaks.get("bfloat16") or peaks.get("float16")
  return peaks.get(dtype)


@functools.lru_cache(maxsize=None)
def _measured_peak(platform: str, device_id: int, dtype: str, n: int, repeats: int) -> float:
  device = next(d for d in jax.devices(platform) if d.id == device_id)
  x = jax.device_put(jnp.asarray(np.random.RandomState(0).randn(n, n), dtype), device)
  # A chain of matmuls per call, so that dispatch overhead does not hide the matmul time.
  chain = 4

  @jax.jit
  def f(a):
    for _ in range(chain):
      # 1/sqrt(n) keeps entries ~N(0, 1): no overflow, no slow denormals; the mul is ~free.
      a = (a @ a) * jnp.asarray(n ** -0.5, a.dtype)
    return a

  jax.block_until_ready(f(x))  # Compile + warm up.
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    best = min(best, time.perf_counter() - t0)
  return chain * 2 * n ** 3 / best


def measure_peak_flops(device: Any = None, dtype: Any = "float32", *, n: int = 1024,
                       repeats: int = 5) -> float:
  """Measured matmul FLOP/s of one device: best of `repeats` timed [n,n] @ [n,n] chains.

  Cached per (device, dtype, n, repeats) for the life of the process. Uses the current
  jax_default_matmul_precision.
  """
  device = device or jax.local_devices()[0]
  return _measured_peak(device.platform, device.id, _canonical_dtype(dtype), n, repeats)


def device_peak_flops(device: Any = None, dtype: Any = "float32") -> float:
  """Peak matmul FLOP/s of ONE device, for `mfu(..., num_devices, peak)`.

  Known accelerators: the data-sheet table. CPU: the measured host peak divided by the
  number of local CPU devices, because fake devices (xla_force_host_platform_device_count)
  share the host's cores: num_devices * peak is then the host's peak, as for real chips.
  Unknown accelerators: measured, with a warning.
  """
  device = device or jax.local_devices()[0]
  if device.platform == "cpu":
    return measure_peak_flops(device, dtype) / len(jax.local_devices(backend="cpu"))
  peak = table_peak_flops(device.device_kind, dtype)
  if peak is None:
    logging.warning("device_peak_flops: %r (%s) is not in the table: using a measured matmul "
                    "peak, MFU will read high", device.device_kind, _canonical_dtype(dtype))
    peak = measure_peak_flops(device, dtype, n=4096)
  return peak


def mfu(step_flops: float, step_time_s: float, num_devices: int, peak: float) -> float:
  """Model FLOPs utilisation in [0, 1]: step_flops / (step_time_s * num_devices * peak).

  Args:
    step_flops: model FLOPs of one step over the global batch (all devices).
    step_time_s: wall-clock seconds per step.
    num_devices: devices that ran the step.
    peak: peak FLOP/s of one device (`device_peak_flops`).
  """
  for name, v in (("step_flops", step_flops), ("step_time_s", step_time_s),
                  ("num_devices", num_devices), ("peak", peak)):
    if not isinstance(v, (int, float, np.number)) or not v > 0 or not math.isfinite(v):
      raise ValueError(f"mfu: {name} must be a positive finite number, got {v!r}")
  return float(step_flops) / (float(step_time_s) * int(num_devices) * float(peak))
