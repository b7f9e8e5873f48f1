"""Which weights are pruned, and how sparse each layer is: uniform and ERK.

A sparsity distribution maps the shapes of the prunable weights
(``{path: shape}``) and one overall target to a sparsity per weight::

  >>> from baselines.sparse import distributions
  >>> shapes = {'conv_1/kernel': (3, 3, 32, 64), 'conv_2/kernel': (3, 3, 64, 128)}
  >>> {k: round(v, 3) for k, v in distributions.erk(shapes, 0.9).items()}
  {'conv_1/kernel': 0.865, 'conv_2/kernel': 0.911}

The target is over the prunable weights (JaxPruner's convention):
normalization parameters and biases are never pruned, and by default neither
is the first nor the last layer (:func:`layer_sparsities`), so the weight
sparsity over *all* parameters is a little lower.

* ``uniform``: every prunable weight at the target.
* ``erk`` (Erdős–Rényi-Kernel, Evci et al. 2020): density of a layer
  proportional to ``sum(shape) / prod(shape)``, scaled so the prunable
  weights as a whole reach the target; a layer whose density would exceed 1
  is made dense and the others are solved again (the standard iteration).

A custom per-layer map ``{path regex: sparsity}`` overrides the distribution
for the weights it matches (first match wins; 0 = not pruned); those weights
are left out of the distribution's budget.

References:
  Evci et al., `Rigging the Lottery: Making All Tickets Winners
  <https://arxiv.org/abs/1911.11134>`_, 2020 (ERK).

  Mocanu et al., `Scalable training of artificial neural networks with
  adaptive sparse connectivity inspired by network science
  <https://www.nature.com/articles/s41467-018-04316-3>`_, 2018 (Erdős–Rényi).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

PyTree = Any
Shapes = Mapping[str, tuple[int, ...]]

NEVER_PRUNED = r'(?i)(?:^|/)(?:[^/]*norm[^/]*|bn[^/]*|[^/]*_bn\d*)/|(?:^|/)(?:bias|scale)$'
"""Leaves that are never pruned: anything in a normalization module, any ``bias`` or ``scale``."""


def path_str(path: tuple[Any, ...]) -> str:
  """A pytree path as ``'conv_0/kernel'`` (dict keys, attribute names or indices)."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def module_of(path: str) -> str:
  """``'conv_0/kernel'`` → ``'conv_0'``."""
  return path.rsplit('/', 1)[0] if '/' in path else ''


def is_prunable(path: str, shape: Sequence[int]) -> bool:
  """Weights with >= 2 dims outside normalization modules; never biases or scales."""
  return len(shape) >= 2 and re.search(NEVER_PRUNED, path) is None


def insertion_order(params: Mapping[str, Any], prefix: str = '') -> list[str]:
  """Module paths in the params' insertion order (for Flax Linen: the order of the calls)."""
  order = []
  for key, value in params.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      if any(not isinstance(v, Mapping) for v in value.values()):
        order.append(path)
      order.extend(insertion_order(value, path))
  return order


def uniform(shapes: Shapes, sparsity: float) -> dict[str, float]:
  """Every weight at ``sparsity``."""
  _check_sparsity('sparsity', sparsity)
  return {path: float(sparsity) for path in shapes}


def erk(shapes: Shapes, sparsity: float, power_scale: float = 1.0) -> dict[str, float]:
  """Erdős–Rényi-Kernel sparsities with the iterative redistribution of saturated layers.

  Solves ``sum_l (1 - s_l) n_l = (1 - sparsity) sum_l n_l`` with
  ``1 - s_l = eps * (sum(shape_l) / prod(shape_l)) ** power_scale`` for the
  layers not yet dense; while the densest would exceed density 1 it is made
  dense (its zeros are taken out of the budget) and ``eps`` solved again.
  """
  _check_sparsity('sparsity', sparsity)
  dense: set[str] = set()
  while True:
    rhs = divisor = 0.0
    raw = {}
    for path, shape in shapes.items():
      n = math.prod(shape)
      if path in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1.0 - sparsity)
        raw[path] = (sum(shape) / n) ** power_scale
        divisor += raw[path] * n
    if not raw:
      break
    eps = rhs / divisor
    max_raw = max(raw.values())
    if max_raw * eps <= 1.0:
      break
    dense.update(p for p, r in raw.items() if r == max_raw)
  return {
    path: 0.0 if path in dense else float(min(1.0, max(0.0, 1.0 - eps * raw[path])))
    for path in shapes
  }


