"""tools/demo_encoder.py: the demo's image-encoder pretraining (stage 0) and its shipped file."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite import checkpoints_config as cc
from big_vision_lite import model_init
from big_vision_lite import param_tree
from big_vision_lite.data import demo
from big_vision_lite.models import paligemma
from big_vision_lite.models import siglip
from big_vision_lite.tools import demo_encoder as enc
from configs import demo as demo_config

TINY_IMG = dict(patch_size=(8, 8), width=16, depth=1, mlp_dim=32, num_heads=2, image_size=32,
                head_zeroinit=False, scan=True)


def test_sincos_posemb_rows_then_columns():
  table = enc.sincos_posemb(4, 16, rms=3.0)[0]  # [16 positions, 16]
  assert table.shape == (16, 16) and table.dtype == np.float32
  np.testing.assert_allclose(np.sqrt(np.mean(table ** 2)), 3.0, rtol=1e-5)
  grid = table.reshape(4, 4, 16)
  # The first half depends on the row only, the second on the column only.
  np.testing.assert_allclose(grid[:, :, :8], np.broadcast_to(grid[:, :1, :8], (4, 4, 8)))
  np.testing.assert_allclose(grid[:, :, 8:], np.broadcast_to(grid[:1, :, 8:], (4, 4, 8)))
  assert len({tuple(np.round(r, 5)) for r in table}) == 16  # Every position distinct.
  with pytest.raises(ValueError, match="multiple of 4"):
    enc.sincos_posemb(4, 18)


def test_scene_targets_follow_the_objects_left_to_right():
  source = demo.DemoSource("val", image_size=64)
  for i in range(20):
    record = source[i]
    objects = record["objects"]
    t = enc.scene_targets(record)
    n = len(objects["label"])
    np.testing.assert_array_equal(t["present"], [1.0] * n + [0.0] * (enc.SLOTS - n))
    assert [demo.KINDS[k] for k in t["kind"][:n]] == list(objects["label"])
    assert [demo.COLOUR_NAMES[c] for c in t["colour"][:n]] == list(objects["colour"])
    # Bins of the normalised boxes: within half a bin of bbox * (BOX_BINS - 1).
    np.testing.assert_allclose(t["box"][:n], objects["bbox"] * (enc.BOX_BINS - 1), atol=0.5)


def test_box_loss_counts_near_misses_as_near():
  batch = {"present": np.array([[1.0, 0.0, 0.0]], np.float32),
           "kind": np.zeros((1, 3), np.int32), "colour": np.zeros((1, 3), np.int32),
           "box": np.array([[[20, 20, 40, 40]] + [[0, 0, 0, 0]] * 2], np.int32)}

  def box_loss(offset):
    logits = np.full((1, enc.SLOTS, 4, enc.BOX_BINS), -10.0, np.float32)
    for c, v in enumerate(batch["box"][0, 0]):
      logits[0, 0, c, v + offset] = 10.0
    pred = {"present": jnp.zeros((1, 3)), "kind": jnp.zeros((1, 3, 6)),
            "colour": jnp.zeros((1, 3, 6)), "box": jnp.asarray(logits)}
    return float(enc.losses(pred, batch)["box"])

  losses = [box_loss(d) for d in (0, 1, 3, 10)]
  assert losses == sorted(losses) and losses[0] < losses[-1] - 10, losses
  # Absent slots do not count: their (wrong) predictions change nothing.
  batch["box"][0, 1] = [63, 63, 63, 63]
  assert box_loss(0) == pytest.approx(losses[0])


def test_pretrain_saves_an_encoder_that_model_init_loads(tmp_path):
  img = dict(TINY_IMG, num_classes=24)
  params, metrics = enc.pretrain(img, steps=3, batch_size=4, val_examples=8, log=lambda _: None)
  assert set(metrics) == {"presence_accuracy", "kind_accuracy", "colour_accuracy",
                          "box_error_pixels"}
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  with pytest.raises(ValueError, match="steps must be >= 1"):
    enc.pretrain(img, steps=0)
  path = str(tmp_path / "enc.npz")
  enc.save(path, params)
  with pytest.raises(ValueError, match="only the image tower"):
    checkpoints.load(path)

  model_config = dict(img=dict(TINY_IMG), llm=dict(vocab_size=64, width=24, depth=1, mlp_dim=32,
                                                   num_heads=2, num_kv_heads=1, head_dim=8))
  model = paligemma.Model(**model_config)
  image = jnp.zeros((1, 32, 32, 3))
  text = jnp.zeros((1, 4), jnp.int32)
  init_fn = lambda r: model.init(r, image, text, text, text > -1)["params"]
  loaded, report = model_init.init_params(model_config, init_fn, model_init=path,
                                          load={"only": "img"}, rng=jax.random.PRNGKey(1))
  want = param_tree.flatten(jax.device_get(params))
  got = param_tree.flatten(jax.device_get(loaded))
  assert sorted(n for n in got if n.startswith("img/")) == sorted(want)
  for name, value in want.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert all(n.startswith("llm/") for n in report.fresh) and report.fresh
  # Loading the LLM from an encoder-only file is an error that names the missing param.
  with pytest.raises(ValueError, match="llm/.* is missing from the checkpoint"):
    model_init.init_params(model_config, init_fn, model_init=path, load={"only": "llm"},
                           rng=jax.random.PRNGKey(1))


def test_the_shipped_encoder_fits_the_demo_config():
  reader = checkpoints.open_checkpoint(demo.DEMO_ENCODER)
  try:
    assert reader.config is None
    cfg = demo_config.get_config("mode=smoke")
    assert cfg.model_init == demo.DEMO_ENCODER and cfg.model_load.only == "img"
    img = dict(cfg.model.img)
    llm_width = cfg.model.llm.width
    expected = cc.param_shapes({"img": img, "llm": dict(cfg.model.llm)})
    for name, (shape, dtype) in reader.shapes.items():
      assert expected[name] == shape, (name, shape, expected[name])
      assert dtype == np.float32, name
    assert reader.shapes["img/head/kernel"][0][-1] == llm_width
    assert sorted(reader.shapes) == sorted(n for n in expected if n.startswith("img/"))
  finally:
    reader.close()


def test_demo_config_encoder_choices():
  assert demo_config.get_config("mode=smoke,encoder=scratch").model_init is None
  assert demo_config.get_config("mode=smoke,res=32").model_init == demo.DEMO_ENCODER
  with pytest.raises(ValueError, match="has patch 16, not 8.*encoder=scratch"):
    demo_config.get_config("mode=smoke,patch=8")
  with pytest.raises(ValueError, match="encoder must be"):
    demo_config.get_config("encoder=siglip")


def _pooled_position_r2(vit, img_params) -> float:
  """R^2 of a ridge fit (fit on 384 val scenes, scored on 128 more) from the mean image token
  to the first object's box centre (y, x): how much position a pooled readout can see."""
  batch = next(enc.batches("val", 64, 512))
  tokens, _ = jax.jit(vit.apply)({"params": img_params}, jnp.asarray(batch["image"]))
  x = np.asarray(tokens).mean(axis=1)
  x = np.concatenate([(x - x[:384].mean(0)) / (x[:384].std(0) + 1e-6), np.ones((512, 1))], 1)
  box = batch["box"][:, 0].astype(np.float64)
  y = np.stack([box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]], axis=1) / 2
  w = np.linalg.solve(x[:384].T @ x[:384] + 10.0 * np.eye(x.shape[1]), x[:384].T @ y[:384])
  err = ((x[384:] @ w - y[384:]) ** 2).mean(0)
  return float(np.mean(1.0 - err / y[384:].var(0)))


def test_the_shipped_encoder_pools_to_positions():
  """What the stage 0 is for: the mean of the shipped encoder's tokens tells where the first
  object is (a linear fit); the same tower freshly initialised does not. Measured: R^2 0.96
  vs -0.005."""
  reader = checkpoints.open_checkpoint(demo.DEMO_ENCODER)
  try:
    flat = {name: reader.read(name) for name in reader.shapes}
  finally:
    reader.close()
  shipped = param_tree.unflatten(flat)["img"]
  vit = siglip.ViT(**demo_config.image_tower(), num_classes=demo_config.LLM_WIDTH)
  fresh = vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))["params"]
  r2_shipped, r2_fresh = _pooled_position_r2(vit, shipped), _pooled_position_r2(vit, fresh)
  assert r2_shipped > 0.8 and r2_fresh < 0.3, (r2_shipped, r2_fresh)
