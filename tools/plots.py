"""The paper's figures from a directory of runs (matplotlib; PNG and PDF).

Every function takes runs (:func:`tools.report.load_runs`) and an output path
without extension, writes ``path.png`` and ``path.pdf``, and returns the
figure. Seeds of one setting (a :class:`tools.report.Group`) are averaged;
error bars and bands are ± one sample std over seeds.

* :func:`tradeoff` -- test accuracy vs neuron sparsity and vs weight sparsity,
  one colour per method (Fig. 3) or per value of any config key: the schedule
  (Fig. 4), ``prune.dynamic`` (Fig. 7), ``demp.noise_symmetric`` (Fig. 13).
* :func:`dead_over_steps` -- dead-unit ratio (or count) at each death check
  (Figs. 1, 9, 12).
* :func:`live_per_group` -- live units of each unit group (layer) over steps.
* :func:`final_vs` -- a final quantity (dead ratio, neuron sparsity,
  accuracy) against a config value, one line per value of another key
  (Fig. 2: peak λ by noise variance; Fig. 10: learning rate, batch size;
  Fig. 11: Adam ε by learning rate).
* :func:`overlap_over_steps` -- the dead-set overlap ratio between
  consecutive checks (Fig. 8).
* :func:`target_over_steps` -- target vs reached sparsity and the gain at each
  check, for runs that steer λ to a target (``demp.target``).

Dead units come from the trainer's prune events (``live`` per group at each
check), so they exist for ``demp`` runs and for any run with
``prune.dynamic=False`` checks (dead units over time without pruning).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from tools import report  # pylint: disable=g-import-not-at-top,wrong-import-position

RunResult = report.RunResult


# ----------------------------------------------------------------------------
# Quantities of one run.


def check_events(run: RunResult) -> list[dict]:
  """The prune events that carry a death check (``live`` per group), in step order."""
  return sorted(
    (e for e in run.summary.get('events', []) if e.get('live')), key=lambda e: e['step']
  )


def dead_curve(run: RunResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(steps, dead ratio, dead count)`` at each death check, relative to the dense widths.

  A removed unit counts as dead (it was dead when it went).
  """
  dense = sum(run.summary['dense_widths'].values())
  events = check_events(run)
  steps = np.array([e['step'] for e in events], np.int64)
  dead = np.array([dense - sum(e['live'].values()) for e in events], np.float64)
  return steps, dead / dense, dead


def live_curves(run: RunResult) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(steps, {group: live units})`` at each death check."""
  events = check_events(run)
  steps = np.array([e['step'] for e in events], np.int64)
  names = list(run.summary['dense_widths'])
  return steps, {n: np.array([e['live'].get(n, np.nan) for e in events], np.float64) for n in names}


def overlap_curve(run: RunResult) -> tuple[np.ndarray, np.ndarray]:
  """``(steps, |X∩Y|/min(|X|,|Y|))`` between consecutive checks (NaN where undefined)."""
  events = [e for e in check_events(run) if 'dead_overlap' in e]
  steps = np.array([e['step'] for e in events], np.int64)
  vals = np.array([np.nan if e['dead_overlap'] is None else e['dead_overlap'] for e in events])
  return steps, vals


def final_dead_ratio(run: RunResult) -> float:
  """Dead ratio at the last check; the neuron sparsity when the run has no checks."""
  _, ratio, _ = dead_curve(run)
  return float(ratio[-1]) if ratio.size else float(run.summary.get('neuron_sparsity', np.nan))


# What ``final_vs`` can put on its y axis.
FINAL_METRICS: dict[str, Callable[[RunResult], float]] = {
  'dead_ratio': final_dead_ratio,
  'neuron_sparsity': lambda r: float(r.summary['neuron_sparsity']),
  'weight_sparsity': lambda r: float(r.summary['weight_sparsity']),
  'test_accuracy': lambda r: float(r.summary['test_accuracy']),
  'live_ratio': lambda r: 1.0 - final_dead_ratio(r),
}

_LABELS = {
  'dead_ratio': 'Dead units ratio',
  'neuron_sparsity': 'Neuron sparsity',
  'weight_sparsity': 'Weight sparsity',
  'test_accuracy': 'Test accuracy',
  'live_ratio': 'Live units ratio',
}


# Keys computed from a run's config, for ``--by`` / ``--where`` where no one config key says it.
DERIVED: dict[str, Callable[[RunResult], Any]] = {
  # DemP steered to a target (demp.target), against fixed λ: one series each.
  'steered': lambda r: float(r.config.get('demp.target_sparsity', 0.0)) > 0,
}


def value(run: RunResult, key: str) -> Any:
  """A config value of a run (``method``, ``demp.peak_lambda``...), a summary field, or
  a key of :data:`DERIVED` (``steered``)."""
  if key in run.config:
    return run.config[key]
  if key in run.summary:
    return run.summary[key]
  if key in DERIVED:
    return DERIVED[key](run)
  raise KeyError(
    f'{key!r} is neither a config key, a summary field of {run.path} nor one of {sorted(DERIVED)}.'
  )


def select(
  runs: Sequence[RunResult], where: dict[str, str], exclude: dict[str, str] | None = None
) -> list[RunResult]:
  """Runs whose config values equal ``where``'s and match none of ``exclude``'s.

  Values are compared as strings (``method=demp``); ``a|b`` matches either. A run is
  dropped if any one ``exclude`` pair matches it, and a key a run does not have never
  matches an ``exclude`` pair (so ``demp.penalty=l2`` drops no baseline run).
  """

  def matches(r, k, text):
    return any(_same(value(r, k), t) for t in text.split('|'))

  def excluded(r, k, text):
    try:
      return matches(r, k, text)
    except KeyError:
      return False

  def ok(r):
    return all(matches(r, k, v) for k, v in where.items()) and not any(
      excluded(r, k, v) for k, v in (exclude or {}).items()
    )

  out = [r for r in runs if ok(r)]
  if not out:
    raise ValueError(f'no run matches {where}' + (f' outside {exclude}.' if exclude else '.'))
  return out


def _same(v, text: str) -> bool:
  if isinstance(v, bool) or v is None:
    return str(v).lower() == text.lower()
  if isinstance(v, (int, float)):
    try:
      return float(v) == float(text)
    except ValueError:
      return False
  return str(v) == text


# ----------------------------------------------------------------------------
# Figures.


def save(fig, path: str) -> list[str]:
  """Writes ``path.png`` and ``path.pdf``; returns both paths."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  out = []
  for ext in ('png', 'pdf'):
    fig.savefig(f'{path}.{ext}', dpi=150, bbox_inches='tight')
    out.append(f'{path}.{ext}')
  return out


