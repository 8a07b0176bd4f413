"""Tests for lrnet/losses.py: cross-entropy, soft targets, subclass heads, the objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrnet import losses


def test_soft_targets_match_a_hand_computed_value():
  student, teacher, temperature = jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 0.0]]), 2.0
  # Teacher at T = 2: softmax(1, 0) = (e/(e+1), 1/(e+1)); student uniform: KL = Σ p log(2p).
  p = np.array([np.e / (np.e + 1), 1 / (np.e + 1)])
  expected = temperature**2 * np.sum(p * np.log(2 * p))
  assert float(losses.soft_targets(student, teacher, temperature)) == pytest.approx(expected, rel=1e-5)


def test_objective_mixes_cross_entropy_and_distillation_by_weight():
  logits = jnp.array([[1.0, -1.0, 0.5], [0.0, 2.0, -0.5]])
  teacher = jnp.array([[0.0, 1.0, 0.0], [3.0, 0.0, 0.0]])
  labels = jnp.array([0, 1])
  ce = losses.cross_entropy(logits, labels)
  kd = losses.soft_targets(logits, teacher, 3.0)
  loss, class_logits = losses.objective(3, distillation_weight=0.25, temperature=3.0)(
      logits, labels, teacher)
  assert float(loss) == pytest.approx(0.75 * float(ce) + 0.25 * float(kd), rel=1e-6)
  np.testing.assert_array_equal(class_logits, logits)


def test_weight_zero_is_the_plain_cross_entropy_bit_for_bit():
  logits = jax.random.normal(jax.random.PRNGKey(0), (16, 10))
  labels = jnp.arange(16) % 10
  loss, _ = losses.objective(10)(logits, labels, None)
  plain = jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels]) * -1
  assert float(loss) == pytest.approx(float(plain), rel=1e-6)
  assert float(loss) == float(losses.cross_entropy(logits, labels))


def test_label_smoothing_targets():
  logits = jnp.array([[2.0, 0.0, 0.0, 0.0]])
  log_p = np.asarray(jax.nn.log_softmax(logits))[0]
  targets = np.array([0.9 + 0.1 / 4, 0.1 / 4, 0.1 / 4, 0.1 / 4])
  assert float(losses.cross_entropy(logits, jnp.array([0]), 0.1)) == pytest.approx(
      -np.sum(targets * log_p), rel=1e-6)


def test_collapse_sums_subclass_probabilities():
  logits = jax.random.normal(jax.random.PRNGKey(1), (5, 3 * 4))  # 3 classes × 4 subclasses
  class_probs = jax.nn.softmax(losses.collapse(logits, 3))
  subclass_probs = np.asarray(jax.nn.softmax(logits)).reshape(5, 3, 4).sum(-1)
  np.testing.assert_allclose(class_probs, subclass_probs, rtol=1e-5)
  np.testing.assert_array_equal(losses.collapse(logits[:, :3], 3), logits[:, :3])


def test_subclass_diversity_matches_its_formula_and_prefers_spread_examples():
  logits = jax.random.normal(jax.random.PRNGKey(2), (8, 6))
  v = np.asarray(logits, np.float64)
  v = (v - v.mean(0)) / np.sqrt(v.var(0) + 1e-8)
  s = v @ v.T / 2.0
  expected = np.mean(np.log(np.exp(s).sum(1))) - 1 / 2.0 - np.log(8)
  assert float(losses.subclass_diversity(logits, 2.0)) == pytest.approx(expected, rel=1e-5)
  # Two clusters of identical examples score worse than orthogonal-ish spread ones.
  clustered = jnp.concatenate([jnp.tile(logits[:1], (4, 1)), jnp.tile(logits[1:2], (4, 1))])
  assert float(losses.subclass_diversity(clustered, 2.0)) > float(
      losses.subclass_diversity(logits, 2.0))


def test_distilling_subclasses_uses_the_subclass_logits():
  logits = jax.random.normal(jax.random.PRNGKey(3), (4, 6))
  teacher = jax.random.normal(jax.random.PRNGKey(4), (4, 6))
  labels = jnp.array([0, 1, 2, 0])
  loss, class_logits = losses.objective(3, distillation_weight=1.0, temperature=2.0,
                                        distill_subclasses=True)(logits, labels, teacher)
  assert float(loss) == pytest.approx(float(losses.soft_targets(logits, teacher, 2.0)), rel=1e-6)
  assert class_logits.shape == (4, 3)
