"""Tests for lrnet/compression.py (and calibrate, allocate_ranks, layer_spectra) on nested
parameter trees: flax-linen-shaped variables built by hand, against the same weights in a flat
Haiku tree."""

from collections.abc import Mapping

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import lrnet
from lrnet import compression
from lrnet import spectra

RANDOM = np.random.default_rng(3)
SHAPES = {"dense_0": (12, 10), "dense_1": (10, 8), "dense_2": (8, 6)}
WEIGHTS = {name: (RANDOM.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
           for name, shape in SHAPES.items()}
BIASES = {name: RANDOM.normal(size=shape[1]).astype(np.float32) for name, shape in SHAPES.items()}
# Where each flat Haiku module sits in the nested tree.
PATHS = {"dense_0": "params/Dense_0", "dense_1": "params/Block_0/Dense_1",
         "dense_2": "params/Dense_2"}
INPUTS = RANDOM.normal(size=(32, 12)).astype(np.float32)
LABELS = RANDOM.integers(0, 6, size=32)


@pytest.fixture(autouse=True)
def one_blas_thread():
  """OpenBLAS's threads contend on the loaded 2-core test machine (tests/test_calibration.py)."""
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


def flat_tree():
  return {name: {"w": WEIGHTS[name], "b": BIASES[name]} for name in SHAPES}


def nested_tree():
  """flax linen variables of an MLP whose middle layer sits in a block next to a LayerNorm."""
  dense = lambda name: {"kernel": WEIGHTS[name], "bias": BIASES[name]}
  return {"params": {"Dense_0": dense("dense_0"),
                     "Block_0": {"Dense_1": dense("dense_1"),
                                 "LayerNorm_0": {"scale": np.ones(8, np.float32),
                                                 "bias": np.zeros(8, np.float32)}},
                     "Dense_2": dense("dense_2")},
          "batch_stats": {"BatchNorm_0": {"mean": np.zeros(10, np.float32),
                                          "var": np.ones(10, np.float32)}}}


def node(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


class Frozen(Mapping):
  """A read-only Mapping built from a dict, like flax's FrozenDict."""

  def __init__(self, mapping):
    self._items = dict(mapping)

  def __getitem__(self, key):
    return self._items[key]

  def __iter__(self):
    return iter(self._items)

  def __len__(self):
    return len(self._items)


class Opaque(Frozen):
  """A Mapping whose constructor does not take a dict: rebuilt as a dict."""

  def __init__(self, mapping, tag):
    super().__init__(mapping)
    self.tag = tag


def _frozen(tree):
  return Frozen({k: _frozen(v) if isinstance(v, Mapping) else v for k, v in tree.items()})


def test_modules_are_named_by_path_and_flat_names_are_unchanged():
  assert list(compression.modules(nested_tree())) == [
      "params/Dense_0", "params/Block_0/Dense_1", "params/Block_0/LayerNorm_0",
      "params/Dense_2", "batch_stats/BatchNorm_0"]
  assert list(compression.modules(flat_tree())) == list(SHAPES)
  assert compression.matrix_shapes(nested_tree()) == {PATHS[k]: s for k, s in SHAPES.items()}
  assert compression.output_module(nested_tree()) == "params/Dense_2"
  assert lrnet.compression.select_ranks(nested_tree(), 2) == {"params/Dense_0": 2,
                                                  "params/Block_0/Dense_1": 2}


@pytest.mark.parametrize("function", [lrnet.project, lrnet.compress])
def test_nested_results_equal_the_flat_ones_leaf_for_leaf(function):
  flat, nested = function(flat_tree(), 3), function(nested_tree(), 3)
  renamed = {"w": "kernel", "b": "bias"}
  for name, path in PATHS.items():
    got = node(nested, path)
    assert set(got) == {renamed.get(key, key) for key in flat[name]}
    for key, leaf in flat[name].items():
      np.testing.assert_array_equal(got[renamed.get(key, key)], leaf)
  source = nested_tree()
  kept = function(source, 3)
  assert kept["batch_stats"] is source["batch_stats"]  # untouched subtrees: the same objects
  assert kept["params"]["Block_0"]["LayerNorm_0"] is source["params"]["Block_0"]["LayerNorm_0"]
  assert kept["params"]["Dense_2"] is source["params"]["Dense_2"]  # the output layer, dense
  assert kept["params"]["Dense_0"]["bias"] is source["params"]["Dense_0"]["bias"]
  assert kept["params"]["Dense_0"] is not source["params"]["Dense_0"]


def test_mapping_types_are_kept_and_a_type_that_cannot_be_rebuilt_becomes_a_dict():
  tree = _frozen(nested_tree())
  compressed = lrnet.compress(tree, 2)
  assert type(compressed) is Frozen and type(compressed["params"]["Block_0"]) is Frozen
  assert type(compressed["params"]["Block_0"]["Dense_1"]) is Frozen
  assert set(compressed["params"]["Block_0"]["Dense_1"]) == {"u", "v", "bias"}
  assert compressed["batch_stats"] is tree["batch_stats"]
  opaque = {"params": Opaque({"Dense_0": {"kernel": WEIGHTS["dense_0"]},
                              "Dense_1": {"kernel": WEIGHTS["dense_1"]}}, tag="x")}
  projected = lrnet.project(opaque, 2)
  assert type(projected["params"]) is dict
  np.testing.assert_allclose(projected["params"]["Dense_0"]["kernel"],
                             lrnet.truncate(WEIGHTS["dense_0"], 2), atol=1e-5)


def test_globs_and_rank_dicts_use_path_names():
  tree = nested_tree()
  assert lrnet.compression.select_ranks(tree, 2, include="params/*") == {
      "params/Dense_0": 2, "params/Block_0/Dense_1": 2, "params/Dense_2": 2}
  assert lrnet.compression.select_ranks(tree, 2, include="*", exclude="params/Block_0/*") == {
      "params/Dense_0": 2, "params/Dense_2": 2}
  assert lrnet.compression.select_ranks(tree, {"params/Block_0/Dense_1": "full", "params/Dense_2": 0.5}) == {
      "params/Block_0/Dense_1": 8, "params/Dense_2": 3}
  with pytest.raises(ValueError, match=r"without a dense or conv weight: \['Dense_1'\]"):
    lrnet.compress(tree, {"Dense_1": 2})
  with pytest.raises(ValueError, match="without a dense or conv weight"):
    lrnet.compress(tree, {"batch_stats/BatchNorm_0": 2})
  with pytest.raises(ValueError, match="matches no module"):
    lrnet.project(tree, 2, include="Dense_*")


def test_embedding_tables_are_compressed_only_when_named():
  table = RANDOM.normal(size=(50, 16)).astype(np.float32)
  tree = {"params": {"Embed_0": {"embedding": table},
                     "Dense_0": {"kernel": RANDOM.normal(size=(16, 32)).astype(np.float32)},
                     "Dense_1": {"kernel": np.ones((32, 50), np.float32)}}}
  # Counted as a dense layer, the table's input width 50 would hide the output layer Dense_1.
  assert lrnet.compression.select_ranks(tree, 2) == {"params/Dense_0": 2}
  assert lrnet.compress(tree, 2)["params"]["Embed_0"] is tree["params"]["Embed_0"]
  notes = {row.name: row.note for row in lrnet.summarize(tree, 2)}
  assert notes["params/Embed_0"].startswith("embedding table")
  compressed = lrnet.compress(tree, 4, include="params/Embed_0")
  factors = compressed["params"]["Embed_0"]
  assert factors["u"].shape == (50, 4) and factors["v"].shape == (4, 16)
  np.testing.assert_allclose(factors["u"] @ factors["v"], lrnet.truncate(table, 4), atol=1e-5)
  projected = lrnet.project(tree, {"params/Embed_0": 4})["params"]["Embed_0"]["embedding"]
  np.testing.assert_allclose(projected, lrnet.truncate(table, 4), atol=1e-5)
  row = {row.name: row for row in lrnet.summarize(tree, {"params/Embed_0": 4})}["params/Embed_0"]
  assert (row.rank, row.compressed_params, row.per) == (4, 4 * 66, "token")
  haiku_tree = {"embed": {"embeddings": table}, "linear": {"w": np.ones((16, 3), np.float32)}}
  assert set(lrnet.compress(haiku_tree, 2, include="embed")["embed"]) == {"u", "v"}


def test_unfactorizable_layers_are_skipped_summarized_and_refused_when_named():
  tree = nested_tree()
  tree["params"]["Conv_0"] = {"kernel": np.ones((3, 3, 1, 12), np.float32)}  # depthwise-like
  unfactorizable = {"params/Conv_0": "depthwise conv"}
  assert "params/Conv_0" in lrnet.compression.select_ranks(tree, 1)
  assert set(lrnet.compression.select_ranks(tree, 1, unfactorizable=unfactorizable)) == {
      "params/Dense_0", "params/Block_0/Dense_1"}
  rows = {row.name: row for row in lrnet.summarize(tree, 2, unfactorizable=unfactorizable)}
  assert rows["params/Conv_0"].rank is None
  assert rows["params/Conv_0"].note == "not factorizable: depthwise conv"
  for selection in ({"include": "*"}, {"include": "params/Conv_*"}):
    with pytest.raises(ValueError, match=r"module 'params/Conv_0' is not factorizable: depthwise"):
      lrnet.compress(tree, 2, unfactorizable=unfactorizable, **selection)
  with pytest.raises(ValueError, match=r"'params/Conv_0' is not factorizable: transposed conv"):
    lrnet.project(tree, {"params/Conv_0": 2},
                  unfactorizable={"params/Conv_0": "transposed conv"})
  assert set(lrnet.decompose(tree, include="*", exclude="params/Conv_0",
                             unfactorizable=unfactorizable)) == set(PATHS.values())


def test_summary_rows_follow_the_tree_and_add_up():
  tree = nested_tree()
  rows = lrnet.summarize(tree, 3)
  assert [row.name for row in rows] == list(compression.modules(tree))
  by_name = {row.name: row for row in rows}
  assert by_name["params/Dense_0"].rank == 3 and by_name["params/Dense_2"].note == "output layer"
  assert by_name["batch_stats/BatchNorm_0"].shape == () and by_name[
      "batch_stats/BatchNorm_0"].dense_params == 20
  assert sum(row.compressed_params for row in rows) == lrnet.count_params(
      lrnet.compress(tree, 3))
  assert "params/Block_0/Dense_1" in lrnet.compression.format_summary(rows)


def test_pad_project_masked_and_decompose_on_a_nested_tree():
  tree = nested_tree()
  compressed = lrnet.compress(tree, 2)
  widths = {"params/Dense_0": 5, "params/Block_0/Dense_1": 4}
  padded = compression.pad_factors(compressed, widths)
  assert padded["params"]["Block_0"]["Dense_1"]["u"].shape == (10, 4)
  assert padded["batch_stats"] is tree["batch_stats"]
  unpadded = compression.unpad_factors(padded, {name: 2 for name in widths})
  jax.tree_util.tree_map(np.testing.assert_array_equal, unpadded, compressed)
  ranks = {"params/Dense_0": 3, "params/Block_0/Dense_1": 2}
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
                         compression.project_masked(tree, ranks), lrnet.project(tree, ranks))
  decompositions = lrnet.decompose(tree)
  flat = lrnet.decompose(flat_tree())
  assert list(decompositions) == ["params/Dense_0", "params/Block_0/Dense_1"]
  for name, path in list(PATHS.items())[:2]:
    np.testing.assert_allclose(decompositions[path].s, flat[name].s, rtol=1e-6)
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         lrnet.project(tree, 2, decompositions=decompositions),
                         lrnet.project(tree, 2))


