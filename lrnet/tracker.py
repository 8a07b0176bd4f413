"""The alternating tracker: the rank-r projection of a slowly moving matrix, one product per step.

A straight-through student needs, at every training step, the best rank-r approximation Ŵ of
weights W that moved a little since the last step: an SVD per step costs 35–45× the dense step,
this tracker one product with W. It keeps k = r + oversample singular pairs of W as rows (right
rows [k, n], left rows [k, m]) and searches W's right and left side by turns:

* a **right call** multiplies the right search rows X by W (Z = X Wᵀ) and runs Rayleigh–Ritz
  (`_rayleigh_ritz`): the best rank-r approximation of the current W with rows in span(X),
  Ŵ = (W V_r) V_rᵀ, from k×k algebra only;
* a **left call** multiplies the unit images of those Ritz vectors U (orthonormal and ranked
  already) by W and projects through them as they are, Ŵ = U_r (U_rᵀ W), with no k×k algebra,
  unless float rounding of those rows could cost more than 1e-6 of the optimal error
  (`_unranked_is_near_optimal`), when it runs Rayleigh–Ritz too.

Both factors of Ŵ come out of the one product, so the student's forward and input gradient run
through them (`projection.st_factored_matmul`): only the weight gradient is a dense product.

**Drift certificate.** Each call estimates ρ − 1 for the optimality ratio
ρ = ‖W − Ŵ‖_F / ‖W − W_r‖_F from by-products: gain, the energy one more power step would add to
the top r directions (the residuals of the previous pairs under the current W), and miss, the
excess over the r-th value of a probe ⟂ the tracked rows that one power step per call drives to
W's top direction outside them (gain is blind to an invariant but wrong subspace);
drift = sqrt(1 + max(gain, miss) / tail) − 1 with tail = ‖W‖_F² − Σ_{i<r} σ_i². A call whose
drift is not below `tolerance` (default 1e-3: ρ ≤ 1.001; or is not finite) is replaced by an
exact refresh, an SVD of W: a guard, not a path that needs to be fast (from a trained teacher,
0 refreshes: BUILD_NOTES.md). From a W of rank exactly r (a whitened truncation) the tail is only
the updates since, and the certificate settles near 2e-4 (ρ − 1 ≈ 1e-4): under a tolerance of
1e-4 every call would refresh.

**Batches.** Under `vmap` a `lax.cond` on a batched predicate becomes a select that computes
both branches for every member. Here every branch (Rayleigh–Ritz on a left call, the refresh, a
Cholesky factorisation) is taken where any member needs it (`_any_member`, an unbatched
predicate), each member keeping its own branch's result. Members may track different k: the
state is padded to a common K with zero rows past its own `width`, which stay zero and never
enter the projection, so a padded member computes what it would alone (up to rounding). The
side alternates with the call count (a refresh keeps the phase): members search the same side.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from lrnet import svd

DEFAULT_OVERSAMPLE = 10
# Set inside `refresh_left_out`: calls traced there build no refresh.
_REFRESH_LEFT_OUT = contextvars.ContextVar("refresh_left_out", default=False)
DEFAULT_TOLERANCE = 1e-3  # ρ ≤ 1.001; see the module docstring
# Energy differences below this many eps·‖W‖_F² are rounding noise (measured: ≤ 5.4).
_NOISE_FACTOR = 8.0
# A left call projects through its search rows as they are while the energy their rounding can
# cost stays below this fraction of the optimal error energy (`_unranked_is_near_optimal`).
_UNRANKED_MAX_EXCESS = 1e-6
# Rayleigh–Ritz orthonormalises its rows X by a series in E = X Xᵀ − I while ‖E‖_F is below
# this (C X Xᵀ C − I ≲ 2e-6; trained layers at r = 200: ‖E‖_F ≈ 0.015), else by Cholesky.
_SERIES_MAX_EXCESS = 0.05


class TrackerState(NamedTuple):
  """Tracked singular pairs of a matrix W [m, n], padded to K = `right_rows.shape[0]` rows.

  After a call, both sides hold that call's pairs: the side it searched its vectors (right:
  Ritz vectors, orthonormal; left: the rows it projected through), the other side their images
  under W or Wᵀ scaled to unit norm, which the next call searches. Rows ≥ `width` are zero.
  """
  right_rows: jax.Array       # [K, n] right vectors v_i, or unit Wᵀu_i to search next
  left_rows: jax.Array        # [K, m] left vectors u_i, or unit W v_i to search next
  singular_values: jax.Array  # [K] the last call's values, descending after Rayleigh–Ritz
  right_probe: jax.Array      # [n] unit vector ⟂ the right rows (zeros if k = min(m, n))
  left_probe: jax.Array       # [m] unit vector ⟂ the left rows (zeros if k = min(m, n))
  width: jax.Array            # [] int32 k ≤ K: the rows tracked; the others are padding
  side: jax.Array             # [] int32: the next call searches 0: the right rows, 1: the left
  drift: jax.Array            # [] drift statistic of the last call (≈ estimated ρ − 1)
  refreshes: jax.Array        # [] int32: calls replaced by an exact SVD so far


@jax.custom_batching.custom_vmap
def _any_member(pred: jax.Array) -> jax.Array:
  """`pred`; under `vmap`, whether it holds for any member, as one unbatched value."""
  return pred


@_any_member.def_vmap
def _any_member_vmap(unused_axis_size, in_batched, pred):
  return (jnp.any(pred) if in_batched[0] else pred), False


def _cond_any(pred: jax.Array, true_fn: Callable, false_fn: Callable, operand: Any) -> Any:
  """`true_fn(operand)` where `pred`, else `false_fn(operand)`; under `vmap`, `true_fn` is
  computed only if some member needs it, each member selecting its own branch's result (module
  docstring, Batches)."""
  def either(operand):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), true_fn(operand),
                                  false_fn(operand))
  return lax.cond(_any_member(pred), either, false_fn, operand)


def tracked_width(shape, rank: int, oversample: int = DEFAULT_OVERSAMPLE) -> int:
  """k = min(rank + oversample, min(m, n)) after checking both (ValueError)."""
  rank = svd.check_rank(shape, rank)
  if not isinstance(oversample, numbers.Integral) or oversample < 0:
    raise ValueError(f"oversample must be an integer ≥ 0, got {oversample!r}")
  return min(rank + int(oversample), min(int(shape[0]), int(shape[1])))


def _rank_mask(size: int, rank) -> jax.Array:
  return jnp.arange(size) < rank


def exact_factors(state: TrackerState) -> tuple[jax.Array, jax.Array]:
  """The factors (left [K, m], right [K, n]) of a state fresh from `init`: the exact pairs,
  Ŵ_r = Σ_{i<r} σ_i u_i v_iᵀ, without a call of `project`."""
  return state.singular_values[:, None] * state.left_rows, state.right_rows


def leading_rows(rows: jax.Array, rank) -> jax.Array:
  """`rows` [K, d] with rows ≥ `rank` zeroed (rank may be traced): masking one factor of
  Ŵ = Lᵀ R is enough to keep only the top r pairs."""
  return jnp.where(_rank_mask(rows.shape[0], rank)[:, None], rows, 0.0)


def _probe(rows: jax.Array, candidates: list[jax.Array], has_room: bool) -> jax.Array:
  """A unit vector ⟂ `rows` [K, d] (orthonormal or zero rows): the first of `candidates` ([d]
  each) with a part outside span(rows), projected and normalised, else a fixed pseudo-random
  one (a constant: `jax.random` would run on every call); zeros when K = d (padding included, a
  static choice). Random rather than the (k+1)-th singular vector: an exact singular vector stays
  put under a change of W that only rescales singular values, a mixture does not. Projects twice:
  once leaves rounding components in the span as large as a small remainder.
  """
  if not has_room:
    return jnp.zeros_like(candidates[0])
  direction = np.random.default_rng(0).standard_normal(candidates[0].shape)
  vectors = jnp.stack([*candidates, jnp.asarray(direction, rows.dtype)])
  for _ in range(2):
    vectors = vectors - svd.times_transpose(vectors, rows) @ rows
  norms = jnp.linalg.norm(vectors, axis=1)
  probe = jnp.zeros_like(candidates[0])
  for vector, norm in zip(vectors[::-1], norms[::-1]):
    probe = jnp.where(norm > jnp.finfo(rows.dtype).tiny ** 0.5, vector / norm, probe)
  return probe


def _exact_pairs(w: jax.Array, size: int, width: jax.Array, right_probe: jax.Array,
                 left_probe: jax.Array) -> dict:
  """The top-`size` singular pairs of `w` by SVD as `TrackerState` fields (rows ≥ `width`
  zeroed), with probes ⟂ them made from the given ones (`_probe`)."""
  u, singular_values, vt = jnp.linalg.svd(w, full_matrices=False)
  left_rows, right_rows = leading_rows(u[:, :size].T, width), leading_rows(vt[:size], width)
  has_room = size < min(w.shape)
  return dict(right_rows=right_rows, left_rows=left_rows,
              singular_values=jnp.where(_rank_mask(size, width), singular_values[:size], 0.0),
              right_probe=_probe(right_rows, [right_probe], has_room),
              left_probe=_probe(left_rows, [left_probe], has_room))


@functools.partial(jax.jit, static_argnums=1)
def _init(w: jax.Array, size: int, width: jax.Array) -> TrackerState:
  pairs = _exact_pairs(w, size, width, jnp.zeros((w.shape[1],), w.dtype),
                       jnp.zeros((w.shape[0],), w.dtype))
  count = jnp.zeros((), jnp.int32)
  return TrackerState(**pairs, width=width, side=count, drift=jnp.zeros((), w.dtype),
                      refreshes=count)


def init(w: jax.Array, rank: int, oversample: int = DEFAULT_OVERSAMPLE,
         pad_to: Optional[int] = None) -> TrackerState:
  """Exact top-k singular pairs of `w`, k = min(rank + oversample, min(m, n)).

  Args:
    w: matrix, [m, n].
    rank: static integer in `1..min(m, n)`; the largest rank the state will serve.
    oversample: extra pairs tracked beyond `rank` (≥ 0): they keep directions near the cut
      inside the searched subspace, so that one half power step per call is enough.
    pad_to: K ≥ k rows to hold (members of a batch share one K); default k.

  Returns:
    A `TrackerState`; the first call searches the right rows.
  """
  width = tracked_width(w.shape, rank, oversample)
  size = width if pad_to is None else int(pad_to)
  if not width <= size <= min(w.shape):
    raise ValueError(f"pad_to must be in {width}..{min(w.shape)} for rank {rank} + oversample "
                     f"{oversample} of a matrix of shape {tuple(w.shape)}, got {pad_to!r}")
  return _init(lax.stop_gradient(w), size, jnp.asarray(width, jnp.int32))


def _rayleigh_ritz(gram: jax.Array, image_gram: jax.Array,
                   active: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rayleigh–Ritz of W in span(X) from the Grams [K, K] of rows X [K, d] (not necessarily
  orthonormal; rows not `active` are zero padding) and of their images Z = X Wᵀ or X W, with
  K×K algebra only.

  .. math:: C X X^T C^T = I, \\quad C (Z Z^T) C^T = S \\Lambda S^T, \\quad T = S^T C

  The rows come from the last call and are nearly orthonormal, E = X Xᵀ − I small: C is then
  (I + E)^(-1/2) by its series to third order (off by ≈ 0.27 ‖E‖⁴, products only), else the
  inverse of the Cholesky factor of X Xᵀ. Padding gets an identity Gram block and eigenvalue
  −1, so it sorts last; T's padding rows are zeroed, so that T X and T Z keep them zero.

  Returns:
    (λ [K], descending, ≥ 0: the squared Ritz values; T [K, K]: T X are the orthonormal Ritz
    vectors and T Z their images).
  """
  padding = jnp.diag((~active).astype(gram.dtype))
  eye = jnp.eye(gram.shape[0], dtype=gram.dtype)

  def series(excess):
    square = excess @ excess
    return eye - 0.5 * excess + 0.375 * square - 0.3125 * (square @ excess)

  excess = gram + padding - eye
  to_orthonormal = _cond_any(  # C
      jnp.sum(excess * excess) > _SERIES_MAX_EXCESS ** 2,
      lambda excess: jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(eye + excess), eye,
                                                       lower=True), series, excess)
  # Products in the forms A B and A Bᵀ: XLA:CPU runs a transposed left operand far slower.
  reduced = svd.times_transpose(to_orthonormal @ image_gram, to_orthonormal) - padding
  eigenvalues, eigenvectors = jnp.linalg.eigh(reduced)  # symmetrises its input
  to_ritz = eigenvectors.T[::-1] @ to_orthonormal
  return jnp.maximum(eigenvalues[::-1], 0.0), jnp.where(active[:, None], to_ritz, 0.0)


