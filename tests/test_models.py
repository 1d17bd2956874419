"""Model-internal properties: real-size shapes, cache == full forward, layouts, dtypes, errors.

Parity with big_vision and transformers is in test_parity.py.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from big_vision_lite.models import gemma, paligemma

VARIANTS = {"pt_224": ("gemma_2b", 224), "pt_448": ("gemma_2b", 448), "pt_896": ("gemma_2b", 896)}
for _size in ("3b", "10b", "28b"):
  for _res in (224, 448, 896):
    VARIANTS[f"pt_{_size}_{_res}"] = (
        {"3b": "gemma2_2b", "10b": "gemma2_9b", "28b": "gemma2_27b"}[_size], _res)


def tiny_config(gemma2=False, **llm):
  cfg = {"img": dict(patch_size=(8, 8), width=32, depth=2, mlp_dim=64, num_heads=2,
                     image_size=16, head_zeroinit=False),
         "llm": dict(vocab_size=300, width=48, depth=3, mlp_dim=96, num_heads=4, num_kv_heads=2,
                     head_dim=12)}
  if gemma2:
    cfg["llm"].update(post_norms=True, attn_logits_softcap=2.5, final_logits_softcap=5.0,
                      sliding_window=5, query_pre_attn_norm="rsqrt_emb_per_head")
  cfg["llm"].update(llm)
  return cfg


def init(cfg, seed=0, batch=2, text_len=6):
  model = paligemma.Model(**cfg)
  image = jnp.zeros((batch, 16, 16, 3))
  text = jnp.zeros((batch, text_len), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), image, text, jnp.zeros_like(text))["params"]
  # Perturb norm scales and biases away from their constant inits, so that a layout
  # mistake cannot hide behind zeros or ones.
  rng = np.random.RandomState(seed)
  params = jax.tree.map(lambda x: x + 0.1 * rng.randn(*x.shape).astype(x.dtype), params)
  return model, params


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_real_sizes_match_big_vision_param_shapes(fixtures_dir, name):
  expected = json.loads((fixtures_dir / "param_shapes" / f"{name}.json").read_text())
  llm_variant, res = VARIANTS[name]
  model = paligemma.Model(img={"variant": "So400m/14", "image_size": res},
                          llm={"variant": llm_variant, "vocab_size": 257152})
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)),
                          jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32))["params"]
  flat = {"/".join(k): list(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
  assert flat == expected["params"]
  assert sum(np.prod(s) for s in flat.values()) == expected["total_params"]


def test_embed_init_std_sets_the_token_table_init():
  """big_vision's 0.01 by default; configs/demo.py starts from scratch at 1 / sqrt(width)."""
  def table_std(**llm):
    model = paligemma.Model(**tiny_config(vocab_size=2000, **llm))
    text = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), text,
                                 jnp.zeros_like(text))["params"]
    return float(np.std(params["llm"]["embedder"]["input_embedding"]))
  assert table_std() == pytest.approx(0.01, rel=0.05)
  assert table_std(embed_init_std=48 ** -0.5) == pytest.approx(48 ** -0.5, rel=0.05)


@pytest.mark.parametrize("gemma2", [False, True])
def test_cached_decoding_equals_full_forward(gemma2):
  # Gemma 2 with a window of 5 keys: the 4 image tokens + prompt + generated tokens
  # run well past it, so the local layers' masks matter at every step.
  model, params = init(tiny_config(gemma2))
  rng = np.random.RandomState(1)
  image = jnp.asarray(rng.uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
  lengths = np.asarray([3, 6, 4])
  steps, width = 7, 6 + 7
  prompts = np.zeros((3, 6), np.int32)
  for b, n in enumerate(lengths):
    prompts[b, :n] = rng.randint(3, 300, n)
  input_mask = np.arange(6)[None] < lengths[:, None]
  logits, cache = model.apply({"params": params}, image, prompts, np.zeros_like(prompts),
                              input_mask, cache_size=4 + 6 + steps, method=model.prefill)
  extend = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, method=model.extend))
  forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a)[0])
  # Reference: no cache, [prompt, generated so far] right-padded to a fixed width, with
  # mask_ar 0 on the prompt and 1 on generated tokens (big_vision's greedy loop).
  seqs = [list(prompts[b, :n]) for b, n in enumerate(lengths)]
  for step in range(steps):
    text = np.zeros((3, width), np.int32)
    for b, seq in enumerate(seqs):
      text[b, :len(seq)] = seq
    n = lengths + step
    mask_ar = (np.arange(width)[None] >= lengths[:, None]).astype(np.int32)
    full = forward(params, image, text, mask_ar, np.arange(width)[None] < n[:, None])
    ref = np.asarray(full)[np.arange(3), n - 1]
    np.testing.assert_allclose(logits, ref, atol=2e-5, rtol=1e-5)
    tokens = jnp.argmax(logits, -1)
    for b in range(3):
      seqs[b].append(int(tokens[b]))
    logits, cache = extend(params, tokens, cache)


