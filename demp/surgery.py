"""Live network surgery: remove units from params, batch stats and optimizer state.

A *unit group* is a set of units (neurons, conv channels) that live or die
together. It is described by the slices of leaves it owns:

* **producers**: the leaves whose given axis enumerates the group's units as
  outputs (a kernel's output axis, a bias, a norm layer's scale/offset and its
  running mean/var);
* **consumers**: the leaves whose given axis reads the group's units as inputs
  (the next kernel's input axis; for conv -> flatten -> dense the dense kernel's
  input axis holds every spatial position times the channels, channels
  innermost, and the slice is tiled automatically);
* **sites**: the paths, in the ``intermediates`` collection, of the sown
  post-activation tensors whose last axis is the group's units. A unit is dead
  when it is dead at *every* site (a residual stream channel is shared by every
  block output of a stage: it may only go where it is dead everywhere).

Nothing here knows about a particular architecture: a model exports
``unit_groups()`` and a ``widths`` mapping (group name -> width); the pruned
model is ``model.clone(widths=new_widths)``. The same slicing function is used
for every param-shaped tree: params, batch stats, and every param-shaped leaf
of any optax state (found by its path, see :func:`slice_optimizer_state`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np

Path = tuple[str, ...]
PyTree = Any


@dataclasses.dataclass(frozen=True)
class Slice:
  """One axis of one leaf that a unit group owns.

  Attributes:
    path: the leaf's path below the collection, e.g. ``('conv_0', 'kernel')``
      in ``params`` or ``('norm_0', 'mean')`` in ``batch_stats``.
    axis: the axis that enumerates the units. When the leaf's size along it is
      ``r * width`` (conv -> flatten -> dense), the units are taken as the
      innermost factor and the keep-mask is tiled ``r`` times.
    offset: where the group's units start inside each block of the axis (a
      consumer of a channel concatenation reads several groups, each at its
      offset); 0 for a leaf that holds only this group.
    block: the period of the axis: it holds ``r`` blocks of ``block`` entries,
      the units at ``offset .. offset + width`` of each. ``None`` means the
      group's width (the leaf holds only this group, possibly tiled).
  """

  path: Path
  axis: int
  offset: int = 0
  block: int | None = None


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """Units that live and die together, and every slice they own."""

  name: str
  sites: tuple[Path, ...]
  producers: tuple[Slice, ...]
  consumers: tuple[Slice, ...]

  @property
  def slices(self) -> tuple[Slice, ...]:
    return self.producers + self.consumers


def param_slices(module: str, *, kernel: bool = True, bias: bool = False,
                 norm: str | None = None, in_axis: int | None = None) -> tuple[Slice, ...]:
  """Slices of a layer (and its norm layer) whose outputs are the units.

  ``in_axis`` instead makes the layer a *consumer*: its kernel's input axis.
  """
  if in_axis is not None:
    return (Slice((module, 'kernel'), in_axis),)
  out = []
  if kernel:
    out.append(Slice((module, 'kernel'), -1))
  if bias:
    out.append(Slice((module, 'bias'), 0))
  if norm is not None:
    out += [Slice((norm, leaf), 0) for leaf in ('scale', 'bias', 'mean', 'var')]
  return tuple(out)


# ----------------------------------------------------------------------------
# Keep-masks.


def keep_masks(alive: Mapping[str, np.ndarray], activity: Mapping[str, np.ndarray],
               *, min_width: int = 1, multiple_of: int = 1) -> dict[str, np.ndarray]:
  """Turns per-unit liveness into keep-masks.

  A group never drops below ``min_width`` units, and its width can be rounded
  up to a multiple of ``multiple_of`` (accelerators like widths of 8 or 128);
  the extra units kept are the most active dead ones (largest ``activity``).
  """
  if min_width < 1:
    raise ValueError(f'min_width must be >= 1, got {min_width}.')
  if multiple_of < 1:
    raise ValueError(f'multiple_of must be >= 1, got {multiple_of}.')
  keeps = {}
  for name, alive_u in alive.items():
    alive_u = np.asarray(alive_u, bool)
    width = alive_u.size
    n_keep = max(int(alive_u.sum()), min(min_width, width))
    n_keep = min(width, -(-n_keep // multiple_of) * multiple_of)
    # Alive units first, then by activity (descending), stable.
    order = np.lexsort((-np.asarray(activity[name], np.float64), ~alive_u))
    keep = np.zeros(width, bool)
    keep[order[:n_keep]] = True
    keeps[name] = keep
  return keeps


# ----------------------------------------------------------------------------
# Slicing.


def _index(size: int, axis: int, parts: Sequence[tuple[np.ndarray, int, int | None]]) -> np.ndarray:
  """Kept positions of an axis of ``size`` shared by ``(keep, offset, block)`` slices."""
  kept = np.ones(size, bool)
  for keep, offset, block in parts:
    width = keep.size
    block = width if block is None else block
    if size % block:
      if block == width:
        raise ValueError(f'axis {axis} of size {size} is not a multiple of the group width {width}.')
      raise ValueError(f'axis {axis} of size {size} is not a multiple of the block {block}.')
    if offset < 0 or offset + width > block:
      raise ValueError(f'units {offset}..{offset + width} do not fit a block of {block} on axis {axis}.')
    pos = (np.arange(size // block)[:, None] * block + offset + np.arange(width)[None, :]).ravel()
    kept[pos] &= np.tile(keep, size // block)
  return np.flatnonzero(kept)


def _take(leaf: np.ndarray | jax.Array, axis: int, parts) -> jax.Array:
  return jax.numpy.take(leaf, _index(leaf.shape[axis], axis, parts), axis=axis)


def _slicers(groups: Sequence[UnitGroup], keeps: Mapping[str, np.ndarray]) -> dict[Path, list]:
  out: dict[Path, list] = {}
  for group in groups:
    keep = keeps.get(group.name)
    if keep is None or np.all(keep):
      continue
    for s in group.slices:
      out.setdefault(s.path, []).append((s.axis, np.asarray(keep, bool), s.offset, s.block))
  return out


def _dict_path(keypath) -> Path:
  """The trailing run of dict keys of a key path (the param path inside any wrapper)."""
  names = []
  for k in reversed(keypath):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    names.append(str(k.key))
  return tuple(reversed(names))


def _slice_leaves(tree: PyTree, slicers: Mapping[Path, list],
                  shapes: Mapping[Path, tuple[int, ...]] | None) -> tuple[PyTree, set[Path]]:
  """Slices every leaf whose (trailing) dict path has slicers."""
  used: set[Path] = set()

  def fn(keypath, leaf):
    path = _dict_path(keypath)
    # Match the longest suffix of the leaf's path that names a sliced leaf.
    for start in range(len(path)):
      sub = path[start:]
      if sub in slicers and (shapes is None or
                             getattr(leaf, 'shape', None) == shapes.get(sub)):
        used.add(sub)
        by_axis: dict[int, list] = {}
        for axis, keep, offset, block in slicers[sub]:
          by_axis.setdefault(axis % leaf.ndim, []).append((keep, offset, block))
        for axis, parts in by_axis.items():
          leaf = _take(leaf, axis, parts)
        return leaf
    return leaf

  return jax.tree_util.tree_map_with_path(fn, tree), used


def slice_variables(variables: Mapping[str, PyTree], groups: Sequence[UnitGroup],
                    keeps: Mapping[str, np.ndarray]) -> dict[str, PyTree]:
  """Slices every collection of a Flax variables dict (params, batch_stats...).

  Raises if a slice names a leaf that exists in no collection: a unit group that
  silently skips a leaf would leave mismatched shapes behind.
  """
  unknown = set(keeps) - {g.name for g in groups}
  if unknown:
    raise ValueError(f'keep-masks for unknown unit groups {sorted(unknown)}; '
                     f'groups are {[g.name for g in groups]}.')
  slicers = _slicers(groups, keeps)
  out, used = {}, set()
  for col, tree in variables.items():
    if col == 'intermediates':
      continue
    out[col], used_col = _slice_leaves(tree, slicers, None)
    used |= used_col
  missing = set(slicers) - used
  if missing:
    raise ValueError(f'unit-group slices name leaves that exist in no collection: '
                     f'{sorted("/".join(p) for p in missing)}.')
  return out


def slice_optimizer_state(opt_state: PyTree, params: PyTree, groups: Sequence[UnitGroup],
                          keeps: Mapping[str, np.ndarray]) -> PyTree:
  """Slices every param-shaped leaf of an optax state (moments, momentum, masks).

  A leaf is param-shaped when the trailing dict keys of its path name a param
  and its shape equals that param's (pre-surgery) shape. This needs neither the
  transformation nor its ``init``, so it works for any composition: chains,
  ``optax.masked`` (whose masked-out leaves are empty nodes), ``MultiSteps``,
  ``inject_hyperparams``, and our own wrappers.
  """
  shapes = {_dict_path(kp): np.shape(x)
            for kp, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  sliced, _ = _slice_leaves(opt_state, _slicers(groups, keeps), shapes)
  return sliced


def prune(model, variables: Mapping[str, PyTree], opt_state: PyTree,
          keeps: Mapping[str, np.ndarray]):
  """Removes the units not kept: returns ``(model, variables, opt_state)``.

  ``model`` must expose ``widths`` (group name -> width, a ``FrozenDict`` so
  the module stays hashable and usable as a static jit argument) and
  ``unit_groups()``. The returned model is the same class at the new widths.
  """
  groups = model.unit_groups()
  for g in groups:
    if g.name in keeps and np.asarray(keeps[g.name]).size != model.widths[g.name]:
      raise ValueError(f'keep-mask for {g.name!r} has {np.asarray(keeps[g.name]).size} '
                       f'entries, the group has {model.widths[g.name]} units.')
  new_opt_state = slice_optimizer_state(opt_state, variables['params'], groups, keeps)
  new_variables = slice_variables(variables, groups, keeps)
  widths = dict(model.widths)
  for name, keep in keeps.items():
    widths[name] = int(np.sum(keep))
  return model.clone(widths=flax.core.FrozenDict(widths)), new_variables, new_opt_state


# ----------------------------------------------------------------------------
# Folding constant units into their consumers.


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


def fold_target(groups: Sequence[UnitGroup], variables: Mapping[str, PyTree],
                consumer: Slice) -> tuple[str, Path, float] | None:
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


def foldable_groups(groups: Sequence[UnitGroup],
                    variables: Mapping[str, PyTree]) -> dict[str, bool]:
  """Group -> whether its constant units can be folded (:func:`fold_constants`).

  A group qualifies when it has one site (a residual stream channel is read at
  several places, each with its own consumers) and every consumer has a fold
  target (:func:`fold_target`).
  """
  return {g.name: len(g.sites) == 1 and all(fold_target(groups, variables, c) is not None
                                            for c in g.consumers)
          for g in groups}


def fold_constants(variables: Mapping[str, PyTree], groups: Sequence[UnitGroup],
                   values: Mapping[str, np.ndarray], fold: Mapping[str, np.ndarray]) -> dict:
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
      raise ValueError(f'group {g.name!r} has constant units to fold but is not foldable '
                       f'(several sites, or a consumer without bias or running mean).')
    c = np.where(mask, np.asarray(values[g.name], np.float64), 0.0)
    for s in g.consumers:
      col, path, sign = fold_target(groups, out, s)
      w = np.asarray(_leaf(out['params'], s.path), np.float64)
      axis = s.axis % w.ndim
      vec = np.tile(c, w.shape[axis] // c.size)
      k = np.tensordot(w, vec, axes=([axis], [0]))    # the input axis contracted
      k = k.reshape(-1, w.shape[-1]).sum(axis=0)       # every other axis but the output one
      target = _leaf(out[col], path)
      new = np.asarray(target, np.float64) + sign * k
      out[col] = _set(out[col], path, jax.numpy.asarray(new, dtype=target.dtype))
  return out