def _drift(total: jax.Array, noise: jax.Array, eigenvalues: jax.Array, rank: jax.Array,
           gain: jax.Array, probe_energy: jax.Array) -> jax.Array:
  """The drift certificate sqrt(1 + max(gain, miss) / tail) − 1 (module docstring; ∞ if not
  finite), miss = ‖W p‖² − λ_r from `probe_energy`; both numerators lose `noise`."""
  size = eigenvalues.shape[0]
  kept = jnp.sum(jnp.where(_rank_mask(size, rank), eigenvalues, 0.0))
  tail = jnp.maximum(total - kept, noise)
  cut = jnp.take(eigenvalues, jnp.clip(rank - 1, 0, size - 1))
  miss = jnp.maximum(probe_energy - cut - noise, 0.0)
  drift = jnp.sqrt(1.0 + jnp.maximum(jnp.maximum(gain - noise, 0.0), miss) / tail) - 1.0
  return jnp.where(jnp.isfinite(drift), drift, jnp.inf)


def _unranked_is_near_optimal(total: jax.Array, noise: jax.Array, values: jax.Array,
                              rank: jax.Array, eps: float) -> jax.Array:
  """Whether projecting through the unit image rows of the last Rayleigh–Ritz step as they
  are keeps the excess energy under `_UNRANKED_MAX_EXCESS` of the optimal error energy.

  Those rows y_i come from a float eigh of a Gram: Y Yᵀ = I + Δ with Δ_ij ≈ eps·σ_1²/(σ_i σ_j)
  (`values` σ, descending). Ŵ = Y_rᵀ Y_r W then differs from the exact projection on span(Y_r)
  by Δ Y_r W, second order: ‖Δ Y_r W‖² ≲ eps²·σ_1⁴·r·Σ_{i<r} σ_i⁻², against the optimal
  ‖W − W_r‖² ≈ ‖W‖_F² − Σ_{i<r} σ_i² (trained layers at r = 200: ≈ 1e-8 of it).
  """
  mask = _rank_mask(values.shape[0], rank)
  squares = jnp.maximum(values ** 2, jnp.finfo(values.dtype).tiny)
  excess = eps ** 2 * squares[0] ** 2 * rank * jnp.sum(jnp.where(mask, 1.0 / squares, 0.0))
  tail = jnp.maximum(total - jnp.sum(jnp.where(mask, squares, 0.0)), noise)
  return excess <= _UNRANKED_MAX_EXCESS * tail


