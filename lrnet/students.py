"""Any Haiku network, factorized or trained straight-through, without rewriting it.

`fn` is what one passes to `hk.transform`. Its dense (`hk.Linear`) and conv (`hk.ConvND`: 1-, 2-
and 3-D) layers are intercepted by module name (`hk.intercept_methods`, `hk.custom_getter`):

* `factorized(fn, rank)`: each selected layer computes through two factors. A linear layer
  y = (x U) V + b with U [m, r], V [r, n]; a conv layer with kernel [kh, kw, c_in, c_out] (the
  matrix [kh·kw·c_in, c_out]) becomes a kh×kw conv to r channels (`u`, same stride, padding and
  dilation) followed by a 1×1 conv to c_out (`v` [r, c_out]). Its parameters are exactly those of
  `lrnet.compress(dense_params, rank)`, and it computes what the dense network computes at
  `lrnet.project(dense_params, rank)`.
* `straight_through(fn, rank, method)`: dense parameters of `fn`'s own structure, each selected
  weight used through its rank-r projection Ŵ in the forward pass and updated with the gradient
  of Ŵ (straight-through). `method="exact"` projects by an SVD every call; `"alternating"` tracks
  the projection with one product with W per call (`lrnet.tracker`), and a linear layer computes
  through the two factors (`projection.st_factored_matmul`). Its Haiku state holds, per selected
  module, the rank it projects to (`"rank"`, an int32 that may differ between members of a
  batch) and, alternating, its tracker (`"tracker"`). `tracker_state` builds that state for
  given parameters (e.g. a teacher's).

Selection (`include`, `exclude`, `rank`) is `lrnet.compression.select_ranks` on the dense
parameters: by default every dense and conv layer except the output layer, and never a layer the
rank would not make smaller.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import haiku as hk
import jax
import jax.numpy as jnp
from jax import lax

from lrnet import compression
from lrnet import projection
from lrnet import svd
from lrnet import tracker

METHODS = ("exact", "alternating")


def _default_w_init(fan_in: int) -> hk.initializers.Initializer:
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


def _dense_shapes(fn: Callable, args: tuple) -> dict:
  """The dense network's parameter tree as shapes (an abstract trace: nothing is computed)."""
  return jax.eval_shape(hk.transform(fn).init, jax.random.PRNGKey(0), *args)


def _is_intercepted(module: hk.Module, method_name: str, ranks: dict) -> bool:
  return (method_name == "__call__" and isinstance(module, (hk.Linear, hk.ConvND))
          and module.module_name in ranks)


def _conv(module: hk.ConvND, inputs: jax.Array, kernel: jax.Array) -> jax.Array:
  """`module`'s convolution (stride, padding, dilation, layout) with another kernel."""
  return lax.conv_general_dilated(inputs, kernel, window_strides=module.stride,
                                  padding=module.padding, lhs_dilation=module.lhs_dilation,
                                  rhs_dilation=module.kernel_dilation,
                                  dimension_numbers=module.dimension_numbers)


def _bias(module, inputs: jax.Array, output: jax.Array) -> jax.Array:
  if not module.with_bias:
    return output
  if isinstance(module, hk.Linear):
    return output + hk.get_parameter("b", [module.output_size], inputs.dtype, init=module.b_init)
  shape = ((module.output_channels,) if module.channel_index == -1
           else (module.output_channels,) + (1,) * module.num_spatial_dims)
  return output + hk.get_parameter("b", shape, inputs.dtype, init=module.b_init)


def _check_conv(module: hk.ConvND) -> None:
  if module.feature_group_count != 1 or module.mask is not None:
    raise ValueError(f"{module.module_name}: grouped or masked convolutions cannot be "
                     f"factorized; exclude it")


def _matrix_shape(module, inputs: jax.Array) -> tuple[int, int]:
  """(m, n) of the layer's weight seen as a matrix: [m, n] dense, [kh·kw·c_in, c_out] conv."""
  if isinstance(module, hk.Linear):
    return inputs.shape[-1], module.output_size
  _check_conv(module)
  return math.prod(module.kernel_shape) * inputs.shape[module.channel_index], module.output_channels


