"""Tests for lrnet/tracker.py: the alternating tracker against the exact truncated SVD."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from lrnet import svd
from lrnet import tracker

# 64×48 test matrices track K = 20 pairs whatever the rank, so that they share one compilation.
K = 20


def _orthogonal(rng, size):
  q, r = np.linalg.qr(rng.normal(size=(size, size)))
  return q * np.sign(np.diag(r))


def _with_spectrum(singular_values, m=64, n=48, seed=0):
  """W = U diag(s) Vᵀ with Haar-random U [m, p], V [n, p], p = len(s)."""
  rng = np.random.default_rng(seed)
  p = len(singular_values)
  u = _orthogonal(rng, m)[:, :p]
  v = _orthogonal(rng, n)[:, :p]
  return jnp.asarray((u * np.asarray(singular_values)) @ v.T, jnp.float32)


def _perturbation(w, scale, seed):
  """An Adam-like step: every entry moves by ±scale·rms(W), signs of a low-rank gradient."""
  rng = np.random.default_rng(seed)
  gradient = rng.normal(size=(w.shape[0], 8)) @ rng.normal(size=(8, w.shape[1]))
  w = np.asarray(w)
  return jnp.asarray(w - scale * np.sqrt(np.mean(w**2)) * np.sign(gradient), jnp.float32)


def _init(w, rank):
  return tracker.init(w, rank, oversample=K - rank)


def _excess(w, left, right, rank):
  """‖W − Ŵ‖_F / optimum − 1 for Ŵ = Σ_{i<r} left_iᵀ right_i, in float64."""
  with threadpool_limits(1, user_api="blas"):
    w64 = np.asarray(w, np.float64)
    w_hat = np.asarray(left, np.float64)[:rank].T @ np.asarray(right, np.float64)[:rank]
    singular_values = np.linalg.svd(w64, compute_uv=False)
    return np.linalg.norm(w64 - w_hat) / np.sqrt(np.sum(singular_values[rank:] ** 2)) - 1.0


def _subspace_distance(a, b):
  """‖A Aᵀ − B Bᵀ‖_2 for orthonormal columns A, B: the sine of the largest principal angle."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a @ a.T - b @ b.T, ord=2))


def _track(w, state, rank):
  state, left, right = tracker.project(w, state, rank)
  return state, (left, right)


def test_init_is_the_exact_pairs_and_the_first_call_is_optimal():
  w = _with_spectrum(0.8 ** np.arange(48), seed=2)
  state = _init(w, 6)
  u, s, vt = np.linalg.svd(np.asarray(w, np.float64))
  chex.assert_shape((state.right_rows, state.left_rows), ((K, 48), (K, 64)))
  np.testing.assert_allclose(state.singular_values, s[:K], rtol=1e-5)
  assert _subspace_distance(state.right_rows[:6].T, vt[:6].T) < 1e-4
  assert _subspace_distance(state.left_rows[:6].T, u[:, :6]) < 1e-4
  assert (int(state.side), int(state.width)) == (0, K)
  new_state, left, right = tracker.project(w, state, 6)
  np.testing.assert_allclose(left[:6].T @ right[:6], svd.truncate(w, 6), atol=1e-4)
  assert int(new_state.side) == 1 and int(new_state.refreshes) == 0


@pytest.mark.parametrize("shape", [(64, 48), (48, 64)])
def test_factors_on_each_side_and_a_separated_spectrum(shape):
  """A right call returns (W V)ᵀ and Vᵀ (orthonormal Ritz vectors); a left call Uᵀ (the unit
  images of those, orthonormal up to eps·σ_1²/(σ_i σ_j)) and Uᵀ W; each projects the current W
  near-optimally, and the sides take turns."""
  rank = 6
  w = _with_spectrum(0.7 ** np.arange(48), *shape)
  state = _init(w, rank)
  for call in range(6):
    w = _perturbation(w, 2e-3, seed=200 + call)
    searched_right = int(state.side) == 0
    state, left, right = tracker.project(w, state, rank)
    assert int(state.side) == (1 if searched_right else 0)
    if searched_right:
      np.testing.assert_allclose(right @ right.T, np.eye(K), atol=1e-5)
      np.testing.assert_allclose(left, (w @ right.T).T, atol=1e-5)
      assert np.all(np.diff(np.asarray(state.singular_values)) <= 0)  # Ritz values, sorted
    else:
      np.testing.assert_allclose(left[:rank] @ left[:rank].T, np.eye(rank), atol=1e-5)
      values = np.asarray(state.singular_values, np.float64)
      bound = 8 * np.finfo(np.float32).eps * values[0] ** 2 / np.outer(values, values)
      assert np.all(np.abs(left @ left.T - np.eye(K)) <= bound + 1e-6)
      np.testing.assert_allclose(right, left @ w, atol=1e-5)
    assert _excess(w, left, right, rank) < 2e-5
  s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
  np.testing.assert_allclose(state.singular_values[:rank], s[:rank], rtol=1e-4)
  assert int(state.refreshes) == 0


