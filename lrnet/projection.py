"""Straight-through low-rank projection: forward uses Ŵ, backward treats dŴ/dW as identity.

A student trained this way keeps dense weights W, but every forward pass sees their
rank-r approximation; the gradient with respect to Ŵ is applied to W unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lrnet import svd


@jax.custom_vjp
def _straight_through(w: jax.Array, projected: jax.Array) -> jax.Array:
  """`projected`, with the cotangent passed to `w` unchanged and none to `projected`."""
  del w
  return projected


_straight_through.defvjp(lambda w, projected: (projected, None),
                         lambda _, cotangent: (cotangent, jnp.zeros_like(cotangent)))


def st_truncate(w: jax.Array, rank: int) -> jax.Array:
  """Ŵ = `truncate(w, rank)` [m, n] of `w` [m, n] at a static integer `rank` in `1..min(m, n)`,
  with a straight-through (identity) gradient ∂L/∂W := ∂L/∂Ŵ: never differentiates through the
  SVD (whose gradient is NaN for repeated singular values)."""
  return _straight_through(w, svd.truncate(jax.lax.stop_gradient(w), rank))


def st_truncate_masked(w: jax.Array, rank: jax.Array) -> jax.Array:
  """`st_truncate` for a traced integer `rank` (vmap over ranks); no range check."""
  projected = svd.truncate_masked(jax.lax.stop_gradient(w), jnp.asarray(rank, jnp.int32))
  return _straight_through(w, projected)


@jax.custom_vjp
def st_factored_matmul(x: jax.Array, w: jax.Array, left_rows: jax.Array,
                       right_rows: jax.Array) -> jax.Array:
  """x Ŵ [..., n] for inputs `x` [..., m] (e.g. [batch, m] or [batch, tokens, m]), Ŵ = Lᵀ R given
  its factors' rows `left_rows` L [k, m] and `right_rows` R [k, n]; straight-through in the dense
  weights `w` [m, n], which are never read.

  When R = Vᵀ ([k, n], orthonormal rows spanning W's top right singular subspace) and L = (W V)ᵀ
  ([k, m], its image; rows past the rank zeroed), Ŵ = W V Vᵀ = Lᵀ R; equally L = Uᵀ and
  R = Uᵀ W from the left side. Then

  .. math:: x \\hat W = (x L^T) R, \\qquad
            \\frac{\\partial L}{\\partial x} = g \\hat W^T = (g R^T) L, \\qquad
            \\frac{\\partial L}{\\partial W} := x^T g

  so the forward and the input gradient cost 2·batch·k·(m + n) FLOPs each instead of the dense
  layer's 2·batch·m·n (k = 60: 0.12×, k = 210: 0.41× at 1024²); only the straight-through weight
  gradient xᵀ g is dense. Both factors are read as rows, in their stored layout (a transposed
  operand can cost XLA:CPU a copy per product). `w` is an argument only to receive that gradient;
  the factors get none.
  """
  del w
  rows = x.reshape(-1, x.shape[-1])
  return (svd.times_transpose(rows, left_rows) @ right_rows).reshape(
      x.shape[:-1] + right_rows.shape[-1:])


def _st_factored_matmul_fwd(x, w, left_rows, right_rows):
  return st_factored_matmul(x, w, left_rows, right_rows), (x, left_rows, right_rows)


def _st_factored_matmul_bwd(residuals, g):
  x, left_rows, right_rows = residuals
  rows, g_rows = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  dx = (svd.times_transpose(g_rows, right_rows) @ left_rows).reshape(x.shape)
  return dx, rows.T @ g_rows, jnp.zeros_like(left_rows), jnp.zeros_like(right_rows)


st_factored_matmul.defvjp(_st_factored_matmul_fwd, _st_factored_matmul_bwd)
