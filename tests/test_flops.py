"""FLOPs: analytic PaliGemma count vs XLA's cost analysis, the peak table and measurement, MFU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_vision_lite import flops
from big_vision_lite.models import paligemma

# Big enough that matmuls dominate XLA's count (it adds ~1 FLOP per elementwise output).
SMALL = {"img": dict(patch_size=(8, 8), width=128, depth=2, mlp_dim=512, num_heads=4,
                     image_size=32, head_zeroinit=False, scan=False),
         "llm": dict(vocab_size=1024, width=128, depth=2, mlp_dim=512, num_heads=4,
                     num_kv_heads=2, head_dim=32, scan=False)}


def _abstract_params(model, cfg, text_len, frames=None):
  res = cfg["img"].get("image_size", 224)
  shape = (1, res, res, 3) if frames is None else (1, frames, res, res, 3)
  text = jnp.zeros((1, text_len), jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), text, text)
  return jax.eval_shape(init)["params"]


def _lower(cfg, batch, text_len, *, grad=True, frames=None):
  """Lowers (no compile, no memory) grad of a next-token xent, as a train step computes it."""
  model = paligemma.Model(**cfg)
  res = cfg["img"].get("image_size", 224)
  params = _abstract_params(model, cfg, text_len, frames)
  shape = (batch, res, res, 3) if frames is None else (batch, frames, res, res, 3)
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  text = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)

  def loss(p, image, text):
    logits, _ = model.apply({"params": p}, image, text, jnp.ones_like(text))
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, text[..., None], axis=-1))

  fn = jax.grad(loss) if grad else loss
  return jax.jit(fn).lower(params, image, text)


def _hand_count(cfg, batch, text_len):
  """The forward matmul count written out term by term for SMALL (gemma: GQA, no fused qkv)."""
  n = (32 // 8) ** 2  # 16 patches
  w, m, d, f, v, hd = 128, 512, 128, 512, 1024, 32
  vit = (2 * n * 8 * 8 * 3 * w
         + 2 * (3 * 2 * n * w * w + 2 * 2 * n * n * w + 2 * n * w * w + 2 * 2 * n * w * m)
         + 2 * n * w * d)
  s = n + text_len
  layer = (2 * s * d * 4 * hd + 2 * s * d * 2 * 2 * hd  # q (4 heads) and k, v (2 kv heads)
           + 2 * 2 * s * s * 4 * hd + 2 * s * 4 * hd * d + 3 * 2 * s * d * f)
  return batch * (vit + 2 * layer + 2 * text_len * d * v)


def test_analytic_forward_equals_hand_count():
  assert flops.paligemma_forward_flops(SMALL, 3, 16) == _hand_count(SMALL, 3, 16)
  assert flops.paligemma_train_flops(SMALL, 3, 16) == 3 * _hand_count(SMALL, 3, 16)


def test_analytic_matches_xla_cost_analysis_small():
  # XLA counts elementwise ops too (norms, softmax, gelu, the xent): +1..4% at this size.
  fwd = flops.train_step_flops(_lower(SMALL, 2, 16, grad=False))
  assert fwd == pytest.approx(flops.paligemma_forward_flops(SMALL, 2, 16), rel=0.04)
  assert fwd > flops.paligemma_forward_flops(SMALL, 2, 16)
  train = flops.train_step_flops(_lower(SMALL, 2, 16))
  assert train == pytest.approx(flops.paligemma_train_flops(SMALL, 2, 16), rel=0.04)


def test_analytic_matches_xla_with_frames_and_other_image_size():
  cfg = {"img": {**SMALL["img"], "image_size": 48}, "llm": SMALL["llm"]}
  xla = flops.train_step_flops(_lower(cfg, 2, 8, frames=2))
  analytic = flops.paligemma_train_flops(SMALL, 2, 8, image_size=48, num_frames=2)
  assert xla == pytest.approx(analytic, rel=0.04)


def test_analytic_matches_xla_at_real_size():
  """PaliGemma 1 (So400m/14 + gemma_2b, MQA) at 224 px: matmuls are >99.8% of XLA's count."""
  cfg = {"img": {"variant": "So400m/14", "scan": False},
         "llm": {"variant": "gemma_2b", "scan": False}}
  xla = flops.train_step_flops(_lower(cfg, 1, 64))
  analytic = flops.paligemma_train_flops(cfg, 1, 64)
  assert xla == pytest.approx(analytic, rel=0.005)
  # Sanity vs the 6 * params * tokens rule (2.9B params; image tokens skip the logits).
  assert 4.0e12 < analytic < 5.5e12


def test_scanned_layers_are_not_trusted_from_xla(caplog):
  cfg = {"img": {**SMALL["img"], "scan": True}, "llm": {**SMALL["llm"], "scan": True}}
  lowered = _lower(cfg, 2, 16)
  # XLA counts a while body once: the raw number is far below the real count ...
  raw = lowered.cost_analysis()["flops"]
  assert raw < 0.7 * flops.paligemma_train_flops(cfg, 2, 16)
  # ... so train_step_flops refuses it.
  assert flops.train_step_flops(lowered) is None
  assert "while loop" in caplog.text
  # Same for a compiled loop (HLO text rather than StableHLO).
  scan = lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=3)[0]
  assert flops.train_step_flops(jax.jit(scan).lower(jnp.ones((8, 8))).compile()) is None


