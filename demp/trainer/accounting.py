"""FLOPs over a run: XLA's count of the train step at every architecture, against dense.

The numbers of a run summary's ``train_flops*`` / ``inference_flops*`` keys.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from demp import flops
from demp.trainer import run as run_lib


def train_step_flops(
  make_step: Callable, model, tx, image_shape: Sequence[int], batch_size: int, **step_kwargs
) -> float:
  """XLA's FLOPs of one train step ``make_step(model, tx, **kw)(state, batch)``.

  State ``{params, batch_stats, opt_state}`` and batch ``{image, label}`` are
  abstract, so this works for a model whose arrays do not exist (the dense
  version of a pruned run).
  """
  state = jax.eval_shape(
    lambda: run_lib.create_train_state(model, tx, jax.random.key(0), image_shape)
  )
  batch = {
    'image': jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32),
    'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32),
  }
  return flops.xla_flops(make_step(model, tx, **step_kwargs), state, batch)


def run_flops(
  *,
  model,
  tx,
  dense_widths: Mapping[str, int],
  image_shape: Sequence[int],
  batch_size: int,
  num_steps: int,
  segments: Sequence[Mapping[str, Any]],
  train_flops: float,
  make_step: Callable,
  **step_kwargs,
) -> dict[str, float]:
  """The FLOP part of a run summary, relative to the dense model.

  Training FLOPs are integrated over the run (Σ over steps of the compiled
  step's FLOPs at the architecture of that step) and compared with
  ``num_steps`` dense steps; the dense step's FLOPs are those of the first
  segment when it ran at the dense widths, else compiled here from shapes
  (a method that prunes before its first step). Inference FLOPs: per image,
  eval mode, final vs dense.
  """
  first = segments[0] if segments else None
  if first is not None and dict(first['widths']) == dict(dense_widths):
    dense_step = float(first['flops'])
  else:
    dense_step = train_step_flops(
      make_step, flops.at_widths(model, dense_widths), tx, image_shape, batch_size, **step_kwargs
    )
  dense_total = dense_step * num_steps
  out = {
    'train_flops': float(train_flops),
    'train_flops_dense': dense_total,
    'train_flops_rel': train_flops / dense_total if dense_total else float('nan'),
  }
  out.update(flops.inference_flops(model, dense_widths, image_shape))
  return out
