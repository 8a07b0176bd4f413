"""Tests for lrnet/metrics.py: JSONL + TensorBoard logs, kills and resumes."""

import glob
import json
import math
import os
import pathlib
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from lrnet import metrics


def _read_events(logdir):
  """All events of the TFRecord event files in `logdir` (no TF needed).

  Record layout: uint64 length, uint32 crc(length), payload, uint32 crc.
  """
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as event_file:
      data = event_file.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      events.append(event_pb2.Event.FromString(payload))
      offset += 12 + length + 4
  return events


def _scalars(logdir):
  """{tag: [(step, value), ...]} from the event files."""
  scalars = {}
  for event in _read_events(logdir):
    for value in event.summary.value:
      scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_writes_json_lines_and_tensorboard_scalars(tmp_path):
  with metrics.MetricsWriter(tmp_path, "teacher") as writer:
    writer.write(1, {"loss": jnp.float32(2.5), "accuracy": np.float64(0.25),
                     "lr": 1e-3, "epoch": np.int32(0), "phase": "train"})
    writer.write(np.int64(2), {"loss": 1.5, "accuracy": jnp.array(0.5),
                               "sizes": [1, 2]})
    # Lines are flushed as written: readable while the writer is open.
    lines = (tmp_path / "metrics" / "teacher.jsonl").read_text().splitlines()
    assert len(lines) == 2
  records = metrics.read_metrics(tmp_path / "metrics" / "teacher.jsonl")
  assert records == [
      {"run": "teacher", "step": 1, "loss": 2.5, "accuracy": 0.25,
       "lr": 1e-3, "epoch": 0, "phase": "train"},
      {"run": "teacher", "step": 2, "loss": 1.5, "accuracy": 0.5,
       "sizes": [1, 2]},
  ]
  assert [json.loads(line) for line in lines] == records
  logdir = tmp_path / "tensorboard" / "teacher"
  assert glob.glob(str(logdir / "events.out.tfevents.*"))
  scalars = _scalars(logdir)
  assert set(scalars) == {"loss", "accuracy", "lr", "epoch"}  # no strings
  assert scalars["loss"] == [(1, 2.5), (2, 1.5)]
  assert scalars["accuracy"] == [(1, 0.25), (2, 0.5)]
  assert scalars["lr"] == [(1, pytest.approx(1e-3))]


def test_runs_get_separate_files(tmp_path):
  for run in ("teacher", "student_r10_straight_through"):
    with metrics.MetricsWriter(tmp_path, run) as writer:
      writer.write(0, {"loss": 1.0})
  assert sorted(os.listdir(tmp_path / "metrics")) == [
      "student_r10_straight_through.jsonl", "teacher.jsonl"]
  assert sorted(os.listdir(tmp_path / "tensorboard")) == [
      "student_r10_straight_through", "teacher"]
  records = metrics.read_metrics(
      metrics.metrics_path(tmp_path, "student_r10_straight_through"))
  assert records == [{"run": "student_r10_straight_through", "step": 0,
                      "loss": 1.0}]


def test_nan_is_null_in_json_and_nan_in_tensorboard(tmp_path):
  with metrics.MetricsWriter(tmp_path, "run") as writer:
    writer.write(0, {"loss": float("nan")})
  text = pathlib.Path(metrics.metrics_path(tmp_path, "run")).read_text()
  assert json.loads(text) == {"run": "run", "step": 0, "loss": None}
  (point,) = _scalars(metrics.tensorboard_dir(tmp_path, "run"))["loss"]
  assert point[0] == 0 and math.isnan(point[1])


def test_rejects_reserved_names(tmp_path):
  with metrics.MetricsWriter(tmp_path, "run") as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write(0, {"step": 3})
  for bad_name in ("", "a/b", ".."):
    with pytest.raises(ValueError):
      metrics.MetricsWriter(tmp_path, bad_name)


def test_read_metrics_ignores_truncated_last_line(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
                  '{"step": 3, "lo')
  assert metrics.read_metrics(path) == [{"step": 1, "loss": 1.0},
                                        {"step": 2, "loss": 0.5}]
  path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
  with pytest.raises(ValueError, match=":2: corrupt"):
    metrics.read_metrics(path)


def test_resume_drops_later_steps_and_fresh_run_starts_over(tmp_path):
  path = metrics.metrics_path(tmp_path, "student")
  writer = metrics.MetricsWriter(tmp_path, "student")
  for step in range(1, 6):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  with open(path, "a") as jsonl_file:  # killed in the middle of a line
    jsonl_file.write('{"run": "student", "step": 6, "lo')

  # Resumed from the checkpoint of step 3: steps 4.. are redone.
  with metrics.MetricsWriter(tmp_path, "student",
                             resume_from_step=3) as writer:
    assert [r["step"] for r in metrics.read_metrics(path)] == [1, 2, 3]
    for step in (4, 5):
      writer.write(step, {"loss": 10.0 * step})
  records = metrics.read_metrics(path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert [r["loss"] for r in records] == [1.0, 0.5, 1.0 / 3, 40.0, 50.0]
  # TensorBoard is told to hide the first attempt's events after step 3.
  events = _read_events(metrics.tensorboard_dir(tmp_path, "student"))
  purges = [e.step for e in events
            if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [4]

  # Resuming with no checkpoint-covered step keeps nothing; so does a new run.
  metrics.MetricsWriter(tmp_path, "student", resume_from_step=0).close()
  assert metrics.read_metrics(path) == []
  with metrics.MetricsWriter(tmp_path, "student") as writer:
    writer.write(7, {"loss": 7.0})
  assert metrics.read_metrics(path) == [{"run": "student", "step": 7,
                                         "loss": 7.0}]
