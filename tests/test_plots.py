"""Tests for lrnet/plots.py: the data drawn, robustness, PNG output."""

import copy
import inspect
import os
import pathlib

import numpy as np
import pytest

from lrnet import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHAPES = [(64, 512), (512, 512), (512, 512)]
DENSE_FLOPS = sum(m * n for m, n in SHAPES)  # 557056


def _ratio(layer_ranks):
  """The sweep's theoretical_latency_ratio: factorized over dense FLOPs."""
  return sum(r * (m + n) for r, (m, n) in zip(layer_ranks, SHAPES)) / DENSE_FLOPS


# Exactly what the sweep writes for a digits MLP 64-512-512-512-10 (the output
# layer stays dense). Entries deliberately unsorted; rank 64 lost a run.
RESULTS = {
    "dataset": "digits",
    "config": {"seed": 0, "sweep": {"ranks": [16, 4, 64, 0.25, "full"]}},
    "teacher": {"test_accuracy": 0.97, "val_accuracy": 0.98, "params": 563_722,
                "epochs": 30, "seconds": 12.1, "latency_ms": 0.21},
    "layers": [{"name": f"linear_{i}", "shape": list(shape)}
               for i, shape in enumerate(SHAPES)],
    "ranks": [
        {"rank": 16, "params": 48_650, "compression": 11.59,
         "truncated_accuracy": 0.62, "straight_through_accuracy": 0.955,
         "factorized_accuracy": 0.95, "latency_factorized_ms": 0.07,
         "theoretical_latency_ratio": _ratio([16, 16, 16])},
        {"rank": 4, "params": 17_162, "compression": 32.85,
         "truncated_accuracy": 0.41, "straight_through_accuracy": 0.93,
         "factorized_accuracy": 0.92, "latency_factorized_ms": 0.05,
         "theoretical_latency_ratio": _ratio([4, 4, 4])},
        {"rank": 64, "params": 174_602, "compression": 3.229,
         "truncated_accuracy": 0.9, "straight_through_accuracy": None,
         "factorized_accuracy": 0.965, "latency_factorized_ms": 0.12,
         "theoretical_latency_ratio": _ratio([64, 64, 64]),
         "error": "straight_through: non-finite loss at epoch 3"},
        {"rank": 0.25, "params": 278_026, "compression": 2.028,
         "truncated_accuracy": 0.94, "straight_through_accuracy": 0.968,
         "factorized_accuracy": 0.966, "latency_factorized_ms": 0.15,
         "theoretical_latency_ratio": _ratio([16, 128, 128])},
        {"rank": "full", "params": 1_092_106, "compression": 0.516,
         "truncated_accuracy": 0.97, "straight_through_accuracy": 0.97,
         "factorized_accuracy": 0.97, "latency_factorized_ms": 0.3,
         "theoretical_latency_ratio": _ratio([64, 512, 512])},
    ],
}
INT_RANKS = [4, 16, 64]
BREAK_EVEN_64x512 = 56  # the largest r with r·(64 + 512) < 64·512; 512x512's 255 is > 64


def _results(**changes):
  """A deep copy of RESULTS with top-level keys replaced."""
  return dict(copy.deepcopy(RESULTS), **changes)


def _line(ax, label):
  (line,) = [line for line in ax.get_lines() if line.get_label() == label]
  return line


def _series(results, group="ranks"):
  """(params, score) per key of plots.ACCURACY_SERIES: the x and y of plots.accuracy_marks."""
  return {key: (marks.x, marks.y) for key, marks in plots.accuracy_marks(results, group).items()}


def test_accuracy_series():
  series = _series(RESULTS)
  assert list(series) == [key for key, _ in plots.ACCURACY_SERIES]
  params = [17_162, 48_650, 174_602, 278_026, 1_092_106]
  assert series["truncated_accuracy"] == (params, [0.41, 0.62, 0.9, 0.94, 0.97])
  # The failed straight-through run at rank 64 is skipped, the rest kept.
  assert series["straight_through_accuracy"] == (
      [17_162, 48_650, 278_026, 1_092_106], [0.93, 0.955, 0.968, 0.97])
  assert series["factorized_accuracy"] == (
      params, [0.92, 0.95, 0.965, 0.966, 0.97])


