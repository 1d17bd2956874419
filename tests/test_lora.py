"""Tests for big_vision_lite/lora.py: shapes, exact at init, merge vs explicit LoRA, training."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_vision_lite import lora, optim


def _tree(flat, make):
  tree = {}
  for name, shape in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = make(name, tuple(shape))
  return tree


def _random_tree(flat, seed=0, dtype=jnp.float32):
  rng = np.random.RandomState(seed)
  return _tree(flat, lambda _, s: jnp.asarray(rng.randn(*s), dtype))


# A tiny Gemma-like scanned tree (L=2, N=2, K=1, D=4, H=3, F=5) and ViT pieces.
TINY = {
    "llm/embedder/input_embedding": [11, 4],
    "llm/layers/attn/q_einsum/w": [2, 2, 4, 3],
    "llm/layers/attn/kv_einsum/w": [2, 2, 1, 4, 3],
    "llm/layers/attn/attn_vec_einsum/w": [2, 2, 3, 4],
    "llm/layers/mlp/gating_einsum": [2, 2, 4, 5],
    "llm/layers/mlp/linear": [2, 5, 4],
    "llm/layers/pre_attention_norm/scale": [2, 4],
    "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel": [4, 2, 3],
    "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel": [2, 3, 4],
    "img/head/kernel": [4, 6],
}
ALL_TARGETS = lora.LLM_TARGETS + r"|img/.*kernel"


def test_shapes_on_paligemma_param_shapes(fixtures_dir):
  with open(fixtures_dir / "param_shapes" / "pt_224.json") as f:
    shapes = _tree(json.load(f)["params"], lambda _, s: jax.ShapeDtypeStruct(s, jnp.float32))
  out = jax.eval_shape(lambda r: lora.init_lora(r, shapes, rank=8), jax.random.key(0))
  got = {jax.tree_util.keystr(k, simple=True, separator="/"): x.shape
         for k, x in jax.tree_util.tree_flatten_with_path(out)[0]}
  p = "llm/layers/"
  assert got == {
      p + "attn/q_einsum/w/a": (18, 2048, 8), p + "attn/q_einsum/w/b": (18, 8, 8 * 256),
      p + "attn/kv_einsum/w/a": (18, 2, 2048, 8), p + "attn/kv_einsum/w/b": (18, 2, 8, 256),
      p + "attn/attn_vec_einsum/w/a": (18, 2048, 8), p + "attn/attn_vec_einsum/w/b": (18, 8, 2048),
      p + "mlp/gating_einsum/a": (18, 2, 2048, 8), p + "mlp/gating_einsum/b": (18, 2, 8, 16384),
      p + "mlp/linear/a": (18, 16384, 8), p + "mlp/linear/b": (18, 8, 2048),
  }


def test_init_values_and_zero_b_gives_base_exactly():
  base = _random_tree(TINY)
  adapters = lora.init_lora(jax.random.key(1), base, rank=2, targets=ALL_TARGETS)
  leaves = jax.tree_util.tree_flatten_with_path(adapters)[0]
  assert len(leaves) == 2 * 8
  for path, x in leaves:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    if name.endswith("/b"):
      np.testing.assert_array_equal(x, np.zeros(x.shape))
    else:  # Uniform in +-1/sqrt(fan_in).
      assert 0 < np.abs(x).max() <= 1 / np.sqrt(x.shape[-2]), name
  effective = lora.apply_lora(base, adapters, alpha=4.0, rank=2)
  for a, b in zip(jax.tree.leaves(effective), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)


def _with_random_b(adapters, seed=2):
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map_with_path(
      lambda k, x: jnp.asarray(rng.randn(*x.shape), x.dtype) if k[-1].key == "b" else x, adapters)


def test_merged_equals_explicit_lora_forward():
  """Each layer computed as x W + alpha/r (x A) B with the documented in/out grouping."""
  base = _random_tree(TINY)
  ad = _with_random_b(lora.init_lora(jax.random.key(1), base, rank=2, targets=ALL_TARGETS))
  alpha, r = 3.0, 2
  s = alpha / r
  merged = lora.merge_lora(base, ad, alpha, r)
  rng = np.random.RandomState(3)
  x = rng.randn(2, 3, 4).astype(np.float32)  # [B, T, D]
  o = rng.randn(2, 3, 2, 3).astype(np.float32)  # [B, T, N, H]
  h = rng.randn(2, 3, 5).astype(np.float32)  # [B, T, F]
  L, M, A = base["llm"]["layers"], merged["llm"]["layers"], ad["llm"]["layers"]
  low = lambda v, a, b: (v @ a) @ b
  for l in range(2):
    q = A["attn"]["q_einsum"]["w"]
    ref = np.einsum("btd,ndh->btnh", x, L["attn"]["q_einsum"]["w"][l]) + s * low(
        x, q["a"][l], q["b"][l]).reshape(2, 3, 2, 3)
    np.testing.assert_allclose(
        np.einsum("btd,ndh->btnh", x, M["attn"]["q_einsum"]["w"][l]), ref, rtol=1e-5, atol=1e-5)
    kv = A["attn"]["kv_einsum"]["w"]
    for j in range(2):  # k and v get their own adapters.
      ref = np.einsum("btd,kdh->btkh", x, L["attn"]["kv_einsum"]["w"][l, j]) + s * low(
          x, kv["a"][l, j], kv["b"][l, j]).reshape(2, 3, 1, 3)
      np.testing.assert_allclose(np.einsum("btd,kdh->btkh", x, M["attn"]["kv_einsum"]["w"][l, j]),
                                 ref, rtol=1e-5, atol=1e-5)
    av = A["attn"]["attn_vec_einsum"]["w"]
    ref = np.einsum("btnh,nhd->btd", o, L["attn"]["attn_vec_einsum"]["w"][l]) + s * low(
        o.reshape(2, 3, 6), av["a"][l], av["b"][l])
    np.testing.assert_allclose(np.einsum("btnh,nhd->btd", o, M["attn"]["attn_vec_einsum"]["w"][l]),
                               ref, rtol=1e-5, atol=1e-5)
    g = A["mlp"]["gating_einsum"]
    for j in range(2):  # gate and up.
      ref = x @ L["mlp"]["gating_einsum"][l, j] + s * low(x, g["a"][l, j], g["b"][l, j])
      np.testing.assert_allclose(x @ M["mlp"]["gating_einsum"][l, j], ref, rtol=1e-5, atol=1e-5)
    lin = A["mlp"]["linear"]
    ref = h @ L["mlp"]["linear"][l] + s * low(h, lin["a"][l], lin["b"][l])
    np.testing.assert_allclose(h @ M["mlp"]["linear"][l], ref, rtol=1e-5, atol=1e-5)
  vit = "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0".split("/")
  get = lambda t, *k: [t := t[p] for p in vit + list(k)][-1]
  qa = get(ad, "query", "kernel")
  ref = np.einsum("btd,dnh->btnh", x, get(base, "query", "kernel")) + s * low(
      x, qa["a"], qa["b"]).reshape(2, 3, 2, 3)
  np.testing.assert_allclose(np.einsum("btd,dnh->btnh", x, get(merged, "query", "kernel")), ref,
                             rtol=1e-5, atol=1e-5)
  oa = get(ad, "out", "kernel")
  ref = np.einsum("btnh,nhd->btd", o, get(base, "out", "kernel")) + s * low(
      o.reshape(2, 3, 6), oa["a"], oa["b"])
  np.testing.assert_allclose(np.einsum("btnh,nhd->btd", o, get(merged, "out", "kernel")), ref,
                             rtol=1e-5, atol=1e-5)
  # Untargeted params pass through untouched; applied (in a jit) == merged.
  np.testing.assert_array_equal(merged["llm"]["embedder"]["input_embedding"],
                                base["llm"]["embedder"]["input_embedding"])
  applied = jax.jit(lambda b, a: lora.apply_lora(b, a, alpha, r))(base, ad)
  for u, v in zip(jax.tree.leaves(applied), jax.tree.leaves(merged)):
    np.testing.assert_array_equal(u, v)


def test_merge_keeps_base_dtype():
  base = _random_tree({"llm/layers/mlp/linear": [2, 5, 4]}, dtype=jnp.bfloat16)
  ad = _with_random_b(lora.init_lora(jax.random.key(0), base, rank=3))
  assert ad["llm"]["layers"]["mlp"]["linear"]["a"].dtype == jnp.bfloat16
  merged = lora.merge_lora(base, ad, 1.0, 3)
  assert merged["llm"]["layers"]["mlp"]["linear"].dtype == jnp.bfloat16


def _toy_problem():
  flat = {"llm/layers/mlp/linear": [2, 8, 6], "llm/final_norm/scale": [6]}
  base = _random_tree(flat, seed=0)
  rng = np.random.RandomState(1)
  true_delta = np.einsum("lir,lro->lio", rng.randn(2, 8, 2), rng.randn(2, 2, 6)) * 0.5
  x = rng.randn(32, 8).astype(np.float32)
  targets = np.einsum("bi,lio->lbo", x, base["llm"]["layers"]["mlp"]["linear"] + true_delta) * (
      1 + base["llm"]["final_norm"]["scale"])[None, None]

  def loss(params):
    w = params["llm"]["layers"]["mlp"]["linear"]
    y = jnp.einsum("bi,lio->lbo", x, w) * (1 + params["llm"]["final_norm"]["scale"])[None, None]
    return jnp.mean((y - targets) ** 2)

  return base, loss


def test_gradients_flow_only_to_adapters():
  base, loss = _toy_problem()
  ad = lora.init_lora(jax.random.key(0), base, rank=2, targets=r".*mlp/linear")
  grads = jax.grad(lambda a: loss(lora.apply_lora(base, a, 2.0, 2)))(ad)
  g = grads["llm"]["layers"]["mlp"]["linear"]
  assert jax.tree.structure(grads) == jax.tree.structure(ad)  # No base entries.
  # With b = 0: dL/da = s * dL/dW b^T = 0, dL/db = s * a^T dL/dW (per layer).
  np.testing.assert_array_equal(g["a"], np.zeros(g["a"].shape))
  dw = jax.grad(loss)(base)["llm"]["layers"]["mlp"]["linear"]
  a = ad["llm"]["layers"]["mlp"]["linear"]["a"]
  np.testing.assert_allclose(g["b"], 1.0 * np.einsum("lir,lio->lro", a, dw), rtol=1e-5, atol=1e-7)


def test_toy_regression_with_lora_reduces_loss():
  base, loss = _toy_problem()
  ad = lora.init_lora(jax.random.key(0), base, rank=2, targets=r".*mlp/linear")
  cfg = ml_collections.ConfigDict(dict(optax_name="adam", lr=0.05, total_steps=150,
                                       schedule=dict(decay_type="cosine", warmup_steps=5)))
  tx, _ = optim.make_optimizer(cfg, ad)
  opt = tx.init(ad)
  # Optimizer state exists for the adapters only: 2 x (a [2,8,2] + b [2,2,6]) + counters.
  assert sum(np.size(x) for x in jax.tree.leaves(opt)) == 2 * (32 + 24) + 2

  @jax.jit
  def step(ad, opt):
    value, grads = jax.value_and_grad(lambda a: loss(lora.apply_lora(base, a, 2.0, 2)))(ad)
    updates, opt = tx.update(grads, opt, ad)
    return optax.apply_updates(ad, updates), opt, value

  start = float(loss(base))
  for _ in range(150):
    ad, opt, value = step(ad, opt)
  final = float(loss(lora.merge_lora(base, ad, 2.0, 2)))
  assert final < 1e-3 * start, (start, final)


@pytest.mark.parametrize("flat,kw,match", [
    (TINY, dict(targets="vision/.*"), "match no param"),
    (TINY, dict(targets=".*norm/scale"), r"pre_attention_norm/scale \(2, 4\) has no layout"),
    ({"llm/other/w": [3, 4]}, dict(targets=".*"), r"llm/other/w \(3, 4\) has no layout"),
    ({"llm/layers/mlp/linear": [4]}, dict(targets=".*", layouts=[(".*", (-2,), (-1,))]),
     "< 2 dims"),
    ({"x/kernel": [3, 4]}, dict(targets=".*", layouts=[(".*", (-3,), (-1,))]), "does not fit"),
    (TINY, dict(targets="(", rank=2), "is not a regex"),
    (TINY, dict(rank=0), "rank must be >= 1"),
])
def test_init_errors(flat, kw, match):
  kw = {"rank": 2, **kw}
  with pytest.raises(ValueError, match=match):
    lora.init_lora(jax.random.key(0), _random_tree(flat), **kw)


def test_apply_errors():
  base = _random_tree(TINY)
  ad = lora.init_lora(jax.random.key(0), base, rank=2)
  with pytest.raises(ValueError, match="has rank 2, expected 4"):
    lora.apply_lora(base, ad, 1.0, 4)
  with pytest.raises(ValueError, match=r"LoRA params \['other/w'\] have no base param"):
    lora.apply_lora(base, {**ad, "other": {"w": {"a": jnp.zeros((3, 2)), "b": jnp.zeros((2, 3))}}},
                    1.0, 2)
  bad = jax.tree.map(lambda x: x, ad)
  bad["llm"]["layers"]["mlp"]["linear"]["b"] = jnp.zeros((2, 2, 3))
  with pytest.raises(ValueError, match=r"LoRA of llm/layers/mlp/linear \(2, 5, 4\)"):
    lora.apply_lora(base, bad, 1.0, 2)