def test_layer_spectra_are_keyed_by_path():
  nested = spectra.layer_spectra(nested_tree())
  flat = spectra.layer_spectra(flat_tree())
  assert list(nested) == list(PATHS.values())
  for name, path in PATHS.items():
    assert nested[path] == flat[name]


def _forward(layers, x):
  """The MLP of either tree: `layers` are its (weight, bias) pairs in order."""
  for index, (weight, bias) in enumerate(layers):
    x = x @ weight + bias
    if index < len(layers) - 1:
      x = jax.nn.relu(x)
  return x


def _cross_entropy(logits):
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(LABELS.shape[0]), LABELS])


def flat_loss(params):
  return _cross_entropy(_forward([(params[n]["w"], params[n]["b"]) for n in SHAPES], INPUTS))


def nested_loss(params):
  nodes = [node(params, PATHS[n]) for n in SHAPES]
  return _cross_entropy(_forward([(n["kernel"], n["bias"]) for n in nodes], INPUTS))


def test_calibrated_allocation_on_a_nested_tree_equals_the_flat_one():
  hidden = np.maximum(INPUTS @ WEIGHTS["dense_0"] + BIASES["dense_0"], 0)
  grams = {"dense_0": INPUTS.T.astype(np.float64) @ INPUTS, "dense_1": hidden.T @ hidden}
  flat_calibration = lrnet.calibration.Calibration(grams, {"dense_0": 32, "dense_1": 32})
  nested_calibration = lrnet.calibration.Calibration({PATHS[n]: g for n, g in grams.items()},
                                         {PATHS[n]: 32 for n in grams})
  rename = lambda ranks: {PATHS[name]: rank for name, rank in ranks.items()}
  traces = []

  def counted_loss(params):
    traces.append(1)  # runs once per trace: every truncated tree keeps the nesting
    return nested_loss(params)
  for criterion, flat_kwargs, nested_kwargs in (
      ("greedy", {"loss": flat_loss}, {"loss": counted_loss}), ("energy", {}, {})):
    flat = lrnet.allocate_ranks(flat_tree(), [0.4, 0.7], criterion=criterion,
                                calibration=flat_calibration, **flat_kwargs)
    nested = lrnet.allocate_ranks(nested_tree(), [0.4, 0.7], criterion=criterion,
                                  calibration=nested_calibration, **nested_kwargs)
    assert nested == [rename(ranks) for ranks in flat] and nested[0]
  assert len(traces) == 1
  projected = lrnet.project(nested_tree(), nested[0], calibration=nested_calibration)
  reference = lrnet.project(flat_tree(), flat[0], calibration=flat_calibration)
  np.testing.assert_allclose(projected["params"]["Dense_0"]["kernel"], reference["dense_0"]["w"],
                             atol=1e-6)


