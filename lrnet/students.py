"""Any Haiku network, factorized or trained straight-through, without rewriting it.

`fn` is anything one passes to `hk.transform_with_state`: it may keep Haiku state (BatchNorm
statistics), draw from `hk.next_rng_key()` (dropout) and take any arguments (static Python values
such as `is_training=True` included), which pass through `init`, `apply` and `tracker_state`
unchanged. Its dense (`hk.Linear`, on inputs [..., m]) and conv (`hk.ConvND`: 1-, 2- and 3-D)
layers are intercepted by module name (`hk.intercept_methods`, `hk.custom_getter`):

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
  through the two factors (`projection.st_factored_matmul`). Its Haiku state holds, next to
  `fn`'s own, per selected module the rank it projects to (`"rank"`, an int32 that may differ
  between members of a batch) and, alternating, its tracker (`"tracker"`), which
  `tracker_state` builds for given parameters (e.g. a teacher's).

Call forms follow Haiku's: `with_state=True` is `hk.transform_with_state`'s, else
`hk.transform`'s; `apply_rng=True` puts an rng after the params (and state), else `apply` takes
none (`hk.without_apply_rng`). A student always has state.

Selection (`include`, `exclude`, `rank`) is `lrnet.compression.select_ranks` on the dense
parameters, with grouped, depthwise, masked and transposed convolutions `unfactorizable`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lrnet import compression
from lrnet import projection
from lrnet import svd
from lrnet import tracker

METHODS = ("exact", "alternating")


def _default_w_init(fan_in: int) -> hk.initializers.Initializer:
  return hk.initializers.TruncatedNormal(stddev=1.0 / math.sqrt(fan_in))


def _unfactorizable_kind(module: hk.Module) -> Optional[str]:
  """Why a module holding a conv-shaped weight cannot be factorized, or None."""
  if isinstance(module, hk.ConvND):
    if module.feature_group_count != 1:
      return "grouped conv"
    return "masked conv" if module.mask is not None else None
  if isinstance(module, (hk.DepthwiseConv1D, hk.DepthwiseConv2D, hk.DepthwiseConv3D,
                         hk.SeparableDepthwiseConv2D)):
    return "depthwise conv"
  return "transposed conv" if isinstance(module, hk.ConvNDTranspose) else None


class DenseNetwork(NamedTuple):
  """`fn`'s dense network seen by an abstract trace (nothing is computed)."""
  params: dict          # parameter shapes (`jax.ShapeDtypeStruct`s)
  state: dict           # Haiku state shapes ({} for a stateless fn)
  unfactorizable: dict  # {module: why its weight cannot be factorized, e.g. 'depthwise conv'}


def inspect_network(fn: Callable, *args, **kwargs) -> DenseNetwork:
  """The dense network of `fn` on example arguments: its parameter and state shapes and the
  layers that cannot be factorized. Arguments are closed over, so Python values stay static."""
  kinds = {}

  def record(next_f, call_args, call_kwargs, context):
    if context.method_name == "__call__" and (reason := _unfactorizable_kind(context.module)):
      kinds[context.module.module_name] = reason
    return next_f(*call_args, **call_kwargs)

  def recorded(*a, **k):
    with hk.intercept_methods(record):
      return fn(*a, **k)

  params, state = jax.eval_shape(
      lambda: hk.transform_with_state(recorded).init(jax.random.PRNGKey(0), *args, **kwargs))
  candidates = compression.matrix_shapes(params)
  return DenseNetwork(params, state, {name: kinds[name] for name in candidates if name in kinds})


def intercept_layers(selected, layer_call: Callable):
  """`hk.intercept_methods` handing each call of an `hk.Linear` or `hk.ConvND` whose module name
  is in `selected` to `layer_call(module, next_f, args, kwargs)`; other calls run as they are."""
  def interceptor(next_f, args, kwargs, context):
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, (hk.Linear, hk.ConvND))
        and module.module_name in selected):
      return layer_call(module, next_f, args, kwargs)
    return next_f(*args, **kwargs)
  return hk.intercept_methods(interceptor)


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


def _matrix_shape(module, inputs: jax.Array) -> tuple[int, int]:
  """(m, n) of the layer's weight seen as a matrix: [m, n] dense, [kh·kw·c_in, c_out] conv."""
  if isinstance(module, hk.Linear):
    return inputs.shape[-1], module.output_size
  return math.prod(module.kernel_shape) * inputs.shape[module.channel_index], module.output_channels


def _factorized_call(ranks: dict, module, next_f, args, kwargs) -> jax.Array:
  """y of a factorized linear or conv layer at rank `ranks[module name]` (module docstring)."""
  del next_f, kwargs
  inputs = args[0]
  m, n = _matrix_shape(module, inputs)
  r = svd.resolve_rank((m, n), ranks[module.module_name])
  linear = isinstance(module, hk.Linear)
  u_shape = [m, r] if linear else [*module.kernel_shape, inputs.shape[module.channel_index], r]
  u = hk.get_parameter("u", u_shape, inputs.dtype, init=_default_w_init(m))
  v = hk.get_parameter("v", [r, n], inputs.dtype, init=_default_w_init(r))
  if linear:
    return _bias(module, inputs, (inputs @ u) @ v)
  hidden = jnp.moveaxis(_conv(module, inputs, u), module.channel_index, -1)
  return _bias(module, inputs, jnp.moveaxis(hidden @ v, -1, module.channel_index))


