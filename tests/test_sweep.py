"""End-to-end tests of lrnet/sweep.py and the experiments entry points on the digits data."""

import csv
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import digits
from lrnet import config as config_lib
from lrnet import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_FIELDS = {"rank", "params", "compression", "truncated_accuracy", "straight_through_accuracy",
                 "factorized_accuracy", "latency_dense_ms", "latency_factorized_ms"}


def small_config(workdir, **overrides):
  config = digits.get_config()
  config.workdir = str(workdir)
  config.model.hidden = (64, 64)
  config.teacher.epochs = 4
  config.student.epochs = 2
  config.sweep.ranks = (2, "full")
  config.latency.repeats = 2
  for field, value in overrides.items():
    node = config
    *path, last = field.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  lines = []
  results = sweep.run_sweep(small_config(workdir), log=lines.append)
  return workdir, results, lines


def test_sweep_writes_results_files_with_the_schema(finished_sweep):
  workdir, results, lines = finished_sweep
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["dataset"] == "digits"
  assert on_disk["config"]["model"]["hidden"] == [64, 64]
  teacher = on_disk["teacher"]
  assert set(teacher) == {"test_accuracy", "val_accuracy", "params", "epochs", "seconds"}
  assert teacher["params"] == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
  assert 0.8 < teacher["test_accuracy"] <= 1.0 and teacher["epochs"] == 4
  assert [entry["rank"] for entry in on_disk["ranks"]] == [2, "full"]
  low, full = on_disk["ranks"]
  for entry in on_disk["ranks"]:
    assert RESULT_FIELDS <= set(entry) and "error" not in entry
    for key in ("truncated_accuracy", "straight_through_accuracy", "factorized_accuracy"):
      assert 0.0 <= entry[key] <= 1.0
    assert entry["latency_dense_ms"] > 0 and entry["latency_factorized_ms"] > 0
  assert low["params"] == 2 * (64 + 64) + 64 + 2 * (64 + 64) + 64 + 650
  assert low["compression"] == pytest.approx(teacher["params"] / low["params"])
  # Full rank truncation is the teacher itself.
  assert full["truncated_accuracy"] == pytest.approx(teacher["test_accuracy"])
  # Training wins back accuracy lost to a rank-2 truncation.
  assert low["straight_through_accuracy"] > low["truncated_accuracy"]
  assert low["factorized_accuracy"] > low["truncated_accuracy"]
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [row["rank"] for row in rows] == ["2", "full"]
  for name in ("accuracy_vs_params.png", "latency_vs_rank.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  metrics = (workdir / "metrics" / "teacher.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in metrics] == [1, 2, 3, 4]
  assert list((workdir / "tensorboard" / "teacher").iterdir())
  assert any("rank" in line and "truncated" in line for line in lines)
  assert "teacher test accuracy" in lines[-1].splitlines()[0]


def test_rerun_reuses_finished_work_and_gives_same_results(finished_sweep):
  workdir, results, _ = finished_sweep
  lines = []
  again = sweep.run_sweep(small_config(workdir), log=lines.append)
  assert not any(" epoch " in line for line in lines), "finished runs must not train again"
  assert any("reusing the trained teacher" in line for line in lines)
  strip = lambda r: [{k: v for k, v in e.items() if "latency" not in k} for e in r["ranks"]]
  assert strip(again) == strip(results)
  assert again["teacher"] == results["teacher"]


def test_workdir_of_another_config_is_refused(finished_sweep):
  workdir, _, _ = finished_sweep
  with pytest.raises(config_lib.ConfigError, match=r"different config .*teacher\.epochs.*overwrite"):
    sweep.run_sweep(small_config(workdir, **{"teacher.epochs": 5}), log=lambda _: None)


@pytest.mark.parametrize("field, value, pattern", [
    ("data.name", "cifar", r"data\.name='cifar' .*allowed: mnist, fashion_mnist, digits"),
    ("sweep.ranks", (0,), r"sweep\.ranks=0 .*1\.\.64"),
    ("sweep.ranks", (65,), r"sweep\.ranks=65 .*1\.\.64"),
    ("sweep.ranks", (1.5,), r"sweep\.ranks=1\.5 .*\(0, 1\]"),
    ("sweep.ranks", (), r"sweep\.ranks=\(\) .*non-empty"),
    ("sweep.ranks", ("half",), r"sweep\.ranks='half'"),
    ("teacher.epochs", 0, r"teacher\.epochs=0 .*>= 1"),
    ("student.batch_size", -3, r"student\.batch_size=-3 .*>= 1"),
    ("teacher.learning_rate", 0.0, r"teacher\.learning_rate=0\.0 .*> 0"),
    ("data.val_fraction", 1.0, r"data\.val_fraction=1\.0 .*\(0, 1\)"),
    ("projection.method", "svd", r"projection\.method='svd' .*exact, subspace, streaming, alternating"),
    ("model.hidden", (), r"model\.hidden"),
    ("sweep.kinds", ("distilled",), r"sweep\.kinds=\('distilled',\) .*straight_through"),
    ("projection.update_every", 0, r"projection\.update_every=0 .*>= 1"),
    ("checkpoint_every_secs", -1.0, r"checkpoint_every_secs=-1\.0 .*>= 0"),
])
def test_validation_errors_name_field_value_and_allowed(tmp_path, field, value, pattern):
  config = small_config(tmp_path / "w", **{field: value})
  with pytest.raises(config_lib.ConfigError, match=pattern) as error:
    sweep.run_sweep(config, log=lambda _: None)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists(), "nothing may be written before validation passes"


