"""Stock Haiku networks a researcher has — state, rng, keyword arguments, rank-3 inputs —
factorized and trained straight-through, each against the dense network at `project(p, r)`."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrnet
from lrnet import models
from lrnet import train

KEY = jax.random.PRNGKey(0)
IMAGES = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
LABELS = jnp.array([0, 1, 2, 3])


def _loss(logits, labels=LABELS):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])


def resnet18(images, is_training):
  return hk.nets.ResNet18(10)(images, is_training)


def narrow_resnet18(images, is_training):
  """hk.nets.ResNet18's blocks at narrow widths (a 64-channel stem, so every group projects)."""
  return hk.nets.ResNet(blocks_per_group=(2, 2, 2, 2), num_classes=10, bottleneck=False,
                        channels_per_group=(16, 32, 64, 128),
                        use_projection=(True, True, True, True))(images, is_training)


def _trained_state(fn, params, state):
  """BatchNorm statistics after one training-mode forward pass (not the initial zeros)."""
  return hk.transform_with_state(fn).apply(params, state, None, IMAGES, is_training=True)[1]


def test_resnet18_factorized_twin_is_the_dense_net_at_project_in_eval_mode():
  dense = hk.transform_with_state(resnet18)
  params, state = dense.init(KEY, IMAGES, is_training=True)
  state = _trained_state(resnet18, params, state)
  twin = lrnet.factorized(resnet18, 8, with_state=True)
  compressed = lrnet.compress(params, 8)
  assert "res_net18/~/logits" not in [n for n in compressed if "u" in compressed[n]]
  shapes = lambda tree: jax.tree_util.tree_map(jnp.shape, tree)
  assert shapes(twin.init(KEY, IMAGES, is_training=True)) == shapes((compressed, state))
  logits, new_state = jax.jit(twin.apply, static_argnames="is_training")(
      compressed, state, IMAGES, is_training=False)
  expected, _ = dense.apply(lrnet.project(params, 8), state, None, IMAGES, is_training=False)
  np.testing.assert_allclose(logits, expected, rtol=1e-3, atol=1e-3)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(jnp.array_equal, new_state, state))
  # Without with_state, Haiku says what to do.
  with pytest.raises(ValueError, match="transform_with_state"):
    lrnet.factorized(resnet18, 8).init(KEY, IMAGES, is_training=True)


def test_resnet_straight_through_is_the_dense_net_at_project_with_its_gradient():
  dense = hk.transform_with_state(narrow_resnet18)
  params, state = dense.init(KEY, IMAGES, is_training=True)
  student = lrnet.straight_through(narrow_resnet18, 4, method="exact")
  student_state = lrnet.tracker_state(student, params, IMAGES, is_training=True, state=state)
  projected = lrnet.project(params, 4)

  def student_loss(p):
    logits, new_state = student.apply(p, student_state, IMAGES, is_training=True)
    return _loss(logits), new_state

  def dense_loss(p):
    logits, new_state = dense.apply(p, state, None, IMAGES, is_training=True)
    return _loss(logits), new_state

  (loss, new_student_state), grads = jax.jit(jax.value_and_grad(student_loss, has_aux=True))(params)
  (expected, new_state), expected_grads = jax.value_and_grad(dense_loss, has_aux=True)(projected)
  np.testing.assert_allclose(loss, expected, rtol=1e-4)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
                         grads, expected_grads)
  # BatchNorm statistics move exactly as the dense network's do.
  for name, leaves in new_state.items():
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           new_student_state[name], leaves)


def test_straight_through_resnet_student_trains_and_its_batchnorm_statistics_change():
  dense = hk.transform_with_state(narrow_resnet18)
  params, state = dense.init(KEY, IMAGES, is_training=True)
  student = lrnet.straight_through(lambda x: narrow_resnet18(x, is_training=True), 8)
  optimizer = optax.adam(1e-3)
  start = train.init_state(params, optimizer, lrnet.tracker_state(student, params, IMAGES,
                                                                  state=state))
  epoch = jax.jit(train.make_train_epoch(student.apply, optimizer, 4))
  trained, metrics = epoch(start, IMAGES, LABELS, jnp.arange(4).repeat(3) % 4)
  assert np.all(np.isfinite(metrics["loss"])) and metrics["loss"].shape == (3,)
  average = lambda s: s["res_net/~/initial_batchnorm/~/mean_ema"]["average"]
  assert not np.allclose(average(trained.model_state), average(start.model_state))
  assert int(trained.model_state["res_net/~/initial_batchnorm/~/mean_ema"]["counter"]) == 3
  changed = jax.tree_util.tree_map(lambda a, b: not np.allclose(a, b), trained.params, params)
  assert all(jax.tree_util.tree_leaves(changed))


def mlp_with_dropout(images, is_training):
  mlp = hk.nets.MLP([64, 48, 10])
  flat = images.reshape(images.shape[0], -1)
  return mlp(flat, dropout_rate=0.5, rng=hk.next_rng_key()) if is_training else mlp(flat)


def test_hk_nets_mlp_with_dropout_gets_the_apply_rng():
  dense = hk.transform(mlp_with_dropout)
  params = dense.init(KEY, IMAGES, is_training=True)
  student = lrnet.straight_through(mlp_with_dropout, 6, method="exact", apply_rng=True)
  state = lrnet.tracker_state(student, params, IMAGES, is_training=False)
  projected = lrnet.project(params, 6)
  logits, _ = student.apply(params, state, None, IMAGES, is_training=False)
  np.testing.assert_allclose(logits, dense.apply(projected, None, IMAGES, is_training=False),
                             rtol=1e-4, atol=1e-5)
  rng = jax.random.PRNGKey(5)
  grads = jax.grad(lambda p: _loss(student.apply(p, state, rng, IMAGES, is_training=True)[0]))(params)
  expected = jax.grad(lambda p: _loss(dense.apply(p, rng, IMAGES, is_training=True)))(projected)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         grads, expected)
  other, _ = student.apply(params, state, jax.random.PRNGKey(6), IMAGES, is_training=True)
  assert not np.allclose(other, student.apply(params, state, rng, IMAGES, is_training=True)[0])
  twin = lrnet.factorized(mlp_with_dropout, 6, apply_rng=True)
  np.testing.assert_allclose(twin.apply(lrnet.compress(params, 6), rng, IMAGES, is_training=True),
                             dense.apply(projected, rng, IMAGES, is_training=True),
                             rtol=1e-4, atol=1e-5)


