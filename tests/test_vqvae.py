"""models/vqvae.py against big_vision's mask decoder/encoder outputs (fixtures/bv_vqvae)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from big_vision_lite.models import vqvae

# A non-official shape (the demo size of configs/vqvae_masks.py + odd kernels) to check
# that every shape comes from the weights.
SMALL = vqvae.VQVAEConfig(code_dim=24, enc_channels=(8, 16, 16, 24), enc_kernels=(4, 4, 3, 3),
                          enc_res_hidden=12, enc_res_kernels=(3, 1, 1), dec_width=16,
                          dec_res_hidden=8, dec_channels=(16, 8, 8, 4), dec_kernels=(4, 2, 4, 4))


@pytest.fixture(scope="module")
def official(fixtures_dir):
  return vqvae.load(fixtures_dir / "bv_vqvae" / "params.npz")


@pytest.fixture(scope="module")
def io(fixtures_dir):
  with np.load(fixtures_dir / "bv_vqvae" / "io.npz") as f:
    return dict(f)


def test_official_config_from_file(official):
  config, params = official
  assert config == vqvae.VQVAEConfig()  # The defaults are vae-oid.npz's shapes.
  assert params["codebook"].shape == (128, 512)
  assert params["decoder"]["ConvTranspose_1"]["kernel"].shape == (4, 4, 64, 128)


def test_decode_matches_big_vision(official, io):
  _, params = official
  np.testing.assert_allclose(vqvae.decode(params, io["codes"]), io["masks"], atol=1e-4, rtol=0)


def test_encode_matches_big_vision(official, io):
  _, params = official
  feats = vqvae.encode_features(params, io["input_masks"])
  np.testing.assert_allclose(feats, io["encoder_output"], atol=1e-4, rtol=1e-5)
  codes = np.asarray(vqvae.encode(params, io["input_masks"]))
  assert codes.dtype == np.int32
  np.testing.assert_array_equal(codes, io["encoded_codes"])
  np.testing.assert_allclose(vqvae.decode(params, codes), io["roundtrip_masks"], atol=1e-4, rtol=0)


def test_official_conversion_is_big_vision_transpose(fixtures_dir, official):
  _, params = official
  with np.load(fixtures_dir / "bv_vqvae" / "params.npz") as f:
    w = f["decoder.6.weight"]  # ConvTranspose2d [in, out, kh, kw].
    np.testing.assert_array_equal(params["decoder"]["ConvTranspose_1"]["kernel"],
                                  np.transpose(w, (2, 3, 1, 0)))
    np.testing.assert_array_equal(params["encoder"]["ResBlock_1"]["Conv_2"]["bias"],
                                  f["encoder.9.net.4.bias"])
    np.testing.assert_array_equal(params["encoder"]["Conv_4"]["kernel"],
                                  np.transpose(f["encoder.10.weight"], (2, 3, 1, 0)))


@pytest.mark.parametrize("k", [2, 4, 6])
def test_upconv_equals_flax_conv_transpose(k):
  rng = np.random.default_rng(k)
  x = jnp.asarray(rng.normal(size=(2, 5, 6, 3)), jnp.float32)
  p = {"params": {"kernel": rng.normal(size=(k, k, 7, 3)).astype(np.float32),
                  "bias": rng.normal(size=(7,)).astype(np.float32)}}
  up = vqvae.UpConv(7, k)
  ref = nn.ConvTranspose(7, (k, k), strides=(2, 2), padding=k // 2, transpose_kernel=True)
  out = up.apply(p, x)
  assert out.shape == (2, 10, 12, 7)
  np.testing.assert_allclose(out, ref.apply(p, x), atol=1e-5, rtol=1e-5)


def test_save_load_roundtrip_official(tmp_path, official, io):
  config, params = official
  vqvae.save(tmp_path / "ours.npz", config, params)
  with np.load(tmp_path / "ours.npz") as f:
    assert "codebook" in f.files and "decoder/ConvTranspose_3/kernel" in f.files
  config2, params2 = vqvae.load(tmp_path / "ours.npz")
  assert config2 == config
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  np.testing.assert_allclose(vqvae.decode(params2, io["codes"]), io["masks"], atol=1e-4, rtol=0)


def test_small_config_roundtrip(tmp_path):
  params = vqvae.init_params(SMALL, seed=0)
  vqvae.save(tmp_path / "small.npz", SMALL, params)
  config, loaded = vqvae.load(tmp_path / "small.npz")
  assert config == SMALL
  masks = (np.random.default_rng(0).random((3, 64, 64, 1)) > 0.5).astype(np.float32)
  codes = vqvae.encode(loaded, masks)
  assert codes.shape == (3, 16) and 0 <= int(codes.min()) and int(codes.max()) < 128
  # Codes are the nearest codebook entries of the encoder output (checked in float64).
  feats = np.asarray(vqvae.encode_features(loaded, masks), np.float64).reshape(-1, 24)
  cb = np.asarray(loaded["codebook"], np.float64)
  d = ((feats[:, None, :] - cb[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(codes).reshape(-1), d.argmin(1))
  logits = vqvae.decode(loaded, codes)
  assert logits.shape == (3, 64, 64, 1) and logits.dtype == jnp.float32
  model = vqvae.VQVAE(SMALL)
  z = np.asarray(loaded["codebook"])[np.asarray(codes)].reshape(3, 4, 4, 24)
  ref = jax.jit(lambda p, z: model.apply({"params": p}, z, method=vqvae.VQVAE.decode_latents))(
      params, z)
  np.testing.assert_allclose(logits, ref, atol=1e-5)


def test_load_errors(tmp_path, fixtures_dir):
  with pytest.raises(FileNotFoundError, match="not found"):
    vqvae.load(tmp_path / "nope.npz")
  (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
  with pytest.raises(ValueError, match="junk.npz.*not a readable"):
    vqvae.load(tmp_path / "junk.npz")
  np.savez(tmp_path / "other.npz", foo=np.zeros(3))
  with pytest.raises(ValueError, match="neither the official layout"):
    vqvae.load(tmp_path / "other.npz")
  np.savez(tmp_path / "pickled.npz", codebook=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="pickled.npz"):
    vqvae.load(tmp_path / "pickled.npz")
  with np.load(fixtures_dir / "bv_vqvae" / "params.npz") as f:
    sd = dict(f)
  missing = {k: v for k, v in sd.items() if k != "decoder.8.bias"}
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match="lacks key 'decoder.8.bias'"):
    vqvae.load(tmp_path / "missing.npz")
  bad = dict(sd, **{"encoder.9.net.2.bias": np.zeros(7, np.float32)})
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError, match=r"encoder/ResBlock_1/Conv_1/bias: shape \(7,\)"):
    vqvae.load(tmp_path / "bad.npz")
  # Our layout is strict about extra keys too.
  params = vqvae.init_params(SMALL, seed=0)
  vqvae.save(tmp_path / "ours.npz", SMALL, params)
  with np.load(tmp_path / "ours.npz") as f:
    flat = dict(f, **{"decoder/extra/kernel": np.zeros(2, np.float32)})
  np.savez(tmp_path / "extra.npz", **flat)
  with pytest.raises(ValueError, match="unexpected decoder/extra/kernel"):
    vqvae.load(tmp_path / "extra.npz")
  with pytest.raises(ValueError, match="do not fit"):
    vqvae.save(tmp_path / "x.npz", vqvae.VQVAEConfig(), params)


def test_encode_decode_input_errors(official):
  _, params = official
  with pytest.raises(ValueError, match=r"codes must be int\[B,16\]"):
    vqvae.decode(params, np.zeros((2, 15), np.int32))
  with pytest.raises(ValueError, match=r"integers in \[0, 128\)"):
    vqvae.decode(params, np.full((1, 16), 128))
  with pytest.raises(ValueError, match=r"masks must be float\[B,64,64,1\]"):
    vqvae.encode(params, np.zeros((1, 32, 32, 1)))


def test_resize_antialias_hand_computed():
  # 4 -> 2: triangle of half-width 2 centred at 0.5 and 2.5 -> weights (.75, .75, .25, 0)/1.75.
  out = vqvae.resize_bilinear_antialias(np.array([[0, 0, 1, 1]] * 2, np.float32), (2, 2))
  np.testing.assert_allclose(out, [[1 / 7, 6 / 7]] * 2, atol=1e-7)
  # Upsampling is plain bilinear with half-pixel centres: 2 -> 4 gives 0, .25, .75, 1.
  out = vqvae.resize_bilinear_antialias(np.array([[0, 1]], np.float32), (1, 4))
  np.testing.assert_allclose(out, [[0, 0.25, 0.75, 1]], atol=1e-7)


@pytest.mark.parametrize("hw", [(17, 130), (200, 31), (64, 64), (3, 5)])
def test_resize_matches_jax_image_resize(hw):
  # jax.image.resize(antialias=True) implements tf.image.resize(antialias=True), which
  # big_vision's refcoco_mask2str uses.
  x = (np.random.default_rng(hw[0]).random(hw) > 0.5).astype(np.float32)
  ref = jax.image.resize(jnp.asarray(x), (64, 64), "bilinear", antialias=True)
  np.testing.assert_allclose(vqvae.resize_bilinear_antialias(x, (64, 64)), ref, atol=1e-6)


def test_crop_mask_to_box():
  mask = np.zeros((50, 80), bool)
  mask[10:30, 20:60] = True  # The box holds only ones.
  np.testing.assert_allclose(vqvae.crop_mask_to_box(mask, (10, 20, 30, 60)), 1.0)
  assert vqvae.tight_box(mask) == (10, 20, 30, 60)
  assert vqvae.tight_box(np.zeros((3, 3))) is None
  mask[10:30, 40:60] = False  # Left half of a 20x40 box: 0/1 edge between columns 31/32.
  crop = vqvae.crop_mask_to_box(mask, (10, 20, 30, 60))
  assert crop.shape == (64, 64, 1) and crop.dtype == np.float32
  ref = jax.image.resize(jnp.asarray(mask[10:30, 20:60], jnp.float32), (64, 64), "bilinear",
                         antialias=True)
  np.testing.assert_allclose(crop[..., 0], ref, atol=1e-6)
  np.testing.assert_allclose(crop[0, :31, 0], 1.0)
  np.testing.assert_allclose(crop[0, 33:, 0], 0.0)
  with pytest.raises(ValueError, match="empty"):
    vqvae.crop_mask_to_box(mask, (10, 20, 10, 60))


def test_mask_in_box():
  logits = np.where(np.arange(64)[None, :] < 32, 1.0, -1.0) * np.ones((64, 1))
  out = vqvae.mask_in_box(logits.astype(np.float32), (10, 20, 30, 60), (50, 80))
  assert out.shape == (50, 80) and out.dtype == bool
  want = np.zeros((50, 80), bool)
  want[10:30, 20:40] = True  # Left half of the 40-wide box.
  np.testing.assert_array_equal(out, want)
  # big_vision's evaluator: PIL bilinear resize of the float mask to the box, > 0.
  rng = np.random.default_rng(0)
  m = rng.normal(size=(64, 64)).astype(np.float32)
  ref = np.asarray(PIL.Image.fromarray(m).resize((33, 17), PIL.Image.BILINEAR)) > 0
  out = vqvae.mask_in_box(m[..., None], (5, 7, 22, 40), (30, 45))
  np.testing.assert_array_equal(out[5:22, 7:40], ref)
  assert not out[:5].any() and not out[22:].any() and not out[:, 40:].any()
  # A box past the image border is cut off, not shifted.
  out = vqvae.mask_in_box(m, (20, 30, 37, 63), (30, 45))
  np.testing.assert_array_equal(out[20:30, 30:45], ref[:10, :15])
  assert not vqvae.mask_in_box(m, (5, 5, 5, 9), (10, 10)).any()
  with pytest.raises(ValueError, match=r"mask must be float\[64,64\]"):
    vqvae.mask_in_box(np.zeros((32, 32)), (0, 0, 4, 4), (8, 8))
