"""Figures of a rank sweep, drawn from its ``results.json``.

Schema read here (the sweep's contract; accuracies are fractions in [0, 1], latencies in ms)::

  {"dataset": "digits",
   "config": {...},
   "teacher": {"test_accuracy": 0.97, "val_accuracy": 0.98, "params": 558602,
               "epochs": 30, "seconds": 12.1,
               "latency_ms": 0.21},        # the dense network: ONE number
   "layers": [{"name": "linear_0", "shape": [64, 512]}, ...],
                                           # the factorized layers, [m, n]
   "ranks": [{"rank": 4 | 0.25 | "full", "params": 11274, "compression": 49.5,
              "truncated_accuracy": 0.41, "straight_through_accuracy": 0.93,
              "factorized_accuracy": 0.92, "latency_factorized_ms": 0.05,
              "theoretical_latency_ratio": 0.016,
              "error": "optional string"}, ...]}

Any value may be missing, ``None`` or NaN and any entry may carry ``"error"``: points are
skipped one by one, so a failed run never breaks a figure. A rank is an int, a float fraction
of each layer's min(m, n), or ``"full"``; only int ranks have a place on a rank axis, so the
latency figure leaves the others out and names them in a note. Figures are plain
``matplotlib.figure.Figure`` objects (``savefig`` needs no canvas): no pyplot, no display, no
global state.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from lrnet import allocation
from lrnet import io
from lrnet import spectra as spectra_lib

ACCURACY_SERIES = (
    ("truncated_accuracy", "truncated SVD (no retraining)"),
    ("whitened_truncated_accuracy", "whitened truncation (no retraining)"),
    ("straight_through_accuracy", "straight-through retrained"),
    ("factorized_accuracy", "factorized fine-tuned"),
    ("dense_control_accuracy", "dense control (same size and training budget)"),
    ("dense_control_long_accuracy", "dense control (same size, teacher's recipe)"),
)
# Where a series' points sit on the parameter axis (default: the compressed network's size).
PARAMS_KEYS = {"dense_control_accuracy": "dense_control_params",
               "dense_control_long_accuracy": "dense_control_long_params"}
# The kinds that train, and of them the students (whose cost may add the teacher's).
TRAINED_SERIES = ("straight_through_accuracy", "factorized_accuracy", "dense_control_accuracy",
                  "dense_control_long_accuracy")
ACCURACY_FILE = "accuracy_vs_params.png"
COST_FILE = "accuracy_vs_cost.png"
LATENCY_FILE = "latency_vs_rank.png"
_FIGSIZE, _DPI = (7.0, 4.5), 150

Points = tuple[list[float], list[float]]  # (x, y), equal lengths


class LatencySeries(NamedTuple):
  """What :func:`plot_latency_vs_rank` draws."""
  dense_ms: float | None  # teacher.latency_ms: one horizontal line
  factorized: Points  # (int rank, latency_factorized_ms), sorted by rank
  theory: Points  # (int rank, theoretical_latency_ratio × dense_ms)
  break_even: list[tuple[tuple[int, int], int]]  # (m, n), break-even rank inside x-range
  left_out: list[str]  # labels of the ranks with no place on the rank axis


def _finite(value: Any) -> float | None:
  """`value` as a float if it is a finite real number, else None."""
  if value is None or isinstance(value, (bool, str)):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _int_rank(rank: Any) -> int | None:
  """An int rank; fractions (floats), ``"full"`` and junk give None."""
  return int(rank) if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) else None


def _point_label(entry: Mapping[str, Any]) -> str:
  """'r=8', 'r=25%' (a fraction of min(m, n)), 'full', or a budget's 'b=0.04'."""
  rank = entry.get("rank")
  if "budget" in entry and "rank" not in entry:
    budget = _finite(entry.get("budget"))
    return "budget" if budget is None else f"b={budget:.3g}"
  if isinstance(rank, float):
    return f"r={rank:.0%}"
  return "full" if isinstance(rank, str) else f"r={rank}"


def _rank_entries(results: Mapping[str, Any], group: str = "ranks") -> Sequence[Mapping[str, Any]]:
  return [entry for entry in results.get(group) or () if isinstance(entry, Mapping)]


def _teacher(results: Mapping[str, Any]) -> Mapping[str, Any]:
  """`results["teacher"]`, or {} where it is missing or not a mapping."""
  return results["teacher"] if isinstance(results.get("teacher"), Mapping) else {}