def _factorized_call(module, inputs: jax.Array, rank) -> jax.Array:
  """y of a factorized linear or conv layer (see the module docstring)."""
  m, n = _matrix_shape(module, inputs)
  r = svd.resolve_rank((m, n), rank)
  if isinstance(module, hk.Linear):
    u = hk.get_parameter("u", [m, r], inputs.dtype, init=_default_w_init(m))
    v = hk.get_parameter("v", [r, n], inputs.dtype, init=_default_w_init(r))
    return _bias(module, inputs, (inputs @ u) @ v)
  c_in = inputs.shape[module.channel_index]
  u = hk.get_parameter("u", list(module.kernel_shape) + [c_in, r], inputs.dtype,
                       init=_default_w_init(m))
  v = hk.get_parameter("v", [r, n], inputs.dtype, init=_default_w_init(r))
  hidden = _conv(module, inputs, u)
  output = jnp.moveaxis(jnp.moveaxis(hidden, module.channel_index, -1) @ v, -1,
                        module.channel_index)
  return _bias(module, inputs, output)


def factorized(fn: Callable, rank, *, include=None, exclude=None) -> hk.Transformed:
  """`fn` with every selected dense and conv layer factorized (module docstring).

  Args:
    fn: a Haiku function (what one passes to `hk.transform`).
    rank: every form `lrnet.compress` takes: an int, a fraction of min(m, n), `"full"`, or a
      dict per module. (A rule that needs the weights, such as `energy_rank`, cannot
      initialise a network from scratch: compress dense parameters instead.)
    include, exclude: module-name glob patterns, as in `lrnet.compress`.

  Returns:
    `hk.Transformed` without apply rng. `init` gives a fan-in initialisation of both factors
    (Var(U V) ≈ that of the dense layer); `apply(params, *args)` takes the parameters of
    `lrnet.compress(dense_params, rank, include=..., exclude=...)`.
  """
  def ranks_for(args) -> dict:
    return compression.select_ranks(_dense_shapes(fn, args), rank, include, exclude)

  def run(ranks, *args, **kwargs):
    def interceptor(next_f, call_args, call_kwargs, context):
      if not _is_intercepted(context.module, context.method_name, ranks):
        return next_f(*call_args, **call_kwargs)
      return _factorized_call(context.module, call_args[0], ranks[context.module.module_name])
    with hk.intercept_methods(interceptor):
      return fn(*args, **kwargs)

  def init(rng, *args, **kwargs):
    return hk.transform(lambda *a, **k: run(ranks_for(a), *a, **k)).init(rng, *args, **kwargs)

  def apply(params, *args, **kwargs):
    ranks = {name: leaves["u"].shape[-1] for name, leaves in params.items()
             if isinstance(leaves, dict) and "u" in leaves}
    transformed = hk.transform(lambda *a, **k: run(ranks, *a, **k))
    return transformed.apply(params, None, *args, **kwargs)

  return hk.Transformed(init, apply)


class Student(hk.TransformedWithState):
  """`straight_through`'s result: an `hk.TransformedWithState` that remembers how it was made
  (`spec`), for `tracker_state`."""


def _tracked_factors(matrix: jax.Array, rank: jax.Array, width_rank: int, oversample: int,
                     member_rank: Optional[int]) -> tuple[jax.Array, jax.Array]:
  """This call's factors (left [K, m], right [K, n]) of the tracked projection of `matrix`,
  advancing the module's tracker in Haiku state. At init: the exact pairs of the weight it is
  given (the member's own width, padded to the student's), which the first call starts from."""
  if hk.running_init():
    size = tracker.tracked_width(matrix.shape, width_rank, oversample)
    own_rank = width_rank if member_rank is None else member_rank
    state = tracker.init(matrix, own_rank, oversample, pad_to=size)
    hk.set_state("tracker", state)
    return tracker.exact_factors(state)
  state, left, right = tracker.project(lax.stop_gradient(matrix), hk.get_state("tracker"), rank)
  hk.set_state("tracker", state)
  return left, right


def _projected_weight(w: jax.Array, rank: jax.Array, width_rank: int, method: str,
                      oversample: int, member_rank: Optional[int]) -> jax.Array:
  """Ŵ [shape of w], straight-through in w: its matrix view [prod(shape[:-1]), shape[-1]]
  projected to `rank` (exact SVD, or the tracker in Haiku state)."""
  matrix = w.reshape(-1, w.shape[-1])
  if method == "exact":
    projected = projection.st_truncate_masked(matrix, rank)
  else:
    left, right = _tracked_factors(matrix, rank, width_rank, oversample, member_rank)
    # Forward Lᵀ R, gradient to W unchanged: the straight-through estimator.
    projected = matrix + lax.stop_gradient(tracker.leading_rows(left, rank).T @ right - matrix)
  return projected.reshape(w.shape)


