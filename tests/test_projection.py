"""Tests for lrnet/projection.py: straight-through VJPs."""

import jax
import jax.numpy as jnp
import numpy as np

import lrnet


def _matrix(m, n, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (m, n), jnp.float32)


def test_st_truncate_forward_is_truncation():
  w = _matrix(12, 8)
  np.testing.assert_allclose(jax.jit(lrnet.st_truncate, static_argnums=1)(w, 3),
                             lrnet.truncate(w, 3), atol=1e-6)


def test_st_truncate_vjp_is_identity_under_jit():
  w = _matrix(12, 8)
  cotangent = _matrix(12, 8, seed=1)
  _, vjp = jax.vjp(lambda w: lrnet.st_truncate(w, 3), w)
  (grad,) = jax.jit(vjp)(cotangent)
  np.testing.assert_array_equal(grad, cotangent)
  # ...whereas the true derivative of the truncation is not the identity.
  _, true_vjp = jax.vjp(lambda w: lrnet.truncate(w, 3), w)
  assert not np.allclose(true_vjp(cotangent)[0], cotangent, atol=1e-2)


def test_st_truncate_grad_of_loss_is_grad_at_projected_weight():
  w, target = _matrix(10, 6), _matrix(10, 6, seed=2)
  loss = lambda w: jnp.sum((w - target) ** 2)
  grad = jax.jit(jax.grad(lambda w: loss(lrnet.st_truncate(w, 2))))(w)
  np.testing.assert_allclose(grad, 2 * (lrnet.truncate(w, 2) - target), rtol=1e-5, atol=1e-5)


def test_st_truncate_under_vmap_over_matrices():
  ws = jax.random.normal(jax.random.PRNGKey(0), (4, 9, 7))
  out = jax.vmap(lambda w: lrnet.st_truncate(w, 2))(ws)
  for i in range(4):
    np.testing.assert_allclose(out[i], lrnet.truncate(ws[i], 2), atol=1e-5)
  grads = jax.vmap(jax.grad(lambda w: jnp.sum(lrnet.st_truncate(w, 2) * 3.0)))(ws)
  np.testing.assert_array_equal(grads, jnp.full_like(ws, 3.0))


def test_st_truncate_masked_vmaps_over_ranks_with_identity_grad():
  w = _matrix(9, 7)
  ranks = jnp.array([1, 3, 7])
  out = jax.jit(jax.vmap(lrnet.projection.st_truncate_masked, in_axes=(None, 0)))(w, ranks)
  for i, r in enumerate([1, 3, 7]):
    np.testing.assert_allclose(out[i], lrnet.truncate(w, r), atol=1e-5)
  grad = jax.grad(lambda w: jnp.sum(lrnet.projection.st_truncate_masked(w, 2) ** 2))(w)
  np.testing.assert_allclose(grad, 2 * lrnet.truncate(w, 2), atol=1e-5)


def test_st_factored_matmul_forward_and_straight_through_vjp():
  m, n, r, k, batch = 12, 10, 3, 5, 5
  w, x, g = _matrix(m, n), _matrix(batch, m, seed=1), _matrix(batch, n, seed=2)
  _, _, vt = jnp.linalg.svd(w, full_matrices=False)
  right_rows = vt[:k]                                              # Vᵀ, [k, n], all k rows
  left_rows = jnp.where(jnp.arange(k)[:, None] < r, (w @ vt[:k].T).T, 0.0)  # (W V)ᵀ, rows ≥ r zero
  w_hat = lrnet.truncate(w, r)
  y, vjp = jax.vjp(lrnet.projection.st_factored_matmul, x, w, left_rows, right_rows)
  np.testing.assert_allclose(y, x @ w_hat, atol=1e-5)
  dx, dw, dleft, dright = jax.jit(vjp)(g)
  np.testing.assert_allclose(dx, g @ w_hat.T, atol=1e-5)
  np.testing.assert_allclose(dw, x.T @ g, atol=1e-5)  # straight-through: not the true dW (0)
  np.testing.assert_array_equal(dleft, jnp.zeros_like(left_rows))
  np.testing.assert_array_equal(dright, jnp.zeros_like(right_rows))


def test_st_factored_matmul_from_the_left_side():
  # Ŵ = U Uᵀ W: left rows Uᵀ (orthonormal), right rows Uᵀ W.
  m, n, r, batch = 9, 11, 4, 3
  w, x, g = _matrix(m, n, seed=6), _matrix(batch, m, seed=7), _matrix(batch, n, seed=8)
  u, _, _ = jnp.linalg.svd(w, full_matrices=False)
  left_rows = u[:, :r].T
  w_hat = lrnet.truncate(w, r)
  y, vjp = jax.vjp(lrnet.projection.st_factored_matmul, x, w, left_rows, left_rows @ w)
  np.testing.assert_allclose(y, x @ w_hat, atol=1e-5)
  np.testing.assert_allclose(vjp(g)[0], g @ w_hat.T, atol=1e-5)


def test_st_factored_matmul_never_reads_w():
  # The primal uses only the factors: a W inconsistent with them changes nothing in the forward,
  # and its gradient is still xᵀ g.
  x, left_rows, right_rows = _matrix(4, 6, seed=1), _matrix(2, 6, seed=2), _matrix(2, 5, seed=3)
  g = _matrix(4, 5, seed=4)
  y_zero = lrnet.projection.st_factored_matmul(x, jnp.zeros((6, 5)), left_rows, right_rows)
  y_other = lrnet.projection.st_factored_matmul(x, _matrix(6, 5, seed=5), left_rows, right_rows)
  np.testing.assert_array_equal(y_zero, y_other)
  dw = jax.grad(lambda w: jnp.sum(lrnet.projection.st_factored_matmul(x, w, left_rows, right_rows) * g))(
      jnp.zeros((6, 5)))
  np.testing.assert_allclose(dw, x.T @ g, atol=1e-5)
