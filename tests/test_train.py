"""Tests for lrnet/train.py: the jitted epoch, early stopping, EMA, NaN detection, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrnet
from lrnet import data
from lrnet import train

DATASET = data.load_dataset("digits", val_fraction=0.1, seed=0)
TRAIN = (jnp.asarray(DATASET.train.images), jnp.asarray(DATASET.train.labels))
VAL = (jnp.asarray(DATASET.val.images), jnp.asarray(DATASET.val.labels))
NET = lrnet.models.mlp((64,), 10)
EVALUATE = train.make_evaluate(NET.apply, batch_size=100)


def _fit(epochs=3, learning_rate=1e-3, ema_decay=0.0, patience=None, on_epoch=None):
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  optimizer = train.adam(learning_rate)
  state = train.init_state(params, optimizer, ema=ema_decay > 0)
  epoch_fn = jax.jit(train.make_train_epoch(train.stateful_apply(NET), optimizer, 32,
                                            ema_decay=ema_decay), donate_argnums=0)
  return train.fit(train.start_progress(state), epoch_fn, lambda p: EVALUATE(p, *VAL)[0], *TRAIN,
                   epochs=epochs, seed=0, patience=patience, what="test run", on_epoch=on_epoch)


def test_training_learns_and_keeps_best_validation_params():
  history = []
  progress = _fit(epochs=4, on_epoch=lambda p, m: history.append(m))
  assert [m["epoch"] for m in history] == [1, 2, 3, 4]
  assert history[-1]["loss"] < history[0]["loss"]
  best = max(m["val_accuracy"] for m in history)
  assert float(progress.best_val_accuracy) == pytest.approx(best)
  assert float(EVALUATE(progress.best_params, *VAL)[0]) == pytest.approx(best)
  assert int(progress.state.step) == 4 * (TRAIN[1].shape[0] // 32)
  assert best > 0.85


def test_training_is_deterministic_on_cpu():
  first, second = _fit(epochs=2), _fit(epochs=2)
  for a, b in zip(jax.tree_util.tree_leaves(first.state), jax.tree_util.tree_leaves(second.state)):
    np.testing.assert_array_equal(a, b)


def test_ema_params_average_the_trajectory():
  progress = _fit(epochs=2, ema_decay=0.9)
  ema, raw = progress.state.ema_params, progress.state.params
  assert not np.allclose(ema["linear_0"]["w"], raw["linear_0"]["w"])


def test_patience_stops_early():
  history = []
  _fit(epochs=30, patience=1, learning_rate=3e-2, on_epoch=lambda p, m: history.append(m))
  assert len(history) < 30


def test_non_finite_loss_raises_naming_run_and_step():
  with pytest.raises(train.NonFiniteError, match=r"test run: non-finite .* step \d+"):
    _fit(epochs=3, learning_rate=1e30)


def test_evaluate_handles_sizes_that_are_not_multiples_of_the_chunk():
  params = NET.init(jax.random.PRNGKey(0), TRAIN[0][:1])
  images, labels = TRAIN[0][:123], TRAIN[1][:123]
  logits = NET.apply(params, images)
  accuracy, loss = EVALUATE(params, images, labels)
  assert float(accuracy) == pytest.approx(float(jnp.mean(jnp.argmax(logits, -1) == labels)))
  assert float(loss) == pytest.approx(float(train.cross_entropy(logits, labels)), rel=1e-5)


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
  logits = jax.random.normal(jax.random.PRNGKey(0), (8, 10))
  assert float(train.distillation_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
  assert float(train.distillation_loss(logits, -logits, 4.0)) > 0.0
