r"""The rank of a linear map hidden in a black-box function (:func:`estimate_rank`).

If f(x) = g(W₁ x) for an unknown W₁ of rank r (r × dim) and a smooth g, every gradient lies
in the row space of W₁:

.. math:: \nabla f(x) = W_1^T \, \nabla g(W_1 x) \in \mathrm{row}(W_1),

so q gradients at random points, stacked as rows of G [q, dim], span an r-dimensional
subspace and G has r singular values above the rounding noise and min(q, dim) − r at it.
The rank is the position of the one significant gap in the spectrum of G. (The spectra of a
trained network's layers are `lrnet.spectra`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# How far (a factor) the noise actually in the gradients may exceed the predicted noise level
# and still count as noise: the precision estimates below are right to an order of magnitude.
_NOISE_TOLERANCE = 10.0
# A gap is significant when it is this many times wider than the widest ratio the noise part
# of the spectrum can show by itself (its Marchenko–Pastur spread, see `_noise_spread`).
_GAP_MARGIN = 2.0
# Query points handed to a vectorised f (values; gradients by autodiff) per call (performance
# only: bounds memory, fixes the traced shape so that one compilation serves every call).
_CHUNK, _GRADIENT_CHUNK = 4096, 64
# Finite differences: probe points and coordinates per (scale, step) candidate of the search,
_PROBE_POINTS, _PROBE_COORDINATES = 4, 8
# … and for measuring the precision at the chosen (scale, step) once more.
_CHECK_POINTS, _CHECK_COORDINATES = 8, 16
# Scales s = 2^j of the query points x = s ξ searched, j in this range, ordered by |j| (s = 1
# first, then 1/2, 2, 1/4, 4, …).
_SCALE_EXPONENTS = range(-20, 7)
_SCALES = [2.0 ** j for j in sorted(_SCALE_EXPONENTS, key=lambda j: (abs(j), j > 0))]
# Five-point central difference, fourth order: (8(f₊₁ − f₋₁) − (f₊₂ − f₋₂)) / (12 h).
_STENCIL_OFFSETS = (1, -1, 2, -2)
_STENCIL_WEIGHTS = (8 / 12, -8 / 12, -1 / 12, 1 / 12)


class RankEstimate(NamedTuple):
  """What :func:`estimate_rank` found and what it cost."""
  rank: int                     # the estimated rank r of the hidden linear map
  queries: int                  # evaluations of f (finite differences) or of ∇f (autodiff)
  singular_values: np.ndarray   # [min(samples, dim)] float64, σ_i/σ_1 of G (rows scaled)
  gap: float                    # σ_r / σ_{r+1} at the cut (σ_{r+1} floored at the noise level)
  threshold: float              # the ratio the gap had to exceed to be significant
  precision: float              # δ, the estimated relative error of one gradient row
  samples: int                  # q, the number of gradients stacked in G
  scale: float                  # s: the query points are x = s ξ, ξ ~ N(0, I)
  step: float | None            # finite-difference step h (None with autodiff)


class Cut(NamedTuple):
  """Where :func:`choose_cut` splits a spectrum into signal and noise."""
  rank: int            # position k of the chosen cut (0 when no cut is admissible)
  gap: float           # σ_k / max(σ_{k+1}, floor) at the cut
  threshold: float     # the gap needed for significance at this cut
  significant: bool


def _noise_spread(rows: int, columns: int) -> float:
  """Widest ratio σ_max/σ_min of an i.i.d. noise matrix [rows, columns] (Marchenko–Pastur).

  .. math:: R = \\frac{\\sqrt a + \\sqrt b}{|\\sqrt a - \\sqrt b|}, \\quad a = rows, \\; b = columns

  Infinite for a square matrix (its smallest singular value reaches zero), 1 when either side
  is empty (nothing to spread)."""
  if rows == 0 or columns == 0:
    return 1.0
  root_a, root_b = math.sqrt(rows), math.sqrt(columns)
  return math.inf if root_a == root_b else (root_a + root_b) / abs(root_a - root_b)


def choose_cut(singular_values: np.ndarray, samples: int, dim: int, precision: float) -> Cut:
  r"""Picks the rank from the spectrum of a gradient matrix G [q, dim] (see
  :func:`gradient_spectrum` for the scaling of its rows).

  With rows of unit size that carry an error δ (isotropic, entries ≈ δ/√dim), a cut after k
  singular values leaves a noise block of shape [q − k, dim − k], whose largest singular
  value, relative to σ₁, is predicted as

  .. math:: \nu_k = \delta \, \frac{\sqrt{q - k} + \sqrt{dim - k}}{\sqrt{dim}\, \sigma_1}.

  A cut k is *admissible* when its tail is noise: σ_{k+1} ≤ T ν_k (T = 10, the slack of an
  order-of-magnitude precision estimate). Its gap is σ_k over the tail σ_{k+1}, floored at
  ν_k / T (values far below the predicted noise, exact zeros say, carry no information);
  the cut after the last singular value has no tail to measure, so full rank is claimed only
  against the predicted norm of the whole error, ‖E‖ ≈ δ (√q + √dim) / (√dim σ₁), by which
  (Weyl) no singular value can move: the gap there is σ_n / ‖E‖. The rank is the admissible
  cut with the largest gap; the gap is *significant* when it exceeds twice the spread that
  the noise block can show by itself (:func:`_noise_spread`), so that no ratio inside the
  noise can pass for it.

  Args:
    singular_values: [n] descending singular values of G, n = min(q, dim).
    samples, dim: q and dim, the numbers of rows and columns of G.
    precision: δ, the error of one row relative to a row's size.

  Returns:
    The cut (rank 0 and not significant when no cut is admissible or G is zero).
  """
  values = np.asarray(singular_values, np.float64)
  best = Cut(0, 1.0, math.inf, False)
  if values.size == 0 or not values[0] > 0:
    return best
  normalised = values / values[0]
  noise = lambda k: precision * (math.sqrt(samples - k) + math.sqrt(dim - k)) / (
      math.sqrt(dim) * values[0])  # ν_k; ν_0 is the predicted ‖E‖
  for k in range(1, values.size + 1):
    if k < values.size:
      tail = normalised[k]
      if tail > _NOISE_TOLERANCE * noise(k):
        continue
      floor = max(tail, noise(k) / _NOISE_TOLERANCE)
    else:  # By Weyl's inequality no singular value moves by more than the whole error ‖E‖.
      floor = noise(0)
    gap = normalised[k - 1] / max(floor, np.finfo(np.float64).tiny)
    if gap > best.gap:
      threshold = _GAP_MARGIN * _noise_spread(samples - k, dim - k)
      best = Cut(k, float(gap), threshold, bool(gap > threshold))
  return best


def gradient_spectrum(gradients: np.ndarray, relative_errors: bool) -> np.ndarray:
  """Singular values (float64, descending) of the gradient rows [q, dim], scaled so that each
  row's error has the same size δ relative to a unit row. Autodiff rounds each gradient
  relative to its own size: every row is scaled to unit norm (`relative_errors`). A finite
  difference carries an absolute error, about ε_f/h in every entry whatever |∇f|: all rows are
  divided by one number, their root-mean-square norm, so a small gradient (near a stationary
  point) does not have its noise blown up to unit size."""
  gradients = np.asarray(gradients, np.float64)
  norms = np.linalg.norm(gradients, axis=1, keepdims=True)
  if not relative_errors:
    norms = np.sqrt(np.mean(norms ** 2))
  return np.linalg.svd(gradients / norms, compute_uv=False)


def _batched(fn: Callable, dtype, chunk: int, fixed_shape: bool) -> Callable:
  """points [n, dim] → `fn` of each point, stacked (float64 on the host), by `jax.vmap(fn)`
  jitted on chunks of `chunk` points zero-padded to `chunk` rows (`fixed_shape`) or to the next
  power of two, so that few distinct shapes compile (one compilation each)."""
  batched = jax.jit(jax.vmap(fn))

  def apply(points):
    results = []
    for start in range(0, len(points), chunk):
      part = points[start:start + chunk]
      rows = chunk if fixed_shape else 1 << max(0, (len(part) - 1).bit_length())
      padded = np.zeros((rows, points.shape[1]), dtype)
      padded[:len(part)] = part
      results.append(np.asarray(batched(padded), np.float64)[:len(part)])
    return np.concatenate(results)
  return apply


def finite_difference_gradients(evaluate: Callable, points: np.ndarray, step: float,
                                coordinates: np.ndarray | None = None) -> np.ndarray:
  """Five-point central differences of f at `points` along the coordinate axes (the stencil of
  `_STENCIL_WEIGHTS`): error h⁴ f⁽⁵⁾/30 from truncation plus ≈ ε_f / h from the rounding noise
  ε_f of the values. `step` must be a power of two and every point a multiple of it
  (:func:`_snap`), so that x ± h e_i and x ± 2h e_i are exact in the points' dtype and the
  quotient divides by the step actually taken.

  Args:
    evaluate: points [m, dim] → values [m] (float64).
    points: [n, dim], in the dtype f is queried with.
    step: h.
    coordinates: [c] indices i to differentiate along (default: all `dim`).

  Returns:
    [n, c] partial derivatives, float64.
  """
  n, dim = points.shape
  coordinates = np.arange(dim) if coordinates is None else coordinates
  c = len(coordinates)
  group = max(1, _CHUNK // c)  # points per pass: bounds the [group, c, dim] stencil arrays
  estimate = np.zeros((n, c), np.float64)
  for start in range(0, n, group):
    base = points[start:start + group]
    for offset, weight in zip(_STENCIL_OFFSETS, _STENCIL_WEIGHTS):
      shifted = np.repeat(base[:, None, :], c, axis=1)  # [group, c, dim]
      shifted[:, np.arange(c), coordinates] += points.dtype.type(offset * step)
      estimate[start:start + group] += weight * evaluate(shifted.reshape(-1, dim)).reshape(-1, c)
  return estimate / step


def _snap(points: np.ndarray, step: float) -> np.ndarray:
  """`points` rounded to multiples of `step` (a power of two), kept in their dtype."""
  return (np.round(points.astype(np.float64) / step) * step).astype(points.dtype)


def _search_gradient_scale(gradients: Callable, dim: int, dtype, rng: np.random.Generator
                           ) -> tuple[float, int]:
  """(the scale nearest to 1 where autodiff gradients are finite and nonzero, queries spent)."""
  for tries, scale in enumerate(_SCALES, 1):
    probe = gradients((scale * rng.standard_normal((_PROBE_POINTS, dim))).astype(dtype))
    if np.all(np.isfinite(probe)) and np.all(np.linalg.norm(probe, axis=1) > 0):
      return scale, tries * _PROBE_POINTS
  raise ValueError(
      "cannot determine the rank: the gradient of f is zero or not finite at every scale "
      f"tried (|x_i| ~ 2^{min(_SCALE_EXPONENTS)}..2^{max(_SCALE_EXPONENTS)}); f may be "
      "constant, saturated or undefined there")


def _incoherence(partials: np.ndarray) -> float:
  """1 − σ₁²/Σσ² of the rows of `partials` [points, coordinates] scaled to unit norm: the
  share of the gradients' energy outside their common direction (0 when all are parallel)."""
  if not np.all(np.linalg.norm(partials, axis=1) > 0):
    return 0.0
  singular_values = gradient_spectrum(partials, relative_errors=True)
  return float(1.0 - singular_values[0] ** 2 / np.sum(singular_values ** 2))