@pytest.mark.parametrize("decay, ranked", [(0.9, False), (0.5, True)])
def test_left_call_projects_through_its_rows_unless_rounding_could_cost(decay, ranked):
  """A left call skips Rayleigh–Ritz (its rows come back unchanged) while the rows' rounding
  costs < 1e-6 of the optimal error; for a spectrum spread over 0.5⁻¹⁹ it runs Rayleigh–Ritz."""
  rank = 8
  w = _with_spectrum(decay ** np.arange(48), seed=6)
  state = _init(w, rank)
  state, _ = _track(_perturbation(w, 1e-3, seed=1), state, rank)           # right call
  w = _perturbation(w, 1e-3, seed=2)
  new_state, left, right = tracker.project(w, state, rank)
  assert int(new_state.refreshes) == 0
  assert np.array_equal(np.asarray(left), np.asarray(state.left_rows)) == (not ranked)
  np.testing.assert_allclose(left[:rank] @ left[:rank].T, np.eye(rank),
                             atol=1e-6 if ranked else 1e-5)


@pytest.mark.parametrize("skew", [1e-3, 0.3])  # ‖X Xᵀ − I‖_F ≈ 0.02: series; ≈ 5: Cholesky
def test_rayleigh_ritz_is_exact_whichever_way_it_orthonormalises(skew):
  """T X orthonormal, T Z orthogonal with squared norms λ, λ the exact Ritz values of W in
  span(X), padding rows zero; also batched, one member of each kind."""
  rng = np.random.default_rng(8)
  w = np.asarray(_with_spectrum(0.8 ** np.arange(48)), np.float64)
  width = 14
  rows = np.zeros((K, 48))
  rows[:width] = _orthogonal(rng, 48)[:width] + skew * rng.normal(size=(width, 48))
  active = jnp.arange(K) < width

  def ritz(rows):
    rows = jnp.asarray(rows, jnp.float32)
    images = rows @ jnp.asarray(w.T, jnp.float32)
    return tracker._rayleigh_ritz(rows @ rows.T, images @ images.T, active)

  q = np.linalg.qr(rows[:width].T)[0].T                        # float64 reference
  exact = np.sort(np.linalg.eigvalsh(q @ w.T @ w @ q.T))[::-1]
  other = rows.copy()
  other[:width] = _orthogonal(rng, 48)[:width] + (0.3 if skew < 0.1 else 1e-3) * rng.normal(
      size=(width, 48))
  batched = jax.vmap(ritz)(jnp.asarray(np.stack([rows, other])))
  for eigenvalues, to_ritz in (ritz(rows), jax.tree.map(lambda a: a[0], batched)):
    vectors = np.asarray(to_ritz, np.float64) @ rows
    images = vectors @ w.T
    np.testing.assert_allclose(vectors[:width] @ vectors[:width].T, np.eye(width), atol=1e-5)
    np.testing.assert_array_equal(to_ritz[width:], 0.0)
    np.testing.assert_allclose(images @ images.T, np.diag(eigenvalues), atol=1e-5)
    np.testing.assert_allclose(eigenvalues[:width], exact, rtol=1e-4, atol=1e-6)


