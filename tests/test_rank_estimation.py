"""Tests for lrnet/rank_estimation.py and experiments/rank_game.py: ranks hidden in black-box
functions (autodiff and finite differences), refusals to guess."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rank_game
from lrnet import rank_estimation

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _uniform(key, shape, high):
  return jax.random.uniform(key, shape, jnp.float32, 0.0, high)


def _normal(key, shape, scale=1.0):
  return scale * jax.random.normal(key, shape, jnp.float32)


# ------------------------------------------------------------------------------------------------
# The game itself.


def test_game_autodiff_names_every_rank():
  result = rank_game.play(rounds=20, seed=713, estimator="autodiff")
  assert [round_.answer for round_ in result.rounds] == [round_.rank for round_ in result.rounds]
  assert result.right == 20 and result.won
  # At least `oversampling` gradients beyond the rank, and a few probes more: never fewer.
  assert all(round_.queries >= round_.rank + 10 for round_ in result.rounds)


def test_game_draws_follow_the_notebook_key_usage():
  import random  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(713)
  key_after, rank, w1, w2 = rank_game.hermione_chooses(key, random.Random(713))
  assert rank == random.Random(713).randint(1, 95)
  assert w1.shape == (rank, 100) and w2.shape == (100, rank) and w1.dtype == jnp.float32
  with jax.threefry_partitionable(False):
    key_1, subkey_1 = jax.random.split(key)
    key_2, subkey_2 = jax.random.split(key_1)
    expected_w1 = jax.random.uniform(subkey_1, (rank, 100), maxval=100., minval=0.)
    expected_w2 = jax.random.uniform(subkey_2, (100, rank), maxval=100., minval=0.)
  np.testing.assert_array_equal(w1, expected_w1)
  np.testing.assert_array_equal(w2, expected_w2)
  np.testing.assert_array_equal(key_after, key_2)
  assert 0.0 <= float(w1.min()) and float(w1.max()) < 100.0
  x = jnp.linspace(-1e-3, 1e-3, 100)
  w1_64, w2_64, x_64 = (np.asarray(a, np.float64) for a in (w1, w2, x))
  expected = np.sum(np.sin(w2_64 @ np.cos(w1_64 @ x_64)) ** 2)  # ‖sin(W₂ cos(W₁ x))‖²
  np.testing.assert_allclose(rank_game.hermione_function(w1, w2)(x), expected, rtol=1e-3)


def test_rank_game_entry_point_plays_and_prints_the_score():
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.rank_game", "--rounds=3", "--verbose"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert completed.returncode == 0, completed.stderr
  assert "score: 3/3 right (100 %)" in completed.stdout
  assert completed.stdout.count("round ") == 3
  assert "queries per round: mean" in completed.stdout and "wall time:" in completed.stdout


@pytest.mark.parametrize("flag", ["--rounds=0", "--estimator=guess", "--no_such_flag"])
def test_rank_game_bad_flag_is_one_line_and_nonzero_exit(flag):
  completed = subprocess.run(
      [sys.executable, "-m", "experiments.rank_game", flag],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert completed.returncode == 2
  assert completed.stderr.startswith("error: ") and completed.stderr.count("\n") == 1
  assert completed.stdout == ""


# ------------------------------------------------------------------------------------------------
# Variants the game does not cover.


def _sin_cos(dim, rank, weight_scale, seed):
  """The game's function with other sizes and weight scales; W₁ has rank `rank`."""
  key_1, key_2 = jax.random.split(jax.random.PRNGKey(seed))
  w1 = _uniform(key_1, (rank, dim), weight_scale)
  w2 = _uniform(key_2, (dim, rank), weight_scale)
  return lambda x: jnp.sum(jnp.square(jnp.sin(w2 @ jnp.cos(w1 @ x))))


