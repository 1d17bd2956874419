"""Activation x weight products whose gradients are CPU-friendly matmuls.

Why: a weight gradient contracts the activations' leading (batch, length) axes,
dW[C,W] = sum_A x[A,C] dy[A,W]. Autodiff emits it as one dot_general whose left operand is
contracted over its *major* axis. XLA's CPU backend cannot feed that layout to its fast
(YNNPACK) matmul: it falls back to an Eigen dot and materialises a transposed copy of the big
operand, fused with the elementwise backward that produces it (GeLU', ...) and computed in
a cache-hostile order. Profiled on the PaliGemma train step (bench/train_step.py) these
copies took 25% of the step. Here the gradient is built from matmuls whose left operand is
contracted over its minor axes, transposing whichever operand (or result) is cheapest to
move: for the MLP that is the [tokens, width] activation, 8x smaller than [tokens, mlp].

Only on the CPU backend; GPU/TPU compilers fold transposes into the matmul for free, and
their remat policies ("dots_saveable") keep seeing plain dot_generals.

  y = matmul.einsum("BTD,NDH->BTNH", x, w)          # like jnp.einsum(eqn, x, w)
  nn.Dense(..., dot_general=matmul.dot_general)      # flax layers
"""
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

DimensionNumbers = tuple[tuple[Sequence[int], Sequence[int]], tuple[Sequence[int], Sequence[int]]]


def _use_custom(dimension_numbers) -> bool:
  (_, _), (lb, rb) = dimension_numbers
  return jax.default_backend() == "cpu" and not lb and not rb


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: DimensionNumbers,
                precision: Any = None, preferred_element_type: Any = None, **kw) -> jax.Array:
  """`lax.dot_general` (same arguments and result) with matmul-friendly gradients on CPU.

  Products with batch dimensions (attention scores), other backends and extra keyword
  arguments (out_sharding) use lax.dot_general unchanged.
  """
  if kw or not _use_custom(dimension_numbers):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kw)
  (lc, rc), _ = dimension_numbers
  dn = ((tuple(int(i) for i in lc), tuple(int(i) for i in rc)), ((), ()))
  dtype = None if preferred_element_type is None else jnp.dtype(preferred_element_type)
  return _dot(lhs, rhs, dn, precision, dtype)


def einsum(eqn: str, lhs: jax.Array, rhs: jax.Array, **kw) -> jax.Array:
  """`jnp.einsum(eqn, lhs, rhs, **kw)` through `dot_general` above."""
  return jnp.einsum(eqn, lhs, rhs, _dot_general=dot_general, **kw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dot(lhs, rhs, dn, precision, dtype):
  return lax.dot_general(lhs, rhs, dn, precision=precision, preferred_element_type=dtype)


def _dot_fwd(lhs, rhs, dn, precision, dtype):
  return _dot(lhs, rhs, dn, precision, dtype), (lhs, rhs)


def _dot_bwd(dn, precision, dtype, res, g):
  lhs, rhs = res
  (lc, rc), _ = dn
  lf = [i for i in range(lhs.ndim) if i not in lc]
  rf = [i for i in range(rhs.ndim) if i not in rc]
  # g's axes: lhs free (lhs order), then rhs free (rhs order).
  g_l = list(range(len(lf)))
  g_r = list(range(len(lf), len(lf) + len(rf)))
  d_lhs = _operand_grad(g, rhs, x=lhs, x_contract=lc, o_contract=rc, x_free=lf, o_free=rf,
                        g_x=g_l, g_o=g_r, precision=precision, dtype=dtype)
  d_rhs = _operand_grad(g, lhs, x=rhs, x_contract=rc, o_contract=lc, x_free=rf, o_free=lf,
                        g_x=g_r, g_o=g_l, precision=precision, dtype=dtype)
  return d_lhs, d_rhs


_dot.defvjp(_dot_fwd, _dot_bwd)


def _size(shape, axes) -> int:
  return math.prod(shape[i] for i in axes)


def _operand_grad(g, o, *, x, x_contract, o_contract, x_free, o_free, g_x, g_o, precision,
                  dtype):
  """d x for y = x . o: a sum over o's free axes (S) of g[x_free, S] * o[x_contract, S].

  Two matmul forms; in both the left operand is contracted over its trailing axes (the
  layout XLA CPU's fast matmul takes), the right one in any order:
    "g left":  L = g as [x_free, S],           R = o     -> [x_free, x_contract]
    "o left":  L = o as [x_contract, S],       R = g     -> [x_contract, x_free]
  then the result is permuted to x's axis order. Picks the form that moves fewer elements.
  """
  # x_contract[i] pairs with o_contract[i].
  s_in_o = list(o_free)
  s_in_g = list(g_o)
  xc_in_o = list(o_contract)  # o's contracting axes, in the order of x_contract
  size_x = math.prod(x.shape)

  # Form A: g on the left. Moving g counts double: g is usually produced by an elementwise
  # backward (softmax', GeLU') that XLA fuses into the transposing copy and then evaluates in
  # the copy's strided order; a permuted result is a plain copy.
  perm_g = list(g_x) + s_in_g
  cost_a = (0 if perm_g == sorted(perm_g) else 2 * math.prod(g.shape))
  # dot_general keeps o's uncontracted (= its contracting) axes in o's order.
  order_a = list(x_free) + [x_contract[list(o_contract).index(a)] for a in sorted(o_contract)]
  cost_a += 0 if order_a == sorted(order_a) else size_x
  # Form B: o on the left.
  perm_o = xc_in_o + s_in_o
  cost_b = (0 if perm_o == sorted(perm_o) else math.prod(o.shape))
  order_b = list(x_contract) + list(x_free)
  cost_b += 0 if order_b == sorted(order_b) else size_x

  # (left operand, its axis order, right operand, the right's summed axes, result order).
  if cost_a <= cost_b:
    left, perm, right, s_right, order = g, perm_g, o, s_in_o, order_a
  else:
    left, perm, right, s_right, order = o, perm_o, g, s_in_g, order_b
  if perm != sorted(perm):
    left = jnp.transpose(left, perm)
  k = len(s_right)  # The summed axes, now trailing on the left.
  dn = ((tuple(range(left.ndim - k, left.ndim)), tuple(s_right)), ((), ()))
  out = lax.dot_general(left, right, dn, precision=precision, preferred_element_type=dtype)
  if order != sorted(order):
    out = jnp.transpose(out, np.argsort(order))
  return out.astype(x.dtype)