def test_budgets_are_drawn_as_their_own_series():
  budget = {"budget": 0.05, "layer_ranks": {"linear_0": 8}, "params": 30_000,
            "truncated_accuracy": 0.5, "factorized_accuracy": 0.9}
  results = _results(budgets=[budget])
  assert _series(results, "budgets")["factorized_accuracy"] == ([30_000], [0.9])
  ax, = plots.plot_accuracy_vs_params(results).axes
  line = _line(ax, "factorized fine-tuned, allocated ranks")
  assert list(line.get_xdata()) == [30_000] and line.get_linestyle() == "--"


def test_dense_controls_sit_at_their_own_parameter_count():
  entry = dict(RESULTS["ranks"][0], dense_control_params=16_000, dense_control_accuracy=0.95)
  series = _series(_results(ranks=[entry]))
  assert series["dense_control_accuracy"] == ([16_000], [0.95])


def test_accuracy_figure_draws_the_series_and_teacher():
  ax, = plots.plot_accuracy_vs_params(RESULTS).axes
  lines = ax.get_lines()
  assert len(lines) == len(plots.ACCURACY_SERIES) + 1  # the series (some empty) + teacher
  for (key, label), line in zip(plots.ACCURACY_SERIES, lines):
    assert line.get_label() == label
    xs, ys = _series(RESULTS)[key]
    np.testing.assert_array_equal(line.get_xdata(), xs)
    np.testing.assert_array_equal(line.get_ydata(), ys)
  teacher = lines[-1]
  np.testing.assert_array_equal(teacher.get_ydata(), [0.97, 0.97])
  assert "563,722 params" in teacher.get_label()
  assert "97.00%" in teacher.get_label()
  assert ax.get_xscale() == "log"
  assert "parameters" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()
  legend = [text.get_text() for text in ax.get_legend().get_texts()]
  assert legend == [line.get_label() for line in lines]
  # Every point of every curve carries its rank.
  annotations = sorted((text.get_text(), text.xy) for text in ax.texts)
  labels = {17_162: "r=4", 48_650: "r=16", 174_602: "r=64", 278_026: "r=25%", 1_092_106: "full"}
  assert annotations == sorted((labels[x], (x, y)) for xs, ys in
                               _series(RESULTS).values() for x, y in zip(xs, ys))
  assert ("r=4", (17_162, 0.41)) in annotations and ("full", (1_092_106, 0.97)) in annotations


def test_error_bars_are_the_seeds_standard_deviation_else_the_binomial_standard_error():
  entries = [dict(RESULTS["ranks"][0], factorized_accuracy_sd=0.01, factorized_accuracy_se=0.02,
                  truncated_accuracy_se=0.03),
             dict(RESULTS["ranks"][1], factorized_accuracy_se=0.02)]
  marks = plots.accuracy_marks(_results(ranks=entries))
  assert marks["factorized_accuracy"].spread == [0.02, 0.01]  # by params: rank 4, then 16
  assert marks["truncated_accuracy"].spread == [None, 0.03]
  ax, = plots.plot_accuracy_vs_params(_results(ranks=entries)).axes
  bars = [c for c in ax.collections if c.get_segments()]
  segments = sorted(np.asarray(segment).ravel().tolist() for bar in bars
                    for segment in bar.get_segments())
  np.testing.assert_allclose(segments, sorted([[17_162, 0.90, 17_162, 0.94],
                                               [48_650, 0.59, 48_650, 0.65],
                                               [48_650, 0.94, 48_650, 0.96]]))


