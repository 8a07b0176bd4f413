"""Warm-started tracking of a matrix's top right singular subspace, for cheap rank-r projections.

A straight-through student needs the best rank-r approximation Ŵ = W V_r V_rᵀ of weights that
move a little every step; this module keeps V_r up to date without an SVD per step.

Algorithm (one call of `update_subspace`, k = r + oversample columns, all under stop_gradient):

1. Z = W V, U = orth(Z), C = Wᵀ U, C = Q R, R = P Σ Oᵀ (a k×k SVD), V ← Q P, ritz ← Σ.
   This is one subspace (power) iteration, span(V) ← span(WᵀW V), with a Rayleigh–Ritz step on the
   left subspace U: Σ, V are the singular values and right vectors of UᵀW = Rᵀ Qᵀ. Two products with
   W per iteration (a third product for an explicit Rayleigh–Ritz on WᵀW gave the same quality).
2. orth is CholeskyQR2 on column-scaled input (the columns of W V are nearly orthogonal with norms
   ≈ σ_i, so scaling makes them well conditioned); when the first pass leaves an orthogonality
   error above 0.1 or Cholesky fails (rank-deficient W), Householder QR takes over.
3. Drift statistic, in units of the optimality ratio ρ = ‖W − Ŵ‖_F / ‖W − W_r‖_F:
     gain = (Σ_{i<r} σ̃_i² − Σ_{i<r} ‖W v_i‖²) / (‖W‖_F² − Σ_{i<r} σ̃_i²)
   is the energy the last iteration added to the top r directions (σ̃ the new Ritz values, v_i the
   incoming basis) over the remaining tail; it lower-bounds ρ_in² − 1 of the incoming basis and,
   measured on Adam trajectories, the outgoing ρ_out² − 1 stays below ≈ 3 × gain. It is blind to an
   invariant subspace that is simply the wrong one (e.g. a direction outside span(V) grows past σ_r),
   so a probe vector in the orthogonal complement of V, one warm-started power step per call, gives
     miss = (‖W p‖² − σ̃_r²)_+ / tail,
   a certificate of non-optimality (if V_r were optimal, ‖W p‖ ≤ σ_{r+1} ≤ σ_r). The statistic is
   drift = sqrt(1 + max(gain, miss)) − 1 ≈ the excess of ρ over 1; both numerators have a
   rounding floor of 8·eps·‖W‖_F² subtracted so that float noise never triggers a refresh.
4. When drift > tolerance the call falls back to an exact SVD ("refresh"). The fallbacks run
   inside a `lax.while_loop` that executes at most once: under `vmap` (a batch of matrices or
   ranks) a `lax.cond` would turn into a select and compute the SVD every step, whereas the loop
   runs its body only when at least one batch member needs it.

Measured (1024×1024, 2-core CPU, float32; `scripts` in the module's test and build notes):
TODO numbers.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
from jax import lax

from lrnet import svd

DEFAULT_OVERSAMPLE = 10
DEFAULT_TOLERANCE = 1e-4
DEFAULT_LEVEL_DECAY = 0.99
DEFAULT_MAX_EXTRA_ITERATIONS = 2
# Orthogonality error of the first CholeskyQR pass above which Householder QR is used.
_CHOLQR_MAX_ERROR = 0.1
# Energy differences below this many eps·‖W‖_F² are rounding noise (measured: ≤ 5.4).
_NOISE_FACTOR = 8.0

_T = TypeVar("_T")


class SubspaceState(NamedTuple):
  """Tracked top right singular subspace of a matrix W, [m, n].

  k = `basis.shape[1]` is static; the rank r ≤ k is chosen per call.
  """
  basis: jax.Array             # [n, k] orthonormal Ritz vectors, by descending Ritz value
  ritz_values: jax.Array       # [k] descending; approximate top-k singular values of W
  probe: jax.Array             # [n] unit vector ⟂ basis tracking W's top direction outside
                               #     it (zeros when k = min(m, n): nothing lies outside)
  drift: jax.Array             # [] drift statistic of the last update (≈ estimated ρ − 1)
  residual_level: jax.Array    # [] exponential moving average of `drift` (diagnostic)
  extra_iterations: jax.Array  # [] int32, iterations run beyond `iterations`, all calls
  refreshes: jax.Array         # [] int32, number of exact (SVD) refreshes so far


def _run_once_if(pred: jax.Array, fn: Callable[[_T], _T], operand: _T) -> _T:
  """`fn(operand)` if `pred` else `operand`, executed lazily also under `vmap`.

  A `lax.while_loop` whose body clears the predicate: it runs zero or one time. Batched, it runs
  once if any member's predicate holds and keeps the others' operands unchanged.
  """
  def body(carry):
    _, value = carry
    return jnp.zeros_like(pred), fn(value)

  return lax.while_loop(lambda carry: carry[0], body, (pred, operand))[1]


def _householder_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  q, r = jnp.linalg.qr(x)
  return q, r


def _cholesky_qr2(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Column-scaled CholeskyQR2: x = q r with qᵀ q = I when x is not too ill-conditioned.

  Args:
    x: [p, k], p ≥ k.

  Returns:
    `q` [p, k], `r` [k, k] upper triangular, and `ok` [] bool, False when Cholesky broke down or
    the first pass was too far from orthogonal for the second to repair.
  """
  k = x.shape[1]
  norms = jnp.linalg.norm(x, axis=0)
  scale = jnp.where(norms > jnp.finfo(x.dtype).tiny ** 0.5, norms, 1.0)
  q = x / scale
  r = jnp.diag(scale)
  first_pass_error = None
  for pass_index in range(2):
    gram = q.T @ q
    if pass_index == 1:
      first_pass_error = jnp.max(jnp.abs(gram - jnp.eye(k, dtype=x.dtype)))
    chol = jnp.linalg.cholesky(gram)  # gram = L Lᵀ, so q Lᵀ⁻¹ is orthonormal
    q = jax.scipy.linalg.solve_triangular(chol, q.T, lower=True).T
    r = chol.T @ r
  ok = (first_pass_error < _CHOLQR_MAX_ERROR) & jnp.all(jnp.isfinite(r))
  return q, r, ok