def test_vmap_ranks_the_left_call_only_of_the_member_that_needs_it():
  """Batched, a left call runs Rayleigh–Ritz for all members where one needs it, and each
  member keeps what it would compute alone: rows unchanged for the one that does not."""
  rank = 8
  ws = [_with_spectrum(decay ** np.arange(48), seed=6) for decay in (0.9, 0.5)]
  states = [_init(w, rank) for w in ws]
  states = [_track(_perturbation(w, 1e-3, seed=1), s, rank)[0] for w, s in zip(ws, states)]
  moved = [_perturbation(w, 1e-3, seed=2) for w in ws]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  batched = jax.jit(jax.vmap(lambda w, s: tracker.project(w, s, rank)))
  new_states, lefts, rights = batched(jnp.stack(moved), stacked)
  np.testing.assert_array_equal(lefts[0], states[0].left_rows)     # unranked: its own rows
  assert not np.allclose(lefts[1], states[1].left_rows)
  for i in range(2):
    alone_state, left, right = tracker.project(moved[i], states[i], rank)
    np.testing.assert_allclose(lefts[i][:rank].T @ rights[i][:rank], left[:rank].T @ right[:rank],
                               atol=1e-5)
    np.testing.assert_allclose(new_states.singular_values[i], alone_state.singular_values,
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_states.refreshes, [0, 0])


def test_unranked_gate_weighs_the_rounding_against_the_optimal_error():
  eps = float(np.finfo(np.float32).eps)
  values = jnp.asarray([4.0, 2.0, 1.0, 0.5], jnp.float32)
  total = jnp.float32(21.25 + 1.0)                     # Σ σ² = 21.25, plus 1.0 beyond k
  # r = 2: excess ≈ eps²·4⁴·2·(1/16 + 1/4) = 160 eps² against tail 1.25 + 1.0: far below.
  assert bool(tracker._unranked_is_near_optimal(total, jnp.float32(0.0), values, 2, eps))
  tiny_tail = jnp.float32(21.25 + 1e-9)  # nothing left beyond the rank: rounding dominates
  assert not bool(tracker._unranked_is_near_optimal(tiny_tail, jnp.float32(0.0), values, 4, eps))


def test_leading_rows_zeroes_rows_past_a_traced_rank():
  rows = jnp.arange(12.0).reshape(4, 3)
  out = jax.jit(tracker.leading_rows)(rows, jnp.int32(2))
  np.testing.assert_array_equal(out, np.concatenate([rows[:2], np.zeros((2, 3))]))


@pytest.mark.parametrize("spectrum, rank, steps, scale, bound", [
    # close singular values at the cut
    (np.concatenate([np.linspace(3.0, 1.0, 48)[:10], [np.linspace(3.0, 1.0, 48)[9] * (1 - 1e-5)],
                     np.linspace(3.0, 1.0, 48)[11:]]), 10, 10, 1e-2, 1e-4),
    # a trajectory of small steps on a slowly decaying spectrum
    (1 / np.sqrt(np.arange(1, 49)), 5, 50, 1e-2, 1e-4),
    (1 / np.sqrt(np.arange(1, 49)), 12, 50, 1e-2, 1e-4),
    # repeated singular values, W not moving
    (np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32), 3, 4, 0.0, 1e-5),
    (np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32), 8, 4, 0.0, 1e-5),
    (np.array([4.0] * 8 + [2.0] * 8 + [1.0] * 32), 12, 4, 0.0, 1e-5),
])
def test_every_call_projects_near_optimally_without_refresh(spectrum, rank, steps, scale, bound):
  w = _with_spectrum(spectrum, seed=4)
  state, worst = _init(w, rank), 0.0
  for step in range(steps):
    if scale:
      w = _perturbation(w, scale, seed=step)
    state, (left, right) = _track(w, state, rank)
    worst = max(worst, _excess(w, left, right, rank))
  assert worst <= bound
  assert int(state.refreshes) == 0
  assert float(state.drift) < 1e-4  # the certificate estimates the excess it guards


@pytest.mark.parametrize("side", [0, 1])
def test_sudden_change_is_refreshed_at_that_call_and_keeps_the_phase(side):
  rank = 8
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  w_a, w_b = _with_spectrum(spectrum, seed=1), _with_spectrum(spectrum, seed=2)
  state = _init(w_a, rank)
  for call in range(2 + side):
    state, _ = _track(_perturbation(w_a, 1e-2, seed=call), state, rank)
  assert int(state.side) == side and int(state.refreshes) == 0
  _, blind_left, blind_right = tracker.project(w_b, state, rank, tolerance=np.inf)
  assert _excess(w_b, blind_left, blind_right, rank) > 1e-2
  state, (left, right) = _track(w_b, state, rank)
  assert int(state.refreshes) == 1 and int(state.side) == 1 - side
  assert _excess(w_b, left, right, rank) < 1e-5
  for call in range(2):  # and it goes on from there, on both sides, without another
    w_b = _perturbation(w_b, 1e-2, seed=10 + call)
    state, (left, right) = _track(w_b, state, rank)
    assert _excess(w_b, left, right, rank) < 1e-4
  assert int(state.refreshes) == 1


