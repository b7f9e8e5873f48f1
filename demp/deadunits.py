"""Finding dead units: one jitted pass of activation statistics.

Models expose the post-activation tensors of their units with Flax's ``sow``::

    y = nn.relu(x)
    self.sow('intermediates', 'conv_0', y)     # last axis = the group's units

(:func:`probe` does exactly that and returns its input). Sowing is free during
training: ``sow`` is a no-op unless ``intermediates`` is mutable. The death
check applies the model in eval mode (BN running statistics) to a fixed set of
training examples, batch by batch inside one ``lax.scan``, and reduces every
sown tensor over every axis but the last: a unit is alive if it is active on
any example at any position, i.e. dead = AND over all examples and batches.

Criteria, on the post-activation ``a`` (``CRITERIA``):

* ``relu``: dead where ``a == 0`` exactly;
* ``leaky_relu``: dead where ``a <= 0`` (the pre-activation is not positive);
* ``gelu``, ``swish``, ``eps``: dead where ``|a| < eps`` (epsilon-inactivity,
  eps = 0.01 in the paper).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from demp import protocol, surgery

PyTree = Any

CRITERIA: dict[str, Callable[[jax.Array, float], jax.Array]] = {
  'relu': lambda a, eps: a == 0,
  'leaky_relu': lambda a, eps: a <= 0,
  'gelu': lambda a, eps: jnp.abs(a) < eps,
  'swish': lambda a, eps: jnp.abs(a) < eps,
  'eps': lambda a, eps: jnp.abs(a) < eps,
}


def probe(module: nn.Module, name: str, a: jax.Array) -> jax.Array:
  """Sows ``a`` (units on the last axis) for the death check; returns ``a``.

  When the module is applied with a ``gates`` collection holding a ``[units]``
  vector under ``name``, returns ``a * gate`` instead: the gradient at a gate of
  ones is the units' saliency (``baselines.gates``). Without that collection
  (training, init, the death check) nothing changes and nothing is created.
  """
  if module.has_variable('gates', name):
    gate = module.get_variable('gates', name)
    a = a * gate.reshape((1,) * (a.ndim - 1) + gate.shape)
  module.sow('intermediates', name, a)
  return a


def criterion_for(activation: str) -> str:
  """The death criterion for a named activation (``relu`` -> ``relu`` ...)."""
  if activation not in CRITERIA:
    raise ValueError(
      f'no death criterion for activation {activation!r}; known: {sorted(CRITERIA)}.'
    )
  return activation


def _get(tree: Mapping, path: tuple[str, ...]):
  for k in path:
    if k not in tree:
      raise KeyError(
        f'site {"/".join(path)!r} was not sown; the model must call '
        f'probe()/sow("intermediates", ...) there.'
      )
    tree = tree[k]
  return tree


def site_stats(intermediates: Mapping, groups, criterion: str, eps: float):
  """Per group: (alive [width] bool, activity [width] float) of one batch."""
  dead_fn = CRITERIA[criterion]
  alive, activity = {}, {}
  for g in groups:
    for site in g.sites:
      for a in _get(intermediates, site):  # sow keeps a tuple (one per call)
        axes = tuple(range(a.ndim - 1))
        alive_s = jnp.any(~dead_fn(a, eps), axis=axes)
        act_s = jnp.max(jnp.abs(a), axis=axes).astype(jnp.float32)
        alive[g.name] = alive_s if g.name not in alive else alive[g.name] | alive_s
        activity[g.name] = act_s if g.name not in activity else jnp.maximum(activity[g.name], act_s)
  return alive, activity


@functools.partial(jax.jit, static_argnames=('model', 'criterion', 'batch_size'))
def _scan_stats(model, variables, images, *, criterion: str, eps: float, batch_size: int):
  groups = protocol.unit_groups(model)
  n = images.shape[0]
  xs = images.reshape((n // batch_size, batch_size) + images.shape[1:])

  def batch_stats(x):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    return site_stats(state['intermediates'], groups, criterion, eps)

  first = batch_stats(xs[0])

  def body(carry, x):
    alive, activity = batch_stats(x)
    return (
      jax.tree.map(jnp.logical_or, carry[0], alive),
      jax.tree.map(jnp.maximum, carry[1], activity),
    ), None

  (alive, activity), _ = jax.lax.scan(body, first, xs[1:])
  return alive, activity


def dead_unit_stats(
  model,
  variables: Mapping[str, PyTree],
  images: jax.Array,
  *,
  criterion: str = 'relu',
  eps: float = 0.01,
  batch_size: int = 128,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Liveness of every unit group of ``model`` on ``images``.

  Args:
    model: a Flax module with ``unit_groups()`` whose sites it sows.
    variables: ``{'params': ..., 'batch_stats': ...}`` (eval mode is used).
    images: ``[N, ...]`` fixed training examples; ``N`` must be a multiple of
      ``batch_size`` (use ``N <= batch_size`` for one batch).
    criterion: a key of :data:`CRITERIA`.
    eps: the threshold of epsilon-inactivity criteria.

  Returns:
    ``(alive, activity)``: dicts group name -> ``[width]`` bool (active on some
    example at some position) and -> ``[width]`` float32 (max |a|), on host.
  """
  if criterion not in CRITERIA:
    raise ValueError(f'criterion={criterion!r} is not one of {sorted(CRITERIA)}.')
  protocol.unit_groups(model)  # a model outside the protocol fails here, with advice
  n = images.shape[0]
  batch_size = min(batch_size, n)
  if n % batch_size:
    raise ValueError(
      f'the {n} death-check examples are not a multiple of the batch size {batch_size}.'
    )
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  alive, activity = _scan_stats(
    model, variables, images, criterion=criterion, eps=float(eps), batch_size=batch_size
  )
  alive, activity = jax.device_get((alive, activity))
  return (
    {k: np.asarray(v) for k, v in alive.items()},
    {k: np.asarray(v) for k, v in activity.items()},
  )


