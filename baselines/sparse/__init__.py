"""Unstructured sparsity baselines: JaxPruner's algorithms, reimplemented on current JAX.

JaxPruner (Lee et al., 2023) cannot be installed here and calls
``jax.tree_map``, removed in JAX 0.6. This package rebuilds the part the DemP
comparison needs with the same algorithms and vocabulary:

* :mod:`~baselines.sparse.updater`: ``wrap_optax`` / ``SparseUpdater``, masks in
  the optimizer state, updated inside the jitted step;
* :mod:`~baselines.sparse.algorithms`: magnitude, saliency, SET, RigL;
* :mod:`~baselines.sparse.distributions`: uniform and ERK per-layer sparsities;
* :mod:`~baselines.sparse.schedules`: one-shot, periodic, polynomial;
* :mod:`~baselines.sparse.flops`: theoretical FLOPs from layer shapes;
* :mod:`~baselines.sparse.methods`: the trainer's methods (:data:`METHODS`).
"""

from baselines.sparse import algorithms, distributions, flops, schedules, updater
from baselines.sparse.methods import METHODS, default_config, flops_summary, make_updater, resolve
from baselines.sparse.updater import SparseState, SparseUpdater, create_updater, wrap_optax

__all__ = [
    'METHODS', 'SparseState', 'SparseUpdater', 'algorithms', 'create_updater', 'default_config',
    'distributions', 'flops', 'flops_summary', 'make_updater', 'resolve', 'schedules', 'updater',
    'wrap_optax',
]
