"""Training: explicit state, a jitted epoch (lax.scan over batches), jitted evaluation.

Everything that runs per step is inside one jitted `lax.scan` per epoch, so the host
dispatches once per epoch and reads metrics back once per epoch. Networks are used through
a stateful signature `apply(params, model_state, images, *args) -> (logits, model_state)`,
where `model_state` carries per-layer projection state (empty for plain networks).
"""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
ApplyFn = Callable[..., tuple[jax.Array, Any]]


class TrainState(NamedTuple):
  params: Params            # trainable parameters (Haiku tree)
  opt_state: optax.OptState  # optimizer state for `params`
  model_state: Any          # non-trainable network state, e.g. per-layer subspaces; {} if none
  ema_params: Optional[Params]  # exponential moving average of `params`; None when EMA is off
  step: jax.Array           # [] int32, optimizer steps taken


class NonFiniteError(FloatingPointError):
  """Raised when the loss or the parameters stop being finite."""


def stateful_apply(net) -> ApplyFn:
  """`apply(params, model_state, images, *args) -> (logits, model_state)` for any Haiku net."""
  if isinstance(net, hk.TransformedWithState):
    return net.apply
  return lambda params, model_state, images, *args: (net.apply(params, images, *args), model_state)


def adam(learning_rate: float) -> optax.GradientTransformation:
  """The reference optimizer: Adam with a constant learning rate."""
  return optax.adam(learning_rate)


def init_state(params: Params, optimizer: optax.GradientTransformation,
               model_state: Any = None, ema: bool = False) -> TrainState:
  """A fresh training state starting from `params`."""
  return TrainState(params=params, opt_state=optimizer.init(params),
                    # Copies: leaves may share buffers, which a donating step cannot take twice.
                    model_state={} if model_state is None else jax.tree_util.tree_map(jnp.copy, model_state),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema else None,
                    step=jnp.zeros([], jnp.int32))


def commit(tree: Any) -> Any:
  """`tree` with every array committed to the default device, like a jitted step's outputs.

  A jitted function compiles again when the committedness of an argument changes, so a state
  built eagerly (uncommitted scalars) would compile the epoch twice: once for the fresh state,
  once for the state the first epoch returns. Committing it up front compiles once.
  """
  return jax.device_put(tree, jax.devices()[0])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy. logits: [batch, classes]; labels: [batch] int."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """Hinton et al.'s soft-target loss: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean."""
  teacher_probs = jax.nn.softmax(teacher_logits / temperature)
  log_student = jax.nn.log_softmax(logits / temperature)
  log_teacher = jax.nn.log_softmax(teacher_logits / temperature)
  kl = jnp.sum(teacher_probs * (log_teacher - log_student), axis=-1)
  return temperature**2 * jnp.mean(kl)


class Distillation(NamedTuple):
  """Distillation from a teacher: loss = (1 − weight)·CE + weight·T²·KL."""
  weight: float = 0.5
  temperature: float = 4.0