def test_update_every_is_refused_for_a_projection_that_refines_every_step(tmp_path):
  config = small_config(tmp_path / "w", **{"projection.method": "alternating",
                                           "projection.update_every": 2})
  with pytest.raises(config_lib.ConfigError,
                     match=r"projection\.update_every=2 .*must be 1 with "
                           r"projection\.method='alternating'"):
    sweep.run_sweep(config, log=lambda _: None)
  assert not (tmp_path / "w").exists()


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_cli_user_errors_are_one_line_with_nonzero_exit(tmp_path):
  bad_rank = _cli("--config=configs/digits.py", f"--config.workdir={tmp_path}",
                  "--config.sweep.ranks=(0,)")
  assert bad_rank.returncode == 2
  assert bad_rank.stderr.strip().splitlines()[-1].startswith("error: config field sweep.ranks=0")
  assert "Traceback" not in bad_rank.stderr
  missing = _cli("--config=configs/nope.py")
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert "nope.py" in missing.stderr


def test_cli_runs_a_tiny_sweep(tmp_path):
  result = _cli("--config=configs/digits.py", f"--config.workdir={tmp_path}",
                "--config.model.hidden=(32,)", "--config.teacher.epochs=2",
                "--config.student.epochs=1", "--config.sweep.ranks=(4,)",
                "--config.latency.repeats=2")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "truncated" in result.stdout and "rank" in result.stdout
  assert json.loads((tmp_path / "results.json").read_text())["ranks"][0]["rank"] == 4


def test_non_finite_student_is_recorded_and_the_sweep_goes_on(tmp_path):
  config = small_config(tmp_path, **{"student.learning_rate": 1e30, "sweep.ranks": (2, 4)})
  results = sweep.run_sweep(config, log=lambda _: None)
  assert [entry["rank"] for entry in results["ranks"]] == [2, 4]
  for entry in results["ranks"]:
    assert "non-finite" in entry["error"] and "step" in entry["error"]
    assert entry["truncated_accuracy"] is not None


def test_train_entry_point_saves_a_teacher_the_sweep_reuses(tmp_path):
  args = ["--config=configs/digits.py", f"--config.workdir={tmp_path}", "--config.model.hidden=(16,)",
          "--config.teacher.epochs=1", "--config.student.epochs=1", "--config.sweep.ranks=(2,)",
          "--config.latency.repeats=2"]
  trained = subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
  assert trained.returncode == 0, trained.stderr[-2000:]
  assert (tmp_path / "runs" / "teacher.json").exists() and (tmp_path / "models" / "teacher").is_dir()
  assert not (tmp_path / "results.json").exists()
  lines = []
  config = small_config(tmp_path, **{"model.hidden": (16,), "teacher.epochs": 1, "student.epochs": 1,
                                     "sweep.ranks": (2,)})
  sweep.run_sweep(config, log=lines.append)
  assert any("reusing the trained teacher" in line for line in lines)


def _reproducible(results):
  """Everything in results.json but timings (latencies, seconds), which differ run to run."""
  return {"teacher": {k: v for k, v in results["teacher"].items() if k != "seconds"},
          "ranks": [{k: v for k, v in entry.items() if "latency" not in k}
                    for entry in results["ranks"]]}


def test_same_config_and_seed_give_identical_results(finished_sweep, tmp_path):
  _, results, _ = finished_sweep
  again = sweep.run_sweep(small_config(tmp_path), log=lambda _: None)
  assert _reproducible(again) == _reproducible(json.loads(json.dumps(results)))


