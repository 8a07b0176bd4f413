"""Tests for lrnet/spectra.py: the spectra of a trained network's layers, their table and plot."""

import numpy as np

from lrnet import spectra


def _with_singular_values(singular_values, rows, columns, seed):
  rng = np.random.default_rng(seed)
  u, _ = np.linalg.qr(rng.normal(size=(rows, len(singular_values))))
  v, _ = np.linalg.qr(rng.normal(size=(columns, len(singular_values))))
  return (u * np.asarray(singular_values)) @ v.T


def test_layer_spectra_against_hand_computed_numbers():
  dense = _with_singular_values([4.0, 3.0, 2.0, 1.0, 0.0], 6, 5, seed=0)
  conv_matrix = _with_singular_values([2.0, 1.0, 1.0, 0.5], 12, 4, seed=1)
  params = {
      "linear_0": {"w": dense.astype(np.float32), "b": np.zeros(5, np.float32)},
      "conv": {"w": conv_matrix.reshape(2, 2, 3, 4)},
      "norm": {"scale": np.ones(4), "offset": np.zeros(4)},
  }
  layers = spectra.layer_spectra(params)
  assert list(layers) == ["linear_0", "conv"]
  dense_spectrum, conv_spectrum = layers["linear_0"], layers["conv"]
  assert dense_spectrum["shape"] == [6, 5] and conv_spectrum["shape"] == [12, 4]
  np.testing.assert_allclose(dense_spectrum["singular_values"], [4, 3, 2, 1, 0], atol=1e-6)
  # Σs² = 30: 90 % = 27 needs 16 + 9 + 4 (3 values), 99 % = 29.7 needs all four nonzero ones.
  assert dense_spectrum["energy_rank_90"] == 3 and dense_spectrum["energy_rank_99"] == 4
  np.testing.assert_allclose(dense_spectrum["stable_rank"], 30 / 16, rtol=1e-6)
  assert dense_spectrum["numerical_rank"] == 4  # the zero falls below 6·eps32·4
  np.testing.assert_allclose(dense_spectrum["tolerance"], 6 * np.finfo(np.float32).eps * 4,
                             rtol=1e-6)
  # Conv kernel [2, 2, 3, 4] → [12, 4]; Σs² = 6.25: 90 % = 5.625 needs 3, 99 % needs 4.
  np.testing.assert_allclose(conv_spectrum["singular_values"], [2, 1, 1, 0.5], rtol=1e-12)
  assert conv_spectrum["energy_rank_90"] == 3 and conv_spectrum["energy_rank_99"] == 4
  np.testing.assert_allclose(conv_spectrum["stable_rank"], 6.25 / 4, rtol=1e-12)
  assert conv_spectrum["numerical_rank"] == 4
  assert spectra.layer_spectra(params, tolerance=0.75)["conv"]["numerical_rank"] == 3


def test_format_and_plot_spectra():
  params = {"linear_0": {"w": _with_singular_values([4.0, 3.0, 2.0, 1.0], 6, 4, seed=2)},
            "linear_1": {"w": _with_singular_values([1.0, 1e-3], 4, 2, seed=3)}}
  layers = spectra.layer_spectra(params)
  lines = spectra.format_spectra(layers).splitlines()
  assert len(lines) == 4 and lines[0].split()[:2] == ["layer", "shape"]
  assert lines[2].split()[:2] == ["linear_0", "6x4"] and lines[2].split()[-1] == "4"
  assert lines[3].split()[-2:] == ["1.00", "2"]  # stable rank 1 + 1e-6, numerical rank 2
  axes, = spectra.plot_spectra(layers).axes
  line, ninety, ninety_nine = axes.get_lines()[:3]  # linear_0 and its two energy marks
  assert line.get_label() == "linear_0" and axes.get_yscale() == "log"
  np.testing.assert_allclose(line.get_ydata(), [1, 0.75, 0.5, 0.25], rtol=1e-12)
  # 90 % of 30 = 27 ≤ 16 + 9 + 4: the circle sits on s_3 / s_1; 99 % needs all four.
  assert (ninety.get_xdata()[0], ninety.get_marker()) == (3, "o")
  np.testing.assert_allclose(ninety.get_ydata(), [0.5], rtol=1e-12)
  assert (ninety_nine.get_xdata()[0], ninety_nine.get_marker()) == (4, "s")
  assert [text.get_text() for text in axes.get_legend().get_texts()] == ["linear_0", "linear_1"]