def make_train_epoch(apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
                     batch_size: int, ema_decay: float = 0.0,
                     distillation: Optional[Distillation] = None):
  """Builds `epoch(state, images, labels, order, soft_targets, *args) -> (state, metrics)`.

  One epoch is a `lax.scan` over `len(order) // batch_size` batches (the remainder of the
  shuffled order is dropped; a new order each epoch sees it later).

  Args:
    apply_fn: stateful apply (see `stateful_apply`).
    optimizer: an optax transformation.
    batch_size: examples per step.
    ema_decay: decay of the parameter EMA (used only if the state holds `ema_params`).
    distillation: soft-target loss settings; `soft_targets` must then be teacher logits.

  Returns:
    An unjitted function (jit it, or vmap then jit it). Its inputs: `images` [N, ...],
    `labels` [N], `order` [N] int32 permutation, `soft_targets` [N, classes] or None,
    `*args` passed to `apply_fn` (e.g. a rank). Metrics: `loss` [steps] per step and
    `accuracy` [] training accuracy over the epoch.
  """

  def loss_fn(params, model_state, images, labels, soft_targets, args):
    logits, model_state = apply_fn(params, model_state, images, *args)
    loss = cross_entropy(logits, labels)
    if distillation is not None:
      soft = distillation_loss(logits, soft_targets, distillation.temperature)
      loss = (1.0 - distillation.weight) * loss + distillation.weight * soft
    correct = jnp.sum(jnp.argmax(logits, -1) == labels)
    return loss, (model_state, correct)

  def step(state: TrainState, batch_index, images, labels, soft_targets, args):
    batch_images = jnp.take(images, batch_index, axis=0)
    batch_labels = jnp.take(labels, batch_index, axis=0)
    batch_soft = None if soft_targets is None else jnp.take(soft_targets, batch_index, axis=0)
    (loss, (model_state, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.model_state, batch_images, batch_labels, batch_soft, args)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if ema_params is not None:
      ema_params = optax.incremental_update(params, ema_params, 1.0 - ema_decay)
    state = TrainState(params, opt_state, model_state, ema_params, state.step + 1)
    return state, (loss, correct)

  def epoch(state: TrainState, images, labels, order, soft_targets, *args):
    num_steps = order.shape[0] // batch_size
    batch_indices = order[:num_steps * batch_size].reshape(num_steps, batch_size)
    body = lambda s, idx: step(s, idx, images, labels, soft_targets, args)
    state, (losses, correct) = jax.lax.scan(body, state, batch_indices)
    return state, {"loss": losses, "accuracy": jnp.sum(correct) / (num_steps * batch_size)}

  return epoch


def make_evaluate(apply_fn: Callable[..., jax.Array], batch_size: int = 1000):
  """Builds a jitted `evaluate(params, images, labels, *args) -> (accuracy, loss)`.

  `apply_fn(params, images, *args) -> logits` is stateless (evaluation uses the final,
  exactly projected or factorized parameters). Runs in fixed-size chunks (padded and
  masked), so memory stays bounded. Examples with a negative label are padding (see
  `pad_split`) and not counted.
  """

  @jax.jit
  def evaluate(params, images, labels, *args):
    n = images.shape[0]
    num_chunks = -(-n // batch_size)
    pad = num_chunks * batch_size - n
    images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
    labels = jnp.concatenate([labels, jnp.zeros((pad,), labels.dtype)])
    valid = (jnp.arange(num_chunks * batch_size) < n) & (labels >= 0)

    def chunk(carry, index):
      correct, loss = carry
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, index * batch_size, batch_size)
      logits = apply_fn(params, sl(images), *args)
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, sl(labels))
      mask = sl(valid)
      correct += jnp.sum((jnp.argmax(logits, -1) == sl(labels)) & mask)
      loss += jnp.sum(jnp.where(mask, per_example, 0.0))
      return (correct, loss), None

    (correct, loss), _ = jax.lax.scan(chunk, (jnp.zeros([], jnp.int32), jnp.zeros([])),
                                      jnp.arange(num_chunks))
    count = jnp.maximum(jnp.sum(valid), 1)
    return correct / count, loss / count

  return evaluate


def pad_split(images: jax.Array, labels: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
  """Pads a split to `length` examples with zero images and label -1 (ignored by evaluate)."""
  pad = length - labels.shape[0]
  return (jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)]),
          jnp.concatenate([labels, jnp.full((pad,), -1, labels.dtype)]))


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The seeded shuffle of epoch `epoch`: a pure function of (seed, epoch), so resumable."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples).astype(np.int32)


def check_finite(losses: np.ndarray, params: Params, first_step: int, what: str) -> None:
  """Raises `NonFiniteError` naming the first non-finite step of an epoch."""
  losses = np.asarray(losses)
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise NonFiniteError(f"{what}: non-finite loss {losses[bad[0]]} at step {first_step + int(bad[0]) + 1}")
  if not all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(params)):
    raise NonFiniteError(f"{what}: non-finite parameters after step {first_step + losses.size}")