def _mean_std(vals: Sequence[float]) -> tuple[float, float]:
  vals = np.asarray(vals, np.float64)
  return float(np.mean(vals)), float(np.std(vals, ddof=1)) if vals.size > 1 else 0.0


def _fmt(v) -> str:
  return f'{v:g}' if isinstance(v, float) else str(v)


def _colors(keys: Sequence[Any]) -> dict[Any, Any]:
  cmap = plt.get_cmap('tab10')
  return {k: cmap(i % 10) for i, k in enumerate(keys)}


def _series_labels(keys: Sequence[tuple[str, ...]], by: Sequence[str]) -> dict[tuple, str]:
  """A legend label per series: the method's name, then the keys that vary among its series.

  Without ``method`` among ``by`` every key is shown as ``key=value``.
  """
  if by[0] != 'method':
    return {k: ', '.join(f'{b}={v}' for b, v in zip(by, k)) for k in keys}
  out = {}
  for key in keys:
    peers = [k for k in keys if k[0] == key[0]]
    varying = [i for i in range(1, len(by)) if len({k[i] for k in peers}) > 1]
    name = report.DISPLAY_NAMES.get(key[0], key[0])
    extra = ', '.join(_flag(by[i].rsplit('.', 1)[-1], key[i]) for i in varying if key[i] != 'False')
    out[key] = f'{name} ({extra})' if extra else name
  return out


def _flag(key: str, text: str) -> str:
  return key if text == 'True' else f'{key}={text}'