def _orthonormalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x = q r with orthonormal q: CholeskyQR2, Householder QR where that fails.

  Args:
    x: [p, k], p ≥ k.

  Returns:
    `q` [p, k] with orthonormal columns and `r` [k, k].
  """
  q, r, ok = _cholesky_qr2(x)
  return _run_once_if(~ok, lambda _: _householder_qr(x), (q, r))


def _max_rank(shape) -> int:
  return min(int(shape[0]), int(shape[1]))


def _initial_probe(basis: jax.Array) -> jax.Array:
  """A fixed pseudo-random unit vector ⟂ `basis` [n, k], zeros when k = min(m, n).

  Random rather than the (k+1)-th singular vector: an exact singular vector stays put under a
  change of W that only rescales singular values, a random mixture does not.
  """
  n, _ = basis.shape
  direction = jax.random.normal(jax.random.PRNGKey(0), (n,), basis.dtype)
  for _ in range(2):  # see `_drift_statistic`
    direction = direction - basis @ (basis.T @ direction)
  norm = jnp.linalg.norm(direction)
  return jnp.where(norm > jnp.finfo(basis.dtype).eps, direction / norm, 0.0)


@functools.partial(jax.jit, static_argnums=1)
def _exact_state(w: jax.Array, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Top-k right singular vectors and values by full SVD, and a fresh probe."""
  _, singular_values, vt = jnp.linalg.svd(w, full_matrices=False)
  basis = vt[:k].T
  if k < _max_rank(w.shape):
    probe = _initial_probe(basis)
  else:
    probe = jnp.zeros((w.shape[1],), w.dtype)
  return basis, singular_values[:k], probe


