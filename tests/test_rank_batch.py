"""Batched students: zero padding keeps factorized members exact; a batch equals single runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnet import compression
from lrnet import models
from lrnet import rank_batch
from lrnet import train

HIDDEN = (16, 16)


def _data():
  images = jax.random.uniform(jax.random.PRNGKey(1), (64, 4, 4, 1))
  labels = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 3)
  return images, labels


def _teacher():
  return models.mlp(HIDDEN, 3).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))


def _factorized_program(width=8, vectorize=False):
  """Data, teacher, optimizer, batched epoch and batched accuracy of a width-8 factorized MLP."""
  images, labels = _data()
  optimizer = train.adam(1e-2)
  net = models.mlp(HIDDEN, 3, ranks=width)
  epoch = train.make_train_epoch(train.stateful_apply(net), optimizer, batch_size=16)
  evaluate = train.make_evaluate(net.apply)
  accuracy = jax.jit(jax.vmap(lambda p: evaluate(p, images, labels)[0]))
  return (images, labels, _teacher(), optimizer,
          rank_batch.batch_epoch(epoch, vectorize=vectorize), accuracy)


def test_pad_unpad_roundtrip_and_same_function():
  params = compression.compress(_teacher(), 3)
  padded = rank_batch.pad_factors(params, 8)
  assert padded["linear_0"]["u"].shape == (16, 8) and padded["linear_0"]["v"].shape == (8, 16)
  back = rank_batch.unpad_factors(padded, 3)
  chex_equal = jax.tree_util.tree_map(np.array_equal, back, params)
  assert all(jax.tree_util.tree_leaves(chex_equal))
  images, _ = _data()
  small = models.mlp(HIDDEN, 3, ranks=3).apply(params, images)
  wide = models.mlp(HIDDEN, 3, ranks=8).apply(padded, images)
  np.testing.assert_allclose(small, wide, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("vectorize", [False, True], ids=["lax_map", "vmap"])
def test_factorized_batch_keeps_padding_zero_and_matches_single_runs(vectorize):
  images, labels, teacher, optimizer, epoch_fn, accuracy = _factorized_program(vectorize=vectorize)

  def run(ranks):
    states = [train.init_state(rank_batch.pad_factors(compression.compress(teacher, r), 8),
                               optimizer) for r in ranks]
    batch = rank_batch.fit_batch(rank_batch.start_batch(states), epoch_fn, accuracy, images,
                                 labels, epochs=3, seed=0)
    return batch, rank_batch.unstack(batch.progress.state.params, len(ranks))

  batch, members = run([2, 5])
  for rank, params in zip([2, 5], members):
    for name in ("linear_0", "linear_1"):
      assert not np.any(np.asarray(params[name]["u"][:, rank:]))
      assert not np.any(np.asarray(params[name]["v"][rank:, :]))
  assert int(batch.epoch) == 3 and np.all(np.asarray(batch.progress.epochs_done) == 3)
  # One by one: a program of its own per member, at its own (unpadded) rank.
  net = models.mlp(HIDDEN, 3, ranks=5)
  single = rank_batch.batch_epoch(train.make_train_epoch(train.stateful_apply(net), optimizer,
                                                         batch_size=16))
  evaluate = train.make_evaluate(net.apply)
  batch_alone = rank_batch.fit_batch(
      rank_batch.start_batch([train.init_state(compression.compress(teacher, 5), optimizer)]),
      single, jax.jit(jax.vmap(lambda p: evaluate(p, images, labels)[0])), images, labels,
      epochs=3, seed=0)
  alone = [rank_batch.unpad_factors(members[1], 5),
           rank_batch.unstack(batch_alone.progress.state.params, 1)[0]]
  for a, b in zip(jax.tree_util.tree_leaves(alone[0]), jax.tree_util.tree_leaves(alone[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fit_batch_records_a_failing_member_and_keeps_the_other():
  images, labels, teacher, optimizer, epoch_fn, accuracy = _factorized_program()
  good = rank_batch.pad_factors(compression.compress(teacher, 4), 8)
  bad = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), good)
  states = [train.init_state(p, optimizer) for p in (good, bad)]
  batch = rank_batch.fit_batch(rank_batch.start_batch(states), epoch_fn, accuracy, images, labels,
                               epochs=2, seed=0)
  failed = np.asarray(batch.failed_step)
  assert failed[0] == 0 and failed[1] == 1
  assert list(np.asarray(batch.active)) == [True, False]
  assert int(batch.progress.epochs_done[0]) == 2