def tradeoff(
  runs: Sequence[RunResult],
  path: str,
  *,
  color_by: str = 'method',
  xs: Sequence[str] = ('neuron_sparsity', 'weight_sparsity'),
  title: str = '',
):
  """Test accuracy vs sparsity, one point per setting, a line per ``color_by`` value.

  ``color_by`` may name several keys, comma-separated (``method,demp.penalty_coupling``):
  a line per combination, labelled by the method and the keys that vary among its lines.
  Dense runs are a horizontal line with a ± std band (they have no sparsity).
  """
  groups = report.group_runs(runs)
  dense = [r for r in runs if r.method == 'dense']
  others = [g for g in groups if g.method != 'dense']
  by = [k.strip() for k in color_by.split(',')]
  series = [tuple(_fmt(value(g.runs[0], k)) for k in by) for g in others]
  keys = list(dict.fromkeys(series))
  labels = _series_labels(keys, by)
  colors = _colors(keys)
  fig, axes = plt.subplots(1, len(xs), figsize=(5 * len(xs), 4), squeeze=False)
  for ax, x in zip(axes[0], xs):
    if dense:
      m, s = _mean_std([r.summary['test_accuracy'] for r in dense])
      ax.axhline(
        m, color='k', ls='--', lw=1, label=f'dense ({len(dense)} run{"s" * (len(dense) > 1)})'
      )
      ax.axhspan(m - s, m + s, color='k', alpha=0.1)
    for key in keys:
      mine = [g for g, k in zip(others, series) if k == key]
      pts = []
      for g in mine:
        xm, xsd = _mean_std([100 * r.summary[x] for r in g.runs])
        ym, ysd = _mean_std([r.summary['test_accuracy'] for r in g.runs])
        pts.append((xm, ym))
        ax.errorbar(xm, ym, xerr=xsd, yerr=ysd, fmt='o', color=colors[key], capsize=3)
        for r in g.runs:  # each seed, faint
          ax.plot(
            100 * r.summary[x], r.summary['test_accuracy'], '.', color=colors[key], alpha=0.35
          )
      pts.sort()
      ax.plot([p[0] for p in pts], [p[1] for p in pts], '-', color=colors[key], label=labels[key])
    ax.set_xlabel(f'{_LABELS.get(x, x)} (%)')
    ax.set_ylabel('Test accuracy')
    ax.grid(alpha=0.3)
  handles, names = axes[0][-1].get_legend_handles_labels()
  if len(names) > 7 or max(map(len, names), default=0) > 32:  # below the axes, off the data
    fig.legend(handles, names, fontsize=8, loc='lower center', ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(names) + 1) // 2), 1, 1))
  else:
    axes[0][-1].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  save(fig, path)
  return fig


