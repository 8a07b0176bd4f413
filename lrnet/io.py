"""Atomic writes of result files (JSON, CSV, text, figures) and JSON reading.

A reader never sees a partial file: each writer fills a temporary file in the target's
directory, fsyncs it and renames it over the target. JSON is strict (NaN and ±inf are written as
``null``, :func:`to_jsonable`), finite floats round-trip exactly, and mapping order is kept.
"""

from __future__ import annotations

import contextlib
import csv
import io as _io
import json
import math
import os
import secrets
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def _open_temporary(directory: str, name: str) -> tuple[int, str]:
  """(fd, path) of a new ``<directory>/.tmp-<name>-<random>`` file, mode 0o666 filtered by the
  umask as for a plain ``open(path, "w")`` (``tempfile.mkstemp`` would force 0600)."""
  while True:
    tmp_path = os.path.join(directory, f".tmp-{name}-{secrets.token_hex(6)}")
    try:
      return os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_path
    except FileExistsError:
      continue


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` (whose directory must exist) so that readers see the old or the
  new content (module docstring), then fsyncs the directory (POSIX). On any exception the
  temporary file is removed and `path` is untouched; an existing target keeps its permissions.
  """
  path = os.fspath(path)
  directory, name = os.path.split(os.path.abspath(path))
  fd, tmp_path = _open_temporary(directory, name)
  try:
    with os.fdopen(fd, "wb") as tmp_file:
      tmp_file.write(data)
      tmp_file.flush()
      if os.path.exists(path):
        os.chmod(tmp_file.fileno(), os.stat(path).st_mode & 0o7777)
      os.fsync(tmp_file.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp_path)
    raise
  if hasattr(os, "O_DIRECTORY"):  # makes the rename durable
    directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
      os.fsync(directory_fd)
    finally:
      os.close(directory_fd)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
  """Atomically writes `text` (see :func:`atomic_write_bytes`)."""
  atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
  """Converts a tree of containers, numbers, strings and arrays to plain JSON types, keeping
  mapping order: mappings -> dict (numpy scalar keys become Python scalars); lists and tuples
  (NamedTuples included) -> list; numpy/JAX arrays and scalars -> nested lists,
  ``int``/``float``/``bool``; NaN and ±inf -> ``None``. Anything else (e.g. an arbitrary object)
  is returned unchanged, so that ``json.dumps`` raises ``TypeError`` on it.
  """
  if isinstance(obj, (str, bool, int)) or obj is None:
    return obj
  if isinstance(obj, float):
    return obj if math.isfinite(obj) else None
  if isinstance(obj, Mapping):
    return {(key.item() if isinstance(key, np.generic) else key): to_jsonable(value)
            for key, value in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(value) for value in obj]
  if hasattr(obj, "dtype") and hasattr(obj, "__array__"):  # numpy or jax: .tolist() is Python
    return to_jsonable(np.asarray(obj).tolist())
  return obj


def dumps_json(obj: Any, indent: int | None = 2) -> str:
  """Serialises `obj` as strict JSON after :func:`to_jsonable`.

  Raises:
    TypeError: if `obj` holds something JSON cannot represent.
  """
  return json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
  """Atomically writes `obj` as JSON (:func:`dumps_json`; keys are not sorted). An
  unserialisable object raises ``TypeError`` before any file is touched."""
  atomic_write_text(path, dumps_json(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file (``null`` stays ``None``)."""
  with open(path, encoding="utf-8") as json_file:
    return json.load(json_file)


def atomic_write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
                     fieldnames: Sequence[str] | None = None) -> None:
  """Atomically writes `rows` (one mapping per row) as CSV with a header line. Columns are
  `fieldnames`, default: keys in order of first appearance. Missing keys and ``None`` become
  empty cells; a key absent from `fieldnames` raises ``ValueError`` (catches typos)."""
  rows = list(rows)
  if fieldnames is None:
    fieldnames = list(dict.fromkeys(key for row in rows for key in row))
  buffer = _io.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
  writer.writeheader()
  writer.writerows(rows)
  atomic_write_text(path, buffer.getvalue())


def atomic_savefig(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> None:
  """Atomically saves a matplotlib figure to `path` (e.g. ``plots/accuracy.png``, ``.pdf``,
  ``.svg``: the format comes from the suffix); `savefig_kwargs` go to ``Figure.savefig``."""
  suffix = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
  if not suffix:
    raise ValueError(f"Cannot infer the figure format of {path!r}: no suffix.")
  buffer = _io.BytesIO()
  fig.savefig(buffer, format=suffix, **savefig_kwargs)
  atomic_write_bytes(path, buffer.getvalue())
