"""Prune any Flax NNX model: unit groups found automatically, dead units removed.

The NNX counterpart of :mod:`demp.auto`. A plain ``nnx.Module`` (layers as
attributes, literal widths such as ``nnx.Linear(64, 128, rngs=rngs)``,
activations as functions) and its ``nnx.Optimizer`` (or a plain optax state
over ``nnx.state(model, nnx.Param)``) are pruned as they are::

    model = demp.nnx.make_prunable(model, x[:1])    # the same model, its unit groups attached
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ...
    alive, activity = demp.nnx.dead_unit_stats(model, images)
    model, optimizer = demp.nnx.prune(model, optimizer, demp.keep_masks(alive, activity))
    print(demp.nnx.describe_groups(model))

Design: :mod:`demp.auto`'s analysis, NNX layers intercepted
------------------------------------------------------------
*Discovery* (once, no FLOPs). NNX has no method interceptors; the ``__call__``
of ``nnx.Linear``, ``nnx.Conv``, the norms and the attention layers is swapped
for one abstract pass (``nnx.split`` -> a pure function that ``nnx.merge``\\ s a
copy, sets it to eval mode and calls it -> ``jax.make_jaxpr``), and each call
is wrapped in :mod:`demp.auto`'s marks, the layer named by its path in the
graph (``nnx.iter_graph``). The analysis of the jaxpr is :mod:`demp.auto`'s,
unchanged: ``Linear``/``Conv`` outputs start unit groups, BatchNorm (and a
GroupNorm with one channel per group, an InstanceNorm) is per-unit, residual
additions couple groups, channel concatenations place groups at offsets,
depthwise convs join their input's group, an NHWC flatten before a ``Linear``
tiles the consumer's rows. What it cannot prove exact is left at full width
with the reason: a LayerNorm/RMSNorm over the units, a ``MultiHeadAttention``
(or ``LinearGeneral``, ``Einsum``, ``ConvTranspose``, a masked ``Conv``)
reading them, any unknown op on the unit axis, units reaching the output.

The groups, the widths and the example call's shapes are attached to the
model as one static attribute (``demp_units``, hashable): they travel in its
graphdef through ``nnx.split``/``nnx.merge``/``nnx.jit``, and the model is
otherwise untouched.

*Death check*: one jitted pass (``lax.scan`` over batches) of a merged copy in
eval mode records the input of every consumer layer, one slice per group (the
post-activation as the consumer reads it, as :mod:`demp.auto` sows it), and
reduces it with :func:`demp.deadunits.site_stats`: the same statistics, and
the same criteria (``demp.CRITERIA``), as ``demp.dead_unit_stats``.

*Surgery*: the model's state is viewed as collections (``params``,
``batch_stats``) and sliced by :func:`demp.surgery.slice_variables`, the
optimizer state by :func:`demp.surgery.slice_optimizer_state` (every leaf
whose path and shape are a param's: Adam's ``mu``/``nu``, momentum, masks).
The new model is a clone with the sliced arrays and its layers' attributes
rewritten (``in_features``/``out_features``/``kernel_shape``/
``feature_group_count``, ``num_features``), so it has a new graphdef and
``nnx.jit`` compiles once per architecture. Before returning, the pruned
model is traced (abstractly) on the example call: it must run and give the
output shape of the original.

The discovery traces the call given by ``example_args``/``example_kwargs``;
layers that only run with other arguments are not seen. Reshapes must be
written from the input's shape (``x.reshape((x.shape[0], -1))``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from demp import _nnx_trace as trace
from demp import auto, deadunits, protocol, surgery
from demp.surgery import keep_masks

Path = tuple[str, ...]
ATTRIBUTE = 'demp_units'


@dataclasses.dataclass(frozen=True)
class Units:
  """What :func:`make_prunable` attaches to a model (static, hashable).

  Attributes:
    prunable: a :class:`demp.auto.Prunable` without a module: the plan (groups,
      members, sites, refusals) and the current widths.
    example: the example call as ``(treedef, leaves)``, arrays as shape-dtypes.
  """

  prunable: auto.Prunable
  example: tuple[Any, tuple[Any, ...]] | None = None

  @property
  def widths(self) -> flax.core.FrozenDict:
    return self.prunable.widths


def _example(args, kwargs):
  leaves, treedef = jax.tree.flatten((args, kwargs))
  out = []
  for x in leaves:
    if trace._is_array(x):  # pylint: disable=protected-access
      out.append(jax.ShapeDtypeStruct(np.shape(x), x.dtype))
    else:
      try:
        hash(x)
      except TypeError:
        return None
      out.append(x)
  return treedef, tuple(out)


def make_prunable(
  model: nnx.Module, *example_args, activation: str = 'relu', **example_kwargs
) -> nnx.Module:
  """Finds the unit groups of a plain NNX model; returns the model with them attached.

  Args:
    model: any ``flax.nnx.Module`` (it is traced on a copy in eval mode).
    *example_args: the inputs of one forward pass (shapes matter), e.g. ``x[:1]``.
    activation: the death criterion (a key of ``demp.CRITERIA``).
    **example_kwargs: keyword arguments of that pass.

  Returns:
    ``model`` itself, with the static attribute ``demp_units`` (:class:`Units`).
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'make_prunable needs a flax.nnx.Module, got {type(model).__name__}.')
  deadunits.criterion_for(activation)
  plan = trace.discover(model, example_args, example_kwargs)
  widths = flax.core.FrozenDict({g.name: g.width for g in plan.groups})
  units = Units(
    auto.Prunable(None, widths, plan, activation), _example(example_args, example_kwargs)
  )
  setattr(model, ATTRIBUTE, units)
  return model


