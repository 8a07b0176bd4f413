"""Tests for lrnet/data.py: IDX and CIFAR-10 reading, sources and their order, the offline
failure, splits."""

import gzip
import hashlib
from pathlib import Path
import pickle
import re
import struct
import sys
import time

import numpy as np
import pytest

from lrnet import data

MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
needs_mnist = pytest.mark.skipif(
    not (MNIST_DIR / "MD5SUMS").is_file(),
    reason=f"the real MNIST files are not in {MNIST_DIR} (the shared/ folder beside the checkout)")
needs_fashion = pytest.mark.skipif(
    not FASHION_DIR.is_dir(),
    reason=f"{FASHION_DIR} is missing: `apt-get install -y dataset-fashion-mnist` provides it")
# Published class counts of the MNIST label files.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
               np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D,
               np.dtype(np.float64): 0x0E}


def _idx_bytes(array):
  """The IDX encoding of `array`, written independently of the reader under test."""
  array = np.asarray(array)
  header = struct.pack(">BBBB", 0, 0, _TYPE_CODES[array.dtype], array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def _write(path, payload):
  path = Path(path)
  path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)
  return path


def _fake_images(n, offset, shape=(5, 4)):
  """[n, *shape] uint8 images; pixel 0 is an example id, pixel 1 encodes its label."""
  images = np.zeros((n, *shape), np.uint8)
  labels = (np.arange(n) % 10).astype(np.uint8)
  images[:, 0, 0] = (np.arange(n) + offset) % 256
  images[:, 0, 1] = labels * 20
  images[:, -1, -1] = 255  # The range must reach exactly 1.0.
  return images, labels