def test_growing_direction_outside_the_tracked_rows_is_caught_by_the_probe():
  rank = 4
  w = _with_spectrum(np.linspace(2.0, 1.0, 48), seed=3)
  state = _init(w, rank)
  u, _, vt = np.linalg.svd(np.asarray(w, np.float64))
  outside = vt[K:].T @ np.random.default_rng(0).normal(size=48 - K)
  outside /= np.linalg.norm(outside)
  w_new = w + jnp.asarray(5.0 * np.outer(u[:, K + 5], outside), jnp.float32)
  _, blind_left, blind_right = tracker.project(w_new, state, rank, tolerance=np.inf)
  assert _excess(w_new, blind_left, blind_right, rank) > 0.1
  # One power step of the probe per call, on alternating sides: within three calls it sees
  # ‖W p‖ > σ_r and the refresh restores the optimal projection.
  for _ in range(3):
    state, (left, right) = _track(w_new, state, rank)
  assert int(state.refreshes) >= 1
  assert _excess(w_new, left, right, rank) < 1e-5


def test_zero_tolerance_refreshes_every_call():
  w = jax.random.normal(jax.random.PRNGKey(5), (64, 48))
  state = _init(w, 6)
  for call in range(1, 4):
    w = _perturbation(w, 1e-2, seed=call)
    state, left, right = tracker.project(w, state, 6, tolerance=0.0)
    assert int(state.refreshes) == call
    np.testing.assert_allclose(left[:6].T @ right[:6], svd.truncate(w, 6), atol=1e-4)


def test_traced_rank_compiles_once_and_matches_static_ranks():
  w0 = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), seed=5)
  w1 = _perturbation(w0, 2e-2, seed=0)
  state = _init(w0, 12)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def traced(w, state, rank):
    new_state, left, right = tracker.project(w, state, rank)
    return new_state, tracker.leading_rows(left, rank).T @ right

  for rank in (1, 5, 12):
    traced_state, traced_w_hat = traced(w1, state, jnp.int32(rank))
    static_state, left, right = tracker.project(w1, state, rank)
    np.testing.assert_allclose(traced_w_hat, left[:rank].T @ right[:rank], atol=1e-5)
    np.testing.assert_allclose(traced_state.drift, static_state.drift, atol=1e-7)


def test_a_padded_state_computes_what_the_unpadded_one_does():
  """Rows past the width stay zero and never enter the projection: a member padded to the
  batch's size tracks what it would alone, call after call on both sides."""
  rank = 5
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)), seed=7)
  alone, padded = tracker.init(w, rank, oversample=5), tracker.init(w, rank, oversample=5, pad_to=K)
  assert (alone.right_rows.shape[0], padded.right_rows.shape[0], int(padded.width)) == (10, K, 10)
  for step in range(8):
    w = _perturbation(w, 1e-2, seed=50 + step)
    alone, left, right = tracker.project(w, alone, rank)
    padded, padded_left, padded_right = tracker.project(w, padded, rank)
    np.testing.assert_allclose(padded_left[:rank].T @ padded_right[:rank],
                               left[:rank].T @ right[:rank], atol=1e-5)
    np.testing.assert_array_equal(padded.right_rows[10:], 0.0)
    np.testing.assert_array_equal(padded.left_rows[10:], 0.0)
  np.testing.assert_allclose(padded.singular_values[:10], alone.singular_values, rtol=1e-5)