def units_of(model: nnx.Module) -> Units:
  """The :class:`Units` :func:`make_prunable` attached (raises if it was not called)."""
  units = getattr(model, ATTRIBUTE, None)
  if not isinstance(units, Units):
    raise ValueError(
      f'{type(model).__name__} has no unit groups: call demp.nnx.make_prunable(model, x) first.'
    )
  return units


def unit_groups(model: nnx.Module) -> tuple[protocol.UnitGroup, ...]:
  """The model's unit groups at its current widths (paths below ``params``/``batch_stats``)."""
  return units_of(model).prunable.unit_groups()


def describe_groups(model: nnx.Module) -> str:
  """Every group, its width, producers, per-unit layers, consumers; and the refusals."""
  return auto.describe_groups(units_of(model).prunable)


# ----------------------------------------------------------------------------
# The death check.


def _site_inputs(pm: auto.Prunable):
  """A layer hook recording, per consumer call, its input's slice for each group it reads."""
  sites = dict(pm.plan.sites)
  recorded: dict = {}

  def hook(run, module, args, kwargs, paths):
    path = paths.get(id(module))
    if path in sites and args:
      node = recorded
      for k in path:
        node = node.setdefault(k, {})
      x = args[0]
      for spec in sites[path]:
        block = auto._size(spec.block, pm.widths)  # pylint: disable=protected-access
        offset = auto._size(spec.offset, pm.widths)  # pylint: disable=protected-access
        width = int(pm.widths[spec.group])
        a = x
        if not (spec.reps == 1 and offset == 0 and width == x.shape[-1]):
          a = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))[..., offset : offset + width]
        node[spec.name] = node.get(spec.name, ()) + (a,)
    return run(*args, **kwargs)

  return hook, recorded


