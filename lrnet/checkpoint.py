"""Synchronous, atomic checkpoints of arbitrary training-state pytrees (orbax).

:class:`Checkpointer` keeps the last few steps of one run (resumable training); :func:`save_pytree`
/ :func:`load_pytree` store one finished artefact (e.g. the teacher's params). Both restore
exactly the tree they were given as a target: NamedTuples, optax states, Python ``int``/``float``
and numpy scalar leaves keep their types, arrays their dtypes and values.

Importing this module hides orbax's INFO/DEBUG log lines (~50 per save under ``absl.app.run``);
its warnings and errors still show. Remove :data:`ORBAX_INFO_FILTER` from the absl logger to see
everything.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging
import orbax.checkpoint as ocp

from lrnet import io

_STATE_ITEM = "state"
_METADATA_ITEM = "metadata"


class _DropOrbaxInfo(logging.Filter):
  """Drops records below WARNING that come from orbax's own source files."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


ORBAX_INFO_FILTER = _DropOrbaxInfo()
absl_logging.get_absl_logger().addFilter(ORBAX_INFO_FILTER)  # idempotent


def _to_savable(tree: Any) -> Any:
  """Turns Python and numpy scalar leaves into 0-d arrays orbax can store. ``jax.Array`` and
  ``jax.ShapeDtypeStruct`` leaves are kept: orbax restores them with the target's sharding."""
  keep = (jax.Array, jax.ShapeDtypeStruct, np.ndarray)
  return jax.tree.map(lambda leaf: leaf if isinstance(leaf, keep) else np.asarray(leaf), tree)


def _like(target_leaf: Any, restored_leaf: Any) -> Any:
  """Gives `restored_leaf` the Python/numpy type of `target_leaf`."""
  if isinstance(target_leaf, (bool, int, float, complex)):
    return type(target_leaf)(np.asarray(restored_leaf).item())
  if isinstance(target_leaf, np.generic):
    return np.asarray(restored_leaf, dtype=target_leaf.dtype)[()]
  if isinstance(target_leaf, np.ndarray):
    return np.asarray(restored_leaf)
  return restored_leaf


def _from_restored(target_like: Any, restored: Any) -> Any:
  """Rebuilds `restored` with the tree structure and leaf types of the target.

  Raises:
    ValueError: if the stored tree does not have the target's structure.
  """
  target_leaves, treedef = jax.tree_util.tree_flatten_with_path(target_like)
  restored_leaves, restored_treedef = jax.tree.flatten(restored)
  if len(restored_leaves) != len(target_leaves):
    raise ValueError("The checkpoint does not match target_like: expected the structure "
                     f"{treedef}, got {restored_treedef}.")
  leaves = []
  # orbax checks shapes for jax-array targets only; numpy targets get whatever was stored.
  for (path, target_leaf), restored_leaf in zip(target_leaves, restored_leaves):
    if np.shape(target_leaf) != np.shape(restored_leaf):
      raise ValueError(f"Shape mismatch at {jax.tree_util.keystr(path)}: target_like has "
                       f"{np.shape(target_leaf)}, the checkpoint {np.shape(restored_leaf)}.")
    leaves.append(_like(target_leaf, restored_leaf))
  return treedef.unflatten(leaves)


class Checkpointer:
  """Saves and restores the training state of one run in one directory.

  Each step lives in ``<directory>/<step>/`` (orbax layout: a ``state`` pytree and a JSON
  ``metadata`` item). Saves are synchronous and atomic: orbax writes
  ``<step>.orbax-checkpoint-tmp`` and renames it when complete, so a killed save never appears
  in :meth:`steps`; leftover temporary directories are deleted when a Checkpointer is created.
  Only the newest `max_to_keep` steps (``None``: all) are kept. One process should write a
  directory at a time. Use it as a context manager, or `close` it.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE_ITEM, _METADATA_ITEM))

  def save(self, step: int, state: Any, metadata: dict[str, Any] | None = None) -> None:
    """Writes `state` (any pytree of jax, numpy or Python arrays and scalars) as `step`;
    returns once it is complete on disk. `metadata` is a small JSON-like dict (numpy scalars
    allowed, see :func:`lrnet.io.to_jsonable`), e.g. the epoch or the config.

    Raises:
      orbax.checkpoint.checkpoint_manager.StepAlreadyExistsError: if `step` is already stored.
    """
    self._manager.save(int(step), force=True, args=ocp.args.Composite(**{  # force: no save interval
        _STATE_ITEM: ocp.args.StandardSave(_to_savable(state)),
        _METADATA_ITEM: ocp.args.JsonSave(io.to_jsonable(metadata or {}))}))
    self._manager.wait_until_finished()

  def steps(self) -> list[int]:
    """All complete steps on disk, ascending (re-read from the directory)."""
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete step on disk, or ``None`` if there is none."""
    return max(self.steps(), default=None)

  def restore(self, target_like: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
    """Reads a step (default: the latest) back into the structure and types of `target_like`.

    Args:
      target_like: a pytree like the saved state (e.g. a freshly initialised one, or its
        ``jax.eval_shape``); only its structure, shapes, dtypes, leaf types and (for jax
        arrays) shardings are used.
      step: the step to read; default: the latest.

    Returns:
      ``(state, metadata)``: `state` has `target_like`'s tree structure and leaf types;
      `metadata` is the dict given to :meth:`save`.

    Raises:
      FileNotFoundError: if there is no checkpoint (or no such step).
    """
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory} "
                              f"(have {steps}).")
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**{
        _STATE_ITEM: ocp.args.StandardRestore(_to_savable(target_like)),
        _METADATA_ITEM: ocp.args.JsonRestore(),
    }))
    return _from_restored(target_like, restored[_STATE_ITEM]), restored[_METADATA_ITEM]

  def close(self) -> None:
    """Waits for pending work and releases orbax's resources."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _save_standard(path: str, tree: Any) -> None:
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    checkpointer.save(path, args=ocp.args.StandardSave(_to_savable(tree)))


def save_pytree(path: str | os.PathLike, tree: Any, overwrite: bool = False) -> None:
  """Writes a finished artefact (a pytree of arrays and scalars) to the directory `path`,
  synchronously and atomically: `path` appears only once complete. With `overwrite`, the new
  tree is written beside the old one and swapped in by two renames, so a crash never leaves a
  partial `path` (at worst, between the renames, the old tree sits in ``.old-<name>-*``).

  Raises:
    FileExistsError: if `path` exists and `overwrite` is false.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.exists(path):
    _save_standard(path, tree)
    return
  if not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
  parent, name = os.path.split(path)
  token = secrets.token_hex(4)
  new_path, old_path = (os.path.join(parent, f".{kind}-{name}-{token}") for kind in ("tmp", "old"))
  try:
    _save_standard(new_path, tree)
    os.rename(path, old_path)
    try:
      os.rename(new_path, path)
    except BaseException:
      os.rename(old_path, path)
      raise
  finally:
    shutil.rmtree(new_path, ignore_errors=True)
  shutil.rmtree(old_path, ignore_errors=True)


def load_pytree(path: str | os.PathLike, target_like: Any) -> Any:
  """Reads a tree written by :func:`save_pytree` (see :meth:`Checkpointer.restore`).

  Raises:
    FileNotFoundError: if `path` does not exist.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No saved pytree at {path}.")
  with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
    restored = checkpointer.restore(path, args=ocp.args.StandardRestore(_to_savable(target_like)))
  return _from_restored(target_like, restored)
