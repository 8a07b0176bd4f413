"""Tests for lrnet/models.py: dense, factorized and straight-through MLPs."""

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
    compressed = lrnet.compress(params, rank)
    expected = factorized.init(jax.random.PRNGKey(1), IMAGES)
    assert jax.tree_util.tree_structure(compressed) == jax.tree_util.tree_structure(expected)
    assert jax.tree_util.tree_map(jnp.shape, compressed) == jax.tree_util.tree_map(jnp.shape, expected)
    np.testing.assert_allclose(factorized.apply(compressed, IMAGES),
                               dense.apply(lrnet.project(params, rank), IMAGES), atol=2e-5)


def _cross_entropy(logits, labels):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(labels.shape[0]), labels])


def test_exact_student_grad_equals_dense_grad_at_projected_weights():
  params = _dense_params()
  rank = 3
  student = lrnet.models.mlp(HIDDEN, 10, project_rank=rank, projection_method="exact")
  dense = lrnet.models.mlp(HIDDEN, 10)
  student_loss = lambda p: _cross_entropy(student.apply(p, IMAGES), LABELS)
  dense_loss = lambda p: _cross_entropy(dense.apply(p, IMAGES), LABELS)
  student_grads = jax.jit(jax.grad(student_loss))(params)
  projected = lrnet.project(params, rank)
  dense_grads = jax.grad(dense_loss)(projected)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree_util.tree_map(close, student_grads, dense_grads)
  np.testing.assert_allclose(student_loss(params), dense_loss(projected), rtol=1e-5)
  # The projection matters: the gradient at the unprojected weights differs.
  assert not np.allclose(jax.grad(dense_loss)(params)["linear_0"]["w"],
                         student_grads["linear_0"]["w"], atol=1e-4)


def test_exact_student_rank_override_vmaps_over_ranks():
  params = _dense_params()
  student = lrnet.models.mlp(HIDDEN, 10, project_rank=5, projection_method="exact")
  ranks = jnp.array([2, 5])
  logits = jax.jit(jax.vmap(student.apply, in_axes=(None, None, 0)))(params, IMAGES, ranks)
  dense = lrnet.models.mlp(HIDDEN, 10)
  for i, r in enumerate([2, 5]):
    np.testing.assert_allclose(logits[i], dense.apply(lrnet.project(params, r), IMAGES), atol=1e-5)


def test_alternating_student_init_works_on_its_own_and_matches_projection_state():
  """`init` alone gives a usable state (it used to fail: "Must provide shape and dtype"), the
  exact pairs of the initial weights, as `projection_state` builds them for given params."""
  student = lrnet.models.mlp(HIDDEN, 10, project_rank=3)
  params, state = student.init(jax.random.PRNGKey(0), IMAGES)
  assert set(state) == {"linear_0", "linear_1", "linear_2"}
  built = lrnet.models.projection_state(params, 3, len(HIDDEN))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state, built)
  logits, _ = student.apply(params, state, IMAGES)
  dense = lrnet.models.mlp(HIDDEN, 10)
  np.testing.assert_allclose(logits, dense.apply(lrnet.project(params, 3), IMAGES), atol=1e-4)


def test_alternating_student_at_a_traced_rank_is_the_rank_r_projection_and_trains_alike():
  """A batch member: built at width 5, its own rank r traced, its tracker padded to the batch's
  size; its logits are the exact rank-r projection's and its gradient the straight-through one."""
  params = _dense_params()
  wide = lrnet.models.mlp(HIDDEN, 10, project_rank=5)
  dense = lrnet.models.mlp(HIDDEN, 10)
  for r in (2, 4):
    state = lrnet.models.projection_state(params, r, len(HIDDEN), pad_to_rank=5)
    logits, new_state = jax.jit(wide.apply)(params, state, IMAGES, jnp.int32(r))
    np.testing.assert_allclose(logits, dense.apply(lrnet.project(params, r), IMAGES), atol=1e-5)
    assert int(new_state["linear_0"]["tracker"].side) == 1
    loss = lambda p: _cross_entropy(wide.apply(p, state, IMAGES, jnp.int32(r))[0], LABELS)
    exact = lrnet.models.mlp(HIDDEN, 10, project_rank=r, projection_method="exact")
    exact_loss = lambda p: _cross_entropy(exact.apply(p, IMAGES), LABELS)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5),
                           jax.grad(loss)(params), jax.grad(exact_loss)(params))


def test_alternating_student_searches_both_sides_and_projects_each_call():
  """Calls alternate between the right and the left search; each one's logits are those of the
  rank-r projection of the weights it is given (near-exact: a random init's flat spectra are the
  tracker's worst case; tests/test_tracker.py checks the optimality itself)."""
  params = _dense_params()
  student = lrnet.models.mlp(HIDDEN, 10, project_rank=3)
  state = lrnet.models.projection_state(params, 3, len(HIDDEN))
  apply = jax.jit(student.apply)
  dense = lrnet.models.mlp(HIDDEN, 10)
  moved = params
  for call in range(4):
    moved = jax.tree_util.tree_map(lambda w: w * 1.002 + 1e-4, moved)
    assert int(state["linear_1"]["tracker"].side) == call % 2
    logits, state = apply(moved, state, IMAGES)
    np.testing.assert_allclose(logits, dense.apply(lrnet.project(moved, 3), IMAGES), atol=1e-3)
  assert sum(int(state[f"linear_{i}"]["tracker"].refreshes) for i in range(3)) == 0


def test_removed_projection_methods_are_refused():
  with pytest.raises(ValueError, match=r"one of \('exact', 'alternating'\), got 'streaming'"):
    lrnet.models.mlp(HIDDEN, 10, project_rank=3, projection_method="streaming")
