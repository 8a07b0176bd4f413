"""What every lrnet entry point shares: the config flag and user-facing error handling."""

import os
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lrnet import config as config_lib
from lrnet import data
from lrnet import runtime

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an lrnet config file, e.g. configs/mnist.py; override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
flags.mark_flags_as_required(["config"])

USER_ERRORS = (config_lib.ConfigError, data.DataError)


def check_config_file(argv: list[str]) -> None:
  """Exits with one line if the --config file does not exist (ml_collections would print a traceback)."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None:
      path = path.split(":", 1)[0]  # config_flags allows "file.py:arg"
      if not os.path.isfile(path):
        print(f"error: config file --config={path} does not exist (e.g. configs/mnist.py, "
              f"configs/fashion_mnist.py, configs/digits.py)", file=sys.stderr, flush=True)
        sys.exit(2)


def _terminate(signum, frame):
  del frame
  raise KeyboardInterrupt(f"signal {signum}")


def run_guarded(job) -> None:
  """Runs `job()`; user errors and interrupts become one line on stderr and a non-zero exit."""
  signal.signal(signal.SIGTERM, _terminate)
  logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep library chatter out
  try:
    job()
  except USER_ERRORS as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
  except KeyboardInterrupt:
    print("interrupted: everything finished so far is saved; run the same command again to resume",
          file=sys.stderr, flush=True)
    sys.exit(130)


def run_app(job) -> None:
  """The whole entry point: checks the config file, parses flags, runs `job(config)` guarded."""
  check_config_file(sys.argv)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.limit_lapack_threads(1)  # small LAPACK calls inside jitted steps: BUILD_NOTES.md
    run_guarded(lambda: job(CONFIG.value))

  app.run(main)
