"""Tests for lrnet/svd.py: Eckart–Young, factors, rank validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrnet


def _matrix(m, n, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (m, n), jnp.float32)


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (25, 25)])
@pytest.mark.parametrize("rank", [1, 5, 19])
def test_truncate_is_eckart_young_optimal(shape, rank):
  w = _matrix(*shape)
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  w_hat = lrnet.truncate(w, rank)
  error = np.sum((np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)) ** 2)
  np.testing.assert_allclose(error, np.sum(s[rank:] ** 2), rtol=1e-4)
  assert np.linalg.matrix_rank(np.asarray(w_hat), tol=1e-4 * s[0]) == rank


def test_truncate_full_rank_is_identity_and_beats_random_rank_r():
  w = _matrix(12, 9)
  np.testing.assert_allclose(lrnet.truncate(w, 9), w, atol=1e-5)
  best = jnp.linalg.norm(w - lrnet.truncate(w, 3))
  rng = np.random.default_rng(0)
  for _ in range(20):  # any other rank-3 matrix is further away
    other = rng.normal(size=(12, 3)) @ rng.normal(size=(3, 9))
    assert jnp.linalg.norm(w - other) > best


@pytest.mark.parametrize("rank", [1, 4, 10])
def test_factorize_shapes_product_and_balance(rank):
  w = _matrix(16, 10, seed=3)
  u, v = lrnet.factorize(w, rank)
  assert u.shape == (16, rank) and v.shape == (rank, 10)
  np.testing.assert_allclose(u @ v, lrnet.truncate(w, rank), atol=1e-5)
  # √s on each side: column norms of u equal row norms of v (both √s_i).
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=0), jnp.linalg.norm(v, axis=1), rtol=1e-4)
  s = jnp.linalg.svd(w, compute_uv=False)
  np.testing.assert_allclose(jnp.linalg.norm(u, axis=0) ** 2, s[:rank], rtol=1e-4)


@pytest.mark.parametrize("bad", [0, -1, 11, 2.5, "3", None, True])
@pytest.mark.parametrize("fn", [lrnet.truncate, lrnet.factorize, lrnet.st_truncate])
def test_bad_rank_raises_with_range_and_shape(fn, bad):
  with pytest.raises(ValueError, match=r"1\.\.10 .*shape \(16, 10\)"):
    fn(_matrix(16, 10), bad)


def test_non_matrix_raises():
  with pytest.raises(ValueError, match="2-D"):
    lrnet.truncate(jnp.ones((2, 3, 4)), 1)


def test_resolve_rank_forms():
  assert lrnet.svd.resolve_rank((784, 1024), 20) == 20
  assert lrnet.svd.resolve_rank((784, 1024), 0.1) == 79  # ceil(78.4)
  assert lrnet.svd.resolve_rank((784, 1024), 1.0) == 784
  assert lrnet.svd.resolve_rank((784, 1024), "full") == 784
  for bad, pattern in [(0.0, r"\(0, 1\]"), (1.5, r"\(0, 1\]"), ("half", "'full'"), (785, r"1\.\.784")]:
    with pytest.raises(ValueError, match=pattern):
      lrnet.svd.resolve_rank((784, 1024), bad)


def test_truncate_masked_matches_truncate_for_traced_ranks():
  w = _matrix(20, 14, seed=5)
  ranks = jnp.arange(1, 15)
  batched = jax.jit(jax.vmap(lrnet.svd.truncate_masked, in_axes=(None, 0)))(w, ranks)
  for i, r in enumerate(range(1, 15)):
    np.testing.assert_allclose(batched[i], lrnet.truncate(w, r), atol=1e-5)


def test_energy_rank_picks_smallest_rank_with_that_energy():
  s = np.array([10.0, 5.0, 2.0, 1.0, 0.5])
  q1, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(8, 5)))
  q2, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(5, 5)))
  w = jnp.asarray((q1 * s) @ q2.T, jnp.float32)
  fractions = np.cumsum(s**2) / np.sum(s**2)  # [0.775, 0.969, 0.9845, 0.9984, 1]
  assert lrnet.svd.energy_rank(0.7)(w) == 1
  assert lrnet.svd.energy_rank(0.9)(w) == 2
  assert lrnet.svd.energy_rank(0.98)(w) == 3
  assert lrnet.svd.energy_rank(1.0)(w) == 5
  assert fractions[1] > 0.9
  with pytest.raises(ValueError, match=r"\(0, 1\]"):
    lrnet.svd.energy_rank(0.0)


def test_energy_rank_of_exact_fractions_and_zero_matrix():
  # s² = (9, 1): 90 % is exactly the first value's share.
  assert lrnet.svd.energy_rank_of(np.array([3.0, 1.0]), 0.9) == 1
  assert lrnet.svd.energy_rank_of(np.array([3.0, 1.0]), 0.91) == 2
  assert lrnet.svd.energy_rank_of(np.array([3.0, 1.0]), 1.0) == 2
  assert lrnet.svd.energy_rank_of(np.zeros(3), 0.9) == 0


def test_times_transpose_is_a_times_b_transposed():
  a = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
  b = jax.random.normal(jax.random.PRNGKey(1), (3, 7))
  np.testing.assert_allclose(lrnet.svd.times_transpose(a, b), a @ b.T, rtol=1e-5, atol=1e-6)