@pytest.mark.parametrize("dim, rank, weight_scale", [
    (30, 7, 100.0),     # another input dimension
    (40, 35, 100.0),    # rank dim − 5
    (60, 12, 0.05),     # small weights: f varies on a scale of x far above 1
])
def test_autodiff_finds_the_rank(dim, rank, weight_scale):
  f = _sin_cos(dim, rank, weight_scale, seed=dim + rank)
  estimate = rank_estimation.estimate_rank(f, dim, key=jax.random.PRNGKey(0))
  assert estimate.rank == rank
  assert estimate.gap > estimate.threshold and estimate.samples >= rank + 10
  # Float32 gradients: the rank-th normalised singular value is far above the tail.
  assert estimate.singular_values[rank - 1] > 1e3 * max(estimate.singular_values[rank:].max(),
                                                        1e-12)
  assert estimate.queries >= estimate.samples and estimate.step is None


def test_autodiff_three_map_composition_sees_the_bottleneck():
  # f(x) = Σ sin(W₃ tanh(A (B x)))²: the first linear map A B (48 × 50) has rank 9.
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  a, b = _normal(keys[0], (48, 9)), _normal(keys[1], (9, 50), 0.3)
  w3 = _normal(keys[2], (20, 48), 0.5)
  f = lambda x: jnp.sum(jnp.square(jnp.sin(w3 @ jnp.tanh(a @ (b @ x)))))
  estimate = rank_estimation.estimate_rank(f, 50, key=jax.random.PRNGKey(1))
  assert estimate.rank == 9


def test_full_rank_is_reported_when_it_stands_clear_of_the_noise():
  w = _normal(jax.random.PRNGKey(4), (16, 16))
  f = lambda x: jnp.sum(jnp.sin(w @ x))
  estimate = rank_estimation.estimate_rank(f, 16, key=jax.random.PRNGKey(0))
  assert estimate.rank == 16 and estimate.samples >= 26


@pytest.mark.parametrize("dim, rank", [(20, 4), (24, 19)])
def test_finite_differences_find_the_rank(dim, rank):
  f = _sin_cos(dim, rank, 1.0, seed=rank)
  estimate = rank_estimation.estimate_rank(f, dim, key=jax.random.PRNGKey(2),
                                           differentiable=False)
  assert estimate.rank == rank
  # Five-point stencil: 4·dim evaluations per gradient, plus the step search.
  assert estimate.queries > 4 * dim * estimate.samples
  assert estimate.step is not None and math.log2(estimate.step).is_integer()
  assert 0 < estimate.precision < 0.1


def test_finite_differences_of_a_numpy_function_one_call_per_point():
  rng = np.random.default_rng(5)
  w1 = rng.normal(size=(3, 10))
  w2 = rng.normal(size=(6, 3))
  calls = []

  def f(x):  # plain NumPy in float64, not traceable
    calls.append(1)
    return float(np.sum(np.tanh(w2 @ np.sin(w1 @ x)) ** 2))

  estimate = rank_estimation.estimate_rank(f, 10, key=jax.random.PRNGKey(0),
                                           differentiable=False, vectorized=False,
                                           dtype=np.float64)
  assert estimate.rank == 3
  assert estimate.queries == len(calls)
  # Float64 differences are far more accurate than float32 ones.
  assert estimate.precision < 1e-6


# ------------------------------------------------------------------------------------------------
# Refusing to guess.


@pytest.mark.parametrize("differentiable", [True, False])
def test_constant_function_raises(differentiable):
  with pytest.raises(ValueError, match="cannot determine the rank"):
    rank_estimation.estimate_rank(lambda x: jnp.sum(0.0 * x) + 3.0, 8,
                                  key=jax.random.PRNGKey(0), differentiable=differentiable)


def test_nan_function_raises():
  with pytest.raises(ValueError, match="cannot determine the rank"):
    rank_estimation.estimate_rank(lambda x: jnp.sum(x) * jnp.nan, 8, key=jax.random.PRNGKey(0))


def test_smoothly_decaying_spectrum_raises_instead_of_guessing():
  # ∇f = diag(a) cos(x): singular values ∝ a_i, which fall by 1.58× per index from 1 to 1e-12
  # and cross the float32 rounding level with no gap anywhere.
  dim = 60
  weights = jnp.asarray(10.0 ** (-12.0 * np.arange(dim) / (dim - 1)), jnp.float32)
  with pytest.raises(ValueError, match="cannot determine the rank: no significant gap"):
    rank_estimation.estimate_rank(lambda x: jnp.sum(weights * jnp.sin(x)), dim,
                                  key=jax.random.PRNGKey(0))


