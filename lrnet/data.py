"""Image-classification datasets for lrnet as NumPy train/val/test splits.

MNIST and Fashion-MNIST come from IDX files or TFDS, CIFAR-10 from its python-version
pickles or TFDS; `digits` is scikit-learn's bundled 8x8 set.

`load_dataset` tries these sources in order and uses the first that has the data:

1. `data_dir` when given (IDX files, or CIFAR-10's `cifar-10-batches-py` folder or its
   parent; missing files are an error, never a fallback); `digits` never reads a directory.
2. `$LRNET_DATA_DIR/<name>/` (same layout) when that directory exists.
3. The Debian package directory (`/usr/share/datasets/fashion-mnist/`, from
   `apt-get install dataset-fashion-mnist`) when it exists.
4. A TFDS copy already prepared under the TFDS data dir (`$TFDS_DATA_DIR` or
   `~/tensorflow_datasets`), read through TFDS's array_record data source (no
   TensorFlow needed) or, for TFRecord copies, `as_dataset` (needs TensorFlow).

Nothing is downloaded: with none of these, `DataError` says at once, in one line (no tfds
import), where it looked and how to supply the data.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path
import pickle
import re
from typing import NamedTuple
import zlib

import numpy as np

DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10")
IDX_DATASETS = ("mnist", "fashion_mnist")  # Stored as IDX files.
NUM_CLASSES = 10  # Every dataset has 10-way labels.

# IDX file stems; each may be stored plain or gzip-compressed (`<stem>.gz`).
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_STEMS = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

# CIFAR-10's python version (cifar-10-python.tar.gz): five training batches, one test batch.
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CIFAR10_SIDE = 32

# Datasets standardised per channel: (R, G, B) mean and std of [0, 1]-scaled pixels; the others
# are scaled to [0, 1]. CIFAR-10's are origin notebook 001's constants; the std values are the
# widely copied ones, smaller than the true pixel std (about 0.247, 0.243, 0.261), kept so that
# runs match the notebook.
CHANNEL_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))}

DATA_DIR_ENV = "LRNET_DATA_DIR"
# Distribution packages that install IDX files (Debian: dataset-fashion-mnist).
SYSTEM_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
SYSTEM_PACKAGES = {"fashion_mnist": "dataset-fashion-mnist"}

# digits has no official test set: a fixed, stratified 20 % is held out, the same for
# every `seed`, so runs with different seeds are scored on the same examples.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0
DIGITS_MAX_VALUE = 16.0  # load_digits pixels are counts 0..16.

# IDX type codes (third magic byte) -> big-endian NumPy dtype.
_IDX_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(ValueError):
  """A dataset cannot be found, read or split; the message is one user-facing line."""


class Split(NamedTuple):
  """One split of a dataset."""
  images: np.ndarray  # [N, H, W, C] float32 in [0, 1], or standardised (CHANNEL_STATS)
  labels: np.ndarray  # [N] int32 in [0, num_classes)


class Dataset(NamedTuple):
  """A dataset with disjoint train, validation (a seeded, stratified part of the original
  training set) and test splits."""
  name: str  # One of DATASETS.
  source: str  # "idx:<dir>", "pickle:<dir>", "sklearn" or "tfds:<dir>".
  train: Split
  val: Split
  test: Split
  num_classes: int


class _Raw(NamedTuple):
  """Unsplit arrays from a source, before scaling."""
  train_images: np.ndarray  # [N, H, W] or [N, H, W, C] pixels in [0, max_value]
  train_labels: np.ndarray  # [N] integer
  test_images: np.ndarray  # [M, ...] like train_images
  test_labels: np.ndarray  # [M]
  max_value: float  # Pixel value that maps to 1.0.
  source: str


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (the MNIST format), plain or gzip-compressed (a `.gz` suffix or the
  gzip magic bytes).

  The header is two zero bytes, a type code, the number of dimensions, then each
  dimension as a big-endian uint32; the payload follows in big-endian order.

  Returns:
    Array of shape `dims` in native byte order (e.g. [N, 28, 28] uint8 for images).

  Raises:
    DataError: naming the file, if it cannot be read or is unreadable gzip, has a bad magic
      number or an unknown type code, or its payload length does not match the dimensions.
  """
  path = Path(path)
  try:
    data = path.read_bytes()
  except OSError as error:
    raise DataError(f"{path}: cannot read ({error.strerror or error})") from error
  if path.suffix == ".gz" or data[:2] == _GZIP_MAGIC:
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
      raise DataError(f"{path}: unreadable gzip data ({error})") from error
  if len(data) < 4:
    raise DataError(f"{path}: truncated IDX header ({len(data)} bytes)")
  if data[:2] != b"\x00\x00":
    raise DataError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (not an IDX file)")
  type_code, ndim = data[2], data[3]
  if type_code not in _IDX_DTYPES:
    raise DataError(f"{path}: unknown IDX type code 0x{type_code:02x}")
  header_size = 4 + 4 * ndim
  if ndim == 0 or len(data) < header_size:
    raise DataError(f"{path}: truncated IDX header ({ndim} dimensions, {len(data)} bytes)")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  dtype = _IDX_DTYPES[type_code]
  expected = int(np.prod(dims)) * dtype.itemsize
  payload = len(data) - header_size
  if payload != expected:
    raise DataError(
        f"{path}: IDX payload is {payload} bytes but dimensions {dims} need {expected}"
        + (" (truncated file?)" if payload < expected else " (trailing data)"))
  array = np.frombuffer(data, dtype, offset=header_size).reshape(dims)
  return array.astype(dtype.newbyteorder("="))  # Native order, writable copy.


