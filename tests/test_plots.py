"""Tests for lrnet/plots.py: the data drawn, robustness, PNG output."""

import math
import os
import pathlib

import numpy as np
import pytest

from lrnet import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results():
  """A sweep over one 784x1024 layer: break-even rank 784*1024/1808."""
  return {
      "dataset": "mnist",
      "config": {"ranks": [10, 50, 200, "full"]},
      "teacher": {"test_accuracy": 0.98, "val_accuracy": 0.979,
                  "params": 4_235_786, "epochs": 12, "seconds": 100.0},
      "ranks": [
          # Deliberately unsorted.
          {"rank": 200, "params": 400_000, "compression": 10.6,
           "truncated_accuracy": 0.95, "straight_through_accuracy": 0.975,
           "factorized_accuracy": 0.978, "latency_dense_ms": 1.0,
           "latency_factorized_ms": 0.5},
          {"rank": 10, "params": 90_000, "compression": 47.1,
           "truncated_accuracy": 0.75, "straight_through_accuracy": 0.96,
           "factorized_accuracy": 0.97, "latency_dense_ms": 1.2,
           "latency_factorized_ms": 0.3, "theoretical_ratio": 0.05},
          {"rank": 50, "params": 150_000, "compression": 28.2,
           "truncated_accuracy": 0.9, "straight_through_accuracy": 0.97,
           "factorized_accuracy": 0.975, "latency_dense_ms": 1.1,
           "latency_factorized_ms": 0.35},
          {"rank": "full", "params": 4_235_786, "compression": 1.0,
           "truncated_accuracy": 0.98, "straight_through_accuracy": 0.98,
           "factorized_accuracy": 0.98, "latency_dense_ms": 1.0,
           "latency_factorized_ms": 1.0},
      ],
  }


def _line(ax, label):
  (line,) = [line for line in ax.get_lines() if line.get_label() == label]
  return line


def test_accuracy_vs_params_data():
  fig = plots.plot_accuracy_vs_params(_results())
  (ax,) = fig.axes
  lines = ax.get_lines()
  assert len(lines) == 4  # three methods + teacher reference
  assert ax.get_xscale() == "log"
  params = [90_000, 150_000, 400_000, 4_235_786]  # sorted by params
  expected = {
      "truncated SVD (no retraining)": [0.75, 0.9, 0.95, 0.98],
      "straight-through retrained": [0.96, 0.97, 0.975, 0.98],
      "factorized fine-tuned": [0.97, 0.975, 0.978, 0.98],
  }
  for label, accuracies in expected.items():
    line = _line(ax, label)
    np.testing.assert_array_equal(line.get_xdata(), params)
    np.testing.assert_array_equal(line.get_ydata(), accuracies)
  teacher = lines[3]
  assert teacher.get_label().startswith("teacher (test)")
  np.testing.assert_array_equal(teacher.get_ydata(), [0.98, 0.98])
  annotations = {text.get_text(): text.xy for text in ax.texts}
  assert annotations == {"r=10": (90_000, 0.75), "r=50": (150_000, 0.9),
                         "r=200": (400_000, 0.95), "full": (4_235_786, 0.98)}
  legend = [text.get_text() for text in ax.get_legend().get_texts()]
  assert legend[:3] == list(expected)


def test_latency_vs_rank_data():
  break_even = 784 * 1024 / (784 + 1024)
  fig = plots.plot_latency_vs_rank(_results(), break_even_rank=break_even)
  (ax,) = fig.axes
  lines = ax.get_lines()
  assert len(lines) == 4  # dense, factorized, theory, break-even
  ranks = [10, 50, 200]  # "full" has no numeric rank
  dense, factorized, theory, vertical = lines
  np.testing.assert_array_equal(dense.get_xdata(), ranks)
  np.testing.assert_array_equal(dense.get_ydata(), [1.2, 1.1, 1.0])
  np.testing.assert_array_equal(factorized.get_ydata(), [0.3, 0.35, 0.5])
  np.testing.assert_allclose(
      theory.get_ydata(),
      # rank 10 has its own theoretical_ratio; the others r(m+n)/(mn).
      [1.2 * 0.05, 1.1 * 50 * 1808 / (784 * 1024),
       1.0 * 200 * 1808 / (784 * 1024)])
  np.testing.assert_allclose(vertical.get_xdata(), [break_even, break_even])
  assert "break-even" in vertical.get_label()
  assert ax.get_xscale() == "log"


def test_latency_without_break_even_has_no_theory_for_plain_entries():
  fig = plots.plot_latency_vs_rank(_results())
  lines = fig.axes[0].get_lines()
  assert len(lines) == 3
  np.testing.assert_array_equal(lines[2].get_xdata(), [10])  # only the field


@pytest.mark.parametrize("bad", [None, float("nan"), "n/a"])
def test_missing_values_and_errors_are_skipped(bad):
  results = _results()
  results["teacher"]["test_accuracy"] = bad
  results["ranks"][0].update(factorized_accuracy=bad, latency_dense_ms=bad,
                             error="OOM in factorized fine-tuning")
  results["ranks"].append({"rank": 5, "error": "diverged"})  # nothing else
  results["ranks"].append({"rank": 7, "params": bad,
                           "truncated_accuracy": 0.5})
  fig = plots.plot_accuracy_vs_params(results)
  ax = fig.axes[0]
  assert len(ax.get_lines()) == 3  # no teacher line
  np.testing.assert_array_equal(
      _line(ax, "factorized fine-tuned").get_xdata(),
      [90_000, 150_000, 4_235_786])  # rank 200 dropped from this line only
  assert len(_line(ax, "truncated SVD (no retraining)").get_xdata()) == 4
  assert "r=5" not in [text.get_text() for text in ax.texts]
  lat = plots.plot_latency_vs_rank(results, break_even_rank=434.0).axes[0]
  dense = lat.get_lines()[0]
  np.testing.assert_array_equal(dense.get_xdata(), [10, 50])
  theory = lat.get_lines()[2]
  np.testing.assert_array_equal(theory.get_xdata(), [10, 50])
  assert all(math.isfinite(y) for y in theory.get_ydata())


def test_empty_or_all_failed_results_still_plot(tmp_path):
  for results in ({}, {"ranks": [{"rank": 10, "error": "boom"}],
                       "teacher": None}):
    paths = plots.write_plots(results, tmp_path)
    for path in paths:
      assert pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC


def test_write_plots_writes_pngs_atomically(tmp_path):
  workdir = tmp_path / "sweep"
  results = dict(_results(), break_even_rank=434.0)
  paths = plots.write_plots(results, workdir)
  assert [os.path.basename(p) for p in paths] == [
      "accuracy_vs_params.png", "latency_vs_rank.png"]
  assert sorted(os.listdir(workdir)) == [
      "accuracy_vs_params.png", "latency_vs_rank.png"]  # no temp files left
  for path in paths:
    data = pathlib.Path(path).read_bytes()
    assert data.startswith(PNG_MAGIC)
    width, height = (int.from_bytes(data[16:20], "big"),
                     int.from_bytes(data[20:24], "big"))
    assert (width, height) == (1050, 675)  # 7x4.5 inches at 150 dpi
