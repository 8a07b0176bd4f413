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
  """Rank-`rank` truncation with a straight-through (identity) gradient.

  Forward: `truncate(w, rank)`. Backward: the cotangent passes to `w` unchanged,
  i.e. ∂L/∂W := ∂L/∂Ŵ. Never differentiates through the SVD (whose gradient is
  NaN for repeated singular values).

  Args:
    w: matrix, [m, n].
    rank: static integer in `1..min(m, n)`.

  Returns:
    Ŵ, [m, n].
  """
  svd.check_rank(w.shape, rank)
  return _straight_through(w, svd.truncate(jax.lax.stop_gradient(w), rank))


def st_truncate_masked(w: jax.Array, rank: jax.Array) -> jax.Array:
  """`st_truncate` for a traced integer `rank` (vmap over ranks); no range check."""
  projected = svd.truncate_masked(jax.lax.stop_gradient(w), jnp.asarray(rank, jnp.int32))
  return _straight_through(w, projected)


@jax.custom_vjp
def st_factored_matmul(x: jax.Array, w: jax.Array, left_rows: jax.Array,
                       right_rows: jax.Array) -> jax.Array:
  """x Ŵ with Ŵ = Lᵀ R given its factors' rows, straight-through in W: W itself is never read.

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
  the factors get none. `lrnet.tracker.project` hands out both factors from its one product.

  Args:
    x: inputs, [..., m] (e.g. [batch, m] or [batch, tokens, m]).
    w: dense weights, [m, n] (receives the straight-through gradient).
    left_rows: L, [k, m].
    right_rows: R, [k, n].

  Returns:
    [..., n].
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
  dw = rows.T @ g_rows
  return dx, dw, jnp.zeros_like(left_rows), jnp.zeros_like(right_rows)


st_factored_matmul.defvjp(_st_factored_matmul_fwd, _st_factored_matmul_bwd)
