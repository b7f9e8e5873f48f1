"""Theoretical FLOPs of masked layers: dense FLOPs x density, per layer, from shapes.

Unstructured masks give no wall-clock gain on dense hardware (the step still
multiplies every zero); what they reduce is the *theoretical* count, which is
what the unstructured literature reports (RigL's and the DemP paper's Table 2).
This module counts it honestly, per layer:

* :func:`layer_records` runs the model once under ``jax.eval_shape`` with a
  Flax method interceptor and records, in call order, every module call that
  owns a ``kernel``: its path, kernel shape and output shape (so a conv's
  FLOPs use its real output spatial size);
* a layer's dense forward FLOPs per example are
  ``2 * prod(kernel shape) * (output positions)``, output positions being the
  output's elements divided by its features (``H' W'`` for a conv, 1 for a
  dense layer on a vector); only kernels are counted (normalization,
  activations, pooling and biases are left out, as in RigL's accounting);
* sparse FLOPs scale each layer by its density ``1 - s_l``; a training step
  costs 3 forward passes (forward, gradient w.r.t. activations, w.r.t.
  weights); RigL also computes the dense weight gradient on its mask-update
  steps (Evci et al., 2020, appendix H).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from baselines.sparse import sparsity_schedules as schedules


class LayerRecord(NamedTuple):
  """One call of a module that owns a ``kernel``."""

  path: str  # module path, e.g. 'conv_1'
  kernel_shape: tuple[int, ...]
  output_shape: tuple[int, ...]  # one example's output (batch axis removed)

  @property
  def forward_flops(self) -> float:
    """Dense forward FLOPs per example (2 per multiply-add)."""
    positions = math.prod(self.output_shape) // max(1, self.output_shape[-1])
    return 2.0 * math.prod(self.kernel_shape) * positions


def layer_records(model: nn.Module, input_shape: Sequence[int], **call_kwargs) -> list[LayerRecord]:
  """The kernel-owning module calls of ``model`` on one example of ``input_shape``, in call order.

  Runs ``model.init`` abstractly (``jax.eval_shape``): no FLOPs are spent.
  ``call_kwargs`` default to ``train=False``.
  """
  call_kwargs = {'train': False, **call_kwargs}
  records: list[LayerRecord] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and context.module.scope is not None:
      kernel = context.module.variables.get('params', {}).get('kernel')
      if kernel is not None and hasattr(out, 'shape'):
        records.append(
          LayerRecord('/'.join(context.module.path), tuple(kernel.shape), tuple(out.shape[1:]))
        )
    return out

  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, **call_kwargs))
  return records


def layer_order(records: Sequence[LayerRecord]) -> list[str]:
  """Module paths in forward order (first call of each)."""
  return list(dict.fromkeys(r.path for r in records))


def forward_flops(
  records: Sequence[LayerRecord], sparsities: Mapping[str, float] | None = None
) -> float:
  """Forward FLOPs per example; ``sparsities`` maps module paths to their kernel's sparsity."""
  sparsities = sparsities or {}
  return float(sum(r.forward_flops * (1.0 - sparsities.get(r.path, 0.0)) for r in records))


def module_sparsities(target_sparsities: Any) -> dict[str, float]:
  """``{module path: sparsity}`` from a tree of per-weight sparsities (``None`` = dense)."""
  from baselines.sparse import distributions  # pylint: disable=g-import-not-at-top

  out = {}
  for path, s in jax.tree.leaves_with_path(target_sparsities):
    p = distributions.path_str(path)
    if p.endswith('/kernel'):
      out[distributions.module_of(p)] = float(s)
  return out


def flops_report(
  records: Sequence[LayerRecord],
  sparsities: Mapping[str, float],
  algorithm: str,
  scheduler: schedules.Schedule,
  total_steps: int,
) -> dict[str, float]:
  """Theoretical inference and training FLOPs relative to dense, over a whole run.

  The sparsity in effect at step ``t`` is the one set by the last mask update
  before ``t`` (dense before the first one for magnitude/saliency, the target
  from the start for SET/RigL).

  Returns:
    ``{'dense_forward_flops', 'inference_flops_rel', 'training_flops_rel'}``
    (FLOPs per example; ratios to the dense model).
  """
  from baselines.sparse import algorithms  # pylint: disable=g-import-not-at-top

  alg = algorithms.ALGORITHMS[algorithm]
  dense = forward_flops(records)
  update = np.asarray(jax.vmap(scheduler.is_mask_update_iter)(jnp.arange(1, total_steps + 1)))
  levels = {
    p: np.asarray(
      jax.vmap(lambda t, s=s: scheduler.get_sparsity_at_step(s, t))(jnp.arange(1, total_steps + 1))
    )
    for p, s in sparsities.items()
  }
  current = {p: (float(s) if alg.sparse_init else 0.0) for p, s in sparsities.items()}
  total = 0.0
  for i in range(total_steps):
    sparse = forward_flops(records, current)
    step_flops = 3.0 * sparse
    if update[i]:
      if algorithm == 'rigl':
        step_flops += dense - sparse
      if not alg.sparse_init:
        current = {p: float(levels[p][i]) for p in sparsities}
    total += step_flops
  final = {p: float(s) for p, s in sparsities.items()}
  return {
    'dense_forward_flops': dense,
    'inference_flops_rel': forward_flops(records, final) / dense,
    'training_flops_rel': total / (3.0 * dense * total_steps),
  }