def measure_latency(fn: Callable[..., jax.Array], *args, repeats: int = 20, warmup: int = 2) -> float:
  """Median wall time in milliseconds of the jitted call `fn(*args)`, after warm-up."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)  # already jitted: reuse its compilation
  for _ in range(warmup):
    jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times) * 1e3)


class Progress(NamedTuple):
  """Everything a run needs to resume after its last finished epoch (checkpointed)."""
  state: TrainState
  best_params: Params          # parameters of the best validation epoch so far
  best_val_accuracy: jax.Array  # [] float32, -1 before the first epoch
  best_epoch: jax.Array        # [] int32, 0 before the first epoch
  epochs_done: jax.Array       # [] int32
  seconds: jax.Array           # [] float32, training wall time so far


def start_progress(state: TrainState) -> Progress:
  return Progress(state, state.params, jnp.float32(-1.0), jnp.int32(0), jnp.int32(0),
                  jnp.float32(0.0))


def fit(progress: Progress, epoch_fn, validate: Callable[[Params], float], images, labels, *,
        epochs: int, seed: int, patience: Optional[int] = None, what: str = "training",
        soft_targets=None, apply_args: tuple = (),
        on_epoch: Optional[Callable[[Progress, dict], None]] = None) -> Progress:
  """Trains until `epochs` or until validation accuracy has not improved for `patience` epochs.

  Args:
    progress: where to start (fresh from `start_progress`, or restored from a checkpoint).
    epoch_fn: a jitted epoch from `make_train_epoch`.
    validate: `params -> validation accuracy` (model choice and early stopping).
    images, labels: the training split, [N, ...] and [N].
    epochs: the maximum number of epochs.
    seed: shuffling seed; epoch e uses `epoch_order(seed, e, N)`.
    patience: stop after this many epochs without a better validation accuracy; None: never.
    what: a name for messages, e.g. "teacher" or "rank 20 straight-through".
    soft_targets: teacher logits [N, classes] for distillation, else None.
    apply_args: extra arguments for the network (e.g. a rank).
    on_epoch: called after every epoch with the new progress and that epoch's metrics (for
      logging and checkpoints).

  Returns:
    The final progress; `best_params` are the parameters to report.

  Raises:
    NonFiniteError: the loss or parameters became NaN/Inf (message names `what` and the step).
  """
  num_examples = labels.shape[0]
  progress = commit(progress)
  while int(progress.epochs_done) < epochs:
    epoch = int(progress.epochs_done) + 1
    if patience is not None and epoch - int(progress.best_epoch) > patience and int(progress.best_epoch) > 0:
      break
    start = time.perf_counter()
    first_step = int(progress.state.step)
    order = jnp.asarray(epoch_order(seed, epoch, num_examples))
    state, metrics = epoch_fn(progress.state, images, labels, order, soft_targets, *apply_args)
    losses = np.asarray(metrics["loss"])  # the one host sync of the epoch
    check_finite(losses, state.params, first_step, what)
    eval_params = state.ema_params if state.ema_params is not None else state.params
    val_accuracy = float(validate(eval_params))
    improved = val_accuracy > float(progress.best_val_accuracy)
    progress = Progress(
        state=state,
        # A copy: the next epoch donates (and so deletes) the state's buffers.
        best_params=jax.tree_util.tree_map(jnp.copy, eval_params) if improved else progress.best_params,
        best_val_accuracy=jnp.float32(val_accuracy) if improved else progress.best_val_accuracy,
        best_epoch=jnp.int32(epoch) if improved else progress.best_epoch,
        epochs_done=jnp.int32(epoch),
        seconds=progress.seconds + (time.perf_counter() - start))
    if on_epoch is not None:
      on_epoch(progress, {"epoch": epoch, "step": int(state.step), "loss": float(np.mean(losses)),
                          "train_accuracy": float(metrics["accuracy"]),
                          "val_accuracy": val_accuracy, "seconds": float(progress.seconds)})
  return progress