def test_budget_spent_before_a_gap_raises():
  f = _sin_cos(30, 20, 100.0, seed=1)
  with pytest.raises(ValueError, match="max_queries=15 spent"):
    rank_estimation.estimate_rank(f, 30, key=jax.random.PRNGKey(0), max_queries=15)


@pytest.mark.parametrize("bad", [dict(dim=0), dict(dim=2.5), dict(dim=4, oversampling=0)])
def test_bad_arguments_raise(bad):
  with pytest.raises(ValueError, match="must be a positive integer"):
    rank_estimation.estimate_rank(jnp.sum, key=jax.random.PRNGKey(0), **bad)


# ------------------------------------------------------------------------------------------------
# The cut rule on hand-made spectra.


def test_choose_cut_on_a_hand_made_spectrum():
  # q = 40 rows in dim = 20, δ = 1e-6, σ₁ = 4: after k = 3 the predicted noise is
  # ν₃ = 1e-6 (√37 + √17) / (√20 · 4) = 5.705e-7 (normalised). A measured tail of 2e-7 is
  # noise (≤ 10 ν₃) and is the gap's denominator; the 37 × 17 noise block spreads
  # (√37 + √17)/(√37 − √17) = 5.08, so the gap must exceed 10.2.
  noise = 1e-6 * (math.sqrt(37) + math.sqrt(17)) / (math.sqrt(20) * 4.0)
  spread = (math.sqrt(37) + math.sqrt(17)) / (math.sqrt(37) - math.sqrt(17))
  spectrum = 4.0 * np.array([1.0, 0.5, 0.25] + [2e-7] * 17)
  cut = rank_estimation.choose_cut(spectrum, samples=40, dim=20, precision=1e-6)
  assert cut.rank == 3 and cut.significant
  np.testing.assert_allclose(cut.gap, 0.25 / 2e-7, rtol=1e-12)
  np.testing.assert_allclose(cut.threshold, 2 * spread, rtol=1e-12)
  # Exact zeros carry no information: the tail is floored at ν₃ / 10.
  zeros = 4.0 * np.array([1.0, 0.5, 0.25] + [0.0] * 17)
  cut = rank_estimation.choose_cut(zeros, samples=40, dim=20, precision=1e-6)
  assert cut.rank == 3
  np.testing.assert_allclose(cut.gap, 0.25 / (noise / 10), rtol=1e-12)


def test_choose_cut_full_rank_is_measured_against_the_predicted_noise():
  # No tail after σ_n: the gap is σ_n / ‖E‖, ‖E‖ = δ (√q + √dim) / (√dim σ₁) = 3.236e-3.
  spectrum = np.array([1.0, 0.8, 0.6, 0.4])
  cut = rank_estimation.choose_cut(spectrum, samples=20, dim=4, precision=1e-3)
  error_norm = 1e-3 * (math.sqrt(20) + 2.0) / 2.0
  assert cut.rank == 4 and cut.significant and cut.threshold == 2.0
  np.testing.assert_allclose(cut.gap, 0.4 / error_norm, rtol=1e-12)
  # A last value at the noise level is not full rank: the gap sits before it.
  noisy_last = np.array([1.0, 0.8, 0.6, 0.003])
  assert rank_estimation.choose_cut(noisy_last, samples=20, dim=4, precision=1e-3).rank == 3


def test_choose_cut_skips_a_gap_whose_tail_is_signal():
  # Two signal levels (1 and 1e-3) above a 1e-9 tail: the gap after the first value is as
  # wide, but its tail (1e-3) is far above the noise, so the rank is 2, not 1.
  spectrum = np.array([1.0, 1e-3] + [1e-9] * 28)
  cut = rank_estimation.choose_cut(spectrum, samples=60, dim=30, precision=1e-7)
  assert cut.rank == 2 and cut.significant


def test_choose_cut_square_noise_block_is_never_significant():
  # q − k = dim − k: the noise block is square and its spread unbounded.
  spectrum = np.array([1.0, 1e-8, 1e-9])
  cut = rank_estimation.choose_cut(spectrum, samples=3, dim=3, precision=1e-7)
  assert cut.rank == 1 and cut.threshold == math.inf and not cut.significant
