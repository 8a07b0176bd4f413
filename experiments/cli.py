"""What every lrnet entry point shares: the config flag, `--help` with every config field, and
user-facing error handling."""

import ast
import difflib
import importlib.util
import io
import os
import re
import signal
import sys
import tokenize

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from lrnet import config as config_lib
from lrnet import data
from lrnet import parallel
from lrnet import runtime
from lrnet import train

HELP_CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py")  # quick start's
# `config.teacher.epochs = 30  # its meaning`: the target less its first name, and the comment.
ASSIGNMENT = re.compile(r"\s*[A-Za-z_]\w*((?:\.\w+)+)\s*=(?!=)")


def exit_with(message: str):
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
  """Exits with one line if the --config file is missing (ml_collections: a traceback)."""
  spec = _config_spec(argv)  # config_flags allows "file.py:arg"
  if spec is not None and not os.path.isfile(path := spec.split(":", 1)[0]):
    exit_with(f"config file --config={path} does not exist (e.g. configs/mnist.py, "
              f"configs/fashion_mnist.py, configs/digits.py)")


def load_config(spec: str):
  """`get_config()` of a config file, as config_flags calls it: "file.py" or "file.py:arg"."""
  path, *args = spec.split(":", 1)
  module_spec = importlib.util.spec_from_file_location("lrnet_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(*args)


def _fields(config, prefix: str = "") -> list[tuple[str, object]]:
  """Every group and field of `config` as (dotted path, value)."""
  fields = []
  for key, value in config.items():
    fields.append((prefix + key, value))
    if hasattr(value, "items"):
      fields += _fields(value, f"{prefix}{key}.")
  return fields


def field_comments(path: str) -> list[tuple[str, str]]:
  """(target, comment) of every assignment that a comment ends, first in the config files
  `path` imports (`from configs import mnist`), depth first, then in `path`: the convention
  that a field's comment is its meaning. The target is the assigned name less its first part:
  `teacher.epochs`, or `epochs` of a recipe's `run.epochs`."""
  with open(path) as f:
    source = f.read()
  comments = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.ImportFrom) and node.module == "configs":
      for alias in node.names:
        comments += field_comments(importlib.util.find_spec(f"configs.{alias.name}").origin)
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    match = ASSIGNMENT.match(token.line) if token.type == tokenize.COMMENT else None
    if match:
      comments.append((match.group(1)[1:], token.string.lstrip("#").strip()))
  return comments


def config_fields(spec: str) -> list[tuple[str, str, str]]:
  """(field, value, meaning) of every field of the config file `spec` ("file.py[:arg]"), by
  name: the meaning is the comment of the field's first assignment, else of the first one of
  a name it ends with (a recipe's)."""
  comments = field_comments(spec.split(":", 1)[0])
  meaning = lambda field: next(
      (comment for target, comment in sorted(comments, key=lambda c: c[0] != field)
       if field == target or field.endswith("." + target)), "")
  return [(field, repr(value), meaning(field))
          for field, value in _fields(load_config(spec)) if not hasattr(value, "items")]


def config_help(spec: str) -> str:
  """`--help`: the entry point's docstring and every field of the config `spec`."""
  fields = config_fields(spec)
  width = min(max(len(f"{field} = {value}") for field, value, _ in fields), 48)
  heading = f"Fields of {spec} (set one with --config.FIELD=VALUE; absl's flags: --helpfull):"
  return "\n".join([(sys.modules["__main__"].__doc__ or "").strip(), "", heading]
                   + [f"  {f'{field} = {value}':<{width}}  # {meaning}".rstrip(" #")
                      for field, value, meaning in fields])


def field_table(spec: str) -> str:
  """README.md's table of the fields of `spec`, markdown; `teacher.X` and `student.X` share a
  row where their meanings agree."""
  rows = {}  # (field less "teacher."/"student.", meaning) -> [(field, value)], teacher first
  for field, value, meaning in config_fields(spec):
    row = rows.setdefault((re.sub(r"^(student|teacher)\.", "", field), meaning), [])
    row.insert(0 if field.startswith("teacher.") else len(row), (field, value))
  cells = lambda items: ", ".join(f"`{item}`" for item in items)
  return "\n".join([f"| field | `{spec}` | meaning |", "| --- | --- | --- |"]
                   + [f"| {cells(f for f, _ in row)} | {cells(v for _, v in row)} | "
                      f"{meaning.replace('|', '/')} |" for (_, meaning), row in rows.items()])


def check_config_overrides(argv: list[str]) -> None:
  """Exits with one line naming the closest known field if a --config.FIELD override names an
  unknown one (ml_collections would print a traceback)."""
  spec = _config_spec(argv)
  overrides = [re.match(r"-{1,2}(no)?config\.([^=]*)", arg) for arg in argv]
  fields = [re.sub(r"\[[^]]*\]", "", m.group(2)) for m in overrides if m]  # "a.b[0]": a.b
  if spec is None or not fields:
    return
  known = [path for path, _ in _fields(load_config(spec))]
  for field in fields:
    if field not in known:
      close = difflib.get_close_matches(field, known, n=1)
      exit_with(f"unknown config field {field}" + (f" (did you mean {close[0]}?)" if close else ""))


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing; a value it cannot parse (--config.seed=abc) is one line, exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    exit_with(" ".join(str(error).split()))


def run_guarded(job) -> None:
  """Runs `job()`; user errors and interrupts become one line on stderr and a non-zero exit."""
  signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
  logging.set_verbosity(logging.WARNING)  # progress lines are printed; keep library chatter out
  try:
    job()
  except (config_lib.ConfigError, data.DataError, train.NonFiniteError) as error:
    exit_with(str(error))
  except KeyboardInterrupt as interrupt:  # a run in training saves its epoch, says so: lrnet.sweep
    saved = (interrupt.args or ["no run was training; every finished run is saved"])[0]
    print(f"interrupted: {saved}; run the same command again to resume", file=sys.stderr,
          flush=True)
    sys.exit(130)


def run_app(job) -> None:
  """The whole entry point: `--help` (every field of --config, default `HELP_CONFIG`), else
  checks the config file and its overrides, parses flags, runs `job(config)` guarded."""
  check_config_file(sys.argv)
  if {"-h", "--help", "--helpshort"} & set(sys.argv[1:]):
    print(config_help(_config_spec(sys.argv) or os.path.relpath(HELP_CONFIG)))
    sys.exit(0)
  check_config_overrides(sys.argv)
  # Not on import: experiments.rank_game shares `parse_flags` and has no config.
  config = config_flags.DEFINE_config_file(
      "config", None, "Path to an lrnet config file, e.g. configs/mnist.py; override fields with "
      "--config.FIELD=VALUE.", lock_config=True)
  flags.mark_flags_as_required(["config"])

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    parallel.initialize_distributed()  # several processes (Slurm, MPI, TPU pod): join first
    runtime.limit_lapack_threads(1)  # small LAPACK calls inside jitted steps: BUILD_NOTES.md
    run_guarded(lambda: job(config.value))

  app.run(main, flags_parser=parse_flags)