def init_subspace(w: jax.Array, rank: int, oversample: int = DEFAULT_OVERSAMPLE) -> SubspaceState:
  """Exact top-k right singular subspace of `w`, k = min(rank + oversample, min(m, n)).

  Args:
    w: matrix, [m, n].
    rank: static integer in `1..min(m, n)`; the largest rank the state will serve.
    oversample: extra columns tracked beyond `rank` (≥ 0); they make one iteration per step
      enough by keeping directions near the cut inside the subspace.

  Returns:
    A `SubspaceState` with k columns, `refreshes` = 0.
  """
  rank = svd.check_rank(w.shape, rank)
  if not isinstance(oversample, numbers.Integral) or oversample < 0:
    raise ValueError(f"oversample must be an integer ≥ 0, got {oversample!r}")
  k = min(rank + int(oversample), _max_rank(w.shape))
  basis, ritz_values, probe = _exact_state(lax.stop_gradient(w), k)
  zero = jnp.zeros((), w.dtype)
  count = jnp.zeros((), jnp.int32)
  return SubspaceState(basis, ritz_values, probe, drift=zero, residual_level=zero,
                       extra_iterations=count, refreshes=count)


def _check_state_rank(w: jax.Array, state: SubspaceState, rank) -> None:
  """Raises ValueError for a static `rank` outside `1..k` or a state of the wrong shape."""
  if jnp.ndim(w) != 2:
    raise ValueError(f"expected a 2-D matrix, got shape {tuple(jnp.shape(w))}")
  n, k = state.basis.shape
  if n != w.shape[1] or k > _max_rank(w.shape):
    raise ValueError(f"subspace basis of shape {(n, k)} does not fit a matrix of shape "
                     f"{tuple(w.shape)}")
  _check_rank(state, rank, shape=w.shape)


def _check_rank(state: SubspaceState, rank, shape=None) -> None:
  if isinstance(rank, numbers.Integral) and not isinstance(rank, bool):
    k = state.basis.shape[1]
    if shape is not None:
      svd.check_rank(shape, rank)
    if not 1 <= rank <= k:
      raise ValueError(f"rank must be an integer in 1..{k} (the tracked columns) for a subspace "
                       f"basis of shape {tuple(state.basis.shape)}, got {rank!r}")


def _rank_mask(k: int, rank) -> jax.Array:
  return jnp.arange(k) < rank


def _iterate(w: jax.Array, basis: jax.Array, mask: jax.Array):
  """One subspace iteration with Rayleigh–Ritz on the left subspace.

  .. math:: U R_u = W V, \\quad Q R = W^T U, \\quad R = P \\Sigma O^T, \\quad V' = Q P

  Args:
    w: [m, n].
    basis: V, [n, k] orthonormal.
    mask: [k] bool, True for the first r columns.

  Returns:
    V' [n, k], Σ [k] descending, and the energy Σ_{i<r} ‖W v_i‖² of the incoming basis.
  """
  z = w @ basis                                   # [m, k]
  incoming_energy = jnp.sum(jnp.where(mask, jnp.sum(z * z, axis=0), 0.0))
  u, _ = _orthonormalize(z)
  c = (u.T @ w).T                                 # [n, k]; this layout is faster on CPU
  q, r = _orthonormalize(c)
  p, ritz_values, _ = jnp.linalg.svd(r)
  return q @ p, ritz_values, incoming_energy


