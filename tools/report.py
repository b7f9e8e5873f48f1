"""Results of many runs -> the paper's tables (Table 1/2 format), Markdown and CSV.

A *run* is a directory with the trainer's ``summary.json`` and ``config.json``.
Runs are grouped by method and by every config key that varies among that
method's runs, except the seed (and bookkeeping keys, :data:`IGNORED_KEYS`):
a group is one setting, its runs are seeds. For each method and each target
weight sparsity the table shows the group whose mean weight sparsity is
closest to the target, as the paper does ("we report the closest numbers
obtained to these target values").

Columns, each over a group's seeds: test accuracy (mean % ± sample std),
neuron sparsity, weight sparsity, training time (mean wall-clock time relative
to the dense runs' mean), training FLOPs and inference FLOPs relative to dense
(from XLA's cost analysis, see :mod:`demp.flops`; the dense row shows the
absolute numbers in parentheses).

Example::

    runs = load_runs('/tmp/sweep')
    rows = table_rows(runs, targets=[0.8, 0.9])
    print(to_markdown(rows))
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# Keys that never define a group (bookkeeping, not the experiment).
IGNORED_KEYS = (
  'seed',
  'progress_bar',
  'log_every',
  'eval_every',
  'eval_batch_size',
  'checkpoint.',
  'data.path',
  'data.data_dir',
)

# How the table names a method (unknown methods keep their key).
DISPLAY_NAMES: dict[str, str] = {
  'dense': 'Dense',
  'demp': 'DemP',
  'snap': 'SNAP',
  'crop_s': 'CroP-it-S',
  'early_snap': 'EarlySNAP',
  'early_crop_s': 'EarlyCroP-S',
  'neq': 'NEq',
  'neq_stochastic': 'NEq-stochastic',
  'magnitude': 'Magnitude',
  'saliency': 'Saliency',
  'set': 'SET',
  'rigl': 'RigL',
}

# Table order: dense first, DemP last, the rest alphabetically in between.
_FIRST, _LAST = ('dense',), ('demp',)


class RunResult(NamedTuple):
  """One finished run: where it is, its flattened config, its summary."""

  path: str
  config: dict[str, Any]
  summary: dict[str, Any]

  @property
  def method(self) -> str:
    return str(self.config.get('method', self.summary.get('method', '?')))


class Group(NamedTuple):
  """Runs of one method and setting (its seeds)."""

  method: str
  setting: tuple[tuple[str, Any], ...]  # the varying keys and their values
  runs: tuple[RunResult, ...]

  @property
  def label(self) -> str:
    name = DISPLAY_NAMES.get(self.method, self.method)
    if not self.setting:
      return name
    keys = short_keys([k for k, _ in self.setting])
    return f'{name} ({", ".join(f"{keys[k]}={_fmt_value(v)}" for k, v in self.setting)})'

  def mean(self, key: str) -> float:
    return float(np.mean([_num(r.summary.get(key)) for r in self.runs]))

  def std(self, key: str) -> float:
    vals = [_num(r.summary.get(key)) for r in self.runs]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else float('nan')


def short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Each dotted key's shortest suffix that no other key shares (``demp.peak_lambda`` -> ``peak_lambda``)."""
  out = {}
  for key in keys:
    parts = key.split('.')
    for n in range(1, len(parts) + 1):
      suffix = '.'.join(parts[-n:])
      if not any(o != key and (o == suffix or o.endswith('.' + suffix)) for o in keys):
        break
    out[key] = suffix
  return out


def _num(x) -> float:
  return float('nan') if x is None else float(x)


def _fmt_value(v) -> str:
  return f'{v:g}' if isinstance(v, float) else str(v)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'a': {'b': 1}}`` -> ``{'a.b': 1}`` (lists become tuples, so they hash)."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = tuple(v) if isinstance(v, list) else v
  return out


