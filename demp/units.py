"""What the optimizer derives from a model's unit groups.

* :func:`group_scales_mask`: the penalty mask of the groups' own normalization
  scales (``demp.penalty_mask = 'groups'``);
* :func:`unit_costs` and :func:`penalty_multipliers`: what one unit of each
  group carries (parameters or FLOPs), turned into per-leaf penalty weights
  (``demp.penalty_weighting``);
* :func:`live_mask` and :func:`set_live_mask`: the param-shaped liveness mask
  of the live noise for activations whose dead units still have gradients
  (``demp.noise_liveness = 'mask'``, see :func:`demp.transforms.with_live_noise`).

All of it reads only ``model.unit_groups()``, ``model.widths`` and parameter
shapes; nothing knows a particular architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from demp import protocol, transforms

PyTree = Any
Path = tuple[str, ...]

WEIGHTINGS = ('none', 'params', 'flops')
"""``demp.penalty_weighting``: no weights, or each group's penalty weighted by
the parameters (or FLOPs) one of its units carries, relative to the mean."""


def _at(tree: Mapping, path: Path):
  for k in path:
    if not isinstance(tree, Mapping) or k not in tree:
      return None
    tree = tree[k]
  return tree


def group_scale_paths(model) -> dict[str, list[Path]]:
  """Group name -> the paths of its own normalization scales (producer ``scale`` leaves).

  A group whose producers hold no ``scale`` (e.g. a ViT MLP block: fc1's kernel
  and bias only) maps to an empty list.
  """
  return {
    g.name: [s.path for s in g.producers if s.path[-1] == 'scale'] for g in model.unit_groups()
  }


def group_scales_mask(model) -> Callable[[PyTree], PyTree]:
  """``params -> bool tree``: True exactly on the unit groups' own norm scales.

  The penalty of ``demp.penalty_mask = 'groups'``. Unlike the
  :data:`demp.transforms.NORM_SCALES` regex, it never selects a norm scale that
  belongs to no prunable unit (a ViT's LayerNorms, a ResNet's stem norm when
  the stem is not prunable). A group without a norm scale of its own (a ViT's
  MLP units) is not penalised at all: the penalty has nothing of that group to
  shrink. Depends only on paths, so it stays valid after surgery.
  """
  paths = {p for ps in group_scale_paths(model).values() for p in ps}

  def mask_fn(params: PyTree) -> PyTree:
    return jax.tree.map_with_path(lambda kp, _: protocol.dict_path(kp) in paths, params)

  return mask_fn


def _module_positions(model, example_shape) -> dict[Path, int]:
  """Module path -> output positions (all axes but batch and last) for one example."""
  x = jax.ShapeDtypeStruct((1,) + tuple(example_shape), jnp.float32)

  def fwd(x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(
      variables, x, train=False, capture_intermediates=True, mutable=['intermediates']
    )
    return state['intermediates']

  inter = jax.eval_shape(fwd, x)
  out = {}

  def visit(tree, prefix):
    for k, v in tree.items():
      if k == '__call__':
        y = v[0]
        if hasattr(y, 'shape'):
          out[prefix] = int(np.prod(y.shape[1:-1], dtype=np.int64))
      elif isinstance(v, Mapping):
        visit(v, prefix + (k,))

  visit(inter, ())
  return out


def unit_costs(
  model, params: PyTree, kind: str = 'params', example_shape: tuple[int, ...] | None = None
) -> dict[str, float]:
  """Group name -> what one of its units carries, at the current widths.

  ``'params'``: the entries of every producer and consumer slice in ``params``,
  divided by the group's width (batch statistics are not parameters and are not
  counted). For conv -> flatten -> dense the consumer slice holds every
  position, so it counts every position.

  ``'flops'``: each slice's per-unit entries times the output positions of the
  module holding it (read by tracing the model on one ``example_shape`` input),
  i.e. the multiply-accumulates one unit costs per example in the forward pass.
  """
  if kind not in ('params', 'flops'):
    raise ValueError(f'kind={kind!r} is not one of [\'params\', \'flops\'].')
  positions = None
  if kind == 'flops':
    if example_shape is None:
      raise ValueError("unit_costs(kind='flops') needs `example_shape` (one input's shape).")
    positions = _module_positions(model, example_shape)
  costs = {}
  for g in model.unit_groups():
    width = model.widths[g.name]
    total = 0.0
    for s in g.slices:
      leaf = _at(params, s.path)
      if leaf is None:
        continue
      per_unit = float(np.size(leaf)) / width
      total += per_unit * (positions.get(s.path[:-1], 1) if positions is not None else 1)
    costs[g.name] = total
  return costs


def penalty_multipliers(
  model, params: PyTree, kind: str = 'params', example_shape: tuple[int, ...] | None = None
) -> dict[str, float] | None:
  """Per-leaf penalty weights: ``'/'``-path of each group's norm scale -> cost / mean cost.

  The mean is over the groups that own a norm scale (the penalised ones), so the
  weights average 1 over groups and λ keeps its meaning on average. A scale
  shared by no group is absent (weight 1); ``kind='none'`` returns None. For
  :func:`demp.transforms.add_scheduled_penalty`'s ``multipliers``.
  """
  if kind not in WEIGHTINGS:
    raise ValueError(f'demp.penalty_weighting={kind!r} is not one of {list(WEIGHTINGS)}.')
  if kind == 'none':
    return None
  scales = {k: v for k, v in group_scale_paths(model).items() if v}
  if not scales:
    return {}
  costs = unit_costs(model, params, kind, example_shape)
  mean = float(np.mean([costs[k] for k in scales]))
  return {'/'.join(p): costs[k] / mean for k, ps in scales.items() for p in ps}


# ----------------------------------------------------------------------------
# The liveness mask of the live noise.


def live_mask(params: PyTree, groups, alive: Mapping[str, np.ndarray]) -> PyTree:
  """Param-shaped bool tree: False on every slice (producer and consumer) of a dead unit.

  ``alive`` maps group names to ``[width]`` bools (the death check's verdict,
  at the widths of ``params``). A leaf that is the producer of one group and the
  consumer of another is False where either unit is dead. Leaves of no group
  are all True. Consumer slices of ``r·width`` entries (conv -> flatten) repeat
  the unit's verdict ``r`` times, units innermost.
  """
  per_path: dict[Path, list] = {}
  for g in groups:
    if g.name not in alive:
      continue
    vec = np.asarray(alive[g.name], bool)
    if vec.all():
      continue
    for s in g.slices:
      per_path.setdefault(s.path, []).append((s.axis, vec))

  def leaf_mask(kp, p):
    shape = jnp.shape(p)
    mask = jnp.ones(shape, jnp.bool_)
    for axis, vec in per_path.get(protocol.dict_path(kp), []):
      size = shape[axis]
      if size % vec.size:
        raise ValueError(
          f'{"/".join(protocol.dict_path(kp))}: axis {axis} of size {size} is not '
          f'a multiple of the group width {vec.size}.'
        )
      full = np.tile(vec, size // vec.size)
      bshape = [1] * len(shape)
      bshape[axis] = size
      mask = mask & jnp.asarray(full.reshape(bshape))
    return mask

  return jax.tree.map_with_path(leaf_mask, params)


def _is_noise_state(x) -> bool:
  return isinstance(x, transforms.LiveNoiseState)


def set_live_mask(
  opt_state: PyTree, params: PyTree, model, alive: Mapping[str, np.ndarray]
) -> PyTree:
  """Sets the live mask of every mask-mode ``LiveNoiseState`` in ``opt_state``.

  Finds the noise state by type at any depth (a chain, ``optax.MultiSteps``...).
  States in ``'gradient'`` mode (``live_mask is None``) and optimizer states
  without live noise are returned unchanged (the same objects). Pure: returns a
  new state.
  """
  if get_live_mask(opt_state) is None:
    return opt_state
  found = []

  def fix(x):
    if _is_noise_state(x) and x.live_mask is not None:
      if not found:
        found.append(live_mask(params, model.unit_groups(), alive))
      return x._replace(live_mask=found[0])
    return x

  return jax.tree.map(fix, opt_state, is_leaf=_is_noise_state)


def get_live_mask(opt_state: PyTree) -> PyTree | None:
  """The live mask of the first mask-mode noise state in ``opt_state``, or None."""
  for x in jax.tree.leaves(opt_state, is_leaf=_is_noise_state):
    if _is_noise_state(x) and x.live_mask is not None:
      return x.live_mask
  return None


__all__ = [
  'WEIGHTINGS',
  'get_live_mask',
  'group_scale_paths',
  'group_scales_mask',
  'live_mask',
  'penalty_multipliers',
  'set_live_mask',
  'unit_costs',
]
