"""Tests for lrnet/calibration.py and data-aware (whitened) truncation in lrnet/compression.py."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import lrnet

RANDOM = np.random.default_rng(1)  # NumPy draws: jax.random compiles its RNG on first use
IMAGES = RANDOM.normal(size=(4, 7, 7, 3)).astype(np.float32)


@pytest.fixture(autouse=True)
def one_blas_thread():
  """On the loaded 2-core test machine OpenBLAS's threads contend: a 200² eigh took 0.7 s with
  its default threads and 0.01 s with one."""
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    yield


def small_cnn(images):
  x = jax.nn.relu(hk.Conv2D(4, 3, stride=2, name="conv")(images))
  x = jax.nn.relu(hk.Linear(32, name="hidden")(hk.Flatten()(x)))
  return hk.Linear(5, name="head")(x)


def _dense(fn, inputs):
  """`fn`'s jitted apply and fan-in scaled normal parameters drawn by NumPy (compiling Haiku's
  initialisers takes seconds on 2 cores)."""
  net = hk.without_apply_rng(hk.transform(fn))
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), inputs)
  draw = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda leaf: (draw.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]) or 1)
                    ).astype(np.float32), shapes)
  return jax.jit(net.apply), params


def test_dense_statistics_are_the_inputs_gram_and_one_compile_serves_equal_batches():
  traces = []
  mlp = lrnet.models.mlp_fn(5, (32, 16))

  def fn(x):
    traces.append(1)  # runs once per trace
    return mlp(x)
  _, params = _dense(fn, jnp.zeros((1, 24)))
  batches = [RANDOM.normal(size=(6, 24)).astype(np.float32) for _ in range(3)]
  calibration = lrnet.calibrate(fn, params, batches[:2] + [(batches[2],)])
  traces.clear()
  lrnet.calibrate(fn, params, batches)
  assert len(traces) == 1
  x = np.concatenate(batches).astype(np.float64)
  hidden = np.maximum(x @ params["linear_0"]["w"] + params["linear_0"]["b"], 0)
  assert list(calibration.grams) == ["linear_0", "linear_1"]  # not the output layer
  assert calibration.counts == {"linear_0": 18, "linear_1": 18}
  np.testing.assert_allclose(calibration.grams["linear_0"], x.T @ x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(calibration.grams["linear_1"], hidden.T @ hidden, rtol=1e-4,
                             atol=1e-4)
  assert calibration.grams["linear_0"].dtype == np.float64


def _im2col(images, kernel_size, stride, padding, rate):
  """Explicit patches of NHWC `images`: rows (batch, i, j), columns (a, b, c_in), c_in fastest."""
  batch, height, width, _ = images.shape
  span = (kernel_size - 1) * rate + 1
  pads = []
  for size in (height, width):
    if padding == "SAME":
      out = -(-size // stride)
      total = max((out - 1) * stride + span - size, 0)
      pads.append((total // 2, total - total // 2))
    else:
      pads.append((0, 0))
  padded = np.pad(images, [(0, 0), pads[0], pads[1], (0, 0)])
  out_h = (padded.shape[1] - span) // stride + 1
  out_w = (padded.shape[2] - span) // stride + 1
  rows = [padded[n, i * stride:i * stride + span:rate, j * stride:j * stride + span:rate].ravel()
          for n in range(batch) for i in range(out_h) for j in range(out_w)]
  return np.array(rows)


@pytest.mark.parametrize("stride, padding, rate, data_format", [
    (2, "SAME", 1, "NHWC"), (2, "VALID", 1, "NHWC"), (1, "SAME", 2, "NCHW")])
def test_conv_statistics_match_an_explicit_im2col(stride, padding, rate, data_format):
  def fn(images):
    conv = hk.Conv2D(6, 3, stride=stride, padding=padding, rate=rate, data_format=data_format,
                     name="conv")
    inputs = images if data_format == "NHWC" else jnp.moveaxis(images, -1, 1)
    outputs = conv(inputs)
    outputs = outputs if data_format == "NHWC" else jnp.moveaxis(outputs, 1, -1)
    return hk.Linear(4, name="head")(hk.Flatten()(outputs)), outputs
  apply, params = _dense(fn, IMAGES)
  calibration = lrnet.calibrate(fn, params, [IMAGES])
  patches = _im2col(np.asarray(IMAGES, np.float64), 3, stride, padding, rate)
  kernel = np.asarray(params["conv"]["w"], np.float64).reshape(-1, 6)
  # The reference im2col is the conv: patches @ kernel matrix = its output at every position.
  conv_output = np.asarray(apply(params, IMAGES)[1]).reshape(-1, 6) - np.ravel(params["conv"]["b"])
  np.testing.assert_allclose(patches @ kernel, conv_output, rtol=1e-4, atol=1e-4)
  assert calibration.counts["conv"] == patches.shape[0]
  np.testing.assert_allclose(calibration.grams["conv"], patches.T @ patches, rtol=1e-5,
                             atol=1e-4)


def _single_layer(weight):
  return {"layer": {"w": jnp.asarray(weight, jnp.float32)}}


def test_whitening_with_an_isotropic_covariance_is_plain_truncation():
  weight = RANDOM.normal(size=(12, 9))
  calibration = lrnet.calibration.Calibration({"layer": 7.0 * 50 * np.eye(12)}, {"layer": 50})
  params = _single_layer(weight)
  whitened = lrnet.project(params, {"layer": 4}, calibration=calibration)["layer"]["w"]
  np.testing.assert_allclose(whitened, lrnet.project(params, {"layer": 4})["layer"]["w"], atol=1e-5)


def test_whitened_truncation_is_the_data_weighted_optimum_and_beats_plain_truncation():
  rows, m, n, rank = 200, 12, 8, 3
  x = RANDOM.normal(size=(rows, m)) * np.geomspace(10, 0.1, m)  # anisotropic, rotated
  x = x @ np.linalg.qr(RANDOM.normal(size=(m, m)))[0]
  weight = RANDOM.normal(size=(m, n))
  calibration = lrnet.calibration.Calibration({"layer": x.T @ x}, {"layer": rows}, damping=0.0)
  params = _single_layer(weight)
  whitened = np.asarray(
      lrnet.project(params, {"layer": rank}, calibration=calibration)["layer"]["w"], np.float64)
  plain = np.asarray(lrnet.project(params, {"layer": rank})["layer"]["w"], np.float64)
  # Optimum over rank-r W′ of ‖X(W − W′)‖: X⁺[XW]_r, whose error is the dropped σ of XW.
  u, s, vt = np.linalg.svd(x @ weight, full_matrices=False)
  optimum = np.linalg.pinv(x) @ ((u[:, :rank] * s[:rank]) @ vt[:rank])
  assert np.linalg.matrix_rank(whitened, tol=1e-4) == rank
  error = lambda w: np.linalg.norm(x @ (weight - w))
  assert error(optimum) == pytest.approx(np.sqrt(np.sum(s[rank:] ** 2)), rel=1e-9)
  assert error(whitened) == pytest.approx(error(optimum), rel=1e-4)
  assert error(plain) > 1.2 * error(optimum)
  # Each dropped singular value of SᵀW removes its square from ‖Sᵀ(W − W′)‖²_F.
  root, _ = calibration.whitening("layer")
  singular_values = np.asarray(lrnet.decompose(params, include="layer",
                                               calibration=calibration)["layer"].s, np.float64)
  for r in (1, 3, 6):
    projected = lrnet.project(params, {"layer": r}, calibration=calibration)["layer"]["w"]
    residual = np.linalg.norm(root @ (weight - np.asarray(projected, np.float64))) ** 2
    assert residual == pytest.approx(np.sum(singular_values[r:] ** 2), rel=1e-4)


@pytest.mark.parametrize("damping", [lrnet.calibration.DEFAULT_DAMPING, 0.0])
def test_a_singular_covariance_gives_finite_truncations(damping):
  x = RANDOM.normal(size=(40, 10))
  x[:, :4] = 0.0  # inputs that are always zero, such as constant border pixels
  weight = RANDOM.normal(size=(10, 6))
  calibration = lrnet.calibration.Calibration({"layer": x.T @ x}, {"layer": 40}, damping=damping)
  projected = np.asarray(lrnet.project(_single_layer(weight), {"layer": 2},
                                       calibration=calibration)["layer"]["w"], np.float64)
  assert np.all(np.isfinite(projected))
  # On the data, it is at least as good as plain truncation.
  plain = np.asarray(lrnet.truncate(jnp.asarray(weight), 2), np.float64)
  assert (np.linalg.norm(x @ (weight - projected))
          <= np.linalg.norm(x @ (weight - plain)) * (1 + 1e-4))
  if damping > 0:  # damped, the unseen directions keep W rather than anything at all
    assert np.linalg.norm(projected[:4] - weight[:4]) < np.linalg.norm(weight[:4])


def test_calibrated_compress_matches_project_and_the_factorized_network():
  apply, params = _dense(small_cnn, IMAGES)
  calibration = lrnet.calibrate(small_cnn, params, [IMAGES[:2], IMAGES[2:]])
  rank = 3
  compressed = lrnet.compress(params, rank, calibration=calibration)
  projected = lrnet.project(params, rank, calibration=calibration)
  for name in ("conv", "hidden"):
    product = compressed[name]["u"].reshape(-1, rank) @ compressed[name]["v"]
    np.testing.assert_allclose(product, projected[name]["w"].reshape(product.shape), atol=1e-5)
  assert not np.allclose(projected["hidden"]["w"], lrnet.project(params, rank)["hidden"]["w"],
                         atol=1e-3)  # the data changed the truncation
  np.testing.assert_allclose(jax.jit(lrnet.factorized(small_cnn, rank).apply)(compressed, IMAGES),
                             apply(projected, IMAGES), rtol=1e-4, atol=1e-5)
  decompositions = lrnet.decompose(params, calibration=calibration)
  for function in (lrnet.compress, lrnet.project):
    reused = function(params, rank, decompositions=decompositions)
    direct = function(params, rank, calibration=calibration)
    jax.tree_util.tree_map(np.testing.assert_array_equal, reused, direct)


def test_a_selected_layer_without_statistics_is_an_error_naming_it():
  _, params = _dense(small_cnn, IMAGES)
  calibration = lrnet.calibrate(small_cnn, params, [IMAGES], include="conv")
  assert list(calibration.grams) == ["conv"]
  with pytest.raises(ValueError, match="module 'hidden' is selected but has no calibration"):
    lrnet.compress(params, 2, calibration=calibration)
  with pytest.raises(ValueError, match="batches is empty"):
    lrnet.calibrate(small_cnn, params, [])
  with pytest.raises(ValueError, match="damping must be >= 0"):
    lrnet.calibrate(small_cnn, params, [IMAGES], damping=-1.0)