def _write_idx_dir(directory, n_train=200, n_test=50, compress=(True, True, False, True)):
  """Writes a complete IDX dataset (mixing plain and gzip files); returns its arrays."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  train_images, train_labels = _fake_images(n_train, 0)
  test_images, test_labels = _fake_images(n_test, 100)
  arrays = (train_images, train_labels, test_images, test_labels)
  for stem, array, gz in zip(data.IDX_STEMS, arrays, compress):
    _write(directory / (stem + ".gz" if gz else stem), _idx_bytes(array))
  return arrays


def _splits(dataset):
  return dataset.train, dataset.val, dataset.test


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
  """No $LRNET_DATA_DIR, an empty TFDS data dir, no system directories."""
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  monkeypatch.setattr(data, "SYSTEM_DIRS", {})


# ----------------------------------------------------------------------------- real MNIST


@needs_mnist
def test_mnist_files_match_md5sums():
  sums = dict(line.split()[::-1] for line in (MNIST_DIR / "MD5SUMS").read_text().splitlines()
              if line.strip())
  assert len(sums) == 3
  for file_name, md5 in sums.items():
    assert hashlib.md5((MNIST_DIR / file_name).read_bytes()).hexdigest() == md5, file_name


@needs_mnist
def test_read_idx_real_mnist_test_images():
  images = data.read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
  assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  np.testing.assert_allclose(images.mean() / 255, 0.13251, atol=1e-5)  # Known test mean.
  assert images.flags.writeable


@needs_mnist
def test_read_idx_real_mnist_labels():
  test_labels = data.read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
  train_labels = data.read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz")
  assert test_labels.shape == (10000,) and test_labels.dtype == np.uint8
  assert train_labels.shape == (60000,)
  np.testing.assert_array_equal(test_labels[:5], [7, 2, 1, 0, 4])
  np.testing.assert_array_equal(train_labels[:5], [5, 0, 4, 1, 9])
  np.testing.assert_array_equal(np.bincount(test_labels), MNIST_TEST_COUNTS)
  np.testing.assert_array_equal(np.bincount(train_labels), MNIST_TRAIN_COUNTS)


@needs_mnist
def test_real_mnist_dir_without_train_images_names_the_missing_file(clean_env):
  with pytest.raises(data.DataError, match="has no train-images-idx3-ubyte.gz"):
    data.load_dataset("mnist", data_dir=MNIST_DIR)


# ----------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("file_name", ["x.idx", "x.idx.gz"])
@pytest.mark.parametrize("array", [
    np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
    np.array([-70000, 1, 2**31 - 1], np.int32),
    np.array([[-1.5, 2.25], [1e30, -0.0]], np.float32),
    np.array([-3, 300, -32768], np.int16).reshape(3, 1),
    np.array([np.pi], np.float64),
    np.array([-128, 127], np.int8),
], ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_read_idx_round_trip(tmp_path, file_name, array):
  path = _write(tmp_path / file_name, _idx_bytes(array))
  result = data.read_idx(path)
  assert result.dtype == array.dtype and result.dtype.isnative
  np.testing.assert_array_equal(result, array)


def test_read_idx_detects_gzip_without_suffix(tmp_path):
  array = np.arange(6, dtype=np.uint8)
  path = tmp_path / "labels"
  path.write_bytes(gzip.compress(_idx_bytes(array), mtime=0))
  np.testing.assert_array_equal(data.read_idx(path), array)


_GOOD = _idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))


@pytest.mark.parametrize("file_name,payload,message", [
    ("bad_magic.idx", b"\x08\x03" + _GOOD[2:], "bad IDX magic"),
    ("bad_type.idx", _GOOD[:2] + b"\x07" + _GOOD[3:], "unknown IDX type code 0x07"),
    ("short_header.idx", _GOOD[:6], "truncated IDX header"),
    ("tiny.idx", b"\x00\x00", "truncated IDX header"),
    ("truncated.idx", _GOOD[:-1], "payload is 11 bytes .* need 12 .*truncated"),
    ("trailing.idx.gz", gzip.compress(_GOOD + b"\x00", mtime=0), "payload is 13 bytes .* need 12 .*trailing"),
    ("garbage.idx.gz", b"this is not gzip at all", "unreadable gzip"),
    ("cut.idx.gz", gzip.compress(_GOOD, mtime=0)[:20], "unreadable gzip"),
])
def test_read_idx_rejects_corrupt_files_naming_them(tmp_path, file_name, payload, message):
  path = tmp_path / file_name
  path.write_bytes(payload)
  with pytest.raises(data.DataError, match=message) as error:
    data.read_idx(path)
  assert str(path) in str(error.value)


def test_read_idx_missing_file(tmp_path):
  with pytest.raises(data.DataError, match="nope.gz: cannot read"):
    data.read_idx(tmp_path / "nope.gz")


# ----------------------------------------------------------------------------- IDX dataset


def test_load_idx_dir_shapes_values_and_splits(tmp_path, clean_env):
  train_images, train_labels, test_images, test_labels = _write_idx_dir(tmp_path / "d")
  dataset = data.load_dataset("mnist", data_dir=tmp_path / "d", val_fraction=0.1, seed=3)
  assert dataset.name == "mnist" and dataset.num_classes == 10
  assert dataset.source == f"idx:{tmp_path / 'd'}"
  assert dataset.train.images.shape == (180, 5, 4, 1)
  assert dataset.val.images.shape == (20, 5, 4, 1)
  for split in _splits(dataset):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    assert split.images.min() == 0.0 and split.images.max() == 1.0
    # Images stay paired with their labels (pixel 1 encodes the label).
    np.testing.assert_allclose(split.images[:, 0, 1, 0] * 255, split.labels * 20, atol=1e-4)
  np.testing.assert_allclose(dataset.test.images[..., 0] * 255, test_images, atol=1e-4)
  np.testing.assert_array_equal(dataset.test.labels, test_labels)
  # Stratified: 10 % of each class's 20 examples.
  np.testing.assert_array_equal(np.bincount(dataset.val.labels), [2] * 10)
  # train and val partition the training file; the test ids (>= 100) never enter.
  ids = lambda split: np.rint(split.images[:, 0, 0, 0] * 255).astype(int)
  train_ids, val_ids = ids(dataset.train), ids(dataset.val)
  assert not set(train_ids) & set(val_ids)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(200))


def test_validation_split_is_seeded(tmp_path, clean_env):
  _write_idx_dir(tmp_path)
  load = lambda seed: data.load_dataset("fashion_mnist", data_dir=tmp_path, seed=seed)
  first, again, other = load(0), load(0), load(1)
  np.testing.assert_array_equal(first.val.images, again.val.images)
  np.testing.assert_array_equal(first.train.images, again.train.images)
  assert not np.array_equal(first.val.images, other.val.images)
  np.testing.assert_array_equal(first.test.images, other.test.images)


def test_image_label_count_mismatch_names_both_files(tmp_path, clean_env):
  _write_idx_dir(tmp_path)
  _write(tmp_path / f"{data.TEST_LABELS}.gz", _idx_bytes(np.zeros(49, np.uint8)))
  with pytest.raises(data.DataError, match=(
      f"{data.TEST_IMAGES}.* has 50 images but .*{data.TEST_LABELS}.gz has 49 labels")):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_labels_out_of_range_are_rejected(tmp_path, clean_env):
  _write_idx_dir(tmp_path)
  _write(tmp_path / f"{data.TEST_LABELS}.gz", _idx_bytes(np.full(50, 10, np.uint8)))
  with pytest.raises(data.DataError, match=r"labels span \[10, 10\], expected 0..9"):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_labels_file_with_images_shape_is_rejected(tmp_path, clean_env):
  _write_idx_dir(tmp_path)
  _write(tmp_path / f"{data.TRAIN_LABELS}.gz", _idx_bytes(np.zeros((200, 2), np.uint8)))
  with pytest.raises(data.DataError, match=f"{data.TRAIN_LABELS}.gz: expected \\[N\\]"):
    data.load_dataset("mnist", data_dir=tmp_path)


@pytest.mark.parametrize("stem", data.IDX_STEMS)
def test_missing_file_in_data_dir_is_named(tmp_path, monkeypatch, clean_env, stem):
  _write_idx_dir(tmp_path / "d", compress=(True,) * 4)
  (tmp_path / "d" / f"{stem}.gz").unlink()
  # An explicit data.dir never falls back to other sources, complete as they may be.
  _write_idx_dir(tmp_path / "env" / "mnist")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  with pytest.raises(data.DataError, match=f"'mnist': {tmp_path / 'd'} has no {stem}.gz"):
    data.load_dataset("mnist", data_dir=tmp_path / "d")


def test_data_dir_that_is_not_a_directory(tmp_path, clean_env):
  with pytest.raises(data.DataError, match="data.dir=.*absent is not a directory"):
    data.load_dataset("mnist", data_dir=tmp_path / "absent")


def test_unknown_dataset_lists_allowed_names():
  with pytest.raises(data.DataError,
                     match="unknown dataset 'imagenet'.*mnist, fashion_mnist, digits, cifar10"):
    data.load_dataset("imagenet")


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(val_fraction):
  with pytest.raises(data.DataError, match=r"data.val_fraction must be in \(0, 1\)"):
    data.load_dataset("digits", val_fraction=val_fraction)


def test_val_fraction_too_small_for_dataset(tmp_path, clean_env):
  _write_idx_dir(tmp_path)  # 20 examples per class: 1 % of each rounds to 0.
  with pytest.raises(data.DataError, match="data.val_fraction=0.01 leaves an empty"):
    data.load_dataset("mnist", data_dir=tmp_path, val_fraction=0.01)


# ----------------------------------------------------------------------------- search order


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_data_fails_fast_in_one_line_naming_places_and_remedies(
    tmp_path, monkeypatch, clean_env, name):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  monkeypatch.setattr(data, "SYSTEM_DIRS", {name: tmp_path / "system"})
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # Importing it would fail.
  start = time.monotonic()
  with pytest.raises(data.DataError) as error:
    data.load_dataset(name)
  assert time.monotonic() - start < 1.0
  message = str(error.value)
  assert "\n" not in message
  searched = ", ".join(str(tmp_path / place) for place in
                       (f"env/{name}", "system", f"tfds/{name}"))
  assert message.startswith(f"dataset '{name}' not found (searched {searched}): ")
  assert "--config.data.dir=DIR" in message
  assert (f"tfds.builder('{name}', file_format='array_record').download_and_prepare()"
          in message)
  assert ("train-images-idx3-ubyte.gz" in message) == (name != "cifar10")
  assert ("apt-get install -y dataset-fashion-mnist" in message) == (name == "fashion_mnist")
  if name == "cifar10":
    assert "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html" in message


def test_env_data_dir_is_searched_first(tmp_path, monkeypatch, clean_env):
  _write_idx_dir(tmp_path / "env" / "fashion_mnist", n_train=100)
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  monkeypatch.setattr(data, "SYSTEM_DIRS", {"fashion_mnist": tmp_path / "system"})
  _write_idx_dir(tmp_path / "system", n_train=300)
  dataset = data.load_dataset("fashion_mnist")
  assert dataset.source == f"idx:{tmp_path / 'env' / 'fashion_mnist'}"
  assert len(dataset.train.labels) + len(dataset.val.labels) == 100
  # Without the env directory the system directory is used.
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.load_dataset("fashion_mnist").source == f"idx:{tmp_path / 'system'}"


def test_find_prepared_tfds_picks_newest_complete_version(tmp_path):
  assert data.find_prepared_tfds("mnist", tmp_path) is None
  for version in ["1.0.0", "3.0.1", "10.0.0", "incomplete.ABC_3.0.1"]:
    (tmp_path / "mnist" / version).mkdir(parents=True)
  for version in ["1.0.0", "3.0.1", "incomplete.ABC_3.0.1"]:
    (tmp_path / "mnist" / version / "dataset_info.json").write_text("{}")
  assert data.find_prepared_tfds("mnist", tmp_path) == tmp_path / "mnist" / "3.0.1"


def test_tfrecord_copy_without_tensorflow_says_so(tmp_path, monkeypatch, clean_env):
  version_dir = tmp_path / "tfds" / "mnist" / "3.0.1"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "mnist-train.tfrecord-00000-of-00001").write_bytes(b"")
  monkeypatch.setattr(data, "_tensorflow_installed", lambda: False)
  with pytest.raises(data.DataError, match="TFRecord format, which needs TensorFlow"):
    data.load_dataset("mnist")


def _prepare_fake_tfds(data_dir, dataset_name, version, make_images, n_train, n_test):
  """Prepares an array_record TFDS dataset from `make_images(n, offset)`, as TFDS would."""
  tfds = pytest.importorskip("tensorflow_datasets")
  image_module = pytest.importorskip("PIL.Image")
  shape = make_images(1, 0)[0].shape[1:]

  class Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version(version)

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=shape if len(shape) == 3 else (*shape, 1)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n_train, 0),
              "test": self._generate_examples(n_test, 100)}

    def _generate_examples(self, n, offset):
      images, labels = make_images(n, offset)
      for i in range(n):  # PIL images: TFDS encodes them without TensorFlow.
        yield i, {"image": image_module.fromarray(images[i]), "label": int(labels[i])}

  Fake(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_prepared_tfds_copy_is_read_without_tensorflow(tmp_path, clean_env):
  _prepare_fake_tfds(tmp_path / "tfds", "mnist", "3.0.1", _fake_images, n_train=100,
                     n_test=30)
  dataset = data.load_dataset("mnist", val_fraction=0.2)
  assert dataset.source == f"tfds:{tmp_path / 'tfds' / 'mnist' / '3.0.1'}"
  assert dataset.train.images.shape == (80, 5, 4, 1) and len(dataset.val.labels) == 20
  assert dataset.test.images.shape == (30, 5, 4, 1)
  for split in _splits(dataset):
    assert split.images.dtype == np.float32 and split.images.max() == 1.0
    np.testing.assert_allclose(split.images[:, 0, 1, 0] * 255, split.labels * 20, atol=1e-4)
  test_ids = np.rint(dataset.test.images[:, 0, 0, 0] * 255).astype(int)
  np.testing.assert_array_equal(np.sort(test_ids), np.arange(100, 130))


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
# Origin notebook 001's per-channel constants, written out to check the module's copy.
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2023, 0.1994, 0.2010])
# Pixel (row 1, column 2) of every image has these R, G, B values; normalised by hand.
CIFAR_RGB = (200, 100, 50)
CIFAR_RGB_NORMALISED = (np.array(CIFAR_RGB) / 255 - CIFAR_MEAN) / CIFAR_STD


def _cifar_images(n, offset):
  """[n, 32, 32, 3] uint8 images: R of pixel (0, 0) is the example id, G encodes the
  label, pixel (1, 2) is CIFAR_RGB; all else is 0."""
  images = np.zeros((n, 32, 32, 3), np.uint8)
  labels = (np.arange(n) + offset) % 10
  images[:, 0, 0, 0] = np.arange(n) + offset
  images[:, 0, 0, 1] = labels * 20
  images[:, 1, 2] = CIFAR_RGB
  return images, labels


def _cifar_pickle(data_array, labels):
  """A batch pickled as the python version stores it (protocol 2, bytes keys)."""
  return pickle.dumps({b"batch_label": b"fake batch", b"labels": labels,
                       b"data": data_array, b"filenames": [b"x.png"] * len(labels)},
                      protocol=2)


def _write_cifar_dir(directory, n=20):
  """Writes six batches of `n` images (ids 0..5n-1, the test batch last) to `directory`."""
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  for k, name in enumerate(CIFAR_BATCHES):
    images, labels = _cifar_images(n, k * n)
    # Channel-major rows written by hand: 1024 red, 1024 green, 1024 blue values.
    rows = np.stack([np.concatenate([image[..., c].ravel() for c in range(3)])
                     for image in images])
    (directory / name).write_bytes(_cifar_pickle(rows, [int(label) for label in labels]))
  return directory


def _cifar_ids(split):
  """The example ids (R of pixel (0, 0)), undoing the normalisation by hand."""
  return np.rint((split.images[:, 0, 0, 0] * CIFAR_STD[0] + CIFAR_MEAN[0]) * 255).astype(int)


@pytest.mark.parametrize("nested", [False, True], ids=["batches_dir", "parent_dir"])
def test_cifar10_from_data_dir(tmp_path, clean_env, nested):
  folder = _write_cifar_dir(tmp_path / "cifar-10-batches-py")
  dataset = data.load_dataset("cifar10", data_dir=tmp_path if nested else folder,
                              val_fraction=0.2, seed=1)
  assert dataset.name == "cifar10" and dataset.num_classes == 10
  assert dataset.source == f"pickle:{folder}"
  assert dataset.train.images.shape == (80, 32, 32, 3)
  assert dataset.val.images.shape == (20, 32, 32, 3)
  assert dataset.test.images.shape == (20, 32, 32, 3)
  for split in _splits(dataset):
    assert split.images.dtype == np.float32 and split.labels.dtype == np.int32
    # R, G, B of pixel (row 1, column 2) land in channels 0, 1, 2; (2, 1) stays 0.
    shape = (len(split.labels), 3)
    np.testing.assert_allclose(split.images[:, 1, 2],
                               np.broadcast_to(CIFAR_RGB_NORMALISED, shape), atol=1e-5)
    np.testing.assert_allclose(split.images[:, 2, 1],
                               np.broadcast_to(-CIFAR_MEAN / CIFAR_STD, shape), atol=1e-5)
    # Images stay paired with their labels (G of pixel (0, 0) is 20 * label).
    green = (split.images[:, 0, 0, 1] * CIFAR_STD[1] + CIFAR_MEAN[1]) * 255
    np.testing.assert_allclose(green, split.labels * 20, atol=1e-3)
  # Stratified: 20 % of each class's 10 training examples; the test batch stays apart.
  np.testing.assert_array_equal(np.bincount(dataset.val.labels), [2] * 10)
  train_ids, val_ids = _cifar_ids(dataset.train), _cifar_ids(dataset.val)
  np.testing.assert_array_equal(np.sort(np.concatenate([train_ids, val_ids])), np.arange(100))
  np.testing.assert_array_equal(_cifar_ids(dataset.test), np.arange(100, 120))
  other = data.load_dataset("cifar10", data_dir=folder, val_fraction=0.2, seed=2)
  assert set(_cifar_ids(other.val)) != set(val_ids)


def test_cifar10_from_env_data_dir(tmp_path, monkeypatch, clean_env):
  folder = _write_cifar_dir(tmp_path / "env" / "cifar10")
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  dataset = data.load_dataset("cifar10")
  assert dataset.source == f"pickle:{folder}"
  assert len(dataset.train.labels) + len(dataset.val.labels) == 100


def test_cifar10_prepared_tfds_copy(tmp_path, clean_env):
  _prepare_fake_tfds(tmp_path / "tfds", "cifar10", "3.0.2", _cifar_images, n_train=50,
                     n_test=20)
  dataset = data.load_dataset("cifar10", val_fraction=0.2)
  assert dataset.source == f"tfds:{tmp_path / 'tfds' / 'cifar10' / '3.0.2'}"
  assert dataset.train.images.shape == (40, 32, 32, 3)
  np.testing.assert_allclose(dataset.test.images[:, 1, 2],
                             np.broadcast_to(CIFAR_RGB_NORMALISED, (20, 3)), atol=1e-5)
  np.testing.assert_array_equal(np.sort(_cifar_ids(dataset.test)), np.arange(100, 120))


def _one_line_error(load):
  with pytest.raises(data.DataError) as error:
    load()
  assert "\n" not in str(error.value)
  return str(error.value)


@pytest.mark.parametrize("damage,message", [
    (lambda path: path.unlink(), "cifar10': .* has no data_batch_3; it needs data_batch_1"),
    (lambda path: path.write_bytes(path.read_bytes()[:1000]),
     "data_batch_3: not a readable CIFAR-10 batch"),
    (lambda path: path.write_bytes(b"not a pickle"), "data_batch_3: not a readable CIFAR-10"),
    (lambda path: path.write_bytes(pickle.dumps([1, 2], protocol=2)),
     "data_batch_3: expected a dict, got list"),
    (lambda path: path.write_bytes(_cifar_pickle(np.zeros((20, 3000), np.uint8), [0] * 20)),
     r"data_batch_3: expected b'data' of shape \[N, 3072\] uint8, got \[20, 3000\] uint8"),
    (lambda path: path.write_bytes(_cifar_pickle(np.zeros((20, 3072), np.float32), [0] * 20)),
     r"data_batch_3: expected b'data' .* got \[20, 3072\] float32"),
    (lambda path: path.write_bytes(_cifar_pickle(np.zeros((20, 3072), np.uint8), [0] * 19)),
     "data_batch_3: expected b'labels' as a list of 20 ints, got 19"),
    (lambda path: path.write_bytes(_cifar_pickle(np.zeros((20, 3072), np.uint8), [0] * 19 + [10])),
     "data_batch_3: label 10 is not an int in 0..9"),
    (lambda path: path.write_bytes(_cifar_pickle(np.zeros((20, 3072), np.uint8), [-1] * 20)),
     "data_batch_3: label -1 is not an int in 0..9"),
], ids=["missing", "truncated", "garbage", "not_dict", "shape", "dtype", "label_count",
        "label_10", "label_negative"])
def test_cifar10_bad_batch_is_named_in_one_line(tmp_path, clean_env, damage, message):
  folder = _write_cifar_dir(tmp_path / "cifar-10-batches-py")
  damage(folder / "data_batch_3")
  text = _one_line_error(lambda: data.load_dataset("cifar10", data_dir=tmp_path))
  assert re.search(message, text), text
  assert str(folder) in text


class _Exploit:
  """Unpickles as a call of print: any global outside a batch's structure is refused."""

  def __reduce__(self):
    return print, ("unpickled code ran",)


