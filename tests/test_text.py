"""Language models: byte windows and splits (lrnet.text), the transformer, a text sweep."""

import json
import math

import haiku as hk
import jax
import numpy as np
import pytest

from configs import text_transformer
from lrnet import compression
from lrnet import config as config_lib
from lrnet import data
from lrnet import models
from lrnet import students
from lrnet import sweep
from lrnet import text
from tests.test_cli import assert_one_line_error
from tests.test_cli import run_entry_point


def corpus_file(tmp_path, size=5000, seed=0):
  body = np.random.default_rng(seed).integers(32, 127, size, dtype=np.uint8).tobytes()
  path = tmp_path / "corpus.txt"
  path.write_bytes(body)
  return path, body


def test_windows_are_the_corpus_bytes_split_into_disjoint_contiguous_blocks(tmp_path):
  path, body = corpus_file(tmp_path)
  context, fraction = 16, 0.1
  dataset = text.load_text(str(path), 10**6, context, fraction)
  corpus = np.frombuffer(body, np.uint8)
  held = int(len(body) * fraction)
  starts = (0, len(body) - 2 * held, len(body) - held)
  ends = starts[1:] + (len(body),)
  for split, start, end in zip((dataset.train, dataset.val, dataset.test), starts, ends):
    count = (end - start - 1) // context
    assert split.images.shape == split.labels.shape == (count, context)
    assert split.images.dtype == split.labels.dtype == np.int32
    covered = corpus[start:start + count * context + 1]
    np.testing.assert_array_equal(split.images.ravel(), covered[:-1])  # inputs, in order
    np.testing.assert_array_equal(split.labels.ravel(), covered[1:])   # the next bytes
    # Every byte a window reads, input or target, lies inside the split's own block.
    assert start + count * context + 1 <= end
  assert dataset.num_classes == 256 and dataset.name == "text"


def test_a_directory_is_read_in_sorted_order_skipping_binary_files_up_to_max_bytes(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "b" / "two.txt").write_bytes(b"second file ")
  (tmp_path / "a.txt").write_bytes("first, héllo ".encode())
  (tmp_path / "blob.bin").write_bytes(b"\xff\xfe\x00 not text")
  corpus, source = text.read_corpus(str(tmp_path), 10**6)
  assert corpus.tobytes() == "first, héllo ".encode() + b"second file "
  assert text.read_corpus(str(tmp_path), 8)[0].tobytes() == b"first, h"
  assert text.read_corpus(str(tmp_path / "*.txt"), 10**6)[0].tobytes() == "first, héllo ".encode()
  assert str(tmp_path) in source


def test_the_default_corpus_is_the_standard_library_without_its_tests():
  files = text.stdlib_files()
  assert len(files) > 100 and all(f.suffix == ".py" for f in files)
  assert not any(part in text.STDLIB_EXCLUDED_DIRS for f in files for part in f.parts[-3:-1])
  corpus, source = text.read_corpus(None, 3000)
  assert corpus.size == 3000 and source.startswith("text:python stdlib ")
  assert corpus.tobytes() == b"".join(f.read_bytes() for f in files[:20])[:3000]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: str(tmp / "missing.txt"), "is no file, directory or glob"),
    (lambda tmp: str(tmp / "nothing-*.txt"), "is no file, directory or glob"),
    (lambda tmp: (tmp / "empty.txt").write_bytes(b"") and None or str(tmp / "empty.txt"), "is empty"),
    (lambda tmp: (tmp / "x.bin").write_bytes(b"\xff\xff") and None or str(tmp / "x.bin"),
     "no UTF-8 text file"),
])
def test_a_bad_corpus_is_one_line_naming_data_path(tmp_path, make, message):
  with pytest.raises(data.DataError, match=message) as error:
    text.load_text(make(tmp_path), 10**6, 16, 0.1)
  assert "data.path=" in str(error.value) and "\n" not in str(error.value)


def test_a_corpus_too_short_for_every_split_is_one_line(tmp_path):
  path, _ = corpus_file(tmp_path, size=100)
  with pytest.raises(data.DataError, match="data.context=16"):
    text.load_text(str(path), 10**6, 16, 0.1)


def transformer(tied_head=False, **fields):
  return models.transformer_fn(256, width=32, layers=2, heads=4, tied_head=tied_head, **fields)


def test_the_transformer_is_causal_and_every_projection_is_a_dense_layer():
  net = hk.without_apply_rng(hk.transform(transformer()))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 256)
  params = net.init(jax.random.PRNGKey(1), tokens)
  logits = net.apply(params, tokens)
  assert logits.shape == (2, 12, 256)
  changed = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 256)  # every token from position 7 on
  np.testing.assert_allclose(net.apply(params, changed)[:, :7], logits[:, :7], atol=1e-5)
  assert not np.allclose(net.apply(params, changed)[:, 7], logits[:, 7])
  selected = compression.compressible_modules(params)
  assert sorted(selected) == [f"block_{i}/{name}" for i in range(2)
                      for name in ("attention/key", "attention/linear", "attention/query",
                                   "attention/value", "mlp_in", "mlp_out")]
  assert compression.output_module(params) == "head"  # the embeddings and head stay dense


