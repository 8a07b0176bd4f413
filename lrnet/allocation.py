"""Per-layer ranks under a parameter budget: `allocate_ranks` picks where truncation costs least.

The budget counts the selected layers' weights after compression: r·(m + n) for a layer
factorized at rank r, m·n for a layer left dense (biases never change, so they are not counted).
A layer is factorized only below its break-even rank (r·(m + n) < m·n); at or above it, it stays
dense and is absent from the returned rank dict. Criteria and what they cost:

* `"greedy"` (default): the network's loss. Each layer is truncated alone (whitened when
  calibrated) at up to `GRID_SIZE` geometrically spaced ranks below break-even; the loss
  increases are taken as additive (as AIMET's greedy compression-ratio selection does) and the
  multiple-choice knapsack min Σ Δloss_l(r_l) s.t. Σ params_l(r_l) ≤ budget is solved by dynamic
  programming over the budget (`knapsack`). Cost: one SVD per layer (and an eigh, calibrated),
  1 + Σ_l |grid_l| ≤ 1 + 16·layers loss evaluations under one jit compile, and a DP of
  layers × (grid + 1) × `BUDGET_UNITS` steps.
* `"energy"`: the same fraction f of spectral energy Σ_{i≤r} s_i² / Σ s_i² in every layer (of W,
  or of SᵀW when calibrated), the largest f that fits (bisection over the levels where a rank
  changes). Cost: one SVD per layer, no network evaluation.
* `"stable_rank"`: r_l = max(1, ⌊t · ‖W_l‖²_F / ‖W_l‖²_2⌋) (SᵀW when calibrated), the largest
  t that fits (bisection likewise). Cost: one SVD per layer.
"""

from __future__ import annotations

import bisect
import math
import numbers
from typing import Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lrnet import compression
from lrnet import svd

CRITERIA = ("greedy", "energy", "stable_rank")
GRID_SIZE = 16        # candidate ranks per layer for "greedy"
BUDGET_UNITS = 4096   # DP resolution: exact while the spare budget is ≤ this many gcds of costs


def break_even_rank(shape: tuple[int, int]) -> int:
  """The largest r with r·(m + n) < m·n (0 when no rank makes the layer smaller)."""
  m, n = shape
  return (m * n - 1) // (m + n)


def _cost(shape: tuple[int, int], rank: Optional[int]) -> int:
  """Weights of a layer factorized at `rank`, or dense (`None`)."""
  m, n = shape
  return m * n if rank is None else rank * (m + n)


def _resolve_budget(budget, shapes: dict) -> int:
  """The budget in parameters; raises unless it holds every layer at its cheapest."""
  dense = sum(m * n for m, n in shapes.values())
  cheapest = sum(_cost(shape, 1 if break_even_rank(shape) else None) for shape in shapes.values())
  fraction = isinstance(budget, numbers.Real) and not isinstance(budget, numbers.Integral)
  if fraction and 0.0 < budget < 1.0:
    budget = math.floor(budget * dense)
  elif isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget < 1:
    raise ValueError(f"budget must be an int (parameters of the selected layers) or a float in "
                     f"(0, 1) (a fraction of their {dense} dense parameters), got {budget!r}")
  if budget < cheapest:
    raise ValueError(f"budget {budget} is below {cheapest}, the parameters of the selected "
                     f"layers at rank 1")
  return int(budget)


def _largest_fitting(ranks_at: Callable[[float], dict], levels: np.ndarray, shapes: dict,
                     budget: int) -> dict:
  """`ranks_at(level)` (ranks nondecreasing in level; levels[0] fits) at the largest of the
  sorted `levels` whose cost is within `budget`, found by bisection."""
  def ranks(level):  # at or above break-even: dense (None)
    return {name: rank if rank <= break_even_rank(shapes[name]) else None
            for name, rank in ranks_at(level).items()}

  def too_costly(level):
    trial = ranks(level)
    return sum(_cost(shape, trial.get(name)) for name, shape in shapes.items()) > budget
  return ranks(levels[bisect.bisect_left(levels, True, key=too_costly) - 1])