def test_the_cost_figure_puts_students_at_their_cost_with_and_without_the_teachers():
  cost = lambda flops: {"steps": 10, "epochs": 1, "examples": 1000, "seconds": 1.0,
                        "train_flops": flops}
  entries = [dict(RESULTS["ranks"][1], factorized_cost=cost(2e9), dense_control_accuracy=0.9,
                  dense_control_cost=cost(1e9)),
             dict(RESULTS["ranks"][0], factorized_cost=cost(3e9))]
  results = _results(ranks=entries, budgets=[{"budget": 0.05, "factorized_accuracy": 0.8,
                                              "factorized_cost": cost(4e9)}])
  results["teacher"]["train_flops"] = 1e10
  marks = plots.cost_marks(results)
  assert marks["factorized_accuracy"] == ([2e9, 3e9, 4e9], [0.92, 0.95, 0.8], [None] * 3,
                                          ["r=4", "r=16", "b=0.05"])
  assert marks["dense_control_accuracy"].x == [1e9]
  assert marks["straight_through_accuracy"].x == []  # no cost recorded
  ax, = plots.plot_accuracy_vs_cost(results).axes
  own = _line(ax, "factorized fine-tuned: its own training")
  with_teacher = _line(ax, "factorized fine-tuned: + the teacher's training")
  np.testing.assert_allclose(with_teacher.get_xdata(), np.asarray(own.get_xdata()) + 1e10)
  assert with_teacher.get_markerfacecolor() == "none"
  assert [line.get_label() for line in ax.get_lines()
          if "control" in line.get_label()] == [
      "dense control (same size and training budget): its own training",
      "dense control (same size, teacher's recipe): its own training"]  # no teacher cost added
  np.testing.assert_array_equal(_line(ax, "teacher (dense)").get_xdata(), [1e10])
  assert ax.get_xscale() == "log" and "FLOPs" in ax.get_xlabel()


def test_latency_series_reads_theoretical_latency_ratio():
  series = plots.latency_series(RESULTS)
  assert series.dense_ms == 0.21
  assert series.factorized == (INT_RANKS, [0.05, 0.07, 0.12])
  assert series.theory[0] == INT_RANKS
  # ratio × dense latency, ratio = r(m+n) summed over layers / dense FLOPs.
  np.testing.assert_allclose(
      series.theory[1], [0.21 * r * 2624 / DENSE_FLOPS for r in INT_RANKS])
  assert series.left_out == ["r=25%", "full"]  # no place on a rank axis


def test_latency_ignores_a_misnamed_ratio():
  results = _results()
  for entry in results["ranks"]:
    entry["theoretical_ratio"] = entry.pop("theoretical_latency_ratio")
  assert plots.latency_series(results).theory == ([], [])


def test_latency_figure_dense_is_one_horizontal_line():
  ax, = plots.plot_latency_vs_rank(RESULTS).axes
  factorized, theory, dense, break_even = ax.get_lines()
  np.testing.assert_array_equal(factorized.get_xdata(), INT_RANKS)
  np.testing.assert_array_equal(factorized.get_ydata(), [0.05, 0.07, 0.12])
  np.testing.assert_allclose(theory.get_ydata(),
                             plots.latency_series(RESULTS).theory[1])
  np.testing.assert_array_equal(dense.get_ydata(), [0.21, 0.21])
  np.testing.assert_array_equal(dense.get_xdata(), [0, 1])  # axes-wide
  assert dense.get_label() == "dense (measured): 0.21 ms"
  np.testing.assert_allclose(break_even.get_xdata(), [BREAK_EVEN_64x512] * 2)
  assert break_even.get_label() == "break-even 64×512: r=56"
  assert ax.get_xscale() == "log"
  assert [tick.get_text() for tick in ax.get_xticklabels()] == ["4", "16", "64"]
  low, high = ax.get_xlim()
  assert low < 4 and 64 < high < 256  # the measured ranks, not 512x512's r*
  assert "r=25%, full" in ax.get_xlabel()
  legend = [text.get_text() for text in ax.get_legend().get_texts()]
  assert legend == [line.get_label() for line in ax.get_lines()]


