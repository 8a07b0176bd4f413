"""Tests for lrnet/subspace.py: tracked rank-r projections against the exact truncated SVD."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lrnet import subspace
from lrnet import svd


def _orthogonal(rng, size):
  q, r = np.linalg.qr(rng.normal(size=(size, size)))
  return q * np.sign(np.diag(r))


def _with_spectrum(singular_values, m, n, seed=0):
  """W = U diag(s) Vᵀ with Haar-random U [m, p], V [n, p], p = len(s)."""
  rng = np.random.default_rng(seed)
  p = len(singular_values)
  u = _orthogonal(rng, m)[:, :p]
  v = _orthogonal(rng, n)[:, :p]
  return jnp.asarray((u * np.asarray(singular_values)) @ v.T, jnp.float32)


# Tests on 64×48 matrices track K = 20 columns whatever the rank, so that they share one
# compilation of the update.
K = 20


def _init(w, rank):
  return subspace.init_subspace(w, rank, oversample=K - rank)


def _excess(w, state, rank):
  """‖W − Ŵ‖_F / optimum − 1 for a `SubspaceState`'s projection (see `_basis_excess`)."""
  return _basis_excess(w, state.basis, rank)


def _basis_excess(w, basis, rank):
  """‖W − W V_r V_rᵀ‖_F / optimum − 1 for V_r the first `rank` columns of `basis` [n, k], in
  float64 so that 1e-6 differences are visible."""
  with threadpool_limits(1, user_api="blas"):  # tiny LAPACK calls: threads only contend
    w64 = np.asarray(w, np.float64)
    kept = np.asarray(basis, np.float64)[:, :rank]
    error = np.linalg.norm(w64 - w64 @ kept @ kept.T)
    singular_values = np.linalg.svd(w64, compute_uv=False)
    return error / np.sqrt(np.sum(singular_values[rank:] ** 2)) - 1.0


def _perturbation(w, scale, seed):
  """An Adam-like step: every entry moves by ±scale·rms(W), signs of a low-rank gradient."""
  rng = np.random.default_rng(seed)
  gradient = rng.normal(size=(w.shape[0], 8)) @ rng.normal(size=(8, w.shape[1]))
  w = np.asarray(w)
  return jnp.asarray(w - scale * np.sqrt(np.mean(w**2)) * np.sign(gradient), jnp.float32)


