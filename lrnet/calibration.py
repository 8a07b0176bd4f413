"""Second moments of each layer's inputs on calibration data, for data-aware truncation.

`calibrate` runs a dense Haiku network (stateless, or with Haiku state such as BatchNorm statistics)
on batches and sums XᵀX per selected `hk.Linear` and `hk.ConvND` layer, keyed by module name (a
Haiku tree's layer name), X the rows the layer multiplies by its weight's matrix view W [m, n]: a
dense layer's inputs [..., m] as [rows, m], a conv layer's patches [positions, kh·kw·c_in] in the
order of `kernel.reshape(-1, c_out)`, so that y = X W either way. `Calibration.whitening` turns the
sums into S with S Sᵀ = C = XᵀX/rows + λI; `lrnet.compress(..., calibration=)` truncates SᵀW instead
of W, which minimises E‖x(W − W′)‖² + λ‖W − W′‖²_F over rank-r W′ (see `compression`). A
`Calibration` built by hand (`Calibration(grams={name: XᵀX}, counts={name: rows})`) serves any tree,
keyed by its module path names.

Accumulation: each batch's XᵀX is one jitted float32 product on the device (one compile for equal
batch shapes; HIGHEST precision, so no TF32 on GPUs), summed over batches in float64 on the host:
rounding does not grow with the number of batches, and host sums overlap the next batch's work.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from lrnet import compression
from lrnet import students

# λ = DEFAULT_DAMPING · tr(C)/m: GPTQ's `percdamp` default. Input directions with less than 1% of
# the mean variance (unseen ones, a singular C: constant border pixels, fewer rows than m) are
# weighted as if they had 1%, so truncation keeps W there instead of treating it as free.
DEFAULT_DAMPING = 1e-2
_HIGHEST = jax.lax.Precision.HIGHEST


class Calibration(NamedTuple):
  """Input statistics of a network's layers (from `calibrate`, or built from known X)."""
  grams: Mapping[str, np.ndarray]   # {module: Σ XᵀX over the calibration rows, [m, m] float64}
  counts: Mapping[str, int]         # {module: number of rows of X}
  damping: float = DEFAULT_DAMPING  # λ = damping · tr(XᵀX/rows)/m, ≥ 0

  def whitening(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(S, S⁻¹) for module `name`: the symmetric root of C = XᵀX/rows + λI, [m, m] float64.

    .. math:: C = Q \\,\\mathrm{diag}(e)\\, Q^T, \\qquad S = Q \\,\\mathrm{diag}(\\sqrt e)\\, Q^T

    Eigenvalues are floored at 1e-12 of the mean input variance, so damping 0 with a singular C
    stays finite. A layer whose inputs were all zero gets C = I (every truncation fits equally).

    Raises:
      ValueError: `name` has no statistics, or the damping is negative.
    """
    if name not in self.grams:
      raise ValueError(f"module {name!r} is selected but has no calibration statistics "
                       f"(calibrated: {list(self.grams)}); calibrate it or exclude it")
    if not self.damping >= 0:
      raise ValueError(f"calibration damping must be >= 0, got {self.damping!r}")
    covariance = np.asarray(self.grams[name], np.float64) / max(self.counts[name], 1)
    m = covariance.shape[0]
    mean_variance = np.trace(covariance) / m
    if not mean_variance > 0:
      covariance, mean_variance = np.eye(m), 1.0
    eigenvalues, eigenvectors = np.linalg.eigh(
        covariance + self.damping * mean_variance * np.eye(m))
    root = np.sqrt(np.maximum(eigenvalues, 1e-12 * mean_variance))
    return (eigenvectors * root) @ eigenvectors.T, (eigenvectors / root) @ eigenvectors.T


def conv_patches(module: hk.ConvND, inputs: jax.Array) -> jax.Array:
  """The rows X [batch · output positions, prod(kernel_shape) · c_in] of conv `module` (its stride,
  padding, dilations and data format) on `inputs` [batch, *spatial, c_in] or [batch, c_in,
  *spatial] (or unbatched): y = X · kernel.reshape(-1, c_out) at every output position. Columns
  are ordered (*kernel, c_in) with c_in fastest (`lax.conv_general_dilated_patches` orders them
  channel-major: permuted here)."""
  if module.feature_group_count != 1 or module.mask is not None:
    raise ValueError(f"{module.module_name}: grouped or masked convolutions cannot be "
                     f"calibrated; exclude it")
  if inputs.ndim == module.num_spatial_dims + 1:
    inputs = inputs[None]
  channels_first = jnp.moveaxis(inputs, module.channel_index, 1)  # [batch, c_in, *spatial]
  patches = jax.lax.conv_general_dilated_patches(
      channels_first, module.kernel_shape, module.stride, module.padding,
      lhs_dilation=module.lhs_dilation, rhs_dilation=module.kernel_dilation,
      precision=_HIGHEST)                      # [batch, c_in · window, *output spatial]
  batch, c_in = channels_first.shape[:2]
  window = math.prod(module.kernel_shape)
  patches = patches.reshape(batch, c_in, window, -1)
  return jnp.transpose(patches, (0, 3, 2, 1)).reshape(-1, window * c_in)


def _batch_statistics(fn: Callable, selected: frozenset, kwargs: Mapping) -> Callable:
  """jit(params, state, *args) -> {module: (XᵀX [m, m] float32, rows int32)} for one batch;
  `kwargs` are closed over (static), `fn`'s new state is discarded."""
  def run(*args):
    statistics = {}

    def record(module, next_f, call_args, call_kwargs):
      inputs = jnp.asarray(call_args[0])  # X: a dense layer's [..., m] as [rows, m]
      rows = (inputs.reshape(-1, inputs.shape[-1]) if isinstance(module, hk.Linear)
              else conv_patches(module, inputs))
      gram = jax.lax.dot_general(rows, rows, (((0,), (0,)), ((), ())), precision=_HIGHEST,
                                 preferred_element_type=jnp.float32)
      previous_gram, previous_rows = statistics.get(module.module_name, (0.0, 0))
      statistics[module.module_name] = (previous_gram + gram, previous_rows + rows.shape[0])
      return next_f(*call_args, **call_kwargs)

    with students.intercept_layers(selected, record):
      fn(*args, **kwargs)
    return {name: (gram, jnp.int32(rows)) for name, (gram, rows) in statistics.items()}

  apply = hk.transform_with_state(run).apply
  return jax.jit(lambda params, state, *args: apply(params, state, None, *args)[0])


def calibrate(fn: Callable, params, batches: Iterable[Any], *, state=None,
              kwargs: Optional[Mapping[str, Any]] = None, include=None, exclude=None,
              unfactorizable: Optional[Mapping[str, str]] = None,
              damping: float = DEFAULT_DAMPING) -> Calibration:
  """Sums XᵀX of every selected layer's inputs over `batches` (module docstring).

  Args:
    fn: the dense network (what one passes to `hk.transform` or `hk.transform_with_state`); run
      without an rng, so dropout written with `hk.maybe_next_rng_key` is off.
    params: its parameters.
    batches: an iterable of `fn`'s positional arguments per batch: tuples, or single arrays.
    state: its Haiku state (e.g. BatchNorm statistics), if it has one; the state `fn` returns
      is discarded, so every batch sees this one.
    kwargs: keyword arguments passed to `fn` on every batch, e.g. `{"is_training": False}`:
      static Python values (closed over, not traced).
    include, exclude, unfactorizable: as in `lrnet.compress` (the modules `decompose` takes).
    damping: stored in the result: λ = damping · tr(C)/m (`DEFAULT_DAMPING`).

  Returns:
    A `Calibration` over the selected modules `fn` called, in the tree's order.
  """
  if not damping >= 0:
    raise ValueError(f"calibrate: damping must be >= 0, got {damping!r}")
  selected = compression.select_ranks(params, 1, include, exclude, unfactorizable=unfactorizable)
  statistics = _batch_statistics(fn, frozenset(selected), dict(kwargs or {}))
  dispatched = (statistics(params, state or {}, *(batch if isinstance(batch, tuple) else (batch,)))
                for batch in batches)
  grams, counts, empty = {}, {}, True
  # Each batch is read back once the next one is dispatched, while the device computes it.
  for batch_statistics, _ in itertools.pairwise(itertools.chain(dispatched, [None])):
    empty = False
    for name, (gram, rows) in batch_statistics.items():
      grams[name] = grams.get(name, 0.0) + np.asarray(gram, np.float64)
      counts[name] = counts.get(name, 0) + int(rows)
  if empty:
    raise ValueError("calibrate: batches is empty")
  order = [name for name in selected if name in grams]
  return Calibration({name: grams[name] for name in order},
                     {name: counts[name] for name in order}, float(damping))
