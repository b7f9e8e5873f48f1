"""Methods that exist only for the analysis experiments (paper appendix D.1).

``sgd_noise``: trains on the *noise* of the minibatch gradient only,
``w ← w − η(ĝ_batch − g_full)``, where ``g_full`` is the gradient over the
whole training set at the same parameters (paper Fig. 9, left). The update
keeps SGD's asymmetry -- a dead unit has zero gradient on every batch and on
the full set, so it gets exactly zero update -- without any descent. Its
death checks run like DemP's (every τ; with ``prune.dynamic=False`` they only
log). The full gradient is computed at every step on every training example,
so this is for small data sets (the bundled digits) and models without batch
norm (``model.norm=False``; the paper's MLP has none).

The other arms of the noise study need no new method: pure Gaussian noise is
``method=demp`` with learning rate 0, λ = 0 and a constant noise variance
(asymmetric or ``demp.noise_symmetric=True``); plain SGD is ``method=demp``
with λ = 0 and no noise. See ``configs/analysis/noise_mlp_digits.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from demp import data as data_lib
from demp import flops, models
from demp.trainer import demp_policy, methods, steps

PyTree = Any


def subtract_full_gradient(
  full_grad_fn: Callable[[PyTree], PyTree],
) -> optax.GradientTransformation:
  """Replaces the gradient ``g`` by ``g − full_grad_fn(params)`` (its noise).

  Example::

    >>> import jax.numpy as jnp, optax
    >>> tx = subtract_full_gradient(lambda p: {'w': 2.0 * p['w']})
    >>> params = {'w': jnp.array([1.0, 3.0])}
    >>> g, _ = tx.update({'w': jnp.array([5.0, 5.0])}, tx.init(params), params)
    >>> g['w'].tolist()
    [3.0, -1.0]
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('subtract_full_gradient needs params in update().')
    full = full_grad_fn(params)
    return jax.tree.map(lambda g, f: g - f, updates, full), state

  return optax.GradientTransformation(init_fn, update_fn)


def widths_of(model, params: PyTree) -> dict[str, int]:
  """The widths ``params`` were built for, read from each group's first producer slice."""
  out = {}
  for group in model.unit_groups():
    s = group.producers[0]
    leaf = params
    for k in s.path:
      leaf = leaf[k]
    out[group.name] = int(leaf.shape[s.axis])
  return out


def full_gradient_fn(config) -> Callable[[PyTree], PyTree]:
  """``params -> ∇ mean loss over the whole training set`` for ``config``'s model and data."""
  info = data_lib.get_info(config.data)
  model = models.from_config(config.model, info.num_classes)
  if flops.variables_shape(model, info.image_shape).get('batch_stats'):
    raise ValueError(
      f'method=sgd_noise needs a model without batch norm; model '
      f'{config.model.name!r} has batch statistics (set model.norm=False).'
    )
  full = data_lib.fixed_examples(config.data, info.num_train, seed=0)
  images, labels = jnp.asarray(full['image']), jnp.asarray(full['label'])

  def full_grad(params):
    at = model.clone(widths=flax.core.FrozenDict(widths_of(model, params)))

    def loss(p):
      logits = at.apply({'params': p}, images, train=True)
      return steps.cross_entropy(logits, labels, config.label_smoothing).mean()

    return jax.grad(loss)(params)

  return full_grad


def _sgd_noise_optimizer(
  config, base: optax.GradientTransformation
) -> optax.GradientTransformation:
  return optax.chain(subtract_full_gradient(full_gradient_fn(config)), base)


methods.register(
  'sgd_noise',
  methods.Method(
    optimizer=_sgd_noise_optimizer,
    hook=lambda run, step: demp_policy.prune_dead(run),
    when=methods.prune_steps,
  ),
)