def site_ranges(intermediates: Mapping, groups):
  """Per group: (min [width], max [width]) of the post-activation over one batch (all sites)."""
  low, high = {}, {}
  for g in groups:
    for site in g.sites:
      for a in _get(intermediates, site):
        axes = tuple(range(a.ndim - 1))
        lo = jnp.min(a, axis=axes).astype(jnp.float32)
        hi = jnp.max(a, axis=axes).astype(jnp.float32)
        low[g.name] = lo if g.name not in low else jnp.minimum(low[g.name], lo)
        high[g.name] = hi if g.name not in high else jnp.maximum(high[g.name], hi)
  return low, high


@functools.partial(jax.jit, static_argnames=('model', 'criterion', 'batch_size'))
def _scan_all(model, variables, images, *, criterion: str, eps: float, batch_size: int):
  groups = model.unit_groups()
  n = images.shape[0]
  xs = images.reshape((n // batch_size, batch_size) + images.shape[1:])

  def batch_stats(x):
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
    inter = state['intermediates']
    return site_stats(inter, groups, criterion, eps) + site_ranges(inter, groups)

  combine = (jnp.logical_or, jnp.maximum, jnp.minimum, jnp.maximum)

  def body(carry, x):
    new = batch_stats(x)
    return tuple(jax.tree.map(f, c, n) for f, c, n in zip(combine, carry, new)), None

  out, _ = jax.lax.scan(body, batch_stats(xs[0]), xs[1:])
  return out


def compile_unit_stats(
  model, variables: Mapping[str, PyTree], images, *, criterion: str = 'relu', batch_size: int = 128
):
  """:func:`unit_stats`'s pass compiled ahead of time for these shapes (arrays or shape structs).

  Pass the result as ``unit_stats(..., compiled=...)``; a run compiles the
  check for the widths after a prune in the background (:mod:`demp.trainer.run`).
  """
  batch_size = min(batch_size, images.shape[0])
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  return _scan_all.lower(
    model, variables, images, criterion=criterion, eps=0.0, batch_size=batch_size
  ).compile()


def unit_stats(
  model,
  variables: Mapping[str, PyTree],
  images: jax.Array,
  *,
  criterion: str = 'relu',
  eps: float = 0.01,
  batch_size: int = 128,
  compiled=None,
) -> dict[str, dict[str, np.ndarray]]:
  """:func:`dead_unit_stats` plus each unit's range, in the same single pass.

  Returns:
    ``{'alive': ..., 'activity': ..., 'low': ..., 'high': ...}``, each a dict
    group name -> ``[width]`` array on host: ``alive`` and ``activity`` exactly
    as :func:`dead_unit_stats` computes them; ``low``/``high`` the min/max of
    the post-activation over every example, position and site (float32).
  """
  if criterion not in CRITERIA:
    raise ValueError(f'criterion={criterion!r} is not one of {sorted(CRITERIA)}.')
  n = images.shape[0]
  batch_size = min(batch_size, n)
  if n % batch_size:
    raise ValueError(
      f'the {n} death-check examples are not a multiple of the batch size {batch_size}.'
    )
  variables = {k: v for k, v in variables.items() if k != 'intermediates'}
  if compiled is not None:  # compile_unit_stats for these shapes, criterion and batch size
    out = jax.device_get(compiled(variables, images, eps=float(eps)))
  else:
    out = jax.device_get(
      _scan_all(
        model, variables, images, criterion=criterion, eps=float(eps), batch_size=batch_size
      )
    )
  return {
    name: {k: np.asarray(v) for k, v in d.items()}
    for name, d in zip(('alive', 'activity', 'low', 'high'), out)
  }


def constant_units(
  stats: Mapping[str, Mapping[str, np.ndarray]], eps: float
) -> dict[str, np.ndarray]:
  """Group -> ``[width]`` bool: alive (not dead) units whose output is constant over the check set.

  Constant means ``max - min <= eps`` over every example, position and site
  (:func:`unit_stats`). Such a unit carries no information (typically a norm
  scale γ ≈ 0 with a positive offset β: the post-activation is ``act(β)``) but
  is never dead. Dead units are excluded: they are counted as dead.
  """
  if not eps >= 0:
    raise ValueError(f'eps={eps!r} must be >= 0.')
  return {
    k: np.asarray(stats['alive'][k], bool) & (stats['high'][k] - stats['low'][k] <= eps)
    for k in stats['alive']
  }


def constant_values(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Group -> ``[width]`` float32: the midpoint ``(min + max) / 2`` of each unit's range.

  The value a constant unit is replaced by when folded (within ``eps / 2`` of
  every output it produced on the check set).
  """
  return {
    k: (0.5 * (stats['low'][k].astype(np.float64) + stats['high'][k])).astype(np.float32)
    for k in stats['low']
  }


def constant_unit_stats(
  model,
  variables: Mapping[str, PyTree],
  images: jax.Array,
  *,
  eps: float = 0.01,
  criterion: str = 'relu',
  dead_eps: float = 0.01,
  batch_size: int = 128,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Constant (alive) units of every group and their values: ``(constant, value)``.

  ``eps`` is the constancy threshold on ``max - min``; ``criterion`` and
  ``dead_eps`` are the death criterion (dead units are not counted). One jitted
  pass over ``images`` (:func:`unit_stats`).
  """
  stats = unit_stats(
    model, variables, images, criterion=criterion, eps=dead_eps, batch_size=batch_size
  )
  return constant_units(stats, eps), constant_values(stats)


def count(alive: Mapping[str, np.ndarray]) -> dict[str, int]:
  """Number of live units per group."""
  return {k: int(np.sum(v)) for k, v in alive.items()}


ON_COLLAPSE = ('warn', 'stop')
"""What :func:`check_collapse` does with a group whose every unit died (``prune.on_collapse``)."""


class LayerCollapseError(RuntimeError):
  """Every unit of a group died (``prune.on_collapse='stop'``)."""


def check_collapse(
  alive: Mapping[str, np.ndarray], *, step: int, on_collapse: str = 'warn'
) -> list[str]:
  """The groups whose every unit is dead; warns about them, or raises (``'stop'``).

  A collapsed group is kept at ``prune.min_width`` by the surgery (its most
  active dead units), so the network still runs, but no signal crosses that
  layer: the accuracy falls to chance. Usually λ or the learning rate is too
  large for the layer.
  """
  if on_collapse not in ON_COLLAPSE:
    raise ValueError(f'prune.on_collapse={on_collapse!r} is not one of {list(ON_COLLAPSE)}.')
  collapsed = sorted(name for name, a in alive.items() if not np.any(a))
  if not collapsed:
    return []
  message = (
    f'layer collapse at step {step}: every unit of {collapsed} is dead (kept at '
    f'prune.min_width, but no signal crosses it). Lower demp.peak_lambda or the learning '
    f'rate'
  )
  if on_collapse == 'stop':
    raise LayerCollapseError(f'{message}; stopping (prune.on_collapse=\'stop\').')
  logging.warning('%s (prune.on_collapse=\'stop\' stops the run).', message)
  return collapsed


__all__ = [
  'CRITERIA',
  'LayerCollapseError',
  'ON_COLLAPSE',
  'check_collapse',
  'probe',
  'criterion_for',
  'constant_unit_stats',
  'constant_units',
  'constant_values',
  'dead_unit_stats',
  'site_ranges',
  'site_stats',
  'count',
  'surgery',
  'unit_stats',
]