def _drift_statistic(w, basis, ritz_values, probe, incoming_energy, mask, rank):
  """Drift statistic (≈ excess of the optimality ratio over 1) and the next probe.

  Returns:
    `drift` [] and the next probe [n].
  """
  dtype = w.dtype
  k = basis.shape[1]
  total = jnp.sum(w * w)
  noise = _NOISE_FACTOR * jnp.finfo(dtype).eps * total
  kept = jnp.sum(jnp.where(mask, ritz_values**2, 0.0))
  tail = jnp.maximum(total - kept, noise)
  gain = jnp.maximum(kept - incoming_energy - noise, 0.0) / tail

  if k < _max_rank(w.shape):
    # One power step of Wᵀ W restricted to the orthogonal complement of the basis, then the
    # Rayleigh quotient ‖W p‖² ≤ σ_{k+1}² of the result.
    def complement_unit(vector, fallback):
      # Projecting twice: after one pass, a vector lying mostly in span(V) keeps rounding
      # components in span(V) as large as its true remainder ("twice is enough").
      for _ in range(2):
        vector = vector - basis @ (basis.T @ vector)
      norm = jnp.linalg.norm(vector)
      return jnp.where(norm > jnp.finfo(dtype).tiny ** 0.5, vector / norm, fallback)

    start = complement_unit(probe, jnp.zeros_like(probe))
    next_probe = complement_unit(w.T @ (w @ start), start)
    wp = w @ next_probe                              # [m]
    cut_value = jnp.take(ritz_values, jnp.clip(rank - 1, 0, k - 1))
    miss = jnp.maximum(jnp.sum(wp * wp) - cut_value**2 - noise, 0.0) / tail
  else:
    miss = jnp.zeros((), dtype)
    next_probe = probe
  return jnp.sqrt(1.0 + jnp.maximum(gain, miss)) - 1.0, next_probe


def update_subspace(w: jax.Array, state: SubspaceState, rank, *, iterations: int = 1,
                    max_extra_iterations: int = DEFAULT_MAX_EXTRA_ITERATIONS,
                    tolerance: float = DEFAULT_TOLERANCE,
                    level_decay: float = DEFAULT_LEVEL_DECAY) -> SubspaceState:
  """Tracks the top right singular subspace of `w` from the previous step's `state`.

  Runs `iterations` warm-started subspace iterations with Rayleigh–Ritz (see the module
  docstring); while the drift statistic exceeds `tolerance`, up to `max_extra_iterations` more;
  if it still does, an exact SVD ("refresh"), so a large change of `w` never goes unnoticed.
  Pure, jit- and vmap-able; not differentiated (`w` is wrapped in `stop_gradient`).

  Args:
    w: matrix, [m, n].
    state: the state from `init_subspace` or a previous call, for a matrix of the same shape.
    rank: r, a Python int in `1..k` (checked) or a traced int32 scalar (e.g. under `vmap` over
      ranks; not checked, clipped into `1..k`). Only the top r Ritz pairs enter the statistic.
    iterations: static number of iterations every call runs (≥ 1).
    max_extra_iterations: static bound on the iterations added while the statistic is above
      `tolerance` (≥ 0); each costs as much as one of `iterations`, far less than the SVD.
    tolerance: refresh when the estimated excess of ‖W − Ŵ‖_F over the optimum, as a fraction,
      exceeds this. 0 forces a refresh, `inf` never refreshes.
    level_decay: decay of the moving average `residual_level`.

  Returns:
    The new `SubspaceState`.
  """
  _check_state_rank(w, state, rank)
  for name, value, least in (("iterations", iterations, 1),
                             ("max_extra_iterations", max_extra_iterations, 0)):
    if not isinstance(value, numbers.Integral) or value < least:
      raise ValueError(f"{name} must be an integer ≥ {least}, got {value!r}")
  return _update(w, state, jnp.asarray(rank, jnp.int32), iterations=int(iterations),
                 max_extra_iterations=int(max_extra_iterations), tolerance=float(tolerance),
                 level_decay=float(level_decay))


# Compiled once per shape and option set, so that eager calls (tests, evaluation) are fast too;
# under an outer `jit` or `vmap` it is simply inlined.
@functools.partial(jax.jit, static_argnames=("iterations", "max_extra_iterations", "tolerance",
                                             "level_decay"))
