"""Figures of a rank sweep, drawn from its ``results.json``.

Schema read here (accuracies are fractions in [0, 1]; any value may be
missing, ``None`` or NaN, and an entry may carry an ``"error"`` string)::

  {"dataset": "mnist",
   "teacher": {"test_accuracy": 0.98, "params": 4235786, ...},
   "ranks": [{"rank": 10 | "full", "params": 90000,
              "truncated_accuracy": ..., "straight_through_accuracy": ...,
              "factorized_accuracy": ..., "latency_dense_ms": ...,
              "latency_factorized_ms": ..., "theoretical_ratio": ...}, ...],
   "break_even_rank": 512.0}   # optional

Missing values are skipped point by point, so a failed run never breaks a
figure. Figures are plain ``matplotlib.figure.Figure`` objects on an Agg
canvas: no pyplot, no display, no global state.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from lrnet import io

ACCURACY_SERIES = (
    ("truncated_accuracy", "truncated SVD (no retraining)"),
    ("straight_through_accuracy", "straight-through retrained"),
    ("factorized_accuracy", "factorized fine-tuned"),
)
ACCURACY_FILE = "accuracy_vs_params.png"
LATENCY_FILE = "latency_vs_rank.png"
_FIGSIZE = (7.0, 4.5)
_DPI = 150


def _finite(value: Any) -> float | None:
  """`value` as a float if it is a finite real number, else None."""
  if value is None or isinstance(value, (bool, str)):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _numeric_rank(rank: Any) -> float | None:
  """An int/float rank as a float; ``"full"`` and junk give None."""
  return _finite(rank) if not isinstance(rank, str) else None


def _rank_label(rank: Any) -> str:
  return "full" if isinstance(rank, str) else f"r={rank}"


def _new_figure() -> Figure:
  fig = Figure(figsize=_FIGSIZE, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _entries_by(results: Mapping[str, Any], position) -> list:
  """The rank entries for which `position(entry)` is a number, sorted by it."""
  entries = [entry for entry in _rank_entries(results) if position(entry) is not None]
  return sorted(entries, key=position)


def _rank_entries(results: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
  return [entry for entry in results.get("ranks") or ()
          if isinstance(entry, Mapping)]


def plot_accuracy_vs_params(results: Mapping[str, Any]) -> Figure:
  """Test accuracy of the three compression methods vs parameter count.

  One line per method in :data:`ACCURACY_SERIES` (always present, possibly
  empty), x = ``params`` on a log scale, sorted by ``params``; the teacher's
  test accuracy as a dashed horizontal line (if finite); each entry annotated
  with its rank below its lowest accuracy.

  Args:
    results: the sweep results (schema in the module docstring).

  Returns:
    The figure; ``fig.axes[0]`` holds the lines, in the order above.
  """
  fig = _new_figure()
  ax = fig.add_subplot()
  entries = _entries_by(results, lambda entry: _finite(entry.get("params")))
  for key, label in ACCURACY_SERIES:
    points = [(_finite(entry["params"]), _finite(entry.get(key)))
              for entry in entries]
    points = [(x, y) for x, y in points if y is not None]
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
            markersize=4, label=label)
  for entry in entries:
    accuracies = [_finite(entry.get(key)) for key, _ in ACCURACY_SERIES]
    accuracies = [y for y in accuracies if y is not None]
    if accuracies:
      # Below the lowest point: the top is crowded by the teacher line.
      ax.annotate(_rank_label(entry.get("rank")),
                  (_finite(entry["params"]), min(accuracies)),
                  textcoords="offset points", xytext=(0, -6), ha="center",
                  va="top", fontsize=7)
  teacher_accuracy = _finite((results.get("teacher") or {}).get(
      "test_accuracy"))
  if teacher_accuracy is not None:
    ax.axhline(teacher_accuracy, color="black", linestyle="--", linewidth=1,
               label=f"teacher (test) {teacher_accuracy:.2%}")
  if entries:
    ax.set_xscale("log")
  ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
  ax.set_xlabel("parameters (log scale)")
  ax.set_ylabel("test accuracy")
  ax.set_title(f"{results.get('dataset', '')}: accuracy vs parameters".strip(
      ": "))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return fig


def theoretical_ratio(entry: Mapping[str, Any],
                      break_even_rank: float | None) -> float | None:
  """Factorized/dense cost ratio of one rank entry.

  The entry's ``theoretical_ratio`` if finite; else, for one m×n layer,
  :math:`r(m+n)/(mn) = r / r^*` with the break-even rank
  :math:`r^* = mn/(m+n)`; None if neither is known.
  """
  ratio = _finite(entry.get("theoretical_ratio"))
  if ratio is not None:
    return ratio
  rank = _numeric_rank(entry.get("rank"))
  if rank is None or _finite(break_even_rank) in (None, 0.0):
    return None
  return rank / float(break_even_rank)


def plot_latency_vs_rank(results: Mapping[str, Any],
                         break_even_rank: float | None = None) -> Figure:
  """Measured dense and factorized latency vs rank, with the theory.

  Lines, in order: dense, factorized, theoretical factorized
  (``latency_dense_ms`` × :func:`theoretical_ratio`), then a vertical line at
  `break_even_rank` if given. Entries whose rank is not a number (``"full"``)
  are left out; x is the rank on a log scale.

  Args:
    results: the sweep results (schema in the module docstring).
    break_even_rank: :math:`mn/(m+n)` of the compressed layer, or None.

  Returns:
    The figure; ``fig.axes[0]`` holds the lines.
  """
  fig = _new_figure()
  ax = fig.add_subplot()
  entries = _entries_by(results, lambda entry: _numeric_rank(entry.get("rank")))

  def line(values, **style):
    points = [(_numeric_rank(entry["rank"]), value)
              for entry, value in zip(entries, values) if value is not None]
    ax.plot([x for x, _ in points], [y for _, y in points], **style)

  dense = [_finite(entry.get("latency_dense_ms")) for entry in entries]
  line(dense, marker="o", markersize=4, label="dense (measured)")
  line([_finite(entry.get("latency_factorized_ms")) for entry in entries],
       marker="s", markersize=4, label="factorized (measured)")
  theory = []
  for entry, dense_ms in zip(entries, dense):
    ratio = theoretical_ratio(entry, break_even_rank)
    theory.append(None if ratio is None or dense_ms is None
                  else dense_ms * ratio)
  line(theory, linestyle=":", marker="x", markersize=4,
       label="factorized (theory: dense × r(m+n)/mn)")
  if _finite(break_even_rank) is not None:
    ax.axvline(float(break_even_rank), color="gray", linestyle="--",
               linewidth=1,
               label=f"break-even r = mn/(m+n) = {break_even_rank:.4g}")
  if entries:
    ax.set_xscale("log")
  ax.set_xlabel("rank (log scale)")
  ax.set_ylabel("latency (ms)")
  ax.set_ylim(bottom=0)
  ax.set_title(f"{results.get('dataset', '')}: latency vs rank".strip(": "))
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def write_plots(results: Mapping[str, Any], workdir: str | os.PathLike,
                break_even_rank: float | None = None) -> list[str]:
  """Writes :data:`ACCURACY_FILE` and :data:`LATENCY_FILE` into `workdir`.

  Args:
    results: the sweep results.
    workdir: output directory (created if missing).
    break_even_rank: as in :func:`plot_latency_vs_rank`; default:
      ``results["break_even_rank"]`` if present.

  Returns:
    The two paths written (atomically, see :func:`lrnet.io.atomic_savefig`).
  """
  if break_even_rank is None:
    break_even_rank = _finite(results.get("break_even_rank"))
  os.makedirs(workdir, exist_ok=True)
  figures = {
      ACCURACY_FILE: plot_accuracy_vs_params(results),
      LATENCY_FILE: plot_latency_vs_rank(results, break_even_rank),
  }
  paths = []
  for name, fig in figures.items():
    path = os.path.join(os.fspath(workdir), name)
    io.atomic_savefig(fig, path, dpi=_DPI)
    paths.append(path)
  return paths