def load_runs(roots: str | Sequence[str]) -> list[RunResult]:
  """Every run below ``roots`` (directories with a ``summary.json``), sorted by path."""
  roots = [roots] if isinstance(roots, str) else list(roots)
  runs = []
  for dirpath, dirnames, filenames in (w for root in roots for w in os.walk(root)):
    dirnames[:] = sorted(d for d in dirnames if d != 'checkpoints')
    if 'summary.json' not in filenames:
      continue
    with open(os.path.join(dirpath, 'summary.json')) as f:
      summary = json.load(f)
    config = {}
    if os.path.exists(os.path.join(dirpath, 'config.json')):
      with open(os.path.join(dirpath, 'config.json')) as f:
        # A key the run's code did not have yet takes its default, as on resume.
        config = {**_defaults(), **flatten(json.load(f))}
    runs.append(RunResult(dirpath, config, summary))
  if not runs:
    raise ValueError(f'no runs (directories with summary.json) under {roots!r}.')
  return sorted(runs, key=lambda r: r.path)


@functools.cache
def _defaults() -> dict[str, Any]:
  from demp.trainer import config as config_lib  # pylint: disable=g-import-not-at-top

  return flatten(json.loads(config_lib.base_config().to_json_best_effort()))


def _ignored(key: str) -> bool:
  return any(key == k or (k.endswith('.') and key.startswith(k)) for k in IGNORED_KEYS)


def varying_keys(runs: Sequence[RunResult]) -> list[str]:
  """Config keys whose value differs between ``runs`` (ignored keys left out), sorted."""
  keys = sorted({k for r in runs for k in r.config})
  return [k for k in keys if not _ignored(k) and len({repr(r.config.get(k)) for r in runs}) > 1]


def group_runs(runs: Sequence[RunResult]) -> list[Group]:
  """Groups by method, then by the keys varying among that method's runs."""
  by_method: dict[str, list[RunResult]] = {}
  for r in runs:
    by_method.setdefault(r.method, []).append(r)
  groups = []
  for method in _method_order(by_method):
    method_runs = by_method[method]
    keys = varying_keys(method_runs)
    settings: dict[tuple, list[RunResult]] = {}
    for r in method_runs:
      settings.setdefault(tuple((k, r.config.get(k)) for k in keys), []).append(r)
    for setting in sorted(settings, key=repr):
      groups.append(Group(method, setting, tuple(settings[setting])))
  return groups


def _method_order(methods: Iterable[str]) -> list[str]:
  methods = list(methods)
  first = [m for m in _FIRST if m in methods]
  last = [m for m in _LAST if m in methods]
  return first + sorted(m for m in methods if m not in first + last) + last


class Row(NamedTuple):
  """One line of the table (numbers as fractions and ratios; NaN = not available)."""

  method: str
  label: str
  target: float  # target weight sparsity (NaN for the dense row / all groups)
  seeds: int
  accuracy: float
  accuracy_std: float
  neuron_sparsity: float
  weight_sparsity: float
  time_rel: float
  train_flops_rel: float
  inference_flops_rel: float
  wall_time_s: float
  train_flops: float
  inference_flops: float
  step_time_rel: float  # Σ train-step seconds (no compile, checks, eval) vs dense


def step_seconds(run: RunResult) -> float:
  """Seconds spent in train steps (the summary's segments), without compiles and checks."""
  segments = run.summary.get('segments')
  return float(sum(s['seconds'] for s in segments)) if segments else float('nan')


def _row(group: Group, target: float, dense_wall: float, dense_steps: float) -> Row:
  wall = group.mean('wall_time_s')
  return Row(
    method=group.method,
    label=group.label,
    target=target,
    seeds=len(group.runs),
    accuracy=group.mean('test_accuracy'),
    accuracy_std=group.std('test_accuracy'),
    neuron_sparsity=group.mean('neuron_sparsity'),
    weight_sparsity=group.mean('weight_sparsity'),
    time_rel=wall / dense_wall if dense_wall else float('nan'),
    train_flops_rel=group.mean('train_flops_rel'),
    inference_flops_rel=group.mean('inference_flops_rel'),
    wall_time_s=wall,
    train_flops=group.mean('train_flops'),
    inference_flops=group.mean('inference_flops'),
    step_time_rel=float(np.mean([step_seconds(r) for r in group.runs])) / dense_steps
    if dense_steps
    else float('nan'),
  )


def closest(groups: Sequence[Group], target: float) -> Group:
  """The group whose mean weight sparsity is closest to ``target`` (ties: the first)."""
  return min(groups, key=lambda g: abs(g.mean('weight_sparsity') - target))