def test_read_cifar_batch_accepts_numpy1_pickles_and_refuses_other_globals(tmp_path,
                                                                           capsys):
  images, labels = _cifar_images(3, 0)
  rows = images.transpose(0, 3, 1, 2).reshape(3, 3072)
  payload = _cifar_pickle(rows, [int(label) for label in labels])
  # NumPy 1 (which wrote the real files) names the array constructor numpy.core.multiarray.
  old = _write(tmp_path / "old",
               payload.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
  read_images, read_labels = data.read_cifar_batch(old)
  np.testing.assert_array_equal(read_images, images)
  np.testing.assert_array_equal(read_labels, labels)
  evil = _write(tmp_path / "evil", pickle.dumps({b"data": _Exploit()}, protocol=2))
  # Protocol 2 names Python 3's builtins module __builtin__.
  with pytest.raises(data.DataError, match="evil: .*refusing to load global __builtin__.print"):
    data.read_cifar_batch(evil)
  assert capsys.readouterr().out == ""


# ----------------------------------------------------------------------------- digits


def test_digits_sizes_ranges_and_stratification():
  from sklearn.datasets import load_digits
  all_labels = load_digits().target
  dataset = data.load_dataset("digits", val_fraction=0.1, seed=0)
  assert dataset.source == "sklearn" and dataset.num_classes == 10
  sizes = [len(split.labels) for split in _splits(dataset)]
  assert sum(sizes) == 1797
  class_counts = np.bincount(all_labels)
  test_counts = np.floor(0.2 * class_counts + 0.5).astype(int)
  np.testing.assert_array_equal(np.bincount(dataset.test.labels), test_counts)
  np.testing.assert_array_equal(np.bincount(dataset.val.labels),
                                np.floor(0.1 * (class_counts - test_counts) + 0.5))
  for split in _splits(dataset):
    assert split.images.shape[1:] == (8, 8, 1) and split.images.dtype == np.float32
    assert split.labels.dtype == np.int32
    assert split.images.min() == 0.0 and split.images.max() == 1.0
    # Pixels are the original counts 0..16 divided by 16.
    np.testing.assert_array_equal(split.images * 16, np.rint(split.images * 16))


def test_digits_splits_partition_the_bundled_images():
  from sklearn.datasets import load_digits
  rows = lambda images: sorted(map(bytes, np.rint(images.reshape(len(images), -1) * 16)
                                   .astype(np.uint8)))
  dataset = data.load_dataset("digits")
  together = np.concatenate([split.images for split in _splits(dataset)])
  assert rows(together) == rows(load_digits().images / 16)


def test_digits_is_deterministic_and_test_split_ignores_seed():
  first, again, other = (data.load_dataset("digits", seed=s) for s in (0, 0, 1))
  for a, b in zip(_splits(first), _splits(again)):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_array_equal(first.test.images, other.test.images)
  assert not np.array_equal(first.val.images, other.val.images)


def test_digits_rejects_data_dir(tmp_path):
  with pytest.raises(data.DataError, match="'digits' is bundled with scikit-learn"):
    data.load_dataset("digits", data_dir=tmp_path)


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_from_debian_package(monkeypatch):
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  dataset = data.load_dataset("fashion_mnist", val_fraction=0.1)
  assert dataset.source == f"idx:{FASHION_DIR}"
  assert dataset.train.images.shape == (54000, 28, 28, 1)
  assert dataset.val.images.shape == (6000, 28, 28, 1)
  assert dataset.test.images.shape == (10000, 28, 28, 1)
  # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class.
  np.testing.assert_array_equal(np.bincount(dataset.train.labels), [5400] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.val.labels), [600] * 10)
  np.testing.assert_array_equal(np.bincount(dataset.test.labels), [1000] * 10)
  np.testing.assert_array_equal(dataset.test.labels[:5], [9, 2, 1, 1, 6])
  assert dataset.test.images.min() == 0.0 and dataset.test.images.max() == 1.0


# ----------------------------------------------------------------------------- splits


def test_stratified_split_partitions_each_class():
  labels = np.repeat(np.arange(3), [10, 20, 31])
  kept, held = data.stratified_split(labels, 0.25, seed=5)
  assert not set(kept) & set(held)
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held])), np.arange(61))
  np.testing.assert_array_equal(np.bincount(labels[held]), [3, 5, 8])  # round(0.25 * n)
  again = data.stratified_split(labels, 0.25, seed=5)
  np.testing.assert_array_equal(held, again[1])