def _step_error(coarse: np.ndarray, fine: np.ndarray) -> float:
  """ε(h) = ‖D(h) − D(h/2)‖ / ‖D(h/2)‖ of the differences at a step (`coarse`) and at its half
  (`fine`); inf where either is not finite or D(h/2) is zero."""
  size = np.linalg.norm(fine)
  if not (np.all(np.isfinite(coarse)) and np.all(np.isfinite(fine)) and size > 0):
    return math.inf
  return float(np.linalg.norm(coarse - fine) / size)


def _search_difference_step(evaluate: Callable, dim: int, dtype, rng: np.random.Generator
                            ) -> tuple[float, float, float, int]:
  """Chooses the scale s of the query points and the finite-difference step h from f.

  1. Error. For every scale s = 2^j, the steps h = s/2, s/4, … down to s·2^{3−p} (p mantissa
     bits of the query dtype; below it x ± 2h would not be exact) are tried at a few probe
     points and coordinates. ε(h) (:func:`_step_error`) measures the relative error of D(h):
     for large h the truncation error, for small h the rounding noise ε_f/h; each scale keeps
     the step where they balance, whatever f's own length scale. (The textbook h ≈ ε^{1/5}|x|
     would assume f varies on the scale of |x|; a map with large weights turns its phase many
     times per unit of x.)
  2. Direction. What limits the rank estimate is the error relative to how much the
     gradient's *direction* varies between points: near a stationary point ∇f(x) ≈ H x with
     H = W₁ᵀ ∇²g W₁, so the gradients inherit the squared condition number of W₁, and where a
     common term dominates they are nearly parallel. The scales whose error is within T = 10 of
     the least are probed again on fresh, more numerous points, at their step and its half and
     quarter (a minimum over noisy estimates is biased low, and the least error often sits
     where the truncation, ∝ h⁴, takes over); the least ε / incoherence (:func:`_incoherence`,
     floored at ε: below it, it is noise) wins.

  Returns:
    (scale, step, relative error ε of the gradient there, queries spent).
  """
  mantissa_bits = np.finfo(dtype).nmant + 1
  per_scale = []  # (ε, scale, step): the best step of each scale
  queries = 0
  for scale in _SCALES:
    points = scale * rng.standard_normal((_PROBE_POINTS, dim))
    coordinates = rng.choice(dim, min(dim, _PROBE_COORDINATES), replace=False)
    # On the grid of the largest step, the probe points are on the grid of every step, so
    # that all steps are compared at the same points.
    snapped = _snap(points.astype(dtype), scale / 2)
    steps = [scale * 2.0 ** -halvings for halvings in range(1, mantissa_bits - 2)]
    estimates = [finite_difference_gradients(evaluate, snapped, step, coordinates)
                 for step in steps]
    queries += len(_STENCIL_OFFSETS) * sum(estimate.size for estimate in estimates)
    errors = [(_step_error(coarse, fine), scale, step)  # fine: at step / 2
              for coarse, fine, step in zip(estimates, estimates[1:], steps)]
    if errors and min(errors)[0] < 1.0:
      per_scale.append(min(errors))
  if not per_scale:
    raise ValueError(
        "cannot determine the rank: finite differences of f are zero, not finite or pure "
        "noise at every scale and step tried; f may be constant, saturated or not smooth")
  least_error = min(error for error, _, _ in per_scale)
  best_score, best = math.inf, None
  for error, scale, step in per_scale:
    if error > _NOISE_TOLERANCE * least_error:
      continue
    points = scale * rng.standard_normal((_CHECK_POINTS, dim))
    coordinates = rng.choice(dim, min(dim, _CHECK_COORDINATES), replace=False)
    for candidate in (step, step / 2, step / 4):
      snapped = _snap(points.astype(dtype), candidate)
      estimate, finer = (finite_difference_gradients(evaluate, snapped, h, coordinates)
                         for h in (candidate, candidate / 2))
      queries += 2 * len(_STENCIL_OFFSETS) * estimate.size
      error = _step_error(estimate, finer)
      score = error / max(_incoherence(estimate), error)
      if error < 1.0 and score < best_score:
        best_score, best = score, (scale, candidate, error)
  if best is None:
    raise ValueError(
        "cannot determine the rank: finite differences of f disagree between steps on fresh "
        "points at every scale; f may be too noisy or not smooth")
  return (*best, queries)


