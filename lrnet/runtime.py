"""Process settings that the CPU training speed depends on.

JAX's CPU kernels for Cholesky, triangular solves, eigh and SVD call LAPACK through SciPy
(`scipy.linalg.cython_lapack`), whose bundled OpenBLAS starts its own threads. In a jitted
straight-through step those calls are small (k×k, k ≤ a few hundred) and sit between XLA's
matmuls, which already keep every core busy: the two thread pools compete, and on 2 cores the
tracked step took about twice as long with OpenBLAS's default threads as with one (BUILD_NOTES.md).
"""

from __future__ import annotations

import threadpoolctl


def limit_lapack_threads(num_threads: int = 1) -> list[str]:
  """Caps SciPy's LAPACK (used by JAX's CPU linear algebra) at `num_threads` threads, for the
  rest of the process; NumPy's BLAS is left alone. The experiment entry points call this at
  start; call it yourself before training straight-through students on a CPU.

  Returns:
    The file paths of the libraries limited (empty when SciPy's LAPACK is not an OpenBLAS or
    MKL that threadpoolctl can control).
  """
  if not isinstance(num_threads, int) or num_threads < 1:
    raise ValueError(f"num_threads must be an integer ≥ 1, got {num_threads!r}")
  import scipy.linalg.cython_lapack  # noqa: F401  (loads SciPy's OpenBLAS, as JAX does)
  blas = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
  libraries = [lib for lib in blas  # SciPy's, not NumPy's own
               if "scipy" in lib.filepath.lower() and "numpy" not in lib.filepath.lower()]
  for lib in libraries:
    lib.set_num_threads(num_threads)
  return [lib.filepath for lib in libraries]