def _energy_ranks(spectra: dict, shapes: dict, budget: int) -> dict:
  def ranks_at(fraction):  # the smallest r holding `fraction` of each layer's energy
    return {name: max(1, svd.energy_rank_of(s, fraction)) for name, s in spectra.items()}
  captured = [np.cumsum(np.asarray(s, np.float64) ** 2) for s in spectra.values()]
  levels = np.unique(np.concatenate([[0.0]] + [c / c[-1] for c in captured if c[-1] > 0]))
  return _largest_fitting(ranks_at, levels, shapes, budget)


def _stable_rank_ranks(spectra: dict, shapes: dict, budget: int) -> dict:
  stable = {}
  for name, s in spectra.items():
    energy = np.asarray(s, np.float64) ** 2
    stable[name] = energy.sum() / energy[0] if energy[0] > 0 else 1.0

  def ranks_at(scale):  # the 1e-9 keeps ⌊(k / sr) · sr⌋ at k despite rounding
    return {name: max(1, math.floor(scale * sr + 1e-9)) for name, sr in stable.items()}
  levels = np.unique(np.concatenate(
      [[0.0]] + [np.arange(1, break_even_rank(shapes[name]) + 2) / sr
                 for name, sr in stable.items()]))
  return _largest_fitting(ranks_at, levels, shapes, budget)


def candidate_ranks(shape: tuple[int, int], size: int = GRID_SIZE) -> list[int]:
  """Up to `size` geometrically spaced ranks in 1..break-even rank, ascending."""
  top = break_even_rank(shape)
  if top < 1:
    return []
  return [int(r) for r in np.unique(np.round(np.geomspace(1, top, size)).astype(int))]


