"""The pruning protocol: what a prunable model declares, and the checks that it holds.

A *unit group* is a set of units (neurons, conv channels) that live or die
together, described by the slices of the leaves it owns (:class:`UnitGroup`,
:class:`Slice`; see :mod:`demp.surgery` for how they are cut). A prunable model
exposes ``widths`` (group name -> width) and ``unit_groups()``. The checks here
refuse, naming the group and the leaf, a declaration that does not fit the
model's variables (:func:`check_slices`) and a group whose units feed a
normalization over the unit axis (:func:`check_normalizations`), where
removing even dead units changes the function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
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


def dict_path(keypath) -> Path:
  """The trailing run of dict keys of a key path (the param path inside any wrapper)."""
  names = []
  for k in reversed(keypath):
    if not isinstance(k, jax.tree_util.DictKey):
      break
    names.append(str(k.key))
  return tuple(reversed(names))


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
      f'and `unit_groups()` returning demp.protocol.UnitGroup entries (the slices of every leaf '
      f'each group owns), and sows its units with demp.deadunits.probe; see {PROTOCOL_DOC} and '
      f'demp/models/mlp.py for a complete example.'
    )
  groups = tuple(fn(model))
  bad = [g for g in groups if not isinstance(g, UnitGroup)]
  if bad:
    raise TypeError(
      f'{type(model).__name__}.unit_groups() must return demp.protocol.UnitGroup '
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
      out[dict_path(kp)] = (col, tuple(np.shape(leaf)))
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


def trace_model(model, example_input) -> tuple[dict[Path, str], dict]:
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
    norms = trace_model(model, example_input)[0]  # the normalizations do not depend on the widths
  out = {}
  for g in groups:
    for s in g.slices:
      module = s.path[:-1]
      if norms is not None and module in norms:
        out[g.name] = f'{norms[module]} {_name(module)!r}'
      elif norms is None and _looks_like_norm(shapes, module):
        out[g.name] = f'{_name(module)!r} (per-unit scale/bias without running statistics)'
  return out


def check_pruned_shapes(expected, variables, groups, before, after) -> None:
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