def test_sliding_window_changes_long_sequences_only():
  cfg = tiny_config(gemma2=True)
  model, params = init(cfg, text_len=12)
  no_window = paligemma.Model(**tiny_config(gemma2=True, sliding_window=None))
  rng = np.random.RandomState(2)
  image = jnp.asarray(rng.uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.randint(3, 300, (1, 12)), jnp.int32)
  causal = jnp.ones_like(text)  # Image tokens are prefix; text fully causal.
  a, _ = model.apply({"params": params}, image, text, causal)
  b, _ = no_window.apply({"params": params}, image, text, causal)
  # Positions < window see all keys either way; later ones lose the far ones.
  np.testing.assert_allclose(a[0, :1], b[0, :1], atol=1e-6)
  assert np.abs(a[0, 5:] - b[0, 5:]).max() > 1e-3


def test_prefix_block_is_not_windowed():
  # An all-prefix sequence longer than the window: every token sees every other
  # (bidirectional block, as in transformers), so the window changes nothing.
  model, params = init(tiny_config(gemma2=True), text_len=12)
  no_window = paligemma.Model(**tiny_config(gemma2=True, sliding_window=None))
  text = jnp.arange(3, 15, dtype=jnp.int32)[None]
  image = jnp.ones((1, 16, 16, 3)) * 0.3
  a, _ = model.apply({"params": params}, image, text, jnp.zeros_like(text))
  b, _ = no_window.apply({"params": params}, image, text, jnp.zeros_like(text))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_unscanned_layout_gives_the_same_logits():
  cfg = tiny_config(gemma2=True)
  model, params = init(cfg)
  unscanned_cfg = {"img": {**cfg["img"], "scan": False}, "llm": {**cfg["llm"], "scan": False}}
  unscanned = paligemma.Model(**unscanned_cfg)
  shapes = jax.eval_shape(unscanned.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 6), jnp.int32))["params"]
  assert "encoderblock_1" in shapes["img"]["Transformer"]
  assert set(shapes["llm"]["layers"]) == {"0", "1", "2"}
  split = lambda tree, n: [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]
  p2 = jax.tree.map(lambda x: x, params)
  blocks = p2["img"]["Transformer"].pop("encoderblock")
  for i, blk in enumerate(split(blocks, 2)):
    p2["img"]["Transformer"][f"encoderblock_{i}"] = blk
  p2["llm"]["layers"] = dict(enumerate(split(params["llm"]["layers"], 3)))
  p2["llm"]["layers"] = {str(k): v for k, v in p2["llm"]["layers"].items()}
  rng = np.random.RandomState(3)
  image = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.randint(3, 300, (2, 6)), jnp.int32)
  mask_ar = jnp.asarray([[0, 0, 1, 1, 1, 1]] * 2)
  a, _ = model.apply({"params": params}, image, text, mask_ar)
  b, _ = unscanned.apply({"params": p2}, image, text, mask_ar)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_frames_fold_into_the_image_token_sequence():
  model, params = init(tiny_config())
  rng = np.random.RandomState(4)
  frames = jnp.asarray(rng.uniform(-1, 1, (2, 3, 16, 16, 3)), jnp.float32)
  text = jnp.asarray(rng.randint(3, 300, (2, 5)), jnp.int32)
  mask_ar = jnp.asarray([[0, 0, 1, 1, 1]] * 2)
  logits, aux = model.apply({"params": params}, frames, text, mask_ar)
  assert aux["img/zimg"].shape == (2, 3 * 4, 48)
  per_frame = [model.apply({"params": params}, frames[:, f], method=model.embed_image)[0]
               for f in range(3)]
  np.testing.assert_allclose(aux["img/zimg"], jnp.concatenate(per_frame, axis=1), atol=1e-5)
  # Frame order matters: swapping frames changes the logits.
  swapped, _ = model.apply({"params": params}, frames[:, ::-1], text, mask_ar)
  assert np.abs(swapped - logits).max() > 1e-4


