"""Training: explicit state, a jitted epoch, and one `fit` loop for one or many members.

An epoch is one jitted `lax.scan`, so the host dispatches and reads metrics back once per epoch.
Networks are used as `apply(params, model_state, images) -> (logits, model_state)`, or with an
rng `apply(params, model_state, rng, images)` (`with_rng`: dropout); `model_state` is the Haiku
state: BatchNorm statistics, per-layer trackers, or {}. Every run is a batch of members with a
leading member axis on every leaf of its state: a teacher is a batch of one, students of several
ranks share data and shuffles (`members_epoch`), and `fit` stops each member on its own.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrnet import losses
from lrnet import parallel

Params = Any
ApplyFn = Callable[..., tuple[jax.Array, Any]]


class TrainState(NamedTuple):
  params: Params            # trainable parameters (Haiku tree)
  opt_state: optax.OptState  # optimizer state for `params`
  model_state: Any          # non-trainable network state (per-layer trackers); {} if none
  ema_params: Optional[Params]  # exponential moving average of `params`; None when EMA is off
  step: jax.Array           # [] int32, optimizer steps taken


class NonFiniteError(FloatingPointError):
  """Raised when the loss or the parameters stop being finite."""


def stateful_apply(net) -> ApplyFn:
  """`apply(params, model_state, images, *args) -> (logits, model_state)` for any Haiku net."""
  if isinstance(net, hk.TransformedWithState):
    return net.apply
  return lambda params, model_state, images, *args: (net.apply(params, images, *args), model_state)


def optimizer(settings, steps_per_epoch: int) -> optax.GradientTransformation:
  """The optimizer a run's settings (`teacher` or `student` config section) ask for: Adam, or
  AdamW with `weight_decay` > 0 (decoupled decay, scaled by the learning rate); `schedule`
  "constant" at `learning_rate`, or "cosine": linear warm-up from 0 over `warmup_epochs`, then
  a cosine decay to 0 at `epochs` (early stopping may end sooner)."""
  learning_rate = settings.learning_rate
  if settings.schedule == "cosine":
    total = max(settings.epochs * steps_per_epoch, 1)
    warmup = min(int(settings.warmup_epochs * steps_per_epoch), total - 1)
    learning_rate = optax.warmup_cosine_decay_schedule(0.0, settings.learning_rate, warmup, total)
  if settings.weight_decay:
    return optax.adamw(learning_rate, weight_decay=settings.weight_decay)
  return optax.adam(learning_rate)


def augment(key: jax.Array, images: jax.Array, shift: int, flip: bool) -> jax.Array:
  """Random translations by up to `shift` pixels each way (zero fill) and, with `flip`, random
  horizontal flips; one draw per example. images: [batch, H, W, C]."""
  batch = images.shape[0]
  shift_key, flip_key = jax.random.split(key)
  if shift:
    padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    offsets = jax.random.randint(shift_key, (batch, 2), 0, 2 * shift + 1)
    crop = lambda image, at: jax.lax.dynamic_slice(image, (at[0], at[1], 0), images.shape[1:])
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flips = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flips, images[:, :, ::-1], images)
  return images


def init_state(params: Params, optimizer: optax.GradientTransformation,
               model_state: Any = None, ema: bool = False) -> TrainState:
  """A fresh training state starting from `params`."""
  # Copies: leaves may share buffers, which a donating step cannot take twice.
  copy = lambda tree: jax.tree_util.tree_map(jnp.copy, tree)
  model_state = {} if model_state is None else copy(model_state)
  return TrainState(params, optimizer.init(params), model_state, copy(params) if ema else None,
                    jnp.zeros([], jnp.int32))


def commit(tree: Any) -> Any:
  """`tree` committed to the default device, like a jitted step's outputs: a jitted function
  compiles again when an argument's committedness changes, so a state built eagerly would
  compile the epoch twice (for itself and for the state the first epoch returns)."""
  return parallel.shard_members(tree, None)


def make_train_epoch(apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
                     batch_size: int, ema_decay: float = 0.0, *,
                     objective: Optional[losses.Objective] = None,
                     teacher_apply: Optional[Callable[..., jax.Array]] = None,
                     shift: int = 0, flip: bool = False, seed: int = 0, unroll: bool = False,
                     with_rng: bool = False):
  """Builds `epoch(state, images, labels, order[, teacher_params]) -> (state, metrics)` for one
  member: a `lax.scan` over `len(order) // batch_size` batches (the rest of the shuffled order is
  dropped). With `ema_params` in the state, after each step
  ema ← ema_decay · ema + (1 − ema_decay) · params.

  Args:
    apply_fn: stateful apply (see `stateful_apply`); with `with_rng` it takes an rng after the
      state, drawn from (seed, step) independently of the augmentation's.
    objective: `lrnet.losses` objective; None: plain cross-entropy.
    teacher_apply: `(teacher_params, images) -> logits`, run on the same (augmented) batch and
      passed to `objective`; the epoch then takes `teacher_params`.
    shift, flip: augmentation of each batch (`augment`), drawn from (seed, step): members of
      one batch see the same augmented images.
    unroll: unroll the scan over the batches, one copy of the step each (for `in_calls`).

  Returns:
    An unjitted function (see `members_epoch`) of `images` [N, ...], `labels` [N] and `order`
    [N] int32 permutation. Metrics: `loss` [steps] per step and `accuracy` [] over the epoch.
  """
  objective = objective or (lambda logits, labels, _: (losses.cross_entropy(logits, labels),
                                                       logits))

  def loss_fn(params, model_state, images, labels, teacher_logits, rng):
    logits, model_state = (apply_fn(params, model_state, rng, images) if with_rng
                           else apply_fn(params, model_state, images))
    loss, class_logits = objective(logits, labels, teacher_logits)
    accuracy = jnp.mean(jnp.argmax(class_logits, -1) == labels)  # of every label (text: byte)
    return loss, (model_state, accuracy)

  def step(state: TrainState, batch_index, images, labels, teacher_params):
    batch_images, batch_labels = parallel.constrain_batch(
        (jnp.take(images, batch_index, axis=0), jnp.take(labels, batch_index, axis=0)))
    key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    if shift or flip:
      batch_images = augment(key, batch_images, shift, flip)
    teacher_logits = (None if teacher_apply is None
                      else jax.lax.stop_gradient(teacher_apply(teacher_params, batch_images)))
    (loss, (model_state, accuracy)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch_images, batch_labels, teacher_logits,
        jax.random.fold_in(key, 1))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = (None if state.ema_params is None
                  else optax.incremental_update(params, state.ema_params, 1.0 - ema_decay))
    return TrainState(params, opt_state, model_state, ema_params, state.step + 1), (loss, accuracy)

  def epoch(state: TrainState, images, labels, order, teacher_params=None):
    num_steps = order.shape[0] // batch_size
    batch_indices = order[:num_steps * batch_size].reshape(num_steps, batch_size)
    body = lambda s, idx: step(s, idx, images, labels, teacher_params)
    if unroll:  # a Python loop: `lax.scan(unroll=True)` still emits a `while` of one trip
      outputs = []
      for index in batch_indices:
        state, output = body(state, index)
        outputs.append(output)
      step_losses, accuracies = (jnp.stack(values) for values in zip(*outputs))
    else:
      state, (step_losses, accuracies) = jax.lax.scan(body, state, batch_indices)
    return state, {"loss": step_losses, "accuracy": jnp.mean(accuracies)}

  return epoch


def stack(trees: Sequence[Any]) -> Any:
  """Trees of equal structure → one tree whose leaves have a leading member axis [n, ...]."""
  return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree: Any, n: int) -> list:
  """Inverse of `stack`: the n member trees."""
  return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], tree) for i in range(n)]


def members_epoch(epoch_fn: Callable, num_members: int, side_by_side: bool = False,
                  mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """`epoch_fn` (from `make_train_epoch`) over a leading member axis of the state, jitted, the
  state donated (checkpoints are synchronous and best parameters copies: nothing reads it later).
  Data, order and shared arguments (a distilling student's teacher) are the same for every
  member; a member's own settings (a straight-through student's rank) ride in its state.

  One member runs the epoch itself; several run side by side (`vmap`) with `side_by_side`, else
  one after the other in one program (`lax.map`): on XLA:CPU a vmapped straight-through epoch
  wedges the Eigen thread pool (BUILD_NOTES.md). With a `mesh` (`parallel.make_mesh`), each
  device of its `members` axis runs its `num_members / members` members as above (`shard_map`:
  each computes bitwise what it would alone), and each batch is split over `data` (parameters
  replicated, XLA reduces the gradients); the state's member axis lies on `members`
  (`parallel.shard_members`), the rest is replicated.

  Raises:
    ValueError: `num_members` does not divide over the mesh's `members` axis (pad with
      `parallel.pad_members` and drop the copies' results).
  """
  groups = parallel.axis_size(mesh, "members")
  if num_members % groups:
    raise ValueError(f"{num_members} members do not divide over the {groups} devices of the "
                     f"mesh's members axis; pad them (lrnet.parallel.member_padding)")
  count = num_members // groups  # members per device

  def mapped(states, images, labels, order, *shared):
    member = lambda state: epoch_fn(state, images, labels, order, *shared)
    if count == 1:
      out = member(jax.tree_util.tree_map(lambda leaf: leaf[0], states))
      return jax.tree_util.tree_map(lambda leaf: leaf[None], out)
    if side_by_side:
      return jax.vmap(member)(states)
    return jax.lax.map(member, states)

  if mesh is None:
    return jax.jit(mapped, donate_argnums=0)
  spec = jax.sharding.PartitionSpec
  body = lambda states, images, labels, order, shared: mapped(states, images, labels, order,
                                                              *shared)
  if groups > 1:
    # Manual over members only: each device runs the member program unchanged (no collectives
    # between members), the data axis stays XLA's. No VMA check: custom VJPs lose the types.
    body = jax.shard_map(body, mesh=mesh, in_specs=(spec("members"),) + (spec(),) * 4,
                         out_specs=spec("members"), axis_names={"members"}, check_vma=False)
  jitted = jax.jit(body, in_shardings=(parallel.member_sharding(mesh),)
                   + (parallel.replicated(mesh),) * 4,
                   out_shardings=parallel.member_sharding(mesh), donate_argnums=0)

  def sharded(states, images, labels, order, *shared, run=jitted):
    # Inputs already placed stay; else placed from this host's copy (several processes).
    data = parallel.replicate((images, labels, order, shared), mesh)
    with jax.set_mesh(mesh):  # the mesh `parallel.constrain_batch` splits each batch over
      return run(states, *data)
  sharded.lower = functools.partial(sharded, run=jitted.lower)  # like a jitted function's
  return sharded


def in_calls(epoch_fn: Callable, batch_size: int, steps_per_call: int) -> Callable:
  """`epoch_fn` (e.g. from `members_epoch`) run as a host loop of calls of `steps_per_call`
  steps each, with the same signature, metrics and result. XLA:CPU runs convolutions inside a
  loop (the epoch's `lax.scan`, even of one step) about 18× slower than outside one
  (BUILD_NOTES.md): build the epoch with `unroll=True`, and each call is straight-line code.
  """
  def epoch(states, images, labels, order, *shared):
    order = np.asarray(order)
    num_steps = order.shape[0] // batch_size
    step_losses, correct = [], 0.0
    for first in range(0, num_steps, steps_per_call):
      count = min(steps_per_call, num_steps - first)
      chunk = jnp.asarray(order[first * batch_size:(first + count) * batch_size])
      states, metrics = epoch_fn(states, images, labels, chunk, *shared)
      step_losses.append(metrics["loss"])
      correct = correct + metrics["accuracy"] * count
    return states, {"loss": jnp.concatenate(step_losses, axis=-1), "accuracy": correct / num_steps}

  return epoch


def make_evaluate(apply_fn: Callable[..., jax.Array], batch_size: int = 1000, unroll: bool = False):
  """Builds a jitted `evaluate(params, images, labels, *args) -> (accuracy, loss)`.

  `apply_fn(params, images, *args) -> logits` is stateless (evaluation uses the final, exactly
  projected or factorized parameters). Runs in fixed-size chunks (padded and masked) so memory
  stays bounded: a `lax.scan` over them, or with `unroll` one copy of the network per chunk
  (convolutions on XLA:CPU, see `in_calls`). Labels are [N] (logits [chunk, classes]) or
  [N, ...] (one per position, e.g. a language model's next byte: logits [chunk, T, classes]);
  accuracy and loss are means over every label but the negative ones (padding, `pad_split`).
  """

  @jax.jit
  def evaluate(params, images, labels, *args):
    num_chunks = -(-images.shape[0] // batch_size)
    images, labels = pad_split(images, labels, num_chunks * batch_size)
    valid = labels >= 0

    def chunk(carry, index):
      correct, loss = carry
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, index * batch_size, batch_size)
      logits = apply_fn(params, sl(images), *args)
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, sl(labels))
      mask = sl(valid)
      correct += jnp.sum((jnp.argmax(logits, -1) == sl(labels)) & mask)
      loss += jnp.sum(jnp.where(mask, per_example, 0.0))
      return (correct, loss), None

    totals = (jnp.zeros([], jnp.int32), jnp.zeros([]))
    if unroll:
      for index in range(num_chunks):
        totals, _ = chunk(totals, index)
    else:
      totals, _ = jax.lax.scan(chunk, totals, jnp.arange(num_chunks))
    count = jnp.maximum(jnp.sum(valid), 1)
    return totals[0] / count, totals[1] / count

  return evaluate


def pad_split(images: jax.Array, labels: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """Pads a split to `length` examples with zero images and labels -1 (ignored by evaluate)."""
  pad = length - labels.shape[0]
  return (jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)]),
          jnp.concatenate([labels, jnp.full((pad,) + labels.shape[1:], -1, labels.dtype)]))


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The seeded shuffle of epoch `epoch`: a pure function of (seed, epoch), so resumable."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def measure_latency(fn: Callable[..., jax.Array], *args, repeats: int = 20,
                    warmup: int = 2) -> float:
  """Median wall time in milliseconds of the jitted call `fn(*args)`, after warm-up."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # already jitted: reuse its compilation
  times = []
  for _ in range(warmup + repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times[warmup:]) * 1e3)


class Progress(NamedTuple):
  """Everything a batch of members needs to resume after its last finished epoch
  (checkpointed). Every leaf but `epoch` and `seconds` has a leading member axis [n, ...]."""
  state: TrainState            # the members' training states
  best_params: Params          # `evaluated(state)` of each member's best validation epoch so far
  best_val_accuracy: jax.Array  # [n] float32, -1 before the first epoch
  best_epoch: jax.Array        # [n] int32, 0 before the first epoch
  epochs_done: jax.Array       # [n] int32, epochs each member trained
  active: jax.Array            # [n] bool: still training (not stopped early, not failed)
  failed_step: jax.Array       # [n] int32: first non-finite step, 0 if none
  epoch: jax.Array             # [] int32: epochs the batch has run
  seconds: jax.Array           # [] float32: training wall time so far


def evaluated_params(state: TrainState) -> Params:
  """What a member is evaluated (and reported) with: its EMA parameters if any, else params."""
  return state.ema_params if state.ema_params is not None else state.params


def evaluated_with_state(state: TrainState) -> dict:
  """`evaluated_params` with the Haiku state, for networks evaluated with it (BatchNorm)."""
  return {"params": evaluated_params(state), "state": state.model_state}


def start_progress(states: Sequence[TrainState],
                   evaluated: Callable[[TrainState], Any] = evaluated_params) -> Progress:
  """Fresh progress for members starting from `states` (one per member); `best_params` holds
  `evaluated(state)` (as `fit`'s)."""
  n, state = len(states), stack(states)
  zeros = lambda: jnp.zeros([n], jnp.int32)
  # A copy: the first epoch donates (and so deletes) the state's buffers.
  return Progress(state, jax.tree_util.tree_map(jnp.copy, evaluated(state)),
                  jnp.full([n], -1.0, jnp.float32), zeros(), zeros(), jnp.ones([n], bool),
                  zeros(), jnp.int32(0), jnp.float32(0.0))


def _select(mask: np.ndarray, new: Any, old: Any) -> Any:
  """Per member: `new` where mask, else `old` (new buffers either way)."""
  pick = lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree_util.tree_map(pick, new, old)


def _finite_members(params: Params) -> np.ndarray:
  """[n] bool: whether every parameter of each member is finite."""
  per_leaf = [jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
              for leaf in jax.tree_util.tree_leaves(params)]
  return np.asarray(jnp.all(jnp.stack(per_leaf), axis=0))


def fit(progress: Progress, epoch_fn, validate: Callable[[Params], Any], images, labels, *,
        epochs: int, seed: int, patience: Optional[int] = None,
        on_epoch: Optional[Callable[[Progress, list], None]] = None,
        epoch_args: tuple = (), mesh=None,
        evaluated: Callable[[TrainState], Any] = evaluated_params) -> Progress:
  """Trains every member for `epochs`, until its validation accuracy has not improved for
  `patience` epochs (None: never), or until its loss or parameters stop being finite. All
  members see the same shuffles (`epoch_order(seed, e, N)` in epoch e); a stopped member is
  still computed (the batch shape is static) but its progress no longer changes, and the loop
  ends when every member has stopped.

  Args:
    progress: from `start_progress`, or restored from a checkpoint.
    epoch_fn: from `members_epoch` (on `mesh`, where the progress is placed).
    validate: stacked `evaluated(state)` → validation accuracies [n].
    images, labels: the training split, [N, ...] and [N].
    on_epoch: called after every epoch with the new progress and, per member, that epoch's
      metrics dict, or None for a member that did not train in it.
    epoch_args: passed on to every `epoch_fn` call (a distilling student's teacher params).
    evaluated: the stacked training state → what `validate` takes and `best_params` keeps
      (`evaluated_params`, or `evaluated_with_state` for BatchNorm networks).

  Returns:
    The final progress: `best_params` are the parameters to report; a member with
    `failed_step` > 0 hit a non-finite loss or parameters at that step.
  """
  num_examples = labels.shape[0]
  progress = parallel.shard_members(progress, mesh)
  while int(progress.epoch) < epochs:
    epoch = int(progress.epoch) + 1
    active = np.array(progress.active)  # a copy: updated in place below
    best_epoch = np.asarray(progress.best_epoch)
    if patience is not None:
      active &= ~((best_epoch > 0) & (epoch - best_epoch > patience))
    if not active.any():
      return progress._replace(active=jnp.asarray(active))
    start = time.perf_counter()
    first_step = np.asarray(progress.state.step)
    order = jnp.asarray(epoch_order(seed, epoch, num_examples))
    state, metrics = epoch_fn(progress.state, images, labels, order, *epoch_args)
    step_losses = np.asarray(metrics["loss"])  # [n, steps], the one host sync of the epoch
    finite_losses = np.isfinite(step_losses).all(axis=1)
    finite = finite_losses & _finite_members(state.params)
    first_bad = np.where(finite_losses, step_losses.shape[1],
                         np.argmax(~np.isfinite(step_losses), axis=1) + 1)
    failed_step = np.where(active & ~finite, first_step + first_bad,
                           np.asarray(progress.failed_step))
    active &= finite
    eval_params = evaluated(state)
    val_accuracy = np.asarray(validate(eval_params), np.float32)
    improved = active & (val_accuracy > np.asarray(progress.best_val_accuracy))
    progress = Progress(
        state=state,
        best_params=_select(improved, eval_params, progress.best_params),
        best_val_accuracy=jnp.where(improved, val_accuracy, progress.best_val_accuracy),
        best_epoch=jnp.where(improved, epoch, progress.best_epoch).astype(jnp.int32),
        epochs_done=jnp.where(active, epoch, progress.epochs_done).astype(jnp.int32),
        active=jnp.asarray(active), failed_step=jnp.asarray(failed_step, jnp.int32),
        epoch=jnp.int32(epoch), seconds=progress.seconds + (time.perf_counter() - start))
    if on_epoch is not None:
      train_accuracy, steps = np.asarray(metrics["accuracy"]), np.asarray(state.step)
      on_epoch(progress, [
          {"epoch": epoch, "step": int(steps[i]), "loss": float(np.mean(step_losses[i])),
           "train_accuracy": float(train_accuracy[i]), "val_accuracy": float(val_accuracy[i]),
           "seconds": float(progress.seconds)} if active[i] else None
          for i in range(len(active))])
  return progress
