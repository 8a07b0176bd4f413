"""Tests for lrnet/train.py: the jitted epoch, members, early stopping, EMA, NaN, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrnet
from lrnet import compression
from lrnet import data
from lrnet import losses
from lrnet import models
from lrnet import train

DATASET = data.load_dataset("digits", val_fraction=0.1, seed=0)
TRAIN = (jnp.asarray(DATASET.train.images), jnp.asarray(DATASET.train.labels))
VAL = (jnp.asarray(DATASET.val.images), jnp.asarray(DATASET.val.labels))
NET = lrnet.models.mlp((64,), 10)
EVALUATE = train.make_evaluate(NET.apply, batch_size=100)
VALIDATE = jax.jit(jax.vmap(lambda p: EVALUATE(p, *VAL)[0]))


def _fit(epochs=3, learning_rate=1e-3, patience=None, on_epoch=None, params=None):
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1]) if params is None else params
  optimizer = optax.adam(learning_rate)
  epoch_fn = train.members_epoch(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32), 1)
  return train.fit(train.start_progress([train.init_state(params, optimizer)]), epoch_fn, VALIDATE,
                   *TRAIN, epochs=epochs, seed=0, patience=patience, on_epoch=on_epoch)


def test_training_learns_and_keeps_best_validation_params():
  history = []
  progress = _fit(epochs=4, on_epoch=lambda p, metrics: history.append(metrics[0]))
  assert [m["epoch"] for m in history] == [1, 2, 3, 4]
  assert history[-1]["loss"] < history[0]["loss"]
  best = max(m["val_accuracy"] for m in history)
  assert float(progress.best_val_accuracy[0]) == pytest.approx(best)
  assert float(VALIDATE(progress.best_params)[0]) == pytest.approx(best)
  assert int(progress.state.step[0]) == 4 * (TRAIN[1].shape[0] // 32)
  assert best > 0.85


def test_training_is_deterministic_on_cpu():
  first, second = _fit(epochs=2), _fit(epochs=2)
  for a, b in zip(jax.tree_util.tree_leaves(first.state), jax.tree_util.tree_leaves(second.state)):
    np.testing.assert_array_equal(a, b)


def test_ema_follows_its_closed_form():
  """With a constant update u per step, p_t = p_0 + t·u and the EMA (decay d) is
  e_T = p_0 + u·(T − d(1 − d^T)/(1 − d))."""
  decay, update = 0.9, 0.01
  constant = optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda grads, state, params=None: (jax.tree_util.tree_map(
          lambda g: jnp.full_like(g, update), grads), state))
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  state = train.init_state(params, constant, ema=True)
  epoch = jax.jit(train.make_train_epoch(train.stateful_apply(NET), constant, 100, ema_decay=decay))
  order = jnp.arange(TRAIN[1].shape[0], dtype=jnp.int32)
  state, _ = epoch(state, *TRAIN, order)
  steps = TRAIN[1].shape[0] // 100
  expected = steps - decay * (1 - decay ** steps) / (1 - decay)
  np.testing.assert_allclose(state.params["linear_0"]["w"],
                             params["linear_0"]["w"] + steps * update, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.ema_params["linear_0"]["w"],
                             params["linear_0"]["w"] + update * expected, rtol=1e-4, atol=1e-6)


def test_patience_stops_each_member_at_its_exact_epoch():
  """Member 0's best epoch is 2: with patience 3 it trains epochs 3–5 without improving and
  stops before epoch 6; member 1 improves until epoch 6 and runs to the end."""
  scripted = np.array([[0.5, 0.7, 0.6, 0.65, 0.69, 0.99, 0.99, 0.99],
                       [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6]], np.float32)
  calls = []

  def validate(params):
    calls.append(None)
    return scripted[:, len(calls) - 1]

  optimizer = optax.adam(1e-3)
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  states = [train.init_state(params, optimizer)] * 2
  epoch_fn = train.members_epoch(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32), 2)
  progress = train.fit(train.start_progress(states), epoch_fn, validate, *TRAIN, epochs=8, seed=0,
                       patience=3)
  np.testing.assert_array_equal(progress.best_epoch, [2, 6])
  np.testing.assert_array_equal(progress.epochs_done, [5, 8])
  np.testing.assert_array_equal(progress.active, [False, True])
  np.testing.assert_allclose(progress.best_val_accuracy, [0.7, 0.6])


def test_a_failing_member_is_recorded_and_the_other_trains_on():
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params)
  optimizer = optax.adam(1e-3)
  epoch_fn = train.members_epoch(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32), 2)
  progress = train.fit(train.start_progress([train.init_state(p, optimizer) for p in (params, bad)]),
                       epoch_fn, VALIDATE, *TRAIN, epochs=2, seed=0)
  np.testing.assert_array_equal(progress.failed_step, [0, 1])
  np.testing.assert_array_equal(progress.active, [True, False])
  np.testing.assert_array_equal(progress.epochs_done, [2, 0])


def test_the_epoch_is_traced_once_for_every_epoch():
  optimizer = optax.adam(1e-3)
  epoch = chex.assert_max_traces(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32),
                                 n=1)
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  progress = train.fit(train.start_progress([train.init_state(params, optimizer)]),
                       train.members_epoch(epoch, 1), VALIDATE, *TRAIN, epochs=3, seed=0)
  assert int(progress.epoch) == 3


@pytest.mark.parametrize("side_by_side", [False, True], ids=["lax_map", "vmap"])
def test_factorized_members_keep_their_padding_zero_and_train_like_one_by_one(side_by_side):
  """Zero-padded to a common rank, a factorized member is exactly a rank-r network: its padding
  stays zero, and it trains as it would alone at its own rank."""
  teacher = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  optimizer = optax.adam(1e-2)

  def run(ranks, width):
    net = models.mlp((64,), 10, ranks=width)
    evaluate = train.make_evaluate(net.apply, batch_size=100)
    states = [train.init_state(compression.pad_factors(compression.compress(teacher, r),
                                                       {"linear_0": width}), optimizer)
              for r in ranks]
    epoch_fn = train.members_epoch(train.make_train_epoch(train.stateful_apply(net), optimizer, 32),
                                   len(ranks), side_by_side)
    progress = train.fit(train.start_progress(states), epoch_fn,
                         jax.jit(jax.vmap(lambda p: evaluate(p, *VAL)[0])), *TRAIN, epochs=2,
                         seed=0)
    return train.unstack(progress.state.params, len(ranks))

  together = run([3, 8], 8)
  assert not np.any(np.asarray(together[0]["linear_0"]["u"][:, 3:]))
  assert not np.any(np.asarray(together[0]["linear_0"]["v"][3:, :]))
  [alone] = run([3], 3)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         compression.unpad_factors(together[0], {"linear_0": 3}), alone)


def test_evaluate_handles_sizes_that_are_not_multiples_of_the_chunk():
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  images, labels = TRAIN[0][:123], TRAIN[1][:123]
  logits = NET.apply(params, images)
  accuracy, loss = EVALUATE(params, images, labels)
  assert float(accuracy) == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == labels)))
  assert float(loss) == pytest.approx(float(losses.cross_entropy(logits, labels)), rel=1e-5)


def test_unrolled_epoch_in_calls_equals_the_scanned_epoch():
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  optimizer = optax.adam(1e-3)
  order = jnp.asarray(train.epoch_order(0, 1, 320))
  results = []
  for unroll in (False, True):
    epoch = train.members_epoch(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32,
                                                       unroll=unroll), 1)
    if unroll:
      epoch = train.in_calls(epoch, 32, 3)  # 10 steps: calls of 3, 3, 3 and 1
    state = train.commit(train.stack([train.init_state(params, optimizer)]))
    results.append(epoch(state, *TRAIN, order))
  (scanned, scanned_metrics), (called, called_metrics) = results
  assert called_metrics["loss"].shape == scanned_metrics["loss"].shape == (1, 10)
  np.testing.assert_allclose(called_metrics["loss"], scanned_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(called_metrics["accuracy"], scanned_metrics["accuracy"], rtol=1e-6)
  chex.assert_trees_all_close(called.params, scanned.params, rtol=1e-4, atol=1e-6)


def test_augment_shifts_within_bounds_and_flips():
  images = jnp.arange(2 * 5 * 5, dtype=jnp.float32).reshape(2, 5, 5, 1) + 1
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(train.augment(key, images, 0, False), images)
  shifted = np.asarray(train.augment(key, images, 1, False))
  for original, moved in zip(np.asarray(images), shifted):
    # Some translation by (dy, dx) in {-1, 0, 1}², zero-filled.
    matches = []
    for dy in (-1, 0, 1):
      for dx in (-1, 0, 1):
        padded = np.pad(original, ((1, 1), (1, 1), (0, 0)))
        matches.append(np.array_equal(padded[1 + dy:6 + dy, 1 + dx:6 + dx], moved))
    assert any(matches)
  flipped = np.asarray(train.augment(jax.random.PRNGKey(0), jnp.tile(images[:1], (64, 1, 1, 1)),
                                     0, True))
  is_flip = [np.array_equal(f, np.asarray(images[0])[:, ::-1]) for f in flipped]
  is_same = [np.array_equal(f, np.asarray(images[0])) for f in flipped]
  assert all(a or b for a, b in zip(is_flip, is_same)) and 10 < sum(is_flip) < 54


def test_cosine_schedule_warms_up_then_decays_and_weight_decay_selects_adamw():
  import ml_collections
  settings = ml_collections.ConfigDict(dict(learning_rate=1e-2, schedule="cosine", epochs=4,
                                            warmup_epochs=1.0, weight_decay=0.0))
  optimizer = train.optimizer(settings, steps_per_epoch=10)
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  sizes = []
  for _ in range(40):  # Adam's first steps move by ≈ the learning rate whatever the gradient
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
    sizes.append(-float(updates["w"]))
  assert sizes[0] == 0.0 and sizes[9] == pytest.approx(1e-2 * 9 / 10, rel=1e-3)
  assert max(sizes) == pytest.approx(1e-2, rel=1e-3) and sizes[-1] < 1e-4
  settings.schedule, settings.weight_decay = "constant", 0.5
  decaying = train.optimizer(settings, steps_per_epoch=10)
  params = {"w": jnp.ones(())}
  updates, _ = decaying.update({"w": jnp.zeros(())}, decaying.init(params), params)
  assert float(updates["w"]) == pytest.approx(-1e-2 * 0.5)  # decoupled: −lr · λ · w


def test_distillation_weight_zero_reproduces_the_plain_epoch_bit_for_bit():
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  optimizer = optax.adam(1e-3)
  order = jnp.asarray(train.epoch_order(0, 1, TRAIN[1].shape[0]))
  plain = jax.jit(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32))
  zero = jax.jit(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32,
                                        objective=losses.objective(10, distillation_weight=0.0)))
  distilled = jax.jit(train.make_train_epoch(
      train.stateful_apply(NET), optimizer, 32, teacher_apply=NET.apply,
      objective=losses.objective(10, distillation_weight=0.5, temperature=2.0)))
  teacher = NET.init(jax.random.PRNGKey(1), TRAIN[0][:1])
  (a, _), (b, _) = (f(train.init_state(params, optimizer), *TRAIN, order) for f in (plain, zero))
  chex.assert_trees_all_equal(a.params, b.params)
  c, _ = distilled(train.init_state(params, optimizer), *TRAIN, order, teacher)
  assert not np.allclose(c.params["linear_0"]["w"], a.params["linear_0"]["w"])
