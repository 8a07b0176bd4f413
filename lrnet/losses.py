"""Training objectives: cross-entropy, soft-target and subclass distillation.

An objective is `objective(logits, labels, teacher_logits) -> (loss, class_logits)`:
`logits` [batch, outputs] are what the network returns, `labels` [batch] int,
`teacher_logits` [batch, outputs'] the teacher's on the same batch (None without a teacher),
and `class_logits` [batch, classes] what accuracy is measured on.

A subclass head (Müller et al., "Subclass distillation", 2020; origin notebook 003) has
`classes · k` outputs, class c owning outputs c·k … c·k + k − 1; a class's probability is the
sum of its subclasses' probabilities, so its logit is the logsumexp of theirs (`collapse`).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

Objective = Callable[[jax.Array, jax.Array, Optional[jax.Array]], tuple[jax.Array, jax.Array]]


def collapse(logits: jax.Array, num_classes: int) -> jax.Array:
  """Class logits of a subclass head: [batch, classes·k] → [batch, classes],
  logit_c = log Σ_j exp(logit_{c·k + j}), so softmax(class logits) sums subclass probabilities."""
  k = logits.shape[-1] // num_classes
  if k == 1:
    return logits
  return jax.nn.logsumexp(logits.reshape(logits.shape[:-1] + (num_classes, k)), axis=-1)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Mean softmax cross-entropy against one-hot labels smoothed by `smoothing`:
  targets (1 − ε)·onehot + ε / classes. logits [batch, classes], labels [batch] int."""
  if smoothing == 0.0:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
  return jnp.mean(optax.softmax_cross_entropy(logits, targets))


def soft_targets(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
  """Hinton et al.'s distillation loss, T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean.
  The T² keeps its gradients' scale independent of T."""
  kl = optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits / temperature),
                                                   jax.nn.log_softmax(teacher_logits / temperature))
  return temperature**2 * jnp.mean(kl)


def subclass_diversity(logits: jax.Array, temperature: float) -> jax.Array:
  """The subclass teacher's auxiliary loss: each subclass logit normalised over the batch
  (zero mean, unit variance) into v_i, then (1/n) Σ_i log Σ_j exp(v_i·v_j / T) − 1/T − log n.
  It is smallest when the examples' logit vectors point in different directions, so the
  subclasses of a class split its examples. logits [n, classes·k]."""
  n = logits.shape[0]
  mean = jnp.mean(logits, axis=0, keepdims=True)
  normalised = (logits - mean) / jnp.sqrt(jnp.var(logits, axis=0, keepdims=True) + 1e-8)
  similarity = normalised @ normalised.T / temperature  # [n, n]
  return jnp.mean(jax.nn.logsumexp(similarity, axis=1)) - 1.0 / temperature - jnp.log(n)


def objective(num_classes: int, *, smoothing: float = 0.0, distillation_weight: float = 0.0,
              temperature: float = 1.0, distill_subclasses: bool = False,
              diversity_weight: float = 0.0, diversity_temperature: float = 1.0) -> Objective:
  """The training objective

    (1 − w) · CE_ε(collapse(s), y) + w · T² · KL(teacher_T ‖ student_T) + β · diversity(s)

  with w = `distillation_weight` (0: no teacher needed), the KL on class logits, or on
  subclass logits with `distill_subclasses`, and β = `diversity_weight` (a subclass teacher's
  own training). With w = 0 and β = 0 it is the plain cross-entropy, bit for bit.
  """

  def loss(logits, labels, teacher_logits=None):
    class_logits = collapse(logits, num_classes)
    total = cross_entropy(class_logits, labels, smoothing)
    if distillation_weight:
      student = logits if distill_subclasses else class_logits
      teacher = teacher_logits if distill_subclasses else collapse(teacher_logits, num_classes)
      total = ((1.0 - distillation_weight) * total
               + distillation_weight * soft_targets(student, teacher, temperature))
    if diversity_weight:
      total = total + diversity_weight * subclass_diversity(logits, diversity_temperature)
    return total, class_logits

  return loss