def _read_idx_dir(directory: Path, name: str) -> _Raw:
  """Reads the four MNIST-format IDX files of `directory`, each `<stem>.gz` or else `<stem>`;
  DataError names the first missing file, or any reading/consistency problem."""
  paths = {}
  for stem in IDX_STEMS:
    paths[stem] = next((path for path in (directory / f"{stem}.gz", directory / stem)
                        if path.is_file()), None)
    if paths[stem] is None:
      raise DataError(
          f"dataset '{name}': {directory} has no {stem}.gz (or {stem}); it needs "
          f"{', '.join(s + '.gz' for s in IDX_STEMS)}")
  train_images, train_labels = _read_idx_pair(paths[TRAIN_IMAGES], paths[TRAIN_LABELS])
  test_images, test_labels = _read_idx_pair(paths[TEST_IMAGES], paths[TEST_LABELS])
  if train_images.shape[1:] != test_images.shape[1:]:
    raise DataError(f"{paths[TRAIN_IMAGES]} has images of shape {train_images.shape[1:]} but "
                    f"{paths[TEST_IMAGES]} has {test_images.shape[1:]}")
  return _Raw(train_images, train_labels, test_images, test_labels, 255.0, f"idx:{directory}")


def _read_idx_pair(image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
  """Reads and cross-checks an image file ([N, H, W] uint8) and its labels ([N] uint8)."""
  images, labels = read_idx(image_path), read_idx(label_path)
  for path, array, ndim, what in ((image_path, images, 3, "[N, H, W] uint8 images"),
                                  (label_path, labels, 1, "[N] uint8 labels")):
    if array.ndim != ndim or array.dtype != np.uint8:
      raise DataError(f"{path}: expected {what}, got {list(array.shape)} {array.dtype}")
  if len(images) != len(labels):
    raise DataError(f"{image_path} has {len(images)} images but {label_path} has "
                    f"{len(labels)} labels")
  return images, labels


class _BatchUnpickler(pickle.Unpickler):
  """Unpickles only what a CIFAR-10 batch holds, so a crafted file cannot run code."""

  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),  # Written by NumPy 1.
              ("numpy._core.multiarray", "_reconstruct"),  # Written by NumPy 2.
              ("numpy", "ndarray"), ("numpy", "dtype"),
              ("_codecs", "encode")}  # Python 3 writes bytes this way in protocol 2.

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
  """Reads one batch file of CIFAR-10's python version.

  The file (e.g. `cifar-10-batches-py/data_batch_1`) is a pickled dict (bytes keys) whose
  `b"data"` is [N, 3072] uint8, each row an image's 1024 red, then 1024 green, then 1024 blue
  pixels, each plane 32x32 in row-major order, and whose `b"labels"` is a list of N ints in
  0..9.

  Returns:
    images [N, 32, 32, 3] uint8 (channels last) and labels [N] int64.

  Raises:
    DataError: naming the file, if it is unreadable, not such a pickle, or its data or
      labels have the wrong type, shape or range.
  """
  path = Path(path)
  try:
    with path.open("rb") as file:
      batch = _BatchUnpickler(file, encoding="bytes").load()
  except OSError as error:
    raise DataError(f"{path}: cannot read ({error.strerror or error})") from error
  except Exception as error:  # Corrupt pickles raise many types; the user needs one line.
    raise DataError(f"{path}: not a readable CIFAR-10 batch ({_one_line(error)})") from error
  if not isinstance(batch, dict):
    raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
  images, labels = batch.get(b"data"), batch.get(b"labels")
  pixels = 3 * CIFAR10_SIDE**2
  if not (isinstance(images, np.ndarray) and images.dtype == np.uint8
          and images.ndim == 2 and images.shape[1] == pixels):
    found = (f"{list(images.shape)} {images.dtype}" if isinstance(images, np.ndarray)
             else type(images).__name__)
    raise DataError(f"{path}: expected b'data' of shape [N, {pixels}] uint8, got {found}")
  if not isinstance(labels, list) or len(labels) != len(images):
    found = len(labels) if isinstance(labels, list) else type(labels).__name__
    raise DataError(f"{path}: expected b'labels' as a list of {len(images)} ints, got {found}")
  bad = [label for label in labels if type(label) is not int or not 0 <= label < NUM_CLASSES]
  if bad:
    raise DataError(f"{path}: label {bad[0]!r} is not an int in 0..{NUM_CLASSES - 1}")
  images = images.reshape(-1, 3, CIFAR10_SIDE, CIFAR10_SIDE).transpose(0, 2, 3, 1)
  return images, np.array(labels, np.int64)