def factorized(fn: Callable, rank, *, include=None, exclude=None, with_state: bool = False,
               apply_rng: bool = False):
  """`fn` with every selected dense and conv layer factorized (module docstring).

  Args:
    fn: a Haiku function (what one passes to `hk.transform_with_state`).
    rank: every form `lrnet.compress` takes but a rule that needs the weights (`energy_rank`
      cannot initialise a network from scratch: compress dense parameters instead).
    include, exclude: module-name glob patterns, as in `lrnet.compress`.
    with_state, apply_rng: Haiku's call forms (module docstring); the dense network's state
      (e.g. BatchNorm statistics) serves the twin unchanged.

  Returns:
    `hk.Transformed`, or with `with_state` `hk.TransformedWithState` (module docstring). `init`
    gives a fan-in initialisation of both factors (Var(U V) ≈ that of the dense layer); `apply`
    takes the parameters of `lrnet.compress(dense_params, rank, include=..., exclude=...)`.
  """
  def run(ranks, *args, **kwargs):
    with intercept_layers(ranks, functools.partial(_factorized_call, ranks)):
      return fn(*args, **kwargs)

  def init(rng, *args, **kwargs):
    network = inspect_network(fn, *args, **kwargs)
    ranks = compression.select_ranks(network.params, rank, include, exclude,
                                     unfactorizable=network.unfactorizable)
    return hk.transform_with_state(functools.partial(run, ranks)).init(rng, *args, **kwargs)

  def apply(params, state, rng, *args, **kwargs):
    ranks = {name: leaves["u"].shape[-1] for name, leaves in params.items()
             if isinstance(leaves, dict) and "u" in leaves}
    transformed = hk.transform_with_state(functools.partial(run, ranks))
    return transformed.apply(params, state, rng, *args, **kwargs)

  init._original_fn = apply._original_fn = fn  # what Haiku's wrappers expect to find
  transformed = hk.TransformedWithState(init, apply)
  if not with_state:
    transformed = hk.without_state(transformed)
  return transformed if apply_rng else hk.without_apply_rng(transformed)


class Student(hk.TransformedWithState):
  """`straight_through`'s result: `hk.TransformedWithState` with a `spec`, for `tracker_state`."""


def _tracked_factors(matrix: jax.Array, rank: jax.Array, width_rank: int, oversample: int,
                     own_rank: int) -> tuple[jax.Array, jax.Array]:
  """This call's factors (left [K, m], rows ≥ `rank` zeroed; right [K, n]) of the tracked
  projection of `matrix`, advancing its tracker in Haiku state; at init, the exact pairs of the
  given weight (the member's own width, padded to the student's), where the first call starts."""
  if hk.running_init():
    size = tracker.tracked_width(matrix.shape, width_rank, oversample)
    state = tracker.init(matrix, own_rank, oversample, pad_to=size)
    left, right = tracker.exact_factors(state)
  else:
    state, left, right = tracker.project(lax.stop_gradient(matrix), hk.get_state("tracker"), rank)
  hk.set_state("tracker", state)
  return tracker.leading_rows(left, rank), right


def _projected_weight(w: jax.Array, rank: jax.Array, width_rank: int, method: str,
                      oversample: int, own_rank: int) -> jax.Array:
  """Ŵ [shape of w], straight-through in w: its matrix view [prod(shape[:-1]), shape[-1]]
  projected to `rank` (exact SVD, or the tracker in Haiku state)."""
  matrix = w.reshape(-1, w.shape[-1])
  if method == "exact":
    projected = projection.st_truncate_masked(matrix, rank)
  else:
    left, right = _tracked_factors(matrix, rank, width_rank, oversample, own_rank)
    # Forward Lᵀ R, gradient to W unchanged: the straight-through estimator.
    projected = matrix + lax.stop_gradient(left.T @ right - matrix)
  return projected.reshape(w.shape)


def _straight_through_call(ranks: dict, member_ranks: dict, method: str, oversample: int,
                           module, next_f, args, kwargs):
  """A selected layer of the straight-through student, tracking `ranks[name]` (+ oversample)
  pairs and projecting to the member's rank `member_ranks[name]` (≤ it; default: the same)."""
  width_rank = ranks[module.module_name]
  own_rank = member_ranks.get(module.module_name, width_rank)
  inputs = args[0]
  m, n = _matrix_shape(module, inputs)
  rank = hk.get_state("rank", [], jnp.int32, init=lambda *_: jnp.int32(own_rank))
  if isinstance(module, hk.Linear) and method == "alternating":
    w = hk.get_parameter("w", [m, n], inputs.dtype, init=module.w_init or _default_w_init(m))
    factors = _tracked_factors(w, rank, width_rank, oversample, own_rank)
    return _bias(module, inputs, projection.st_factored_matmul(inputs, w, *factors))

  def getter(next_getter, value, context):
    if context.name != "w":
      return next_getter(value)
    return _projected_weight(next_getter(value), rank, width_rank, method, oversample, own_rank)

  with hk.custom_getter(getter):
    return next_f(*args, **kwargs)


