"""Tests for lrnet/allocation.py: per-layer ranks under a parameter budget."""

import itertools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import lrnet
from lrnet import allocation

RANDOM = np.random.default_rng(1)  # NumPy draws: jax.random compiles its RNG on first use
INPUTS = RANDOM.normal(size=(32, 12)).astype(np.float32)
LABELS = RANDOM.integers(0, 6, size=32)
FN = lrnet.models.mlp_fn(6, (10, 8))  # linear_0 [12, 10], linear_1 [10, 8], linear_2 [8, 6]
NET = hk.without_apply_rng(hk.transform(FN))
PARAMS = {name: {"w": (RANDOM.normal(size=(m, n)) / np.sqrt(m)).astype(np.float32),
                 "b": np.zeros(n, np.float32)}
          for name, (m, n) in (("linear_0", (12, 10)), ("linear_1", (10, 8)), ("linear_2", (8, 6)))}


@pytest.fixture(autouse=True)
def one_blas_thread():
  """OpenBLAS's threads contend on the loaded 2-core test machine (tests/test_calibration.py)."""
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


def cross_entropy(params):
  logits = NET.apply(params, INPUTS)
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(LABELS.shape[0]), LABELS])


def _cost(ranks, shapes):
  """Weights of the selected layers after compress(params, ranks): dense where absent."""
  return sum(ranks[name] * (m + n) if name in ranks else m * n for name, (m, n) in shapes.items())


def _limit(budget, shapes):
  """The budget in parameters: an int, or a fraction of the dense weights, rounded down."""
  return budget if isinstance(budget, int) else int(budget * sum(m * n for m, n in shapes.values()))


def _selected_shapes(include=None):
  shapes = lrnet.compression.matrix_shapes(PARAMS)
  return {name: shapes[name] for name in lrnet.compression.select_ranks(PARAMS, 1, include)}


def test_greedy_is_the_optimum_of_the_additive_objective():
  """loss = Σ_l c_l ‖W_l − W⁰_l‖²_F is additive, with Δ_l(r) = c_l Σ_{i>r} s_i²: brute force over
  every rank combination (each layer's grid is every rank below break-even here) gives the
  optimum, which the allocation must reach at every budget. The loss is compiled once."""
  weights = {name: PARAMS[name]["w"] for name in PARAMS}
  scales = {"linear_0": 1.0, "linear_1": 3.0, "linear_2": 10.0}
  traces = []

  def loss(params):
    traces.append(1)
    return sum(scale * jnp.sum((params[name]["w"] - weights[name]) ** 2)
               for name, scale in scales.items())
  shapes = _selected_shapes("*")
  options = {}  # {name: [(rank or None, cost, Δloss)]}
  for name, (m, n) in shapes.items():
    energy = np.asarray(jnp.linalg.svd(weights[name], compute_uv=False), np.float64) ** 2
    top = allocation.break_even_rank((m, n))
    assert allocation.candidate_ranks((m, n)) == list(range(1, top + 1))
    options[name] = [(r, r * (m + n), scales[name] * energy[r:].sum())
                     for r in allocation.candidate_ranks((m, n))] + [(None, m * n, 0.0)]
  for budget in (130, 200, 0.5, 260):
    limit = _limit(budget, shapes)
    best = min(sum(o[2] for o in combination)
               for combination in itertools.product(*options.values())
               if sum(o[1] for o in combination) <= limit)
    ranks = lrnet.allocate_ranks(PARAMS, budget, loss=loss, include="*")
    assert _cost(ranks, shapes) <= limit
    achieved = sum(dict((o[0], o[2]) for o in options[name])[ranks.get(name)] for name in shapes)
    assert achieved == pytest.approx(best, rel=1e-4, abs=1e-5)
  assert len(traces) == 1


def test_knapsack_rounds_costs_up_and_stays_within_budget_when_the_budget_is_coarse():
  costs = [np.array([7, 500_003, 900_001]), np.array([3, 400_007, 800_009])]
  losses = [np.array([5.0, 1.0, 0.0]), np.array([4.0, 2.0, 0.0])]
  for budget in (10, 900_004, 1_300_010, 1_700_010):
    choice = allocation.knapsack(costs, losses, budget)
    assert sum(cost[i] for cost, i in zip(costs, choice)) <= budget
  # Spare budget 1 309 990 in units of 320: the best that fits (cost 1 300 012, loss 1) is found.
  assert allocation.knapsack(costs, losses, 1_310_000) == [1, 2]