def _subspace_distance(a, b):
  """‖A Aᵀ − B Bᵀ‖_2 for orthonormal A, B: the sine of the largest principal angle."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a @ a.T - b @ b.T, ord=2))


# --- shapes, orthonormality, init -------------------------------------------------------------

@pytest.mark.parametrize("shape,rank,k",
                         [((64, 48), 5, 15), ((48, 64), 40, 48), ((30, 20), 20, 20)])
def test_init_is_the_exact_top_k_subspace(shape, rank, k):
  w = jax.random.normal(jax.random.PRNGKey(1), shape)
  state = subspace.init_subspace(w, rank)
  chex.assert_shape(state.basis, (shape[1], k))
  chex.assert_shape(state.ritz_values, (k,))
  _, s, vt = np.linalg.svd(np.asarray(w, np.float64))
  np.testing.assert_allclose(state.ritz_values, s[:k], rtol=1e-5)
  np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(k), atol=1e-5)
  # Same projector as the exact singular vectors.
  assert _subspace_distance(state.basis[:, :rank], jnp.asarray(vt[:rank].T, jnp.float32)) < 1e-4
  np.testing.assert_allclose(subspace.project(w, state, rank), svd.truncate(w, rank), atol=1e-4)
  assert int(state.refreshes) == 0


def test_right_basis_zeroes_columns_past_rank_and_project_is_w_v_vt():
  w = jax.random.normal(jax.random.PRNGKey(2), (40, 30))
  state = subspace.init_subspace(w, 10)
  basis = subspace.right_basis(state, 4)
  np.testing.assert_array_equal(basis[:, 4:], 0.0)
  np.testing.assert_array_equal(basis[:, :4], state.basis[:, :4])
  np.testing.assert_allclose(subspace.project(w, state, 4), w @ basis @ basis.T, rtol=1e-6)
  assert np.linalg.matrix_rank(np.asarray(subspace.project(w, state, 4)), tol=1e-4) == 4


def test_optimality_ratio_is_one_for_truncate_and_above_for_others():
  w = jax.random.normal(jax.random.PRNGKey(3), (30, 20))
  np.testing.assert_allclose(subspace.optimality_ratio(w, svd.truncate(w, 5), 5), 1.0, rtol=1e-5)
  # Dropping the 5th singular direction adds s_5² to the squared error.
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  expected = np.sqrt(np.sum(s[4:] ** 2) / np.sum(s[5:] ** 2))
  np.testing.assert_allclose(
      subspace.optimality_ratio(w, svd.truncate(w, 4), 5), expected, rtol=1e-5)


# --- (a)–(c): spectra against the exact projection ---------------------------------------------

def _track(w_start, steps, rank, scale=1e-2):
  """init on w_start, then `steps` perturbed updates; returns the last matrix and state."""
  state = _init(w_start, rank)
  w = w_start
  for step in range(steps):
    w = _perturbation(w, scale, seed=100 + step)
    state = subspace.update_subspace(w, state, rank)
  return w, state


def test_well_separated_spectrum_tracks_the_exact_subspace():
  rank = 6
  w0 = _with_spectrum(0.7 ** np.arange(48), 64, 48)
  w, state = _track(w0, steps=5, rank=rank)
  _, _, vt = np.linalg.svd(np.asarray(w, np.float64))
  # Gap s_6/s_7 = 1/0.7: the subspace itself, not just the error, is the exact one.
  assert _subspace_distance(state.basis[:, :rank], jnp.asarray(vt[:rank].T, jnp.float32)) < 1e-3
  assert _excess(w, state, rank) < 1e-6
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.ritz_values[:rank], s[:rank], rtol=1e-4)
  assert int(state.refreshes) == 0


def test_close_singular_values_at_the_cut_are_near_optimal():
  rank = 10
  s = np.linspace(3.0, 1.0, 48)
  s[rank] = s[rank - 1] * (1 - 1e-5)  # s_r and s_{r+1} nearly equal: the subspace is ill-posed
  w, state = _track(_with_spectrum(s, 64, 48), steps=10, rank=rank)
  assert _excess(w, state, rank) < 1e-4
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("rank", [3, 8, 12])
def test_repeated_singular_values_give_the_optimal_error(rank):
  # Clusters of equal values straddle the cut (rank 3 and 12) or end at it (rank 8); the optimal
  # projection is not unique, so compare errors only.
  s = np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32)
  w = _with_spectrum(s, 64, 48)
  state = _init(w, rank)
  for step in range(3):
    state = subspace.update_subspace(w, state, rank)
  w_hat = subspace.project(w, state, rank)
  np.testing.assert_allclose(subspace.optimality_ratio(w, w_hat, rank), 1.0, atol=1e-5)
  assert int(state.refreshes) == 0


def test_rank_deficient_matrix_uses_the_householder_fallback():
  # Rank 12 < K: W V is singular, Cholesky breaks down, Householder QR takes over.
  s = np.concatenate([np.linspace(2.0, 1.0, 12), np.zeros(36)])
  w = _with_spectrum(s, 64, 48)
  _, _, ok = subspace._cholesky_qr2(w @ jax.random.normal(jax.random.PRNGKey(0), (48, 20)))
  assert not bool(ok)
  state = _init(w, 10)
  state = subspace.update_subspace(w, state, 10)
  assert np.all(np.isfinite(state.basis))
  np.testing.assert_allclose(state.basis.T @ state.basis, np.eye(K), atol=1e-5)
  assert _excess(w, state, 10) < 1e-5
  assert int(state.refreshes) == 0


def test_orthonormalize_recovers_x_from_q_r_on_both_paths():
  x_good = jax.random.normal(jax.random.PRNGKey(4), (50, 8)) * jnp.logspace(0, 3, 8)
  x_bad = x_good.at[:, 3].set(x_good[:, 1])  # rank deficient
  for x in (x_good, x_bad):
    q, r = subspace._orthonormalize(x)
    np.testing.assert_allclose(q.T @ q, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(q @ r, x, atol=1e-4 * float(jnp.max(jnp.abs(x))))


def test_extra_iterations_absorb_a_moderate_change_before_any_refresh():
  # Fast decay: one iteration leaves the statistic above tolerance, a second converges.
  rank = 6
  w0 = _with_spectrum(0.7 ** np.arange(48), 64, 48)
  state = _init(w0, rank)
  w = _perturbation(w0, 2e-2, seed=7)
  adaptive = subspace.update_subspace(w, state, rank)
  assert int(adaptive.extra_iterations) >= 1 and int(adaptive.refreshes) == 0
  assert float(adaptive.drift) < subspace.DEFAULT_TOLERANCE
  assert _excess(w, adaptive, rank) < 1e-6
  fixed = subspace.update_subspace(w, state, rank, max_extra_iterations=0)
  assert int(fixed.extra_iterations) == 0 and int(fixed.refreshes) == 1
  # iterations=2 runs the same two iterations unconditionally.
  twice = subspace.update_subspace(w, state, rank, iterations=2, max_extra_iterations=0)
  np.testing.assert_allclose(twice.ritz_values, adaptive.ritz_values, rtol=1e-6)


# --- (d), (e): refreshes ---------------------------------------------------------------------

def test_sudden_change_triggers_a_refresh_and_recovers():
  rank = 8
  w_a = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=1)
  w_b = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=2)  # unrelated matrix
  _, state = _track(w_a, steps=3, rank=rank)
  assert int(state.refreshes) == 0
  state = subspace.update_subspace(w_b, state, rank)
  assert int(state.refreshes) == 1
  assert float(state.drift) > subspace.DEFAULT_TOLERANCE
  assert _excess(w_b, state, rank) < 1e-5
  # Without the refresh, one iteration from the stale basis would have been far from optimal.
  stale = _init(w_a, rank)
  no_refresh = subspace.update_subspace(w_b, stale, rank, tolerance=np.inf)
  assert _excess(w_b, no_refresh, rank) > 1e-2


def test_growing_direction_outside_the_subspace_is_caught_by_the_probe():
  # W + c·a bᵀ with b ⟂ the tracked k columns and a ⟂ the top-k left vectors leaves span(V)
  # invariant: subspace iteration gains nothing, yet the new direction beats σ_r.
  rank, k = 4, K
  s = np.linspace(2.0, 1.0, 48)
  w = _with_spectrum(s, 64, 48, seed=3)
  state = _init(w, rank)
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64))
  a = u[:, k + 5]
  b = vt[k:].T @ np.random.default_rng(0).normal(size=48 - k)
  b /= np.linalg.norm(b)
  w_new = w + jnp.asarray(5.0 * np.outer(a, b), jnp.float32)
  blind = subspace.update_subspace(w_new, state, rank, tolerance=np.inf)
  assert _excess(w_new, blind, rank) > 0.1  # the iteration alone stays on the wrong subspace
  # The probe is a warm-started power iteration in the complement: one call aligns it with the
  # new direction, the next sees ‖W p‖ > σ_r and refreshes.
  state = subspace.update_subspace(w_new, state, rank)
  state = subspace.update_subspace(w_new, state, rank)
  assert int(state.refreshes) == 1
  assert _excess(w_new, state, rank) < 1e-5


def test_zero_tolerance_forces_an_exact_refresh_every_call():
  w = jax.random.normal(jax.random.PRNGKey(5), (64, 48))
  state = _init(w, 6)
  for call in range(1, 4):
    w = _perturbation(w, 1e-2, seed=call)
    state = subspace.update_subspace(w, state, 6, tolerance=0.0)
    assert int(state.refreshes) == call
    exact = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    np.testing.assert_allclose(state.ritz_values, exact[:K], rtol=1e-5)
    np.testing.assert_allclose(subspace.project(w, state, 6), svd.truncate(w, 6), atol=1e-4)


# --- (f): a trajectory -----------------------------------------------------------------------

def _trajectory(init, track, rank, scale):
  """50 perturbed steps from a 1/√i spectrum: `state = init(w, rank)`, then per step
  `state, basis = track(w, state, rank)`. Returns (worst excess of the bases, last W, state)."""
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=4)
  state = init(w, rank)
  worst = 0.0
  for step in range(50):
    w = _perturbation(w, scale, seed=step)
    state, basis = track(w, state, rank)
    worst = max(worst, _basis_excess(w, basis, rank))
  return worst, w, state


def _update_track(w, state, rank):
  state = subspace.update_subspace(w, state, rank)
  return state, state.basis


@pytest.mark.parametrize("rank", [5, 12])
def test_trajectory_of_small_steps_stays_within_one_per_mille_without_refresh(rank):
  worst, w, state = _trajectory(_init, _update_track, rank, scale=2e-2)
  assert worst <= 1e-3
  assert int(state.refreshes) == 0
  # Ritz values track the singular values they approximate.
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.ritz_values[:rank], s[:rank], rtol=1e-3)


# --- (g), (h): traced ranks, vmap ------------------------------------------------------------

def test_traced_rank_compiles_once_and_matches_static_ranks():
  w0 = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=5)
  w1 = _perturbation(w0, 2e-2, seed=0)
  state = _init(w0, 12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced_update(w, state, rank):
    new_state = subspace.update_subspace(w, state, rank)
    return new_state, subspace.project(w, new_state, rank)

  for rank in (1, 5, 12):
    traced_state, traced_w_hat = traced_update(w1, state, jnp.int32(rank))
    static_state = subspace.update_subspace(w1, state, rank)
    np.testing.assert_allclose(traced_w_hat, subspace.project(w1, static_state, rank),
                               atol=1e-5)
    np.testing.assert_allclose(traced_state.drift, static_state.drift, atol=1e-7)


def test_vmap_over_ranks_matches_per_rank_updates():
  w0 = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=6)
  ranks = jnp.array([2, 7, 12], jnp.int32)
  states = jax.tree.map(lambda x: jnp.stack([x] * 3), _init(w0, 12))
  ws = jnp.stack([_perturbation(w0, 2e-2, seed=i) for i in range(3)])  # one student per rank
  ws = ws.at[2].set(_with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=7))  # drifts
  new_states = jax.jit(jax.vmap(subspace.update_subspace))(ws, states, ranks)
  np.testing.assert_array_equal(new_states.refreshes, [0, 0, 1])
  w_hats = jax.vmap(subspace.project)(ws, new_states, ranks)
  for i, rank in enumerate((2, 7, 12)):
    state_i = jax.tree.map(lambda x: x[i], states)
    single = subspace.update_subspace(ws[i], state_i, rank)
    assert int(single.refreshes) == int(new_states.refreshes[i])
    np.testing.assert_allclose(w_hats[i], subspace.project(ws[i], single, rank), atol=1e-5)
    assert _excess(ws[i], jax.tree.map(lambda x: x[i], new_states), rank) < 1e-3


def test_vmap_over_a_batch_of_matrices_refreshes_only_the_member_that_drifted():
  rank = 4
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  ws = jnp.stack([_with_spectrum(spectrum, 64, 48, seed=i) for i in range(3)])
  states = jax.vmap(lambda w: _init(w, rank))(ws)
  chex.assert_shape(states.basis, (3, 48, K))
  moved = jnp.stack([_perturbation(w, 1e-2, seed=i) for i, w in enumerate(ws)])
  moved = moved.at[1].set(_with_spectrum(spectrum, 64, 48, seed=9))  # replaced: must refresh
  new_states = jax.vmap(lambda w, s: subspace.update_subspace(w, s, rank))(moved, states)
  np.testing.assert_array_equal(new_states.refreshes, [0, 1, 0])
  for i in range(3):
    single = subspace.update_subspace(moved[i], jax.tree.map(lambda x: x[i], states), rank)
    np.testing.assert_allclose(new_states.ritz_values[i], single.ritz_values, rtol=1e-5)
    np.testing.assert_allclose(
        subspace.project(moved[i], jax.tree.map(lambda x: x[i], new_states), rank),
        subspace.project(moved[i], single, rank), atol=1e-5)


def test_no_gradient_flows_through_the_update():
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48)
  state = _init(w, 3)
  grad = jax.grad(lambda w: jnp.sum(subspace.update_subspace(w, state, 3).ritz_values))(w)
  np.testing.assert_array_equal(grad, 0.0)


# --- (i): rank bounds ------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1, 49, 2.0, True])
def test_init_rejects_ranks_out_of_range(rank):
  w = jnp.zeros((64, 48))
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.init_subspace(w, rank)


def test_update_and_right_basis_reject_ranks_out_of_range():
  w = jax.random.normal(jax.random.PRNGKey(9), (64, 48))
  state = subspace.init_subspace(w, 5)  # k = 15
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.update_subspace(w, state, 0)
  with pytest.raises(ValueError, match=r"1\.\.15.*\(48, 15\)"):
    subspace.update_subspace(w, state, 16)
  with pytest.raises(ValueError, match=r"1\.\.15"):
    subspace.right_basis(state, 20)
  with pytest.raises(ValueError, match=r"1\.\.15"):
    subspace.right_basis(state, 2.0)
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.update_subspace(w, state, 3.0)
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.optimality_ratio(w, w, 49)
  with pytest.raises(ValueError, match="does not fit"):
    subspace.update_subspace(w.T, state, 5)
  with pytest.raises(ValueError, match="iterations"):
    subspace.update_subspace(w, state, 5, iterations=0)


# --- streaming (stream_subspace): the same cases against the exact projection -----------------

def _init_stream(w, rank):
  return subspace.init_stream(w, rank, oversample=K - rank)


def _stream(w_start, steps, rank, scale=1e-2, **options):
  """init on w_start, then `steps` perturbed calls; returns the matrices, bases and last state."""
  state = _init_stream(w_start, rank)
  w, ws, bases = w_start, [], []
  for step in range(steps):
    w = _perturbation(w, scale, seed=100 + step)
    state, basis = subspace.stream_subspace(w, state, rank, **options)
    ws.append(w)
    bases.append(basis)
  return ws, bases, state


def test_stream_projection_images_are_w_times_basis_also_on_the_full_path():
  rank = 6
  w0 = _with_spectrum(0.7 ** np.arange(48), 64, 48)
  state = _init_stream(w0, rank)
  for step, (scale, tolerance) in enumerate([(2e-3, subspace.DEFAULT_TOLERANCE), (2e-3, 0.0)]):
    w = _perturbation(w0, scale, seed=300 + step)
    new_state, image_rows, ritz_rows = subspace.stream_projection(w, state, rank,
                                                                  tolerance=tolerance)
    basis = ritz_rows.T
    assert int(new_state.refreshes - state.refreshes) == (1 if tolerance == 0.0 else 0)
    np.testing.assert_allclose(image_rows, (w @ basis).T, atol=1e-5)
    v = subspace.stream_basis(basis, rank)
    np.testing.assert_allclose((image_rows.T @ v.T)[:, :], w @ v @ v.T, atol=1e-5)
    expected_state, expected_basis = subspace.stream_subspace(w, state, rank, tolerance=tolerance)
    np.testing.assert_array_equal(basis, expected_basis)
    state = new_state


def test_stream_basis_is_orthonormal_and_sorted_and_tracks_a_separated_spectrum():
  rank = 6
  # Steps of 0.2 % of rms(W) per entry: the subspace iterated on the previous W is good enough
  # for this W. (At 1 % the estimated excess, 1.2–1.7e-4 against a true 1.5–2.1e-4, is over the
  # tolerance and every call takes the full path: see the sudden-change test.)
  ws, bases, state = _stream(_with_spectrum(0.7 ** np.arange(48), 64, 48), steps=5, rank=rank,
                             scale=2e-3)
  w, basis = ws[-1], bases[-1]
  np.testing.assert_allclose(basis.T @ basis, np.eye(K), atol=1e-5)
  _, s, vt = np.linalg.svd(np.asarray(w, np.float64))
  # The Rayleigh–Ritz step is on the current W: the subspace is W's own, not the last step's.
  assert _subspace_distance(basis[:, :rank], jnp.asarray(vt[:rank].T, jnp.float32)) < 1e-2
  assert max(_basis_excess(w, b, rank) for w, b in zip(ws, bases)) < 2e-5
  np.testing.assert_allclose(state.ritz_values[:rank], s[:rank], rtol=1e-4)
  assert np.all(np.diff(np.asarray(state.ritz_values)) <= 0)
  np.testing.assert_array_equal(state.basis, basis)
  assert int(state.refreshes) == 0


def test_stream_close_singular_values_at_the_cut_are_near_optimal():
  rank = 10
  s = np.linspace(3.0, 1.0, 48)
  s[rank] = s[rank - 1] * (1 - 1e-5)
  ws, bases, state = _stream(_with_spectrum(s, 64, 48), steps=10, rank=rank)
  assert max(_basis_excess(w, b, rank) for w, b in zip(ws, bases)) < 1e-4
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("rank", [3, 8, 12])
def test_stream_repeated_singular_values_give_the_optimal_error(rank):
  w = _with_spectrum(np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32), 64, 48)
  state = _init_stream(w, rank)
  for _ in range(3):
    state, basis = subspace.stream_subspace(w, state, rank)
    w_hat = (w @ subspace.stream_basis(basis, rank)) @ subspace.stream_basis(basis, rank).T
    np.testing.assert_allclose(subspace.optimality_ratio(w, w_hat, rank), 1.0, atol=1e-5)
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("rank", [5, 12])
def test_stream_trajectory_of_small_steps_stays_within_one_in_ten_thousand_without_refresh(rank):
  # Steps of 1 % of rms(W) per entry, half those of `update_subspace`'s trajectory test: the
  # search subspace lags one iteration. (At 2 % rank 12 drifts around the tolerance and takes
  # the full path on 6 of 50 calls, worst excess 1.4e-4.)
  worst, w, state = _trajectory(_init_stream, subspace.stream_subspace, rank, scale=1e-2)
  assert worst <= 1e-4
  assert int(state.refreshes) == 0
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.ritz_values[:rank], s[:rank], rtol=1e-3)


def test_stream_sudden_change_takes_the_full_path_at_that_step():
  rank = 8
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  w_a = _with_spectrum(spectrum, 64, 48, seed=1)
  w_b = _with_spectrum(spectrum, 64, 48, seed=2)  # unrelated matrix
  _, _, state = _stream(w_a, steps=3, rank=rank)
  assert int(state.refreshes) == 0
  # Without the fallback, Rayleigh–Ritz in the stale subspace is far from optimal ...
  _, blind = subspace.stream_subspace(w_b, state, rank, tolerance=np.inf)
  assert _basis_excess(w_b, blind, rank) > 1e-2
  # ... with it, the very call that sees the new W returns a near-optimal basis.
  state, basis = subspace.stream_subspace(w_b, state, rank)
  assert int(state.refreshes) == 1
  assert _basis_excess(w_b, basis, rank) < 1e-5
  # And streaming goes on from there without further refreshes.
  state, basis = subspace.stream_subspace(_perturbation(w_b, 1e-2, seed=5), state, rank)
  assert int(state.refreshes) == 1


def test_stream_growing_direction_outside_the_subspace_is_caught_by_the_probe():
  rank, k = 4, K
  w = _with_spectrum(np.linspace(2.0, 1.0, 48), 64, 48, seed=3)
  state = _init_stream(w, rank)
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64))
  b = vt[k:].T @ np.random.default_rng(0).normal(size=48 - k)
  b /= np.linalg.norm(b)
  w_new = w + jnp.asarray(5.0 * np.outer(u[:, k + 5], b), jnp.float32)
  _, blind = subspace.stream_subspace(w_new, state, rank, tolerance=np.inf)
  assert _basis_excess(w_new, blind, rank) > 0.1
  for _ in range(2):
    state, basis = subspace.stream_subspace(w_new, state, rank)
  assert int(state.refreshes) >= 1
  assert _basis_excess(w_new, basis, rank) < 1e-5


def test_stream_zero_tolerance_takes_the_exact_path_every_call():
  w = jax.random.normal(jax.random.PRNGKey(5), (64, 48))
  state = _init_stream(w, 6)
  for call in range(1, 4):
    w = _perturbation(w, 1e-2, seed=call)
    state, basis = subspace.stream_subspace(w, state, 6, tolerance=0.0)
    assert int(state.refreshes) == call
    b = subspace.stream_basis(basis, 6)
    np.testing.assert_allclose((w @ b) @ b.T, svd.truncate(w, 6), atol=1e-4)


def test_stream_traced_rank_compiles_once_and_matches_static_ranks():
  w0 = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=5)
  w1 = _perturbation(w0, 2e-2, seed=0)
  state = _init_stream(w0, 12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced(w, state, rank):
    new_state, basis = subspace.stream_subspace(w, state, rank)
    return new_state, subspace.stream_basis(basis, rank)

  for rank in (1, 5, 12):
    traced_state, traced_basis = traced(w1, state, jnp.int32(rank))
    static_state, static_basis = subspace.stream_subspace(w1, state, rank)
    np.testing.assert_allclose(traced_basis @ traced_basis.T,
                               subspace.stream_basis(static_basis, rank)
                               @ subspace.stream_basis(static_basis, rank).T, atol=1e-5)
    np.testing.assert_allclose(traced_state.drift, static_state.drift, atol=1e-7)


def test_stream_vmap_over_matrices_takes_the_full_path_only_where_needed():
  rank = 4
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  ws = jnp.stack([_with_spectrum(spectrum, 64, 48, seed=i) for i in range(3)])
  states = jax.vmap(lambda w: _init_stream(w, rank))(ws)
  moved = jnp.stack([_perturbation(w, 1e-2, seed=i) for i, w in enumerate(ws)])
  moved = moved.at[1].set(_with_spectrum(spectrum, 64, 48, seed=9))
  new_states, bases = jax.vmap(lambda w, s: subspace.stream_subspace(w, s, rank))(moved, states)
  np.testing.assert_array_equal(new_states.refreshes, [0, 1, 0])
  for i in range(3):
    single_state, single = subspace.stream_subspace(moved[i], jax.tree.map(lambda x: x[i], states),
                                                    rank)
    np.testing.assert_allclose(new_states.ritz_values[i], single_state.ritz_values, rtol=1e-5)
    assert _basis_excess(moved[i], bases[i], rank) < 1e-4


def test_stream_if_is_lazy_and_exact_when_taken():
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=6)
  state = _init_stream(w, 5)
  moved = _perturbation(w, 1e-2, seed=1)
  kept = subspace.stream_if(jnp.bool_(False), moved, state, 5)
  chex.assert_trees_all_equal(kept, state)
  taken = subspace.stream_if(jnp.bool_(True), moved, state, 5)
  expected, _ = subspace.stream_subspace(moved, state, 5)
  chex.assert_trees_all_close(taken, expected, atol=1e-6)


def test_stream_passes_no_gradient_and_rejects_bad_ranks():
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48)
  state = _init_stream(w, 3)
  grad = jax.grad(lambda w: jnp.sum(subspace.stream_subspace(w, state, 3)[1]))(w)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.stream_subspace(w, state, 0)
  with pytest.raises(ValueError, match=r"1\.\.20"):
    subspace.stream_subspace(w, state, 21)
  with pytest.raises(ValueError, match="does not fit"):
    subspace.stream_subspace(w.T, state, 3)


# --- alternating (alternate_projection): one product per call, the two sides by turns ---------

def _init_alternating(w, rank):
  return subspace.init_alternating(w, rank, oversample=K - rank)


def _factors_excess(w, left, right, rank):
  """‖W − Ŵ‖_F / optimum − 1 for Ŵ = Σ_{i<r} left_iᵀ right_i, in float64."""
  with threadpool_limits(1, user_api="blas"):
    w64 = np.asarray(w, np.float64)
    w_hat = np.asarray(left, np.float64)[:rank].T @ np.asarray(right, np.float64)[:rank]
    singular_values = np.linalg.svd(w64, compute_uv=False)
    return np.linalg.norm(w64 - w_hat) / np.sqrt(np.sum(singular_values[rank:] ** 2)) - 1.0


def _alternate_track(w, state, rank):
  state, left, right = subspace.alternate_projection(w, state, rank)
  return state, (left, right)


def test_alternating_init_is_the_exact_pairs_and_the_first_call_is_optimal():
  w = _with_spectrum(0.8 ** np.arange(48), 64, 48, seed=2)
  state = _init_alternating(w, 6)
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64))
  chex.assert_shape((state.right_rows, state.left_rows), ((K, 48), (K, 64)))
  np.testing.assert_allclose(state.singular_values, s[:K], rtol=1e-5)
  assert _subspace_distance(state.right_rows[:6].T, jnp.asarray(vt[:6].T, jnp.float32)) < 1e-4
  assert _subspace_distance(state.left_rows[:6].T, jnp.asarray(u[:, :6], jnp.float32)) < 1e-4
  assert int(state.side) == 0
  new_state, left, right = subspace.alternate_projection(w, state, 6)
  np.testing.assert_allclose(left[:6].T @ right[:6], svd.truncate(w, 6), atol=1e-4)
  assert int(new_state.side) == 1 and int(new_state.refreshes) == 0


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_alternating_factors_on_each_side_and_a_separated_spectrum(shape):
  """A right call returns (W V)ᵀ and Vᵀ (orthonormal Ritz vectors); a left call Uᵀ (the unit
  images of those, orthonormal up to eps·σ_1²/(σ_i σ_j): exactly so in the leading rows it
  projects through) and Uᵀ W; each projects the current W near-optimally, and the sides take
  turns."""
  rank = 6
  w = _with_spectrum(0.7 ** np.arange(48), *shape)
  state = _init_alternating(w, rank)
  for call in range(6):
    w = _perturbation(w, 2e-3, seed=200 + call)
    searched_right = int(state.side) == 0
    state, left, right = subspace.alternate_projection(w, state, rank)
    assert int(state.side) == (1 if searched_right else 0)
    if searched_right:
      np.testing.assert_allclose(right @ right.T, np.eye(K), atol=1e-5)
      np.testing.assert_allclose(left, (w @ right.T).T, atol=1e-5)
    else:
      np.testing.assert_allclose(left[:rank] @ left[:rank].T, np.eye(rank), atol=1e-5)
      values = np.asarray(state.singular_values, np.float64)
      bound = 8 * np.finfo(np.float32).eps * values[0] ** 2 / np.outer(values, values)
      assert np.all(np.abs(left @ left.T - np.eye(K)) <= bound + 1e-6)
      np.testing.assert_allclose(right, left @ w, atol=1e-5)
      np.testing.assert_allclose(state.singular_values, np.linalg.norm(right, axis=1),
                                 rtol=1e-5)
    assert _factors_excess(w, left, right, rank) < 2e-5
    if searched_right:
      assert np.all(np.diff(np.asarray(state.singular_values)) <= 0)  # Ritz values, sorted
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.singular_values[:rank], s[:rank], rtol=1e-4)
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("decay, ranked", [(0.9, False), (0.5, True)])
def test_alternating_left_call_projects_through_its_rows_unless_rounding_could_cost(decay,
                                                                                   ranked):
  """A left call skips Rayleigh–Ritz (its left rows come back unchanged) while the rows'
  rounding costs < 1e-6 of the optimal error; for a spectrum spread over 0.5⁻¹⁹ it runs
  Rayleigh–Ritz instead, and its leading rows are orthonormal either way."""
  rank = 8
  w = _with_spectrum(decay ** np.arange(48), 64, 48, seed=6)
  state = _init_alternating(w, rank)
  w = _perturbation(w, 1e-3, seed=1)
  state, _ = _alternate_track(w, state, rank)                       # right call
  assert int(state.side) == 1
  w = _perturbation(w, 1e-3, seed=2)
  new_state, left, right = subspace.alternate_projection(w, state, rank)
  assert int(new_state.refreshes) == 0
  unchanged = np.array_equal(np.asarray(left), np.asarray(state.left_rows))
  assert unchanged == (not ranked)
  np.testing.assert_allclose(left[:rank] @ left[:rank].T, np.eye(rank),
                             atol=1e-6 if ranked else 1e-5)
  if not ranked:
    assert _factors_excess(w, left, right, rank) < 1e-5
  # (With σ_9/σ_1 = 0.5⁸ the optimal error energy is ≈ 1e-5 of ‖W‖², a hundred times eps·‖W‖²:
  # float32 tracking ends ≈ 3e-3 above it there, ranked or not; see Known limits.)


def test_unranked_gate_weighs_the_rounding_against_the_optimal_error():
  eps = float(np.finfo(np.float32).eps)
  values = jnp.asarray([4.0, 2.0, 1.0, 0.5], jnp.float32)
  total = jnp.float32(21.25 + 1.0)                     # Σ σ² = 21.25, plus 1.0 beyond k
  # r = 2: excess ≈ eps²·4⁴·2·(1/16 + 1/4) = 160 eps² against tail 1.25 + 1.0: far below.
  assert bool(subspace._unranked_is_near_optimal(total, jnp.float32(0.0), values, 2, eps))
  # The same spread with almost nothing left beyond the rank: the rounding dominates.
  tiny_tail = jnp.float32(21.25 + 1e-9)
  assert not bool(subspace._unranked_is_near_optimal(tiny_tail, jnp.float32(0.0), values, 4,
                                                      eps))


def test_leading_rows_zeroes_rows_past_a_traced_rank():
  rows = jnp.arange(12.0).reshape(4, 3)
  out = jax.jit(subspace.leading_rows)(rows, jnp.int32(2))
  np.testing.assert_array_equal(out, np.concatenate([rows[:2], np.zeros((2, 3))]))


def test_alternating_close_singular_values_at_the_cut_are_near_optimal():
  rank = 10
  s = np.linspace(3.0, 1.0, 48)
  s[rank] = s[rank - 1] * (1 - 1e-5)
  w = _with_spectrum(s, 64, 48)
  state, worst = _init_alternating(w, rank), 0.0
  for call in range(10):
    w = _perturbation(w, 1e-2, seed=100 + call)
    state, (left, right) = _alternate_track(w, state, rank)
    worst = max(worst, _factors_excess(w, left, right, rank))
  assert worst < 1e-4
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("rank", [3, 8, 12])
def test_alternating_repeated_singular_values_give_the_optimal_error(rank):
  w = _with_spectrum(np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32), 64, 48)
  state = _init_alternating(w, rank)
  for _ in range(4):  # two calls on each side
    state, (left, right) = _alternate_track(w, state, rank)
    w_hat = left[:rank].T @ right[:rank]
    np.testing.assert_allclose(subspace.optimality_ratio(w, w_hat, rank), 1.0, atol=1e-5)
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("rank", [5, 12])
def test_alternating_trajectory_of_small_steps_stays_within_one_in_ten_thousand(rank):
  # The streaming test's trajectory: half a power step per call instead of a whole one still
  # keeps every call's projection within 1e-4 of optimal (measured 1.1e-5 and 5.5e-5).
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=4)
  state, worst = _init_alternating(w, rank), 0.0
  for step in range(50):
    w = _perturbation(w, 1e-2, seed=step)
    state, (left, right) = _alternate_track(w, state, rank)
    worst = max(worst, _factors_excess(w, left, right, rank))
  assert worst <= 1e-4
  assert int(state.refreshes) == 0
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.singular_values[:rank], s[:rank], rtol=1e-3)
  # The statistic estimates the excess it guards (≈ ρ − 1), within a small factor.
  assert float(state.drift) < 1e-4


@pytest.mark.parametrize("side", [0, 1])
def test_alternating_sudden_change_takes_the_full_path_at_that_step(side):
  rank = 8
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  w_a = _with_spectrum(spectrum, 64, 48, seed=1)
  w_b = _with_spectrum(spectrum, 64, 48, seed=2)  # unrelated matrix
  state = _init_alternating(w_a, rank)
  for call in range(2 + side):
    state, _ = _alternate_track(_perturbation(w_a, 1e-2, seed=call), state, rank)
  assert int(state.side) == side and int(state.refreshes) == 0
  _, blind_left, blind_right = subspace.alternate_projection(w_b, state, rank,
                                                             tolerance=np.inf)
  assert _factors_excess(w_b, blind_left, blind_right, rank) > 1e-2
  state, (left, right) = _alternate_track(w_b, state, rank)
  assert int(state.refreshes) == 1
  assert _factors_excess(w_b, left, right, rank) < 1e-5
  for call in range(2):  # and it goes on from there, on both sides, without another
    w_b = _perturbation(w_b, 1e-2, seed=10 + call)
    state, (left, right) = _alternate_track(w_b, state, rank)
    assert _factors_excess(w_b, left, right, rank) < 1e-4
  assert int(state.refreshes) == 1


def test_alternating_growing_direction_outside_the_subspace_is_caught_by_the_probe():
  rank, k = 4, K
  w = _with_spectrum(np.linspace(2.0, 1.0, 48), 64, 48, seed=3)
  state = _init_alternating(w, rank)
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64))
  b = vt[k:].T @ np.random.default_rng(0).normal(size=48 - k)
  b /= np.linalg.norm(b)
  w_new = w + jnp.asarray(5.0 * np.outer(u[:, k + 5], b), jnp.float32)
  _, blind_left, blind_right = subspace.alternate_projection(w_new, state, rank,
                                                             tolerance=np.inf)
  assert _factors_excess(w_new, blind_left, blind_right, rank) > 0.1
  # The probe takes one power step per call, on alternating sides: within three calls it
  # sees ‖W p‖ > σ_r and the full path restores the optimal projection.
  for _ in range(3):
    state, (left, right) = _alternate_track(w_new, state, rank)
  assert int(state.refreshes) >= 1
  assert _factors_excess(w_new, left, right, rank) < 1e-5


def test_alternating_zero_tolerance_takes_the_exact_path_every_call():
  w = jax.random.normal(jax.random.PRNGKey(5), (64, 48))
  state = _init_alternating(w, 6)
  for call in range(1, 4):
    w = _perturbation(w, 1e-2, seed=call)
    state, left, right = subspace.alternate_projection(w, state, 6, tolerance=0.0)
    assert int(state.refreshes) == call
    np.testing.assert_allclose(left[:6].T @ right[:6], svd.truncate(w, 6), atol=1e-4)


def test_alternating_traced_rank_compiles_once_and_matches_static_ranks():
  w0 = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48, seed=5)
  w1 = _perturbation(w0, 2e-2, seed=0)
  state = _init_alternating(w0, 12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced(w, state, rank):
    new_state, left, right = subspace.alternate_projection(w, state, rank)
    return new_state, subspace.leading_rows(left, rank).T @ right

  for rank in (1, 5, 12):
    traced_state, traced_w_hat = traced(w1, state, jnp.int32(rank))
    static_state, left, right = subspace.alternate_projection(w1, state, rank)
    np.testing.assert_allclose(traced_w_hat, left[:rank].T @ right[:rank], atol=1e-5)
    np.testing.assert_allclose(traced_state.drift, static_state.drift, atol=1e-7)


def test_alternating_vmap_over_matrices_takes_the_full_path_only_where_needed():
  rank = 4
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  ws = jnp.stack([_with_spectrum(spectrum, 64, 48, seed=i) for i in range(3)])
  states = jax.vmap(lambda w: _init_alternating(w, rank))(ws)
  moved = jnp.stack([_perturbation(w, 1e-2, seed=i) for i, w in enumerate(ws)])
  moved = moved.at[1].set(_with_spectrum(spectrum, 64, 48, seed=9))
  new_states, lefts, rights = jax.vmap(
      lambda w, s: subspace.alternate_projection(w, s, rank))(moved, states)
  np.testing.assert_array_equal(new_states.refreshes, [0, 1, 0])
  for i in range(3):
    single_state, _, _ = subspace.alternate_projection(
        moved[i], jax.tree.map(lambda x: x[i], states), rank)
    np.testing.assert_allclose(new_states.singular_values[i], single_state.singular_values,
                               rtol=1e-5)
    assert _factors_excess(moved[i], lefts[i], rights[i], rank) < 1e-4


def test_alternating_passes_no_gradient_and_rejects_bad_ranks_and_shapes():
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), 64, 48)
  state = _init_alternating(w, 3)
  grad = jax.grad(lambda w: jnp.sum(subspace.alternate_projection(w, state, 3)[2]))(w)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    subspace.alternate_projection(w, state, 0)
  with pytest.raises(ValueError, match=r"1\.\.20"):
    subspace.alternate_projection(w, state, 21)
  with pytest.raises(ValueError, match="does not fit"):
    subspace.alternate_projection(w.T, state, 3)
  with pytest.raises(ValueError, match="do not fit"):
    subspace.alternate_projection(jnp.zeros((60, 48)), state, 3)
  with pytest.raises(ValueError, match="oversample"):
    subspace.init_alternating(w, 3, oversample=-1)