def test_vmap_over_members_refreshes_only_the_one_that_drifted_and_keeps_them_in_step():
  spectrum = 1 / np.sqrt(np.arange(1, 49))
  ranks = (2, 4, 6)
  ws = [_with_spectrum(spectrum, seed=i) for i in range(3)]
  states = [tracker.init(w, r, oversample=6, pad_to=12) for w, r in zip(ws, ranks)]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
  moved = jnp.stack([_perturbation(w, 1e-2, seed=i) for i, w in enumerate(ws)])
  moved = moved.at[1].set(_with_spectrum(spectrum, seed=9))
  batched = jax.jit(jax.vmap(lambda w, s, r: tracker.project(w, s, r)))
  new_states, lefts, rights = batched(moved, stacked, jnp.asarray(ranks))
  np.testing.assert_array_equal(new_states.refreshes, [0, 1, 0])
  np.testing.assert_array_equal(new_states.side, [1, 1, 1])  # the refresh kept the phase
  for i, rank in enumerate(ranks):
    _, left, right = tracker.project(moved[i], states[i], rank)
    np.testing.assert_allclose(lefts[i][:rank].T @ rights[i][:rank], left[:rank].T @ right[:rank],
                               atol=1e-4)
    assert _excess(moved[i], lefts[i], rights[i], rank) < 1e-4


def test_optimality_ratio_is_one_for_truncate_and_above_for_others():
  w = _with_spectrum(0.8 ** np.arange(48), seed=3)
  np.testing.assert_allclose(tracker.optimality_ratio(w, svd.truncate(w, 5), 5), 1.0, atol=1e-5)
  assert float(tracker.optimality_ratio(w, jnp.zeros_like(w), 5)) > 1.5


def test_no_gradient_and_bad_ranks_and_shapes_are_refused():
  w = _with_spectrum(1 / np.sqrt(np.arange(1, 49)))
  state = _init(w, 3)
  grad = jax.grad(lambda w: jnp.sum(tracker.project(w, state, 3)[2]))(w)
  np.testing.assert_array_equal(grad, 0.0)
  with pytest.raises(ValueError, match=r"1\.\.48.*\(64, 48\)"):
    tracker.project(w, state, 0)
  with pytest.raises(ValueError, match=r"1\.\.20"):
    tracker.project(w, state, 21)
  with pytest.raises(ValueError, match="do not fit"):
    tracker.project(w.T, state, 3)
  with pytest.raises(ValueError, match="oversample"):
    tracker.init(w, 3, oversample=-1)
  with pytest.raises(ValueError, match="pad_to"):
    tracker.init(w, 3, oversample=2, pad_to=4)


def test_a_start_of_exactly_rank_r_stops_refreshing_once_updates_give_it_a_tail():
  """A whitened truncation starts straight-through training from a W of rank exactly r: its
  tail is only the updates since, and the certificate settles near 2e-4. Under the default
  tolerance the calls then stop refreshing (under 1e-4 every call would), and Ŵ stays optimal."""
  key = jax.random.PRNGKey(0)
  u, s, vt = jnp.linalg.svd(jax.random.normal(key, (512, 512)) / np.sqrt(512))
  w = (u[:, :10] * s[:10]) @ vt[:10]
  state = tracker.init(w, 10)
  refreshes = []
  for call in range(40):  # Adam-like steps: every entry moves by 1e-3
    w = w + 1e-3 * jnp.sign(jax.random.normal(jax.random.fold_in(key, call), w.shape))
    state, left, right = tracker.project(w, state, 10)
    refreshes.append(int(state.refreshes))
  assert refreshes[-1] == refreshes[19] < 20, refreshes
  w_hat = tracker.leading_rows(left, 10).T @ right
  assert float(tracker.optimality_ratio(w, w_hat, 10)) <= 1.001


def test_inside_refresh_left_out_calls_build_no_refresh_and_compute_the_same():
  """`sweep.step_flops` lowers a step there: XLA's cost analysis would otherwise charge every call
  with the refresh's SVD, a branch a trained teacher's calls do not take."""
  key = jax.random.PRNGKey(3)
  w = jax.random.normal(key, (256, 192))
  state = tracker.init(w, 8)
  moved = w + 1e-3 * jax.random.normal(jax.random.fold_in(key, 1), w.shape)
  flops = lambda: jax.jit(lambda w, s: tracker.project(w, s, 8)[1]).lower(
      moved, state).cost_analysis()["flops"]
  with_refresh = flops()
  with tracker.refresh_left_out():
    without = flops()
    lean_state, lean_left, lean_right = tracker.project(moved, state, 8)
  assert without < with_refresh / 2, (without, with_refresh)
  new_state, left, right = tracker.project(moved, state, 8)
  assert int(new_state.refreshes) == int(lean_state.refreshes) == 0
  np.testing.assert_array_equal(lean_left, left)
  np.testing.assert_array_equal(lean_right, right)
