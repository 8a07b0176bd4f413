"""Students of several ranks trained as one batch: one jitted epoch mapped over a rank axis.

The members r_1 … r_n share one network of a static width k ≥ max r_i, so one compiled program
serves every rank, whether the members train in one call (`vmap` or `lax.map` over n, see
`batch_epoch`) or one call each (n = 1, the same program reused):

* straight-through: a projected MLP built at rank k whose `apply` takes the member's rank as a
  traced argument; singular directions ≥ r_i are masked (`st_truncate_masked`, or the first
  r_i columns of a tracked subspace of k + oversample columns). The sweep trains these side by
  side on accelerators only: vmapped on XLA:CPU they wedged its Eigen thread pool
  (BUILD_NOTES.md, known limits);
* factorized: factors padded with zeros to k columns (`pad_factors`). A zero column of U meets a
  zero row of V, so both gradients are exactly zero, Adam's update 0 / (√0 + ε) is exactly zero,
  and the padding stays zero: the member is exactly a rank-r_i network.

`fit_batch` is `train.fit` per member: its own best epoch, patience and NaN/Inf failure; a member
that stops keeps its best parameters while the others go on.
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lrnet import train

Params = Any


def stack(trees: Sequence[Any]) -> Any:
  """Trees of equal structure → one tree whose leaves have a leading member axis [n, ...]."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, n: int) -> list:
  """Inverse of `stack`: the n member trees."""
  return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], tree) for i in range(n)]


def pad_factors(params: Params, width: int) -> Params:
  """Pads every factorized layer (`u` [m, r], `v` [r, n]) with zeros to rank `width`.

  Raises:
    ValueError: a layer's rank exceeds `width`.
  """
  def pad(module: dict) -> dict:
    if "u" not in module:
      return module
    rank = module["u"].shape[1]
    if rank > width:
      raise ValueError(f"pad_factors: a layer has rank {rank} > width {width}")
    return {**module, "u": jnp.pad(module["u"], ((0, 0), (0, width - rank))),
            "v": jnp.pad(module["v"], ((0, width - rank), (0, 0)))}
  return {name: pad(module) for name, module in params.items()}


def unpad_factors(params: Params, rank: int) -> Params:
  """The first `rank` columns of every `u` and rows of every `v` (inverse of `pad_factors`)."""
  def cut(module: dict) -> dict:
    if "u" not in module:
      return module
    return {**module, "u": module["u"][:, :rank], "v": module["v"][:rank, :]}
  return {name: cut(module) for name, module in params.items()}


def batch_epoch(epoch_fn: Callable, vectorize: bool = False) -> Callable:
  """`train.make_train_epoch`'s epoch mapped over a leading member axis of the state and of
  each extra apply argument (e.g. the rank); data and order are shared. Jitted.

  `vectorize=False`: the members run one after the other inside the one program (`lax.map`),
  every member's `while` loops (the subspace trackers' lazy full path) with scalar predicates.
  `vectorize=True`: the members train side by side (`vmap`; every product gets a member axis,
  a `while` loop runs while any member needs it). On XLA:CPU a vmapped straight-through epoch
  wedged the Eigen thread pool (jax 0.10.2; BUILD_NOTES.md, known limits): use it there only for
  loop-free networks such as the factorized students.
  """
  def mapped(states, images, labels, order, soft_targets, *args):
    def member(state, member_args):
      return epoch_fn(state, images, labels, order, soft_targets, *member_args)
    if vectorize:
      return jax.vmap(member)(states, tuple(args))
    return jax.lax.map(lambda carry: member(*carry), (states, tuple(args)))

  return jax.jit(mapped)


class BatchProgress(NamedTuple):
  """Resumable progress of a member batch (checkpointed as one tree)."""
  progress: train.Progress  # every leaf with a leading member axis [n, ...]; `seconds` shared
  active: jax.Array         # [n] bool: still training (not stopped early, not failed)
  failed_step: jax.Array    # [n] int32: first non-finite step, 0 if none
  epoch: jax.Array          # [] int32: epochs the batch has run


def start_batch(states: Sequence[train.TrainState]) -> BatchProgress:
  """Fresh progress for members starting from `states` (one per member)."""
  progress = stack([train.start_progress(s) for s in states])
  n = len(states)
  return BatchProgress(progress, jnp.ones([n], bool), jnp.zeros([n], jnp.int32), jnp.int32(0))


