"""Networks as pure Haiku functions: dense, factorized (W = U·V) and straight-through MLPs.

Every layer of `mlp` is named `linear_{i}` (i = 0 … len(hidden)), whatever its kind, so a
dense teacher, its factorized twin and its straight-through student share module names and
`lrnet.compress(teacher_params, r)` is a valid parameter tree of the factorized network.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp

from lrnet import projection
from lrnet import tracker
from lrnet import svd

RankSpec = Union[None, int, float, str]


def _fan_in_init(fan_in: int) -> hk.initializers.Initializer:
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


class LowRankLinear(hk.Module):
  """y = (x U) V + b with U [m, r], V [r, n]: a linear layer of rank ≤ r.

  Costs r·(m + n) weights and 2·r·(m + n) FLOPs per example instead of m·n and 2·m·n.
  Initialised so that U·V has the variance of a dense fan-in initialisation
  (Var(UV)_ij = r · (1/m) · (1/r) = 1/m).
  """

  def __init__(self, output_size: int, rank: RankSpec, with_bias: bool = True,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.rank = rank
    self.with_bias = with_bias

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [batch, m] → [batch, n]."""
    m, n = x.shape[-1], self.output_size
    rank = svd.resolve_rank((m, n), self.rank)
    u = hk.get_parameter("u", [m, rank], x.dtype, init=_fan_in_init(m))
    v = hk.get_parameter("v", [rank, n], x.dtype, init=_fan_in_init(rank))
    y = (x @ u) @ v
    if self.with_bias:
      y = y + hk.get_parameter("b", [n], x.dtype, init=jnp.zeros)
    return y