def _straight_through_call(module, next_f, args, kwargs, width_rank: int, method: str,
                           oversample: int, member_rank):
  """A selected layer of the straight-through student."""
  inputs = args[0]
  m, n = _matrix_shape(module, inputs)
  width_rank = svd.resolve_rank((m, n), width_rank)
  if member_rank is not None:
    member_rank = svd.resolve_rank((m, n), member_rank)
  rank = hk.get_state("rank", [], jnp.int32,
                      init=lambda *_: jnp.int32(width_rank if member_rank is None else member_rank))
  if isinstance(module, hk.Linear) and method == "alternating":
    w_init = module.w_init or _default_w_init(m)
    w = hk.get_parameter("w", [m, n], inputs.dtype, init=w_init)
    left, right = _tracked_factors(w, rank, width_rank, oversample, member_rank)
    output = projection.st_factored_matmul(inputs, w, tracker.leading_rows(left, rank), right)
    return _bias(module, inputs, output)

  def getter(next_getter, value, context):
    if context.name != "w":
      return next_getter(value)
    return _projected_weight(next_getter(value), rank, width_rank, method, oversample,
                             member_rank)

  with hk.custom_getter(getter):
    return next_f(*args, **kwargs)


def straight_through(fn: Callable, rank, *, include=None, exclude=None,
                     method: str = "alternating",
                     oversample: int = tracker.DEFAULT_OVERSAMPLE) -> Student:
  """`fn` as a straight-through student (module docstring).

  Args:
    fn: a Haiku function.
    rank, include, exclude: as in `factorized`; the selected layers are projected, a layer at
      full rank (min(m, n)) is left dense.
    method: `"alternating"` (tracked, one product with W per call) or `"exact"` (an SVD per
      call). With `"exact"` the output and gradients equal the dense network's at
      `lrnet.project(params, rank)`.
    oversample: alternating: singular pairs tracked beyond the rank.

  Returns:
    A `Student` (an `hk.TransformedWithState`, without apply rng): `init(rng, *args)` gives
    dense parameters and the state for them; `apply(params, state, *args)` returns
    `(output, new_state)`. For given parameters use `tracker_state`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  return _student(fn, rank, include, exclude, method, oversample, member_rank=None)


def _student(fn, rank, include, exclude, method, oversample, member_rank,
             given_params=None) -> Student:
  def ranks_for(shapes) -> dict:
    ranks = compression.select_ranks(shapes, rank, include, exclude)
    matrices = compression.matrix_shapes(shapes)
    return {name: r for name, r in ranks.items() if r < min(matrices[name])}

  def given(next_creator, shape, dtype, init, context):
    del next_creator, shape, dtype, init
    return given_params[context.module_name][context.name]

  def run(*args, **kwargs):
    shapes = _dense_shapes(fn, args)
    ranks = ranks_for(shapes)
    member_ranks = ({} if member_rank is None else
                    compression.select_ranks(shapes, member_rank, include, exclude))

    def interceptor(next_f, call_args, call_kwargs, context):
      if not _is_intercepted(context.module, context.method_name, ranks):
        return next_f(*call_args, **call_kwargs)
      name = context.module.module_name
      return _straight_through_call(context.module, next_f, call_args, call_kwargs, ranks[name],
                                    method, oversample, member_ranks.get(name))
    with hk.intercept_methods(interceptor):
      if given_params is None:
        return fn(*args, **kwargs)
      with hk.custom_creator(given):
        return fn(*args, **kwargs)

  transformed = hk.without_apply_rng(hk.transform_with_state(run))
  student = Student(transformed.init, transformed.apply)
  student.spec = dict(fn=fn, rank=rank, include=include, exclude=exclude, method=method,
                      oversample=oversample)
  student.state_fns = {}
  return student


def tracker_state(student: Student, params, *args, rank=None) -> dict:
  """The state of `student` for the dense `params` (e.g. a trained teacher's), so that
  training starts from them: per selected module its rank and, alternating, the exact singular
  pairs of its current weight.

  Args:
    student: from `straight_through`.
    params: dense parameters of the student's structure.
    *args: example inputs (their shapes select the layers, as in `init`).
    rank: a member's own rank (every form `compress` takes; at most the student's): the state
      projects to it and tracks its own r + oversample pairs, padded to the student's size, so
      that students of different ranks train side by side in one program (`jax.vmap` over the
      states) and each computes what it would alone.

  Returns:
    The Haiku state `{module: {"rank": int32, "tracker": TrackerState}}`.
  """
  key = repr(rank)
  if key not in student.state_fns:  # compiled once per member rank: eager Haiku init is slow
    spec = student.spec

    def state_for(params, *args):
      member = _student(spec["fn"], spec["rank"], spec["include"], spec["exclude"],
                        spec["method"], spec["oversample"], member_rank=rank, given_params=params)
      return member.init(jax.random.PRNGKey(0), *args)[1]
    student.state_fns[key] = jax.jit(state_for)
  return student.state_fns[key](params, *args)