TOKENS = jax.random.normal(jax.random.PRNGKey(2), (3, 7, 32))  # [batch, tokens, features]
TOKEN_LABELS = jnp.array([0, 4, 2])


def pre_ln_block(tokens, is_training):
  """A pre-LN transformer block (causal attention, MLP, dropout) and a classifier head."""
  def dropout(x):
    return hk.dropout(hk.next_rng_key(), 0.1, x) if is_training else x
  norm = lambda name: hk.LayerNorm(-1, create_scale=True, create_offset=True, name=name)
  mask = jnp.tril(jnp.ones((1, 1) + (tokens.shape[1],) * 2, bool))  # [batch, heads, T, T]
  y = norm("ln_0")(tokens)
  tokens = tokens + dropout(hk.MultiHeadAttention(4, 8, w_init=hk.initializers.VarianceScaling(),
                                                  name="attention")(y, y, y, mask=mask))
  y = jax.nn.gelu(hk.Linear(64, name="mlp_in")(norm("ln_1")(tokens)))
  tokens = tokens + dropout(hk.Linear(32, name="mlp_out")(y))
  return hk.Linear(5, name="head")(norm("ln_f")(tokens)[:, -1])


def test_pre_ln_transformer_block_trains_straight_through_on_rank_3_inputs():
  dense = hk.transform(pre_ln_block)
  params = dense.init(KEY, TOKENS, is_training=True)
  projected = lrnet.project(params, 4)
  assert sorted(n for n in params if not np.array_equal(params[n].get("w", 0),
                                                        projected[n].get("w", 0))) == [
      "attention/key", "attention/linear", "attention/query", "attention/value",
      "mlp_in", "mlp_out"]
  rng = jax.random.PRNGKey(3)
  expected_loss, expected = jax.value_and_grad(
      lambda p: _loss(dense.apply(p, rng, TOKENS, is_training=True), TOKEN_LABELS))(projected)
  for method in ("alternating", "exact"):  # alternating: the tracker starts at the exact pairs
    student = lrnet.straight_through(pre_ln_block, 4, method=method, apply_rng=True)
    state = lrnet.tracker_state(student, params, TOKENS, is_training=True)
    loss, grads = jax.value_and_grad(lambda p: _loss(student.apply(
        p, state, rng, TOKENS, is_training=True)[0], TOKEN_LABELS))(params)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                           grads, expected)
  twin = lrnet.factorized(pre_ln_block, 4)
  np.testing.assert_allclose(twin.apply(lrnet.compress(params, 4), TOKENS, is_training=False),
                             dense.apply(projected, None, TOKENS, is_training=False),
                             rtol=1e-4, atol=1e-5)


def test_notebook_cnn_dropout_acts_with_an_rng_only():
  fn = models.cnn_fn(10)
  images = IMAGES[..., :1]
  dense = hk.transform(fn)
  params = dense.init(KEY, images)
  student = lrnet.straight_through(fn, 8, method="exact", apply_rng=True)
  state = lrnet.tracker_state(student, params, images)
  projected = lrnet.project(params, 8)
  np.testing.assert_allclose(student.apply(params, state, None, images)[0],
                             dense.apply(projected, None, images), rtol=1e-4, atol=1e-5)
  rng = jax.random.PRNGKey(4)
  dropped = student.apply(params, state, rng, images)[0]
  np.testing.assert_allclose(dropped, dense.apply(projected, rng, images), rtol=1e-4, atol=1e-5)
  assert not np.allclose(dropped, dense.apply(projected, None, images))


def test_unfactorizable_convolutions_are_skipped_and_named_ones_refused():
  def net(images):
    x = jax.nn.relu(hk.Conv2D(8, 3, name="conv")(images))
    x = jax.nn.relu(hk.DepthwiseConv2D(2, 3, name="depthwise")(x))
    x = jax.nn.relu(hk.Conv2D(16, 3, feature_group_count=4, name="grouped")(x))
    x = jax.nn.relu(hk.Conv2DTranspose(8, 3, name="transposed")(x))
    x = jax.nn.relu(hk.Linear(20, name="hidden")(hk.Flatten()(x)))
    return hk.Linear(10, name="logits")(x)

  images = IMAGES[:, :8, :8]
  network = lrnet.students.inspect_network(net, images)
  assert network.unfactorizable == {"depthwise": "depthwise conv", "grouped": "grouped conv",
                                    "transposed": "transposed conv"}
  params = hk.transform(net).init(KEY, images)
  twin = lrnet.factorized(net, 2)
  compressed = twin.init(KEY, images)
  assert sorted(n for n in compressed if "u" in compressed[n]) == ["conv", "hidden"]
  rows = {row.name: row for row in lrnet.summarize(params, 2,
                                                   unfactorizable=network.unfactorizable)}
  assert rows["grouped"].note == "not factorizable: grouped conv" and rows["grouped"].rank is None
  with pytest.raises(ValueError, match="depthwise"):
    lrnet.straight_through(net, 2, include="depth*").init(KEY, images)