def _points(pairs) -> Points:
  """The (x, y) pairs with both not None, sorted by x, as two lists."""
  pairs = sorted((x, y) for x, y in pairs if x is not None and y is not None)
  return [x for x, _ in pairs], [y for _, y in pairs]


def layer_shapes(results: Mapping[str, Any]) -> list[tuple[int, int]]:
  """The distinct valid ``[m, n]`` shapes of ``results["layers"]``, in order."""
  shapes = [layer.get("shape") for layer in results.get("layers") or ()
            if isinstance(layer, Mapping)]
  return list(dict.fromkeys(
      (int(shape[0]), int(shape[1])) for shape in shapes
      if isinstance(shape, Sequence) and len(shape) == 2
      and all(_int_rank(size) is not None and size > 0 for size in shape)))


def is_text(results: Mapping[str, Any]) -> bool:
  """A language model's results: plotted in bits per byte (test loss / ln 2), not accuracy."""
  return results.get("dataset") == "text"


def score(results: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> float | None:
  """What is plotted of `entry`'s `key` (a `<kind>_accuracy` key): that accuracy, or for text
  the bits per byte of its `<kind>_loss`; None where not measured."""
  if not is_text(results):
    return _finite(entry.get(key))
  loss = _finite(entry.get(key.replace("_accuracy", "_loss")))
  return None if loss is None else loss / math.log(2)


def spread(results: Mapping[str, Any], entry: Mapping[str, Any], key: str) -> float | None:
  """The ± of `score`: the standard deviation over seeds (`<kind>_accuracy_sd`; text: of the
  bits per byte), else the accuracy's binomial standard error (`<kind>_accuracy_se`)."""
  if is_text(results):
    sd = _finite(entry.get(key.replace("_accuracy", "_loss_sd")))
    return None if sd is None else sd / math.log(2)
  sd = _finite(entry.get(f"{key}_sd"))
  return sd if sd is not None else _finite(entry.get(f"{key}_se"))


class Marks(NamedTuple):
  """A series' points, sorted by x: positions, their ± (None: none known) and labels."""
  x: list[float]
  y: list[float]
  spread: list[float | None]
  labels: list[str]


def _marks(results: Mapping[str, Any], entries, key: str, x_of) -> Marks:
  """`key`'s score of each entry at x = `x_of(entry)`, those with both finite."""
  rows = sorted((x, y, spread(results, entry, key), _point_label(entry))
                for entry in entries
                for x, y in [(_finite(x_of(entry)), score(results, entry, key))]
                if x is not None and y is not None)
  return Marks(*(list(column) for column in zip(*rows))) if rows else Marks([], [], [], [])


def accuracy_marks(results: Mapping[str, Any], group: str = "ranks") -> dict[str, Marks]:
  """Per key of :data:`ACCURACY_SERIES`, its points at (params, test accuracy, or bits per byte
  for text) of the uniform ranks (`group` "ranks") or the budgets' allocated ranks
  ("budgets"); a dense control at its own parameter count."""
  entries = _rank_entries(results, group)
  return {key: _marks(results, entries, key,
                      lambda entry, key=key: entry.get(PARAMS_KEYS.get(key, "params")))
          for key, _ in ACCURACY_SERIES}


def cost_marks(results: Mapping[str, Any]) -> dict[str, Marks]:
  """Per key of :data:`TRAINED_SERIES`, its points at (estimated training FLOPs of the run,
  `<kind>_cost["train_flops"]`, score), ranks and budgets together."""
  entries = [*_rank_entries(results), *_rank_entries(results, "budgets")]
  return {key: _marks(results, entries, key, lambda entry, cost=key.replace("_accuracy", "_cost"):
                      (entry.get(cost) or {}).get("train_flops"))
          for key in TRAINED_SERIES}


def _draw(ax, marks: Marks, color: str, label: str, **style) -> None:
  """`marks` as a line (`style`), their ± as bars and each point's rank label beside it."""
  ax.plot(marks.x, marks.y, color=color, label=label, **style)
  bars = [(x, y, e) for x, y, e in zip(marks.x, marks.y, marks.spread) if e is not None]
  if bars:
    x, y, e = zip(*bars)
    ax.errorbar(x, y, yerr=e, fmt="none", ecolor=color, elinewidth=1, capsize=0, alpha=0.6)
  for x, y, text in zip(marks.x, marks.y, marks.labels):
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6, color=color)


