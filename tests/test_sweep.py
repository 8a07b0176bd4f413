"""End-to-end tests of lrnet/sweep.py and the experiments entry points on the digits data."""

import csv
import json
import os
import pathlib
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from configs import cifar10
from configs import cifar10_resmlp
from configs import digits
from configs import fashion_mnist_convnet
from configs import fashion_mnist_resnet
from lrnet import config as config_lib
from lrnet import data
from lrnet import plots
from lrnet import sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULT_FIELDS = {"rank", "params", "compression", "truncated_accuracy", "straight_through_accuracy",
                 "factorized_accuracy", "dense_control_params", "dense_control_accuracy",
                 "latency_factorized_ms", "theoretical_latency_ratio"}


def small_config(workdir, **overrides):
  config = digits.get_config()
  config.workdir = str(workdir)
  config.model.hidden = (64, 64)
  config.teacher.epochs = 4
  config.student.epochs = 2
  config.sweep.ranks = (2, "full")
  config.latency.repeats = 2
  config.update_from_flattened_dict(overrides)
  return config


def copy_teacher(source, workdir):
  """Puts the trained teacher of sweep workdir `source` into `workdir`, which then reuses it."""
  os.makedirs(os.path.join(workdir, "runs"))
  shutil.copy(os.path.join(source, "runs", "teacher.json"), os.path.join(workdir, "runs"))
  shutil.copytree(os.path.join(source, "models", "teacher"),
                  os.path.join(workdir, "models", "teacher"))


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
  assert set(teacher) == {"test_accuracy", "test_accuracy_se", "test_loss", "val_accuracy",
                          "params", "epochs", "steps", "examples", "train_flops", "seconds",
                          "latency_ms"}
  assert teacher["test_accuracy_se"] == pytest.approx(
      np.sqrt(teacher["test_accuracy"] * (1 - teacher["test_accuracy"]) / 359))
  assert on_disk["layers"] == [{"name": "linear_0", "shape": [64, 64]},
                               {"name": "linear_1", "shape": [64, 64]}]
  assert teacher["params"] == 64 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
  assert 0.8 < teacher["test_accuracy"] <= 1.0 and teacher["epochs"] == 4
  assert [entry["rank"] for entry in on_disk["ranks"]] == [2, "full"]
  low, full = on_disk["ranks"]
  for entry in on_disk["ranks"]:
    assert RESULT_FIELDS <= set(entry) and "error" not in entry
    for key in ("truncated_accuracy", "straight_through_accuracy", "factorized_accuracy",
                "dense_control_accuracy"):
      assert 0.0 <= entry[key] <= 1.0
    assert entry["latency_factorized_ms"] > 0
    # The dense control: the teacher's depth, at most the factorized student's size.
    assert entry["dense_control_params"] <= entry["params"]
  width = 14  # the largest w with 64·w + w + w·w + w + 10·w + 10 ≤ the rank-2 student's 1,290
  assert low["dense_control_params"] == 64 * width + width + width * width + width + width * 10 + 10
  assert full["dense_control_params"] == teacher["params"]
  assert low["params"] == 2 * (64 + 64) + 64 + 2 * (64 + 64) + 64 + 650
  # Matmul FLOPs of the factorized network over the dense one (the output layer alike in both).
  assert low["theoretical_latency_ratio"] == pytest.approx(
      (2 * 2 * (64 + 64) + 64 * 10) / (2 * 64 * 64 + 64 * 10))
  assert low["compression"] == pytest.approx(teacher["params"] / low["params"])
  # Full rank truncation is the teacher itself.
  assert full["truncated_accuracy"] == pytest.approx(teacher["test_accuracy"])
  # Training wins back accuracy lost to a rank-2 truncation.
  assert low["straight_through_accuracy"] > low["truncated_accuracy"]
  assert low["factorized_accuracy"] > low["truncated_accuracy"]
  with open(workdir / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [row["rank"] for row in rows] == ["teacher", "2", "full"]
  assert float(rows[0]["latency_ms"]) == teacher["latency_ms"]  # the dense network's
  assert float(rows[0]["test_accuracy"]) == teacher["test_accuracy"]
  spectrum = json.loads((workdir / "teacher_spectrum.json").read_text())
  assert set(spectrum) == {"linear_0", "linear_1"}
  assert spectrum["linear_0"]["shape"] == [64, 64] and 1 <= spectrum["linear_0"]["energy_rank_90"] <= 64
  for name in ("accuracy_vs_params.png", "accuracy_vs_cost.png", "latency_vs_rank.png",
               "teacher_spectrum.png"):
    assert (workdir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The cost figure of this sweep: every trained kind at its runs' estimated training FLOPs.
  marks = plots.cost_marks(on_disk)
  for kind in ("straight_through", "factorized", "dense_control"):
    assert marks[f"{kind}_accuracy"].x == sorted(
        entry[f"{kind}_cost"]["train_flops"] for entry in on_disk["ranks"]), kind
    assert all(flops > 0 for flops in marks[f"{kind}_accuracy"].x)
  metrics = (workdir / "metrics" / "teacher.jsonl").read_text().splitlines()
  assert [json.loads(line)["epoch"] for line in metrics] == [1, 2, 3, 4]
  assert list((workdir / "tensorboard" / "teacher").iterdir())
  assert any("rank" in line and "truncated" in line for line in lines)
  assert lines[2] == ("plan: 7 runs: the teacher, then straight_through, factorized, "
                      "dense_control at ranks 2, full; none finished before")
  assert re.fullmatch(r"\[1/7 teacher\] epoch   1  .*; sweep ≈ \d+ (s|min) left\)", lines[3])
  assert _trained(lines) == {"teacher", "rank 2 straight_through", "rank full straight_through",
                             "rank 2 factorized", "rank full factorized", "rank 2 dense_control",
                             "rank full dense_control"}
  table = lines[-1].splitlines()
  assert "teacher test accuracy" in table[0] and "straight-" in table[1]
  assert table[-1].startswith(f"results: {workdir / 'results.json'}, and in that directory ")
  named = table[-1].split("directory ")[1].split(", ")
  assert sorted(named) == sorted(path.name + "/" * path.is_dir() for path in workdir.iterdir()
                                 if path.name not in ("results.json", "checkpoints"))


def test_the_plots_draw_what_the_sweep_writes(finished_sweep):
  """The latency plot's theory line is theoretical_latency_ratio × the dense latency, as the sweep
  writes them, and the dense network is one number."""
  workdir, _, _ = finished_sweep
  results = json.loads((workdir / "results.json").read_text())
  series = plots.latency_series(results)
  assert series.dense_ms == results["teacher"]["latency_ms"]
  low = results["ranks"][0]
  ranks, theory = series.theory
  assert list(ranks) == [2]
  assert theory[0] == pytest.approx(low["theoretical_latency_ratio"] * results["teacher"]["latency_ms"])
  assert [list(points) for points in series.factorized] == [[2], [low["latency_factorized_ms"]]]


def _trained(lines) -> set:
  """The runs whose epochs `lines` log, as the plan names them ('rank 4 factorized')."""
  return {re.match(r"\[\d+/\d+ (.*?)\] epoch ", line)[1] for line in lines
          if re.match(r"\[\d+/\d+ .*?\] epoch +\d+  loss", line)}


def _reused(lines) -> list:
  """The finished runs the plan line reuses."""
  (plan,) = [line for line in lines if line.startswith("plan: ")]
  return plan.split("finished: ")[1].split(", ") if "finished: " in plan else []


def test_a_rerun_that_trains_nothing_rewrites_every_file_byte_for_byte(finished_sweep, tmp_path,
                                                                      monkeypatch):
  workdir, _, _ = finished_sweep
  files = ("results.json", "results.csv", "accuracy_vs_params.png", "accuracy_vs_cost.png",
           "latency_vs_rank.png", "teacher_spectrum.json", "teacher_spectrum.png", "config.json")
  before = {name: (workdir / name).read_bytes() for name in files}
  lines = []
  sweep.run_sweep(small_config(workdir), log=lines.append)
  assert not _trained(lines), "finished runs must not train again"
  assert _reused(lines) == ["teacher", "rank 2 straight_through", "rank full straight_through",
                            "rank 2 factorized", "rank full factorized", "rank 2 dense_control",
                            "rank full dense_control"]
  assert not any("reusing the trained" in line for line in lines)  # listed once, by the plan
  assert {name: (workdir / name).read_bytes() for name in files} == before
  # Asked to, a rerun measures the latencies again (here in a copy of the workdir).
  shutil.copytree(workdir, tmp_path / "copy")
  monkeypatch.setattr(sweep.train, "measure_latency", lambda *args, **kwargs: 123.0)
  again = sweep.run_sweep(small_config(tmp_path / "copy", **{"latency.remeasure": True}),
                          log=lambda _: None)
  assert again["teacher"]["latency_ms"] == 123.0
  assert [entry["latency_factorized_ms"] for entry in again["ranks"]] == [123.0, 123.0]
  assert json.loads(json.dumps(again["config"])) == json.loads(before["results.json"])["config"]


def test_finished_runs_of_other_settings_are_refused(finished_sweep):
  workdir, _, _ = finished_sweep
  with pytest.raises(config_lib.ConfigError,
                     match=r"finished run\(s\) trained with other settings .*teacher\.epochs.*overwrite"):
    sweep.run_sweep(small_config(workdir, **{"teacher.epochs": 5}), log=lambda _: None)


def test_new_ranks_and_kinds_reuse_the_teacher_and_the_finished_runs(tmp_path):
  lines = []
  config = small_config(tmp_path, **{"sweep.ranks": (2,), "sweep.kinds": ("factorized",)})
  first = sweep.run_sweep(config, log=lines.append)
  lines.clear()
  config = small_config(tmp_path, **{"sweep.ranks": (2, 4),
                                     "sweep.kinds": ("factorized", "straight_through")})
  second = sweep.run_sweep(config, log=lines.append)
  assert _trained(lines) == {"rank 4 factorized", "rank 2 straight_through",
                             "rank 4 straight_through"}
  assert _reused(lines) == ["teacher", "rank 2 factorized"]
  assert second["ranks"][0]["factorized_accuracy"] == first["ranks"][0]["factorized_accuracy"]
  # Other student settings: refused, then with overwrite only the students train again.
  changed = small_config(tmp_path, **{"sweep.ranks": (2,), "sweep.kinds": ("factorized",),
                                      "student.learning_rate": 3e-3})
  with pytest.raises(config_lib.ConfigError, match=r"rank_2_factorized: student\.learning_rate"):
    sweep.run_sweep(changed, log=lambda _: None)
  lines.clear()
  changed.overwrite = True
  sweep.run_sweep(changed, log=lines.append)
  assert _reused(lines) == ["teacher"] and _trained(lines) == {"rank 2 factorized"}


def test_a_failed_start_writes_nothing_and_the_corrected_command_runs(tmp_path):
  workdir = tmp_path / "w"
  config = small_config(workdir, **{"data.name": "mnist", "data.dir": str(tmp_path / "empty")})
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError):
    sweep.run_sweep(config, log=lambda _: None)
  assert not workdir.exists(), "nothing may be written before the data are known good"
  results = sweep.run_sweep(small_config(workdir, **{"sweep.ranks": (2,), "sweep.kinds": ()}),
                            log=lambda _: None)
  assert results["ranks"][0]["truncated_accuracy"] is not None


@pytest.mark.parametrize("field, value, pattern", [
    ("data.name", "cifar", r"data\.name='cifar' .*allowed: mnist, fashion_mnist, digits"),
    ("sweep.ranks", (0,), r"sweep\.ranks=0 .*>= 1"),
    ("sweep.ranks", (65,), r"sweep\.ranks=65 .*1\.\.64"),
    ("sweep.ranks", (1.5,), r"sweep\.ranks=1\.5 .*\(0, 1\]"),
    ("sweep.ranks", (), r"sweep\.ranks=\(\) .*non-empty"),
    ("sweep.ranks", ("half",), r"sweep\.ranks='half'"),
    ("teacher.epochs", 0, r"teacher\.epochs=0 .*>= 1"),
    ("student.batch_size", -3, r"student\.batch_size=-3 .*>= 1"),
    ("teacher.learning_rate", 0.0, r"teacher\.learning_rate=0\.0 .*> 0"),
    ("data.val_fraction", 1.0, r"data\.val_fraction=1\.0 .*\(0, 1\)"),
    ("projection.method", "svd", r"projection\.method='svd' .*exact, alternating"),
    ("model.hidden", (), r"model\.hidden"),
    ("sweep.kinds", ("distilled",), r"sweep\.kinds=\('distilled',\) .*straight_through"),
    ("checkpoint_every_secs", -1.0, r"checkpoint_every_secs=-1\.0 .*>= 0"),
    ("teacher.batch_size", 10**6, r"teacher\.batch_size=1000000 .*larger than the 1293 training"),
    ("teacher.schedule", "linear", r"teacher\.schedule='linear' .*constant, cosine"),
    ("student.label_smoothing", 1.0, r"student\.label_smoothing=1\.0 .*\[0, 1\)"),
    ("teacher.shift", -1, r"teacher\.shift=-1 .*>= 0"),
    ("student.distillation.weight", 1.5, r"student\.distillation\.weight=1\.5 .*\[0, 1\]"),
    ("student.distillation.temperature", 0.0, r"temperature=0\.0 .*> 0"),
    ("sweep.budgets", (1.5,), r"sweep\.budgets=\(1\.5,\) .*fractions in \(0, 1\)"),
    ("truncation", "qr", r"truncation='qr' .*svd, whitened"),
    ("allocation.criterion", "random", r"allocation\.criterion='random' .*greedy, energy"),
    ("mesh.data", 0, r"mesh\.data=0 .*>= 1, or -1"),
    ("mesh.members", 2, r"mesh=.*'members': 2.* is invalid: it needs 2 devices, there are 1"),
])
def test_validation_errors_name_field_value_and_allowed(tmp_path, field, value, pattern):
  config = small_config(tmp_path / "w", **{field: value})
  with pytest.raises(config_lib.ConfigError, match=pattern) as error:
    sweep.run_sweep(config, log=lambda _: None)
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w").exists(), "nothing may be written before validation passes"


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


def test_a_user_network_named_module_function_is_swept_from_the_command_line(tmp_path):
  """As the README shows: a config file whose `model` group names the function and its fields."""
  (tmp_path / "my_config.py").write_text(
      "import ml_collections\n"
      "from configs import digits\n\n"
      "def get_config():\n"
      "  config = digits.get_config()\n"
      "  config.model = ml_collections.ConfigDict({'name': 'tests.user_networks:small_mlp', 'width': 24})\n"
      "  config.sweep.kinds = ('straight_through', 'factorized')\n"
      "  return config\n")
  result = _cli(f"--config={tmp_path / 'my_config.py'}", f"--config.workdir={tmp_path / 'w'}",
                "--config.teacher.epochs=12", "--config.student.epochs=1", "--config.sweep.ranks=(4,)",
                "--config.latency.repeats=2")
  assert result.returncode == 0, result.stderr[-2000:]
  tmp_path = tmp_path / "w"
  results = json.loads((tmp_path / "results.json").read_text())
  assert [layer["name"] for layer in results["layers"]] == ["linear_0"]  # 64 → 24 (the output: dense)
  (entry,) = results["ranks"]
  assert "error" not in entry and entry["params"] == 64 * 4 + 4 * 24 + 24 + 24 * 10 + 10
  assert results["teacher"]["test_accuracy"] > 0.6
  for kind in ("truncated", "straight_through", "factorized"):
    assert 0.0 <= entry[f"{kind}_accuracy"] <= 1.0


def test_a_user_network_with_batchnorm_and_dropout_is_swept(tmp_path):
  config = small_config(tmp_path, **{"sweep.ranks": (4,), "teacher.epochs": 2, "student.epochs": 1,
                                     "sweep.kinds": ("straight_through", "factorized")})
  config.model.name = "tests.user_networks:batchnorm_mlp"
  results = sweep.run_sweep(config, log=lambda _: None)
  (entry,) = results["ranks"]
  assert "error" not in entry
  for kind in ("truncated", "straight_through", "factorized"):
    assert 0.0 <= entry[f"{kind}_accuracy"] <= 1.0


def test_dense_controls_train_with_the_students_or_the_teachers_recipe_and_say_what_it_cost(
    tmp_path):
  config = small_config(tmp_path, **{"sweep.ranks": (2,), "student.batch_size": 16,
                                     "sweep.kinds": ("dense_control", "dense_control_long")})
  results = sweep.run_sweep(config, log=lambda line: None)
  (entry,) = results["ranks"]
  equal, long = entry["dense_control_cost"], entry["dense_control_long_cost"]
  assert equal["epochs"] == config.student.epochs and long["epochs"] == config.teacher.epochs
  for run, settings in ((equal, config.student), (long, config.teacher)):
    assert set(run) == {"steps", "epochs", "examples", "seconds", "train_flops"}
    assert run["steps"] * settings.batch_size == run["examples"]
    assert run["steps"] == run["epochs"] * (len(data.load_dataset("digits").train.labels)
                                            // settings.batch_size)
    assert run["seconds"] > 0
  # The same network: FLOPs per example are equal, so the longer run costs more in proportion.
  assert long["train_flops"] > equal["train_flops"] > 0
  assert long["train_flops"] / long["examples"] == pytest.approx(
      equal["train_flops"] / equal["examples"], rel=0.05)
  assert entry["dense_control_params"] == entry["dense_control_long_params"] <= entry["params"]
  teacher = results["teacher"]
  assert teacher["examples"] == teacher["steps"] * config.teacher.batch_size
  assert teacher["train_flops"] == pytest.approx(
      long["train_flops"] * teacher["params"] / entry["dense_control_params"], rel=0.2)


def test_seeds_repeat_students_and_controls_and_report_mean_sd_and_standard_error(tmp_path):
  kinds = ("factorized", "dense_control")
  config = small_config(tmp_path, **{"sweep.ranks": (2,), "sweep.kinds": kinds,
                                     "sweep.seeds": 2, "teacher.epochs": 2})
  lines = []
  results = sweep.run_sweep(config, log=lines.append)
  assert any(line.startswith("plan: 5 runs:") and "× 2 seeds" in line for line in lines)
  (entry,) = results["ranks"]
  n = results["test_labels"]
  assert n == len(data.load_dataset("digits").test.labels) == 359
  for kind in kinds:
    runs = [json.loads((tmp_path / "runs" / f"rank_2_{kind}{suffix}.json").read_text())
            for suffix in ("", "_seed1")]
    accuracies = [run["test_accuracy"] for run in runs]
    assert runs[0]["test_loss"] != runs[1]["test_loss"]  # other shuffles (and initialisation)
    assert entry[f"{kind}_accuracy"] == pytest.approx(np.mean(accuracies))
    assert entry[f"{kind}_accuracy_sd"] == pytest.approx(np.std(accuracies, ddof=1))
    assert entry[f"{kind}_loss"] == pytest.approx(np.mean([run["test_loss"] for run in runs]))
    p = entry[f"{kind}_accuracy"]
    assert entry[f"{kind}_accuracy_se"] == pytest.approx(np.sqrt(p * (1 - p) / n))
    assert entry[f"{kind}_seeds"] == 2
  assert entry["truncated_accuracy_se"] == pytest.approx(
      np.sqrt(entry["truncated_accuracy"] * (1 - entry["truncated_accuracy"]) / n))
  assert entry["truncated_accuracy_sd"] is None
  assert "±: the standard deviation over 2 seeds" in lines[-1]
  # One seed: the first seed's runs, reused as they are, with the standard error as ±.
  lines.clear()
  config.sweep.seeds = 1
  (single,) = sweep.run_sweep(config, log=lines.append)["ranks"]
  first = json.loads((tmp_path / "runs" / "rank_2_factorized.json").read_text())
  assert single["factorized_accuracy"] == first["test_accuracy"]
  assert single["factorized_accuracy_sd"] is None and single["factorized_seeds"] == 1
  assert "reusing 3 finished" in lines[2] and "binomial standard error" in lines[-1]


@pytest.mark.parametrize("args, pattern", [
    (["--config.model.name=tests.user_networks:smal_mlp"], "is missing"),
    (["--config.model.name=tests.user_networks:transformed_mlp"], "must return a Haiku forward"),
    (["--config.model.name=tests.user_networks:small_mlp"], "the dense controls need a network of"),
])
def test_bad_user_networks_exit_2_with_one_line(tmp_path, args, pattern):
  result = _cli("--config=configs/digits.py", f"--config.workdir={tmp_path / 'w'}", *args)
  assert result.returncode == 2 and "Traceback" not in result.stderr
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("error: config field ") and pattern in line
  assert not (tmp_path / "w").exists()


def test_non_finite_student_is_recorded_and_the_sweep_goes_on(tmp_path):
  config = small_config(tmp_path, **{"student.learning_rate": 1e30, "sweep.ranks": (2, 4),
                                     "sweep.kinds": ("straight_through", "factorized"),
                                     "teacher.epochs": 1})
  results = sweep.run_sweep(config, log=lambda _: None)
  assert [entry["rank"] for entry in results["ranks"]] == [2, 4]
  for entry in results["ranks"]:
    assert "non-finite" in entry["error"] and "step" in entry["error"]
    assert entry["truncated_accuracy"] is not None


def test_a_diverging_teacher_is_one_line_with_exit_status_2(tmp_path):
  result = _cli("--config=configs/digits.py", f"--config.workdir={tmp_path}",
                "--config.model.hidden=(16,)", "--config.teacher.epochs=2",
                "--config.teacher.learning_rate=1e30", "--config.sweep.ranks=(2,)")
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]
  assert result.stderr.startswith("error: the teacher diverged (teacher: non-finite")


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
                                     "sweep.ranks": (2,), "sweep.kinds": ()})
  sweep.run_sweep(config, log=lines.append)
  assert _reused(lines) == ["teacher"]


