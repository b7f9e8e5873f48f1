"""One comparison table: dense, DemP, the structured baselines and NEq, same recipe.

:func:`run_methods` trains each method with one config function, in order:
dense and DemP first, then the structured baselines with ``target_kind =
'weights'`` and ``target_sparsity`` = DemP's final weight sparsity (so every
pruned row sits at about the same weight sparsity), then NEq. :func:`table`
formats the summaries as one Markdown table. ``scripts/compare.py`` is the
command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from demp import train

STRUCTURED = ('snap', 'crop_s', 'early_snap', 'early_crop_s')
METHODS = ('dense', 'demp') + STRUCTURED + ('neq', 'neq_stochastic')


def run_methods(make_config: Callable[[str], ml_collections.ConfigDict], methods: Sequence[str],
                workdir: str, *, match_weight_sparsity: bool = True) -> dict[str, dict[str, Any]]:
  """Trains every method (``make_config(method)``); returns method -> run summary."""
  unknown = set(methods) - set(train.all_methods())
  if unknown:
    raise ValueError(f'--methods: {sorted(unknown)} are not methods; known: {sorted(train.all_methods())}.')
  order = sorted(methods, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
  summaries: dict[str, dict[str, Any]] = {}
  for method in order:
    config = make_config(method)
    if match_weight_sparsity and method in STRUCTURED and 'demp' in summaries:
      config.baselines.target_kind = 'weights'
      config.baselines.target_sparsity = round(float(summaries['demp']['weight_sparsity']), 4)
    summaries[method] = train.train_and_evaluate(config, os.path.join(workdir, method))
  return summaries


def _widths(summary) -> str:
  return '-'.join(str(w) for w in summary['widths'].values())


def table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """A Markdown table; times and FLOPs relative to the dense row when there is one."""
  dense = summaries.get('dense')
  lines = ['| method | test acc | neuron sparsity | weight sparsity | widths | wall [s] | '
           'wall vs dense | train FLOPs vs dense | inference FLOPs vs dense | '
           'units frozen (mean) | bprop FLOPs saved |',
           '|---|---|---|---|---|---|---|---|---|---|---|']
  for method, s in summaries.items():
    stats = s.get('method_stats', {})
    wall_rel = f'{s["wall_time_s"] / dense["wall_time_s"]:.2f}x' if dense else '-'
    frozen = f'{stats["frozen_fraction_mean"]:.3f}' if 'frozen_fraction_mean' in stats else '-'
    saved = f'{stats["bprop_flops_saved_frac"]:.3f}' if 'bprop_flops_saved_frac' in stats else '-'
    lines.append(
        f'| {method} | {s["test_accuracy"]:.4f} | {s["neuron_sparsity"]:.3f} | '
        f'{s["weight_sparsity"]:.3f} | {_widths(s)} | {s["wall_time_s"]:.0f} | {wall_rel} | '
        f'{s.get("train_flops_rel", float("nan")):.2f}x | '
        f'{s.get("inference_flops_rel", float("nan")):.2f}x | {frozen} | {saved} |')
  return '\n'.join(lines)


def notes(summaries: Mapping[str, Mapping[str, Any]]) -> str:
  """When each pruning method pruned, and what the early trigger saw."""
  lines = []
  for method, s in summaries.items():
    stats = s.get('method_stats', {})
    if 'prune_step' in stats:
      extra = f', trigger={stats["trigger"]} at epoch {stats["prune_epoch"]}' if 'trigger' in stats else ''
      lines.append(f'- {method}: pruned at step {stats["prune_step"]} to {stats["target_kind"]} '
                   f'sparsity {stats["target_sparsity"]:.4f}{extra}')
    elif method == 'demp':
      lines.append(f'- demp: {s["prune_events_effective"]} of {s["prune_events"]} death checks removed units')
  return '\n'.join(lines)