def _member_mask(mask: np.ndarray, leaf: jax.Array) -> jax.Array:
  return jnp.asarray(mask).reshape(mask.shape + (1,) * (leaf.ndim - 1))


def _select(mask: np.ndarray, new: Any, old: Any) -> Any:
  """Per member: `new` where mask, else `old`."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(_member_mask(mask, a), a, b), new, old)


def _finite_members(params: Params) -> np.ndarray:
  leaves = jax.tree_util.tree_leaves(params)
  per_leaf = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1) for leaf in leaves]
  return np.asarray(jnp.all(jnp.stack(per_leaf), axis=0))


def failure_message(what: str, failed_step: int) -> str:
  return f"{what}: non-finite loss or parameters at step {failed_step}"


def fit_batch(batch: BatchProgress, epoch_fn, validate: Callable[[Params], np.ndarray],
              images, labels, *, epochs: int, seed: int, patience: Optional[int] = None,
              soft_targets=None, apply_args: tuple = (),
              on_epoch: Optional[Callable[[BatchProgress, list], None]] = None) -> BatchProgress:
  """`train.fit` for a batch of members; each member stops on its own.

  Member i sees exactly what `train.fit` would give it alone: the same shuffle (`seed`), its own
  best epoch and patience; it stops for good when its patience runs out or its loss or
  parameters stop being finite (`failed_step` > 0). Stopped members keep being computed (the
  batch shape is static) but their progress no longer changes.

  Args:
    batch: from `start_batch`, or restored from a checkpoint.
    epoch_fn: from `batch_epoch`.
    validate: stacked params → validation accuracies [n].
    images, labels: the training split.
    epochs, seed, patience, soft_targets: as in `train.fit`.
    apply_args: per-member extra apply arguments, each with a leading axis [n].
    on_epoch: called after every epoch with the new progress and, per member, that epoch's
      metrics dict or None for members that did not train this epoch.

  Returns:
    The final `BatchProgress`.
  """
  num_examples = labels.shape[0]
  batch = train.commit(batch)
  while int(batch.epoch) < epochs:
    epoch = int(batch.epoch) + 1
    progress = batch.progress
    best_epoch = np.asarray(progress.best_epoch)
    active = np.asarray(batch.active).copy()
    if patience is not None:
      active &= ~((best_epoch > 0) & (epoch - best_epoch > patience))
    if not active.any():
      return batch._replace(active=jnp.asarray(active))
    start = time.perf_counter()
    first_step = np.asarray(progress.state.step)
    order = jnp.asarray(train.epoch_order(seed, epoch, num_examples))
    state, metrics = epoch_fn(progress.state, images, labels, order, soft_targets, *apply_args)
    losses = np.asarray(metrics["loss"])  # [n, steps], the one host sync of the epoch
    finite = np.isfinite(losses).all(axis=1) & _finite_members(state.params)
    first_bad = np.argmax(~np.isfinite(losses), axis=1) + 1
    first_bad = np.where(np.isfinite(losses).all(axis=1), losses.shape[1], first_bad)
    failed_step = np.where(active & ~finite, first_step + first_bad,
                           np.asarray(batch.failed_step)).astype(np.int32)
    active &= finite
    eval_params = state.ema_params if state.ema_params is not None else state.params
    val_accuracy = np.asarray(validate(eval_params), np.float32)
    improved = active & (val_accuracy > np.asarray(progress.best_val_accuracy))
    progress = train.Progress(
        state=state,
        best_params=_select(improved, eval_params, progress.best_params),
        best_val_accuracy=jnp.where(improved, val_accuracy, progress.best_val_accuracy),
        best_epoch=jnp.where(improved, epoch, progress.best_epoch).astype(jnp.int32),
        epochs_done=jnp.where(active, epoch, progress.epochs_done).astype(jnp.int32),
        seconds=progress.seconds + (time.perf_counter() - start))
    batch = BatchProgress(progress, jnp.asarray(active), jnp.asarray(failed_step), jnp.int32(epoch))
    if on_epoch is not None:
      train_accuracy = np.asarray(metrics["accuracy"])
      step = np.asarray(state.step)
      on_epoch(batch, [
          {"epoch": epoch, "step": int(step[i]), "loss": float(np.mean(losses[i])),
           "train_accuracy": float(train_accuracy[i]), "val_accuracy": float(val_accuracy[i]),
           "seconds": float(progress.seconds[i])} if active[i] else None
          for i in range(len(active))])
  return batch
