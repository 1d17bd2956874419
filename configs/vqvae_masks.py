"""Trains our own mask VQ-VAE (big_vision_lite/vqvae_train.py).

  python -m big_vision_lite.vqvae_train --config configs/vqvae_masks.py --workdir /tmp/vq
  python -m big_vision_lite.vqvae_train --config configs/vqvae_masks.py:size=official \\
      --config.data.source=folder --config.data.folder=/data/masks --workdir /tmp/vq

arg: comma-separated key=value: size = demo (default; a few CPU minutes reach a
reconstruction IoU >= 0.8 on synthetic shapes) | official (the widths of vae-oid.npz) |
tiny (tests); steps = total training steps.
Whatever the size, 128 codes on a 4x4 grid keep the 16 <seg> tokens of PaliGemma.
"""
import ml_collections

_SIZES = {
    # The official checkpoint's shapes (decoder fixed by big_vision; encoder mirrors it).
    "official": dict(code_dim=512, enc_channels=(16, 32, 64, 128), enc_res_hidden=128,
                     dec_width=128, dec_res_hidden=128, dec_channels=(128, 64, 32, 16)),
    "demo": dict(code_dim=64, enc_channels=(16, 32, 32, 64), enc_res_hidden=64,
                 dec_width=64, dec_res_hidden=64, dec_channels=(64, 32, 16, 16)),
    "tiny": dict(code_dim=32, enc_channels=(8, 16, 16, 32), enc_res_hidden=32,
                 dec_width=32, dec_res_hidden=32, dec_channels=(32, 16, 16, 8)),
}
_STEPS = {"official": 20_000, "demo": 800, "tiny": 100}


def _parse_arg(arg):
  out = {"size": "demo", "steps": None}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in out:
      raise ValueError(f"configs/vqvae_masks.py: bad arg item {item!r}; expected key=value "
                       f"with key in {sorted(out)}")
    out[key] = value
  if out["size"] not in _SIZES:
    raise ValueError(f"configs/vqvae_masks.py: size must be one of {sorted(_SIZES)}, "
                     f"got {out['size']!r}")
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = _parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = int(a["steps"]) if a["steps"] else _STEPS[a["size"]]
  c.batch_size = 64

  # Fields of big_vision_lite.models.vqvae.VQVAEConfig.
  c.model = ml_collections.ConfigDict(dict(
      num_codes=128, enc_kernels=(4, 4, 4, 4), enc_res_kernels=(3, 3, 1), enc_out_kernel=1,
      dec_in_kernel=1, dec_res_kernels=(3, 3, 1), dec_kernels=(4, 4, 4, 4), dec_out_kernel=1,
      **_SIZES[a["size"]]))

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.end_lr_frac = 0.05  # Cosine decay to lr * end_lr_frac.
  c.optim.b2 = 0.99
  c.optim.grad_clip_norm = 1.0

  c.loss = ml_collections.ConfigDict()
  c.loss.codebook_weight = 1.0  # |sg(z_e) - e|^2 pulls the codes to the encoder outputs.
  c.loss.commitment_weight = 0.25  # beta |z_e - sg(e)|^2 (van den Oord et al.).

  # Codes unused during the last `every` steps get a random encoder output of the current
  # batch (step 0 re-seeds all of them: a data-dependent init), until step `until`.
  c.reseed = ml_collections.ConfigDict()
  c.reseed.every = 50
  c.reseed.until_frac = 0.8  # Of total_steps: the codebook settles for the rest.
  c.reseed.min_count = 1  # A code used fewer times in the window counts as dead.

  # Masks: "synthetic" (built-in random shapes) or "folder" (binary mask PNGs, searched
  # recursively). vqvae_train.train(..., masks=...) overrides both with any generator.
  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"
  c.data.folder = ""
  c.data.crop_to_box = 0.5  # Probability: crop to the tight box + resize, as seg targets do.
  c.data.flip = True  # Random horizontal flips of folder masks.
  c.data.val_size = 256

  c.log_every = 50
  c.eval_every = 500
  return c
