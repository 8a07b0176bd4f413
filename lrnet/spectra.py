r"""Spectra of a trained network's layers: singular values, energy ranks, stable and numerical rank.

Every candidate module of a parameter tree of any nesting (Haiku, flax; named by path as in
`lrnet.compression`) is read as its matrix view [m, n]: a conv kernel [kh, kw, c_in, c_out] as
[kh·kw·c_in, c_out], the matrix the convolution applies to each patch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lrnet import compression
from lrnet import svd

SPECTRUM_JSON = "teacher_spectrum.json"
SPECTRUM_PNG = "teacher_spectrum.png"


def matrix_spectrum(matrix: np.ndarray, tolerance: float | None = None) -> dict[str, Any]:
  r"""Spectrum summary of one matrix W [m, n].

  .. math:: \text{stable rank} = \frac{\|W\|_F^2}{\|W\|_2^2} = \frac{\sum s_i^2}{s_1^2},
            \qquad \text{numerical rank} = \#\{i : s_i > \tau\}

  Args:
    matrix: [m, n].
    tolerance: τ; default max(m, n) · eps(float32) · s₁, the rounding level of a float32 W.

  Returns:
    {"shape", "singular_values" (descending list), "energy_rank_90", "energy_rank_99"
     (`lrnet.svd.energy_rank_of`), "stable_rank", "numerical_rank", "tolerance"}.
  """
  matrix = np.asarray(matrix, np.float64)
  singular_values = np.linalg.svd(matrix, compute_uv=False)
  top = float(singular_values[0]) if singular_values.size else 0.0
  if tolerance is None:
    tolerance = max(matrix.shape) * float(np.finfo(np.float32).eps) * top
  return {
      "shape": [int(d) for d in matrix.shape],
      "singular_values": [float(s) for s in singular_values],
      "energy_rank_90": svd.energy_rank_of(singular_values, 0.90),
      "energy_rank_99": svd.energy_rank_of(singular_values, 0.99),
      "stable_rank": float(np.sum(singular_values ** 2) / top ** 2) if top > 0 else 0.0,
      "numerical_rank": int(np.sum(singular_values > tolerance)),
      "tolerance": float(tolerance),
  }


def layer_spectra(params: Mapping[str, Any], *, tolerance: float | None = None) -> dict[str, dict]:
  """{module: :func:`matrix_spectrum` of its matrix view}, in the order of the parameter tree
  `params` (e.g. {module: {"w": array, ...}}), for every module with a dense or conv weight or
  an embedding table (`lrnet.compression.matrix_shapes`). `tolerance`: absolute τ for the
  numerical rank (default per matrix, see :func:`matrix_spectrum`)."""
  nodes = compression.modules(params)
  return {name: matrix_spectrum(np.reshape(nodes[name][compression.weight_name(nodes[name])],
                                           shape), tolerance)
          for name, shape in compression.matrix_shapes(params).items()}


def format_spectra(spectra: Mapping[str, Mapping[str, Any]]) -> str:
  """A plain-text table of :func:`layer_spectra` for the terminal."""
  header = (f"{'layer':<24} {'shape':>13} {'s_max':>10} {'s_min':>10} {'E90':>5} {'E99':>5} "
            f"{'stable':>8} {'numerical':>9}")
  lines = [header, "-" * len(header)]
  for name, spectrum in spectra.items():
    values = spectrum["singular_values"] or [0]
    shape = "x".join(str(d) for d in spectrum["shape"])
    lines.append(f"{name:<24} {shape:>13} {values[0]:>10.4g} {values[-1]:>10.4g} "
                 f"{spectrum['energy_rank_90']:>5d} {spectrum['energy_rank_99']:>5d} "
                 f"{spectrum['stable_rank']:>8.2f} {spectrum['numerical_rank']:>9d}")
  return "\n".join(lines)


def plot_spectra(spectra: Mapping[str, Mapping[str, Any]],
                 swept: Mapping[str, Sequence[int]] | None = None):
  """Normalised singular values s_i/s_1 (log scale) against i, one line per layer, with the
  90 % (circle) and 99 % (square) energy ranks marked, and (×) each layer's ranks in `swept`
  ({layer: ranks}). A plain Figure: no pyplot."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(7.0, 4.5), layout="constrained")
  axes = fig.add_subplot()
  for name, spectrum in spectra.items():
    values = np.asarray(spectrum["singular_values"], np.float64)
    if values.size == 0 or not values[0] > 0:
      continue
    normalised = np.maximum(values / values[0], np.finfo(np.float64).tiny)
    (line,) = axes.plot(np.arange(1, values.size + 1), normalised, label=name)
    for key, marker in (("energy_rank_90", "o"), ("energy_rank_99", "s")):
      rank = spectrum[key]
      if 1 <= rank <= values.size:
        axes.plot([rank], [normalised[rank - 1]], marker=marker, color=line.get_color(),
                  linestyle="none")
    ranks = [rank for rank in (swept or {}).get(name, ()) if 1 <= rank <= values.size]
    if ranks:
      axes.plot(ranks, normalised[np.asarray(ranks) - 1], marker="x", markersize=9,
                linestyle="none", color=line.get_color())
  axes.set(yscale="log", xlabel="index i", ylabel="s_i / s_1",
           title="Singular values per layer (o: 90 % energy, □: 99 % energy)")
  if spectra:
    axes.legend(fontsize="small")
  return fig