class _Call(NamedTuple):
  state: TrackerState      # `refreshes` not yet updated
  left_rows: jax.Array     # [K, m] factor rows of this call: Ŵ_r = Σ_{i<r} left_iᵀ right_i
  right_rows: jax.Array    # [K, n]


def _half_step(w: jax.Array, state: TrackerState, rank: jax.Array, energies: tuple,
               search_right: bool, needs_ranking: Optional[jax.Array] = None) -> _Call:
  """One call (module docstring): the rank-r projection of the current W through the searched
  rows X [K, d] of one side and their images Z = X Wᵀ (right) or X W (left), [K, e]: a right
  call's Ŵ = Σ_{i<r} (T Z)_iᵀ (T X)_i (`_rayleigh_ritz`), a left call's Ŵ = Σ_{i<r} x_i (x_iᵀ W),
  or Rayleigh–Ritz too where `needs_ranking`.

  Drift: for an exact singular pair W x_i = σ_i y_i (y_i the previous call's vectors on the
  other side, `partners`), so the residual ‖Z_i − σ_i y_i‖² is the energy one more power step
  would add, measured against the W of now: it also sees how far W moved since the last call.
  A right call follows an unranked left call, whose rows are not Ritz vectors of the W of now:
  there only the part of Z_i outside span(Y) counts, ‖Z_i‖² − ‖Y Z_iᵀ‖² (its Rayleigh–Ritz
  step removes the rotation inside the span).
  """
  right, left = (state.right_rows, state.right_probe), (state.left_rows, state.left_probe)
  (rows, probe), (partners, other_probe) = (right, left) if search_right else (left, right)
  size = rows.shape[0]
  active = _rank_mask(size, state.width)
  search = jnp.concatenate([rows, probe[None]], axis=0)                        # [K + 1, d]
  images_all = svd.times_transpose(search, w) if search_right else search @ w  # [K + 1, e]
  probe_image = images_all[size]

  # Products take all K + 1 images, their results are sliced: a slice of Z is a copy (XLA:CPU).
  def ranked(image_gram):
    eigenvalues, to_ritz = _rayleigh_ritz(svd.times_transpose(rows, rows), image_gram, active)
    return eigenvalues, to_ritz @ rows, jnp.pad(to_ritz, ((0, 0), (0, 1))) @ images_all

  if search_right:
    image_gram = svd.times_transpose(images_all, images_all)[:size, :size]
    eigenvalues, ritz_rows, image_rows = ranked(image_gram)
    inside = svd.times_transpose(images_all, partners)[:size]                # [K, K] Y Z_iᵀ
    # Row sums by a product: a sum XLA:CPU fuses into the product above takes 2–3× as long.
    inside_energies = (inside * inside) @ jnp.ones((size,), inside.dtype)
    residuals = jnp.maximum(jnp.diagonal(image_gram) - inside_energies, 0.0)
  else:
    images = images_all[:size]
    eigenvalues, ritz_rows, image_rows = jnp.sum(images * images, axis=1), rows, images
    if needs_ranking is not None:
      eigenvalues, ritz_rows, image_rows = jax.tree_util.tree_map(
          lambda a, b: jnp.where(needs_ranking, b, a), (eigenvalues, ritz_rows, image_rows),
          ranked(svd.times_transpose(images_all, images_all)[:size, :size]))
    residuals = jnp.sum((images - state.singular_values[:, None] * partners) ** 2, axis=1)
  gain = jnp.sum(jnp.where(_rank_mask(size, rank), residuals, 0.0))
  drift = _drift(*energies, eigenvalues, rank, gain, jnp.sum(probe_image * probe_image))

  # Rows ≥ width stay zero: T's padding rows are zero, and a left call's rows and images are.
  norms = jnp.linalg.norm(image_rows, axis=1, keepdims=True)
  unit_image_rows = jnp.where(norms > jnp.finfo(w.dtype).tiny ** 0.5, image_rows / norms, 0.0)
  next_probe = _probe(unit_image_rows, [probe_image, other_probe], size < min(w.shape))
  common = dict(singular_values=jnp.sqrt(eigenvalues), side=1 - state.side, drift=drift)
  if search_right:
    return _Call(state._replace(right_rows=ritz_rows, left_rows=unit_image_rows,
                                left_probe=next_probe, **common), image_rows, ritz_rows)
  return _Call(state._replace(left_rows=ritz_rows, right_rows=unit_image_rows,
                              right_probe=next_probe, **common), ritz_rows, image_rows)


