"""Freezing parameter elements inside any optimizer, with the masks as data.

:func:`freeze` wraps a GradientTransformation. Its state holds ``frozen``, a
bool tree shaped like the params: where it is True the update is zero and every
param-shaped leaf of the inner state (Adam's moments, momentum...) keeps its
previous value, so a frozen element's param *and* its optimizer state stay
bit-identical: no gradient step, no weight decay, no momentum drift. Scalar
state (the step count) advances as usual.

The masks are data, not structure: a host hook replaces ``state.frozen`` with
new bool arrays of the same shapes and the compiled step runs on, without
recompiling. :func:`unit_masks` turns per-unit masks of unit groups into such
param masks (a unit's incoming parameters: its producer slices in ``params``).

Example::

    tx = freeze(optax.adamw(1e-3, weight_decay=1e-4))
    state = tx.init(params)
    frozen = unit_masks(params, model.unit_groups(), {'hidden_0': frozen_u})
    state = with_frozen(state, frozen)      # wherever the FreezeState is nested
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class FreezeState(NamedTuple):
  frozen: PyTree  # bool, shaped like params: True = keep param and its state
  inner: optax.OptState


def freeze(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Wraps ``inner`` so that elements with ``state.frozen`` True never move."""

  def init_fn(params):
    frozen = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), bool), params)
    return FreezeState(frozen=frozen, inner=inner.init(params))

  def update_fn(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    new_updates = jax.tree.map(
      lambda f, u: jnp.where(f, jnp.zeros_like(u), u), state.frozen, new_updates
    )
    # Masks laid over the inner state: the param masks at its param-shaped
    # leaves, False (take the new value) everywhere else.
    masks = optax.tree.map_params(
      inner,
      lambda _, f: f,
      state.inner,
      state.frozen,
      transform_non_params=lambda x: jnp.zeros(jnp.shape(x), bool),
    )
    new_inner = jax.tree.map(
      lambda m, new, old: jnp.where(m, old, new), masks, new_inner, state.inner
    )
    return new_updates, FreezeState(frozen=state.frozen, inner=new_inner)

  return optax.GradientTransformation(init_fn, update_fn)


def with_frozen(opt_state: PyTree, frozen: PyTree) -> PyTree:
  """``opt_state`` with the masks of its :class:`FreezeState` (wherever it is nested) replaced."""
  is_freeze = lambda x: isinstance(x, FreezeState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_freeze) if is_freeze(x)]
  if len(found) != 1:
    raise ValueError(
      f'expected one FreezeState in the optimizer state, found {len(found)}: '
      'wrap the optimizer with baselines.freeze.freeze.'
    )
  return jax.tree.map(
    lambda x: x._replace(frozen=frozen) if is_freeze(x) else x, opt_state, is_leaf=is_freeze
  )


def unit_masks(params: PyTree, groups, frozen_units: Mapping[str, np.ndarray]) -> PyTree:
  """Param-shaped bool masks: True on the producer slices of the frozen units.

  A unit's incoming parameters are its groups' producer slices found in
  ``params`` (kernel output slice, bias, norm scale and offset); slices of
  other collections (BN running statistics) are not params and are skipped.
  """
  masks = jax.tree.map(lambda p: np.zeros(np.shape(p), bool), params)
  paths = {tuple(str(k.key) for k in kp) for kp, _ in jax.tree.flatten_with_path(params)[0]}
  for g in groups:
    if g.name not in frozen_units:
      continue
    units = np.asarray(frozen_units[g.name], bool)
    for s in g.producers:
      if s.path not in paths:
        continue
      leaf = _get(masks, s.path)
      shape = [1] * leaf.ndim
      shape[s.axis] = units.size
      leaf |= units.reshape(shape)
  return jax.tree.map(jnp.asarray, masks)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
