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
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import numpy as np
from absl import logging

from demp.protocol import (
  PROTOCOL_DOC,
  InexactPruneError,
  Path,
  UnitGroup,
  check_normalizations,
  check_pruned_shapes,
  check_slices,
  dict_path,
  trace_model,
  unit_groups,
)

PyTree = Any


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


def _positions(size: int, axis: int, width: int, offset: int, block: int | None) -> np.ndarray:
  """The positions of an axis of ``size`` that ``width`` units at ``offset`` of every ``block`` own."""
  block = width if block is None else block
  if size % block:
    if block == width:
      raise ValueError(f'axis {axis} of size {size} is not a multiple of the group width {width}.')
    raise ValueError(f'axis {axis} of size {size} is not a multiple of the block {block}.')
  if offset < 0 or offset + width > block:
    raise ValueError(
      f'units {offset}..{offset + width} do not fit a block of {block} on axis {axis}.'
    )
  return (np.arange(size // block)[:, None] * block + offset + np.arange(width)[None, :]).ravel()


def _kept(size: int, axis: int, parts: Sequence[tuple[np.ndarray, int, int | None]]) -> np.ndarray:
  """``[size]`` bools: the positions of an axis shared by ``(keep, offset, block)`` slices that stay."""
  kept = np.ones(size, bool)
  for keep, offset, block in parts:
    pos = _positions(size, axis, keep.size, offset, block)
    kept[pos] &= np.tile(keep, pos.size // keep.size)
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


def _take_host(leaf, axis: int, parts) -> np.ndarray:
  """:func:`_take` with NumPy on the host: no XLA program is compiled (or run)."""
  return np.take(np.asarray(leaf), _index(leaf.shape[axis], axis, parts), axis=axis)


def _zero_traced(leaf: jax.Array, axis: int, parts) -> jax.Array:
  """:func:`_zero` inside a jitted function whose keep-masks are arguments (traced)."""
  kept = jax.numpy.ones(leaf.shape[axis], bool)
  for keep, offset, block in parts:
    pos = _positions(leaf.shape[axis], axis, keep.shape[0], offset, block)
    kept = kept.at[pos].set(kept[pos] & jax.numpy.tile(keep, pos.size // keep.shape[0]))
  shape = [1] * leaf.ndim
  shape[axis] = kept.size
  return jax.numpy.where(kept.reshape(shape), leaf, jax.numpy.zeros((), leaf.dtype))


def _take_shape(leaf: jax.ShapeDtypeStruct, axis: int, parts) -> jax.ShapeDtypeStruct:
  shape = list(leaf.shape)
  shape[axis] = int(_kept(shape[axis], axis, parts).sum())
  return jax.ShapeDtypeStruct(tuple(shape), leaf.dtype, sharding=getattr(leaf, 'sharding', None))


def _slicers(
  groups: Sequence[UnitGroup], keeps: Mapping[str, np.ndarray], *, traced: bool = False
) -> dict[Path, list]:
  """Leaf path -> its ``(axis, keep, offset, block)`` slices; ``traced``: every group in
  ``keeps``, its mask as given (a jitted function's argument), not only the cut ones."""
  out: dict[Path, list] = {}
  for group in groups:
    keep = keeps.get(group.name)
    if keep is None or (not traced and np.all(keep)):
      continue
    keep = keep if traced else np.asarray(keep, bool)
    for s in group.slices:
      out.setdefault(s.path, []).append((s.axis, keep, s.offset, s.block))
  return out


def _slice_leaves(
  tree: PyTree,
  slicers: Mapping[Path, list],
  shapes: Mapping[Path, tuple[int, ...]] | None,
  op=_take,
) -> tuple[PyTree, set[Path]]:
  """Applies ``op(leaf, axis, parts)`` (default: slicing) to every leaf whose dict path has slicers."""
  used: set[Path] = set()

  def fn(keypath, leaf):
    path = dict_path(keypath)
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
  shapes = {dict_path(kp): np.shape(x) for kp, x in jax.tree.flatten_with_path(params)[0]}
  sliced, _ = _slice_leaves(opt_state, _slicers(groups, keeps), shapes, op)
  return sliced


def silence(
  model,
  variables: Mapping[str, PyTree],
  opt_state: PyTree,
  keeps: Mapping[str, np.ndarray],
  *,
  compiled=None,
) -> tuple[dict[str, PyTree], PyTree]:
  """Zeroes, instead of removing, the units not kept: ``(variables, opt_state)`` at the same shapes.

  Every producer and consumer slice of a removed unit is set to zero in every
  collection (``params``; ``batch_stats``: a norm's running statistics of the
  unit, which no longer matter once its scale and offset are zero, and any
  non-trainable state a group slices, such as the stream ids of a ResNet's
  selected identity, where an id of 0 connects nothing) and in every
  param-shaped optimizer-state leaf (moments, momentum, live masks: False).
  When the model's
  activation maps 0 to 0 (:func:`silences_exactly`) a silenced unit outputs
  exactly zero and its consumers read nothing from it, so the network computes
  what the pruned one computes; every gradient on the silenced slices is
  exactly zero and their moments are zero, so (with any optax optimizer whose
  update of a zero gradient with zero state is zero: SGD, momentum, Adam(W),
  weight decay of a zero weight, the DemP penalty, the live-only noise) they
  stay zero. Training can go on at the old shapes, exactly, until the step
  compiled for the new shapes is ready (:meth:`demp.trainer.run.Run.prune` with
  ``defer``); then :func:`prune` removes them.

  One jitted function whose keep-masks are arguments (:func:`silence_masks`): it
  compiles once per architecture, not once per prune event; ``compiled``, from
  :func:`compile_silence` (ahead of time, e.g. in the background), is used instead.
  """
  groups = unit_groups(model)
  # The checks of slice_variables (unknown groups, slices naming no leaf) on the host, free.
  slice_variables(variables, groups, keeps, op=lambda leaf, axis, parts: leaf)
  masks = silence_masks(model, keeps)
  fn = compiled if compiled is not None else functools.partial(_silence, model)
  stats = variables.get('batch_stats', {})
  params, batch_stats, new_opt_state = fn(variables['params'], stats, opt_state, masks)
  out = {**variables, 'params': params}
  if 'batch_stats' in variables:
    out['batch_stats'] = batch_stats
  return out, new_opt_state


def silence_masks(model, keeps: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every group's ``[width]`` keep-mask (all True where ``keeps`` has none): :func:`silence`'s argument."""
  return {
    g.name: np.asarray(keeps.get(g.name, np.ones(model.widths[g.name], bool)), bool)
    for g in unit_groups(model)
  }


@functools.partial(jax.jit, static_argnums=0)
def _silence(
  model, params: PyTree, batch_stats: PyTree, opt_state: PyTree, masks: Mapping[str, jax.Array]
):
  """:func:`silence` of params, batch stats and optimizer state, the masks traced (one program
  per shapes)."""
  groups = unit_groups(model)
  slicers = _slicers(groups, masks, traced=True)
  shapes = {dict_path(kp): np.shape(x) for kp, x in jax.tree.flatten_with_path(params)[0]}
  new_opt_state, _ = _slice_leaves(opt_state, slicers, shapes, _zero_traced)
  new_params, _ = _slice_leaves(params, slicers, None, _zero_traced)
  new_stats, _ = _slice_leaves(batch_stats, slicers, None, _zero_traced)
  return new_params, new_stats, new_opt_state


def compile_silence(model, variables: Mapping[str, PyTree], opt_state: PyTree):
  """:func:`silence`'s program for these shapes (arrays or ``jax.ShapeDtypeStruct``), compiled now.

  Pass it as ``silence(..., compiled=...)`` for any keep-masks of ``model``'s widths.
  """
  masks = {
    g.name: jax.ShapeDtypeStruct((model.widths[g.name],), jax.numpy.bool_)
    for g in unit_groups(model)
  }
  stats = variables.get('batch_stats', {})
  return _silence.lower(model, variables['params'], stats, opt_state, masks).compile()


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
  zeroed (in ``params``, and in non-trainable state a group reads the units
  through, such as the input ids of a ResNet's selected identity: that path
  stays cut), so the network's output is unchanged, and the optimizer's moments of
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
  # Consumers in every collection (params, and state such as a selected identity's ids).
  rest = slice_variables(variables, consumers, keeps, op=_zero)
  params = rest['params']
  for groups, op in (
    (only(lambda g, sc, of: sc), _fill(1.0)),
    (only(lambda g, sc, of: of), _fill(0.0)),
  ):
    params = slice_variables({'params': params}, groups, keeps, op=op)['params']
  return {**variables, **rest, 'params': params}, new_opt_state, woken


def silences_exactly(model) -> bool:
  """Whether :func:`silence` equals removal for ``model``: its activation maps 0 to 0."""
  name = getattr(model, 'activation', 'relu')
  return ZERO_AT_ZERO[name] if name in ZERO_AT_ZERO else _maps_zero_to_zero(name)


ZERO_AT_ZERO = {'relu': True, 'leaky_relu': True, 'gelu': True, 'swish': True}
"""``act(0) == 0`` of the activations of :mod:`demp.models.common` (a test evaluates them):
read here, nothing is compiled to know it at a prune event."""


@functools.lru_cache(maxsize=None)
def _maps_zero_to_zero(name: str) -> bool:
  """Evaluated once per activation and process (it compiles a tiny program)."""
  from demp.models import common  # pylint: disable=g-import-not-at-top

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


def prune(
  model,
  variables: Mapping[str, PyTree],
  opt_state: PyTree,
  keeps: Mapping[str, np.ndarray],
  *,
  example_input=None,
  allow_inexact: bool = False,
  host: bool = False,
):
  """Removes the units not kept: returns ``(model, variables, opt_state)``.

  ``host``: the sliced leaves are cut with NumPy on the host and come back as
  NumPy arrays (the others as they were), so nothing is compiled for the new
  shapes; the caller puts them back on its devices. The values are the same.

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
  op = _take_host if host else _take
  new_opt_state = slice_optimizer_state(opt_state, variables['params'], groups, keeps, op=op)
  new_variables = slice_variables(variables, groups, keeps, op=op)
  widths = dict(model.widths)
  for name, keep in keeps.items():
    widths[name] = int(np.sum(keep))
  new_model = model.clone(widths=flax.core.FrozenDict(widths))
  # Pure so far: nothing is returned until the checks below pass. One abstract init of the
  # pruned model gives both its normalizations and the shapes it expects.
  norms, expected = (
    trace_model(new_model, example_input) if example_input is not None else (None, None)
  )
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
    check_pruned_shapes(expected, new_variables, groups, model.widths, widths)
  return new_model, new_variables, new_opt_state


# ----------------------------------------------------------------------------
# Folding constant units into their consumers.