def test_sigkill_at_a_random_point_then_rerun_gives_the_uninterrupted_results(finished_sweep,
                                                                              tmp_path):
  _, results, _ = finished_sweep
  args = ["-m", "experiments.sweep", "--config=configs/digits.py", f"--config.workdir={tmp_path}",
          "--config.model.hidden=(64,64)", "--config.teacher.epochs=4",
          "--config.student.epochs=2", "--config.sweep.ranks=(2,'full')",
          "--config.latency.repeats=2", "--config.checkpoint_every_secs=0"]
  process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  # Wait until training has started, then kill at a random moment of the rest of the sweep.
  teacher_metrics = tmp_path / "metrics" / "teacher.jsonl"
  deadline = time.monotonic() + 240
  while not teacher_metrics.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  delay = random.uniform(0.0, 8.0)
  time.sleep(delay)
  process.send_signal(signal.SIGKILL)
  output, _ = process.communicate(timeout=60)
  killed = process.returncode == -signal.SIGKILL
  resumed = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert _reproducible(on_disk) == _reproducible(json.loads(json.dumps(results))), (
      f"killed after {delay:.2f} s (killed={killed}); first run's output:\n{output[-2000:]}")
  with open(tmp_path / "results.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == len(results["ranks"])


def test_factorized_batches_bound_the_padding_on_cpu_and_batch_everything_on_accelerators(
    monkeypatch):
  config = digits.get_config()
  config.sweep.parallel_ranks = False
  assert sweep.factorized_batches(config, [8, 4]) == [[8], [4]]
  config.sweep.parallel_ranks = True
  monkeypatch.setattr(sweep.jax, "default_backend", lambda: "cpu")
  # Reference ranks: padding any two together costs ≥ 1.3×, so each trains at its own rank.
  assert sweep.factorized_batches(config, [10, 20, 50, 100, 200]) == [[10], [20], [50], [100],
                                                                      [200]]
  batches = sweep.factorized_batches(config, [110, 4, 100, 105, 5, 300])
  assert batches == [[4], [5], [100, 105, 110], [300]]
  for batch in batches:
    assert len(batch) * max(batch) <= sweep.CPU_PADDING_BUDGET * sum(batch)
  monkeypatch.setattr(sweep.jax, "default_backend", lambda: "gpu")
  assert sweep.factorized_batches(config, [4, 8, 16]) == [[4, 8, 16]]
  assert sweep.factorized_batches(config, []) == []


# Runs in a fresh interpreter: XLA_FLAGS must be set before JAX starts. Prints, as JSON, the
# straight-through records and parameters of a sweep trained one by one through the shared
# program, then of the same sweep with the accelerator path forced: one batched program, its
# members member by member (lax.map), then side by side (vmap, as on an accelerator).
_SIDE_BY_SIDE_SCRIPT = r"""
import json, os, sys
import jax, jax.numpy as jnp, numpy as np
from configs import digits
from lrnet import checkpoint, models, rank_batch, sweep

def config(workdir):
  c = digits.get_config()
  c.workdir = workdir
  c.model.hidden = (64, 64)
  c.teacher.epochs, c.student.epochs = 4, 2
  c.sweep.ranks, c.sweep.kinds = (4, 8), ("straight_through",)
  c.latency.repeats = 2
  return c

out = {}
batch_epoch = rank_batch.batch_epoch
for name in ("one_by_one", "member_by_member", "side_by_side"):
  sweep.side_by_side = lambda c: bool(c.sweep.parallel_ranks)  # the accelerator choice ...
  if name == "one_by_one":
    sweep.side_by_side = lambda c: False                      # ... and the CPU's
  rank_batch.batch_epoch = lambda fn, vectorize=False, name=name: batch_epoch(
      fn, vectorize=vectorize and name == "side_by_side")
  workdir = os.path.join(sys.argv[1], name)
  results = sweep.run_sweep(config(workdir), log=lambda _: None)
  teacher = models.mlp((64, 64), 10).init(jax.random.PRNGKey(0), jnp.zeros((1, 64)))
  out[name] = {"accuracy": [r["straight_through_accuracy"] for r in results["ranks"]],
               "runs": [json.load(open(os.path.join(workdir, "runs", f"rank_{r}_straight_through.json")))
                        for r in (4, 8)],
               "params": [jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), checkpoint.load_pytree(
                   os.path.join(workdir, "models", f"rank_{r}_straight_through"), teacher))
                          for r in (4, 8)]}
print(json.dumps(out))
"""


def test_straight_through_students_side_by_side_train_like_one_by_one(tmp_path):
  """`sweep.parallel_ranks` on an accelerator trains the straight-through students of integer
  ranks in one batched program, side by side (vmap). Forced here on the CPU (with Eigen
  single-threaded: its thread pool wedges on that program, BUILD_NOTES.md): run member by member
  the batch reproduces the one-by-one training exactly, so the batching itself (members, ranks,
  states, seeds, best epochs) is right; run side by side it differs only by rounding."""
  environment = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  process = subprocess.run([sys.executable, "-c", _SIDE_BY_SIDE_SCRIPT, str(tmp_path)], cwd=ROOT,
                           env=environment, capture_output=True, text=True, timeout=400)
  assert process.returncode == 0, process.stderr[-3000:]
  out = json.loads(process.stdout.strip().splitlines()[-1])
  apart, mapped, together = out["one_by_one"], out["member_by_member"], out["side_by_side"]
  assert all("trained_with_ranks" not in run for run in apart["runs"])
  for batched in (mapped, together):
    assert [run["trained_with_ranks"] for run in batched["runs"]] == [[4, 8], [4, 8]]
  assert mapped["params"] == apart["params"]
  assert mapped["accuracy"] == apart["accuracy"]
  assert ([(run["epochs"], run["best_epoch"], run["val_accuracy"]) for run in mapped["runs"]]
          == [(run["epochs"], run["best_epoch"], run["val_accuracy"]) for run in apart["runs"]])
  # Side by side, products round differently in the last bits and Adam (steps of ≈ the
  # learning rate where second moments are tiny) carries that into the weights; the students
  # still land within a few test images (1/359 each) of the one-by-one ones.
  np.testing.assert_allclose(together["accuracy"], apart["accuracy"], atol=4 / 359)