def test_remat_changes_nothing_but_memory():
  cfg = tiny_config(gemma2=True)
  model, params = init(cfg)
  remat = paligemma.Model(img={**cfg["img"], "remat_policy": "nothing_saveable"},
                          llm={**cfg["llm"], "remat_policy": "nothing_saveable"})
  text = jnp.asarray([[5, 6, 7, 8, 9, 10]])
  image = jnp.ones((1, 16, 16, 3)) * 0.5

  def loss(p, m):
    logits, _ = m.apply({"params": p}, image, text, jnp.ones_like(text))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 7])

  g1 = jax.grad(loss)(params, model)
  g2 = jax.grad(loss)(params, remat)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)


def test_bfloat16_compute_close_to_float32():
  cfg = tiny_config(gemma2=True)
  model, params = init(cfg)
  bf16 = paligemma.Model(img={**cfg["img"], "dtype": "bfloat16"},
                         llm={**cfg["llm"], "dtype": "bfloat16"})
  text = jnp.asarray([[5, 6, 7, 8, 9, 10]])
  image = jnp.ones((1, 16, 16, 3)) * 0.5
  a, _ = model.apply({"params": params}, image, text, jnp.ones_like(text))
  b, _ = bf16.apply({"params": params}, image, text, jnp.ones_like(text))
  assert b.dtype == jnp.float32  # Logits stay float32 for the loss.
  assert np.abs(a - b).max() < 0.1
  assert np.abs(a - b).max() > 0  # It really computed in bfloat16.


def test_param_dtype_bfloat16_stores_bfloat16():
  cfg = tiny_config()
  model = paligemma.Model(img={**cfg["img"], "param_dtype": "bfloat16"},
                          llm={**cfg["llm"], "param_dtype": "bfloat16"})
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                          jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.bfloat16)}


def test_prefix_lm_mask_matches_big_vision_definition():
  mask_ar = jnp.asarray([[0, 0, 0, 1, 1, 0, 1, 1]])
  input_mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]], bool)
  m = np.asarray(gemma.make_attn_mask(input_mask, mask_ar))[0]
  c = np.cumsum(mask_ar[0])
  for i in range(8):
    for j in range(8):
      assert m[i, j] == (c[j] <= c[i] and input_mask[0, i] and input_mask[0, j]), (i, j)
  assert m[5, 4] and m[4, 5]  # mask_ar 0 after a 1 joins that token's block.


def test_bad_configs_are_clear_errors():
  with pytest.raises(ValueError, match=r"model.llm: unknown key\(s\) \['num_layers'\]"):
    paligemma.resolve_config({"llm": {"variant": "gemma_2b", "num_layers": 3},
                              "img": {"variant": "So400m/14"}})
  with pytest.raises(ValueError, match="model.img.variant='XL/14': unknown"):
    paligemma.resolve_config({"llm": {"variant": "gemma_2b"}, "img": {"variant": "XL/14"}})
  with pytest.raises(ValueError, match="model.llm.width=None"):
    paligemma.resolve_config({"llm": {"depth": 2}, "img": {"variant": "S/16"}})
  with pytest.raises(ValueError, match="query_pre_attn_norm"):
    paligemma.resolve_config({"llm": {"variant": "gemma2_2b", "query_pre_attn_norm": "x"},
                              "img": {"variant": "S/16"}})
  model, params = init(tiny_config())
  with pytest.raises(ValueError, match="does not match model.img.image_size=16"):
    model.apply({"params": params}, jnp.zeros((1, 24, 24, 3)), jnp.zeros((1, 3), jnp.int32),
                jnp.zeros((1, 3), jnp.int32))


def test_variants_resolve_to_published_numbers():
  cfg = paligemma.resolve_config({"img": {"variant": "So400m/14"},
                                  "llm": {"variant": "gemma2_27b", "final_logits_softcap": 0.0}})
  assert cfg["img"]["patch_size"] == (14, 14) and cfg["img"]["width"] == 1152
  assert cfg["llm"]["query_pre_attn_norm"] == "rsqrt_emb_per_head"
  assert cfg["llm"]["final_logits_softcap"] is None  # 0 = off, as big_vision configs say.
  assert cfg["llm"]["attn_logits_softcap"] == 50.0 and cfg["llm"]["sliding_window"] == 4096