def _group_curves(group: report.Group, fn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Mean and std over seeds of a per-check curve, on the steps all seeds share."""
  curves = [fn(r) for r in group.runs]
  common = set(curves[0][0].tolist())
  for steps, _ in curves[1:]:
    common &= set(steps.tolist())
  steps = np.array(sorted(common), np.int64)
  ys = np.array([[dict(zip(s.tolist(), y))[t] for t in steps] for s, y in curves], np.float64)
  std = ys.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
  return steps, ys.mean(axis=0), std


def _curve_figure(groups, fn, ylabel: str, path: str, title: str, logy: bool = False):
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = _colors([g.label for g in groups])
  for g in groups:
    steps, mean, std = _group_curves(g, fn)
    if not steps.size:
      continue
    ax.plot(steps, mean, '-o', ms=3, color=colors[g.label], label=f'{g.label} ({len(g.runs)})')
    ax.fill_between(steps, mean - std, mean + std, color=colors[g.label], alpha=0.15)
  ax.set_xlabel('Training step')
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale('symlog', linthresh=1 if 'ratio' not in ylabel else 1e-2)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0))
  if title:
    ax.set_title(title)
  save(fig, path)
  return fig


def _with_checks(runs: Sequence[RunResult]) -> list[report.Group]:
  groups = [g for g in report.group_runs(runs) if all(check_events(r) for r in g.runs)]
  if not groups:
    raise ValueError('no run has death checks (prune events with live units).')
  return groups


def dead_over_steps(
  runs: Sequence[RunResult], path: str, *, count: bool = False, logy: bool = False, title: str = ''
):
  """Dead-unit ratio (or count) at each death check, one line per setting (Figs. 1, 9, 12)."""
  idx = 2 if count else 1
  return _curve_figure(
    _with_checks(runs),
    lambda r: (dead_curve(r)[0], dead_curve(r)[idx]),
    'Dead units' if count else 'Dead units ratio',
    path,
    title,
    logy,
  )


def overlap_over_steps(runs: Sequence[RunResult], path: str, *, title: str = ''):
  """|X∩Y|/min(|X|,|Y|) of the dead sets of consecutive checks (Fig. 8)."""
  return _curve_figure(_with_checks(runs), overlap_curve, 'Dead-set overlap ratio', path, title)


def live_per_group(runs: Sequence[RunResult], path: str, *, max_panels: int = 6, title: str = ''):
  """Live units of every unit group over steps, one panel per setting (mean over seeds)."""
  groups = _with_checks(runs)[:max_panels]
  fig, axes = plt.subplots(1, len(groups), figsize=(4.5 * len(groups), 3.6), squeeze=False)
  for ax, g in zip(axes[0], groups):
    names = list(g.runs[0].summary['dense_widths'])
    colors = _colors(names)
    for n in names:
      steps, mean, std = _group_curves(g, lambda r, n=n: (live_curves(r)[0], live_curves(r)[1][n]))
      ax.plot(
        steps,
        mean,
        '-o',
        ms=3,
        color=colors[n],
        label=f'{n} ({g.runs[0].summary["dense_widths"][n]})',
      )
      ax.fill_between(steps, mean - std, mean + std, color=colors[n], alpha=0.15)
    ax.set_title(g.label, fontsize=8)
    ax.set_xlabel('Training step')
    ax.set_yscale('log', base=2)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel('Live units')
  axes[0][-1].legend(fontsize=7, title='group (dense width)', title_fontsize=7, loc='lower left')
  if title:
    fig.suptitle(title)
  save(fig, path)
  return fig


def final_vs(
  runs: Sequence[RunResult],
  path: str,
  *,
  x: str,
  y: str = 'dead_ratio',
  by: str | None = None,
  logx: bool = False,
  title: str = '',
):
  """A final quantity against a config value, mean ± std over seeds, a line per ``by`` value.

  A list-valued ``x`` (``model.widths``) is plotted by its first entry, the
  first layer's width, as in the paper's Fig. 10.
  """
  if y not in FINAL_METRICS:
    raise ValueError(f'y={y!r} is not one of {sorted(FINAL_METRICS)}.')
  lines: dict[str, dict[float, list[float]]] = {}
  for r in runs:
    line = _fmt(value(r, by)) if by else ''
    xv = value(r, x)
    xv = xv[0] if isinstance(xv, (list, tuple)) else xv  # widths: the first layer's (Fig. 10)
    lines.setdefault(line, {}).setdefault(float(xv), []).append(FINAL_METRICS[y](r))
  colors = _colors(list(lines))
  fig, ax = plt.subplots(figsize=(6, 4))
  for line, pts in lines.items():
    xs = sorted(pts)
    stats = [_mean_std(pts[v]) for v in xs]
    ax.errorbar(
      xs,
      [m for m, _ in stats],
      yerr=[s for _, s in stats],
      fmt='-o',
      capsize=3,
      color=colors[line],
      label=f'{by}={line}' if by else None,
    )
  if logx:
    ax.set_xscale('log')
  ax.set_xlabel(x)
  ax.set_ylabel(_LABELS.get(y, y))
  ax.grid(alpha=0.3)
  if by:
    ax.legend(fontsize=8)
  if title:
    ax.set_title(title)
  save(fig, path)
  return fig


def _target_label(run: RunResult) -> str:
  """``'weights 0.7, seed 1 -> 0.700'``: what was asked and what was reached."""
  stats = run.summary['method_stats']
  seed = run.config.get('seed')
  return (
    f'{stats["target_kind"]} {stats["target_sparsity"]:g}'
    + (f', seed {seed}' if seed is not None else '')
    + f' -> {stats["target_reached_sparsity"]:.3f}'
  )


def target_over_steps(runs: Sequence[RunResult], path: str, *, title: str = ''):
  """Target vs reached sparsity at each death check, and the controller's gain (``demp.target``).

  One colour per target, one marker per run of it (its seeds), for the runs that steered
  (``demp.target_sparsity > 0``): the trajectory dashed, the measured sparsity solid (left),
  the gain after each check (right, log scale).
  """
  runs = [r for r in runs if r.summary.get('method_stats', {}).get('target_history')]
  if not runs:
    raise ValueError('no run with a target (demp.target_sparsity > 0) among the runs given.')
  fig, (ax, ax_gain) = plt.subplots(1, 2, figsize=(10, 3.6))

  def target_of(r):
    return r.summary['method_stats']['target_kind'], r.summary['method_stats']['target_sparsity']

  colors = _colors(sorted({target_of(r) for r in runs}))  # a target's seeds share a colour
  seen: dict[tuple, int] = {}
  for r in runs:
    hist = r.summary['method_stats']['target_history']
    steps = [h['step'] for h in hist]
    key = target_of(r)
    color = colors[key]
    seen[key] = n = seen.get(key, -1) + 1  # this run's index among its target's runs
    style = dict(ms=3, marker='os^vD'[n % 5], color=color)
    ax.plot(steps, [h['target_now'] for h in hist], '--', color=color)
    ax.plot(steps, [h['measured_sparsity'] for h in hist], '-', label=_target_label(r), **style)
    ax_gain.plot(steps, [max(h['gain'], 1e-6) for h in hist], '-', **style)
  ax.set_xlabel('Training step')
  ax.set_ylabel('Sparsity (dashed: target trajectory)')
  ax.grid(alpha=0.3)
  if len(runs) > 4:  # below the axes, off the curves
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, fontsize=8, loc='lower center', ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.05 * ((len(runs) + 2) // 3), 1, 0.94 if title else 1))
  else:
    ax.legend(fontsize=7)
  ax_gain.set_xlabel('Training step')
  ax_gain.set_ylabel('Gain (λ_t = shape(t) × gain)')
  ax_gain.set_yscale('log')
  ax_gain.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  save(fig, path)
  return fig


FIGURES: dict[str, Callable[..., Any]] = {
  'tradeoff': tradeoff,
  'dead': dead_over_steps,
  'live': live_per_group,
  'final_vs': final_vs,
  'overlap': overlap_over_steps,
  'target': target_over_steps,
}