@pytest.mark.parametrize("tied_head", [False, True])
def test_the_factorized_transformer_equals_the_dense_one_at_the_projected_weights(tied_head):
  fn = transformer(tied_head)
  dense = hk.without_apply_rng(hk.transform(fn))
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 10), 0, 256)
  params = dense.init(jax.random.PRNGKey(1), tokens)
  if tied_head:
    assert "head" not in params and compression.output_module(params) is None
  ranks = compression.select_ranks(params, 5)
  assert len(ranks) == 12
  twin = students.factorized(fn, ranks)
  expected = dense.apply(compression.project(params, ranks), tokens)
  np.testing.assert_allclose(twin.apply(compression.compress(params, ranks), tokens), expected,
                             atol=2e-5)
  # Dropout acts only when the network runs with an rng.
  dropping = hk.transform(transformer(tied_head, dropout=0.5))
  assert np.allclose(dropping.apply(params, None, tokens), dense.apply(params, tokens))
  assert not np.allclose(dropping.apply(params, jax.random.PRNGKey(2), tokens),
                         dense.apply(params, tokens))


def tiny_config(tmp_path, **overrides):
  path, _ = corpus_file(tmp_path, size=24_000)
  config = text_transformer.get_config()
  config.workdir = str(tmp_path / "work")
  config.data.path = str(path)
  config.data.context = 16
  config.data.val_fraction = 0.1
  config.model.width = 16
  config.model.layers = 1
  config.model.heads = 2
  config.teacher.epochs = 2
  config.student.epochs = 1
  config.teacher.batch_size = config.student.batch_size = 32
  config.calibration.examples = 64
  config.sweep.ranks = (2, 4)
  config.latency.repeats = 2
  config.update_from_flattened_dict(overrides)
  return config


def test_a_text_sweep_reports_losses_and_bits_per_byte_for_every_kind(tmp_path):
  lines, config = [], tiny_config(tmp_path)
  assert set(config.sweep.kinds) == set(config_lib.STUDENT_KINDS)
  results = sweep.run_sweep(config, log=lines.append)
  on_disk = json.loads((tmp_path / "work" / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["dataset"] == "text" and 0 < on_disk["teacher"]["test_loss"] < math.log(256)
  assert len(on_disk["layers"]) == 6
  for entry in on_disk["ranks"] + on_disk["budgets"]:
    assert "error" not in entry
    for kind in ("truncated", "whitened_truncated") + tuple(config.sweep.kinds):
      assert 0 <= entry[f"{kind}_accuracy"] <= 1 and 0 < entry[f"{kind}_loss"] < 10, kind
  assert [e["budget"] for e in on_disk["budgets"]] == [0.25]
  table = lines[-1 - next(i for i, line in enumerate(reversed(lines)) if "teacher test" in line):]
  assert f"{on_disk['teacher']['test_loss'] / math.log(2):.3f} bits per byte" in table[0]
  assert "bits/byte" in "\n".join(table)
  header = (tmp_path / "work" / "results.csv").read_text().splitlines()[0].split(",")
  assert {"truncated_loss", "whitened_truncated_loss", "dense_control_loss"} <= set(header)
  assert (tmp_path / "work" / "accuracy_vs_params.png").stat().st_size > 0


def test_sweep_include_selects_projections_by_path(tmp_path):
  config = tiny_config(tmp_path, **{"sweep.kinds": (), "sweep.budgets": ()})
  config.sweep.include = ("*/mlp_*",)
  results = sweep.run_sweep(config, log=lambda line: None)
  assert [layer["name"] for layer in results["layers"]] == ["block_0/mlp_in", "block_0/mlp_out"]
  config.sweep.include, config.sweep.exclude = ("*/attention/*",), ("*/value", "*/linear")
  config.workdir = str(tmp_path / "qk")
  results = sweep.run_sweep(config, log=lambda line: None)
  assert sorted(layer["name"] for layer in results["layers"]) == ["block_0/attention/key",
                                                                  "block_0/attention/query"]
  config.sweep.include, config.sweep.exclude = ("*/nothing",), ()
  config.workdir = str(tmp_path / "none")
  with pytest.raises(config_lib.ConfigError, match="sweep.include"):
    sweep.run_sweep(config, log=lambda line: None)


def test_a_bad_data_path_on_the_command_line_is_one_line_exit_2(tmp_path):
  result = run_entry_point("experiments.sweep", "--config=configs/text_transformer.py",
                           f"--config.workdir={tmp_path / 'work'}",
                           f"--config.data.path={tmp_path / 'missing.txt'}")
  assert_one_line_error(result, "data.path=", "missing.txt")
  assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("overrides, field", [
    ({"model.name": "mlp"}, "model.name"),
    ({"teacher.shift": 2}, "teacher.shift"),
    ({"data.context": 0}, "data.context"),
    ({"data.max_bytes": -1}, "data.max_bytes"),
    ({"model.heads": 0}, "model.heads"),
])
def test_text_config_fields_are_checked(tmp_path, overrides, field):
  config = text_transformer.get_config()
  config.workdir = str(tmp_path)
  with config.unlocked():
    if "model.name" in overrides:
      config.model.hidden = (8,)
    config.update_from_flattened_dict(overrides)
  with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(config)


def test_an_image_dataset_refuses_the_transformer(tmp_path):
  config = text_transformer.get_config()
  config.workdir = str(tmp_path)
  with config.unlocked():
    config.data.name = "digits"
    config.data.dir = None
  with pytest.raises(config_lib.ConfigError, match="needs one of mlp"):
    config_lib.validate(config)
