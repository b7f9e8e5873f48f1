"""Unstructured sparsity baselines: JaxPruner's algorithms, reimplemented on current JAX.

JaxPruner (Lee et al., 2023) pins old JAX releases and calls ``jax.tree_map``,
removed in JAX 0.6, so it does not run on current JAX. This package rebuilds
the part the DemP comparison needs with the same algorithms and vocabulary:

* :mod:`~baselines.sparse.updater`: ``wrap_optax`` / ``SparseUpdater``, masks in
  the optimizer state, updated inside the jitted step;
* :mod:`~baselines.sparse.algorithms`: magnitude, saliency, SET, RigL;
* :mod:`~baselines.sparse.distributions`: uniform and ERK per-layer sparsities;
* :mod:`~baselines.sparse.sparsity_schedules`: when masks change (one-shot, periodic,
  polynomial);
* :mod:`~baselines.sparse.theoretical_flops`: theoretical FLOPs from layer shapes;
* :mod:`~baselines.sparse.methods`: the trainer's methods, registered on import
  (``magnitude``, ``saliency``, ``set``, ``rigl``).
"""

from baselines.sparse import (
  algorithms,
  distributions,
  sparsity_schedules,
  theoretical_flops,
  updater,
)
from baselines.sparse.methods import default_config, flops_summary, make_updater, resolve
from baselines.sparse.updater import SparseState, SparseUpdater, create_updater, wrap_optax

__all__ = [
  'SparseState',
  'SparseUpdater',
  'algorithms',
  'create_updater',
  'default_config',
  'distributions',
  'flops_summary',
  'make_updater',
  'resolve',
  'sparsity_schedules',
  'theoretical_flops',
  'updater',
  'wrap_optax',
]