def knapsack(costs: list[np.ndarray], losses: list[np.ndarray], budget: int) -> list[int]:
  """The option index chosen per group by the multiple-choice knapsack min Σ losses s.t.
  Σ costs ≤ `budget` (at least Σ of each group's cheapest cost), one option per group, from each
  group's option `costs` (ints) and `losses` (inf: never chosen), [options] each.

  Dynamic programming over the spare budget (cost above each group's cheapest option) in units
  of g = gcd of the spare costs, exact while spare budget / g ≤ `BUDGET_UNITS`; past that, units
  of ⌈spare budget / `BUDGET_UNITS`⌉ (a multiple of g) with costs rounded up: always within
  budget, and optimal for the rounded costs.
  """
  spare_costs = [np.asarray(c, np.int64) - np.min(c) for c in costs]
  spare = budget - sum(int(np.min(c)) for c in costs)
  gcd = max(int(np.gcd.reduce(np.concatenate(spare_costs))), 1)
  unit = gcd * max(1, -(-spare // (gcd * BUDGET_UNITS)))
  capacity = spare // unit
  best = np.zeros(capacity + 1)  # best[b]: least loss of the groups so far within b units
  picks, group_units = [], []
  for cost, loss in zip(spare_costs, losses):
    units = -(-cost // unit)
    options = np.full((len(units), capacity + 1), np.inf)
    for index, (size, option_loss) in enumerate(zip(units, loss)):
      if size <= capacity:
        options[index, size:] = best[:capacity + 1 - size] + option_loss
    picks.append(np.argmin(options, axis=0))
    group_units.append(units)
    best = options.min(axis=0)
  choice, remaining = [], capacity
  for pick, units in zip(reversed(picks), reversed(group_units)):
    choice.append(int(pick[remaining]))
    remaining -= int(units[choice[-1]])
  return choice[::-1]


@jax.jit
def _truncated(decomposition: compression.Decomposition, rank, weight: jax.Array) -> jax.Array:
  """Σ_{i<rank} s_i u_i v_iᵀ shaped as `weight` (`project` at one module); `rank` is traced, so
  one compile serves every rank of a shape."""
  kept = jnp.where(jnp.arange(decomposition.s.shape[0]) < rank, decomposition.s, 0)
  return jnp.matmul(decomposition.u * kept, decomposition.vt,
                    precision=jax.lax.Precision.HIGHEST).reshape(weight.shape)


def _greedy_table(params, shapes: dict, decompositions: dict, loss: Callable) -> tuple:
  """Per layer: the candidate ranks (None: dense), their weight counts and loss increases."""
  evaluate = jax.jit(loss)  # every evaluated tree has `params`' structure: one compile
  base = float(evaluate(params))
  if not math.isfinite(base):
    raise ValueError(f"loss of the dense parameters is not finite: {base}")
  nodes = compression.modules(params)
  options, costs, increases = [], [], []
  for name, shape in shapes.items():
    ranks = candidate_ranks(shape)
    weight = nodes[name][compression.weight_name(nodes[name])]
    truncated = [float(evaluate(compression.replace_weights(
        params, {name: _truncated(decompositions[name], r, weight)}))) for r in ranks]
    options.append(ranks + [None])
    costs.append(np.array([_cost(shape, r) for r in options[-1]]))
    increases.append(np.nan_to_num(np.array(truncated + [base]) - base, nan=np.inf))
  return options, costs, increases


def allocate_ranks(params, budget, *, calibration=None, criterion: str = "greedy",
                   loss: Optional[Callable] = None, include=None, exclude=None,
                   unfactorizable: Optional[Mapping[str, str]] = None) -> dict[str, int]:
  """Ranks of the selected layers within a parameter budget (module docstring).

  Args:
    params: a dense parameter tree, of any nesting (`lrnet.compression`).
    budget: an int, the selected layers' weights after compression (module docstring), or a
      float in (0, 1), that fraction of their dense weights (rounded down); or a list of them,
      sharing the SVDs and the greedy criterion's loss evaluations.
    calibration: a `lrnet.calibration.Calibration`: spectra and truncations of SᵀW (data-aware).
    criterion: one of `CRITERIA`.
    loss: `params -> scalar` loss of the network on held-out data; needed by "greedy" (jitted
      once: every truncated tree has the dense tree's nesting, types and shapes).
    include, exclude, unfactorizable: as in `lrnet.compress`.

  Returns:
    `{module: rank}` in the tree's order for the layers to factorize, each below its
    break-even rank, for `compress`; selected layers left dense are absent (empty when the
    budget holds them all dense). A list of them for a list of budgets.

  Raises:
    ValueError: an unknown criterion, a bad budget or one below every layer at rank 1, "greedy"
      without `loss` (or `loss` with another criterion), a non-finite dense loss.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
  if (criterion == "greedy") != (loss is not None):
    raise ValueError("loss (a callable params -> scalar) is needed by criterion 'greedy' and "
                     f"used by no other; got criterion={criterion!r}, loss={loss!r}")
  all_shapes = compression.matrix_shapes(params)
  selected = compression.select_ranks(params, 1, include, exclude, unfactorizable=unfactorizable)
  shapes = {name: all_shapes[name] for name in selected}
  several = isinstance(budget, (list, tuple))
  budgets = [_resolve_budget(b, shapes) for b in (budget if several else [budget])]
  decompositions = compression.decompose(params, include, exclude, calibration=calibration,
                                         unfactorizable=unfactorizable)
  if criterion == "greedy":
    options, costs, increases = _greedy_table(params, shapes, decompositions, loss)
    allocations = [{name: option[index] for name, option, index in
                    zip(shapes, options, knapsack(costs, increases, b))} for b in budgets]
  else:
    spectra = {name: decomposition.s for name, decomposition in decompositions.items()}
    allocate = _energy_ranks if criterion == "energy" else _stable_rank_ranks
    allocations = [allocate(spectra, shapes, b) for b in budgets]
  allocations = [{name: rank for name, rank in ranks.items() if rank is not None}
                 for ranks in allocations]
  return allocations if several else allocations[0]
