"""Folding constant units into their consumers (``prune.remove_constant``).

A unit whose output is the same for every input (its scale γ at 0 under the
penalty, a positive offset β after the norm) carries no information, but it is
not *dead*: it outputs ReLU(β) > 0. When its consumer is linear after a global
pool (or directly), the constant is folded into the consumer's bias exactly
and the unit can be removed like a dead one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from demp.protocol import Path, Slice, UnitGroup

PyTree = Any


def _leaf(tree: Mapping, path: Path):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _set(tree: Mapping, path: Path, value) -> dict:
  """A copy of nested dict ``tree`` with ``path`` set to ``value``."""
  tree = dict(tree)
  if len(path) == 1:
    tree[path[0]] = value
  else:
    tree[path[0]] = _set(tree[path[0]], path[1:], value)
  return tree


def fold_target(
  groups: Sequence[UnitGroup], variables: Mapping[str, PyTree], consumer: Slice
) -> tuple[str, Path, float] | None:
  """Where a constant input of ``consumer`` (a kernel's input slice) can be absorbed.

  Returns ``(collection, path, sign)``: the consumer module's ``bias`` in
  ``params`` (``+``); else, when the consumer's kernel is the producer of a
  group with a running mean (a norm layer right after it), that ``mean`` in
  ``batch_stats`` (``-``: ``BN(y - k)`` with mean ``μ - k`` is ``BN(y)`` in eval
  mode, and the batch mean absorbs ``k`` in train mode); None when neither
  exists.
  """
  if consumer.path[-1] != 'kernel':
    return None
  bias = consumer.path[:-1] + ('bias',)
  if _leaf(variables.get('params', {}), bias) is not None:
    return 'params', bias, 1.0
  for g in groups:
    if Slice(consumer.path, -1) in g.producers:
      for s in g.producers:
        if s.path[-1] == 'mean' and _leaf(variables.get('batch_stats', {}), s.path) is not None:
          return 'batch_stats', s.path, -1.0
  return None


def foldable_groups(
  groups: Sequence[UnitGroup], variables: Mapping[str, PyTree]
) -> dict[str, bool]:
  """Group -> whether its constant units can be folded (:func:`fold_constants`).

  A group qualifies when it has one site (a residual stream channel is read at
  several places, each with its own consumers) and every consumer has a fold
  target (:func:`fold_target`).
  """
  return {
    g.name: len(g.sites) == 1
    and all(fold_target(groups, variables, c) is not None for c in g.consumers)
    for g in groups
  }


def fold_constants(
  variables: Mapping[str, PyTree],
  groups: Sequence[UnitGroup],
  values: Mapping[str, np.ndarray],
  fold: Mapping[str, np.ndarray],
) -> dict:
  """Adds the contribution of constant units to their consumers' biases (or running means).

  For each group and each unit ``u`` with ``fold[group][u]``, the unit is taken
  to output the constant ``c_u = values[group][u]`` everywhere, and each
  consumer kernel ``W`` (input axis ``a``, output axis last) contributes
  ``k_o = Σ_u c_u · Σ W[..., u, ..., o]``, summed over every axis but the output
  one (a conv's whole kernel window; every position of a conv -> flatten ->
  dense input, where the unit repeats). ``k`` goes to the consumer's bias, or
  is subtracted from the running mean of the norm layer after it
  (:func:`fold_target`). Then removing the units (:func:`prune`) leaves the
  function unchanged, exactly where the consumer sees ``c_u`` at every input
  position: a dense consumer; for a conv with zero padding, the interior
  positions only (at a border, part of the window reads the padding, not
  ``c_u``). It assumes what lies between a unit's site and its consumer maps a
  constant to itself (pooling, flatten), as in every model here.

  Raises:
    ValueError: if a group to fold is not foldable (:func:`foldable_groups`).
  """
  out = {k: v for k, v in variables.items() if k != 'intermediates'}
  able = foldable_groups(groups, out)
  for g in groups:
    mask = np.asarray(fold.get(g.name, np.zeros(0, bool)), bool)
    if not mask.any():
      continue
    if not able[g.name]:
      raise ValueError(
        f'group {g.name!r} has constant units to fold but is not foldable '
        f'(several sites, or a consumer without bias or running mean).'
      )
    c = np.where(mask, np.asarray(values[g.name], np.float64), 0.0)
    for s in g.consumers:
      col, path, sign = fold_target(groups, out, s)
      w = np.asarray(_leaf(out['params'], s.path), np.float64)
      axis = s.axis % w.ndim
      vec = np.tile(c, w.shape[axis] // c.size)
      k = np.tensordot(w, vec, axes=([axis], [0]))  # the input axis contracted
      k = k.reshape(-1, w.shape[-1]).sum(axis=0)  # every other axis but the output one
      target = _leaf(out[col], path)
      new = np.asarray(target, np.float64) + sign * k
      out[col] = _set(out[col], path, jax.numpy.asarray(new, dtype=target.dtype))
  return out