def latency_series(results: Mapping[str, Any]) -> LatencySeries:
  """The latency figure's data (:class:`LatencySeries`). The x-range is that of the int ranks
  drawn (factorized or theory points); a layer shape's break-even rank is kept only inside it."""
  dense_ms = _finite(_teacher(results).get("latency_ms"))
  entries = _rank_entries(results)
  factorized = _points((_int_rank(entry.get("rank")), _finite(entry.get("latency_factorized_ms")))
                       for entry in entries)
  ratios = [(_int_rank(entry.get("rank")), _finite(entry.get("theoretical_latency_ratio")))
            for entry in entries] if dense_ms is not None else []
  theory = _points((rank, ratio * dense_ms) for rank, ratio in ratios if ratio is not None)
  ranks = factorized[0] + theory[0]
  break_even = [(shape, rank) for shape in layer_shapes(results) if ranks
                for rank in [allocation.break_even_rank(shape)]
                if min(ranks) <= rank <= max(ranks)]
  left_out = [_point_label(entry) for entry in entries
              if _int_rank(entry.get("rank")) is None and entry.get("rank") is not None]
  return LatencySeries(dense_ms, factorized, theory, break_even, left_out)


def _new_axes():
  """(figure, its one axes)."""
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  return fig, fig.add_subplot()


def _title(results: Mapping[str, Any], what: str) -> str:
  dataset = results.get("dataset")
  return f"{dataset}: {what}" if isinstance(dataset, str) and dataset else what


def plot_accuracy_vs_params(results: Mapping[str, Any]) -> Figure:
  """Test accuracy (text: bits per byte) of the compression methods and the dense control vs
  parameter count (log scale), from `results` (schema in the module docstring).

  One line per method in :data:`ACCURACY_SERIES` (always present, possibly empty; data from
  :func:`accuracy_marks`), then dashed the same methods at the budgets' allocated ranks (where
  the sweep has budgets); every point labelled with its rank (or budget) and drawn with its ±
  (:func:`spread`) as an error bar; the teacher as a dashed horizontal line labelled with its
  parameter count.

  Returns:
    The figure; ``fig.axes[0].get_lines()``: the series in order, then the teacher (if its
    accuracy is finite).
  """
  fig, ax = _new_axes()
  series, budgets = accuracy_marks(results), accuracy_marks(results, "budgets")
  for i, (key, label) in enumerate(ACCURACY_SERIES):
    _draw(ax, series[key], f"C{i}", label, marker="o", markersize=4)
  for i, (key, label) in enumerate(ACCURACY_SERIES):
    if budgets[key].x:
      _draw(ax, budgets[key], f"C{i}", f"{label}, allocated ranks", marker="s", markersize=4,
            linestyle="--")
  teacher_score = score(results, _teacher(results), "test_accuracy")
  if teacher_score is not None:
    teacher_params = _finite(_teacher(results).get("params"))
    size = "" if teacher_params is None else f", {teacher_params:,.0f} params"
    shown = f"{teacher_score:.3f} bits/byte" if is_text(results) else f"{teacher_score:.2%}"
    ax.axhline(teacher_score, color="black", linestyle="--", linewidth=1,
               label=f"teacher (dense{size}): {shown}")
  _finish_score_axes(ax, results, any(marks.x for marks in series.values()), "parameters",
                     "parameters of the compressed network (log scale)")
  return fig


def _finish_score_axes(ax, results: Mapping[str, Any], log_x: bool, against: str,
                       xlabel: str) -> None:
  """Scales, labels, title ('<dataset>: test accuracy vs `against`'), grid and legend of a
  figure whose y is `score`."""
  if log_x:
    ax.set_xscale("log")
  what = "test bits per byte (lower is better)" if is_text(results) else "test accuracy"
  if not is_text(results):
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
  ax.set(xlabel=xlabel, ylabel=what, title=_title(results, f"{what} vs {against}"))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7, loc="upper right" if is_text(results) else "lower right")