def _read_cifar_dir(directory: Path) -> _Raw:
  """Reads CIFAR-10's six batch files from `directory` or its `cifar-10-batches-py`."""
  if (directory / CIFAR10_FOLDER).is_dir():
    directory = directory / CIFAR10_FOLDER
  missing = [name for name in CIFAR10_BATCHES if not (directory / name).is_file()]
  if missing:
    raise DataError(
        f"dataset 'cifar10': {directory} has no {missing[0]}; it needs "
        f"{', '.join(CIFAR10_BATCHES)} (or a {CIFAR10_FOLDER} folder holding them)")
  images, labels = zip(*(read_cifar_batch(directory / name) for name in CIFAR10_BATCHES))
  return _Raw(np.concatenate(images[:-1]), np.concatenate(labels[:-1]), images[-1], labels[-1],
              255.0, f"pickle:{directory}")


def _read_digits() -> _Raw:
  """scikit-learn's 1,797 8x8 digits, with a fixed stratified 20 % test set."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images, labels = digits.images, digits.target  # [1797, 8, 8] float64 0..16, [1797]
  train_index, test_index = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
  return _Raw(images[train_index], labels[train_index], images[test_index],
              labels[test_index], DIGITS_MAX_VALUE, "sklearn")


def tfds_data_dir() -> Path:
  """The TFDS data directory: `$TFDS_DATA_DIR`, else `~/tensorflow_datasets`."""
  return Path(os.environ.get("TFDS_DATA_DIR") or Path.home() / "tensorflow_datasets")


def find_prepared_tfds(name: str, root: str | os.PathLike) -> Path | None:
  """Returns the newest prepared version directory `<root>/<name>/<x.y.z>/`, or None.

  A version counts as prepared when it holds `dataset_info.json`; TFDS's unfinished
  `incomplete.*` directories do not parse as versions and are ignored. Only the file
  system is consulted: TFDS is not imported.
  """
  versions = [(tuple(map(int, directory.name.split("."))), directory)
              for directory in Path(root, name).glob("*")
              if re.fullmatch(r"\d+\.\d+\.\d+", directory.name)
              and (directory / "dataset_info.json").is_file()]
  return max(versions)[1] if versions else None


def _tensorflow_installed() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _read_tfds_prepared(name: str, version_dir: Path) -> _Raw:
  """Reads the train and test splits of a prepared TFDS dataset (module docstring, source 4)."""
  has_array_record = any(version_dir.glob(f"{name}-*.array_record*"))
  if not has_array_record and not _tensorflow_installed():
    raise DataError(
        f"the TFDS copy of '{name}' at {version_dir} is in TFRecord format, which needs "
        "TensorFlow (not installed): pip install tensorflow, re-prepare it with "
        f"file_format='array_record', or {_local_hint(name)}")
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(str(version_dir))
    sources, arrays = builder.as_data_source() if has_array_record else None, []
    for split in ("train", "test"):
      if has_array_record:
        source = sources[split]
        examples = source.__getitems__(list(range(len(source))))
        images, labels = (np.stack([e["image"] for e in examples]),
                          np.array([e["label"] for e in examples]))
      else:
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = batch["image"], batch["label"]
      # [N, H, W, 1] -> [N, H, W]: TFDS image features carry a channel axis.
      arrays += [images[..., 0] if images.ndim == 4 and images.shape[-1] == 1 else images,
                 labels]
  except Exception as error:  # TFDS raises many types; the user needs one line.
    raise DataError(f"could not read the TFDS copy of '{name}' at {version_dir}: "
                    f"{_one_line(error)}") from error
  return _Raw(*arrays, 255.0, f"tfds:{version_dir}")


def _local_hint(name: str) -> str:
  """How to supply `name` as local files."""
  if name in IDX_DATASETS:
    files = ", ".join(f"{stem}.gz" for stem in IDX_STEMS)
    return (f"set data.dir (--config.data.dir=DIR) or ${DATA_DIR_ENV}/{name} to a directory "
            f"with {files}")
  return (f"download cifar-10-python.tar.gz from {CIFAR10_URL}, extract it and set data.dir "
          f"(--config.data.dir=DIR) to its {CIFAR10_FOLDER} folder")


def _missing_message(name: str, searched: list[Path]) -> str:
  """One line: `name` is in none of `searched`, and every way to supply it."""
  ways = [_local_hint(name)]
  if name in SYSTEM_PACKAGES:
    ways.append(f"apt-get install -y {SYSTEM_PACKAGES[name]}")
  ways.append(
      "on a machine with network run python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', file_format='array_record').download_and_prepare()\" and copy "
      f"~/tensorflow_datasets/{name} to {tfds_data_dir() / name}")
  return (f"dataset '{name}' not found (searched {', '.join(map(str, searched))}): "
          + "; or ".join(ways))


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def _find_raw(name: str, data_dir: str | os.PathLike | None) -> _Raw:
  """Reads the unsplit arrays of `name` from the first source that has them."""
  if name == "digits":
    if data_dir is not None:
      raise DataError(f"dataset 'digits' is bundled with scikit-learn and reads no "
                      f"directory: leave data.dir unset (got {data_dir})")
    return _read_digits()
  if data_dir is not None and not Path(data_dir).is_dir():
    raise DataError(f"data.dir={data_dir} is not a directory (dataset '{name}')")
  local_dirs = [Path(os.environ[DATA_DIR_ENV], name)] if os.environ.get(DATA_DIR_ENV) else []
  if name in SYSTEM_DIRS:
    local_dirs.append(SYSTEM_DIRS[name])
  local = Path(data_dir) if data_dir is not None else next(
      (directory for directory in local_dirs if directory.is_dir()), None)
  if local is not None:  # IDX files or CIFAR-10 batches
    return _read_idx_dir(local, name) if name in IDX_DATASETS else _read_cifar_dir(local)
  if (prepared := find_prepared_tfds(name, tfds_data_dir())) is not None:
    return _read_tfds_prepared(name, prepared)
  raise DataError(_missing_message(name, local_dirs + [tfds_data_dir() / name]))


def stratified_split(labels: np.ndarray, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits the indices of examples with [N] integer `labels` into kept and held-out parts.

  Each class holds out `round(fraction * count)` of its examples, chosen by a
  permutation seeded with `seed`, so the held-out part has the class balance of the whole.

  Returns:
    `(kept, held)`: sorted, disjoint index arrays that together cover range(N).
  """
  rng = np.random.default_rng(seed)
  held = [rng.permutation(np.flatnonzero(labels == label)) for label in np.unique(labels)]
  held = np.sort(np.concatenate(
      [index[:int(np.floor(fraction * len(index) + 0.5))] for index in held]))
  kept = np.setdiff1d(np.arange(len(labels)), held, assume_unique=True)
  return kept, held


