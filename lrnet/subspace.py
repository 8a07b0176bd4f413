"""Warm-started tracking of a matrix's top right singular subspace, for cheap rank-r projections.

A straight-through student needs Ŵ = W V_r V_rᵀ, the best rank-r approximation of weights that
move a little every step; this module keeps V_r up to date without an SVD per step, two ways:

* `update_subspace` (projection method "subspace"): per call, a whole subspace iteration and
  Rayleigh–Ritz on the same W, described below.
* `stream_subspace` (projection method "streaming"): per call, Rayleigh–Ritz of the current W in
  the subspace iterated on the previous call's W, and that subspace's next iteration; the same
  two products with W but k×k work in place of n×k orthonormalisations, and no transposed read
  of W (see `_stream_step`). Its drift statistic estimates the same quantity, and a call whose
  statistic is over tolerance takes the `update_subspace` path (extra iterations, exact SVD).
  `stream_projection` also returns W V for the current W, which the Rayleigh–Ritz step computes
  anyway: with both factors, x Ŵ = (x (W V)) Vᵀ never needs the dense product x W.

One call of `update_subspace` (k = r + oversample columns, nothing differentiated):

1. Z = W V, U = orth(Z), C = Wᵀ U = Q R, R = P Σ Oᵀ (k×k SVD), V ← Q P, Ritz values ← Σ: one
   subspace iteration span(V) ← span(WᵀW V) with Rayleigh–Ritz on UᵀW = Rᵀ Qᵀ; two products
   with W. orth is CholeskyQR2 on column-scaled input (W V has nearly orthogonal columns of norm
   ≈ σ_i, so scaling makes it well conditioned); Householder QR takes over when Cholesky fails or
   the first pass leaves an orthogonality error above 0.1 (rank-deficient W).
2. Drift statistic, ≈ ρ − 1 for the optimality ratio ρ = ‖W − Ŵ‖_F / ‖W − W_r‖_F:
   gain = (Σ_{i<r} σ̃_i² − Σ_{i<r} ‖W v_i‖²) / (‖W‖_F² − Σ_{i<r} σ̃_i²), the energy the last
   iteration added to the top r directions over the tail (a lower bound of ρ_in² − 1), and
   miss = (‖W p‖² − σ̃_r²)_+ / tail for a probe p ⟂ V that one power step per iteration drives
   to W's top direction outside span(V) (‖W p‖ > σ̃_r proves V_r is not optimal; gain is blind to
   an invariant but wrong subspace). drift = sqrt(1 + max(gain, miss)) − 1; 8·eps·‖W‖_F² is
   subtracted from both numerators as rounding noise (measured ≤ 5.4·eps·‖W‖_F²).
3. While drift ≥ tolerance, up to `max_extra_iterations` more iterations; if still ≥ tolerance,
   an exact SVD ("refresh"). Both run in a `lax.while_loop` rather than `lax.cond`: under `vmap`
   a cond becomes a select that computes the SVD every step; the loop runs its body only when some
   batch member needs it.

Defaults, from measurements (1024×1024, float32, 2-core CPU, noisy shared machine):
* tolerance 1e-4: on a real MLP (784-1024×5-10, MNIST digits, optax Adam 1e-3, batch 100) the
  measured ρ − 1 stayed ≤ 7 × drift (worst in the first 10 steps, when Adam moves the flat
  spectrum of the random init most), ≤ 3 × drift on synthetic power-law trajectories. With 1e-4
  the worst ρ over 100 dense-training steps was 1.00054 (r = 10) … 1.00014 (r = 200), with 0
  refreshes and 3–8 extra iterations; 2e-4 gave 1.00087 over 300 steps. A straight-through
  student at r = 10 (forward through these bases, 200 steps): ρ ≤ 1.00043, 0 refreshes.
* oversample 10, max_extra_iterations 2 (an iteration is ≈ 5–10 % of an SVD).
* Per call (one iteration, jitted, median): r = 10: 11–14 ms, r = 50: 16–19 ms, r = 200: 52 ms
  (97 ms with one extra iteration); `jnp.linalg.svd` 320–450 ms, eigh(WᵀW) 175 ms. The bare
  iteration is 7.5 / 13 / 44 ms; the rest is the statistic and the fallbacks' bookkeeping.
  V ← orth(Wᵀ(W V)) plus a third product for Rayleigh–Ritz on WᵀW gave the same ρ (to 1e-6) at
  a similar time (7.2 / 16 / 37 ms); Householder QR instead of CholeskyQR2 is 10.4 vs ≈ 5 ms
  alone for 1024×210 but within noise inside the iteration.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, NamedTuple, TypeVar

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
# A left call of `alternate_projection` projects through its search rows as they are (no
# Rayleigh–Ritz) while the energy their estimated orthogonality error can cost stays below this
# fraction of the optimal error energy (see `_half_step`).
_UNRANKED_MAX_EXCESS = 1e-6

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


def _run_once_if(pred: jax.Array, fn: Callable[[Any, _T], _T], inputs: Any, operand: _T) -> _T:
  """`fn(inputs, operand)` if `pred` else `operand`, executed lazily also under `vmap`.

  A `lax.while_loop` whose body clears the predicate: it runs zero or one time. Batched, it runs
  once if any member's predicate holds and keeps the others' operands unchanged. `inputs` ride
  in the carry through an optimization barrier tied to the predicate: a body computed from
  loop-invariant values only (e.g. an SVD of `w`) would otherwise be hoisted out of the batched
  loop by XLA and computed on every call (measured: 0.6 → 72 ms for a 512² SVD under `vmap`).
  """
  def body(carry):
    pred, inputs, value = carry
    pred, inputs = lax.optimization_barrier((pred, inputs))
    return jnp.zeros_like(pred), inputs, fn(inputs, value)

  return lax.while_loop(lambda carry: carry[0], body, (pred, inputs, operand))[2]


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
  return _run_once_if(~ok, lambda x, _: _householder_qr(x), x, (q, r))


def _max_rank(shape) -> int:
  return min(int(shape[0]), int(shape[1]))


def _initial_probe(basis: jax.Array) -> jax.Array:
  """A fixed pseudo-random unit vector ⟂ `basis` [n, k] (zeros if k = n).

  Random rather than the (k+1)-th singular vector: an exact singular vector stays put under a
  change of W that only rescales singular values, a random mixture does not.
  """
  direction = jax.random.normal(jax.random.PRNGKey(0), basis.shape[:1], basis.dtype)
  return _complement_unit(basis.T, direction, jnp.zeros_like(direction))


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


def _tracked_columns(w: jax.Array, rank: int, oversample: int) -> int:
  """k = min(rank + oversample, min(m, n)) after checking both (ValueError)."""
  rank = svd.check_rank(w.shape, rank)
  if not isinstance(oversample, numbers.Integral) or oversample < 0:
    raise ValueError(f"oversample must be an integer ≥ 0, got {oversample!r}")
  return min(rank + int(oversample), _max_rank(w.shape))


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
  k = _tracked_columns(w, rank, oversample)
  basis, ritz_values, probe = _exact_state(lax.stop_gradient(w), k)
  zero = jnp.zeros((), w.dtype)
  count = jnp.zeros((), jnp.int32)
  return SubspaceState(basis, ritz_values, probe, drift=zero, residual_level=zero,
                       extra_iterations=count, refreshes=count)


def _check_fits(w: jax.Array, n: int, k: int, what: str) -> None:
  """Raises ValueError unless `w` is a matrix [m, n] with min(m, n) ≥ k; `what` names the state."""
  if jnp.ndim(w) != 2:
    raise ValueError(f"expected a 2-D matrix, got shape {tuple(jnp.shape(w))}")
  if n != w.shape[1] or k > _max_rank(w.shape):
    raise ValueError(f"{what} does not fit a matrix of shape {tuple(w.shape)}")


def _check_rank_in(k: int, rank, what: str, shape=None) -> None:
  """Raises ValueError for a Python/NumPy scalar `rank` outside `1..k` (or, given the matrix
  `shape`, outside `1..min(shape)`); arrays pass unchecked (possibly traced: no value)."""
  if not isinstance(rank, numbers.Number):
    return
  if shape is not None:
    svd.check_rank(shape, rank)
  is_int = isinstance(rank, numbers.Integral) and not isinstance(rank, bool)
  if not is_int or not 1 <= rank <= k:
    raise ValueError(f"rank must be an integer in 1..{k} (the tracked columns) for {what}, "
                     f"got {rank!r}")


def _check_state_rank(w: jax.Array, state: SubspaceState, rank) -> None:
  """Raises ValueError for a static `rank` outside `1..k` or a state of the wrong shape."""
  n, k = state.basis.shape
  what = f"a subspace basis of shape {(n, k)}"
  _check_fits(w, n, k, what)
  _check_rank_in(k, rank, what, shape=w.shape)


def _check_rank(state: SubspaceState, rank) -> None:
  _check_rank_in(state.basis.shape[1], rank,
                 f"a subspace basis of shape {tuple(state.basis.shape)}")


def _rank_mask(k: int, rank) -> jax.Array:
  return jnp.arange(k) < rank


def _leading_columns(basis: jax.Array, rank) -> jax.Array:
  """`basis` [n, k] with columns ≥ `rank` zeroed (rank may be traced)."""
  return jnp.where(_rank_mask(basis.shape[1], rank), basis, 0.0)


def _complement_unit(rows: jax.Array, vector: jax.Array, fallback: jax.Array) -> jax.Array:
  """`vector` [d] projected onto the orthogonal complement of span(`rows`) ([k, d], orthonormal
  rows), normalised.

  Projects twice: after one pass, a vector lying mostly in the span keeps rounding components in
  it as large as its true remainder ("twice is enough"). Returns `fallback` when nothing is
  left. Reads `rows` in its stored layout (a [d, k] basis used as `basis @ (basis.T @ v)` made
  XLA:CPU transpose it on every call: 0.6 ms per product at 1024 × 210).
  """
  for _ in range(2):
    vector = vector - (rows @ vector) @ rows
  norm = jnp.linalg.norm(vector)
  return jnp.where(norm > jnp.finfo(vector.dtype).tiny ** 0.5, vector / norm, fallback)


class _Iteration(NamedTuple):
  basis: jax.Array            # [n, k] new Ritz vectors
  ritz_values: jax.Array      # [k] descending
  incoming_energy: jax.Array  # [] Σ_{i<r} ‖W v_i‖² of the incoming basis
  probe_energy: jax.Array     # [] ‖W p‖² of the incoming probe, a unit vector ⟂ incoming basis
  probe: jax.Array            # [n] Wᵀ W p, projected ⟂ the new basis and normalised


def _iterate(w: jax.Array, basis: jax.Array, probe: jax.Array, mask: jax.Array) -> _Iteration:
  """One subspace iteration with Rayleigh–Ritz on the left subspace, and one probe power step.

  .. math:: U R_u = W V, \\quad Q R = W^T U, \\quad R = P \\Sigma O^T, \\quad V' = Q P

  The probe rides along as one more column of both products (a separate matrix-vector product
  would read W again: 3 extra passes cost ≈ 4 ms at 1024², as much as the r = 10 iteration).

  Args:
    w: [m, n].
    basis: V, [n, k] orthonormal.
    probe: p, [n] unit vector ⟂ V (or zeros).
    mask: [k] bool, True for the first r columns.

  Returns:
    An `_Iteration`.
  """
  k = basis.shape[1]
  z = w @ jnp.concatenate([basis, probe[:, None]], axis=1)          # [m, k + 1]
  z, w_probe = z[:, :k], z[:, k]
  incoming_energy = jnp.sum(jnp.where(mask, jnp.sum(z * z, axis=0), 0.0))
  u, _ = _orthonormalize(z)
  # (Xᵀ W)ᵀ rather than Wᵀ X: this layout is ≈ 1.5–3× faster on CPU.
  c = (jnp.concatenate([u, w_probe[:, None]], axis=1).T @ w).T      # [n, k + 1]
  c, powered_probe = c[:, :k], c[:, k]
  q, r = _orthonormalize(c)
  p, ritz_values, _ = jnp.linalg.svd(r)
  new_basis = q @ p
  return _Iteration(new_basis, ritz_values, incoming_energy, jnp.sum(w_probe * w_probe),
                    _complement_unit(new_basis.T, powered_probe,
                                     _complement_unit(new_basis.T, probe, jnp.zeros_like(probe))))


def _drift_statistic(w: jax.Array, iteration: _Iteration, mask: jax.Array,
                     rank: jax.Array) -> jax.Array:
  """Drift statistic: ≈ the excess of the optimality ratio over 1 (module docstring, step 3).

  .. math:: \\text{drift} = \\sqrt{1 + \\max(\\text{gain}, \\text{miss})} - 1

  Returns:
    [].
  """
  k = iteration.basis.shape[1]
  total = jnp.sum(w * w)
  noise = _NOISE_FACTOR * jnp.finfo(w.dtype).eps * total
  kept = jnp.sum(jnp.where(mask, iteration.ritz_values**2, 0.0))
  tail = jnp.maximum(total - kept, noise)
  gain = jnp.maximum(kept - iteration.incoming_energy - noise, 0.0) / tail
  cut_value = jnp.take(iteration.ritz_values, jnp.clip(rank - 1, 0, k - 1))
  miss = jnp.maximum(iteration.probe_energy - cut_value**2 - noise, 0.0) / tail
  return jnp.sqrt(1.0 + jnp.maximum(gain, miss)) - 1.0


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
    tolerance: iterate more, then refresh, while the estimated excess of ‖W − Ŵ‖_F over the
      optimum, as a fraction (`drift`), is not below this. 0 forces a refresh, `inf` never.
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
    iteration = _iterate(w, basis, probe, mask)
    drift = _drift_statistic(w, iteration, mask, rank)
    return iteration.basis, iteration.ritz_values, iteration.probe, drift

  # One loop for the fixed and the extra iterations, so that the iteration is traced (and
  # compiled) once.
  def keep_iterating(carry):
    count, *_, drift = carry
    return (count < iterations) | ((count < iterations + max_extra_iterations)
                                   & ~(drift < tolerance))

  def iterate(carry):
    count, basis, _, probe, _ = carry
    return (count + 1, *step(basis, probe))

  start = (jnp.zeros((), jnp.int32), state.basis, state.ritz_values, state.probe,
           jnp.full((), jnp.inf, w.dtype))
  count, basis, ritz_values, probe, drift = lax.while_loop(keep_iterating, iterate, start)
  extra = count - iterations

  needs_refresh = ~(drift < tolerance)  # also refreshes on NaN
  basis, ritz_values, probe = _run_once_if(
      needs_refresh, lambda w, _: _exact_state(w, k), w, (basis, ritz_values, probe))
  residual_level = level_decay * state.residual_level + (1.0 - level_decay) * drift
  return SubspaceState(basis, ritz_values, probe, drift=drift, residual_level=residual_level,
                       extra_iterations=state.extra_iterations + extra,
                       refreshes=state.refreshes + needs_refresh.astype(jnp.int32))


def update_if(pred: jax.Array, w: jax.Array, state: SubspaceState, rank, **options) -> SubspaceState:
  """`update_subspace(w, state, rank, **options)` if `pred` else `state`; lazy also under
  `vmap` (a `lax.cond` would become a select and always pay for the update)."""
  _check_state_rank(w, state, rank)
  return _run_once_if(jnp.asarray(pred), lambda w, s: update_subspace(w, s, rank, **options),
                      w, state)


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
  return _leading_columns(state.basis, rank)


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


# ---------------------------------------------------------------------------------------------
# Streaming: one subspace iteration per training step, spread over two consecutive steps.
# ---------------------------------------------------------------------------------------------


class StreamState(NamedTuple):
  """State of `stream_subspace` for a matrix W, [m, n]: the next step's search subspace.

  k = `rows.shape[0]` is static; the rank r ≤ k is chosen per call.
  """
  rows: jax.Array              # [k, n] Y: rows spanning the search subspace for the next call,
                               #     (W_prev V)ᵀ W_prev for the previous call's Ritz vectors V,
                               #     each row scaled to unit norm (not mutually orthogonal)
  probe: jax.Array             # [n] unit vector ⟂ the previous Ritz vectors (zeros if k = min(m, n))
  basis: jax.Array             # [n, k] the previous call's orthonormal Ritz vectors, descending
  ritz_values: jax.Array       # [k] their singular-value estimates, descending
  drift: jax.Array             # [] drift statistic of the previous call (≈ estimated ρ − 1)
  residual_level: jax.Array    # [] exponential moving average of `drift` (diagnostic)
  refreshes: jax.Array         # [] int32, calls whose drift forced the full `update_subspace` path


def init_stream(w: jax.Array, rank: int, oversample: int = DEFAULT_OVERSAMPLE) -> StreamState:
  """Exact top-k right singular subspace of `w` as the first search subspace.

  Args:
    w: matrix, [m, n].
    rank: static integer in `1..min(m, n)`; the largest rank the state will serve.
    oversample: extra columns tracked beyond `rank` (≥ 0).

  Returns:
    A `StreamState` with k = min(rank + oversample, min(m, n)) rows.
  """
  exact = init_subspace(w, rank, oversample)
  return StreamState(rows=exact.basis.T, probe=exact.probe, basis=exact.basis,
                     ritz_values=exact.ritz_values,
                     drift=exact.drift, residual_level=exact.residual_level,
                     refreshes=exact.refreshes)


def _check_stream_rank(w: jax.Array, state: StreamState, rank) -> None:
  k, n = state.rows.shape
  what = f"stream rows of shape {(k, n)}"
  _check_fits(w, n, k, what)
  _check_rank_in(k, rank, what, shape=w.shape)


def _rayleigh_ritz(rows: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rayleigh–Ritz of W in span(rows), from rows X [k, d] (not necessarily orthonormal) and
  their images Z = X Wᵀ or X W ([k', e], k' ≥ k: rows past k, e.g. a probe's image, are
  ignored, so that callers need not slice a fresh copy of Z), with k×k algebra only.

  .. math:: X X^T = L L^T, \\quad L^{-1} (Z Z^T) L^{-T} = S \\Lambda S^T, \\quad T = S^T L^{-1}

  Returns:
    (λ [k], descending, ≥ 0: the squared Ritz values; T [k, k]: T X are the orthonormal Ritz
    vectors and T Z their images).
  """
  k = rows.shape[0]
  chol = jnp.linalg.cholesky(rows @ rows.T)
  chol_inv = jax.scipy.linalg.solve_triangular(chol, jnp.eye(k, dtype=rows.dtype), lower=True)
  reduced = chol_inv @ (images @ images.T)[:k, :k] @ chol_inv.T
  eigenvalues, eigenvectors = jnp.linalg.eigh(0.5 * (reduced + reduced.T))
  return jnp.maximum(eigenvalues[::-1], 0.0), eigenvectors[:, ::-1].T @ chol_inv


