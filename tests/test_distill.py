"""End-to-end tests of lrnet/distill.py and experiments/distill.py on the digits data."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import fashion_mnist_subclass
from lrnet import checkpoint
from lrnet import config as config_lib
from lrnet import data
from lrnet import distill
from lrnet import models

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD_FIELDS = {"test_accuracy", "test_loss", "val_accuracy", "params", "epochs", "best_epoch",
                 "seconds", "fingerprint", "trained_with", "steps", "examples", "train_flops"}


def small_config(workdir, **overrides):
  """The default config on digits with a small MLP teacher (8×8 images are too small for the
  CNN's two VALID convs and pools) and a small student."""
  config = fashion_mnist_subclass.get_config()
  config.workdir = str(workdir)
  config.data.name = "digits"
  config.model.name = "mlp"
  config.model.hidden = (64,)
  config.teacher.epochs, config.teacher.batch_size = 3, 32
  config.student.epochs, config.student.batch_size = 2, 64
  config.student.hidden = (32, 32)
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("distill")
  lines = []
  results = distill.run_distill(small_config(workdir), log=lines.append)
  return workdir, results, lines


def test_results_json_has_the_schema_and_the_table_is_printed(finished):
  workdir, results, lines = finished
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["dataset"] == "digits" and on_disk["subclasses"] == 2
  assert list(on_disk["runs"]) == list(distill.RUNS)
  for run, record in on_disk["runs"].items():
    assert set(record) == RECORD_FIELDS, run
    assert 0.0 <= record["test_accuracy"] <= 1.0 and 0.0 <= record["val_accuracy"] <= 1.0
    assert record["seconds"] > 0 and 1 <= record["best_epoch"] <= record["epochs"]
    batch = 32 if run == "teacher" else 64
    assert record["examples"] == record["steps"] * batch and record["train_flops"] > 0
  # 64 → 64 → 20 and 64 → 32 → 32 → 20 (k = 2 outputs per class).
  assert on_disk["runs"]["teacher"]["params"] == 64 * 64 + 64 + 64 * 20 + 20
  assert on_disk["runs"]["student_alone"]["params"] == 64 * 32 + 32 + 32 * 32 + 32 + 32 * 20 + 20
  assert on_disk["runs"]["teacher"]["test_accuracy"] > 0.5  # far above chance (0.1)
  table = lines[-1]
  for run in distill.RUNS:
    assert run in table
  assert str(workdir / "results.json") in table


def test_the_distilled_students_differ_from_the_plain_one(finished):
  workdir, _, _ = finished
  config = small_config(workdir)
  net = hk.transform(models.mlp_fn(20, config.student.hidden))
  template = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))
  params = {method: checkpoint.load_pytree(workdir / "models" / f"student_{method}", template)
            for method in distill.METHODS}
  images = data.load_dataset("digits").test.images
  logits = {method: np.asarray(net.apply(p, None, images)) for method, p in params.items()}
  for method in ("soft_targets", "subclass"):
    assert np.abs(logits[method] - logits["alone"]).max() > 1e-2, method
  assert np.abs(logits["soft_targets"] - logits["subclass"]).max() > 1e-2


def test_a_rerun_reuses_every_finished_run(finished):
  workdir, results, _ = finished
  lines = []
  again = distill.run_distill(small_config(workdir), log=lines.append)
  assert json.loads(json.dumps(again["runs"])) == json.loads(json.dumps(results["runs"]))
  assert not any(" epoch " in line for line in lines)


def test_finished_runs_of_other_settings_are_refused_then_overwritten(finished, tmp_path):
  workdir, _, _ = finished
  other = tmp_path / "copy"
  for entry in ("runs", "models"):
    shutil.copytree(workdir / entry, other / entry)
  config = small_config(other, **{"student.distillation.temperature": 2.0,
                                  "student.epochs": 1})
  with pytest.raises(config_lib.ConfigError, match=r"holds 3 finished run\(s\) trained with other "
                     r"settings \(e.g. student_alone: student.distillation.temperature, "
                     r"student.epochs\)"):
    distill.run_distill(config, log=lambda _: None)
  config.overwrite = True
  lines = []
  results = distill.run_distill(config, log=lines.append)
  assert any("reusing the trained teacher" in line for line in lines)
  assert all(results["runs"][f"student_{m}"]["epochs"] == 1 for m in distill.METHODS)