def _reproducible(results):
  """Everything in results.json but timings (latencies, seconds), which differ run to run."""
  return {"teacher": {k: v for k, v in results["teacher"].items()
                      if k not in ("seconds", "latency_ms")},
          "ranks": [{k: ({**v, "seconds": None} if k.endswith("_cost") else v)
                     for k, v in entry.items() if "latency" not in k}
                    for entry in results["ranks"]]}


def test_same_config_and_seed_give_identical_results(finished_sweep, tmp_path):
  _, results, _ = finished_sweep
  again = sweep.run_sweep(small_config(tmp_path), log=lambda _: None)
  assert _reproducible(again) == _reproducible(json.loads(json.dumps(results)))


@pytest.mark.parametrize("seed", [0])
def test_sigkill_at_a_seeded_moment_then_rerun_gives_the_uninterrupted_results(finished_sweep,
                                                                               tmp_path, seed):
  _, results, _ = finished_sweep
  args = ["-m", "experiments.sweep", "--config=configs/digits.py", f"--config.workdir={tmp_path}",
          "--config.model.hidden=(64,64)", "--config.teacher.epochs=4",
          "--config.student.epochs=2", "--config.sweep.ranks=(2,'full')",
          "--config.latency.repeats=2", "--config.checkpoint_every_secs=0"]
  process = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
  # Wait until training has started, then kill at a seeded moment of the rest of the sweep.
  teacher_metrics = tmp_path / "metrics" / "teacher.jsonl"
  deadline = time.monotonic() + 240
  while not teacher_metrics.exists() and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  delay = random.Random(seed).uniform(0.0, 3.0)
  time.sleep(delay)
  process.send_signal(signal.SIGKILL)
  output, _ = process.communicate(timeout=60)
  assert process.returncode == -signal.SIGKILL, "the sweep finished before the kill"
  assert "results: " not in output, "the sweep finished before the kill"
  resumed = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
  assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
  assert "truncated" in resumed.stdout and f"results: {tmp_path / 'results.json'}" in resumed.stdout
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert _reproducible(on_disk) == _reproducible(json.loads(json.dumps(results))), (
      f"killed after {delay:.2f} s; first run's output:\n{output[-2000:]}")
  with open(tmp_path / "results.csv", newline="") as f:
    assert len(list(csv.DictReader(f))) == 1 + len(results["ranks"])  # and the teacher's row


