"""One comparison table: dense, DemP, the structured baselines and NEq, same recipe.

:func:`run_methods` trains each method with one config function, in order:
dense and DemP first, then the structured baselines with ``target_kind =
'weights'`` and ``target_sparsity`` = DemP's final weight sparsity (so every
pruned row sits at about the same weight sparsity), then NEq.
:func:`step_benchmark` times every run's final architecture side by side
(interleaved rounds in one process: the same machine load for all, unlike the
runs' own wall times). :func:`table` formats it all as one Markdown table.

The unstructured baselines (``baselines.sparse``: magnitude, saliency, SET,
RigL) at several target sparsities next to dense and DemP:
:func:`run_unstructured`, :func:`unstructured_table` and
:func:`mask_update_benchmark` (a dense step against a sparse step without and
with a mask update, side by side).

``scripts/compare.py`` is the command line for both (``--kind``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from baselines import sparse
from demp.trainer import methods as methods_lib
from demp.trainer import train
from tools import benchmark

STRUCTURED = ('snap', 'crop_s', 'early_snap', 'early_crop_s')
ORDER = ('dense', 'demp') + STRUCTURED + ('neq', 'neq_stochastic')
"""The structured comparison's methods, in the order they train (DemP before the baselines)."""


def run_methods(
  make_config: Callable[[str], ml_collections.ConfigDict],
  methods: Sequence[str],
  workdir: str,
  *,
  match_weight_sparsity: bool = True,
  reuse: bool = False,
) -> dict[str, dict[str, Any]]:
  """Trains every method (``make_config(method)``); returns method -> run summary.

  ``reuse``: a method whose ``workdir/<method>/summary.json`` exists is not
  trained again; its summary is read back.
  """
  unknown = set(methods) - set(methods_lib.names())
  if unknown:
    raise ValueError(f'--methods: {sorted(unknown)} are not methods; known: {methods_lib.names()}.')
  order = sorted(methods, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
  summaries: dict[str, dict[str, Any]] = {}
  for method in order:
    path = os.path.join(workdir, method, 'summary.json')
    if reuse and os.path.exists(path):
      with open(path) as f:
        summaries[method] = json.load(f)
      continue
    config = make_config(method)
    if match_weight_sparsity and method in STRUCTURED and 'demp' in summaries:
      config.baselines.target_kind = 'weights'
      config.baselines.target_sparsity = round(float(summaries['demp']['weight_sparsity']), 4)
    summaries[method] = train.train_and_evaluate(config, os.path.join(workdir, method))
  return summaries


def step_benchmark(
  make_config: Callable[[str], ml_collections.ConfigDict],
  summaries: Mapping[str, Mapping[str, Any]],
  *,
  rounds: int = 3,
  steps: int = 3,
) -> dict[str, float]:
  """Median seconds per train step of each run's final architecture, interleaved.

  Each method's own train step (its optimizer wrapper included: NEq's masking)
  at its final widths, on the same batch, in ``rounds`` rounds of ``steps``
  steps per method, so that load changes hit every method alike.
  """
  fns = {}
  for method, summary in summaries.items():
    run, batches = train.init_run(make_config(method))
    run.prune(
      {k: np.arange(w) < summary['widths'][k] for k, w in run.model.widths.items()},
      reason='benchmark: final widths',
    )
    fns[method] = benchmark.run_step_fn(run, next(batches))
  return benchmark.median_times(
    benchmark.interleaved_times(fns, rounds=rounds, steps_per_round=steps)
  )


def _widths(summary) -> str:
  return '-'.join(str(w) for w in summary['widths'].values())


def table(
  summaries: Mapping[str, Mapping[str, Any]], step_times: Mapping[str, float] | None = None
) -> str:
  """A Markdown table; times and FLOPs relative to the dense row when there is one."""
  dense = summaries.get('dense')
  step_times = step_times or {}
  lines = [
    '| method | test acc | neuron sparsity | weight sparsity | widths | wall [s] | '
    'wall vs dense | final step vs dense (side by side) | train FLOPs vs dense | '
    'inference FLOPs vs dense | units frozen (mean) | bprop FLOPs saved |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for method, s in summaries.items():
    stats = s.get('method_stats', {})
    wall_rel = f'{s["wall_time_s"] / dense["wall_time_s"]:.2f}x' if dense else '-'
    frozen = f'{stats["frozen_fraction_mean"]:.3f}' if 'frozen_fraction_mean' in stats else '-'
    saved = f'{stats["bprop_flops_saved_frac"]:.3f}' if 'bprop_flops_saved_frac' in stats else '-'
    step = (
      f'{step_times[method] / step_times["dense"]:.2f}x'
      if method in step_times and 'dense' in step_times
      else '-'
    )
    lines.append(
      f'| {method} | {s["test_accuracy"]:.4f} | {s["neuron_sparsity"]:.3f} | '
      f'{s["weight_sparsity"]:.3f} | {_widths(s)} | {s["wall_time_s"]:.0f} | {wall_rel} | {step} | '
      f'{s.get("train_flops_rel", float("nan")):.2f}x | '
      f'{s.get("inference_flops_rel", float("nan")):.2f}x | {frozen} | {saved} |'
    )
  return '\n'.join(lines)


def notes(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """When each pruning method pruned, and what the early trigger saw."""
  lines = []
  for method, s in summaries.items():
    stats = s.get('method_stats', {})
    if 'prune_step' in stats:
      extra = (
        f', trigger={stats["trigger"]} at epoch {stats["prune_epoch"]}'
        if 'trigger' in stats
        else ''
      )
      lines.append(
        f'- {method}: pruned at step {stats["prune_step"]} to {stats["target_kind"]} '
        f'sparsity {stats["target_sparsity"]:.4f}{extra}'
      )
    elif method == 'demp':
      lines.append(
        f'- demp: {s["prune_events_effective"]} of {s["prune_events"]} death checks removed units'
      )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Unstructured baselines.


def run_unstructured(
  make_config: Callable[..., ml_collections.ConfigDict],
  *,
  algorithms: Sequence[str],
  sparsities: Sequence[float],
  demp_lams: Sequence[float],
  workdir: str,
) -> list[tuple]:
  """Trains dense, every algorithm at every sparsity and DemP at every peak λ.

  ``make_config(method, sparsity=0.0, lam=None, **baselines)``. Returns rows
  ``(name, target, summary, flops)``: theoretical FLOPs relative to dense for
  the masked methods (:func:`baselines.sparse.flops_summary`), XLA's FLOPs of
  the shrinking network for DemP.
  """
  rows = []
  dense = train.train_and_evaluate(make_config('dense'), os.path.join(workdir, 'dense'))
  rows.append(('dense', '-', dense, sparse.flops_summary(make_config('dense'))))
  for s in sparsities:
    for algorithm in algorithms:
      config = make_config(algorithm, s)
      summary = train.train_and_evaluate(config, os.path.join(workdir, f'{algorithm}_{s}'))
      rows.append((algorithm, f'{s:.2f}', summary, sparse.flops_summary(config)))
  for lam in demp_lams:
    # DemP removes units physically: its FLOPs are XLA's, integrated as the network shrinks.
    summary = train.train_and_evaluate(
      make_config('demp', lam=lam), os.path.join(workdir, f'demp_{lam:g}')
    )
    rows.append(
      (
        f'demp (λ={lam:g})',
        '-',
        summary,
        {
          'inference_flops_rel': summary['inference_flops_rel'],
          'training_flops_rel': summary['train_flops_rel'],
        },
      )
    )
  return rows


def unstructured_table(rows: Sequence[tuple]) -> str:
  """A Markdown table of :func:`run_unstructured`'s rows; step times relative to the dense row."""
  dense_step = rows[0][2]['step_time_final_s']
  lines = [
    '| method | target sparsity (pruned weights) | weight sparsity (all params) | test acc '
    '| inference FLOPs | training FLOPs | step time [ms] | step time vs dense |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for name, target, summary, fl in rows:
    step = summary['step_time_final_s']
    lines.append(
      f'| {name} | {target} | {summary["weight_sparsity"]:.3f} | '
      f'{summary["test_accuracy"]:.3f} | {fl["inference_flops_rel"]:.2f}x | '
      f'{fl["training_flops_rel"]:.2f}x | {1e3 * step:.0f} | {step / dense_step:.2f}x |'
    )
  return '\n'.join(lines)


def mask_update_benchmark(
  make_config: Callable[..., ml_collections.ConfigDict], *, rounds: int, steps: int
) -> dict[str, float]:
  """Median seconds per train step: dense, sparse (no mask update), sparse (mask update)."""
  variants = {
    'dense': make_config('dense'),
    'rigl, no mask update': make_config('rigl', 0.9, start_fraction=1.0, end_fraction=1.0),
    'rigl, mask update every step': make_config(
      'rigl', 0.9, update_every=1, start_fraction=0.0, end_fraction=1.0
    ),
  }
  fns = {}
  for name, config in variants.items():
    run, it = train.init_run(config)
    fns[name] = benchmark.run_step_fn(run, next(it))
  return benchmark.median_times(
    benchmark.interleaved_times(fns, rounds=rounds, steps_per_round=steps)
  )
