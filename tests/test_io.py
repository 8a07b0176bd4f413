"""Tests for lrnet/io.py: content round trips and atomicity."""

import csv
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from lrnet import io


def _leftovers(directory):
  return [name for name in os.listdir(directory) if name.startswith(".tmp-")]


def test_json_round_trip_keeps_order_and_exact_floats(tmp_path):
  path = tmp_path / "results.json"
  obj = {"z": 0.1, "a": [1, 2.5e-300, 1 / 3], "m": {"b": True, "a": None},
         "s": "ü"}
  io.atomic_write_json(path, obj)
  back = io.read_json(path)
  assert back == obj
  assert list(back) == ["z", "a", "m", "s"]
  assert list(back["m"]) == ["b", "a"]
  assert back["a"][2] == 1 / 3  # bit-exact, not just close
  assert _leftovers(tmp_path) == []


def test_json_converts_numpy_and_non_finite(tmp_path):
  path = tmp_path / "r.json"
  f32 = np.float32(0.1)
  io.atomic_write_json(path, {
      "f32": f32, "f64": np.float64(2.0), "i": np.int64(7), "b": np.bool_(True),
      "arr": np.arange(6, dtype=np.int32).reshape(2, 3),
      "nan": float("nan"), "inf": np.float32(np.inf), "nested": (np.nan, 1.0),
      np.int64(3): "numpy key",
  })
  text = path.read_text()
  json.loads(text, parse_constant=pytest.fail)  # strict JSON: no NaN/Infinity
  back = io.read_json(path)
  assert np.float32(back["f32"]) == f32
  assert back["f64"] == 2.0 and back["i"] == 7 and back["b"] is True
  assert back["arr"] == [[0, 1, 2], [3, 4, 5]]
  assert back["nan"] is None and back["inf"] is None
  assert back["nested"] == [None, 1.0]
  assert back["3"] == "numpy key"


def test_json_accepts_jax_arrays(tmp_path):
  jnp = pytest.importorskip("jax.numpy")
  path = tmp_path / "r.json"
  io.atomic_write_json(path, {"x": jnp.array([1.5, 2.0]), "s": jnp.float32(3)})
  assert io.read_json(path) == {"x": [1.5, 2.0], "s": 3.0}


def test_unserialisable_object_keeps_old_file(tmp_path):
  path = tmp_path / "r.json"
  io.atomic_write_json(path, {"version": 1})
  with pytest.raises(TypeError):
    io.atomic_write_json(path, {"version": 2, "bad": object()})
  assert io.read_json(path) == {"version": 1}
  assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_failure_mid_write_keeps_old_file_and_removes_temp(
    tmp_path, monkeypatch, failing):
  path = tmp_path / "r.json"
  io.atomic_write_json(path, {"version": 1})

  def boom(*args, **kwargs):
    raise OSError("disk on fire")

  monkeypatch.setattr(io.os, failing, boom)
  with pytest.raises(OSError, match="disk on fire"):
    io.atomic_write_json(path, {"version": 2})
  monkeypatch.undo()
  assert io.read_json(path) == {"version": 1}
  assert _leftovers(tmp_path) == []


def test_bytes_and_text_round_trip_and_permissions(tmp_path):
  path = tmp_path / "blob.bin"
  io.atomic_write_bytes(path, b"\x00\x01abc")
  assert path.read_bytes() == b"\x00\x01abc"
  # New files get the umask-filtered 0666 of a plain open(), not mkstemp's 0600.
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
  os.chmod(path, 0o640)
  io.atomic_write_text(path, "héllo\n")
  assert path.read_text(encoding="utf-8") == "héllo\n"
  assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


def test_csv_round_trip(tmp_path):
  path = tmp_path / "ranks.csv"
  rows = [{"rank": 10, "accuracy": 0.25, "note": None},
          {"rank": "full", "accuracy": np.float64(0.5)}]
  io.atomic_write_csv(path, rows, fieldnames=["rank", "accuracy", "note"])
  with open(path, newline="") as csv_file:
    back = list(csv.DictReader(csv_file))
  assert back == [{"rank": "10", "accuracy": "0.25", "note": ""},
                  {"rank": "full", "accuracy": "0.5", "note": ""}]
  with pytest.raises(ValueError):  # a key outside fieldnames is a typo
    io.atomic_write_csv(path, [{"rnak": 1}], fieldnames=["rank"])
  assert len(path.read_text().splitlines()) == 3  # old file kept
  io.atomic_write_csv(path, [{"a": 1}, {"b": 2, "a": 3}])
  assert path.read_text() == "a,b\n1,\n3,2\n"


def test_savefig_writes_format_from_suffix(tmp_path):
  figure = pytest.importorskip("matplotlib.figure")
  fig = figure.Figure()
  fig.add_subplot().plot([0, 1], [1, 0])
  io.atomic_savefig(fig, tmp_path / "a.png")
  io.atomic_savefig(fig, tmp_path / "a.svg")
  assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
  assert b"<svg" in (tmp_path / "a.svg").read_bytes()[:1000]
  with pytest.raises(ValueError, match="suffix"):
    io.atomic_savefig(fig, tmp_path / "noext")
  assert _leftovers(tmp_path) == []


_READER_SCRIPT = r"""
import json, os, sys
path, stop_path, payload_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
seen, failures = set(), []
while not os.path.exists(stop_path):
  try:
    with open(path) as json_file:
      obj = json.loads(json_file.read())
    version = obj["version"]
    if obj["payload"] != f"{version:08d}" * payload_size:
      failures.append(f"mixed content in version {version}")
    seen.add(version)
  except (ValueError, KeyError) as error:  # JSONDecodeError is a ValueError
    failures.append(repr(error)[:200])
print(json.dumps({"seen": sorted(seen), "failures": failures[:20]}))
"""


def test_concurrent_reader_never_sees_partial_json(tmp_path, monkeypatch):
  """A reader process polling during 2000 rewrites sees only whole versions."""
  # fsync guards against power loss, not against concurrent readers (that is
  # os.replace's job); skipping it makes the 2000 rewrites ~5x faster.
  monkeypatch.setattr(io.os, "fsync", lambda fd: None)
  path, stop_path = tmp_path / "live.json", tmp_path / "stop"
  payload_size = 1000  # 8 kB per version: several pages

  def write(version):
    io.atomic_write_json(path, {"version": version,
                                "payload": f"{version:08d}" * payload_size})

  write(0)
  reader = subprocess.Popen(
      [sys.executable, "-c", _READER_SCRIPT, str(path), str(stop_path),
       str(payload_size)], stdout=subprocess.PIPE, text=True)
  try:
    for version in range(1, 2001):
      write(version)
  finally:
    stop_path.touch()
    stdout, _ = reader.communicate(timeout=60)
  report = json.loads(stdout)
  assert report["failures"] == []
  assert len(report["seen"]) > 10  # the reader really ran concurrently
  assert set(report["seen"]) <= set(range(2001))
  assert _leftovers(tmp_path) == []
  assert io.read_json(path)["version"] == 2000
