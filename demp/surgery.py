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
import flax.linen as nn
import jax
import numpy as np
from absl import logging

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


def param_slices(
  module: str,
  *,
  kernel: bool = True,
  bias: bool = False,
  norm: str | None = None,
  in_axis: int | None = None,
) -> tuple[Slice, ...]:
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


def keep_masks(
  alive: Mapping[str, np.ndarray],
  activity: Mapping[str, np.ndarray],
  *,
  min_width: int = 1,
  multiple_of: int = 1,
) -> dict[str, np.ndarray]:
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


def _kept(size: int, axis: int, parts: Sequence[tuple[np.ndarray, int, int | None]]) -> np.ndarray:
  """``[size]`` bools: the positions of an axis shared by ``(keep, offset, block)`` slices that stay."""
  kept = np.ones(size, bool)
  for keep, offset, block in parts:
    width = keep.size
    block = width if block is None else block
    if size % block:
      if block == width:
        raise ValueError(
          f'axis {axis} of size {size} is not a multiple of the group width {width}.'
        )
      raise ValueError(f'axis {axis} of size {size} is not a multiple of the block {block}.')
    if offset < 0 or offset + width > block:
      raise ValueError(
        f'units {offset}..{offset + width} do not fit a block of {block} on axis {axis}.'
      )
    pos = (np.arange(size // block)[:, None] * block + offset + np.arange(width)[None, :]).ravel()
    kept[pos] &= np.tile(keep, size // block)
  return kept


def _index(size: int, axis: int, parts: Sequence[tuple[np.ndarray, int, int | None]]) -> np.ndarray:
  """Kept positions of an axis of ``size`` shared by ``(keep, offset, block)`` slices."""
  return np.flatnonzero(_kept(size, axis, parts))


def _take(leaf: np.ndarray | jax.Array, axis: int, parts) -> jax.Array:
  return jax.numpy.take(leaf, _index(leaf.shape[axis], axis, parts), axis=axis)


def _zero(leaf: jax.Array, axis: int, parts) -> jax.Array:
  """The leaf with the removed positions of ``axis`` set to zero (False for bools)."""
  kept = _kept(leaf.shape[axis], axis, parts)
  shape = [1] * leaf.ndim
  shape[axis] = kept.size
  return jax.numpy.where(kept.reshape(shape), leaf, jax.numpy.zeros((), leaf.dtype))


def _take_shape(leaf: jax.ShapeDtypeStruct, axis: int, parts) -> jax.ShapeDtypeStruct:
  shape = list(leaf.shape)
  shape[axis] = int(_kept(shape[axis], axis, parts).sum())
  return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=getattr(leaf, 'sharding', None))


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


def _slice_leaves(
  tree: PyTree,
  slicers: Mapping[Path, list],
  shapes: Mapping[Path, tuple[int, ...]] | None,
  op=_take,
) -> tuple[PyTree, set[Path]]:
  """Applies ``op(leaf, axis, parts)`` (default: slicing) to every leaf whose dict path has slicers."""
  used: set[Path] = set()

  def fn(keypath, leaf):
    path = _dict_path(keypath)
    # Match the longest suffix of the leaf's path that names a sliced leaf.
    for start in range(len(path)):
      sub = path[start:]
      if sub in slicers and (shapes is None or getattr(leaf, 'shape', None) == shapes.get(sub)):
        used.add(sub)
        by_axis: dict[int, list] = {}
        for axis, keep, offset, block in slicers[sub]:
          by_axis.setdefault(axis % len(leaf.shape), []).append((keep, offset, block))
        for axis, parts in by_axis.items():
          leaf = op(leaf, axis, parts)
        return leaf
    return leaf

  return jax.tree.map_with_path(fn, tree), used


def slice_variables(
  variables: Mapping[str, PyTree],
  groups: Sequence[UnitGroup],
  keeps: Mapping[str, np.ndarray],
  *,
  op=_take,
) -> dict[str, PyTree]:
  """Slices every collection of a Flax variables dict (params, batch_stats...).

  Raises if a slice names a leaf that exists in no collection: a unit group that
  silently skips a leaf would leave mismatched shapes behind.
  """
  unknown = set(keeps) - {g.name for g in groups}
  if unknown:
    raise ValueError(
      f'keep-masks for unknown unit groups {sorted(unknown)}; '
      f'groups are {[g.name for g in groups]}.'
    )
  slicers = _slicers(groups, keeps)
  out, used = {}, set()
  for col, tree in variables.items():
    if col == 'intermediates':
      continue
    out[col], used_col = _slice_leaves(tree, slicers, None, op)
    used |= used_col
  missing = set(slicers) - used
  if missing:
    raise ValueError(
      f'unit-group slices name leaves that exist in no collection: '
      f'{sorted("/".join(p) for p in missing)}.'
    )
  return out


def slice_optimizer_state(
  opt_state: PyTree,
  params: PyTree,
  groups: Sequence[UnitGroup],
  keeps: Mapping[str, np.ndarray],
  *,
  op=_take,
) -> PyTree:
  """Slices every param-shaped leaf of an optax state (moments, momentum, masks).

  A leaf is param-shaped when the trailing dict keys of its path name a param
  and its shape equals that param's (pre-surgery) shape. This needs neither the
  transformation nor its ``init``, so it works for any composition: chains,
  ``optax.masked`` (whose masked-out leaves are empty nodes), ``MultiSteps``,
  ``inject_hyperparams``, and our own wrappers.
  """
  shapes = {_dict_path(kp): np.shape(x) for kp, x in jax.tree.flatten_with_path(params)[0]}
  sliced, _ = _slice_leaves(opt_state, _slicers(groups, keeps), shapes, op)
  return sliced


def silence(
  model, variables: Mapping[str, PyTree], opt_state: PyTree, keeps: Mapping[str, np.ndarray]
) -> tuple[dict[str, PyTree], PyTree]:
  """Zeroes, instead of removing, the units not kept: ``(variables, opt_state)`` at the same shapes.

  Every producer and consumer slice of a removed unit is set to zero in
  ``params`` and in every param-shaped optimizer-state leaf (moments, momentum,
  live masks: False); batch statistics are left as they are. When the model's
  activation maps 0 to 0 (:func:`silences_exactly`) a silenced unit outputs
  exactly zero and its consumers read nothing from it, so the network computes
  what the pruned one computes; every gradient on the silenced slices is
  exactly zero and their moments are zero, so (with any optax optimizer whose
  update of a zero gradient with zero state is zero: SGD, momentum, Adam(W),
  weight decay of a zero weight, the DemP penalty, the live-only noise) they
  stay zero. Training can go on at the old shapes, exactly, until the step
  compiled for the new shapes is ready (:meth:`demp.run.Run.prune` with
  ``defer``); then :func:`prune` removes them.
  """
  groups = unit_groups(model)
  new_opt_state = slice_optimizer_state(opt_state, variables['params'], groups, keeps, op=_zero)
  zeroed = slice_variables(variables, groups, keeps, op=_zero)  # of which params are kept
  return {**variables, 'params': zeroed['params']}, new_opt_state


def _fill(value: float):
  """An ``op`` for :func:`slice_variables`: the positions not kept set to ``value``."""

  def op(leaf: jax.Array, axis: int, parts) -> jax.Array:
    kept = _kept(leaf.shape[axis], axis, parts)
    shape = [1] * leaf.ndim
    shape[axis] = kept.size
    return jax.numpy.where(kept.reshape(shape), leaf, jax.numpy.asarray(value, leaf.dtype))

  return op


def revive(
  model, variables: Mapping[str, PyTree], opt_state: PyTree, wake: Mapping[str, np.ndarray]
) -> tuple[dict[str, PyTree], PyTree, dict[str, int]]:
  """Wakes units up (``wake[g]`` True) without changing what the network computes.

  For each group whose producers hold a normalization: the units' norm scale
  is set to 1 and their norm offset to 0 (a fresh norm's values: the unit
  passes its normalized input on again), every consumer slice of the units is
  zeroed, so the network's output is unchanged, and the optimizer's moments of
  all those entries are zeroed (they carried the penalty's push). The next
  step's gradient reaches the consumer weights (the unit is active again) and
  from there the rest. Groups without a norm scale are left as they are.

  Returns:
    ``(variables, opt_state, woken)``, ``woken[g]`` the units woken in group ``g``.
  """
  keeps, woken, parts = {}, {}, []
  for g in unit_groups(model):
    mask = np.asarray(wake.get(g.name, np.zeros(0, bool)), bool)
    norms = {s.path[:-1] for s in g.producers if s.path[-1] == 'scale'}
    if not mask.any() or not norms:
      continue
    keeps[g.name], woken[g.name] = ~mask, int(mask.sum())
    scale = tuple(s for s in g.producers if s.path[:-1] in norms and s.path[-1] == 'scale')
    offset = tuple(s for s in g.producers if s.path[:-1] in norms and s.path[-1] == 'bias')
    parts.append((g, scale, offset))
  if not keeps:
    return dict(variables), opt_state, woken
  only = lambda slices: [
    dataclasses.replace(g, producers=slices(g, sc, of), consumers=()) for g, sc, of in parts
  ]
  consumers = [dataclasses.replace(g, producers=()) for g, _, _ in parts]
  params = variables['params']
  touched = consumers + only(lambda g, sc, of: sc + of)
  new_opt_state = slice_optimizer_state(opt_state, params, touched, keeps, op=_zero)
  for groups, op in (
    (consumers, _zero),
    (only(lambda g, sc, of: sc), _fill(1.0)),
    (only(lambda g, sc, of: of), _fill(0.0)),
  ):
    params = slice_variables({'params': params}, groups, keeps, op=op)['params']
  return {**variables, 'params': params}, new_opt_state, woken


def silences_exactly(model) -> bool:
  """Whether :func:`silence` equals removal for ``model``: its activation maps 0 to 0."""
  from demp.models import common  # pylint: disable=g-import-not-at-top

  name = getattr(model, 'activation', 'relu')
  return float(common.activation(name)(jax.numpy.zeros(()))) == 0.0


def pruned_shapes(
  model, state: Mapping[str, PyTree], keeps: Mapping[str, np.ndarray]
) -> dict[str, PyTree]:
  """The shapes (``jax.ShapeDtypeStruct``) of a train state after :func:`prune`, from shapes only.

  ``state`` is ``{'params', 'batch_stats', 'opt_state'}`` (arrays or shape
  structs). Lets the step for the new widths be compiled ahead of the surgery.
  """
  groups = unit_groups(model)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, 'sharding', None)),
    dict(state),
  )
  variables = slice_variables(
    {'params': abstract['params'], 'batch_stats': abstract['batch_stats']},
    groups,
    keeps,
    op=_take_shape,
  )
  opt_state = slice_optimizer_state(
    abstract['opt_state'], state['params'], groups, keeps, op=_take_shape
  )
  return {
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
    'opt_state': opt_state,
  }


