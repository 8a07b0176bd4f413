"""Tests for lrnet/students.py on networks defined here, not in lrnet.models: a CNN (strided,
dilated and VALID convs) and a residual MLP."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrnet
from lrnet import tracker

IMAGES = jax.random.normal(jax.random.PRNGKey(1), (6, 14, 14, 3))
LABELS = jnp.array([0, 1, 2, 3, 4, 0])


def own_cnn(images):
  x = jax.nn.relu(hk.Conv2D(16, 3, stride=2, name="stem")(images))
  x = jax.nn.relu(hk.Conv2D(20, 3, rate=2, padding="VALID", name="dilated")(x))
  x = hk.Flatten()(hk.MaxPool((2, 2, 1), (2, 2, 1), "VALID")(x))
  x = jax.nn.relu(hk.Linear(40, name="hidden")(x))
  return hk.Linear(5, name="head")(x)


def own_resmlp(images):
  x = jax.nn.relu(hk.Linear(48, name="embed")(hk.Flatten()(images)))
  for i in range(2):
    x = jax.nn.relu(x + hk.Linear(48, name=f"res_{i}")(jax.nn.relu(hk.Linear(32, name=f"mid_{i}")(x))))
  return hk.Linear(5, name="out")(x)


NETWORKS = [pytest.param(own_cnn, id="cnn"), pytest.param(own_resmlp, id="resmlp")]
RANK = 6


def _dense(fn):
  net = hk.without_apply_rng(hk.transform(fn))
  return net, net.init(jax.random.PRNGKey(0), IMAGES)


def _loss(logits):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(LABELS.shape[0]), LABELS])


@pytest.mark.parametrize("fn", NETWORKS)
def test_factorized_twin_of_compress_is_the_dense_net_at_project(fn):
  net, params = _dense(fn)
  twin = lrnet.factorized(fn, RANK)
  compressed = lrnet.compress(params, RANK)
  init = twin.init(jax.random.PRNGKey(2), IMAGES)
  assert jax.tree_util.tree_map(jnp.shape, init) == jax.tree_util.tree_map(jnp.shape, compressed)
  np.testing.assert_allclose(twin.apply(compressed, IMAGES),
                             net.apply(lrnet.project(params, RANK), IMAGES), rtol=1e-4, atol=1e-5)
  # Its own initialisation is a working network of the dense one's scale.
  assert np.all(np.isfinite(twin.apply(init, IMAGES)))
  assert 0.2 < float(jnp.std(twin.apply(init, IMAGES)) / jnp.std(net.apply(params, IMAGES))) < 5


@pytest.mark.parametrize("fn", NETWORKS)
def test_exact_student_outputs_and_gradients_equal_the_dense_net_at_project(fn):
  net, params = _dense(fn)
  student = lrnet.straight_through(fn, RANK, method="exact")
  state = lrnet.tracker_state(student, params, IMAGES)
  projected = lrnet.project(params, RANK)
  logits, _ = student.apply(params, state, IMAGES)
  np.testing.assert_allclose(logits, net.apply(projected, IMAGES), rtol=1e-4, atol=1e-5)
  grads = jax.grad(lambda p: _loss(student.apply(p, state, IMAGES)[0]))(params)
  dense_grads = jax.grad(lambda p: _loss(net.apply(p, IMAGES)))(projected)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
                         grads, dense_grads)


@pytest.mark.parametrize("fn", NETWORKS)
def test_alternating_student_tracks_the_exact_one_within_the_optimality_bar(fn):
  """Over Adam steps, every tracked layer's projection stays within 1.001 of the optimal
  ‖W − W_r‖ (the factors each call hands out, for the weights of that call)."""
  _, params = _dense(fn)
  student = lrnet.straight_through(fn, RANK)
  state = lrnet.tracker_state(student, params, IMAGES)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, state, opt_state):
    (loss, state), grads = jax.value_and_grad(
        lambda p: (lambda out: (_loss(out[0]), out[1]))(student.apply(p, state, IMAGES)),
        has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), state, opt_state

  worst = 1.0
  for _ in range(6):
    for name, module_state in state.items():
      weight = params[name]["w"]
      matrix = weight.reshape(-1, weight.shape[-1])
      _, left, right = tracker.project(matrix, module_state["tracker"], RANK)
      ratio = tracker.optimality_ratio(matrix, tracker.leading_rows(left, RANK).T @ right, RANK)
      worst = max(worst, float(ratio))
    params, state, opt_state = step(params, state, opt_state)
  # (From a random init, flat spectra can need an exact refresh now and then: allowed.)
  assert worst <= 1.001


def test_a_conv_layer_factorized_at_full_rank_is_the_conv():
  net, params = _dense(own_cnn)
  ranks = {"stem": "full", "dilated": "full"}  # named: kept even though they grow
  twin = lrnet.factorized(own_cnn, ranks)
  compressed = lrnet.compress(params, ranks)
  assert compressed["stem"]["u"].shape == (3, 3, 3, 16) and compressed["stem"]["v"].shape == (16, 16)
  np.testing.assert_allclose(twin.apply(compressed, IMAGES), net.apply(params, IMAGES),
                             rtol=1e-4, atol=1e-5)


def test_students_of_different_ranks_train_side_by_side_as_they_would_alone():
  """A member's state projects to its own rank with its own tracked pairs padded to the
  student's size: vmapped over members, each computes what it alone computes."""
  _, params = _dense(own_resmlp)
  wide = lrnet.straight_through(own_resmlp, 8)
  states = [lrnet.tracker_state(wide, params, IMAGES, rank=r) for r in (3, 8)]
  stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *states)
  logits, _ = jax.jit(jax.vmap(wide.apply, in_axes=(None, 0, None)))(params, stacked, IMAGES)
  for member, rank in enumerate((3, 8)):
    alone = lrnet.straight_through(own_resmlp, rank)
    own_logits, _ = jax.jit(alone.apply)(params, lrnet.tracker_state(alone, params, IMAGES), IMAGES)
    np.testing.assert_allclose(logits[member], own_logits, rtol=1e-4, atol=1e-5)
  assert int(states[0]["embed"]["rank"]) == 3 and int(states[0]["embed"]["tracker"].width) == 13
  assert states[0]["embed"]["tracker"].right_rows.shape == states[1]["embed"]["tracker"].right_rows.shape


