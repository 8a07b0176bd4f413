"""Tests for lrnet/models.py: dense, factorized and straight-through MLPs."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrnet

HIDDEN = (32, 24, 16)
IMAGES = jax.random.uniform(jax.random.PRNGKey(7), (6, 8, 8, 1))
LABELS = jnp.array([0, 1, 2, 3, 4, 5])


def _dense_params():
  return lrnet.models.mlp(HIDDEN, 10).init(jax.random.PRNGKey(0), IMAGES)


def test_reference_mlp_shapes_and_param_count():
  net = lrnet.models.mlp((1024,) * 5, 10)
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  shapes = {name: leaves["w"].shape for name, leaves in params.items()}
  assert shapes == {"linear_0": (784, 1024), "linear_1": (1024, 1024), "linear_2": (1024, 1024),
                    "linear_3": (1024, 1024), "linear_4": (1024, 1024), "linear_5": (1024, 10)}
  assert lrnet.count_params(params) == 784 * 1024 + 1024 + 4 * (1024 * 1024 + 1024) + 10250


def test_dense_forward_is_relu_mlp():
  params = _dense_params()
  x = IMAGES.reshape(6, -1)
  for i in range(3):
    x = jax.nn.relu(x @ params[f"linear_{i}"]["w"] + params[f"linear_{i}"]["b"])
  logits = x @ params["linear_3"]["w"] + params["linear_3"]["b"]
  np.testing.assert_allclose(lrnet.models.mlp(HIDDEN, 10).apply(params, IMAGES), logits, atol=1e-5)


def test_factorized_init_structure_and_variance():
  net = lrnet.models.mlp((256, 256), 10, ranks=16)
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 256)))
  assert set(params["linear_1"]) == {"u", "v", "b"}
  assert params["linear_1"]["u"].shape == (256, 16) and params["linear_1"]["v"].shape == (16, 256)
  assert set(params["linear_2"]) == {"w", "b"}  # the output layer stays dense
  product = params["linear_1"]["u"] @ params["linear_1"]["v"]
  # Var(UV) ≈ 1/m (truncated normal factors shrink it by ~0.77² ≈ 0.6).
  assert 0.4 / 256 < float(jnp.var(product)) < 1.2 / 256


def test_per_layer_ranks_none_and_output_layer():
  net = lrnet.models.mlp(HIDDEN, 10, ranks=(4, None, 0.5, 3))
  params = net.init(jax.random.PRNGKey(0), IMAGES)
  assert params["linear_0"]["u"].shape == (64, 4)
  assert set(params["linear_1"]) == {"w", "b"}
  assert params["linear_2"]["u"].shape == (24, 8)  # ceil(0.5 · 16)
  assert params["linear_3"]["u"].shape == (16, 3)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(ranks=(1, 2)), "3 .*hidden.* or 4"),
    (dict(ranks=100), r"1\.\.32"),
    (dict(ranks=0), r"1\.\.32"),
    (dict(ranks=2, project_rank=2), "not both"),
    (dict(project_rank=1.5), r"\(0, 1\]"),
])
def test_bad_model_ranks_raise(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    lrnet.models.mlp(HIDDEN, 10, **kwargs).init(jax.random.PRNGKey(0), IMAGES)


def test_compress_matches_factorized_init_and_projected_dense_outputs():
  dense = lrnet.models.mlp(HIDDEN, 10)
  params = _dense_params()
  for rank in (1, 5, 0.5, "full"):
    factorized = lrnet.models.mlp(HIDDEN, 10, ranks=rank)
    # Every hidden layer by name: "full" makes them bigger, which only a named selection does.
    compressed = lrnet.compress(params, rank, include="linear_[0-2]")
    expected = jax.eval_shape(factorized.init, jax.random.PRNGKey(1), IMAGES)
    assert jax.tree_util.tree_structure(compressed) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_map(jnp.shape, compressed) == jax.tree_util.tree_map(jnp.shape, expected)
    np.testing.assert_allclose(jax.jit(factorized.apply)(compressed, IMAGES),
                               jax.jit(dense.apply)(lrnet.project(params, rank,
                                                                  include="linear_[0-2]"), IMAGES),
                               atol=2e-5)


def _cross_entropy(logits, labels):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])


def test_mlp_straight_through_student_is_the_exact_projection_with_straight_through_grads():
  params = _dense_params()
  student = lrnet.models.mlp(HIDDEN, 10, project_rank=3, projection_method="exact")
  state = lrnet.tracker_state(student, params, IMAGES)
  dense = lrnet.models.mlp(HIDDEN, 10)
  loss = lambda p: _cross_entropy(student.apply(p, state, IMAGES)[0], LABELS)
  dense_loss = lambda p: _cross_entropy(dense.apply(p, IMAGES), LABELS)
  projected = lrnet.project(params, 3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         jax.jit(jax.grad(loss))(params), jax.grad(dense_loss)(projected))
  np.testing.assert_allclose(loss(params), dense_loss(projected), rtol=1e-5)


@pytest.mark.parametrize("name, images, parameters", [
    ("convnet", jnp.zeros((2, 32, 32, 3)),
     # conv 5×5·3→18, conv 5×5·18→48, dense 8·8·48→3000→2000→2000→1000→10 (SAME padding)
     (5 * 5 * 3 * 18 + 18) + (5 * 5 * 18 * 48 + 48) + (3072 * 3000 + 3000)
     + (3000 * 2000 + 2000) + (2000 * 2000 + 2000) + (2000 * 1000 + 1000) + (1000 * 10 + 10)),
    ("resmlp", jnp.zeros((2, 32, 32, 3)),
     (3072 * 1000 + 1000) + 4 * (1000 * 1000 + 1000) + (1000 * 10 + 10)),
    ("cnn", jnp.zeros((2, 28, 28, 1)),
     # VALID: 28 → 26 → 13 → 11 → 5; 5·5·64 = 1600 features
     (3 * 3 * 1 * 32 + 32) + (3 * 3 * 32 * 64 + 64) + (1600 * 128 + 128) + (128 * 10 + 10)),
])
def test_origin_networks_have_the_notebooks_shapes(name, images, parameters):
  net = hk.without_apply_rng(hk.transform(lrnet.models.NETWORKS[name](10)))
  params = jax.eval_shape(net.init, jax.random.PRNGKey(0), images)
  assert lrnet.count_params(params) == parameters
  assert jax.eval_shape(net.apply, params, images).shape == (2, 10)
  # The default selection: every dense and conv layer but the output layer.
  output = lrnet.compression.output_module(params)
  assert set(lrnet.compression.select_ranks(params, 4)) == set(params) - {output}


def test_cnn_dropout_only_with_an_rng():
  net = hk.transform(lrnet.models.cnn_fn(10))
  images = jax.random.uniform(jax.random.PRNGKey(0), (4, 28, 28, 1))
  params = net.init(jax.random.PRNGKey(0), images)
  plain = net.apply(params, None, images)
  np.testing.assert_array_equal(plain, net.apply(params, None, images))
  assert not np.allclose(net.apply(params, jax.random.PRNGKey(1), images), plain)


@pytest.mark.parametrize("name,fields,example", [
    ("mlp", {"hidden": (256, 256, 256)}, (1, 28, 28, 1)),
    ("cnn", {}, (1, 28, 28, 1)),
    ("resmlp", {"width": 200}, (1, 8, 8, 1))])
def test_dense_control_is_the_widest_network_within_the_student_size(name, fields, example):
  import ml_collections
  config = ml_collections.ConfigDict(dict(name=name, **fields))
  example = jnp.zeros(example)
  count = lambda c: lrnet.count_params(jax.eval_shape(hk.transform(lrnet.models.network(c, 10)).init,
                                                      jax.random.PRNGKey(0), example))
  full = count(config)
  for budget in (full // 7, 2 * full):
    control, params = lrnet.models.dense_control(config, 10, example, budget)
    assert params == count(control) <= budget
    assert params == full if budget >= full else params < full
    if budget < full:  # one more unit of width would not fit
      wider = lrnet.models.scaled(config, 1.0).copy_and_resolve_references()
      with wider.unlocked():
        for field in lrnet.models.WIDTH_FIELDS[name]:
          value = control[field]
          wider[field] = tuple(w + 1 for w in value) if isinstance(value, tuple) else value + 1
      assert count(wider) > budget
  with pytest.raises(ValueError, match="at most 10 parameters"):
    lrnet.models.dense_control(config, 10, example, 10)


def test_resnet18_is_the_small_image_resnet_and_its_dense_control_fits():
  import ml_collections
  fn = lrnet.models.resnet18_fn(10, widths=(4, 8, 8, 16))
  net = hk.transform_with_state(fn)
  images = jnp.zeros((2, 28, 28, 1))
  params, state = jax.eval_shape(lambda x: net.init(jax.random.PRNGKey(0), x, True), images)
  assert params["resnet18/~/initial_conv"]["w"].shape == (3, 3, 1, 4)  # a 3×3 stem
  assert "resnet18/~/initial_batchnorm/~/mean_ema" in state
  (logits, _) = jax.eval_shape(lambda p, s, x: net.apply(p, s, None, x, False), params, state, images)
  assert logits.shape == (2, 10)
  assert lrnet.models.count_network_params(fn, images) == lrnet.count_params(params)
  config = ml_collections.ConfigDict({"name": "resnet18", "widths": (4, 8, 8, 16)})
  full = lrnet.count_params(params)
  control, count = lrnet.models.dense_control(config, 10, images, full // 3)
  assert count <= full // 3 and tuple(control.widths) < (4, 8, 8, 16)


def test_the_config_names_the_networks():
  assert set(lrnet.config.MODELS) == set(lrnet.models.NETWORKS)


def test_a_user_network_is_imported_and_given_its_fields():
  import ml_collections
  config = ml_collections.ConfigDict({"name": "tests.user_networks:small_mlp", "width": 7,
                                      "hidden": (64,)})  # hidden: a built-in field it lacks
  forward = lrnet.models.network(config, 10)
  params = hk.transform(forward).init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  assert params["linear_0"]["w"].shape == (64, 7)
  with pytest.raises(ValueError, match="no dense control for model.name='tests.user_networks"):
    lrnet.models.dense_control(config, 10, jnp.zeros((1, 8, 8, 1)), 100)


@pytest.mark.parametrize("name, fields, pattern", [
    ("tests.user_networks:nope", {}, r"'nope' in module 'tests.user_networks' is missing"),
    ("tests.no_such_module:small_mlp", {}, r"cannot import module 'tests.no_such_module'"),
    ("tests.user_networks:NOT_A_FUNCTION", {}, r"is not a function"),
    ("tests.user_networks:transformed_mlp", {}, r"must return a Haiku forward function .*got Transformed"),
    ("tests.user_networks:small_mlp", {"depth": 3}, r"must take num_classes and the model group's fields \['depth'\]"),
    ("tests/user_networks.py:small_mlp", {}, r"allowed: mlp, .* 'package.module:function'"),
])
def test_bad_user_networks_are_one_line_config_errors(name, fields, pattern):
  import ml_collections
  config = ml_collections.ConfigDict(dict(name=name, **fields))
  with pytest.raises(lrnet.config.ConfigError, match=r"^config field model\.name=.*" + pattern) as error:
    lrnet.models.network(config, 10)
  assert "\n" not in str(error.value)
