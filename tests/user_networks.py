"""User networks for the tests: `model.name = "tests.user_networks:<function>"`.

Each function takes `num_classes` and the `model` group's other fields as keyword arguments
and returns a Haiku forward function `forward(images) -> logits` (what one passes to
`hk.transform`), images [batch, ...], logits [batch, num_classes]. `transformed_mlp` returns an
`hk.Transformed` instead: the wrong kind, for the error tests.
"""

import haiku as hk
import jax

NOT_A_FUNCTION = 3  # `model.name = "tests.user_networks:NOT_A_FUNCTION"`: not callable


def small_mlp(num_classes: int, width: int = 32):
  """A one-hidden-layer ReLU MLP on flattened images: `width` hidden units."""
  def forward(images: jax.Array) -> jax.Array:
    x = hk.Flatten()(images)                                  # [batch, features]
    x = jax.nn.relu(hk.Linear(width, name="linear_0")(x))     # [batch, width]
    return hk.Linear(num_classes, name="linear_1")(x)         # [batch, num_classes]
  return forward


def transformed_mlp(num_classes: int, width: int = 32):
  """Wrong: returns `hk.transform(forward)` rather than the forward function."""
  return hk.transform(small_mlp(num_classes, width))


def batchnorm_mlp(num_classes: int, width: int = 32, dropout: float = 0.25):
  """An MLP with BatchNorm (state) and dropout (an rng in training): `forward(images,
  is_training)`, for `hk.transform_with_state`; dropout acts only in training."""
  def forward(images: jax.Array, is_training: bool) -> jax.Array:
    x = hk.Linear(width, name="linear_0")(hk.Flatten()(images))           # [batch, width]
    x = hk.BatchNorm(True, True, 0.9, name="batchnorm")(x, is_training)
    x = jax.nn.relu(x)
    if is_training:
      x = hk.dropout(hk.next_rng_key(), dropout, x)
    return hk.Linear(num_classes, name="linear_1")(x)                     # [batch, num_classes]
  return forward
