"""Config checking: every field of a sweep config is validated before any work starts.

Errors are `ConfigError`s with one line naming the field, its value and what is allowed.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import ml_collections

from lrnet import allocation
from lrnet import data

MODELS = ("mlp", "convnet", "resmlp", "cnn")  # lrnet.models.NETWORKS
NUM_CLASSES = 10
PROJECTION_METHODS = ("exact", "alternating")
REMOVED_PROJECTION_METHODS = ("streaming", "subspace")
STUDENT_KINDS = ("straight_through", "factorized", "dense_control")
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


def _positive_float(config, field: str):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
    _fail(field, value, "must be a number > 0")


def _non_negative(config, field: str):
  value = _get(config, field)
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
    _fail(field, value, "must be a number >= 0")


def _unit_interval(config, field: str, closed_low: bool):
  value = _get(config, field)
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
      (0 <= value < 1) if closed_low else (0 < value < 1))
  if not ok:
    _fail(field, value, "must be in [0, 1)" if closed_low else "must be in (0, 1)")


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


def check_teacher_dir(path) -> None:
  """Raises ConfigError unless `path` is None or a sweep workdir holding models/teacher."""
  if path is not None and not os.path.isdir(os.path.join(path, "models", "teacher")):
    _fail("teacher_dir", path,
          "expected a sweep workdir holding models/teacher (from python -m experiments.train)")


def check_rank_value(value, shapes, field: str) -> None:
  """A sweep rank: an int ≤ every compressed layer's min(m, n) (`shapes`: their (m, n); None:
  not known yet, the form alone is checked), a fraction in (0, 1], or 'full'."""
  if value == "full":
    return
  if is_int(value):
    if value < 1:
      _fail(field, value, "an integer rank must be >= 1; or a fraction in (0, 1], or 'full'")
    if shapes:
      max_rank = min(min(shape) for shape in shapes)
      if value > max_rank:
        _fail(field, value, f"an integer rank must be in 1..{max_rank} (the smallest compressed "
                            f"layer {min(shapes, key=min)} allows at most {max_rank}); or a "
                            f"fraction in (0, 1], or 'full'")
    return
  if isinstance(value, float):
    if not 0.0 < value <= 1.0:
      _fail(field, value, "a rank fraction must be in (0, 1]; or an integer rank, or 'full'")
    return
  _fail(field, value, "must be an integer rank, a fraction in (0, 1], or 'full'")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of a sweep/train config.

  Raises:
    ConfigError: the first invalid field, in one line.
  """
  workdir = _get(config, "workdir")
  if not isinstance(workdir, str) or not workdir:
    _fail("workdir", workdir, "must be a non-empty directory path")
  check_workdir(workdir)
  if not is_int(_get(config, "seed")):
    _fail("seed", config.seed, "must be an integer")
  name = _get(config, "data.name")
  if name not in data.DATASETS:
    _fail("data.name", name, f"allowed: {', '.join(data.DATASETS)}")
  data_dir = _get(config, "data.dir")
  if data_dir is not None and not isinstance(data_dir, str):
    _fail("data.dir", data_dir, "must be a directory path or None")
  _unit_interval(config, "data.val_fraction", closed_low=False)

  model = _get(config, "model.name")
  if model not in MODELS:
    _fail("model.name", model, f"allowed: {', '.join(MODELS)}")
  widths = {"mlp": "hidden", "convnet": "dense"}.get(model)
  if widths is not None and widths in config.model:
    value = config.model[widths]
    if (not isinstance(value, (tuple, list)) or not value
        or not all(is_int(h) and h >= 1 for h in value)):
      _fail(f"model.{widths}", value, "must be a non-empty tuple of positive integers, e.g. (1024,)*5")
  if model == "resmlp":
    for field in ("width", "blocks"):
      if field in config.model:
        check_positive_int(config, f"model.{field}")

  for run in ("teacher", "student"):
    check_positive_int(config, f"{run}.epochs")
    check_positive_int(config, f"{run}.batch_size")
    _positive_float(config, f"{run}.learning_rate")
    check_positive_int(config, f"{run}.patience", allow_zero=True)
    _unit_interval(config, f"{run}.ema_decay", closed_low=True)
    if _get(config, f"{run}.schedule") not in SCHEDULES:
      _fail(f"{run}.schedule", config[run].schedule, f"allowed: {', '.join(SCHEDULES)}")
    _non_negative(config, f"{run}.warmup_epochs")
    _non_negative(config, f"{run}.weight_decay")
    _unit_interval(config, f"{run}.label_smoothing", closed_low=True)
    check_positive_int(config, f"{run}.shift", allow_zero=True)
    if not isinstance(_get(config, f"{run}.flip"), bool):
      _fail(f"{run}.flip", config[run].flip, "must be True or False")
  weight = _get(config, "student.distillation.weight")
  if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight <= 1:
    _fail("student.distillation.weight", weight, "must be in [0, 1] (0: no distillation)")
  _positive_float(config, "student.distillation.temperature")

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
  if not isinstance(_get(config, "sweep.parallel_ranks"), bool):
    _fail("sweep.parallel_ranks", config.sweep.parallel_ranks, "must be True or False")
  every = _get(config, "checkpoint_every_secs")
  if isinstance(every, bool) or not isinstance(every, numbers.Real) or not every >= 0:
    _fail("checkpoint_every_secs", every, "must be a number of seconds >= 0 (0: every epoch)")
  for axis in ("members", "data"):
    size = _get(config, f"mesh.{axis}")
    if not is_int(size) or (size < 1 and size != -1):
      _fail(f"mesh.{axis}", size, "must be an integer >= 1, or -1 (every device left)")
  if config.mesh.members == -1 and config.mesh.data == -1:
    _fail("mesh", config.mesh.to_dict(), "at most one axis may be -1")
  check_positive_int(config, "latency.batch_size")
  check_positive_int(config, "latency.repeats")


def experiment_fields(config: ml_collections.ConfigDict) -> dict:
  """The config as a dict, less the fields that do not change results (workdir, overwrite,
  checkpoint_every_secs, and mesh: results equal one device's up to rounding)."""
  fields = config.to_dict()
  for key in ("workdir", "overwrite", "checkpoint_every_secs", "mesh"):
    fields.pop(key, None)
  return fields
