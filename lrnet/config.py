"""Config checking: every field of a sweep config is validated before any work starts.

Errors are `ConfigError`s with one line naming the field, its value and what is allowed.
"""

from __future__ import annotations

import importlib
import inspect
import numbers
import os
import re
from typing import Any, Callable, Optional

import ml_collections

from lrnet import allocation
from lrnet import data
from lrnet import text

MODELS = ("mlp", "convnet", "resmlp", "cnn", "resnet18", "transformer")  # lrnet.models.NETWORKS
SEQUENCE_MODELS = ("transformer",)  # of text (lrnet.text); the others of images
# A user network: model.name = "package.module:function" (`user_network`).
USER_NETWORK_FORM = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")
PROJECTION_METHODS = ("exact", "alternating")
REMOVED_PROJECTION_METHODS = ("streaming", "subspace")
STUDENT_KINDS = ("straight_through", "factorized", "dense_control", "dense_control_long")
SCHEDULES = ("constant", "cosine")
TRUNCATIONS = ("svd", "whitened")


class ConfigError(ValueError):
  """A user error in a config: the message is one line, meant for the terminal."""


def _fail(field: str, value: Any, allowed: str):
  raise ConfigError(f"config field {field}={value!r} is invalid: {allowed}")


def _get(config, field: str):
  node = config
  for part in field.split("."):
    if part not in node:
      raise ConfigError(f"config field {field} is missing")
    node = node[part]
  return node


def is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(config, field: str, allow_zero: bool = False):
  """Raises ConfigError unless `config.<field>` is an integer ≥ 1 (≥ 0 with `allow_zero`)."""
  value = _get(config, field)
  low = 0 if allow_zero else 1
  if not is_int(value) or value < low:
    _fail(field, value, f"must be an integer >= {low}")


def _check_number(config, field: str, in_range: Callable[[Any], bool], allowed: str):
  """Raises ConfigError unless `config.<field>` is a real number (not a bool) `in_range`."""
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not in_range(value):
    _fail(field, value, allowed)


def _positive_float(config, field: str):
  _check_number(config, field, lambda value: value > 0, "must be a number > 0")


def _non_negative(config, field: str):
  _check_number(config, field, lambda value: value >= 0, "must be a number >= 0")


def _unit_interval(config, field: str, closed_low: bool):
  if closed_low:
    _check_number(config, field, lambda value: 0 <= value < 1, "must be in [0, 1)")
  else:
    _check_number(config, field, lambda value: 0 < value < 1, "must be in (0, 1)")


def _one_line(error: BaseException) -> str:
  return f"{type(error).__name__}: {' '.join(str(error).split())}"


def is_user_network(name) -> bool:
  """Whether `model.name` names a user network ("package.module:function") rather than one of
  `MODELS` (the form alone: `user_network` checks the rest)."""
  return isinstance(name, str) and ":" in name


def user_network(model_config, num_classes: int) -> Callable:
  """The forward function of a user network `model.name = "package.module:function"`:
  `function(num_classes, **fields)`, `fields` the `model` group's fields but `name`, less the
  built-in networks' fields (`lrnet.models.NETWORK_FIELDS`, kept by a config written for one,
  e.g. digits.py's `model.hidden`) that the function does not take. The module is imported
  (`importlib`: it must be on `sys.path`, e.g. the working directory of `python -m`).

  Raises:
    ConfigError: (one line naming model.name) a name not of that form, a module that cannot be
      imported, a missing or non-callable attribute, a signature that does not take these
      fields, or a result that is not a Haiku forward function (e.g. an `hk.Transformed`).
  """
  name = model_config.name
  if not isinstance(name, str) or not USER_NETWORK_FORM.fullmatch(name):
    _fail("model.name", name, f"allowed: {', '.join(MODELS)}, or a user network "
                              "'package.module:function' returning a Haiku forward function")
  module_name, function_name = name.split(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as error:  # pylint: disable=broad-except  # ModuleNotFoundError, or its own
    _fail("model.name", name, f"cannot import module {module_name!r} ({_one_line(error)}); it "
                              "must be on sys.path, e.g. run from the directory holding it")
  function = getattr(module, function_name, None)
  if not callable(function):
    _fail("model.name", name, f"{function_name!r} in module {module_name!r} is "
                              f"{'missing' if function is None else 'not a function'}")
  fields = {key: model_config[key] for key in model_config.keys() if key != "name"}
  try:
    signature = inspect.signature(function)
  except (TypeError, ValueError):  # no signature (a builtin): every field goes
    signature = None
  if signature is not None:
    from lrnet import models  # pylint: disable=g-import-not-at-top  # models imports this module
    built_in = {field for fields in models.NETWORK_FIELDS.values() for field in fields}
    takes = signature.parameters
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in takes.values()):
      fields = {k: v for k, v in fields.items() if k in takes or k not in built_in}
    try:
      signature.bind(num_classes, **fields)
    except TypeError as error:
      _fail("model.name", name, f"the function must take num_classes and the model group's "
                                f"fields {sorted(fields)} ({_one_line(error)})")
  forward = function(num_classes, **fields)
  if not callable(forward) or hasattr(forward, "init"):
    _fail("model.name", name, "the function must return a Haiku forward function (what one "
                              f"passes to hk.transform), got {type(forward).__name__}")
  return forward


