"""Metrics logs of a run: JSON lines (the record) plus TensorBoard scalars.

Layout under a workdir, one name per run (``teacher``, ``student_r10_straight_through``, ...)::

  <workdir>/metrics/<run_name>.jsonl     {"run": ..., "step": ..., <metrics>}
  <workdir>/tensorboard/<run_name>/      events.out.tfevents.*

so that ``tensorboard --logdir <workdir>/tensorboard`` (or ``<workdir>``) lists each run. JSON
values follow :func:`lrnet.io.to_jsonable`: numpy/JAX scalars become Python numbers, NaN/inf
``null``.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

from lrnet import io

_RESERVED_KEYS = ("run", "step")


def metrics_path(workdir: str | os.PathLike, run_name: str) -> str:
  """``<workdir>/metrics/<run_name>.jsonl``."""
  return os.path.join(os.fspath(workdir), "metrics", f"{run_name}.jsonl")


def tensorboard_dir(workdir: str | os.PathLike, run_name: str) -> str:
  """``<workdir>/tensorboard/<run_name>``."""
  return os.path.join(os.fspath(workdir), "tensorboard", run_name)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSONL file of :class:`MetricsWriter`, one dict per complete line in file
  order. A partial last line (a process killed mid-write) is dropped.

  Raises:
    ValueError: if a line other than the last one is not valid JSON (real corruption).
  """
  with open(path, encoding="utf-8") as jsonl_file:
    lines = jsonl_file.read().splitlines()
  records = []
  for index, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as error:
      if index == len(lines) - 1:
        break
      raise ValueError(f"{path}:{index + 1}: corrupt metrics line") from error
  return records


def _as_scalar(value: Any) -> float | None:
  """The float value of a real scalar (Python, numpy, 0-d array), else None."""
  if isinstance(value, (numbers.Real, np.bool_)):
    return float(value)
  if hasattr(value, "dtype") and hasattr(value, "__array__"):
    array = np.asarray(value)
    if array.ndim == 0 and array.dtype.kind in "biuf":
      return float(array)
  return None


class MetricsWriter:
  """Appends metrics of one run to a JSONL file and TensorBoard.

  A fresh writer (``resume_from_step=None``) starts the JSONL file over. A resumed one keeps
  only the lines with ``step <= resume_from_step`` (those covered by the checkpoint it resumes
  from), so a killed and resumed run has no duplicate steps; TensorBoard hides events after it.
  Use it as a context manager, or `close` it.
  """

  def __init__(self, workdir: str | os.PathLike, run_name: str,
               resume_from_step: int | None = None):
    """Opens the logs of `run_name` (a file name: no path separators) under `workdir`."""
    if not run_name or os.sep in run_name or run_name in (".", ".."):
      raise ValueError(f"Invalid run name {run_name!r}.")
    self.run_name = run_name
    self.path = metrics_path(workdir, run_name)
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    kept_lines = ""
    if resume_from_step is not None and os.path.exists(self.path):
      kept_lines = "".join(json.dumps(record, allow_nan=False) + "\n"
                           for record in read_metrics(self.path)
                           if record.get("step") is not None and record["step"] <= resume_from_step)
    # Rewritten atomically so that a crash here loses nothing already logged.
    io.atomic_write_text(self.path, kept_lines)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    purge_step = None if resume_from_step is None else resume_from_step + 1
    self._tensorboard = SummaryWriter(tensorboard_dir(workdir, run_name), purge_step=purge_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `metrics` {name: value} at `step`: one flushed JSON line; real scalars (Python,
    numpy, JAX, 0-d arrays) also go to TensorBoard, other JSON-able values only to the JSONL.

    Raises:
      ValueError: if a metric is named ``run`` or ``step``.
    """
    clashes = [key for key in _RESERVED_KEYS if key in metrics]
    if clashes:
      raise ValueError(f"Metric names {clashes} are reserved.")
    step = int(step)
    self._jsonl.write(io.dumps_json({"run": self.run_name, "step": step, **metrics},
                                    indent=None) + "\n")
    self._jsonl.flush()
    for name, value in metrics.items():
      scalar = _as_scalar(value)
      if scalar is not None:  # NaN included: TensorBoard shows divergence
        self._tensorboard.add_scalar(name, scalar, global_step=step)

  def close(self) -> None:
    """Flushes and closes both logs."""
    self._jsonl.close()
    self._tensorboard.close()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