def test_sigint_after_a_students_epoch_saves_it_and_the_rerun_resumes_after_it(finished_sweep,
                                                                            tmp_path):
  """Driven in-process: the epoch line's log callback sends the signal, as Ctrl-C would."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  source, results, _ = finished_sweep
  copy_teacher(source, tmp_path)
  config = small_config(tmp_path, **{"sweep.ranks": (2,), "sweep.kinds": ("straight_through",)})
  lines = []

  def log(line):
    lines.append(line)
    if line.startswith("[2/2 rank 2 straight_through] epoch   1 "):
      os.kill(os.getpid(), signal.SIGINT)  # the default checkpoint interval (30 s) has not come

  with pytest.raises(KeyboardInterrupt, match=(
      r"^SIGINT during \[2/2 rank 2 straight_through\]: saved it after epoch 1 of 2 in "
      + re.escape(str(tmp_path / "checkpoints" / "rank_2_straight_through-")))):
    sweep.run_sweep(config, log=log)
  assert not (tmp_path / "runs" / "rank_2_straight_through.json").exists()
  lines.clear()
  resumed = sweep.run_sweep(config, log=lines.append)
  assert "[2/2 rank 2 straight_through] resuming after epoch 1" in lines
  epochs = [re.search(r"\] epoch +(\d+)  loss", line) for line in lines]
  assert [int(epoch[1]) for epoch in epochs if epoch] == [2]
  keys = [f"{kind}_{metric}" for kind in ("truncated", "whitened_truncated", "straight_through")
          for metric in ("accuracy", "loss")]
  assert ([resumed["ranks"][0][key] for key in keys]
          == [results["ranks"][0][key] for key in keys])  # as uninterrupted


def test_a_signal_waits_for_the_epoch_and_a_second_one_stops_at_once():
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signal handlers need the main thread")
  exp = types.SimpleNamespace(interrupted=[])
  previous = signal.getsignal(signal.SIGTERM)
  with sweep.deferred_interrupts(exp):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert exp.interrupted == ["SIGTERM"]
    with pytest.raises(KeyboardInterrupt, match="^SIGINT again: stopped at once"):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_a_silent_sweep_says_where_it_is_and_that_it_waits_for_the_epoch():
  lines = []
  exp = types.SimpleNamespace(interrupted=[], doing="[3/7 rank 2 factorized] epoch 2 of 5",
                              last_line=time.perf_counter(), log=lines.append)
  with sweep.heartbeat(exp, silent_secs=0.3):
    time.sleep(0.7)
    exp.interrupted.append("SIGINT")
    time.sleep(0.6)
  assert re.fullmatch(r"\[3/7 rank 2 factorized\] epoch 2 of 5 \(\d s without output\)", lines[0])
  assert any(line.startswith("SIGINT: stopping once [3/7 rank 2 factorized] epoch 2 of 5 is "
                             "trained and saved") for line in lines)


def _write_cifar_batches(directory, per_batch=30):
  """The standard python batches of CIFAR-10 (`cifar-10-batches-py`), with random images."""
  rng = np.random.default_rng(0)
  directory.mkdir()
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": [int(label) for label in np.arange(per_batch) % 10]}
    with open(directory / name, "wb") as f:
      pickle.dump(batch, f, protocol=2)
  return directory


@pytest.mark.parametrize("module, shrink", [
    (cifar10, {"model.dense": (16,), "model.channels": (4, 8), "sweep.ranks": (0.5,)}),
    (cifar10_resmlp, {"model.width": 48, "model.blocks": 1, "sweep.ranks": (4,),
                      "sweep.kinds": ("straight_through", "factorized")}),
    (fashion_mnist_convnet, {"model.channels": (4, 8), "model.dense": 16, "sweep.ranks": (0.25,),
                             "sweep.kinds": ("straight_through", "factorized")}),
    (fashion_mnist_resnet, {"model.widths": (4, 4, 8, 8), "sweep.ranks": (0.5,)}),
])
def test_the_conv_and_residual_configs_run_end_to_end(tmp_path, monkeypatch, module, shrink):
  """The CIFAR-10 configs on CIFAR-format files written here (their networks' widths shrunk),
  and the Fashion-MNIST CNN and ResNet (BatchNorm) configs on their first 300 examples: both
  student kinds (and the convnet's and ResNet's dense controls, whose conv layers shrink too),
  with conv layers among the compressed ones."""
  config = module.get_config()
  config.workdir = str(tmp_path / "work")
  if config.data.name == "cifar10":
    config.data.dir = str(_write_cifar_batches(tmp_path / "cifar-10-batches-py"))
  elif not pathlib.Path("/usr/share/datasets/fashion-mnist").is_dir():
    pytest.skip("/usr/share/datasets/fashion-mnist is missing: apt-get install dataset-fashion-mnist")
  config.teacher.epochs, config.student.epochs, config.latency.repeats = 1, 1, 2
  for field, value in shrink.items():
    group, name = field.split(".")
    config[group][name] = value
  if config.data.name == "fashion_mnist":
    monkeypatch.setattr(sweep.data, "load_dataset", _first_examples(sweep.data.load_dataset, 300))
  results = sweep.run_sweep(config, log=lambda _: None)
  assert [entry["rank"] for entry in results["ranks"]] == list(config.sweep.ranks)
  for entry in results["ranks"]:
    assert "error" not in entry
    for kind in ("truncated", "straight_through", "factorized"):
      assert 0.0 <= entry[f"{kind}_accuracy"] <= 1.0
    if "dense_control" in config.sweep.kinds:
      assert 0.0 <= entry["dense_control_accuracy"] <= 1.0
      assert entry["dense_control_params"] <= entry["params"]
  names = [layer["name"] for layer in results["layers"]]
  if module is fashion_mnist_resnet:
    assert "resnet18/~/block_group_0/~/block_0/~/conv_0" in names  # a stock network's path names
  elif module is not cifar10_resmlp:
    assert names[:2] == ["conv_0", "conv_1"]  # conv layers are compressed too


def _first_examples(load_dataset, count):
  def load(*args, **kwargs):
    dataset = load_dataset(*args, **kwargs)
    cut = lambda split: split._replace(images=split.images[:count], labels=split.labels[:count])
    return dataset._replace(train=cut(dataset.train), val=cut(dataset.val), test=cut(dataset.test))
  return load


def test_rank_batches_put_the_integer_ranks_of_a_kind_in_one_batch():
  config = digits.get_config()
  config.sweep.parallel_ranks = False
  assert sweep.rank_batches(config, [8, 4, "full"]) == [[8], [4], ["full"]]
  config.sweep.parallel_ranks = True
  assert sweep.rank_batches(config, [8, 0.5, 4, "full"]) == [[8, 4], [0.5], ["full"]]
  assert sweep.rank_batches(config, []) == []


# Runs in a fresh interpreter: XLA_FLAGS must be set before JAX starts. Prints, as JSON, the
# students' records of a sweep trained one by one, then of the same sweep with the integer
# ranks in one batch, member by member (lax.map, the CPU's choice) and side by side (vmap, as
# on an accelerator).
_SIDE_BY_SIDE_SCRIPT = r"""
import json, os, sys
from configs import digits
from lrnet import sweep
from tests.test_sweep import copy_teacher

out = {}
teacher = None
for name, parallel, vectorized in (("one_by_one", False, False), ("member_by_member", True, False),
                                   ("side_by_side", True, True)):
  sweep.side_by_side = lambda config, vectorized=vectorized: vectorized
  c = digits.get_config()
  c.workdir = os.path.join(sys.argv[1], name)
  c.model.hidden = (64, 64)
  c.teacher.epochs, c.student.epochs = 4, 1
  c.sweep.ranks, c.sweep.parallel_ranks = (4, 8), parallel
  c.sweep.kinds = ("straight_through", "factorized")
  c.latency.repeats = 2
  if teacher is not None:  # the same teacher for all three
    copy_teacher(teacher, c.workdir)
  results = sweep.run_sweep(c, log=lambda _: None)
  teacher = teacher or c.workdir
  out[name] = {kind: {"accuracy": [r[f"{kind}_accuracy"] for r in results["ranks"]],
                      "runs": [json.load(open(os.path.join(c.workdir, "runs", f"rank_{r}_{kind}.json")))
                               for r in (4, 8)]}
               for kind in ("straight_through", "factorized")}
print(json.dumps(out))
"""


def test_ranks_side_by_side_train_like_one_by_one(tmp_path):
  """`sweep.parallel_ranks` trains the integer ranks of a kind as one batch: member by member on
  a CPU, side by side (vmap) on an accelerator, forced here on the CPU with Eigen single-threaded
  (its thread pool wedges on the vmapped straight-through program, BUILD_NOTES.md). Each member
  computes what it would alone (factorized: zero padding is exact; straight-through: its own
  rank and its own r + oversample tracked pairs, padded), so its result does not depend on the
  other ranks of the sweep: the batches land within rounding of the one-by-one students."""
  environment = {**os.environ, "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
  process = subprocess.run([sys.executable, "-c", _SIDE_BY_SIDE_SCRIPT, str(tmp_path)], cwd=ROOT,
                           env=environment, capture_output=True, text=True, timeout=600)
  assert process.returncode == 0, process.stderr[-3000:]
  out = json.loads(process.stdout.strip().splitlines()[-1])
  apart = out["one_by_one"]
  for kind in ("straight_through", "factorized"):
    assert [run["trained_with"] for run in apart[kind]["runs"]] == [[f"rank_4_{kind}"],
                                                                     [f"rank_8_{kind}"]]
    for batched in (out["member_by_member"], out["side_by_side"]):
      assert [run["trained_with"] for run in batched[kind]["runs"]] == [
          [f"rank_4_{kind}", f"rank_8_{kind}"]] * 2
      # Products of other shapes round differently in the last bits, and Adam carries that
      # into the weights; the students land within a few test images (1/359 each).
      np.testing.assert_allclose(batched[kind]["accuracy"], apart[kind]["accuracy"], atol=4 / 359)
  # Zero padding changes no product of the factorized members: member by member is exact.
  assert out["member_by_member"]["factorized"]["accuracy"] == apart["factorized"]["accuracy"]


def test_distilled_students_of_both_kinds_train_side_by_side(tmp_path):
  """Distillation runs inside each student's step (teacher logits on the same batch) for both
  kinds and a batch of ranks; the students differ from the undistilled ones."""
  overrides = {"sweep.ranks": (4, 8), "sweep.kinds": ("straight_through", "factorized"),
               "sweep.parallel_ranks": True}
  plain = sweep.run_sweep(small_config(tmp_path / "plain", **overrides), log=lambda _: None)
  distilled = sweep.run_sweep(small_config(tmp_path / "distilled", **overrides, **{
      "student.distillation.weight": 0.7, "student.distillation.temperature": 3.0}),
      log=lambda _: None)
  assert distilled["teacher"]["test_accuracy"] == plain["teacher"]["test_accuracy"]
  for a, b in zip(plain["ranks"], distilled["ranks"]):
    for kind in ("straight_through", "factorized"):
      assert 0.0 < b[f"{kind}_accuracy"] <= 1.0
    assert (a["straight_through_accuracy"], a["factorized_accuracy"]) != (
        b["straight_through_accuracy"], b["factorized_accuracy"])


def test_budgets_and_whitened_starts_in_the_sweep(tmp_path):
  """Budget points get allocated per-layer ranks within the budget, plain and whitened truncated
  accuracies, students started from the whitened truncation, and their own plot series."""
  config = small_config(tmp_path, **{"sweep.ranks": (2,), "sweep.budgets": (0.1,),
                                     "truncation": "whitened", "calibration.examples": 300,
                                     "sweep.kinds": ("factorized",)})
  results = sweep.run_sweep(config, log=lambda _: None)
  [rank], [budget] = results["ranks"], results["budgets"]
  assert budget["budget"] == 0.1 and set(budget["layer_ranks"]) <= {"linear_0", "linear_1"}
  weights = sum(r * (64 + 64) for r in budget["layer_ranks"].values()) + 64 * 64 * (
      2 - len(budget["layer_ranks"]))
  assert weights <= 0.1 * 2 * 64 * 64
  for entry in (rank, budget):
    assert 0 < entry["truncated_accuracy"] <= 1 and 0 < entry["whitened_truncated_accuracy"] <= 1
    assert 0 < entry["factorized_accuracy"] <= 1
  # The factorized student started from the whitened factors: its run says so via its fingerprint.
  record = json.loads((tmp_path / "runs" / "rank_b0.1_factorized.json").read_text())
  assert record["fingerprint"]["truncation"] == "whitened"
  budgets = plots.accuracy_marks(results, "budgets")["factorized_accuracy"]
  assert (budgets.x, budgets.y) == ([budget["params"]], [budget["factorized_accuracy"]])
  with open(tmp_path / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [row["rank"] for row in rows] == ["teacher", "2", ""] and rows[2]["budget"] == "0.1"