def test_calibrate_a_stateful_network_with_static_keyword_arguments_on_token_inputs():
  def fn(tokens, is_training):
    embedded = hk.Linear(6, name="embed")(tokens)                       # [batch, tokens, 6]
    normed = jax.nn.relu(hk.BatchNorm(True, True, 0.9, name="norm")(embedded, is_training))
    return hk.Linear(3, name="head")(hk.Linear(4, name="mid")(normed)), normed
  tokens = RANDOM.normal(size=(2, 3, 5)).astype(np.float32)
  net = hk.transform_with_state(fn)
  shapes = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), tokens, is_training=True))
  draw = lambda leaf: (np.abs(RANDOM.normal(size=leaf.shape)) + 0.5).astype(leaf.dtype)
  params, state = jax.tree_util.tree_map(draw, shapes)
  batches = [tokens, tokens[::-1] * 2.0]
  calibration = lrnet.calibrate(fn, params, batches, state=state,
                                kwargs={"is_training": False})  # a traced bool would fail
  assert list(calibration.grams) == ["embed", "mid"] and calibration.counts["embed"] == 12
  rows = np.concatenate([b.reshape(-1, 5) for b in batches]).astype(np.float64)
  np.testing.assert_allclose(calibration.grams["embed"], rows.T @ rows, rtol=1e-5)
  normed = np.concatenate([np.asarray(net.apply(params, state, None, b, is_training=False)[0][1])
                           .reshape(-1, 6) for b in batches]).astype(np.float64)
  np.testing.assert_allclose(calibration.grams["mid"], normed.T @ normed, rtol=1e-4, atol=1e-4)