def table_rows(
  runs: Sequence[RunResult], targets: Sequence[float] = (0.8,), *, all_groups: bool = False
) -> list[Row]:
  """The table: dense first, then per method and target the closest group.

  ``all_groups`` lists every group instead (target NaN). Training time is
  relative to the mean wall time of all dense runs (NaN when there are none).
  """
  for t in targets:
    if not 0 <= t <= 1:
      raise ValueError(f'target weight sparsity {t!r} must be in [0, 1].')
  groups = group_runs(runs)
  dense_runs = [r for r in runs if r.method == 'dense']
  dense_wall = (
    float(np.mean([r.summary['wall_time_s'] for r in dense_runs])) if dense_runs else float('nan')
  )
  dense_steps = (
    float(np.mean([step_seconds(r) for r in dense_runs])) if dense_runs else float('nan')
  )
  rows = []
  for method in _method_order(dict.fromkeys(g.method for g in groups)):
    mine = [g for g in groups if g.method == method]
    if all_groups or method == 'dense':
      rows += [_row(g, float('nan'), dense_wall, dense_steps) for g in mine]
    else:
      rows += [_row(closest(mine, t), t, dense_wall, dense_steps) for t in targets]
  return rows


# ----------------------------------------------------------------------------
# Formatting.


def _pct(x: float, digits: int = 1) -> str:
  return 'n/a' if math.isnan(x) else f'{100 * x:.{digits}f}%'


def _ratio(x: float) -> str:
  return 'n/a' if math.isnan(x) else f'{x:.2f}×'


def _accuracy(row: Row) -> str:
  if math.isnan(row.accuracy):
    return 'n/a'
  std = '' if math.isnan(row.accuracy_std) else f' ± {100 * row.accuracy_std:.2f}'
  return f'{100 * row.accuracy:.2f}%{std}'


HEADER = (
  'Method',
  'Target WS',
  'Test accuracy',
  'Neuron sparsity',
  'Weight sparsity',
  'Training time',
  'Training FLOPs',
  'Inference FLOPs',
  'Seeds',
)


def format_row(row: Row) -> tuple[str, ...]:
  """The Markdown cells of a row; the dense row shows absolute FLOPs and '-' sparsities."""
  dense = row.method == 'dense'
  return (
    row.label,
    '-' if math.isnan(row.target) else _pct(row.target, 0),
    _accuracy(row),
    '-' if dense else _pct(row.neuron_sparsity),
    '-' if dense else _pct(row.weight_sparsity),
    _ratio(row.time_rel),
    _ratio(row.train_flops_rel) + (f' ({row.train_flops:.2e})' if dense else ''),
    _ratio(row.inference_flops_rel) + (f' ({row.inference_flops:.2e})' if dense else ''),
    str(row.seeds),
  )


def to_markdown(rows: Sequence[Row]) -> str:
  lines = ['| ' + ' | '.join(HEADER) + ' |', '|' + '|'.join('---' for _ in HEADER) + '|']
  lines += ['| ' + ' | '.join(format_row(r)) + ' |' for r in rows]
  return '\n'.join(lines) + '\n'


def to_csv(rows: Sequence[Row]) -> str:
  """Every field of every row, unformatted (fractions, ratios, seconds, FLOPs).

  Beyond the Markdown: ``step_time_rel``, the time in train steps alone relative
  to dense (the wall-clock ratio also pays compiles, death checks and evaluation).
  """
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator='\n')
  writer.writerow(Row._fields)
  for r in rows:
    writer.writerow([f'{v:.6g}' if isinstance(v, float) else v for v in r])
  return buf.getvalue()


def write_report(
  runs_dir: str | Sequence[str],
  out_prefix: str,
  targets: Sequence[float] = (0.8,),
  *,
  all_groups: bool = False,
) -> str:
  """Writes ``<out_prefix>.md`` and ``<out_prefix>.csv``; returns the Markdown."""
  rows = table_rows(load_runs(runs_dir), targets, all_groups=all_groups)
  markdown = to_markdown(rows)
  os.makedirs(os.path.dirname(out_prefix) or '.', exist_ok=True)
  with open(out_prefix + '.md', 'w') as f:
    f.write(markdown)
  with open(out_prefix + '.csv', 'w') as f:
    f.write(to_csv(rows))
  return markdown