# ----------------------------------------------------------------------------
# Checks: the protocol, the slices, normalizations over the units.

PROTOCOL_DOC = 'docs/reliability.md#the-pruning-protocol'


class InexactPruneError(ValueError):
  """A group's units feed a normalization over the unit axis: removing them changes the function."""


def unit_groups(model) -> tuple[UnitGroup, ...]:
  """``model.unit_groups()``, or an error saying what a prunable model must define."""
  fn = getattr(type(model), 'unit_groups', None)
  widths = getattr(model, 'widths', None)
  if fn is None or not isinstance(widths, Mapping):
    lacks = [
      n
      for n, ok in (('unit_groups()', fn is not None), ('widths', isinstance(widths, Mapping)))
      if not ok
    ]
    raise TypeError(
      f'{type(model).__name__} cannot be pruned: it lacks {" and ".join(lacks)}. A prunable '
      f'model defines `widths` (a FrozenDict group name -> width, its constructor argument) '
      f'and `unit_groups()` returning demp.surgery.UnitGroup entries (the slices of every leaf '
      f'each group owns), and sows its units with demp.deadunits.probe; see {PROTOCOL_DOC} and '
      f'demp/models/mlp.py for a complete example.'
    )
  groups = tuple(fn(model))
  bad = [g for g in groups if not isinstance(g, UnitGroup)]
  if bad:
    raise TypeError(
      f'{type(model).__name__}.unit_groups() must return demp.surgery.UnitGroup '
      f'entries; got {type(bad[0]).__name__}. See {PROTOCOL_DOC}.'
    )
  unknown = [g.name for g in groups if g.name not in widths]
  if unknown:
    raise ValueError(
      f'{type(model).__name__}.unit_groups() names groups {unknown} that are not '
      f'in model.widths {sorted(widths)}. See {PROTOCOL_DOC}.'
    )
  return groups