def _refresh(w: jax.Array, call: _Call) -> _Call:
  """The call replaced by an exact SVD of `w`: exact factors now, exact pairs on both sides for
  the next call (whichever side it searches), the alternation's phase kept."""
  state = call.state
  # The SVD of a product computed here, not of `w`: LAPACK wants a column-major operand, and
  # given `w` itself XLA:CPU lays `w` out so before the cond, on every call (≈ 1 ms at 1024²
  # per layer and step). The product costs only when the refresh runs.
  fresh = w @ jnp.eye(w.shape[1], dtype=w.dtype)
  new_state = state._replace(**_exact_pairs(fresh, state.right_rows.shape[0], state.width,
                                            state.right_probe, state.left_probe))
  return _Call(new_state, *exact_factors(new_state))


@contextlib.contextmanager
def refresh_left_out():
  """Inside, `project` traces as with `tolerance=inf`, building no refresh: for estimating a step's
  cost (`lrnet.sweep.step_flops`), which XLA's cost analysis would charge with the refresh's SVD on
  every call (≈ 9× a rank-10 student's step), though from a trained teacher calls do not take it."""
  token = _REFRESH_LEFT_OUT.set(True)
  try:
    yield
  finally:
    _REFRESH_LEFT_OUT.reset(token)


def project(w: jax.Array, state: TrackerState, rank, *,
            tolerance: float = DEFAULT_TOLERANCE) -> tuple[TrackerState, jax.Array, jax.Array]:
  """This call's factors of the rank-r projection of `w`, from one product with `w`.

  Args:
    w: matrix, [m, n] (not differentiated).
    state: from `init` or a previous call, for a matrix of the same shape.
    rank: r, a Python int in `1..width` (checked) or a traced int32 scalar (clipped into
      `1..width`).
    tolerance: a call whose drift certificate (≈ ρ − 1) is not below this is replaced by an
      exact SVD; 0 forces an SVD on every call, `inf` never (no refresh is built; also inside
      `refresh_left_out`).

  Returns:
    (new state, left rows [K, m], right rows [K, n]) with Ŵ_r = Σ_{i<r} left_iᵀ right_i, i.e.
    `projection.st_factored_matmul(x, w, leading_rows(left, r), right)` is x Ŵ_r.
  """
  size, n = state.right_rows.shape
  if jnp.ndim(w) != 2 or w.shape[1] != n or state.left_rows.shape != (size, w.shape[0]):
    raise ValueError(f"tracker rows of shapes {tuple(state.left_rows.shape)} and {(size, n)} "
                     f"do not fit a matrix of shape {tuple(jnp.shape(w))}")
  if isinstance(rank, numbers.Number):
    svd.check_rank(w.shape, rank)
    if not rank <= size:
      raise ValueError(f"rank must be an integer in 1..{size} (the tracked rows), got {rank!r}")
  return _project(w, state, jnp.asarray(rank, jnp.int32),
                  tolerance=math.inf if _REFRESH_LEFT_OUT.get() else float(tolerance))


