"""A run's accounting and logs: FLOPs over the run, dead sets, the JSONL writer, the end-of-run table."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

PyTree = Any


def dead_set(
  alive: Mapping[str, np.ndarray],
  unit_ids: Mapping[str, np.ndarray],
  dense_widths: Mapping[str, int],
) -> frozenset[tuple[str, int]]:
  """Dead units as ``(group, original index)`` pairs, including those already removed.

  ``alive[g]`` is over the units present now; ``unit_ids[g]`` holds their
  indices in the dense model (missing = none removed yet). A removed unit was
  dead when it went and cannot revive, so it counts as dead.
  """
  dead = set()
  for name, alive_u in alive.items():
    ids = np.asarray(unit_ids.get(name, np.arange(np.size(alive_u))))
    gone = set(range(int(dense_widths[name]))) - set(ids.tolist())
    dead |= {(name, int(i)) for i in ids[~np.asarray(alive_u, bool)]} | {(name, i) for i in gone}
  return frozenset(dead)


def overlap_ratio(x: frozenset | set | None, y: frozenset | set) -> float | None:
  """``|X∩Y| / min(|X|, |Y|)`` (paper appendix C); None when either set is empty."""
  if not x or not y:
    return None
  return len(x & y) / min(len(x), len(y))


class JsonlWriter:
  """Appends one JSON object per line (numbers converted to Python floats/ints)."""

  def __init__(self, path: str):
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    self._f = open(path, 'a')

  def write(self, record: Mapping[str, Any]) -> None:
    self._f.write(json.dumps(_to_json(record)) + '\n')
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def _to_json(x):
  if isinstance(x, Mapping):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  if isinstance(x, np.generic):
    return x.item()
  return x


def read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_table(rows: list[tuple[str, str]], title: str = '') -> str:
  """A two-column Markdown table."""
  width = max(len(k) for k, _ in rows)
  lines = [f'## {title}', ''] if title else []
  lines += [f'| {"metric":<{width}} | value |', f'|{"-" * (width + 2)}|-------|']
  lines += [f'| {k:<{width}} | {v} |' for k, v in rows]
  return '\n'.join(lines)


def summary_table(summary: Mapping[str, Any]) -> str:
  """The end-of-run table printed on stdout."""
  live = ', '.join(f'{k}={v}' for k, v in summary['widths'].items())
  dense = ', '.join(f'{v}' for v in summary['dense_widths'].values())
  rows = [
    ('method', summary['method']),
    ('steps', str(summary['steps'])),
    ('test accuracy', f'{summary["test_accuracy"]:.4f}'),
    ('test loss', f'{summary["test_loss"]:.4f}'),
    ('neuron sparsity', f'{summary["neuron_sparsity"]:.4f}'),
    ('weight sparsity', f'{summary["weight_sparsity"]:.4f}'),
    ('live units per group', live),
    ('dense widths', dense),
    ('parameters (dense -> final)', f'{summary["dense_params"]} -> {summary["final_params"]}'),
    (
      'prune events (that removed units)',
      f'{summary["prune_events"]} ({summary["prune_events_effective"]})',
    ),
    ('wall time [s]', f'{summary["wall_time_s"]:.1f}'),
    (
      'prune-event stall [s] (share of wall, max steps)',
      f'{summary.get("prune_overhead_s", 0.0):.2f} '
      f'({summary.get("prune_overhead_share", 0.0):.1%}, '
      f'{summary.get("prune_stall_max_steps", 0.0):.1f})',
    ),
    ('train-step time, first arch [ms]', f'{1e3 * summary["step_time_first_s"]:.2f}'),
    ('train-step time, final arch [ms]', f'{1e3 * summary["step_time_final_s"]:.2f}'),
    ('train-step time ratio final/first', f'{summary["step_time_ratio"]:.3f}'),
    ('train-step FLOP ratio final/first', f'{summary["step_flops_ratio"]:.3f}'),
    ('training FLOPs relative to dense', f'{summary["train_flops_rel"]:.3f}'),
    (
      'inference FLOPs relative to dense',
      f'{summary.get("inference_flops_rel", float("nan")):.3f}',
    ),
  ]
  return format_table(rows, title='DemP run summary')
