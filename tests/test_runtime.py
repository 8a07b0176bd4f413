"""Tests for lrnet/runtime.py: SciPy's LAPACK thread cap, and NumPy's BLAS left alone."""

import pytest
import scipy.linalg.cython_lapack  # noqa: F401  (loaded, as JAX's first LAPACK call loads it)
import threadpoolctl

from lrnet import runtime


def _threads():
  return {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
          if lib["user_api"] == "blas"}


def test_limit_lapack_threads_caps_scipy_only():
  before = _threads()
  with threadpoolctl.threadpool_limits(limits=None, user_api="blas"):  # restores them on exit
    limited = runtime.limit_lapack_threads(1)
    assert limited, "SciPy's OpenBLAS was not found"
    during = _threads()
    for path in limited:
      assert "scipy" in path.lower() and during[path] == 1
    for path, count in during.items():
      if path not in limited:
        assert count == before[path]  # NumPy's BLAS untouched
  assert _threads() == before


def test_limit_rejects_a_bad_count():
  with pytest.raises(ValueError, match="num_threads"):
    runtime.limit_lapack_threads(0)
