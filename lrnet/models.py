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
from lrnet import subspace
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

  Forward: y = x Ŵ + b with Ŵ = truncate(W, r); backward: ∂L/∂W := ∂L/∂Ŵ (see
  `lrnet.st_truncate`). The parameter tree is that of `hk.Linear`, so a dense teacher's
  parameters are a valid starting point.
  """

  def __init__(self, output_size: int, rank: RankSpec, with_bias: bool = True,
               method: str = "exact", update_every: int = 1, name: Optional[str] = None):
    super().__init__(name=name)
    self.output_size = output_size
    self.rank = rank
    self.with_bias = with_bias
    self.method = method
    self.update_every = update_every

  def __call__(self, x: jax.Array, rank_override=None) -> jax.Array:
    """x: [batch, m] → [batch, n]. `rank_override`: a traced rank (vmap over ranks)."""
    m, n = x.shape[-1], self.output_size
    w = hk.get_parameter("w", [m, n], x.dtype, init=_fan_in_init(m))
    rank = svd.resolve_rank((m, n), self.rank) if rank_override is None else rank_override
    if rank_override is None and rank == min(m, n):
      y = x @ w  # full rank: the projection is the identity
    elif self.method == "subspace":
      # The tracked top right singular subspace rides along as Haiku state: one warm-started
      # iteration per call instead of an SVD, and x Ŵ = ((x W) V) Vᵀ without forming Ŵ.
      # With update_every = k the subspace is refined on every k-th call only (calls 0, k, 2k,
      # …) and reused in between.
      state = hk.get_state("subspace", init=lambda *_: subspace.init_subspace(w, rank))
      calls = hk.get_state("calls", [], jnp.int32, init=jnp.zeros)
      state = subspace.update_if(calls % self.update_every == 0, jax.lax.stop_gradient(w),
                                 state, rank)
      hk.set_state("subspace", state)
      hk.set_state("calls", calls + 1)
      y = projection.st_lowrank_matmul(x, w, subspace.right_basis(state, rank))
    elif self.method == "streaming":
      # Rayleigh–Ritz of the current W in a subspace iterated on the previous step's W
      # (`subspace.stream_subspace`): one cheap call per refinement; the Ritz basis of the last
      # refinement is reused in between (update_every > 1).
      state = hk.get_state("stream", init=lambda *_: subspace.init_stream(w, rank))
      calls = hk.get_state("calls", [], jnp.int32, init=jnp.zeros)
      if self.update_every == 1:
        # The refinement yields W V for the current W too, so x Ŵ = (x (W V)) Vᵀ and the input
        # gradient (g V)(W V)ᵀ skip the dense products; only the weight gradient xᵀ g is dense.
        state, left, right = subspace.stream_projection(jax.lax.stop_gradient(w), state, rank)
        y = projection.st_factored_matmul(x, w, subspace.leading_rows(left, rank), right)
      else:
        state = subspace.stream_if(calls % self.update_every == 0, jax.lax.stop_gradient(w),
                                   state, rank)
        y = projection.st_lowrank_matmul(x, w, subspace.stream_basis(state.basis, rank))
      hk.set_state("stream", state)
      hk.set_state("calls", calls + 1)
    elif self.method == "alternating":
      # One product with W per call, searching the right and the left side by turns
      # (`subspace.alternate_projection`); both factors of Ŵ come out of it, for the current W.
      state = hk.get_state("alternating", init=lambda *_: subspace.init_alternating(w, rank))
      calls = hk.get_state("calls", [], jnp.int32, init=jnp.zeros)
      state, left, right = subspace.alternate_projection(jax.lax.stop_gradient(w), state, rank)
      hk.set_state("alternating", state)
      hk.set_state("calls", calls + 1)
      y = projection.st_factored_matmul(x, w, subspace.leading_rows(left, rank), right)
    elif rank_override is None:
      y = x @ projection.st_truncate(w, rank)
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


PROJECTIONS = ("exact", "subspace", "streaming", "alternating")
# Projections that track a subspace per layer, and the Haiku state entry that holds it.
TRACKER_STATE = {"subspace": "subspace", "streaming": "stream", "alternating": "alternating"}
# Projections that refine on every call only: a reused pair of factors would be the old Ŵ.
EVERY_STEP_ONLY = ("alternating",)
_TRACKER_INIT = {"subspace": subspace.init_subspace, "streaming": subspace.init_stream,
                 "alternating": subspace.init_alternating}


def mlp(hidden: Sequence[int], num_classes: int, ranks=None, project_rank=None,
        projection_method: str = "exact", projection_update_every: int = 1):
  """A ReLU MLP, dense, factorized or straight-through projected.

  The reference network is `mlp(hidden=(1024,) * 5, num_classes=10)`: 784 → 5 × 1024 → 10.

  Args:
    hidden: hidden layer widths.
    num_classes: output width (logits).
    ranks: factorized layers. An int, a fraction in (0, 1] or `"full"` for every hidden
      layer, or one entry per hidden layer (or per layer, the output layer last), `None`
      for a dense layer. A factorized layer `linear_i` holds `u` [m, r], `v` [r, n], `b`.
    project_rank: straight-through student: dense parameters, forward through the rank-r
      approximation of each selected weight. Same forms as `ranks`. Exclusive with `ranks`.
    projection_method: how the student projects: `"exact"` (an SVD per step, stateless),
      `"subspace"` (a tracked singular subspace per layer, one full subspace iteration and
      Rayleigh–Ritz per refinement, held in Haiku state; see `lrnet.subspace`) or
      `"alternating"` (`subspace.alternate_projection`: one product with W per step instead of
      streaming's two, the search subspace alternating between W's right and left side, and
      Rayleigh–Ritz only on every other step; the fastest), or
      `"streaming"` (Rayleigh–Ritz of the current W in a subspace iterated on the previous
      step's W, `subspace.stream_projection`: about a third of the cost, and with
      `projection_update_every` 1 the forward and the input gradient run through the factors
      W V and V, so only the weight gradient is a dense product). The stateful
      students are `hk.TransformedWithState`; build their initial state from given params
      with `projection_state(..., method=projection_method)`.
    projection_update_every: subspace and streaming methods (alternating: 1 only): refine each
      tracked subspace on every k-th step only, reusing it in between (amortises its cost;
      see the benchmark in BUILD_NOTES.md).

  Returns:
    `hk.Transformed` without apply rng. `apply(params, images)` maps images
    [batch, ...] (flattened inside) to logits [batch, num_classes]. For a projected
    student, `apply(params, images, rank)` takes an optional integer `rank` (may be
    traced, e.g. under `vmap` over ranks) that overrides every projected layer's rank.
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
  if not isinstance(projection_update_every, int) or projection_update_every < 1:
    raise ValueError(f"projection_update_every must be an integer ≥ 1, got {projection_update_every!r}")
  if projection_method in EVERY_STEP_ONLY and projection_update_every != 1:
    raise ValueError(f"projection_update_every must be 1 with projection_method "
                     f"{projection_method!r}, got {projection_update_every!r}")

  def forward(images: jax.Array, rank=None) -> jax.Array:
    x = hk.Flatten()(images)  # [batch, m]
    for i, width in enumerate(widths):
      name = f"linear_{i}"
      if layer_ranks[i] is not None:
        x = LowRankLinear(width, layer_ranks[i], name=name)(x)
      elif layer_projections[i] is not None:
        x = ProjectedLinear(width, layer_projections[i], method=projection_method,
                            update_every=projection_update_every, name=name)(x, rank)
      else:
        x = hk.Linear(width, w_init=_fan_in_init(x.shape[-1]), name=name)(x)
      if i < len(hidden):
        x = jax.nn.relu(x)
    return x

  if project_rank is not None and projection_method in TRACKER_STATE:
    return hk.without_apply_rng(hk.transform_with_state(forward))
  return hk.without_apply_rng(hk.transform(forward))


def projection_state(params, project_rank, num_hidden: int,
                     oversample: int = subspace.DEFAULT_OVERSAMPLE,
                     method: str = "subspace") -> dict:
  """Initial Haiku state of a tracked-subspace student (`TRACKER_STATE` methods) at `params`.

  Each projected layer `linear_i` gets the exact top-(r + oversample) singular subspace of its
  current weight, `{"subspace": init_subspace(w, r, oversample)}`, `{"stream": init_stream(...)}`
  or `{"alternating": init_alternating(...)}`, and `"calls": 0`, a call counter (for
  `projection_update_every`).
  """
  if method not in TRACKER_STATE:
    raise ValueError(f"projection_state: method must be one of {tuple(TRACKER_STATE)}, "
                     f"got {method!r}")
  layer_projections = _per_layer(project_rank, num_hidden + 1, num_hidden, "project_rank")
  state = {}
  for i, rank in enumerate(layer_projections):
    if rank is not None:
      w = params[f"linear_{i}"]["w"]
      rank = svd.resolve_rank(w.shape, rank)
      state[f"linear_{i}"] = {TRACKER_STATE[method]: _TRACKER_INIT[method](w, rank, oversample),
                              "calls": jnp.zeros([], jnp.int32)}
  return state
