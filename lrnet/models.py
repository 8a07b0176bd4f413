"""The networks lrnet compresses, as plain Haiku functions of stock modules.

Each `*_fn(num_classes, ...)` returns a forward function (what one passes to `hk.transform`, or
to `hk.transform_with_state` for `resnet18_fn`'s BatchNorm): `fn(images) -> logits`, or
`fn(images, is_training) -> logits` for `resnet18_fn`; images are [batch, height, width, channels]
(or [batch, features] for the MLPs), logits [batch, num_classes]; `transformer_fn` is a
byte-level language model. `lrnet.factorized` and `lrnet.straight_through` turn any of them
into its factorized twin or straight-through student.

`network` builds the network a config's `model` group names (a user network too); `modes` and
`count_network_params` work for any forward function; `mlp` is the reference MLP in one call.
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Sequence

import haiku as hk
import jax
import jax.numpy as jnp

from lrnet import compression
from lrnet import config as config_lib
from lrnet import students
from lrnet import tracker

Forward = Callable[..., jax.Array]  # images [batch, ...] (, is_training) -> logits [batch, classes]


def mlp_fn(num_classes: int, hidden: Sequence[int] = (1024,) * 5) -> Forward:
  """ReLU MLP on flattened images, layers `linear_i`: `hidden` widths, then `num_classes` logits
  (origin notebook 000's reference: 784 → 5 × 1024 → 10)."""
  hidden = tuple(int(h) for h in hidden)

  def forward(images: jax.Array) -> jax.Array:
    x = hk.Flatten()(images)                       # [batch, m]
    for i, width in enumerate(hidden):
      x = jax.nn.relu(hk.Linear(width, name=f"linear_{i}")(x))
    return hk.Linear(num_classes, name=f"linear_{len(hidden)}")(x)
  return forward


def convnet_fn(num_classes: int, dense: Sequence[int] = (3000, 2000, 2000, 1000),
               channels: Sequence[int] = (18, 48)) -> Forward:
  """Origin notebook 001's CIFAR-10 network: conv 5×5·18 → avg-pool → conv 5×5·48 → avg-pool →
  dense 3000-2000-2000-1000 (`channels`, `dense`) → classes, ReLU after every layer but the
  last (and after the first pool, as the notebook has it); Haiku's default SAME padding."""
  def forward(images: jax.Array) -> jax.Array:
    x = jax.nn.relu(hk.Conv2D(channels[0], 5, name="conv_0")(images))
    x = jax.nn.relu(hk.AvgPool((2, 2, 1), (2, 2, 1), "VALID")(x))
    x = jax.nn.relu(hk.Conv2D(channels[1], 5, name="conv_1")(x))
    x = hk.Flatten()(hk.AvgPool((2, 2, 1), (2, 2, 1), "VALID")(x))
    for i, width in enumerate(dense):
      x = jax.nn.relu(hk.Linear(width, name=f"linear_{i}")(x))
    return hk.Linear(num_classes, name=f"linear_{len(dense)}")(x)
  return forward


def resmlp_fn(num_classes: int, width: int = 1000, blocks: int = 2) -> Forward:
  """Origin notebook 004's residual MLP: dense `width` → `blocks` residual blocks
  (x ↦ relu(x + W₂ relu(W₁ x))) of `width`-wide dense layers → classes."""
  def forward(images: jax.Array) -> jax.Array:
    x = jax.nn.relu(hk.Linear(width, name="linear_in")(hk.Flatten()(images)))
    for i in range(blocks):
      inner = jax.nn.relu(hk.Linear(width, name=f"block_{i}_a")(x))
      x = jax.nn.relu(x + hk.Linear(width, name=f"block_{i}_b")(inner))
    return hk.Linear(num_classes, name="linear_out")(x)
  return forward


def _dropout(x: jax.Array, rate: float) -> jax.Array:
  """Dropout where the network runs with an rng (training passes one; evaluation does not):
  `hk.maybe_next_rng_key` is None without one."""
  key = hk.maybe_next_rng_key()
  return x if key is None or rate == 0 else hk.dropout(key, rate, x)


def cnn_fn(num_classes: int, channels: Sequence[int] = (32, 64), dense: int = 128,
           dropout: float = 0.5) -> Forward:
  """Origin notebook 003's CNN teacher: conv 3×3·32 → max-pool → conv 3×3·64 → max-pool →
  dropout → dense 128 → dropout → classes, VALID padding as in Keras (`channels`, `dense`).
  Dropout (rate `dropout`) applies only when the network is run with an rng (`_dropout`)."""
  drop = functools.partial(_dropout, rate=dropout)

  def forward(images: jax.Array) -> jax.Array:
    x = jax.nn.relu(hk.Conv2D(channels[0], 3, padding="VALID", name="conv_0")(images))
    x = hk.MaxPool((2, 2, 1), (2, 2, 1), "VALID")(x)
    x = jax.nn.relu(hk.Conv2D(channels[1], 3, padding="VALID", name="conv_1")(x))
    x = drop(hk.Flatten()(hk.MaxPool((2, 2, 1), (2, 2, 1), "VALID")(x)))
    x = drop(jax.nn.relu(hk.Linear(dense, name="linear_0")(x)))
    return hk.Linear(num_classes, name="linear_1")(x)
  return forward


class _SmallImageResNet(hk.nets.ResNet):
  """`hk.nets.ResNet` without the initial max-pool: for 32×32 (or 28×28) inputs, where the
  ImageNet stem's 4× downsampling would leave 2×2 maps after the last group. Haiku has no
  constructor argument for the pool, so `__call__` is Haiku's own for v1 (the form
  `resnet18_fn` builds) less that one line."""

  def __call__(self, inputs, is_training, test_local_stats=False):
    out = self.initial_batchnorm(self.initial_conv(inputs), is_training, test_local_stats)
    out = jax.nn.relu(out)
    for block_group in self.block_groups:
      out = block_group(out, is_training, test_local_stats)
    return self.logits(jnp.mean(out, axis=(1, 2)))  # global average pool: [batch, widths[3]]


def resnet18_fn(num_classes: int, widths: Sequence[int] = (64, 128, 256, 512)) -> Forward:
  """ResNet-18 (`hk.nets.ResNet`'s 18-layer configuration: four groups of two basic blocks,
  BatchNorm, v1) for small images (CIFAR-10's 32×32, Fashion-MNIST's 28×28×1).

  The stem is a 3×3 stride-1 conv of `widths[0]` channels (no bias; BatchNorm follows) and
  there is no initial max-pool, so a 32×32 input reaches the groups whole: 32 → 32 → 16 → 8 → 4
  (28×28: 28 → 28 → 14 → 7 → 4). `widths`: the four groups' channels (Haiku's
  `channels_per_group`). Haiku's logits layer starts at zero.

  Returns:
    `forward(images, is_training) -> logits`, for `hk.transform_with_state` (BatchNorm
    statistics are state); `is_training` must be a Python bool (batch statistics and state
    updates, or the moving averages).
  """
  widths = tuple(int(w) for w in widths)
  if len(widths) != 4 or min(widths) < 1:
    raise ValueError(f"resnet18 widths must be 4 positive integers, got {widths}")
  config = dict(hk.nets.ResNet.CONFIGS[18], channels_per_group=widths)

  def forward(images: jax.Array, is_training: bool) -> jax.Array:
    net = _SmallImageResNet(
        num_classes=num_classes,
        initial_conv_config={"output_channels": widths[0], "kernel_shape": 3, "stride": 1},
        name="resnet18", **config)
    return net(images, is_training)
  return forward


def transformer_fn(num_classes: int, width: int = 128, layers: int = 2, heads: int = 4,
                   mlp_ratio: int = 4, dropout: float = 0.0, tied_head: bool = False) -> Forward:
  """A decoder-only transformer language model (GPT-2's pre-LayerNorm layout).

  x₀ = E[tokens] + P[:T] (token and learned position embeddings, [batch, T, width]); each of
  `layers` blocks does x ← x + Attn(LN(x)), x ← x + W₂ GELU(W₁ LN(x)), the attention causal (a
  position attends to itself and the earlier ones); logits = LN(x) Eᵀ with `tied_head`, else a
  dense `head`. Every projection is an `hk.Linear` on [batch, T, ·] inputs, so lrnet selects it
  by path: `block_i/attention/{query,key,value,linear}` (q, k, v, output; `heads` heads of
  width // heads) and `block_i/mlp_in` [width, mlp_ratio·width], `block_i/mlp_out`. The
  embeddings and the head stay dense by default (`lrnet.compression`). Dropout (`dropout`, on
  each block's two outputs and the embeddings) applies when run with an rng (`_dropout`).

  Returns:
    `forward(tokens) -> logits`: tokens [batch, T] int in [0, num_classes) (the vocabulary:
    256 bytes for `lrnet.text`), logits [batch, T, num_classes]; T is fixed by the first call
    (the position table is [T, width]).
  """
  width, key_size = int(width), max(1, int(width) // heads)
  drop = functools.partial(_dropout, rate=dropout)
  norm = functools.partial(hk.LayerNorm, axis=-1, create_scale=True, create_offset=True)

  def forward(tokens: jax.Array) -> jax.Array:
    length = tokens.shape[1]
    embed = hk.Embed(num_classes, width, w_init=hk.initializers.TruncatedNormal(0.02),
                     name="embed")
    with hk.name_scope("positions"):  # an embedding table of positions: [T, width]
      positions = hk.get_parameter("embeddings", [length, width],
                                   init=hk.initializers.TruncatedNormal(0.02))
    x = drop(embed(tokens) + positions)                              # [batch, T, width]
    causal = jnp.tril(jnp.ones((length, length), bool))[None, None]  # [1, 1, T, T]
    projection_init = hk.initializers.VarianceScaling(1.0 / layers)  # residual branches
    for i in range(layers):
      with hk.name_scope(f"block_{i}"):
        attention = hk.MultiHeadAttention(heads, key_size, w_init=projection_init,
                                          model_size=width, name="attention")
        h = norm(name="ln_attention")(x)
        x = x + drop(attention(h, h, h, mask=causal))
        h = jax.nn.gelu(hk.Linear(mlp_ratio * width, name="mlp_in")(norm(name="ln_mlp")(x)))
        x = x + drop(hk.Linear(width, w_init=projection_init, name="mlp_out")(h))
    x = norm(name="ln_final")(x)
    return x @ embed.embeddings.T if tied_head else hk.Linear(num_classes, name="head")(x)
  return forward


NETWORKS = {"mlp": mlp_fn, "convnet": convnet_fn, "resmlp": resmlp_fn, "cnn": cnn_fn,
            "resnet18": resnet18_fn, "transformer": transformer_fn}
# The config fields (`model.<field>`) each network takes besides the number of classes.
NETWORK_FIELDS = {name: tuple(inspect.signature(fn).parameters)[1:]
                  for name, fn in NETWORKS.items()}
# The fields that set widths (`scaled` shrinks them; depth stays); user networks have none.
WIDTH_FIELDS = {"mlp": ("hidden",), "convnet": ("channels", "dense"), "resmlp": ("width",),
                "cnn": ("channels", "dense"), "resnet18": ("widths",), "transformer": ("width",)}


def modes(fn: Callable) -> tuple[Callable, Callable]:
  """(training, evaluation) forms of forward function `fn`: `fn(x, is_training=True / False)`
  when it takes `is_training` (a static Python bool, never traced), else `fn` both times."""
  try:
    parameter = inspect.signature(fn).parameters.get("is_training")
  except (TypeError, ValueError):  # no signature (a builtin): plain `fn(images)`
    parameter = None
  if parameter is None or parameter.kind not in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                 inspect.Parameter.KEYWORD_ONLY):
    return fn, fn
  return functools.partial(fn, is_training=True), functools.partial(fn, is_training=False)


def count_network_params(fn: Callable, example: jax.Array) -> int:
  """The number of parameters (not state: BatchNorm statistics are left out) of forward function
  `fn` on inputs shaped like `example` [batch, ...], by shape alone (`jax.eval_shape`), in its
  training mode (`modes`)."""
  params, _ = jax.eval_shape(hk.transform_with_state(modes(fn)[0]).init, jax.random.PRNGKey(0),
                             example)
  return compression.count_params(params)


def network(model_config, num_classes: int) -> Forward:
  """The network a config's `model` group names (`model.name`): a name of `NETWORKS`, given the
  fields of `NETWORK_FIELDS` that the group sets (the others keep their defaults), or a user
  network `"package.module:function"` (`config.user_network`: a one-line `config.ConfigError`
  naming `model.name` where it cannot be imported, called with the group's fields or used)."""
  name = model_config.name
  if config_lib.is_user_network(name):
    return config_lib.user_network(model_config, num_classes)
  fields = {field: model_config[field] for field in NETWORK_FIELDS[name] if field in model_config}
  return NETWORKS[name](num_classes, **fields)


def _check_built_in(model_config, what: str) -> None:
  """Raises ValueError for a user network: `scaled` and `dense_control` need known widths
  (`config.validate` refuses the sweep's dense_control for them)."""
  if model_config.name not in WIDTH_FIELDS:
    raise ValueError(f"no {what} for model.name={model_config.name!r}: user networks have no "
                     f"known width fields (only {', '.join(WIDTH_FIELDS)} have)")


def scaled(model_config, factor: float):
  """A copy of a `model` config group with every width (`WIDTH_FIELDS`, defaults included)
  multiplied by `factor` and rounded down, at least 1; ValueError for a user network."""
  _check_built_in(model_config, "scaled network")
  config = model_config.copy_and_resolve_references()
  defaults = inspect.signature(NETWORKS[config.name]).parameters
  scale = lambda width: max(1, int(width * factor))
  for field in WIDTH_FIELDS[config.name]:
    value = config[field] if field in config else defaults[field].default
    new = tuple(scale(w) for w in value) if isinstance(value, (tuple, list)) else scale(value)
    with config.unlocked():
      config[field] = new
  return config


def dense_control(model_config, num_classes: int, example: jax.Array, max_params: int):
  """The widest `scaled(model_config, f)`, f ≤ 1, with at most `max_params` parameters: a dense
  network of the same depth and the size of a compressed student (bisection on f). Parameters
  are counted by `count_network_params` (BatchNorm statistics and other state are not).

  Returns:
    (model config, its parameter count).

  Raises:
    ValueError: even width 1 everywhere has more than `max_params` parameters; a user network.
  """
  _check_built_in(model_config, "dense control")
  counts = {}

  def count(factor):
    config = scaled(model_config, factor)
    key = tuple(str(config[field]) for field in WIDTH_FIELDS[config.name])
    if key not in counts:
      counts[key] = count_network_params(network(config, num_classes), example)
    return counts[key]

  low, high = 0.0, 1.0
  if count(high) <= max_params:
    return scaled(model_config, high), count(high)
  for _ in range(24):  # to 2⁻²⁴: a width below 2²⁴ changes by at most 1 between low and high
    middle = (low + high) / 2
    low, high = (middle, high) if count(middle) <= max_params else (low, middle)
  if count(low) > max_params:
    raise ValueError(f"no {model_config.name} of this depth has at most {max_params} parameters")
  return scaled(model_config, low), count(low)


def _rank_dict(spec, hidden: Sequence[int], field: str) -> dict:
  """`spec` in the forms of `mlp`'s `ranks` → {"linear_i": rank} (None entries left out)."""
  num_layers = len(hidden) + 1
  spec = [spec] * len(hidden) if isinstance(spec, (int, float, str)) else list(spec)
  if len(spec) not in (len(hidden), num_layers):
    raise ValueError(f"{field} must be a rank or a sequence of {len(hidden)} (hidden layers) or "
                     f"{num_layers} (all layers) entries, got {len(spec)} entries")
  return {f"linear_{i}": rank for i, rank in enumerate(spec) if rank is not None}


def mlp(hidden: Sequence[int], num_classes: int, ranks=None, project_rank=None,
        projection_method: str = "alternating", oversample: int = tracker.DEFAULT_OVERSAMPLE):
  """The ReLU MLP of `mlp_fn`: dense, factorized or straight-through (the reference network:
  `mlp(hidden=(1024,) * 5, num_classes=10)`).

  Args:
    hidden: hidden layer widths.
    num_classes: output width (logits).
    ranks: factorized layers (`lrnet.factorized`): an int, a fraction in (0, 1] or `"full"` for
      every hidden layer, or one entry per hidden layer (or per layer, the output layer last),
      `None` for a dense layer. A factorized layer `linear_i` holds `u` [m, r], `v` [r, n], `b`.
    project_rank: a straight-through student (`lrnet.straight_through`), same forms as `ranks`.
      Exclusive with `ranks`.
    projection_method, oversample: of the straight-through student.

  Returns:
    `hk.Transformed` without apply rng (dense or factorized: `apply(params, images)`), or a
    `lrnet.students.Student` (`apply(params, state, images) -> (logits, state)`).
  """
  if ranks is not None and project_rank is not None:
    raise ValueError("mlp: give either ranks (factorized) or project_rank (straight-through), "
                     "not both")
  fn = mlp_fn(num_classes, hidden)
  if ranks is not None:
    return students.factorized(fn, _rank_dict(ranks, hidden, "ranks"))
  if project_rank is not None:
    return students.straight_through(fn, _rank_dict(project_rank, hidden, "project_rank"),
                                     method=projection_method, oversample=oversample)
  return hk.without_apply_rng(hk.transform(fn))
