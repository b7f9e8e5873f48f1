"""A run's summary: accuracy, sparsity, FLOPs over the run against dense, times, prune costs.

FLOPs are XLA's count of the train step at every architecture the run trained
(``train_flops*``), and of the forward pass at the final widths (``inference_flops*``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from demp import flops
from demp.trainer import steps
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


def _step_time(segment) -> float:
  # The first step of a segment can include host/device warm-up; the mean is fine for
  # the table, scripts/benchmark.py measures clean ratios side by side.
  return segment['seconds'] / max(1, segment['steps'])


def run_summary(config, run, ev, segments, train_flops, wall, compile_s) -> dict[str, Any]:
  first, final = segments[0], segments[-1]
  return {
    'method': config.method,
    'steps': config.num_steps,
    'test_accuracy': ev['accuracy'],
    'test_loss': ev['loss'],
    'neuron_sparsity': flops.neuron_sparsity(run.model.widths, run.dense_widths),
    'weight_sparsity': flops.weight_sparsity(run.state['params'], run.dense_params),
    'widths': dict(run.model.widths),
    'dense_widths': run.dense_widths,
    'dense_params': run.dense_params,
    'final_params': flops.num_params(run.state['params']),
    'prune_events': len(run.events),
    'prune_events_effective': sum(e['removed'] for e in run.events),
    'events': run.events,
    'wall_time_s': wall,
    'compile_time_s': compile_s,
    'step_time_first_s': _step_time(first),
    'step_time_final_s': _step_time(final),
    'step_time_ratio': _step_time(final) / _step_time(first),
    'step_flops_first': first['flops'],
    'step_flops_final': final['flops'],
    'step_flops_ratio': final['flops'] / first['flops'],
    **run_flops(
      model=run.model,
      tx=run.tx,
      dense_widths=run.dense_widths,
      image_shape=run.death_images.shape[1:],
      batch_size=config.batch_size,
      num_steps=config.num_steps,
      segments=segments,
      train_flops=train_flops,
      make_step=steps.make_train_step,
      label_smoothing=config.label_smoothing,
    ),
    'segments': segments,
    **prune_costs(run.costs, wall),
    'method_stats': dict(run.stats),
  }


def prune_costs(costs, wall: float) -> dict[str, Any]:
  """The prune events' total stall and its share of the wall time (summary keys)."""
  stalls = [c['stall_s'] for c in costs]
  return {
    'prune_overhead_s': float(sum(stalls)),
    'prune_overhead_share': float(sum(stalls) / wall) if wall > 0 else float('nan'),
    'prune_stall_max_s': float(max(stalls, default=0.0)),
    'prune_stall_max_steps': float(max((c['stall_steps'] for c in costs), default=0.0)),
    'prune_compile_background_s': float(
      sum(c.get('compile_s', 0.0) for c in costs if c.get('background'))
    ),
    'prune_costs': list(costs),
  }