def check_workdir(path: str) -> None:
  """Raises ConfigError unless `path` is a writable directory or could be created as one.

  Creates nothing: the nearest existing ancestor must be a writable directory.
  """
  path = os.path.abspath(path)
  if os.path.exists(path):
    if not os.path.isdir(path):
      _fail("workdir", path, "it is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
      _fail("workdir", path, "the directory is not writable")
    return
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    _fail("workdir", path, f"cannot be created: {parent} is a file")
  if not os.access(parent, os.W_OK | os.X_OK):
    _fail("workdir", path, f"cannot be created: {parent} is not writable")


def check_workdir_and_seed(config) -> None:
  """Checks `workdir` (`check_workdir`) and `seed`."""
  workdir = _get(config, "workdir")
  if not isinstance(workdir, str) or not workdir:
    _fail("workdir", workdir, "must be a non-empty directory path")
  check_workdir(workdir)
  if not is_int(_get(config, "seed")):
    _fail("seed", config.seed, "must be an integer")


def check_teacher_dir(path) -> None:
  """Raises ConfigError unless `path` is None or a sweep workdir holding models/teacher."""
  if path is not None and not os.path.isdir(os.path.join(path, "models", "teacher")):
    _fail("teacher_dir", path,
          "expected a sweep workdir holding models/teacher (from python -m experiments.train)")


def check_rank_value(value, shapes, field: str) -> None:
  """A sweep rank: an int ≤ every compressed layer's min(m, n) (`shapes`: their (m, n); None:
  not known yet, the form alone is checked), a fraction in (0, 1], or 'full'."""
  if is_int(value):
    if value < 1:
      _fail(field, value, "an integer rank must be >= 1; or a fraction in (0, 1], or 'full'")
    if shapes:
      max_rank = min(min(shape) for shape in shapes)
      if value > max_rank:
        _fail(field, value, f"an integer rank must be in 1..{max_rank} (the smallest compressed "
                            f"layer {min(shapes, key=min)} allows at most {max_rank}); or a "
                            f"fraction in (0, 1], or 'full'")
  elif isinstance(value, float):
    if not 0.0 < value <= 1.0:
      _fail(field, value, "a rank fraction must be in (0, 1]; or an integer rank, or 'full'")
  elif value != "full":
    _fail(field, value, "must be an integer rank, a fraction in (0, 1], or 'full'")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a sweep/train config; raises ConfigError (one line) at the first
  invalid one."""
  check_workdir_and_seed(config)
  name = _check_data(config)
  model = _check_model(config, name)
  for run in ("teacher", "student"):
    check_recipe(config, run)
    if name == text.NAME and (config[run].shift or config[run].flip):
      _fail(f"{run}.shift" if config[run].shift else f"{run}.flip",
            config[run].shift or config[run].flip, "image augmentation: must be 0 / False for text")
  _check_number(config, "student.distillation.weight", lambda weight: 0 <= weight <= 1,
                "must be in [0, 1] (0: no distillation)")
  _positive_float(config, "student.distillation.temperature")
  _check_sweep(config, model)
  _check_number(config, "checkpoint_every_secs", lambda every: every >= 0,
                "must be a number of seconds >= 0 (0: every epoch)")
  check_mesh(config)
  check_positive_int(config, "latency.batch_size")
  check_positive_int(config, "latency.repeats")
  if not isinstance(config.latency.get("remeasure", False), bool):
    _fail("latency.remeasure", config.latency.remeasure, "must be True or False")


def _check_data(config) -> str:
  """Checks the `data` group; returns `data.name`."""
  name = _get(config, "data.name")
  if name not in data.DATASETS + (text.NAME,):
    _fail("data.name", name, f"allowed: {', '.join(data.DATASETS + (text.NAME,))}")
  if name == text.NAME:
    path = _get(config, "data.path")
    if path is not None and (not isinstance(path, str) or not path):
      _fail("data.path", path, "must be a UTF-8 file, a directory or a glob; None: the Python "
                               "standard library's sources")
    check_positive_int(config, "data.max_bytes")
    check_positive_int(config, "data.context")
  else:
    data_dir = _get(config, "data.dir")
    if data_dir is not None and not isinstance(data_dir, str):
      _fail("data.dir", data_dir, "must be a directory path or None")
  _unit_interval(config, "data.val_fraction", closed_low=False)
  return name


def check_widths(config, field: str, count: Optional[int] = None,
                 example: str = "(1024,)*5") -> None:
  """Checks that `config.<field>` is a non-empty tuple of positive integers (`count` of them)."""
  value = _get(config, field)
  if (not isinstance(value, (tuple, list)) or not value or (count and len(value) != count)
      or not all(is_int(width) and width >= 1 for width in value)):
    _fail(field, value, f"must be {count or 'a non-empty tuple of'} positive integers, e.g. "
                        f"{example}")


def _check_model(config, name: str) -> str:
  """Checks the `model` group for data `name`; returns `model.name`."""
  model = _get(config, "model.name")
  if model not in MODELS:  # a user network, else a one-line error naming the allowed names
    user_network(config.model, data.NUM_CLASSES)  # imports and calls it: its fields are its own
  widths = {"mlp": "hidden", "convnet": "dense"}.get(model)
  if widths is not None and widths in config.model:
    check_widths(config, f"model.{widths}")
  if model == "resnet18" and "widths" in config.model:
    check_widths(config, "model.widths", 4, "(64, 128, 256, 512), the block groups' channels")
  sizes = {"resmlp": ("width", "blocks"), "transformer": ("width", "layers", "heads", "mlp_ratio")}
  for field in sizes.get(model, ()):
    if field in config.model:
      check_positive_int(config, f"model.{field}")
  if model == "transformer" and not isinstance(config.model.get("tied_head", False), bool):
    _fail("model.tied_head", config.model.tied_head, "must be True or False")
  if model in MODELS and (model in SEQUENCE_MODELS) != (name == text.NAME):
    fitting = [m for m in MODELS if (m in SEQUENCE_MODELS) == (name == text.NAME)]
    _fail("model.name", model, f"data.name={name!r} needs one of {', '.join(fitting)} (or a "
                               "user network)")
  return model


def _check_sweep(config, model: str) -> None:
  """Checks the `sweep` group and the fields of the students it trains."""
  ranks = _get(config, "sweep.ranks")
  if not isinstance(ranks, (tuple, list)) or not ranks:
    _fail("sweep.ranks", ranks, "must be a non-empty tuple of ranks, e.g. (10, 20, 'full')")
  for value in ranks:
    check_rank_value(value, None, "sweep.ranks")
  if len(set(ranks)) != len(ranks):
    _fail("sweep.ranks", ranks, "must not repeat a rank")

  budgets = _get(config, "sweep.budgets")
  if (not isinstance(budgets, (tuple, list)) or len(set(budgets)) != len(budgets)
      or not all(isinstance(b, float) and 0 < b < 1 for b in budgets)):
    _fail("sweep.budgets", budgets, "must be a tuple of distinct fractions in (0, 1), e.g. (0.05,)")
  for field in ("sweep.include", "sweep.exclude"):
    patterns = _get(config, field)
    if not isinstance(patterns, (tuple, list)) or not all(
        isinstance(p, str) and p for p in patterns):
      _fail(field, patterns, "must be a tuple of module-path globs, e.g. ('*/mlp_*',); (): "
                             "every dense and conv layer but the output layer")
  if _get(config, "truncation") not in TRUNCATIONS:
    _fail("truncation", config.truncation, f"allowed: {', '.join(TRUNCATIONS)}")
  check_positive_int(config, "calibration.examples")
  _non_negative(config, "calibration.damping")
  if _get(config, "allocation.criterion") not in allocation.CRITERIA:
    _fail("allocation.criterion", config.allocation.criterion,
          f"allowed: {', '.join(allocation.CRITERIA)}")

  method = _get(config, "projection.method")
  if method not in PROJECTION_METHODS:
    removed = (" (streaming and subspace were removed)"
               if method in REMOVED_PROJECTION_METHODS else "")
    _fail("projection.method", method, f"allowed: {', '.join(PROJECTION_METHODS)}{removed}")
  check_positive_int(config, "projection.oversample", allow_zero=True)
  kinds = _get(config, "sweep.kinds")
  if (not isinstance(kinds, (tuple, list)) or len(set(kinds)) != len(kinds)
      or not set(kinds) <= set(STUDENT_KINDS)):
    _fail("sweep.kinds", kinds, f"must be a tuple of distinct student kinds from {STUDENT_KINDS} "
                                "(empty: truncation only)")
  if {"dense_control", "dense_control_long"} & set(kinds) and is_user_network(model):
    _fail("sweep.kinds", tuple(kinds), f"the dense controls need a network of {', '.join(MODELS)}: "
                                       "a user network has no known width fields to shrink; "
                                       "leave them out of sweep.kinds")
  check_positive_int(config, "sweep.seeds")
  if not isinstance(_get(config, "sweep.parallel_ranks"), bool):
    _fail("sweep.parallel_ranks", config.sweep.parallel_ranks, "must be True or False")


def check_recipe(config, run: str) -> None:
  """Checks the fields of a training recipe section `run` (`configs.mnist.recipe`)."""
  for field in ("epochs", "batch_size"):
    check_positive_int(config, f"{run}.{field}")
  for field in ("patience", "shift"):
    check_positive_int(config, f"{run}.{field}", allow_zero=True)
  _positive_float(config, f"{run}.learning_rate")
  for field in ("warmup_epochs", "weight_decay"):
    _non_negative(config, f"{run}.{field}")
  for field in ("ema_decay", "label_smoothing"):
    _unit_interval(config, f"{run}.{field}", closed_low=True)
  if _get(config, f"{run}.schedule") not in SCHEDULES:
    _fail(f"{run}.schedule", config[run].schedule, f"allowed: {', '.join(SCHEDULES)}")
  if not isinstance(_get(config, f"{run}.flip"), bool):
    _fail(f"{run}.flip", config[run].flip, "must be True or False")


def check_mesh(config) -> None:
  """Checks `mesh.members` and `mesh.data`: integers ≥ 1, or at most one of them -1."""
  for axis in ("members", "data"):
    size = _get(config, f"mesh.{axis}")
    if not is_int(size) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", size, "must be an integer >= 1, or -1 (every device left)")
  if config.mesh.members == -1 and config.mesh.data == -1:
    _fail("mesh", config.mesh.to_dict(), "at most one axis may be -1")


def experiment_fields(config: ml_collections.ConfigDict) -> dict:
  """The config as a dict, less the fields that do not change results (workdir, overwrite,
  checkpoint_every_secs, latency.remeasure, and mesh: results equal one device's up to
  rounding)."""
  fields = config.to_dict()
  for key in ("workdir", "overwrite", "checkpoint_every_secs", "mesh"):
    fields.pop(key, None)
  fields.get("latency", {}).pop("remeasure", None)
  return fields