def _update(w, state, rank, *, iterations, max_extra_iterations, tolerance, level_decay):
  """`update_subspace` after argument checks; `rank` is an int32 array."""
  w = lax.stop_gradient(w)
  state = lax.stop_gradient(state)
  k = state.basis.shape[1]
  rank = jnp.clip(rank, 1, k)
  mask = _rank_mask(k, rank)

  def step(basis, probe):
    basis, ritz_values, incoming_energy = _iterate(w, basis, mask)
    drift, probe = _drift_statistic(w, basis, ritz_values, probe, incoming_energy, mask, rank)
    return basis, ritz_values, probe, drift

  basis, probe = state.basis, state.probe
  for _ in range(iterations):
    basis, ritz_values, probe, drift = step(basis, probe)

  def needs_more(carry):
    extra, *_, drift = carry
    return (extra < max_extra_iterations) & ~(drift < tolerance)

  def one_more(carry):
    extra, basis, _, probe, _ = carry
    return (extra + 1, *step(basis, probe))

  extra, basis, ritz_values, probe, drift = lax.while_loop(
      needs_more, one_more, (jnp.zeros((), jnp.int32), basis, ritz_values, probe, drift))

  needs_refresh = ~(drift < tolerance)  # also refreshes on NaN
  basis, ritz_values, probe = _run_once_if(
      needs_refresh, lambda _: _exact_state(w, k), (basis, ritz_values, probe))
  residual_level = level_decay * state.residual_level + (1.0 - level_decay) * drift
  return SubspaceState(basis, ritz_values, probe, drift=drift, residual_level=residual_level,
                       extra_iterations=state.extra_iterations + extra,
                       refreshes=state.refreshes + needs_refresh.astype(jnp.int32))


def right_basis(state: SubspaceState, rank) -> jax.Array:
  """The basis with columns ≥ `rank` zeroed, so that W V Vᵀ is the rank-r projection.

  .. math:: V_r V_r^T = \\sum_{i < r} v_i v_i^T, \\qquad x \\hat W = ((x W) V) V^T

  Args:
    state: a `SubspaceState` with k columns.
    rank: Python int in `1..k` (checked) or traced integer scalar.

  Returns:
    [n, k].
  """
  _check_rank(state, rank)
  k = state.basis.shape[1]
  return jnp.where(_rank_mask(k, rank), state.basis, 0.0)


def project(w: jax.Array, state: SubspaceState, rank) -> jax.Array:
  """Ŵ = W V_r V_rᵀ, dense (for tests and evaluation; training uses `right_basis`).

  Args:
    w: matrix, [m, n].
    state: its `SubspaceState`.
    rank: Python int in `1..k` or traced integer scalar.

  Returns:
    Ŵ, [m, n], of rank ≤ r.
  """
  _check_state_rank(w, state, rank)
  basis = right_basis(state, rank)
  return (w @ basis) @ basis.T


def optimality_ratio(w: jax.Array, w_hat: jax.Array, rank: int) -> jax.Array:
  """‖W − Ŵ‖_F / ‖W − W_r‖_F, with W_r the exact truncated SVD (Eckart–Young): ≥ 1, 1 is optimal.

  .. math:: \\rho = \\|W - \\hat W\\|_F \\Big/ \\sqrt{\\textstyle\\sum_{i > r} s_i^2}

  Computes an SVD; for tests and benchmarks. When W has rank ≤ r the optimum is 0 and the
  denominator is floored at eps·‖W‖_F.

  Args:
    w: matrix, [m, n].
    w_hat: its approximation, [m, n].
    rank: integer in `1..min(m, n)` (may be traced).

  Returns:
    The ratio, [].
  """
  if isinstance(rank, numbers.Integral):
    svd.check_rank(w.shape, rank)
  singular_values = jnp.linalg.svd(w, compute_uv=False)
  tail = jnp.where(jnp.arange(singular_values.shape[0]) >= rank, singular_values, 0.0)
  optimal = jnp.sqrt(jnp.sum(tail**2))
  floor = jnp.finfo(w.dtype).eps * jnp.linalg.norm(w)
  return jnp.linalg.norm(w - w_hat) / jnp.maximum(optimal, floor)
