"""The loss and the pure step functions (no config, no host state).

``make_train_step(model, tx)`` returns ``step(state, batch) -> (state, metrics)``
over the train state ``{'params', 'batch_stats', 'opt_state'}``
(:func:`demp.trainer.run.create_train_state`); ``make_eval_step(model)`` a jitted
``step(variables, batch) -> sums``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_bk: jax.Array, labels_b: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example loss; labels are class ids ``[B]`` or distributions ``[B, K]`` (mixup)."""
  num_classes = logits_bk.shape[-1]
  targets_bk = labels_b if labels_b.ndim == 2 else jax.nn.one_hot(labels_b, num_classes)
  targets_bk = optax.smooth_labels(targets_bk, smoothing) if smoothing else targets_bk
  return optax.softmax_cross_entropy(logits_bk, targets_bk)


def make_train_step(model, tx: optax.GradientTransformation, label_smoothing: float = 0.0):
  """``step(state, batch) -> (state, metrics)``; state = {params, batch_stats, opt_state}."""

  def loss_fn(params, batch_stats, batch):
    logits_bk, updated = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      batch['image'],
      train=True,
      mutable=['batch_stats'],
    )
    loss = cross_entropy(logits_bk, batch['label'], label_smoothing).mean()
    return loss, (updated.get('batch_stats', {}), logits_bk)

  def step(state, batch):
    (loss, (batch_stats, logits_bk)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state['params'], state['batch_stats'], batch
    )
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    labels_b = batch['label'] if batch['label'].ndim == 1 else jnp.argmax(batch['label'], -1)
    accuracy = jnp.mean(jnp.argmax(logits_bk, -1) == labels_b)
    new_state = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state}
    return new_state, {'loss': loss, 'accuracy': accuracy}

  return step


def _eval_sums(model, variables, batch):
  logits_bk = model.apply(variables, batch['image'], train=False)
  mask_b = batch['mask']
  loss = cross_entropy(logits_bk, batch['label'])
  correct = jnp.argmax(logits_bk, -1) == batch['label']
  return {
    'loss_sum': jnp.sum(loss * mask_b),
    'correct': jnp.sum(correct * mask_b),
    'count': jnp.sum(mask_b),
  }


_eval_step = jax.jit(_eval_sums, static_argnums=0)  # one jit: compiled once per model and shape


def make_eval_step(model):
  """Jitted ``step(variables, batch) -> {'loss_sum', 'correct', 'count'}`` over ``batch['mask']``.

  Every call returns the same jitted function for an equal ``model`` (a Flax
  module is compared by its fields, the widths among them): the eval step is
  traced and compiled once per architecture and batch shape, not once per
  :func:`demp.trainer.train.evaluate`.
  """
  return functools.partial(_eval_step, model)