class ProjectedLinear(hk.Module):
  """Dense parameters `w`, `b` used through their rank-r approximation (straight-through).

  Forward: y = x Ŵ + b with Ŵ the rank-r projection of W; backward: ∂L/∂W := ∂L/∂Ŵ (see
  `lrnet.st_truncate`). The parameter tree is that of `hk.Linear`, so a dense teacher's
  parameters are a valid starting point. Projection methods:

  * `"exact"`: Ŵ = truncate(W, r) by an SVD at every call; stateless.
  * `"alternating"`: `lrnet.tracker` keeps r + oversample singular pairs in Haiku state
    (`"tracker"`) and updates them with one product with W per call; the forward and the input
    gradient run through the two factors (`projection.st_factored_matmul`).
  """

  def __init__(self, output_size: int, rank: RankSpec, with_bias: bool = True,
               method: str = "alternating", oversample: int = tracker.DEFAULT_OVERSAMPLE,
               name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.rank = rank
    self.with_bias = with_bias
    self.method = method
    self.oversample = oversample

  def __call__(self, x: jax.Array, rank=None) -> jax.Array:
    """x: [batch, m] → [batch, n]. `rank`: a traced rank ≤ the static one (vmap over ranks)."""
    m, n = x.shape[-1], self.output_size
    w = hk.get_parameter("w", [m, n], x.dtype, init=_fan_in_init(m))
    static_rank = svd.resolve_rank((m, n), self.rank)
    if rank is None and static_rank == min(m, n):
      y = x @ w  # full rank: the projection is the identity
    elif self.method == "alternating":
      rank = static_rank if rank is None else rank
      if hk.running_init():
        state = tracker.init(w, static_rank, self.oversample)
        hk.set_state("tracker", state)
        _, left, right = tracker.project(jax.lax.stop_gradient(w), state, rank)
      else:
        state, left, right = tracker.project(jax.lax.stop_gradient(w), hk.get_state("tracker"),
                                             rank)
        hk.set_state("tracker", state)
      y = projection.st_factored_matmul(x, w, tracker.leading_rows(left, rank), right)
    elif rank is None:
      y = x @ projection.st_truncate(w, static_rank)
    else:
      y = x @ projection.st_truncate_masked(w, rank)
    if self.with_bias:
      y = y + hk.get_parameter("b", [n], x.dtype, init=jnp.zeros)
    return y


def _per_layer(spec, num_layers: int, num_hidden: int, field: str) -> list:
  """Expands an int/float/str/None or a per-layer sequence to one entry per layer.

  A scalar applies to the hidden layers only (the output layer stays dense). A sequence
  gives one entry per hidden layer, or one per layer including the output layer.
  """
  if spec is None or isinstance(spec, (int, float, str)):
    return [spec] * num_hidden + [None]
  spec = list(spec)
  if len(spec) == num_hidden:
    return spec + [None]
  if len(spec) == num_layers:
    return spec
  raise ValueError(
      f"{field} must be a rank or a sequence of {num_hidden} (hidden layers) or "
      f"{num_layers} (all layers) entries, got {len(spec)} entries")


PROJECTIONS = ("exact", "alternating")


def mlp(hidden: Sequence[int], num_classes: int, ranks=None, project_rank=None,
        projection_method: str = "alternating", oversample: int = tracker.DEFAULT_OVERSAMPLE):
  """A ReLU MLP, dense, factorized or straight-through projected.

  The reference network is `mlp(hidden=(1024,) * 5, num_classes=10)`: 784 → 5 × 1024 → 10.

  Args:
    hidden: hidden layer widths.
    num_classes: output width (logits).
    ranks: factorized layers. An int, a fraction in (0, 1] or `"full"` for every hidden
      layer, or one entry per hidden layer (or per layer, the output layer last), `None`
      for a dense layer. A factorized layer `linear_i` holds `u` [m, r], `v` [r, n], `b`.
    project_rank: straight-through student: dense parameters, forward through the rank-r
      projection of each selected weight. Same forms as `ranks`. Exclusive with `ranks`.
    projection_method: `"alternating"` (tracked singular pairs in Haiku state, one product
      with W per step; see `lrnet.tracker`) or `"exact"` (an SVD per step, stateless).
    oversample: alternating: singular pairs tracked beyond the rank.

  Returns:
    `hk.Transformed` without apply rng, or `hk.TransformedWithState` for an alternating
    student (its state for given params: `projection_state`). `apply(params, images)` maps
    images [batch, ...] (flattened inside) to logits [batch, num_classes]. A straight-through
    student's `apply` takes an optional integer `rank` after the images (may be traced, e.g.
    under `vmap` over ranks; at most its static rank) that overrides every projected layer's rank.
  """
  hidden = tuple(int(h) for h in hidden)
  num_layers = len(hidden) + 1
  if ranks is not None and project_rank is not None:
    raise ValueError("mlp: give either ranks (factorized) or project_rank (straight-through), not both")
  layer_ranks = _per_layer(ranks, num_layers, len(hidden), "ranks")
  layer_projections = _per_layer(project_rank, num_layers, len(hidden), "project_rank")
  widths = hidden + (int(num_classes),)
  if projection_method not in PROJECTIONS:
    raise ValueError(f"projection_method must be one of {PROJECTIONS}, got {projection_method!r}")

  def forward(images: jax.Array, rank=None) -> jax.Array:
    x = hk.Flatten()(images)  # [batch, m]
    for i, width in enumerate(widths):
      name = f"linear_{i}"
      if layer_ranks[i] is not None:
        x = LowRankLinear(width, layer_ranks[i], name=name)(x)
      elif layer_projections[i] is not None:
        x = ProjectedLinear(width, layer_projections[i], method=projection_method,
                            oversample=oversample, name=name)(x, rank)
      else:
        x = hk.Linear(width, w_init=_fan_in_init(x.shape[-1]), name=name)(x)
      if i < len(hidden):
        x = jax.nn.relu(x)
    return x

  if project_rank is not None and projection_method == "alternating":
    return hk.without_apply_rng(hk.transform_with_state(forward))
  return hk.without_apply_rng(hk.transform(forward))


def projection_state(params, project_rank, num_hidden: int,
                     oversample: int = tracker.DEFAULT_OVERSAMPLE,
                     pad_to_rank: Optional[int] = None) -> dict:
  """Initial Haiku state of an alternating student of `mlp(..., project_rank)` at `params`.

  Each projected layer `linear_i` with weight [m, n] gets `{"tracker": tracker.init(w, r,
  oversample, pad_to)}`: the exact top r + oversample singular pairs of its current weight.
  `pad_to_rank`: the static rank of a batch this student is a member of (members share shapes:
  K = min(pad_to_rank + oversample, min(m, n)) rows, the rows past the member's own zero).
  """
  layer_projections = _per_layer(project_rank, num_hidden + 1, num_hidden, "project_rank")
  state = {}
  for i, rank in enumerate(layer_projections):
    if rank is None:
      continue
    w = params[f"linear_{i}"]["w"]
    rank = svd.resolve_rank(w.shape, rank)
    if pad_to_rank is None and rank == min(w.shape):
      continue  # full rank: a plain dense layer, no state
    pad_to = None if pad_to_rank is None else tracker.tracked_width(w.shape, pad_to_rank, oversample)
    state[f"linear_{i}"] = {"tracker": tracker.init(w, rank, oversample, pad_to)}
  return state
