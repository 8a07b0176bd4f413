"""Byte-level text for language models: a corpus of UTF-8 files as next-byte windows.

The corpus is the bytes of `data.path` — a file, a directory (every UTF-8 file under it,
recursively) or a glob — in sorted path order, cut to the first `max_bytes`. With no path it is
the running Python's standard-library sources (`*.py` under `sysconfig.get_paths()["stdlib"]`,
tests and installed packages left out): every machine has them, but they differ between Python
versions, and so do the numbers measured on them.

The corpus is split into three contiguous blocks, train | validation | test (validation and
test `val_fraction` each), and each block into non-overlapping windows: window i of a block b
holds inputs b[i·T : i·T + T] and targets b[i·T + 1 : i·T + T + 1] (T = `context`), so no byte
of one split is seen, as input or target, in another. Every byte is a symbol of 256.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
import sysconfig

import numpy as np

from lrnet import data

NAME = "text"
NUM_SYMBOLS = 256
STDLIB_EXCLUDED_DIRS = ("test", "tests", "idle_test", "site-packages", "dist-packages")


def stdlib_files() -> list[Path]:
  """The standard library's `*.py` files, sorted by path below the stdlib root, without the
  test suites and installed packages (`STDLIB_EXCLUDED_DIRS`)."""
  root = Path(sysconfig.get_paths()["stdlib"])
  files = [path for path in root.rglob("*.py")
           if not set(path.relative_to(root).parts[:-1]) & set(STDLIB_EXCLUDED_DIRS)]
  return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def _is_utf8(path: Path) -> bool:
  try:
    path.read_bytes().decode("utf-8")
  except (UnicodeDecodeError, OSError):
    return False
  return True


def corpus_files(path: str | None) -> list[Path]:
  """The files of a corpus `data.path` (module docstring), in the order they are read.

  Raises:
    data.DataError: (one line naming data.path) nothing there, or no UTF-8 file in it.
  """
  if path is None:
    return stdlib_files()
  target = Path(path).expanduser()
  if target.is_file():
    files = [target]
  elif target.is_dir():
    files = sorted(p for p in target.rglob("*") if p.is_file())
  else:
    files = sorted(Path(p) for p in glob.glob(os.path.expanduser(path), recursive=True)
                   if Path(p).is_file())
    if not files:
      raise data.DataError(f"data.path={path!r} is no file, directory or glob matching files "
                           "(a UTF-8 corpus; None: the Python standard library's sources)")
  texts = [p for p in files if _is_utf8(p)]
  if not texts:
    raise data.DataError(f"data.path={path!r} holds no UTF-8 text file ({len(files)} files read)")
  return texts


def read_corpus(path: str | None, max_bytes: int) -> tuple[np.ndarray, str]:
  """The first `max_bytes` bytes of the corpus at `path`: (uint8 [n], a description).

  Raises:
    data.DataError: no corpus there, or an empty one.
  """
  files, chunks, size = corpus_files(path), [], 0
  for file in files:
    if size >= max_bytes:
      break
    chunks.append(file.read_bytes()[:max_bytes - size])
    size += len(chunks[-1])
  if not size:
    raise data.DataError(f"data.path={path!r} is empty: its {len(files)} UTF-8 files hold no byte")
  where = "python stdlib " + sysconfig.get_python_version() if path is None else str(path)
  return np.frombuffer(b"".join(chunks), np.uint8), f"text:{where} ({size:,} bytes)"


def windows(block: np.ndarray, context: int) -> data.Split:
  """A block of bytes [n] as next-byte windows: inputs [W, context] and targets [W, context],
  int32, W = (n − 1) // context; targets are the inputs shifted by one byte."""
  count = max((block.size - 1) // context, 0)
  inputs = block[:count * context].reshape(count, context)
  targets = block[1:count * context + 1].reshape(count, context)
  return data.Split(inputs.astype(np.int32), targets.astype(np.int32))


def load_text(path: str | None, max_bytes: int, context: int,
              val_fraction: float) -> data.Dataset:
  """The first `max_bytes` of the corpus at `path` (module docstring) as a `data.Dataset` of
  next-byte windows of T = `context` bytes, `val_fraction` of it for validation and as much for
  test. Its splits hold int32 [W, T] inputs ("images") and [W, T] targets ("labels");
  `num_classes` is 256.

  Raises:
    data.DataError: a missing or empty corpus, or one too short for a window in every split.
  """
  corpus, source = read_corpus(path, max_bytes)
  held = int(corpus.size * val_fraction)
  blocks = np.split(corpus, [corpus.size - 2 * held, corpus.size - held])
  train, val, test = (windows(block, context) for block in blocks)
  if not min(len(s.labels) for s in (train, val, test)):
    raise data.DataError(f"data.path={path!r}: {corpus.size} bytes leave a split without a "
                         f"window of data.context={context} bytes (data.val_fraction="
                         f"{val_fraction}); use a longer corpus or a shorter context")
  return data.Dataset(NAME, source, train, val, test, NUM_SYMBOLS)