def plot_accuracy_vs_cost(results: Mapping[str, Any]) -> Figure:
  """Test accuracy (text: bits per byte) of every trained kind vs what its training cost: a
  run's estimated training FLOPs (`<kind>_cost["train_flops"]`, log scale).

  Per kind of :data:`TRAINED_SERIES` its points (ranks and budgets, each labelled, with ± bars)
  filled at the run's own cost; the students again, hollow, at their cost plus the teacher's
  (what they cost from nothing, against a control alone); the teacher as a black star.

  Returns:
    The figure; ``fig.axes[0].get_lines()``: per kind its own-cost points, then for the
    students those with the teacher's cost added (where the teacher's is known), then the
    teacher (where known).
  """
  fig, ax = _new_axes()
  labels = dict(ACCURACY_SERIES)
  colors = {key: f"C{i}" for i, (key, _) in enumerate(ACCURACY_SERIES)}
  marks, teacher = cost_marks(results), _teacher(results)
  teacher_flops = _finite(teacher.get("train_flops"))
  for key in TRAINED_SERIES:
    _draw(ax, marks[key], colors[key], f"{labels[key]}: its own training", marker="o",
          markersize=5, linestyle="none")
  for key in TRAINED_SERIES:
    if key not in PARAMS_KEYS and teacher_flops is not None:
      shifted = marks[key]._replace(x=[x + teacher_flops for x in marks[key].x],
                                    labels=[""] * len(marks[key].x))
      _draw(ax, shifted, colors[key], f"{labels[key]}: + the teacher's training", marker="o",
            markersize=5, linestyle="none", markerfacecolor="none")
  teacher_score = score(results, teacher, "test_accuracy")
  if teacher_flops is not None and teacher_score is not None:
    ax.plot([teacher_flops], [teacher_score], marker="*", markersize=10, color="black",
            linestyle="none", label="teacher (dense)")
  _finish_score_axes(ax, results, any(m.x for m in marks.values()) or teacher_flops is not None,
                     "training cost", "training cost: estimated FLOPs, forward + backward "
                     "(log scale)")
  return fig


def plot_latency_vs_rank(results: Mapping[str, Any]) -> Figure:
  """Forward latency of the factorized network vs rank, against the dense one.

  Lines of ``fig.axes[0]``, in order (data from :func:`latency_series`): factorized
  (measured), factorized (theory), the dense latency as a horizontal line, then one vertical
  line per layer shape's break-even rank. x is the int rank on a log scale; fractional and
  ``"full"`` ranks are named under the x label.
  """
  series = latency_series(results)
  fig, ax = _new_axes()
  ax.plot(*series.factorized, marker="s", markersize=4, label="factorized (measured)")
  ax.plot(*series.theory, linestyle=":", marker="x", markersize=4,
          label="factorized (theory: FLOP ratio × dense)")
  if series.dense_ms is not None:
    ax.axhline(series.dense_ms, color="black", linestyle="--", linewidth=1,
               label=f"dense (measured): {series.dense_ms:.3g} ms")
  for (m, n), rank in series.break_even:
    ax.axvline(rank, color="gray", linestyle="-.", linewidth=1,
               label=f"break-even {m}×{n}: r={rank:.4g}")
  ranks = sorted(set(series.factorized[0] + series.theory[0]))
  if ranks:
    ax.set_xscale("log")
    # Tick the measured ranks themselves; log ticks would read "4×10⁰".
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.set_xticks([], minor=True)
  left_out = "\nnot on the rank axis: " + ", ".join(series.left_out) if series.left_out else ""
  ax.set(xlabel="rank of every factorized layer (log scale)" + left_out,
         ylabel="forward latency (ms)", title=_title(results, "latency vs rank"))
  ax.set_ylim(bottom=0)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def write_plots(results: Mapping[str, Any], workdir: str | os.PathLike) -> list[str]:
  """Writes :data:`ACCURACY_FILE`, :data:`COST_FILE` and :data:`LATENCY_FILE` of `results`
  into `workdir` (created if missing), atomically (:func:`lrnet.io.atomic_savefig`); returns
  the paths written."""
  os.makedirs(workdir, exist_ok=True)
  figures = {ACCURACY_FILE: plot_accuracy_vs_params(results),
             COST_FILE: plot_accuracy_vs_cost(results), LATENCY_FILE: plot_latency_vs_rank(results)}
  paths = [os.path.join(os.fspath(workdir), name) for name in figures]
  for fig, path in zip(figures.values(), paths):
    io.atomic_savefig(fig, path, dpi=_DPI)
  return paths


def plot_teacher_spectrum(spectra: Mapping[str, Mapping[str, Any]], dataset: str,
                          swept: Mapping[str, Sequence[int]]) -> Figure:
  """`lrnet.spectra.plot_spectra`'s figure of the teacher's layers, titled with the
  dataset, with each layer's swept ranks (`swept`: {layer: ranks}) marked × on its line."""
  fig = spectra_lib.plot_spectra(spectra, swept)
  fig.axes[0].set_title(f"{dataset}: the teacher's singular values (o, □: 90, 99 % energy; "
                        "×: swept ranks)")
  return fig