def _rotate(to_ritz: jax.Array, images: jax.Array) -> jax.Array:
  """T Z[:k] for T [k, k] and Z [k', e], k' ≥ k, without slicing Z (a copy on XLA:CPU)."""
  k = to_ritz.shape[0]
  return jnp.pad(to_ritz, ((0, 0), (0, images.shape[0] - k))) @ images


def _energies(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(‖W‖_F², the rounding noise floor of energy differences _NOISE_FACTOR·eps·‖W‖_F²)."""
  total = jnp.sum(w * w)
  return total, _NOISE_FACTOR * jnp.finfo(w.dtype).eps * total


def _drift(total: jax.Array, noise: jax.Array, eigenvalues: jax.Array, rank: jax.Array,
           gain: jax.Array, probe_energy: jax.Array) -> jax.Array:
  """sqrt(1 + max(gain, miss) / tail) − 1 (∞ if not finite), the statistic of `update_subspace`.

  `gain` is the energy one more iteration would add to the top r; miss = ‖W p‖² − λ_r, the
  probe's excess over the cut; tail = ‖W‖_F² − Σ_{i<r} λ_i. Both numerators lose `noise`.
  """
  k = eigenvalues.shape[0]
  kept = jnp.sum(jnp.where(_rank_mask(k, rank), eigenvalues, 0.0))
  tail = jnp.maximum(total - kept, noise)
  cut = jnp.take(eigenvalues, jnp.clip(rank - 1, 0, k - 1))
  miss = jnp.maximum(probe_energy - cut - noise, 0.0)
  drift = jnp.sqrt(1.0 + jnp.maximum(jnp.maximum(gain - noise, 0.0), miss) / tail) - 1.0
  return jnp.where(jnp.isfinite(drift), drift, jnp.inf)


class _StreamStep(NamedTuple):
  ritz_rows: jax.Array    # [k, n] Vᵀ: Ritz vectors of WᵀW in span(Y), by descending Ritz value
  ritz_values: jax.Array  # [k] their singular-value estimates, descending
  image_rows: jax.Array   # [k, m] (W V)ᵀ: the Ritz vectors' images under the current W
  rows: jax.Array         # [k, n] next search rows: (W v_i)ᵀ W, unit-norm rows
  probe: jax.Array        # [n] next probe
  drift: jax.Array        # []


def _stream_step(w: jax.Array, state: StreamState, rank: jax.Array) -> _StreamStep:
  """Rayleigh–Ritz of W in span(Y), then one subspace iteration for the next call.

  .. math:: Y Y^T = L L^T, \\quad L^{-1} (Y W^T)(W Y^T) L^{-T} = Q \\Lambda Q^T, \\quad
            V^T = Q^T L^{-1} Y, \\quad Y' = \\mathrm{rownorm}((V^T W^T) W)

  Two products with W (one reads it transposed in place), a k×k Cholesky, inverse and eigh; the
  Ritz vectors come out orthonormal (L⁻¹Y is, and Q is orthogonal) without an n×k QR.
  Drift: with A = WᵀW, Ritz pairs (λ_i, v_i) and residuals R_i = A v_i − λ_i v_i ⟂ span(Y)
  (free: the rows of Y' before scaling are A v_i), one more iteration would raise the top r
  energies by gain ≈ Σ_{i<r} ‖R_i‖² / λ_i, the quantity `update_subspace` measures directly;
  drift = sqrt(1 + max(gain, miss) / tail) − 1 like `update_subspace`'s, miss from the probe.
  """
  k, n = state.rows.shape
  dtype = w.dtype
  mask = _rank_mask(k, rank)
  search = jnp.concatenate([state.rows, state.probe[None]], axis=0)   # [k + 1, n]
  z_all = svd.times_transpose(search, w)                            # [k + 1, m]
  w_probe = z_all[k]
  eigenvalues, to_ritz = _rayleigh_ritz(state.rows, z_all)
  ritz_rows = to_ritz @ state.rows                                    # [k, n] orthonormal
  # [(W V)ᵀ; W p] in one product: the probe's image rides along without a concatenation.
  rotated = jnp.pad(to_ritz, ((0, 1), (0, 1))).at[k, k].set(1.0) @ z_all  # [k + 1, m]
  image_rows = rotated[:k]                                            # [k, m] (W V)ᵀ
  powered = rotated @ w                                               # [k + 1, n]
  powered, powered_probe = powered[:k], powered[k]

  total, noise = _energies(w)
  residuals = jnp.sum((powered - eigenvalues[:, None] * ritz_rows) ** 2, axis=1)
  # What one more iteration would add to the top r energies (the statistic `update_subspace`
  # measures directly): a power step on a Ritz pair (λ, v) with residual R ⟂ v raises the
  # Rayleigh quotient by (λ‖R‖² + RᵀAR) / (λ² + ‖R‖²) ≈ ‖R‖² / λ.
  gain = jnp.sum(jnp.where(mask, residuals / jnp.maximum(eigenvalues, noise), 0.0))
  drift = _drift(total, noise, eigenvalues, rank, gain, jnp.sum(w_probe * w_probe))

  if k < _max_rank(w.shape):
    fallback = _complement_unit(ritz_rows, state.probe, jnp.zeros_like(state.probe))
    probe = _complement_unit(ritz_rows, powered_probe, fallback)
  else:
    probe = jnp.zeros_like(state.probe)
  norms = jnp.linalg.norm(powered, axis=1, keepdims=True)
  rows = jnp.where(norms > jnp.finfo(dtype).tiny ** 0.5, powered / norms, ritz_rows)
  return _StreamStep(ritz_rows, jnp.sqrt(eigenvalues), image_rows, rows, probe, drift)


def stream_subspace(w: jax.Array, state: StreamState, rank, *,
                    tolerance: float = DEFAULT_TOLERANCE,
                    max_extra_iterations: int = DEFAULT_MAX_EXTRA_ITERATIONS,
                    level_decay: float = DEFAULT_LEVEL_DECAY) -> tuple[StreamState, jax.Array]:
  """This call's Ritz basis of `w` and the state for the next call (one iteration per call).

  `update_subspace` runs a whole subspace iteration and the Rayleigh–Ritz step on the same W,
  three n×k orthonormalisations' worth of work per call. Here the iteration is split across
  consecutive calls, as weights move a little per step: call t takes the search subspace Y
  iterated on W_{t−1}, finds the best rank-r approximation of the current W_t in span(Y)
  (Rayleigh–Ritz: exact for the current W, only the subspace is one iteration old), and iterates
  it once on W_t for call t + 1 (see `_stream_step`). When the drift statistic is not below
  `tolerance` (or anything is not finite), the call falls back to `update_subspace` from the Ritz
  basis (extra iterations, then an exact SVD), counted in `refreshes`, so a sudden change of W
  is caught at the step it happens.

  Args:
    w: matrix, [m, n].
    state: from `init_stream` or a previous call, for a matrix of the same shape.
    rank: r, a Python int in `1..k` (checked) or a traced int32 scalar (clipped into `1..k`).
    tolerance, max_extra_iterations, level_decay: as in `update_subspace`.

  Returns:
    (new state, basis [n, k]): orthonormal Ritz vectors by descending Ritz value, so that
    `W V_r V_rᵀ` (V_r: the first r columns; see `stream_basis`) is the projection to use now.
  """
  new_state, _, _ = stream_projection(w, state, rank, tolerance=tolerance,
                                      max_extra_iterations=max_extra_iterations,
                                      level_decay=level_decay)
  return new_state, new_state.basis


def stream_projection(w: jax.Array, state: StreamState, rank, *,
                      tolerance: float = DEFAULT_TOLERANCE,
                      max_extra_iterations: int = DEFAULT_MAX_EXTRA_ITERATIONS,
                      level_decay: float = DEFAULT_LEVEL_DECAY
                      ) -> tuple[StreamState, jax.Array, jax.Array]:
  """`stream_subspace`, and the Ritz vectors' images under `w`: both factors of Ŵ = (W V) Vᵀ.

  The Rayleigh–Ritz step computes W V exactly (for the current W) on its way, so the factored
  projection Ŵ_r = (W V_r) V_rᵀ costs nothing more (`projection.st_factored_matmul`).

  Returns:
    (new state, left rows (W V)ᵀ [k, m], right rows Vᵀ [k, n]): Ŵ_r = Σ_{i<r} left_iᵀ right_i,
    i.e. `projection.st_factored_matmul(x, w, leading_rows(left, r), right)` is x Ŵ_r. Both are
    rows, as computed: handing out V as columns would cost a transposed copy per call.
  """
  _check_stream_rank(w, state, rank)
  return _stream(w, state, jnp.asarray(rank, jnp.int32), tolerance=float(tolerance),
                 max_extra_iterations=int(max_extra_iterations), level_decay=float(level_decay))


@functools.partial(jax.jit, static_argnames=("tolerance", "max_extra_iterations", "level_decay"))
def _stream(w, state, rank, *, tolerance, max_extra_iterations, level_decay):
  w = lax.stop_gradient(w)
  state = lax.stop_gradient(state)
  k = state.rows.shape[0]
  rank = jnp.clip(rank, 1, k)
  step = _stream_step(w, state, rank)
  needs_full_update = ~(step.drift < tolerance)

  def full_update(w, step):
    incoming = SubspaceState(step.ritz_rows.T, step.ritz_values, step.probe, step.drift,
                             state.residual_level, jnp.zeros((), jnp.int32),
                             jnp.zeros((), jnp.int32))
    updated = _update(w, incoming, rank, iterations=1,
                      max_extra_iterations=max_extra_iterations, tolerance=tolerance,
                      level_decay=level_decay)
    return step._replace(ritz_rows=updated.basis.T, ritz_values=updated.ritz_values,
                         image_rows=svd.times_transpose(updated.basis.T, w),
                         rows=updated.basis.T, probe=updated.probe, drift=updated.drift)

  step = _run_once_if(needs_full_update, full_update, w, step)
  new_state = StreamState(
      rows=step.rows, probe=step.probe, basis=step.ritz_rows.T, ritz_values=step.ritz_values,
      drift=step.drift,
      residual_level=level_decay * state.residual_level + (1.0 - level_decay) * step.drift,
      refreshes=state.refreshes + needs_full_update.astype(jnp.int32))
  return new_state, step.image_rows, step.ritz_rows


def stream_if(pred: jax.Array, w: jax.Array, state: StreamState, rank, **options) -> StreamState:
  """`stream_subspace(w, state, rank, **options)[0]` if `pred` else `state`, lazily also under
  `vmap` (see `update_if`)."""
  _check_stream_rank(w, state, rank)
  return _run_once_if(jnp.asarray(pred),
                      lambda w, s: stream_subspace(w, s, rank, **options)[0], w, state)


def leading_rows(rows: jax.Array, rank) -> jax.Array:
  """`rows` [k, d] with rows ≥ `rank` zeroed (rank may be traced): masking one factor of
  Ŵ = Lᵀ R (`stream_projection`, `alternate_projection`) is enough to keep only the top r."""
  return jnp.where(_rank_mask(rows.shape[0], rank)[:, None], rows, 0.0)


def stream_basis(basis: jax.Array, rank) -> jax.Array:
  """`basis` [n, k] from `stream_subspace` with columns ≥ `rank` zeroed: W V_r V_rᵀ = x Ŵ's Ŵ."""
  return _leading_columns(basis, rank)


# ---------------------------------------------------------------------------------------------
# Alternating: one product with W per training step, the search side alternating.
# ---------------------------------------------------------------------------------------------


class AlternatingState(NamedTuple):
  """State of `alternate_projection` for a matrix W, [m, n].

  After a call, both sides hold that call's k pairs: the side it searched holds its vectors
  (right: Ritz vectors, orthonormal; left: the search rows it projected through), the other side
  their images under W or Wᵀ scaled to unit norm, which the next call searches. k =
  `right_rows.shape[0]` is static; the rank r ≤ k is chosen per call.
  """
  right_rows: jax.Array       # [k, n] right Ritz vectors v_i, or unit Wᵀu_i to search next
  left_rows: jax.Array        # [k, m] left vectors u_i, or unit W v_i to search next
  singular_values: jax.Array  # [k] the last call's values: Ritz values (descending) after a
                              #     right call, the norms ‖Wᵀu_i‖ after a left call
  right_probe: jax.Array      # [n] unit vector ⟂ the right rows (zeros if k = min(m, n))
  left_probe: jax.Array       # [m] unit vector ⟂ the left rows (zeros if k = min(m, n))
  side: jax.Array             # [] int32: the next call searches 0: the right rows, 1: the left
  drift: jax.Array            # [] drift statistic of the last call (≈ estimated ρ − 1)
  residual_level: jax.Array   # [] exponential moving average of `drift` (diagnostic)
  refreshes: jax.Array        # [] int32, calls whose drift forced the full `update_subspace` path


@functools.partial(jax.jit, static_argnums=1)
def _exact_pairs(w: jax.Array, k: int):
  """Top-k singular triplets by full SVD: u [m, k], s [k], vt [k, n]."""
  u, singular_values, vt = jnp.linalg.svd(w, full_matrices=False)
  return u[:, :k], singular_values[:k], vt[:k]


def init_alternating(w: jax.Array, rank: int,
                     oversample: int = DEFAULT_OVERSAMPLE) -> AlternatingState:
  """Exact top-k singular pairs of `w`; the first call searches the right singular vectors.

  Args:
    w: matrix, [m, n].
    rank: static integer in `1..min(m, n)`; the largest rank the state will serve.
    oversample: extra columns tracked beyond `rank` (≥ 0).

  Returns:
    An `AlternatingState` with k = min(rank + oversample, min(m, n)) pairs.
  """
  k = _tracked_columns(w, rank, oversample)
  u, singular_values, vt = _exact_pairs(lax.stop_gradient(w), k)
  if k < _max_rank(w.shape):
    right_probe, left_probe = _initial_probe(vt.T), _initial_probe(u)
  else:
    right_probe, left_probe = jnp.zeros((w.shape[1],), w.dtype), jnp.zeros((w.shape[0],), w.dtype)
  zero = jnp.zeros((), w.dtype)
  count = jnp.zeros((), jnp.int32)
  return AlternatingState(vt, u.T, singular_values, right_probe, left_probe, side=count,
                          drift=zero, residual_level=zero, refreshes=count)


def _unit_rows(rows: jax.Array) -> jax.Array:
  """Rows scaled to unit norm (zero rows stay zero)."""
  norms = jnp.linalg.norm(rows, axis=1, keepdims=True)
  return jnp.where(norms > jnp.finfo(rows.dtype).tiny ** 0.5, rows / norms, 0.0)


class _HalfStep(NamedTuple):
  ritz_rows: jax.Array        # [k, d] the searched side's vectors: Ritz vectors, or the rows
  image_rows: jax.Array       # [k, e] their images under W (or Wᵀ), norms ≈ the singular values
  unit_image_rows: jax.Array  # [k, e] the images scaled to unit norm: the next call's search
  singular_values: jax.Array  # [k] the images' norms; descending after a Rayleigh–Ritz step
  probe: jax.Array            # [e] next probe, on the other side
  drift: jax.Array            # []


def _unranked_is_near_optimal(total: jax.Array, noise: jax.Array, values: jax.Array,
                              rank: jax.Array, eps: float) -> jax.Array:
  """Whether projecting through the unit image rows of the last Rayleigh–Ritz step as they
  are keeps the excess energy under `_UNRANKED_MAX_EXCESS` of the optimal error energy.

  Those rows y_i come from a float eigh of a Gram: Y Yᵀ = I + Δ with Δ_ij ≈ eps·σ_1²/(σ_i σ_j)
  (`values` σ, descending). Ŵ = Y_rᵀ Y_r W then differs from the exact projection on span(Y_r)
  by Δ Y_r W, second order: ‖Δ Y_r W‖² ≲ eps²·σ_1⁴·r·Σ_{i<r} σ_i⁻², against the optimal
  ‖W − W_r‖² ≈ ‖W‖_F² − Σ_{i<r} σ_i² (trained layers at r = 200: ≈ 1e-8 of it).
  """
  k = values.shape[0]
  mask = _rank_mask(k, rank)
  squares = jnp.maximum(values ** 2, jnp.finfo(values.dtype).tiny)
  excess = eps ** 2 * squares[0] ** 2 * rank * jnp.sum(jnp.where(mask, 1.0 / squares, 0.0))
  tail = jnp.maximum(total - jnp.sum(jnp.where(mask, squares, 0.0)), noise)
  return excess <= _UNRANKED_MAX_EXCESS * tail


def _half_step(w: jax.Array, rows: jax.Array, probe: jax.Array, partners: jax.Array,
               partner_values: jax.Array, other_probe: jax.Array, rank: jax.Array,
               search_right: bool) -> _HalfStep:
  """The rank-r projection of the current W through the search rows, from one product with W.

  With X = `rows` [k, d] searched on one side (d = n if `search_right`, else m) and their
  images Z = X Wᵀ (or X W), [k, e]. A right call runs Rayleigh–Ritz (`_rayleigh_ritz`):

  .. math:: X X^T = L L^T, \\quad L^{-1} (Z Z^T) L^{-T} = S \\Lambda S^T, \\quad
            T = S^T L^{-1}, \\quad \\text{Ritz vectors } T X, \\quad \\text{images } T Z

  so the best rank-r approximation of W with rows in span(X) is Σ_{i<r} (images_i)ᵀ(Ritz_i),
  for the current W. A left call searches the unit images of those Ritz vectors: orthonormal
  rows already (T Z Zᵀ Tᵀ = Λ), ordered by the Ritz values, so it projects through them as they
  are, Ŵ = Σ_{i<r} x_i (x_iᵀ W) with its one product X W and no k×k algebra at all: the
  projection on span(X_r), the top r Ritz vectors advanced half a power step. Where float
  rounding of those rows could cost more than `_UNRANKED_MAX_EXCESS` of the optimal error
  (`_unranked_is_near_optimal`: widely spread singular values), the left call runs
  Rayleigh–Ritz too. Every other call thus skips the eigh, Cholesky, inverse and both k×d
  rotations, the larger half of a call's cost at k = 210.

  Drift: X's rows are the unit images of the previous call's vectors y_i (on the other side,
  `partners`) with values σ_i (`partner_values`). For an exact singular pair W x_i = σ_i y_i;
  the residual ‖Z_i − σ_i y_i‖² = ‖R_i‖² / λ_i (R_i = A y_i − λ_i y_i, A = W Wᵀ or Wᵀ W) is
  the energy one more power step would add, measured against the W of now, so it also sees
  how far W moved since the last call. gain = Σ_{i<r} of it; miss from the probe (W's top
  direction outside span(X), one power step per call, alternating sides with the search);
  drift = sqrt(1 + max(gain, miss) / tail) − 1 as in `update_subspace`.
  """
  k = rows.shape[0]
  search = jnp.concatenate([rows, probe[None]], axis=0)              # [k + 1, d]
  images_all = svd.times_transpose(search, w) if search_right else search @ w   # [k + 1, e]
  probe_image = images_all[k]
  total, noise = _energies(w)

  def ranked():
    eigenvalues, to_ritz = _rayleigh_ritz(rows, images_all)
    return eigenvalues, to_ritz @ rows, _rotate(to_ritz, images_all)

  def unranked():
    images = images_all[:k]
    return jnp.sum(images * images, axis=1), rows, images

  if search_right:
    eigenvalues, ritz_rows, image_rows = ranked()
  else:
    eigenvalues, ritz_rows, image_rows = lax.cond(
        _unranked_is_near_optimal(total, noise, partner_values, rank, jnp.finfo(w.dtype).eps),
        unranked, ranked)

  if search_right:
    # The left rows were projected through unranked: within their span they are not Ritz
    # vectors of the W of now, and ‖Z_i − σ_i y_i‖² would count that rotation, which this
    # call's Rayleigh–Ritz step removes, as drift. Only the part of Z_i outside span(Y)
    # (orthonormal rows) is energy a power step would add: ‖Z_i‖² − ‖Y Z_iᵀ‖².
    inside = svd.times_transpose(images_all, partners)[:k]             # [k, k] Y Z_iᵀ
    residuals = jnp.maximum(jnp.sum(images_all[:k] ** 2, axis=1)
                            - jnp.sum(inside * inside, axis=1), 0.0)
  else:
    residuals = jnp.sum((images_all[:k] - partner_values[:, None] * partners) ** 2, axis=1)
  gain = jnp.sum(jnp.where(_rank_mask(k, rank), residuals, 0.0))
  drift = _drift(total, noise, eigenvalues, rank, gain, jnp.sum(probe_image * probe_image))

  unit_image_rows = _unit_rows(image_rows)
  if k < _max_rank(w.shape):
    fallback = _complement_unit(unit_image_rows, other_probe, jnp.zeros_like(other_probe))
    next_probe = _complement_unit(unit_image_rows, probe_image, fallback)
  else:
    next_probe = jnp.zeros_like(other_probe)
  return _HalfStep(ritz_rows, image_rows, unit_image_rows, jnp.sqrt(eigenvalues), next_probe,
                   drift)


class _Alternated(NamedTuple):
  state: AlternatingState  # residual_level and refreshes not yet updated
  left_rows: jax.Array     # [k, m] left factor rows: Ŵ_r = Σ_{i<r} left_rows_iᵀ right_rows_i
  right_rows: jax.Array    # [k, n] right factor rows


def alternate_projection(w: jax.Array, state: AlternatingState, rank, *,
                         tolerance: float = DEFAULT_TOLERANCE,
                         max_extra_iterations: int = DEFAULT_MAX_EXTRA_ITERATIONS,
                         level_decay: float = DEFAULT_LEVEL_DECAY
                         ) -> tuple[AlternatingState, jax.Array, jax.Array]:
  """This call's factors of the rank-r projection of `w`, from ONE product with `w`.

  `stream_projection` runs a whole subspace iteration per call: two products with W. Here a
  call makes half of one, alternating sides. A right call takes the right search rows Q (unit
  images Wᵀu_i of the last call's left vectors), computes W Qᵀ, and returns the best rank-r
  approximation of the current W with rows in span(Q), Ŵ = (W V_r) V_rᵀ (Rayleigh–Ritz). A left
  call takes the left search rows U (the unit images W v_i of those Ritz vectors: orthonormal
  and ranked already), computes Uᵀ W, and projects through its first r rows as they are,
  Ŵ = U_r (U_rᵀ W), with no k×k algebra (see `_half_step`). Either way the projection is onto
  a subspace at most one half power step old, for the W of now, and both factors come out of
  the one product: `projection.st_factored_matmul(x, w, leading_rows(left, r), right)` is x Ŵ.
  A call whose drift statistic is not below `tolerance` takes the `update_subspace` path
  (extra iterations, then an exact SVD) and the next call searches from its result.

  Args:
    w: matrix, [m, n].
    state: from `init_alternating` or a previous call, for a matrix of the same shape.
    rank: r, a Python int in `1..k` (checked) or a traced int32 scalar (clipped into `1..k`).
    tolerance, max_extra_iterations, level_decay: as in `update_subspace`.

  Returns:
    (new state, left rows [k, m], right rows [k, n]) with Ŵ_r = Σ_{i<r} left_iᵀ right_i: after a
    right call the left rows are (W V)ᵀ and the right rows Vᵀ (orthonormal); after a left call
    the left rows Uᵀ (orthonormal up to rounding, see `_half_step`) and the right rows Uᵀ W.
  """
  k, n = state.right_rows.shape
  what = f"alternating rows of shape {(k, n)}"
  _check_fits(w, n, k, what)
  if state.left_rows.shape != (k, w.shape[0]):
    raise ValueError(f"{what} do not fit a matrix of shape {tuple(w.shape)}")
  _check_rank_in(k, rank, what, shape=w.shape)
  return _alternate(w, state, jnp.asarray(rank, jnp.int32), tolerance=float(tolerance),
                    max_extra_iterations=int(max_extra_iterations),
                    level_decay=float(level_decay))


@functools.partial(jax.jit, static_argnames=("tolerance", "max_extra_iterations", "level_decay"))
def _alternate(w, state, rank, *, tolerance, max_extra_iterations, level_decay):
  w = lax.stop_gradient(w)
  state = lax.stop_gradient(state)
  k = state.right_rows.shape[0]
  rank = jnp.clip(rank, 1, k)

  def right_call(state):
    step = _half_step(w, state.right_rows, state.right_probe, state.left_rows,
                      state.singular_values, state.left_probe, rank, search_right=True)
    new_state = state._replace(right_rows=step.ritz_rows, left_rows=step.unit_image_rows,
                               singular_values=step.singular_values, left_probe=step.probe,
                               side=jnp.ones((), jnp.int32), drift=step.drift)
    return _Alternated(new_state, step.image_rows, step.ritz_rows)

  def left_call(state):
    step = _half_step(w, state.left_rows, state.left_probe, state.right_rows,
                      state.singular_values, state.right_probe, rank, search_right=False)
    new_state = state._replace(left_rows=step.ritz_rows, right_rows=step.unit_image_rows,
                               singular_values=step.singular_values, right_probe=step.probe,
                               side=jnp.zeros((), jnp.int32), drift=step.drift)
    return _Alternated(new_state, step.ritz_rows, step.image_rows)

  out = lax.cond(state.side == 0, right_call, left_call, state)
  needs_full_update = ~(out.state.drift < tolerance)

  def full_update(w, out):
    # Iterate from the right side's vectors (the Ritz vectors or their unit images).
    incoming = SubspaceState(out.state.right_rows.T, out.state.singular_values,
                             out.state.right_probe, out.state.drift, state.residual_level,
                             jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))
    updated = _update(w, incoming, rank, iterations=1, max_extra_iterations=max_extra_iterations,
                      tolerance=tolerance, level_decay=level_decay)
    images_all = svd.times_transpose(
        jnp.concatenate([updated.basis.T, updated.probe[None]], axis=0), w)  # [k + 1, m]
    # Rayleigh–Ritz in the new basis, so that the next (left) call's search rows, the unit
    # images, are orthogonal and ranked (`_half_step` projects through them as they are).
    eigenvalues, to_ritz = _rayleigh_ritz(updated.basis.T, images_all)
    right_rows, images = to_ritz @ updated.basis.T, _rotate(to_ritz, images_all)
    left_rows = _unit_rows(images)
    if k < _max_rank(w.shape):
      fallback = _complement_unit(left_rows, out.state.left_probe,
                                  jnp.zeros_like(out.state.left_probe))
      left_probe = _complement_unit(left_rows, images_all[k], fallback)
    else:
      left_probe = out.state.left_probe
    new_state = out.state._replace(right_rows=right_rows, left_rows=left_rows,
                                   singular_values=jnp.sqrt(eigenvalues),
                                   right_probe=updated.probe, left_probe=left_probe,
                                   side=jnp.ones((), jnp.int32), drift=updated.drift)
    return _Alternated(new_state, images, right_rows)

  out = _run_once_if(needs_full_update, full_update, w, out)
  new_state = out.state._replace(
      residual_level=level_decay * state.residual_level + (1.0 - level_decay) * out.state.drift,
      refreshes=state.refreshes + needs_full_update.astype(jnp.int32))
  return new_state, out.left_rows, out.right_rows