def test_init_alone_gives_a_state_that_works():
  student = lrnet.straight_through(own_cnn, RANK)
  params, state = student.init(jax.random.PRNGKey(0), IMAGES)
  assert set(state) == {"stem", "dilated", "hidden"}
  logits, _ = student.apply(params, state, IMAGES)
  net, _ = _dense(own_cnn)
  np.testing.assert_allclose(logits, net.apply(lrnet.project(params, RANK), IMAGES), atol=1e-4)


def test_selection_never_grows_a_layer_unless_named_and_the_summary_says_so():
  _, params = _dense(own_resmlp)
  # mid_i, res_i: 48×32, 32×48; rank 20 would cost 20·80 = 1600 ≥ 1536 weights: left dense.
  assert set(lrnet.compression.select_ranks(params, 20)) == {"embed"}
  assert set(lrnet.compression.select_ranks(params, 10)) == {"embed", "mid_0", "res_0", "mid_1", "res_1"}
  notes = {row.name: row.note for row in lrnet.summarize(params, 20)}
  assert notes["mid_0"].startswith("kept dense") and notes["res_1"].startswith("kept dense")
  assert notes["out"] == "output layer" and notes["embed"] == ""
  assert set(lrnet.compression.select_ranks(params, 20, include="mid_*")) == {"mid_0", "mid_1"}
  with pytest.raises(ValueError, match="no module selected"):
    lrnet.compression.select_ranks(params, 40, include="res_*", exclude="res_*")


def test_flax_style_kernel_names_and_conv_summary_flops():
  params = {"Conv_0": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.zeros(8)},
            "Dense_0": {"kernel": jnp.ones((72, 30)), "bias": jnp.zeros(30)},
            "Dense_1": {"kernel": jnp.ones((30, 10)), "bias": jnp.zeros(10)}}
  compressed = lrnet.compress(params, 2)
  assert set(compressed["Conv_0"]) == {"u", "v", "bias"}
  assert compressed["Conv_0"]["u"].shape == (3, 3, 4, 2) and "kernel" in compressed["Dense_1"]
  rows = {row.name: row for row in lrnet.summarize(params, 2)}
  assert (rows["Conv_0"].dense_flops, rows["Conv_0"].compressed_flops) == (2 * 36 * 8, 2 * 2 * 44)
  assert rows["Conv_0"].per == "output position" and rows["Dense_0"].per == "example"


def test_decompositions_are_reused_across_ranks():
  _, params = _dense(own_cnn)
  decompositions = lrnet.decompose(params)
  for rank in (2, 5):
    with_svd = lrnet.compress(params, rank, decompositions=decompositions)
    plain = lrnet.compress(params, rank)
    for name in with_svd:  # the factors are the SVD's up to signs: compare their products
      if "u" in with_svd[name]:
        product = lambda t: t["u"].reshape(-1, rank) @ t["v"]
        np.testing.assert_allclose(product(with_svd[name]), product(plain[name]), atol=1e-5)
    projected = lrnet.project(params, rank, decompositions=decompositions)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                           projected, lrnet.project(params, rank))