def _make_split(name: str, images: np.ndarray, labels: np.ndarray, max_value: float) -> Split:
  """[N, H, W(, C)] pixels in [0, max_value] -> Split of [N, H, W, C] float32 images.

  Pixels are scaled to [0, 1], then for datasets in CHANNEL_STATS standardised per
  channel: (x / max_value - mean) / std.
  """
  scaled = np.divide(images, np.float32(max_value), dtype=np.float32)
  if scaled.ndim == 3:
    scaled = scaled[..., None]
  if name in CHANNEL_STATS:
    # Notebook 001 meant this but wrote `x /- mean`, an expression whose result was
    # discarded, so its mean was never subtracted; here it is.
    mean, std = CHANNEL_STATS[name]
    scaled = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return Split(scaled, labels.astype(np.int32))


def load_dataset(name: str, data_dir: str | os.PathLike | None = None,
                 val_fraction: float = 0.1, seed: int = 0) -> Dataset:
  """Loads a dataset with a seeded validation split carved from its training set, from the
  first source that has it (module docstring).

  Args:
    name: one of DATASETS.
    data_dir: the directory of source 1 (module docstring); None: the other sources.
    val_fraction: share of each training class moved to the validation split, in (0, 1).
    seed: seeds the validation split; the test split does not depend on it.

  Returns:
    Dataset whose splits hold [N, H, W, C] float32 images and [N] int32 labels: [N, 28,
    28, 1] in [0, 1] (digits: [N, 8, 8, 1]), cifar10 [N, 32, 32, 3] standardised per
    channel with CHANNEL_STATS.

  Raises:
    DataError: unknown name, bad val_fraction, or data that cannot be found or read.
  """
  if name not in DATASETS:
    raise DataError(f"unknown dataset '{name}': data.name must be one of "
                    f"{', '.join(DATASETS)}")
  if not 0.0 < val_fraction < 1.0:
    raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
  raw = _find_raw(name, data_dir)
  for labels in raw.train_labels, raw.test_labels:
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise DataError(f"dataset '{name}' ({raw.source}): labels span "
                      f"[{labels.min()}, {labels.max()}], expected 0..{NUM_CLASSES - 1}")
  train_index, val_index = stratified_split(raw.train_labels, val_fraction, seed)
  if not len(train_index) or not len(val_index):
    raise DataError(f"data.val_fraction={val_fraction} leaves an empty train or "
                    f"validation split of dataset '{name}' ({len(raw.train_labels)} "
                    "training examples)")
  splits = [(raw.train_images[index], raw.train_labels[index])
            for index in (train_index, val_index)] + [(raw.test_images, raw.test_labels)]
  return Dataset(name, raw.source,
                 *(_make_split(name, images, labels, raw.max_value) for images, labels in splits),
                 num_classes=NUM_CLASSES)