@functools.partial(jax.jit, static_argnames=('graphdef', 'criterion', 'batch_size', 'call'))
def _scan_stats(graphdef, state, images, *, criterion, eps, batch_size, call):
  n = images.shape[0]
  xs = images.reshape((n // batch_size, batch_size) + images.shape[1:])

  def batch_stats(x):
    m = nnx.merge(graphdef, state)
    m.eval()
    pm = units_of(m).prunable
    hook, recorded = _site_inputs(pm)
    with trace.intercepting(functools.partial(hook, paths=trace.module_paths(m))):
      m(x, **dict(call))
    return deadunits.site_stats(recorded, pm.unit_groups(), criterion, eps)

  def body(carry, x):
    alive, activity = batch_stats(x)
    return (
      jax.tree.map(jnp.logical_or, carry[0], alive),
      jax.tree.map(jnp.maximum, carry[1], activity),
    ), None

  (alive, activity), _ = jax.lax.scan(body, batch_stats(xs[0]), xs[1:])
  return alive, activity


def dead_unit_stats(
  model: nnx.Module,
  images: jax.Array,
  *,
  criterion: str | None = None,
  eps: float = 0.01,
  batch_size: int = 128,
  **call_kwargs,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Liveness of every unit group on ``images``: one jitted pass of a copy in eval mode.

  Same statistics as ``demp.dead_unit_stats``: a unit is alive if it is active
  (``demp.CRITERIA[criterion]``) on some example at some position.

  Args:
    model: a model returned by :func:`make_prunable` (or :func:`prune`).
    images: ``[N, ...]`` fixed training examples, ``N`` a multiple of ``batch_size``
      (or ``N <= batch_size``).
    criterion: a key of ``demp.CRITERIA``; default: the ``activation`` given to
      :func:`make_prunable`.
    eps: the threshold of epsilon-inactivity criteria.
    batch_size: examples per batch of the scan.
    **call_kwargs: keyword arguments of the model call (hashable); default: the
      non-array keyword arguments of the discovery call.

  Returns:
    ``(alive, activity)``: group name -> ``[width]`` bool, and -> ``[width]``
    float32 (max |a|), on host; ``demp.keep_masks`` turns them into keep-masks.
  """
  units = units_of(model)
  criterion = units.prunable.activation if criterion is None else criterion
  deadunits.criterion_for(criterion)
  if not call_kwargs and units.example is not None:
    _, kwargs = jax.tree.unflatten(*units.example)
    call_kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, jax.ShapeDtypeStruct)}
  n = images.shape[0]
  batch_size = min(batch_size, n)
  if n % batch_size:
    raise ValueError(
      f'the {n} death-check examples are not a multiple of the batch size {batch_size}.'
    )
  if not units.prunable.plan.groups:
    return {}, {}
  graphdef, state = nnx.split(model)
  alive, activity = _scan_stats(
    graphdef,
    state,
    images,
    criterion=criterion,
    eps=float(eps),
    batch_size=batch_size,
    call=tuple(sorted(call_kwargs.items())),
  )
  alive, activity = jax.device_get((alive, activity))
  return (
    {k: np.asarray(v) for k, v in alive.items()},
    {k: np.asarray(v) for k, v in activity.items()},
  )


# ----------------------------------------------------------------------------
# The surgery.


def _check_masks(units: Units, masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
  plan = units.prunable.plan
  refused = {r.name: r for r in plan.refused}
  layer_group = {'/'.join(path): group for path, group in plan.producers}
  keeps = {}
  for name, keep in masks.items():
    if name in refused:
      r = refused[name]
      layers = ', '.join(repr('/'.join(p)) for p in r.producers)
      raise ValueError(
        f'cannot prune the units of layer {layers} (unit group {name!r}): {r.reason}. '
        f'Removing them would change what the model computes; the group stays at full width.'
      )
    if name not in units.widths:
      hint = f' (layer {name!r} is in group {layer_group[name]!r})' if name in layer_group else ''
      raise ValueError(
        f'keep-mask for unknown unit group {name!r}{hint}; groups: {sorted(units.widths)}.'
      )
    keep = np.asarray(keep, bool)
    if keep.shape != (units.widths[name],):
      raise ValueError(
        f'keep-mask for {name!r} has shape {keep.shape}, the group has {units.widths[name]} units.'
      )
    if not keep.any():
      raise ValueError(f'keep-mask for {name!r} keeps no unit (demp.keep_masks keeps min_width).')
    keeps[name] = keep
  return keeps


def _set_attributes(model: nnx.Module, plan: auto.Plan, widths: Mapping[str, int]) -> None:
  """Rewrites the size attributes of every layer the groups touch to its new arrays' sizes."""
  modules = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      modules.setdefault(trace.path_str(path), node)
  depthwise = set(plan.depthwise)
  for group in plan.groups:
    for member in group.members:
      m = modules[member.path]
      if isinstance(m, nnx.Conv):
        shape = tuple(m.kernel.shape)
        if member.path in depthwise:
          m.feature_group_count = shape[-1]
        m.in_features = shape[-2] * m.feature_group_count
        m.out_features = shape[-1]
        m.kernel_shape = shape
      elif isinstance(m, nnx.Linear):
        m.in_features, m.out_features = (int(s) for s in m.kernel.shape)
      elif isinstance(m, (nnx.BatchNorm, nnx.GroupNorm, nnx.InstanceNorm)):
        size = auto._size(member.block, widths)  # pylint: disable=protected-access
        m.num_features = size
        if isinstance(m, nnx.GroupNorm):
          m.num_groups, m.group_size = size, 1


def _abstract_call(model: nnx.Module, example):
  """The output shapes of ``model`` on the example call (eval mode, no compute)."""
  treedef, leaves = example
  arrays = [x for x in leaves if isinstance(x, jax.ShapeDtypeStruct)]
  graphdef, state = nnx.split(model)

  def run(state, arrays):
    it = iter(arrays)
    filled = [next(it) if isinstance(x, jax.ShapeDtypeStruct) else x for x in leaves]
    args, kwargs = jax.tree.unflatten(treedef, filled)
    m = nnx.merge(graphdef, state)
    m.eval()
    return m(*args, **kwargs)

  return jax.eval_shape(run, state, arrays)


def _slice_opt_state(opt_state, params: Mapping, new_params: Mapping, groups, keeps):
  """Every param-shaped leaf of an optax state sliced (its ``nnx.Variable`` wrappers kept)."""
  treedef = jax.tree.structure(opt_state)
  pure = nnx.as_pure(opt_state)
  sliced = surgery.slice_optimizer_state(pure, params, groups, keeps)
  old = dict(trace.flat(params))
  new = dict(trace.flat(new_params))
  for kp, leaf in jax.tree.flatten_with_path(sliced)[0]:
    path = protocol.dict_path(kp)
    for start in range(len(path)):
      sub = path[start:]
      if sub in new and np.shape(new[sub]) != np.shape(old[sub]):
        if np.shape(leaf) not in (np.shape(new[sub]), ()):
          raise ValueError(
            f'optimizer state leaf {jax.tree_util.keystr(kp)} of shape {np.shape(leaf)} '
            f'belongs to the pruned param {"/".join(sub)} {np.shape(old[sub])} but is not '
            f'param-shaped (a factored moment?): this optimizer state cannot be sliced.'
          )
        break
  return jax.tree.unflatten(treedef, jax.tree.leaves(sliced))


def prune(model: nnx.Module, optimizer, masks: Mapping[str, Any]):
  """Removes the units not kept: returns a new ``(model, optimizer)``.

  Args:
    model: a model returned by :func:`make_prunable` (or by this function).
    optimizer: its ``nnx.Optimizer``, or a plain optax state over
      ``nnx.state(model, nnx.Param)``, or None.
    masks: group name -> ``[width]`` bool keep-mask (``demp.keep_masks``);
      groups left out keep every unit.

  Returns:
    ``(model, optimizer)``: a new model (a clone: new arrays, layers' size
    attributes rewritten, a new graphdef) computing the same function on the
    kept units, and a new optimizer (or optax state) with every param-shaped
    leaf sliced and its step count kept. The inputs are left unchanged.

  Raises:
    ValueError: a mask names a group that cannot be pruned (the message names
      its layers and why), an unknown group, or has the wrong size; a leaf of a
      pruned layer no group covers; an optimizer state that cannot be sliced;
      a pruned model that does not run on the example call.
  """
  units = units_of(model)
  pm = units.prunable
  keeps = _check_masks(units, masks)
  groups = pm.unit_groups()
  graphdef, state = nnx.split(model)
  variables = trace.collections(state)
  protocol.check_slices(pm, variables, groups)
  new_vars = surgery.slice_variables(variables, groups, keeps)
  widths = dict(pm.widths)
  for name, keep in keeps.items():
    widths[name] = int(keep.sum())

  new_model = nnx.clone(model)
  values = {}
  for col, tree in new_vars.items():
    values.update(trace.flat(tree))
  for path, node in nnx.iter_graph(new_model):
    if isinstance(node, nnx.Variable):
      key = trace.path_str(path)
      if key in values and np.shape(values[key]) != tuple(node.shape):
        node.set_value(values[key])
  _set_attributes(new_model, pm.plan, widths)
  setattr(new_model, ATTRIBUTE, dataclasses.replace(units, prunable=pm.clone(widths=widths)))
  if units.example is not None:
    try:
      after = _abstract_call(new_model, units.example)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
        f'the pruned model does not run on the example call ({type(e).__name__}: {e}). '
        f'Are sizes written as literals (x.reshape((n, 8 * 8 * 16))) instead of read from '
        f'the input?'
      ) from e
    before = _abstract_call(model, units.example)
    if jax.tree.map(np.shape, after) != jax.tree.map(np.shape, before):
      raise ValueError(
        f'the pruned model returns {jax.tree.map(np.shape, after)}, '
        f'the model returned {jax.tree.map(np.shape, before)}.'
      )

  params = variables.get('params', {})
  new_params = new_vars.get('params', {})
  if optimizer is None:
    new_opt = None
  elif isinstance(optimizer, nnx.Optimizer):
    new_opt = nnx.clone(optimizer)
    sliced = _slice_opt_state(nnx.as_pure(optimizer.opt_state), params, new_params, groups, keeps)
    nnx.update(new_opt.opt_state, nnx.state(sliced))
    if 'model' in vars(optimizer):  # nnx.ModelAndOptimizer
      new_opt.model = new_model
  else:
    new_opt = _slice_opt_state(optimizer, params, new_params, groups, keeps)
  return new_model, new_opt


__all__ = [
  'ATTRIBUTE',
  'Units',
  'dead_unit_stats',
  'describe_groups',
  'keep_masks',
  'make_prunable',
  'prune',
  'unit_groups',
  'units_of',
]