def _shapes(variables: Mapping[str, PyTree]) -> dict[Path, tuple[str, tuple[int, ...]]]:
  """``leaf path (below its collection) -> (collection, shape)`` of every leaf."""
  out = {}
  for col, tree in variables.items():
    if col == 'intermediates':
      continue
    for kp, leaf in jax.tree.flatten_with_path(tree)[0]:
      out[_dict_path(kp)] = (col, tuple(np.shape(leaf)))
  return out


def _name(path: Path) -> str:
  return '/'.join(path)


def check_slices(
  model, variables: Mapping[str, PyTree], groups: Sequence[UnitGroup] | None = None
) -> None:
  """Raises, naming the leaf and the group, when a group's slices do not fit the variables.

  * a slice names a leaf that exists in no collection;
  * a slice's axis is not a multiple of the group's width (a wrong consumer axis);
  * a leaf of a producer's module (a bias, a norm's running statistics) has the
    group's width on its last axis, like the producer, but no group slices it:
    the pruned model would fail inside Flax with mismatched shapes.
  """
  groups = unit_groups(model) if groups is None else groups
  shapes = _shapes(variables)
  covered = {
    (s.path, s.axis % max(1, len(shapes[s.path][1])) if s.path in shapes else s.axis)
    for g in groups
    for s in g.slices
  }
  for g in groups:
    width = int(model.widths[g.name])
    for kind, slices in (('producer', g.producers), ('consumer', g.consumers)):
      for s in slices:
        if s.path not in shapes:
          module = s.path[:-1]
          near = sorted(_name(p) for p in shapes if p[:-1] == module)
          where = f'leaves of that module: {near}' if near else 'no such module'
          raise ValueError(
            f'unit group {g.name!r}: its {kind} slice names the leaf {_name(s.path)!r}, which '
            f'is in no collection ({where}). '
            f'Fix {type(model).__name__}.unit_groups(); see {PROTOCOL_DOC}.'
          )
        col, shape = shapes[s.path]
        period = width if s.block is None else s.block  # a concatenation: blocks of `block`
        if (
          not -len(shape) <= s.axis < len(shape)
          or shape[s.axis] % period
          or s.offset + width > period
        ):
          axis_rule = (
            'enumerate the units (outputs: usually -1 for a kernel, 0 for a bias)'
            if kind == 'producer'
            else 'read the units (inputs: 0 for a Dense kernel, 2 for a Conv kernel)'
          )
          raise ValueError(
            f'unit group {g.name!r} (width {width}): its {kind} slice of {col} leaf '
            f'{_name(s.path)!r} (shape {shape}) uses axis {s.axis}, whose size is not a '
            f'multiple of the group width (or of its block {s.block}, offset {s.offset}). '
            f'The {kind} axis must '
            f'{axis_rule}; '
            f'see {PROTOCOL_DOC}.'
          )
    for s in g.producers:
      module = s.path[:-1]
      for path, (col, shape) in shapes.items():
        if (
          path[:-1] == module
          and shape
          and shape[-1] == width
          and (path, len(shape) - 1) not in covered
        ):
          raise ValueError(
            f'unit group {g.name!r} (width {width}) misses the {col} leaf {_name(path)!r} '
            f'(shape {shape}): it is in the module of the producer {_name(s.path)!r} and has '
            f'the group\'s width on its last axis, but no slice of any group covers it. Add '
            f'Slice({path!r}, -1) to the group\'s producers; see {PROTOCOL_DOC}.'
          )