@pytest.mark.parametrize("field, value, pattern", [
    ("model.subclasses", 0, r"model\.subclasses=0 .*>= 1"),
    ("student.hidden", (), r"student\.hidden=\(\) .*positive integers"),
    ("student.distillation.weight", 0.0, r"student\.distillation\.weight=0\.0 .*\(0, 1\]"),
    ("teacher.diversity.temperature", 0.0, r"teacher\.diversity\.temperature=0\.0 .*> 0"),
    ("teacher.diversity.weight", -1.0, r"teacher\.diversity\.weight=-1\.0 .*>= 0"),
    ("student.schedule", "linear", r"student\.schedule='linear' .*constant, cosine"),
    ("model.name", "cnn", r"model\.name='cnn' .*no features of the 8×8 images of digits"),
    ("student.batch_size", 10**6, r"student\.batch_size=1000000 .*larger than the 1293"),
])
def test_a_bad_field_is_one_line_and_nothing_is_written(tmp_path, field, value, pattern):
  config = small_config(tmp_path / "w", **{field: value})
  with pytest.raises(config_lib.ConfigError, match=pattern) as error:
    distill.run_distill(config, log=lambda _: None)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists()


def test_cli_bad_field_exits_2_with_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.distill", "--config=configs/fashion_mnist_subclass.py",
       "--config.model.subclasses=0", f"--config.workdir={tmp_path / 'w'}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines() == [
      "error: config field model.subclasses=0 is invalid: must be an integer >= 1"]


def test_dropout_acts_in_training_only():
  """A new dropout mask every step with the training apply; none without a key (evaluation)."""
  def forward(images):  # as `models.cnn_fn` drops
    key = hk.maybe_next_rng_key()
    return images if key is None else hk.dropout(key, 0.5, images)
  net = hk.transform(forward)
  images = jnp.ones((4, 64))
  apply = distill._dropout_apply(net)
  first, key = apply({}, jax.random.PRNGKey(1), images)
  second, _ = apply({}, key, images)
  assert set(np.unique(first)) == {0.0, 2.0} and np.any(first != second)
  np.testing.assert_array_equal(net.apply({}, None, images), images)


def test_the_default_cnn_teacher_trains_end_to_end(tmp_path, monkeypatch):
  """The default config (notebook 003's CNN teacher, with dropout, one step per call on a
  CPU), shrunk, on digits padded to 12×12 (the smallest size its convs and pools take)."""
  load = data.load_dataset

  def padded_digits(*args, **kwargs):
    dataset = load("digits", **kwargs)
    pad = lambda split: split._replace(images=np.pad(split.images, ((0, 0), (2, 2), (2, 2), (0, 0))))
    return dataset._replace(train=pad(dataset.train), val=pad(dataset.val), test=pad(dataset.test))
  monkeypatch.setattr(distill.data, "load_dataset", padded_digits)
  config = fashion_mnist_subclass.get_config()
  config.workdir = str(tmp_path / "w")
  config.model.channels, config.model.dense = (4, 8), 16
  config.teacher.epochs = config.student.epochs = 1
  config.teacher.batch_size = config.student.batch_size = 128
  config.student.hidden = (16,)
  results = distill.run_distill(config, log=lambda _: None)
  assert list(results["runs"]) == list(distill.RUNS)
  for record in results["runs"].values():
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["epochs"] == 1
  assert results["runs"]["teacher"]["params"] == (9 * 4 + 4) + (9 * 4 * 8 + 8) + (8 * 16 + 16) + (16 * 20 + 20)