@pytest.mark.parametrize("criterion", allocation.CRITERIA)
@pytest.mark.parametrize("budget", [0.4, 150])
def test_every_criterion_meets_the_budget_with_ranks_below_break_even(criterion, budget):
  calibration = lrnet.calibrate(FN, PARAMS, [INPUTS])
  shapes = _selected_shapes()
  limit = _limit(budget, shapes)
  loss = cross_entropy if criterion == "greedy" else None
  for stats in (None, calibration):
    ranks = lrnet.allocate_ranks(PARAMS, budget, criterion=criterion, loss=loss,
                                 calibration=stats)
    assert set(ranks) <= set(shapes) and ranks
    assert _cost(ranks, shapes) <= limit
    assert all(1 <= r <= allocation.break_even_rank(shapes[name]) for name, r in ranks.items())
    lrnet.compress(PARAMS, ranks, calibration=stats)  # a dict compress takes


def test_greedy_evaluates_the_calibrated_projection_at_every_rank_with_one_compile():
  calibration = lrnet.calibrate(FN, PARAMS, [INPUTS])
  decomposition = lrnet.decompose(PARAMS, calibration=calibration)["linear_0"]
  compiled = []
  for rank in (1, 3, 5):
    np.testing.assert_allclose(
        allocation._truncated(decomposition, rank, PARAMS["linear_0"]["w"]),
        lrnet.project(PARAMS, {"linear_0": rank}, calibration=calibration)["linear_0"]["w"],
        atol=1e-5)
    compiled.append(allocation._truncated._cache_size())
  assert compiled[0] == compiled[-1]


def _energies(include="*"):
  energies = {name: np.asarray(d.s, np.float64) ** 2
              for name, d in lrnet.decompose(PARAMS, include=include).items()}
  return {name: np.cumsum(energy) / np.sum(energy) for name, energy in energies.items()}


def test_energy_keeps_one_fraction_everywhere_and_grows_with_the_budget():
  captured = _energies()
  shapes = _selected_shapes("*")
  previous = None
  for budget in (100, 150, 200, 240):
    ranks = lrnet.allocate_ranks(PARAMS, budget, criterion="energy", include="*")
    assert _cost(ranks, shapes) <= budget
    # One fraction f with c[r − 2] < f ≤ c[r − 1] in every factorized layer.
    below = max((captured[name][r - 2] if r > 1 else 0.0) for name, r in ranks.items())
    assert below < min(captured[name][r - 1] for name, r in ranks.items())
    current = {name: ranks.get(name, np.inf) for name in shapes}
    if previous is not None:
      assert all(current[name] >= previous[name] for name in shapes)
    previous = current


def test_stable_rank_ranks_are_proportional_to_the_stable_ranks():
  stable = {name: np.sum(np.asarray(d.s) ** 2) / np.asarray(d.s)[0] ** 2
            for name, d in lrnet.decompose(PARAMS, include="*").items()}
  shapes = _selected_shapes("*")
  for budget in (120, 160, 220):
    ranks = lrnet.allocate_ranks(PARAMS, budget, criterion="stable_rank", include="*")
    assert _cost(ranks, shapes) <= budget
    # One scale t with r ≤ t · sr < r + 1 (r = 1 may also be below it).
    lowest = max(r / stable[name] for name, r in ranks.items() if r > 1) if any(
        r > 1 for r in ranks.values()) else 0.0
    assert lowest < min((r + 1) / stable[name] for name, r in ranks.items()) + 1e-9


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(budget=0.5, criterion="svd"),
     r"criterion must be one of \('greedy', 'energy', 'stable_rank'\), got 'svd'"),
    (dict(budget=1.5, criterion="energy"), r"budget must be an int .* or a float in \(0, 1\)"),
    (dict(budget=0, criterion="energy"), r"budget must be an int"),
    (dict(budget=True, criterion="energy"), r"budget must be an int"),
    (dict(budget="half", criterion="energy"), r"budget must be an int"),
    (dict(budget=20, criterion="energy"), r"budget 20 is below 40, the parameters .* at rank 1"),
    (dict(budget=0.5), r"loss .* is needed by criterion 'greedy'"),
    (dict(budget=0.5, criterion="energy", loss=cross_entropy), r"used by no other"),
])
def test_bad_arguments_are_one_line_errors_naming_the_field(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    lrnet.allocate_ranks(PARAMS, **kwargs)


@pytest.mark.parametrize("criterion", ["greedy", "energy"])
def test_a_list_of_budgets_gives_what_each_budget_gives_alone(criterion):
  loss = cross_entropy if criterion == "greedy" else None
  single = [lrnet.allocate_ranks(PARAMS, b, criterion=criterion, loss=loss) for b in (0.2, 0.4)]
  assert lrnet.allocate_ranks(PARAMS, [0.2, 0.4], criterion=criterion, loss=loss) == single