def _reduces_units(module: nn.Module) -> bool:
  """Does this normalization mix statistics across the feature (unit) axis?"""
  if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
    axes = module.reduction_axes
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    return any(a == -1 for a in axes) or len(axes) > 1
  if isinstance(module, nn.GroupNorm):
    return module.group_size != 1
  return False


NORMS_OVER_UNITS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)
"""Normalizations whose statistics can include the units (checked by :func:`_reduces_units`)."""


def _trace(model, example_input) -> tuple[dict[Path, str], dict]:
  """One abstract ``init`` (no compute): the normalizations over features the model calls
  (``module path -> class name``) and the shapes of the variables it builds."""
  found: dict[Path, str] = {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == '__call__' and isinstance(m, NORMS_OVER_UNITS) and _reduces_units(m):
      found[tuple(m.path)] = type(m).__name__
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct(np.shape(example_input), getattr(example_input, 'dtype', np.float32))
  with nn.intercept_methods(record):
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  return found, _shapes(variables)


def _looks_like_norm(shapes, module: Path) -> bool:
  """Without an input: a module of per-unit ``scale``/``bias`` params and no running statistics."""
  leaves = {p[-1]: v for p, v in shapes.items() if p[:-1] == module}
  return (
    'scale' in leaves
    and leaves['scale'][0] == 'params'
    and set(leaves) <= {'scale', 'bias'}
    and all(len(shape) == 1 for _, shape in leaves.values())
  )


def check_normalizations(
  model,
  variables: Mapping[str, PyTree],
  groups: Sequence[UnitGroup],
  example_input=None,
  *,
  norms: Mapping[Path, str] | None = None,
) -> dict[str, str]:
  """Groups whose slices belong to a normalization over the unit axis -> a description.

  Removing a unit there changes the statistics (mean, variance) the other units
  are normalized with, so the pruned network computes another function even
  when the unit was dead. BatchNorm (per-unit statistics) is exact. With
  ``example_input`` the model is traced (no compute) and normalizations are
  found by class; without it, a producer module holding only per-unit
  ``scale``/``bias`` params and no running statistics is taken for one.
  """
  shapes = _shapes(variables)
  if norms is None and example_input is not None:
    norms = _trace(model, example_input)[0]  # the normalizations do not depend on the widths
  out = {}
  for g in groups:
    for s in g.slices:
      module = s.path[:-1]
      if norms is not None and module in norms:
        out[g.name] = f'{norms[module]} {_name(module)!r}'
      elif norms is None and _looks_like_norm(shapes, module):
        out[g.name] = f'{_name(module)!r} (per-unit scale/bias without running statistics)'
  return out


def prune(
  model,
  variables: Mapping[str, PyTree],
  opt_state: PyTree,
  keeps: Mapping[str, np.ndarray],
  *,
  example_input=None,
  allow_inexact: bool = False,
):
  """Removes the units not kept: returns ``(model, variables, opt_state)``.

  ``model`` must expose ``widths`` (group name -> width, a ``FrozenDict`` so
  the module stays hashable and usable as a static jit argument) and
  ``unit_groups()``. The returned model is the same class at the new widths.

  Checked first (errors name the group and the leaf): the protocol, every
  group's slices (:func:`check_slices`), and normalizations over the unit axis
  (:func:`check_normalizations`; ``example_input``, one input batch or its
  shape-dtype, makes that check exact). Pruning a group behind such a
  normalization raises :class:`InexactPruneError` unless ``allow_inexact``
  (then it is logged as inexact).
  """
  groups = unit_groups(model)
  check_slices(model, variables, groups)
  for g in groups:
    if g.name in keeps and np.asarray(keeps[g.name]).size != model.widths[g.name]:
      raise ValueError(
        f'keep-mask for {g.name!r} has {np.asarray(keeps[g.name]).size} '
        f'entries, the group has {model.widths[g.name]} units.'
      )
  new_opt_state = slice_optimizer_state(opt_state, variables['params'], groups, keeps)
  new_variables = slice_variables(variables, groups, keeps)
  widths = dict(model.widths)
  for name, keep in keeps.items():
    widths[name] = int(np.sum(keep))
  new_model = model.clone(widths=flax.core.FrozenDict(widths))
  # Pure so far: nothing is returned until the checks below pass. One abstract init of the
  # pruned model gives both its normalizations and the shapes it expects.
  norms, expected = _trace(new_model, example_input) if example_input is not None else (None, None)
  cut = [g for g in groups if g.name in keeps and not np.all(keeps[g.name])]
  inexact = check_normalizations(model, variables, cut, norms=norms) if cut else {}
  if inexact:
    text = '; '.join(f'{name}: its slices include {what}' for name, what in inexact.items())
    message = (
      f'pruning {sorted(inexact)} is inexact: {text}, a normalization whose statistics '
      f'run over the units, so removing even dead units changes the function'
    )
    if not allow_inexact:
      raise InexactPruneError(
        f'{message}. Move the normalization off the unit axis (BatchNorm is exact), leave '
        f'that group out of unit_groups(), or pass allow_inexact=True to prune anyway. '
        f'See {PROTOCOL_DOC}.'
      )
    logging.warning('%s (allow_inexact=True).', message)
  if expected is not None:
    _check_pruned_shapes(expected, new_variables, groups, model.widths, widths)
  return new_model, new_variables, new_opt_state


def _check_pruned_shapes(expected, variables, groups, before, after) -> None:
  """The sliced variables must have exactly the shapes the model builds at the new widths."""
  got = _shapes(variables)
  for path, (col, shape) in expected.items():
    if path in got and got[path][1] != shape:
      changed = [
        g.name for g in groups if before[g.name] != after[g.name] and before[g.name] in got[path][1]
      ]
      raise ValueError(
        f'after pruning, {col} leaf {_name(path)!r} has shape {got[path][1]} but the model at '
        f'the new widths expects {shape}: unit group {changed or "?"} misses a slice of it '
        f'(the leaf holds the group\'s old width). Add it to that group in unit_groups(); '
        f'see {PROTOCOL_DOC}.'
      )


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
