"""Shared test setup: float32 CPU JAX, quiet logs, one compilation cache for the test runs.

The persistent compilation cache is shared by the xdist workers and by the subprocesses the tests
start (they inherit the environment): most tests compile the same small programs again. Entries
are keyed by program, compile options and versions, so the directory serves later runs too
(≈ 50 MB for a run of the suite; unbounded: JAX's size limit costs a file lock per access).
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "lrnet-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