def test_compiled_sharded_program_gives_global_flops():
  mesh = jax.make_mesh((8,), ("data",))
  x = jax.ShapeDtypeStruct((64, 256), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
  lowered = jax.jit(lambda x, w: x @ w).lower(x, w)
  per_device = lowered.compile().cost_analysis()["flops"]
  assert per_device == 2 * 8 * 256 * 128  # One shard of 64 / 8 rows: XLA's compiled view.
  # (The unpartitioned HLO's count can be off by a couple of FLOPs in XLA's dot formula.)
  assert flops.train_step_flops(lowered) == pytest.approx(2 * 64 * 256 * 128, rel=1e-5)
  assert flops.train_step_flops(lowered.compile()) == 2 * 64 * 256 * 128


def test_train_step_flops_rejects_other_objects():
  with pytest.raises(TypeError, match="Lowered or Compiled"):
    flops.train_step_flops(jax.jit(lambda x: x))


def test_analytic_bad_arguments():
  with pytest.raises(ValueError, match="batch_size"):
    flops.paligemma_train_flops(SMALL, 0, 16)
  with pytest.raises(ValueError, match="unknown key"):
    flops.paligemma_train_flops({"img": SMALL["img"], "llm": {**SMALL["llm"], "widht": 3}}, 1, 4)


@pytest.mark.parametrize("kind,dtype,precision,expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", "highest", 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", "highest", 66.9e12),  # True f32: CUDA cores.
    ("NVIDIA H100 80GB HBM3", "float32", "default", 494.5e12),  # f32 matmuls run as TF32.
    ("NVIDIA H100 PCIe", "bfloat16", "highest", 756e12),
    ("NVIDIA H200", jnp.bfloat16, "highest", 989e12),
    ("NVIDIA A100-SXM4-80GB", "float16", "highest", 312e12),
    ("NVIDIA A100-SXM4-40GB", "float32", "tensorfloat32", 156e12),
    ("TPU v4", "bfloat16", "highest", 275e12),
    ("TPU v5 lite", "bfloat16", "highest", 197e12),
    ("TPU v5p", "bfloat16", "highest", 459e12),
    ("TPU v6 lite", "bfloat16", "highest", 918e12),
    ("TPU v4", "float32", "highest", 275e12 / 6),  # bf16_6x passes.
    ("TPU v4", "float32", "default", 275e12),  # One bf16 pass.
    ("NVIDIA L4", "bfloat16", "highest", 121e12),
    ("NVIDIA GH200 480GB", "bfloat16", "highest", 989e12),  # An H200-class GPU.
    ("NVIDIA L40S", "bfloat16", "highest", None),  # Not in the table, and not an L4.
    ("Quantum Abacus 9000", "bfloat16", "highest", None),
])
def test_peak_table(kind, dtype, precision, expected):
  with jax.default_matmul_precision(precision):
    got = flops.table_peak_flops(kind, dtype)
  assert got == (pytest.approx(expected) if expected else None)


def test_peak_table_bad_dtype():
  with pytest.raises(ValueError, match="dtype must be"):
    flops.table_peak_flops("TPU v4", "int8")
  with pytest.raises(ValueError, match="dtype must be.*'fp8-ish'"):
    flops.table_peak_flops("TPU v4", "fp8-ish")


def test_measured_cpu_peak_is_sane_and_cached():
  peak = flops.measure_peak_flops(jax.devices("cpu")[0], "float32", n=512, repeats=3)
  # Any CPU this runs on does between 0.1 GFLOP/s and 10 TFLOP/s of f32 matmul.
  assert 1e8 < peak < 1e13
  assert flops.measure_peak_flops(jax.devices("cpu")[0], "float32", n=512, repeats=3) == peak


def test_cpu_device_peak_is_host_peak_shared_by_fake_devices():
  host = flops.measure_peak_flops(jax.devices("cpu")[0], "float32")
  per_device = flops.device_peak_flops(jax.devices("cpu")[0], "float32")
  assert per_device == pytest.approx(host / len(jax.devices("cpu")))


def test_mfu():
  # 1e12 FLOPs in 0.5 s on 4 devices of 1e12 FLOP/s peak: 2e12 / 4e12.
  assert flops.mfu(1e12, 0.5, 4, 1e12) == pytest.approx(0.5)
  # Hand example: PaliGemma-3B-like 6 * 2.9e9 * 256 tokens * 256 examples on 8 H100s at 1.2 s.
  step = 6 * 2.9e9 * 256 * 256
  assert flops.mfu(step, 1.2, 8, 989e12) == pytest.approx(step / 1.2 / 8 / 989e12)
  with pytest.raises(ValueError, match="step_time_s"):
    flops.mfu(1e12, 0.0, 4, 1e12)
  with pytest.raises(ValueError, match="peak"):
    flops.mfu(1e12, 1.0, 4, float("nan"))
  assert isinstance(flops.mfu(np.float32(1e12), 1, 1, 2e12), float)
