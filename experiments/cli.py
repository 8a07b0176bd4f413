"""What every lrnet entry point shares: the config flag and user-facing error handling."""

import difflib
import importlib.util
import os
import re
import signal
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lrnet import config as config_lib
from lrnet import data
from lrnet import parallel
from lrnet import runtime
from lrnet import train

CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to an lrnet config file, e.g. configs/mnist.py; override fields with "
    "--config.FIELD=VALUE.", lock_config=True)
flags.mark_flags_as_required(["config"])

USER_ERRORS = (config_lib.ConfigError, data.DataError, train.NonFiniteError)


def _exit_with(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _config_spec(argv: list[str]) -> str | None:
  """The value of --config ("file.py" or "file.py:arg"), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def check_config_file(argv: list[str]) -> None:
  """Exits with one line if the --config file does not exist (ml_collections would print a traceback)."""
  spec = _config_spec(argv)
  if spec is not None:
    path = spec.split(":", 1)[0]  # config_flags allows "file.py:arg"
    if not os.path.isfile(path):
      _exit_with(f"config file --config={path} does not exist (e.g. configs/mnist.py, "
                 f"configs/fashion_mnist.py, configs/digits.py)")


def load_config(spec: str):
  """`get_config()` of a config file, as config_flags calls it: "file.py" or "file.py:arg"."""
  path, *args = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("lrnet_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*args)


def _field_paths(config, prefix: str = "") -> list[str]:
  """Every group and field of `config` as a dotted path."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if hasattr(value, "items"):
      paths += _field_paths(value, f"{prefix}{key}.")
  return paths


def check_config_overrides(argv: list[str]) -> None:
  """Exits with one line naming the closest known field if a --config.FIELD override names an
  unknown one (ml_collections would print a traceback)."""
  spec = _config_spec(argv)
  overrides = [re.match(r"-{1,2}(no)?config\.([^=]*)", arg) for arg in argv]
  fields = [re.sub(r"\[[^]]*\]", "", m.group(2)) for m in overrides if m]  # "a.b[0]": a.b
  if spec is None or not fields:
    return
  known = _field_paths(load_config(spec))
  for field in fields:
    if field not in known:
      close = difflib.get_close_matches(field, known, n=1)
      _exit_with(f"unknown config field {field}"
                 + (f" (did you mean {close[0]}?)" if close else ""))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a value it cannot parse (--config.seed=abc) is one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    _exit_with(" ".join(str(error).split()))


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
  """The whole entry point: checks the config file and its overrides, parses flags, runs
  `job(config)` guarded."""
  check_config_file(sys.argv)
  check_config_overrides(sys.argv)

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed()  # several processes (Slurm, MPI, TPU pod): join first
    runtime.limit_lapack_threads(1)  # small LAPACK calls inside jitted steps: BUILD_NOTES.md
    run_guarded(lambda: job(CONFIG.value))

  app.run(main, flags_parser=parse_flags)
