"""A sparse updater that wraps any optax transformation (JaxPruner's ``wrap_optax``).

::

  updater = create_updater('rigl', sparsity=0.9, total_steps=10_000)
  tx = updater.wrap_optax(optax.adamw(5e-3))       # or wrap_optax(optax.adamw(5e-3), 'rigl', ...)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)  # inside the jitted step
  params = optax.apply_updates(params, updates)     # masked weights are now exactly 0

The per-element masks are data in the optimizer state (:class:`SparseState`),
never structure, so the step is traced once. Each update:

1. runs the inner transformation on the dense gradients;
2. on the schedule's mask-update steps (a traced ``lax.cond``), recomputes the
   masks from the weights the step would produce, ``w + u``, and the
   gradients (see :mod:`baselines.sparse.algorithms`), and zeroes every
   param-shaped entry of the inner optimizer state (e.g. Adam's moments) at
   the newly grown positions;
3. returns ``u`` where a weight was active before and after the mask update and
   ``-w`` everywhere else, so ``w + update`` is exactly zero at every masked
   weight, and newly grown weights start at exactly zero.

Masks of dynamic sparse training (SET, RigL) are drawn at the target sparsity
in ``init``; their weights become zero at the first update (the first forward
pass still sees the dense initialization, as the trainer has no pre-forward
hook). Pruning masks (magnitude, saliency) start dense.

References:
  Lee et al., `JaxPruner: A concise library for sparsity research
  <https://arxiv.org/abs/2304.14082>`_, 2023.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from baselines.sparse import algorithms, distributions
from baselines.sparse import sparsity_schedules as schedules

PyTree = Any


def _is_none(x) -> bool:
  return x is None


class SparseState(NamedTuple):
  """State of the wrapped optimizer.

  Attributes:
    inner_state: the wrapped transformation's state.
    masks: like params; a bool array (True = active) for each pruned weight,
      ``None`` for weights that are never pruned.
    target_sparsities: like ``masks``; each pruned weight's final sparsity
      (float32 scalar), ``None`` elsewhere.
    count: updates done so far (the step being taken is ``count + 1``).
  """

  inner_state: optax.OptState
  masks: PyTree
  target_sparsities: PyTree
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class SparseUpdater:
  """An algorithm, a schedule and a sparsity distribution; :meth:`wrap_optax` makes it an optimizer.

  Attributes:
    algorithm: a key of :data:`baselines.sparse.algorithms.ALGORITHMS`.
    scheduler: when masks change and the sparsity at a step.
    sparsity_distribution_fn: ``params -> tree`` of each pruned weight's
      target sparsity (``None`` = never pruned), e.g. a partial of
      :func:`baselines.sparse.distributions.layer_sparsities`.
    drop_fraction_fn: ``step -> fraction`` dropped (and regrown) per update,
      for SET and RigL.
    seed: seeds the random initial masks and SET's random growth.
  """

  algorithm: str
  scheduler: schedules.Schedule
  sparsity_distribution_fn: Callable[[PyTree], PyTree]
  drop_fraction_fn: Callable[[Any], jax.Array] | None = None
  seed: int = 0

  def __post_init__(self):
    if self.algorithm not in algorithms.ALGORITHMS:
      raise ValueError(
        f'algorithm={self.algorithm!r} is not one of {sorted(algorithms.ALGORITHMS)}.'
      )
    if algorithms.ALGORITHMS[self.algorithm].uses_drop_fraction and self.drop_fraction_fn is None:
      raise ValueError(f'algorithm={self.algorithm!r} needs a drop_fraction_fn.')

  def init_masks(self, params: PyTree, target_sparsities: PyTree) -> PyTree:
    """Dense masks for pruning, random masks at the target for dynamic sparse training."""
    alg = algorithms.ALGORITHMS[self.algorithm]
    leaves, treedef = jax.tree.flatten(target_sparsities, is_leaf=_is_none)
    shapes = [x.shape for x in treedef.flatten_up_to(params)]
    key = jax.random.fold_in(jax.random.key(self.seed), 0)
    masks = []
    for i, (s, shape) in enumerate(zip(leaves, shapes)):
      if s is None:
        masks.append(None)
      elif alg.sparse_init:
        masks.append(algorithms.random_mask(jax.random.fold_in(key, i), shape, s))
      else:
        masks.append(jnp.ones(shape, jnp.bool_))
    return jax.tree.unflatten(treedef, masks)

  def update_masks(
    self, masks: PyTree, params: PyTree, grads: PyTree, target_sparsities: PyTree, step: jax.Array
  ) -> PyTree:
    """The algorithm's new masks at ``step`` (jit-friendly; ``step`` may be traced)."""
    alg = algorithms.ALGORITHMS[self.algorithm]
    drop = self.drop_fraction_fn(step) if self.drop_fraction_fn is not None else 0.0
    key = jax.random.fold_in(jax.random.key(self.seed + 1), step)
    leaves, treedef = jax.tree.flatten(masks, is_leaf=_is_none)
    ws, gs, ts = (treedef.flatten_up_to(t) for t in (params, grads, target_sparsities))
    new = [
      m
      if m is None
      else alg.update(
        m, w, g, self.scheduler.get_sparsity_at_step(t, step), drop, jax.random.fold_in(key, i)
      )
      for i, (m, w, g, t) in enumerate(zip(leaves, ws, gs, ts))
    ]
    return jax.tree.unflatten(treedef, new)

  def wrap_optax(self, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` with masks kept in its state, applied to every update, updated on schedule."""

    def init_fn(params):
      targets = self.sparsity_distribution_fn(params)
      targets = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), targets)
      masks = jax.jit(self.init_masks)(params, targets)  # one compilation, not one per op
      return SparseState(
        inner_state=inner.init(params),
        masks=masks,
        target_sparsities=targets,
        count=jnp.zeros([], jnp.int32),
      )

    def update_fn(grads, state, params=None):
      if params is None:
        raise ValueError('the sparse updater needs params: call tx.update(grads, state, params).')
      updates, inner_state = inner.update(grads, state.inner_state, params)
      step = state.count + 1

      def refresh(operand):
        masks, inner_state = operand
        candidate = jax.tree.map(lambda w, u: w + u, params, updates)
        new = self.update_masks(masks, candidate, grads, state.target_sparsities, step)
        grown = jax.tree.map(
          lambda old, n, w: jnp.zeros((), jnp.bool_) if old is None else n & ~old,
          masks,
          new,
          params,
          is_leaf=_is_none,
        )
        inner_state = optax.tree.map_params(inner, _zero_where, inner_state, grown)
        return new, inner_state

      masks, inner_state = jax.lax.cond(
        self.scheduler.is_mask_update_iter(step),
        refresh,
        lambda operand: operand,
        (state.masks, inner_state),
      )
      updates = jax.tree.map(
        lambda old, new, u, w: u if old is None else jnp.where(old & new, u, -w),
        state.masks,
        masks,
        updates,
        params,
        is_leaf=_is_none,
      )
      return updates, SparseState(
        inner_state=inner_state, masks=masks, target_sparsities=state.target_sparsities, count=step
      )

    return optax.GradientTransformation(init_fn, update_fn)


def _zero_where(x, grown):
  """Zeroes a param-shaped optimizer-state leaf where weights were grown."""
  if not hasattr(x, 'shape') or grown.ndim == 0 or x.shape != grown.shape:
    return x
  return jnp.where(grown, jnp.zeros_like(x), x)


def create_updater(
  algorithm: str,
  *,
  sparsity: float,
  total_steps: int | None = None,
  distribution: str = 'erk',
  schedule: str | schedules.Schedule | None = None,
  update_freq: int = 500,
  start_fraction: float = 0.3,
  end_fraction: float = 0.8,
  drop_fraction: float = 0.3,
  layer_order: Sequence[str] | None = None,
  prune_first_layer: bool = False,
  prune_last_layer: bool = False,
  custom_sparsity: Mapping[str, float] | None = None,
  seed: int = 0,
) -> SparseUpdater:
  """A :class:`SparseUpdater` from plain settings (the DemP authors' defaults).

  Args:
    algorithm: ``magnitude`` | ``saliency`` | ``set`` | ``rigl``.
    sparsity: target sparsity of the pruned weights, in [0, 1).
    total_steps: the run's length T; needed unless ``schedule`` is an object.
    distribution: ``uniform`` | ``erk``.
    schedule: a schedule object, or a key of
      :data:`baselines.sparse.sparsity_schedules.SCHEDULES`; ``None`` = ``polynomial``
      for magnitude and saliency, ``periodic`` for SET and RigL.
    update_freq, start_fraction, end_fraction: masks change every
      ``update_freq`` steps from ``start_fraction T`` to ``end_fraction T``.
    drop_fraction: SET/RigL's initial drop fraction, decayed by a cosine over
      the same window.
    layer_order, prune_first_layer, prune_last_layer, custom_sparsity: see
      :func:`baselines.sparse.distributions.layer_sparsities`.
    seed: of the random masks and SET's growth.

  Raises:
    ValueError: on an unknown name or a value out of range.
  """
  if algorithm not in algorithms.ALGORITHMS:
    raise ValueError(f'algorithm={algorithm!r} is not one of {sorted(algorithms.ALGORITHMS)}.')
  if distribution not in distributions.DISTRIBUTIONS:
    raise ValueError(
      f'distribution={distribution!r} is not one of {sorted(distributions.DISTRIBUTIONS)}.'
    )
  distributions._check_sparsity('sparsity', sparsity)  # pylint: disable=protected-access
  alg = algorithms.ALGORITHMS[algorithm]
  if not isinstance(schedule, (str, type(None))):
    scheduler = schedule
    start = getattr(schedule, 'update_start_step', getattr(schedule, 'target_step', 0))
    end = getattr(schedule, 'update_end_step', start)
  else:
    if total_steps is None:
      raise ValueError('total_steps is needed to build a schedule from fractions of the run.')
    kind = schedule or ('periodic' if alg.sparse_init else 'polynomial')
    scheduler = schedules.default_schedule(
      kind, total_steps, update_freq, start_fraction, end_fraction
    )
    start, end = schedules.window(total_steps, start_fraction, end_fraction)
  drop_fn = (
    schedules.cosine_drop_fraction(drop_fraction, start, end) if alg.uses_drop_fraction else None
  )
  dist_fn = functools.partial(
    distributions.layer_sparsities,
    distribution=distribution,
    sparsity=sparsity,
    layer_order=layer_order,
    prune_first_layer=prune_first_layer,
    prune_last_layer=prune_last_layer,
    custom_sparsity=custom_sparsity,
  )
  return SparseUpdater(
    algorithm=algorithm,
    scheduler=scheduler,
    sparsity_distribution_fn=dist_fn,
    drop_fraction_fn=drop_fn,
    seed=seed,
  )


def wrap_optax(
  inner: optax.GradientTransformation, algorithm: str = 'magnitude', **kwargs
) -> optax.GradientTransformation:
  """``create_updater(algorithm, **kwargs).wrap_optax(inner)``."""
  return create_updater(algorithm, **kwargs).wrap_optax(inner)


def mask_sparsities(masks: PyTree) -> dict[str, float]:
  """``{path: fraction of zeros}`` of each pruned weight's mask (on the host)."""
  out = {}
  for path, m in jax.tree.leaves_with_path(masks):
    m = np.asarray(m)
    out[distributions.path_str(path)] = 1.0 - float(m.sum()) / m.size
  return out