@pytest.mark.parametrize("shapes, expected", [
    # 64x64 appears twice but is marked once; both break-even ranks lie in [4, 64].
    ([(64, 512), (64, 64), (64, 64)],
     [((64, 512), BREAK_EVEN_64x512), ((64, 64), 31)]),
    ([(512, 512), (512, 512)], []),  # 255 is past the largest rank
    ([(64, 512), "junk", {"shape": [0, 5]}, {"shape": None}],
     [((64, 512), BREAK_EVEN_64x512)]),
])
def test_break_even_once_per_distinct_shape_in_range(shapes, expected):
  layers = [{"name": f"l{i}", "shape": list(s)} if isinstance(s, tuple) else s
            for i, s in enumerate(shapes)]
  results = _results(layers=layers)
  assert plots.latency_series(results).break_even == expected
  ax, = plots.plot_latency_vs_rank(results).axes
  labels = [line.get_label() for line in ax.get_lines()]
  assert sum(label.startswith("break-even") for label in labels) == len(
      expected)


@pytest.mark.parametrize("bad", [None, float("nan"), "n/a"])
def test_missing_values_and_errors_are_skipped(bad):
  results = _results()
  results["teacher"].update(test_accuracy=bad, latency_ms=bad)
  results["ranks"][0].update(factorized_accuracy=bad,
                             latency_factorized_ms=bad, error="OOM")
  results["ranks"].append({"rank": 8, "error": "diverged"})  # nothing else
  results["ranks"].append({"rank": 32, "params": bad,
                           "truncated_accuracy": 0.5,
                           "theoretical_latency_ratio": bad})
  ax, = plots.plot_accuracy_vs_params(results).axes
  assert len(ax.get_lines()) == len(plots.ACCURACY_SERIES)  # no teacher line
  np.testing.assert_array_equal(
      _line(ax, "factorized fine-tuned").get_xdata(),
      [17_162, 174_602, 278_026, 1_092_106])  # rank 16 dropped here only
  assert len(_line(ax, "truncated SVD (no retraining)").get_xdata()) == 5
  assert {"r=8", "r=32"}.isdisjoint(text.get_text() for text in ax.texts)
  series = plots.latency_series(results)
  assert series.dense_ms is None
  assert series.factorized == ([4, 64], [0.05, 0.12])
  assert series.theory == ([], [])  # no dense latency to scale
  ax, = plots.plot_latency_vs_rank(results).axes
  assert len(ax.get_lines()) == 3  # factorized, theory (empty), break-even


def test_empty_or_all_failed_results_still_plot(tmp_path):
  for results in ({}, {"ranks": [{"rank": 10, "error": "boom"}],
                       "teacher": None, "layers": None}):
    assert plots.latency_series(results) == (None, ([], []), ([], []), [], [])
    for path in plots.write_plots(results, tmp_path):
      assert pathlib.Path(path).read_bytes()[:8] == PNG_MAGIC


def test_write_plots_writes_pngs_atomically(tmp_path):
  assert list(inspect.signature(plots.write_plots).parameters) == [
      "results", "workdir"]
  workdir = tmp_path / "sweep"
  paths = plots.write_plots(RESULTS, workdir)
  assert [os.path.basename(p) for p in paths] == [
      "accuracy_vs_params.png", "accuracy_vs_cost.png", "latency_vs_rank.png"]
  assert sorted(os.listdir(workdir)) == [
      "accuracy_vs_cost.png", "accuracy_vs_params.png",
      "latency_vs_rank.png"]  # no temp files left
  for path in paths:
    assert pathlib.Path(path).read_bytes().startswith(PNG_MAGIC)


def test_the_teacher_spectrum_names_the_dataset_and_marks_each_layers_swept_ranks():
  spectrum = lambda values: {"singular_values": values, "energy_rank_90": 1, "energy_rank_99": 2}
  spectra = {"linear_0": spectrum([4.0, 2.0, 1.0, 0.5]), "linear_1": spectrum([1.0, 0.1])}
  fig = plots.plot_teacher_spectrum(spectra, "digits", {"linear_0": [2, 4], "linear_1": [1]})
  axes = fig.axes[0]
  assert axes.get_title().startswith("digits: ") and "×: swept ranks" in axes.get_title()
  swept = [line for line in axes.get_lines() if line.get_marker() == "x"]
  assert [(list(line.get_xdata()), list(line.get_ydata())) for line in swept] == [
      ([2, 4], [0.5, 0.125]), ([1], [1.0])]
