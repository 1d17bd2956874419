"""End to end: loaded checkpoints reproduce the reference logits.

* the fixtures, loaded with checkpoints.load, through models/paligemma.py vs the logits its
  producer (big_vision or transformers) stored;
* big_vision weights exported with checkpoints.save(format="hf"), run by transformers'
  PaliGemmaForConditionalGeneration, vs big_vision's stored logits.
Tolerances: fixtures README (float32, atol = rtol = 1e-4 at valid positions). The other
files (non-scanned, float16, hub key names) load bit-identical weights (test_checkpoints*.py).
"""
import jax
import numpy as np
import pytest

from big_vision_lite import checkpoints
from big_vision_lite.models import paligemma

PG2_CAPS = {"query_pre_attn_norm": "rsqrt_emb_per_head", "attn_logits_softcap": 2.5,
            "final_logits_softcap": 5.0}


def softcap(x, cap):
  return np.tanh(x / cap) * cap


def forward(config, params, *args):
  # Jitted: one compile is several times faster than op-by-op dispatch here.
  return np.asarray(jax.jit(paligemma.Model(**config).apply)({"params": params}, *args)[0])


@pytest.mark.parametrize("fixture,fname,ref", [
    ("bv_paligemma1_tiny", "params.npz", "text_logits"),
    ("bv_paligemma1_tiny", "params_bf16.npz", "text_logits_bf16w"),
    ("bv_paligemma2_tiny", "params.npz", "text_logits")])
def test_big_vision_logits(fixtures_dir, fixture, fname, ref):
  overrides = {"llm": PG2_CAPS} if fixture == "bv_paligemma2_tiny" else {}
  config, params = checkpoints.load(fixtures_dir / fixture / fname, param_dtype="float32", **overrides)
  io = np.load(fixtures_dir / fixture / "io.npz")
  logits = forward(config, params, io["image"], io["text"], io["mask_ar"], io["mask_input"])
  want = io[ref]
  if fixture == "bv_paligemma2_tiny":  # big_vision's stored forward logits are uncapped
    want = softcap(want, 5.0)
  valid = io["mask_input"]
  np.testing.assert_allclose(logits[valid], want[valid], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("folder,n_img", [("hf_paligemma1_tiny", 4), ("hf_paligemma2_tiny", 9)])
def test_hf_logits(fixtures_dir, folder, n_img):
  config, params = checkpoints.load(fixtures_dir / folder)
  io = np.load(fixtures_dir / folder.split("/")[0] / "io.npz")
  valid = io["attention_mask"][:, n_img:].astype(bool)
  logits = forward(config, params, io["pixel_values"].transpose(0, 2, 3, 1),
                   io["input_ids"][:, n_img:], io["token_type_ids"][:, n_img:], valid)
  np.testing.assert_allclose(logits[valid], io["logits"][:, n_img:][valid],
                             atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fixture,n_img", [("bv_paligemma1_tiny", 9), ("bv_paligemma2_tiny", 4)])
def test_exported_hf_folder_runs_in_transformers(fixtures_dir, tmp_path, fixture, n_img):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  overrides = {"llm": PG2_CAPS} if fixture == "bv_paligemma2_tiny" else {}
  config, params = checkpoints.load(fixtures_dir / fixture / "params.npz", **overrides)
  checkpoints.save(tmp_path / "hf", config, params, format="hf")
  model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(
      str(tmp_path / "hf"), attn_implementation="eager").eval()
  io = np.load(fixtures_dir / fixture / "io.npz")
  text, valid = io["text"], io["mask_input"]
  b = text.shape[0]
  image_ids = np.full((b, n_img), 1408)  # the exported <image> token
  with torch.no_grad():
    out = model(
        input_ids=torch.from_numpy(np.concatenate([image_ids, text], 1)),
        pixel_values=torch.from_numpy(io["image"].transpose(0, 3, 1, 2).copy()),
        attention_mask=torch.from_numpy(np.concatenate([np.ones((b, n_img)), valid], 1).astype(np.int64)),
        token_type_ids=torch.from_numpy(np.concatenate([np.zeros((b, n_img)), io["mask_ar"] * valid], 1)
                                        .astype(np.int64)),
        use_cache=False)
  got = out.logits.numpy()[:, n_img:]
  assert got.shape[-1] == 1472 and np.all(got[..., 1408:][valid] == 0)  # zero rows
  want = io["text_logits"]
  if fixture == "bv_paligemma2_tiny":  # transformers caps every logit
    want = softcap(want, 5.0)
  np.testing.assert_allclose(got[..., :1408][valid], want[valid], atol=1e-4, rtol=1e-4)