@functools.partial(jax.jit, static_argnames=("tolerance",))
def _project(w, state, rank, *, tolerance):
  w, state = lax.stop_gradient((w, state))
  rank = jnp.clip(rank, 1, state.width)
  total = jnp.sum(w * w)  # and the rounding noise floor of energy differences:
  energies = total, _NOISE_FACTOR * jnp.finfo(w.dtype).eps * total
  needs_ranking = ~_unranked_is_near_optimal(*energies, state.singular_values, rank,
                                             jnp.finfo(w.dtype).eps)
  # One switch (a cond's results are copies on XLA:CPU). The members of a batch search the same
  # side (the phase never changes); a left call ranks where any member needs it.
  branch = jnp.where(_any_member(state.side == 0), 0, jnp.where(_any_member(needs_ranking), 2, 1))
  call = lax.switch(branch, [functools.partial(_half_step, w, state, rank, energies, *sides)
                             for sides in ((True,), (False,), (False, needs_ranking))])
  if math.isinf(tolerance):
    return call.state._replace(refreshes=state.refreshes), call.left_rows, call.right_rows
  needs_refresh = ~(call.state.drift < tolerance)  # also on NaN
  call = _cond_any(needs_refresh, lambda call: _refresh(w, call), lambda call: call, call)
  new_state = call.state._replace(refreshes=state.refreshes + needs_refresh.astype(jnp.int32))
  return new_state, call.left_rows, call.right_rows


def optimality_ratio(w: jax.Array, w_hat: jax.Array, rank) -> jax.Array:
  """ρ [] = ‖W − Ŵ‖_F / ‖W − W_r‖_F for `w` [m, n] and its approximation `w_hat` [m, n], W_r the
  exact truncated SVD at `rank` (in `1..min(m, n)`, may be traced): ≥ 1, and 1 is optimal.
  Computes an SVD; for tests and benchmarks. When W has rank ≤ r the optimum is 0 and the
  denominator is floored at eps·‖W‖_F."""
  if isinstance(rank, numbers.Integral):
    svd.check_rank(w.shape, rank)
  singular_values = jnp.linalg.svd(w, compute_uv=False)
  tail = jnp.where(jnp.arange(singular_values.shape[0]) >= rank, singular_values, 0.0)
  optimal = jnp.sqrt(jnp.sum(tail**2))
  floor = jnp.finfo(w.dtype).eps * jnp.linalg.norm(w)
  return jnp.linalg.norm(w - w_hat) / jnp.maximum(optimal, floor)
