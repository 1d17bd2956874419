"""models/matmul.py: same values and gradients as jnp.einsum, with CPU-friendly matmuls."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_vision_lite.models import matmul

SIZES = dict(B=2, T=3, D=4, N=5, H=6, S=3, C=2, K=1, V=7, F=3, x=2, y=3, z=4, w=5)
EQNS = ["BTD,NDH->BTNH", "BTD,SNDH->SBTNH", "BSD,CKDH->CBSKH", "BTNH,NHD->BTD", "BTD,VD->BTV",
        "BTD,DF->BTF", "DB,DF->BF", "DF,BD->BF", "xyz,zyw->wx", "NDH,BTD->BTNH"]


def _operands(eqn, dtype=np.float32, seed=0):
  rs = np.random.RandomState(seed)
  lhs, rhs = eqn.split("->")[0].split(",")
  make = lambda s: jnp.asarray(rs.randn(*(SIZES[c] for c in s)), dtype)
  return make(lhs), make(rhs)


@pytest.mark.parametrize("eqn", EQNS)
def test_values_and_gradients_equal_einsum(eqn):
  a, b = _operands(eqn)
  # A non-linear head so that the cotangent is not constant.
  loss = lambda ein: lambda a, b: jnp.sum(jnp.sin(ein(eqn, a, b)))
  np.testing.assert_allclose(matmul.einsum(eqn, a, b), jnp.einsum(eqn, a, b), rtol=1e-6,
                             atol=1e-6)
  want = jax.grad(loss(jnp.einsum), (0, 1))(a, b)
  got = jax.jit(jax.grad(loss(matmul.einsum), (0, 1)))(a, b)
  for g, w in zip(got, want):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _dots(closed_jaxpr):
  """Every dot_general equation of a jaxpr, nested ones (pjit, custom_vjp) included."""
  dots = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append(eqn)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(closed_jaxpr.jaxpr)
  return dots


def _left_contracting(eqn):
  (lc, _), _ = eqn.params["dimension_numbers"]
  return tuple(lc), eqn.invars[0].aval.ndim


def test_gradient_matmuls_contract_the_left_operand_over_its_trailing_axes():
  """The point of the module: XLA CPU's fast matmul needs that layout."""
  x, w = _operands("BTD,DF->BTF")
  loss = lambda ein: lambda x, w: jnp.sum(jnp.tanh(ein("BTD,DF->BTF", x, w)))
  dots = _dots(jax.make_jaxpr(jax.grad(loss(matmul.einsum), (0, 1)))(x, w))
  assert len(dots) == 3  # forward, d x, d w
  for eqn in dots:
    lc, ndim = _left_contracting(eqn)
    assert lc == tuple(range(ndim - len(lc), ndim)), eqn
  # Plain autodiff contracts the activations over their leading (batch) axes for d w.
  plain = _dots(jax.make_jaxpr(jax.grad(loss(jnp.einsum), 1))(x, w))
  assert [_left_contracting(e) for e in plain] == [((2,), 3), ((0, 1), 3)]


def test_mixed_precision_keeps_dtypes():
  a, b = _operands("BTD,VD->BTV", jnp.bfloat16)
  f = lambda ein: lambda a, b: jnp.sum(
      ein("BTD,VD->BTV", a, b, preferred_element_type=jnp.float32) ** 2)
  assert matmul.einsum("BTD,VD->BTV", a, b, preferred_element_type=jnp.float32).dtype == \
      jnp.float32
  got = jax.grad(f(matmul.einsum), (0, 1))(a, b)
  want = jax.grad(f(jnp.einsum), (0, 1))(a, b)
  for g, w in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(g), np.float32(w), rtol=2e-2, atol=2e-2)


def test_batched_products_and_flax_layers():
  # Batch dimensions (attention scores) go to lax.dot_general unchanged.
  q, k = (jnp.asarray(np.random.RandomState(i).randn(2, 3, 4), jnp.float32) for i in (0, 1))
  dn = (((2,), (2,)), ((0,), (0,)))
  np.testing.assert_array_equal(matmul.dot_general(q, k, dn), jax.lax.dot_general(q, k, dn))
  # flax layers take it as their dot_general.
  x = jnp.asarray(np.random.RandomState(2).randn(2, 3, 4), jnp.float32)
  for layer, ref in ((nn.Dense(5, dot_general=matmul.dot_general), nn.Dense(5)),
                     (nn.DenseGeneral(5, axis=(-2, -1), dot_general=matmul.dot_general),
                      nn.DenseGeneral(5, axis=(-2, -1)))):
    params = ref.init(jax.random.key(0), x)
    loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
    np.testing.assert_allclose(layer.apply(params, x), ref.apply(params, x), rtol=1e-6)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6),
                 jax.grad(loss(layer))(params), jax.grad(loss(ref))(params))


def test_remat_and_vmap():
  a, b = _operands("BTD,DF->BTF")
  f = lambda ein: lambda a, b: jnp.sum(jnp.sin(ein("BTD,DF->BTF", a, b)))
  want = jax.grad(f(jnp.einsum), (0, 1))(a, b)
  got = jax.grad(jax.checkpoint(f(matmul.einsum)), (0, 1))(a, b)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  per_row = jax.vmap(jax.grad(f(matmul.einsum), 1), in_axes=(0, None))(a[:, None], b)
  np.testing.assert_allclose(per_row.sum(0), want[1], rtol=1e-5, atol=1e-5)
