"""Revival-aware pruning: when may a unit group start losing its dead units?

In a ViT's last MLP block most units die early in training and then revive
(paper §4.3, appendix G.2, Fig. 17); pruning them when they first look dead
would remove units the network later uses. So a group's pruning *starts*
only once its live count has stopped rising, or at a step the config gives.

Everything here is a pure function of the live-count histories the periodic
death checks produce (``[(step, live), ...]`` per group), so a decision can be
recomputed from the logged prune events at any time and the trainer keeps no
extra state:

    history = live_history(run.events)                 # from the prune events
    started = start_steps(history, patience=3, fixed={'mlp_11': 20_000})
    keeps = hold_unstarted(keeps, started)            # unstarted groups keep all

Rule (:func:`stopped_rising`): with ``patience = p``, a group's pruning
starts at the first check ``j >= p`` whose last ``p`` changes were all
non-rising: ``live[k] <= live[k - 1]`` for ``k = j - p + 1 .. j``. Once
started, it stays started (the first such check is fixed as the history
grows). ``p = 0`` starts every group at its first check (plain DemP).
A count that only falls (ordinary death) is "not rising" too, so such a
group starts after ``p`` checks; a block whose units die and then revive is
caught when its revival shows within ``p`` checks of the fall (checks often
enough, or a larger ``p``), else give it a fixed step
(``prune.start_steps``), which decides alone for the groups it names.

:func:`plot_live_units` draws live units per group over steps from
``metrics.jsonl`` (the trainer logs ``live`` with every death check).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

History = Sequence[tuple[int, int]]  # [(step, live units), ...], in step order


def stopped_rising(live: Sequence[int], patience: int) -> int | None:
  """Index of the first check after which the count had not risen for ``patience`` checks.

  Args:
    live: live-unit counts at consecutive death checks.
    patience: number of consecutive non-rising changes required (>= 0).

  Returns:
    The index ``j`` (into ``live``) of the first check where
    ``live[k] <= live[k - 1]`` for the ``patience`` changes ending at ``j``,
    or None if there is none yet. ``patience = 0`` gives 0 for any non-empty
    history.

  >>> stopped_rising([100, 20, 30, 45, 50, 50, 49, 49], patience=3)
  7
  >>> stopped_rising([100, 20, 30, 45], patience=3) is None
  True
  """
  if isinstance(patience, bool) or not isinstance(patience, (int, np.integer)) or patience < 0:
    raise ValueError(f'patience={patience!r} must be an int >= 0.')
  run = 0  # consecutive non-rising changes ending at j
  for j in range(len(live)):
    if j > 0:
      run = run + 1 if live[j] <= live[j - 1] else 0
    if run >= patience:
      return j
  return None


def start_step(history: History, patience: int, fixed: int | None = None) -> int | None:
  """The step at which a group's pruning starts, or None if it has not started.

  ``fixed`` (a step from the config) decides alone when given: the group starts
  at the first check at or after it. Otherwise the count must have stopped
  rising (:func:`stopped_rising`).
  """
  steps = [int(s) for s, _ in history]
  if fixed is not None:
    return next((s for s in steps if s >= fixed), None)
  j = stopped_rising([int(n) for _, n in history], patience)
  return None if j is None else steps[j]


def start_steps(
  histories: Mapping[str, History], *, patience: int, fixed: Mapping[str, int] | None = None
) -> dict[str, int | None]:
  """:func:`start_step` for every group (``fixed``: group -> step, optional)."""
  fixed = dict(fixed or {})
  unknown = set(fixed) - set(histories)
  if unknown:
    raise ValueError(
      f'prune.start_steps names unknown unit groups {sorted(unknown)}; '
      f'groups are {sorted(histories)}.'
    )
  return {name: start_step(h, patience, fixed.get(name)) for name, h in histories.items()}


def check_groups(fixed: Mapping[str, int], widths: Mapping[str, int]) -> None:
  """Raises ValueError when ``prune.start_steps`` names a group the model lacks."""
  unknown = set(fixed) - set(widths)
  if unknown:
    raise ValueError(
      f'prune.start_steps names unknown unit groups {sorted(unknown)}; '
      f'the model\'s groups are {sorted(widths)}.'
    )


def hold_unstarted(
  keeps: Mapping[str, np.ndarray], started: Mapping[str, int | None]
) -> dict[str, np.ndarray]:
  """Keep-masks where every group whose pruning has not started keeps all its units."""
  return {
    name: (np.asarray(k, bool) if started.get(name) is not None else np.ones(np.shape(k), bool))
    for name, k in keeps.items()
  }


def live_history(events: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[int, int]]]:
  """Per group ``[(step, live), ...]`` from the prune events that carry ``live``."""
  out: dict[str, list[tuple[int, int]]] = {}
  for e in events:
    if e.get('event') != 'prune' or 'live' not in e:
      continue
    for name, n in e['live'].items():
      out.setdefault(name, []).append((int(e['step']), int(n)))
  return out


def with_check(
  histories: Mapping[str, History], step: int, live: Mapping[str, int]
) -> dict[str, list[tuple[int, int]]]:
  """The histories with one more check (``live`` counts at ``step``) appended."""
  out = {name: list(h) for name, h in histories.items()}
  for name, n in live.items():
    out.setdefault(name, []).append((int(step), int(n)))
  return out


def gate(
  keeps: Mapping[str, np.ndarray],
  events: Iterable[Mapping[str, Any]],
  step: int,
  live: Mapping[str, int],
  *,
  patience: int,
  fixed: Mapping[str, int] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, int | None]]:
  """Revival-aware keep-masks for the check at ``step``: ``(keeps, started)``.

  With ``patience == 0`` and no ``fixed`` steps this returns ``keeps``
  unchanged (every group started at this check): plain DemP.
  """
  histories = with_check(live_history(events), step, live)
  started = start_steps(histories, patience=patience, fixed=fixed)
  return hold_unstarted(keeps, started), started


# ----------------------------------------------------------------------------
# The plot.


def live_units_series(
  records: Iterable[Mapping[str, Any]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Per group ``(steps, live)`` arrays from metrics.jsonl records (prune events)."""
  return {
    name: (np.array([s for s, _ in h]), np.array([n for _, n in h]))
    for name, h in live_history(records).items()
  }