def straight_through(fn: Callable, rank, *, include=None, exclude=None,
                     method: str = "alternating",
                     oversample: int = tracker.DEFAULT_OVERSAMPLE,
                     apply_rng: bool = False) -> Student:
  """`fn` as a straight-through student (module docstring).

  Args:
    fn: a Haiku function (what one passes to `hk.transform_with_state`).
    rank, include, exclude: as in `factorized`; the selected layers are projected, a layer at
      full rank (min(m, n)) is left dense.
    method: `"alternating"` or `"exact"` (module docstring); with `"exact"` the output and
      gradients equal the dense network's at `lrnet.project(params, rank)`.
    oversample: alternating: singular pairs tracked beyond the rank.
    apply_rng: `apply` takes an rng after the state, for `fn`'s `hk.next_rng_key()` (dropout).

  Returns:
    A `Student` (an `hk.TransformedWithState`): `init(rng, *args, **kwargs)` gives dense
    parameters and their state (`fn`'s own and the trackers'; for given parameters use
    `tracker_state`); `apply(params, state[, rng], *args, **kwargs)` → `(output, new_state)`.
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  spec = dict(fn=fn, rank=rank, include=include, exclude=exclude, method=method,
              oversample=oversample)
  transformed = _student(spec, member_rank=None)
  if not apply_rng:
    transformed = hk.without_apply_rng(transformed)
  student = Student(transformed.init, transformed.apply)
  student.spec, student.state_fns = spec, {}
  return student


def _student(spec: dict, member_rank, given_params=None) -> hk.TransformedWithState:
  fn, include, exclude = spec["fn"], spec["include"], spec["exclude"]

  def given(next_creator, shape, dtype, init, context):
    del next_creator, shape, dtype, init
    return given_params[context.module_name][context.name]

  def run(*args, **kwargs):
    network = inspect_network(fn, *args, **kwargs)
    select = lambda rule: compression.select_ranks(network.params, rule, include, exclude,
                                                   unfactorizable=network.unfactorizable)
    matrices = compression.matrix_shapes(network.params)
    ranks = {name: r for name, r in select(spec["rank"]).items() if r < min(matrices[name])}
    member_ranks = {} if member_rank is None else select(member_rank)

    layer = functools.partial(_straight_through_call, ranks, member_ranks, spec["method"],
                              spec["oversample"])
    creator = contextlib.nullcontext() if given_params is None else hk.custom_creator(given)
    with intercept_layers(ranks, layer), creator:
      return fn(*args, **kwargs)

  return hk.transform_with_state(run)


def jit_static(fn: Callable) -> Callable:
  """`jax.jit(fn)` where every argument leaf that is not an array (`is_training=True`, a
  width, a name) is static: compiled once per set of those values. They must be hashable."""
  @functools.partial(jax.jit, static_argnums=(1, 2))
  def traced(arrays, treedef, static):  # static: the leaves, None where an array goes
    arrays = iter(arrays)
    leaves = [next(arrays) if value is None else value for value in static]
    args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
    return fn(*args, **kwargs)

  def call(*args, **kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    is_array = [isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves]
    static = tuple(None if array else leaf for leaf, array in zip(leaves, is_array))
    return traced([leaf for leaf, array in zip(leaves, is_array) if array], treedef, static)
  return call


def tracker_state(student: Student, params, *args, rank=None, state=None, **kwargs) -> dict:
  """The state of `student` for the dense `params` (e.g. a trained teacher's), so that
  training starts from them: per selected module its rank and, alternating, the exact singular
  pairs of its current weight; `fn`'s own state from `state`.

  Args:
    student, params: from `straight_through`, and dense parameters of its structure.
    *args, **kwargs: example arguments of `fn`, as in `init` (Python values stay static).
    rank: a member's own rank (every form `compress` takes; at most the student's): the state
      projects to it and tracks its own r + oversample pairs, padded to the student's size, so
      that students of different ranks train side by side in one program (`jax.vmap` over the
      states) and each computes what it would alone.
    state: the dense network's Haiku state (e.g. a teacher's BatchNorm statistics); None: the
      state `fn` initialises.

  Returns:
    The Haiku state: `fn`'s own, and `{module: {"rank": int32, "tracker": TrackerState}}`.
  """
  key = repr(rank)
  if key not in student.state_fns:  # compiled once per member rank: eager Haiku init is slow
    def state_for(params, *args, **kwargs):
      member = _student(student.spec, member_rank=rank, given_params=params)
      return member.init(jax.random.PRNGKey(0), *args, **kwargs)[1]
    student.state_fns[key] = jit_static(state_for)
  fresh = student.state_fns[key](params, *args, **kwargs)
  own = {name: leaves for name, leaves in (state or {}).items()
         if not (isinstance(fresh.get(name), dict) and "rank" in fresh[name])}
  return {**fresh, **own}