DISTRIBUTIONS: dict[str, Callable[[Shapes, float], dict[str, float]]] = {
  'uniform': uniform,
  'erk': erk,
}


def prunable_shapes(
  params: PyTree,
  *,
  layer_order: Sequence[str] | None = None,
  prune_first_layer: bool = False,
  prune_last_layer: bool = False,
) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
  """``(pruned, held)``: shapes of the weights to prune, and of the first/last layers held dense.

  ``layer_order`` lists module paths in forward order (e.g. from
  :func:`baselines.sparse.theoretical_flops.layer_records`); by default the params'
  insertion order, which for Flax Linen modules is the order of the calls.
  """
  shapes = {path_str(p): tuple(x.shape) for p, x in jax.tree.leaves_with_path(params)}
  candidates = {p: s for p, s in shapes.items() if is_prunable(p, s)}
  if layer_order is None:
    layer_order = insertion_order(params) if isinstance(params, Mapping) else []
  modules = [m for m in layer_order if any(module_of(p) == m for p in candidates)]
  held_modules = set()
  if modules and not prune_first_layer:
    held_modules.add(modules[0])
  if modules and not prune_last_layer:
    held_modules.add(modules[-1])
  pruned = {p: s for p, s in candidates.items() if module_of(p) not in held_modules}
  held = {p: s for p, s in candidates.items() if module_of(p) in held_modules}
  return pruned, held


def layer_sparsities(
  params: PyTree,
  distribution: str,
  sparsity: float,
  *,
  layer_order: Sequence[str] | None = None,
  prune_first_layer: bool = False,
  prune_last_layer: bool = False,
  custom_sparsity: Mapping[str, float] | None = None,
) -> PyTree:
  """A tree like ``params``: a sparsity (float) for each pruned weight, ``None`` elsewhere.

  Args:
    params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
    distribution: a key of :data:`DISTRIBUTIONS`.
    sparsity: the target over the pruned weights, in [0, 1).
    layer_order: module paths in forward order (see :func:`prunable_shapes`).
    prune_first_layer, prune_last_layer: prune those layers too.
    custom_sparsity: ``{path regex: sparsity}``; a weight whose path
      ``re.search``-matches a regex (first match wins) gets that sparsity, even
      a first or last layer (never a bias or normalization parameter).

  Raises:
    ValueError: on an unknown distribution or a sparsity outside [0, 1).
  """
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f'distribution={distribution!r} is not one of {sorted(DISTRIBUTIONS)}.')
  _check_sparsity('sparsity', sparsity)
  pruned, held = prunable_shapes(
    params,
    layer_order=layer_order,
    prune_first_layer=prune_first_layer,
    prune_last_layer=prune_last_layer,
  )
  custom = {}
  for regex, value in dict(custom_sparsity or {}).items():
    _check_sparsity(f'custom_sparsity[{regex!r}]', value)
    try:
      pattern = re.compile(regex)
    except re.error as e:
      raise ValueError(f'custom_sparsity key {regex!r} is not a regular expression: {e}') from e
    for path in {**pruned, **held}:
      if path not in custom and pattern.search(path):
        custom[path] = float(value)
  pool = {p: s for p, s in pruned.items() if p not in custom}
  result = {**DISTRIBUTIONS[distribution](pool, sparsity), **custom}

  def leaf(path, _):
    value = result.get(path_str(path))
    return value if value else None  # 0 = not pruned

  return jax.tree.map_with_path(leaf, params)


def _check_sparsity(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
    raise ValueError(f'{name}={value!r} must be a number in [0, 1).')