def plot_live_units(
  records: Iterable[Mapping[str, Any]],
  path: str,
  *,
  title: str = '',
  started: Mapping[str, int | None] | None = None,
) -> None:
  """Writes a PNG of live units per group over training steps.

  Args:
    records: the records of a run's ``metrics.jsonl``
      (``demp.trainer.metrics.read_jsonl``); several runs can be concatenated only if
      their groups have different names.
    path: the PNG to write.
    title: the figure title.
    started: optional group -> step where pruning started (a marker is drawn);
      by default read from the prune events' ``started`` field when present.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  records = list(records)
  series = live_units_series(records)
  if not series:
    raise ValueError('no prune event with live counts in the records: nothing to plot.')
  if started is None:
    last = [e for e in records if e.get('event') == 'prune' and 'started' in e]
    started = last[-1]['started'] if last else {}
  fig, ax = plt.subplots(figsize=(7, 4))
  cmap = plt.get_cmap('viridis')
  for i, (name, (steps, live)) in enumerate(series.items()):
    color = cmap(i / max(1, len(series) - 1))
    ax.plot(steps, live, marker='.', color=color, label=name)
    s = started.get(name)
    if s is not None:
      k = int(np.searchsorted(steps, s))
      if k < len(steps):
        ax.plot([steps[k]], [live[k]], marker='o', mfc='none', ms=10, color=color)
  ax.set_xlabel('training step')
  ax.set_ylabel('live units')
  ax.set_title(title or 'live MLP units per block (circle: pruning starts)')
  ax.legend(fontsize=8, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
