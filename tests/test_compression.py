"""Tests for lrnet/compression.py on arbitrary Haiku parameter trees."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrnet
from lrnet import compression


def _conv_mlp_params():
  """A hand-built tree: conv kernel (4-D), batch-norm-like vectors, three linear layers."""
  def forward(x):
    x = hk.Conv2D(4, 3, name="conv")(x)
    x = hk.Flatten()(x)
    x = hk.Linear(20, name="dense_a")(x)
    x = hk.Linear(12, name="dense_b", with_bias=False)(x)
    return hk.Linear(5, name="head")(x)
  params = hk.transform(forward).init(jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2)))
  params = dict(params)
  params["norm"] = {"scale": jnp.ones(7), "offset": jnp.zeros(7)}
  return params


def test_default_selection_takes_dense_and_conv_layers_but_not_the_output_layer():
  params = _conv_mlp_params()
  assert lrnet.compression.select_ranks(params, 3) == {"conv": 3, "dense_a": 3, "dense_b": 3}
  compressed = lrnet.compress(params, 3)
  assert set(compressed["dense_a"]) == {"u", "v", "b"}
  assert set(compressed["dense_b"]) == {"u", "v"}  # no bias: none invented
  assert compressed["conv"]["u"].shape == (3, 3, 2, 3) and compressed["conv"]["v"].shape == (3, 4)
  for name in ("head", "norm"):  # untouched: the very same arrays
    for key, leaf in params[name].items():
      assert compressed[name][key] is leaf
  np.testing.assert_allclose(compressed["dense_a"]["u"] @ compressed["dense_a"]["v"],
                             lrnet.truncate(params["dense_a"]["w"], 3), atol=1e-5)


def test_project_keeps_shapes_and_other_leaves():
  params = _conv_mlp_params()
  projected = lrnet.project(params, 0.25)
  assert jax.tree_util.tree_map(jnp.shape, projected) == jax.tree_util.tree_map(jnp.shape, params)
  np.testing.assert_allclose(projected["dense_b"]["w"], lrnet.truncate(params["dense_b"]["w"], 3), atol=1e-5)
  # A conv kernel [3, 3, 2, 4] is truncated as its matrix [18, 4]: rank ceil(0.25·4) = 1.
  conv_matrix = params["conv"]["w"].reshape(18, 4)
  np.testing.assert_allclose(projected["conv"]["w"].reshape(18, 4), lrnet.truncate(conv_matrix, 1),
                             atol=1e-5)
  assert projected["head"]["w"] is params["head"]["w"]


def test_include_exclude_patterns_and_rank_dict():
  params = _conv_mlp_params()
  assert lrnet.compression.select_ranks(params, 2, include="*") == {"conv": 2, "dense_a": 2, "dense_b": 2,
                                                        "head": 2}
  assert lrnet.compression.select_ranks(params, 2, include=["dense_*", "head"], exclude="dense_a") == {"dense_b": 2, "head": 2}
  assert lrnet.compression.select_ranks(params, {"head": "full", "dense_a": 0.5}) == {"dense_a": 10, "head": 5}
  # energy 1.0 keeps every direction: the full rank, which would grow them, so by default none
  # is left... but named, they are taken.
  assert lrnet.compression.select_ranks(params, lrnet.svd.energy_rank(1.0), include="dense_*") == {
      "dense_a": 20, "dense_b": 12}


@pytest.mark.parametrize("rank, kwargs, pattern", [
    (0, {}, r"module 'conv': .*1\.\.4 .*\(18, 4\)"),
    (13, {"include": "dense_b"}, r"module 'dense_b': .*1\.\.12 .*\(20, 12\)"),
    (1.5, {}, r"\(0, 1\]"),
    ({"norm": 2}, {}, "without a dense or conv weight"),
    ({"nope": 2}, {}, "allowed: \\['conv', 'dense_a', 'dense_b', 'head'\\]"),
    ({"head": 2}, {"include": "head"}, "do not pass include"),
    (2, {"include": "missing*"}, "matches no module"),
])
def test_compress_errors(rank, kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    lrnet.compress(_conv_mlp_params(), rank, **kwargs)


def test_summary_counts_and_ratio():
  # Shapes alone: the reference MLP is abstract (eval_shape), so no 1024² SVD is computed.
  params = jax.eval_shape(lrnet.models.mlp((1024,) * 5, 10).init, jax.random.PRNGKey(0), jnp.zeros((1, 784)))
  compressed = jax.eval_shape(lambda p: lrnet.compress(p, 20), params)
  rows = lrnet.summarize(params, 20)
  assert [row.rank for row in rows] == [20] * 5 + [None]
  assert rows[0].compressed_params == 20 * (784 + 1024) + 1024
  assert rows[1].dense_flops == 2 * 1024 * 1024 and rows[1].compressed_flops == 2 * 20 * 2048
  assert sum(row.compressed_params for row in rows) == lrnet.count_params(compressed)
  table = compression.format_summary(rows)
  ratio = lrnet.count_params(params) / lrnet.count_params(compressed)
  assert "linear_5" in table and table.endswith(f"x{ratio:.2f}")


def test_default_selection_does_not_depend_on_key_order():
  """After a tree_map (optax, orbax restore) keys are sorted: `linear_10` before `linear_2`,
  and an hk.nets.MLP's `logits` head before `mlp/~/linear_*`. The output layer is still found
  (the one whose output feeds no other layer) and left dense."""
  deep = lrnet.models.mlp((16,) * 11, 10)
  params = jax.tree_util.tree_map(lambda x: x, deep.init(jax.random.PRNGKey(0), jnp.zeros((1, 8))))
  assert list(params)[:3] == ["linear_0", "linear_1", "linear_10"]  # sorted, not forward order
  assert set(lrnet.compression.select_ranks(params, 2)) == {f"linear_{i}" for i in range(11)}

  def forward(x):
    return hk.Linear(3, name="logits")(jax.nn.relu(hk.nets.MLP([12, 12])(x)))
  params = hk.transform(forward).init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))
  params = jax.tree_util.tree_map(lambda x: x, params)
  assert list(params)[0] == "logits"
  assert set(lrnet.compression.select_ranks(params, 2)) == {"mlp/~/linear_0", "mlp/~/linear_1"}


def test_shapes_that_do_not_single_out_the_output_layer_ask_for_include():
  def autoencoder(x):
    return hk.Linear(8, name="decode")(jax.nn.relu(hk.Linear(4, name="encode")(x)))
  params = hk.transform(autoencoder).init(jax.random.PRNGKey(0), jnp.zeros((1, 8)))
  with pytest.raises(ValueError, match="cannot tell the output layer .*include= or exclude="):
    lrnet.compress(params, 2)
  assert set(lrnet.compress(params, 2, include="encode")["encode"]) == {"u", "v", "b"}


@pytest.mark.parametrize("function", [lrnet.compress, lrnet.project, lrnet.summarize])
def test_an_empty_selection_is_an_error_not_an_unchanged_tree(function):
  params = _conv_mlp_params()
  with pytest.raises(ValueError, match="no module selected"):
    function(params, 2, include="dense_*", exclude="dense_*")


def test_energy_rank_under_jit_says_it_needs_concrete_weights():
  params = _conv_mlp_params()
  assert lrnet.compression.select_ranks(params, lrnet.svd.energy_rank(0.9))["dense_a"] >= 1
  with pytest.raises(ValueError, match=r"energy_rank\(0\.9\) .*concrete .*outside jax\.jit"):
    jax.jit(lambda p: lrnet.project(p, lrnet.svd.energy_rank(0.9)))(params)