def estimate_rank(f: Callable[[jax.Array], jax.Array], dim: int, *, key: jax.Array,
                  differentiable: bool = True, max_queries: int | None = None,
                  oversampling: int = 10, vectorized: bool = True, dtype=None,
                  relative_precision: float | None = None) -> RankEstimate:
  r"""Estimates the rank of the linear map inside f(x) = g(W₁ x) from queries of f alone.

  Method (module docstring). Gradients at q random points x = s ξ (ξ ~ N(0, I_dim)) are the
  rows of G [q, dim] (scaled by :func:`gradient_spectrum`); the rank is the cut of
  :func:`choose_cut` (float64 SVD on the host). Samples are drawn until the cut is significant
  and at least `oversampling` gradients beyond the rank have added no direction
  (q ≥ r + oversampling): q starts at 2·oversampling and grows by half while the gap is not
  significant, because the noise spread shrinks as q grows (at q = dim the noise block
  [q − r, dim − r] is square and no gap can be significant); it stops at 4·(dim + oversampling).

  Gradients (the queries spent finding s and h are counted):
  * ``differentiable=True``: ∇f by reverse-mode autodiff (f must be JAX-traceable), one query
    per gradient, δ = eps·√dim of f's output dtype (the rounding of a computed dim-vector); s
    is the power of 2 nearest 1 where gradients are finite and nonzero (the row space does not
    depend on it).
  * ``differentiable=False``: five-point central differences along the coordinate axes,
    4·dim queries per gradient (:func:`finite_difference_gradients`), s and a power-of-two h
    from :func:`_search_difference_step`, δ the error it measured. Float32 finite differences
    are about 1e-3 accurate at best (the rounding of f's intermediate values over the step),
    so the smallest signal singular value must stand about 1e-3 clear of σ₁ · noise-spread;
    autodiff reaches ~1e-7.

  When it cannot work (and raises ``ValueError("cannot determine the rank: …")``):
  * f constant, or gradients zero or NaN at every scale (nothing to see);
  * saturating nonlinearities (∇g ≈ 0 for most inputs, e.g. tanh of huge pre-activations):
    no gap is significant, or (without an error: a limit of the method) the rank comes out low
    when some units never leave saturation at the query points;
  * rank close to `dim` with an ill-conditioned W₁ or noisy gradients: the smallest signal
    singular values sink into the noise (full rank is reported only when σ_dim stands clear of
    the predicted noise);
  * a spectrum that decays smoothly through the noise level (no gap), or gradients less
    accurate than δ predicts (no admissible cut; pass `relative_precision`);
  * `max_queries` spent before the gap became significant.

  Args:
    f: scalar function of a [dim] vector. JAX-traceable when `differentiable` or `vectorized`.
    dim: input dimension.
    key: ``jax.random`` key for the query points.
    differentiable: use autodiff (True) or finite differences (False).
    max_queries: budget on queries (see above), probes included; None: no budget.
    oversampling: gradients beyond the rank that must add no new direction.
    vectorized: evaluate f on batches through ``jax.vmap`` (else one Python call per point,
      for a non-JAX f with ``differentiable=False``).
    dtype: dtype of the query points (default: JAX's default float, float32 unless x64).
    relative_precision: δ override (relative error of one gradient).

  Returns:
    A :class:`RankEstimate`.

  Raises:
    ValueError: bad arguments, or "cannot determine the rank: …" (see above).
  """
  if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
    raise ValueError(f"dim must be a positive integer, got {dim!r}")
  if not isinstance(oversampling, int) or oversampling < 1:
    raise ValueError(f"oversampling must be a positive integer, got {oversampling!r}")
  dtype = np.dtype(dtype if dtype is not None else jnp.zeros(()).dtype)
  # Query points come from NumPy, seeded once from `key`: a JAX draw per batch shape would
  # compile once per shape.
  rng = np.random.default_rng(np.asarray(jax.random.bits(key, (4,), jnp.uint32)))
  # points [n, dim] → values [n], float64 on the host.
  evaluate = (_batched(f, dtype, _CHUNK, fixed_shape=False) if vectorized
              else lambda points: np.array([float(f(point)) for point in points], np.float64))
  budget = math.inf if max_queries is None else max_queries
  if differentiable:
    gradient_fn = _batched(jax.grad(f), dtype, _GRADIENT_CHUNK, fixed_shape=True)
    scale, queries = _search_gradient_scale(gradient_fn, dim, dtype, rng)
    step, cost_per_gradient = None, 1
    output_dtype = jnp.result_type(jax.eval_shape(f, jax.ShapeDtypeStruct((dim,), dtype)))
    precision = float(np.finfo(output_dtype).eps * math.sqrt(dim))
  else:
    scale, step, precision, queries = _search_difference_step(evaluate, dim, dtype, rng)
    cost_per_gradient = len(_STENCIL_OFFSETS) * dim
  if relative_precision is not None:
    precision = float(relative_precision)

  max_samples = 4 * (dim + oversampling)
  gradients = np.zeros((0, dim))
  target = min(2 * oversampling, max_samples)
  while True:
    count = target - len(gradients)
    if queries + count * cost_per_gradient > budget:
      raise ValueError(
          f"cannot determine the rank: max_queries={max_queries} spent ({queries} queries, "
          f"{len(gradients)} gradients) before a significant gap appeared")
    points = (scale * rng.standard_normal((count, dim))).astype(dtype)
    new = (gradient_fn(points) if differentiable
           else finite_difference_gradients(evaluate, _snap(points, step), step))
    queries += count * cost_per_gradient
    finite = np.all(np.isfinite(new), axis=1) & (np.linalg.norm(new, axis=1) > 0)
    if not np.any(finite):
      raise ValueError(f"cannot determine the rank: all {count} gradients of a batch are zero "
                       "or not finite (f constant or undefined at the query points?)")
    gradients = np.concatenate([gradients, new[finite]])
    samples = len(gradients)
    spectrum = gradient_spectrum(gradients, relative_errors=differentiable)
    cut = choose_cut(spectrum, samples, dim, precision)
    if cut.significant and samples >= cut.rank + oversampling:
      return RankEstimate(rank=cut.rank, queries=int(queries),
                          singular_values=spectrum / spectrum[0], gap=cut.gap,
                          threshold=cut.threshold, precision=precision, samples=samples,
                          scale=scale, step=step)
    if samples >= max_samples:
      raise ValueError(
          f"cannot determine the rank: no significant gap in the spectrum of {samples} "
          f"gradients (widest admissible gap {cut.gap:.3g} after {cut.rank} singular values, "
          f"needed {cut.threshold:.3g}; estimated gradient precision {precision:.2g})")
    target = min(max_samples, cut.rank + oversampling if cut.significant
                 else samples + max(oversampling, samples // 2))
