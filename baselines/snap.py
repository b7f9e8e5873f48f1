"""SNAP, CroP-S and their early variants: structured pruning by gate saliency.

Four methods of the trainer (``config.method``), all removing units with the
same surgery as DemP (``run.prune``), none with DemP's penalty or noise:

* ``snap`` (SNAP-it) and ``crop_s`` (CroP-it-S) prune *at initialization*:
  at step 0, before the first update, in rounds of increasing sparsity
  ``ρ_i = ρ - (ρ - 0.5)·0.5^i`` for ``i = 0..5``, then ``ρ``, rescoring the
  pruned network (weights unchanged) between rounds (Verdenius et al., 2020).
* ``early_snap`` and ``early_crop_s`` prune once, to ``ρ``, when training
  settles: with ``W₁`` the weights after epoch 1 and
  ``d_t = ‖W_t - W₁‖ / ‖W₁‖`` at the end of epoch ``t``, the threshold
  ``τ = d₂·min(1 - ρ - 0.1, 0.99)`` is set at epoch 2 and the method prunes at
  the first epoch ``t ≥ 3`` with ``|d_t - d_{t-1}| < τ``, or at
  ``fallback_epoch`` (Rachwan et al., 2022).

Selection: a global ranking of every unit of every prunable group by score;
each group keeps at least its best unit; input and output layers are never
units. ``baselines.target_kind`` says what ``ρ`` counts: prunable units
(``units``) or parameters (``weights``: units go in score order until the
parameter count is at most ``(1 - ρ)`` of the dense model's).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
import optax

from baselines import config as config_lib
from baselines import gates
from demp import data as data_lib
from demp.trainer import methods
from demp.trainer.run import Run

# ----------------------------------------------------------------------------
# Pure pieces: schedule, trigger, selection.


def iterative_targets(rho: float, rounds: int = 6) -> list[float]:
  """``[ρ_0, ..., ρ_{rounds-1}, ρ]`` with ``ρ_i = ρ - (ρ - 0.5)·0.5^i``.

  For ``ρ < 0.5`` the formula would start above ``ρ`` and come down; targets are
  capped at ``ρ`` (one effective round), since pruned units never come back.
  """
  return [min(rho - (rho - 0.5) * 0.5**i, rho) for i in range(rounds)] + [rho]


def early_trigger(distances: Sequence[float], rho: float) -> bool:
  """Whether the early variants prune now.

  Args:
    distances: ``[d_1, ..., d_t]``, the relative distances from ``W₁`` at the
      end of epochs ``1..t`` (``d_1 = 0``).
    rho: the target sparsity.

  Returns:
    ``|d_t - d_{t-1}| < τ`` with ``τ = d_2·min(1 - ρ - 0.1, 0.99)``, for
    ``t ≥ 3`` (τ is only known from epoch 2 on); False before.
  """
  if len(distances) < 3:
    return False
  tau = distances[1] * min(1.0 - rho - 0.1, 0.99)
  return abs(distances[-1] - distances[-2]) < tau


def param_count(params, groups, keeps: Mapping[str, np.ndarray]) -> int:
  """Number of parameters left after removing the units not in ``keeps``.

  Every sliced leaf shrinks in proportion to the kept fraction of each group
  slicing it (a tiled consumer too); leaves no group slices keep their size.
  """
  slices: dict[tuple, list[tuple[int, int]]] = {}
  for g in groups:
    if g.name in keeps:
      keep = np.asarray(keeps[g.name], bool)
      for s in g.slices:
        slices.setdefault(s.path, []).append((keep.size, int(keep.sum())))
  total = 0
  for keypath, leaf in jax.tree.flatten_with_path(params)[0]:
    n = int(np.size(leaf))
    for width, kept in slices.get(tuple(str(k.key) for k in keypath), ()):
      n = n // width * kept
    total += n
  return total


def removal_order(scores: Mapping[str, np.ndarray]) -> list[tuple[str, int]]:
  """Units by ascending score (stable), without each group's best unit."""
  names, index, values = [], [], []
  for name, s in scores.items():
    s = np.asarray(s, np.float64)
    best = int(np.argmax(s))
    for i in range(s.size):
      if i != best:
        names.append(name)
        index.append(i)
        values.append(s[i])
  order = np.argsort(np.asarray(values), kind='stable')
  return [(names[j], index[j]) for j in order]


def _keeps(
  widths: Mapping[str, int], order: Sequence[tuple[str, int]], k: int
) -> dict[str, np.ndarray]:
  keeps = {name: np.ones(w, bool) for name, w in widths.items()}
  for name, i in order[:k]:
    keeps[name][i] = False
  return keeps


def select_keeps(
  scores: Mapping[str, np.ndarray],
  *,
  target: float,
  kind: str,
  params,
  groups,
  dense_units: int,
  dense_params: int,
) -> dict[str, np.ndarray]:
  """Keep-masks removing the lowest-scoring units until sparsity ``target``.

  Sparsity is relative to the dense model: of its units (``kind='units'``) or
  of its parameters (``kind='weights'``). Each group keeps at least one unit,
  so a target beyond that stops at one unit per group.
  """
  widths = {name: int(np.size(s)) for name, s in scores.items()}
  order = removal_order(scores)
  if kind == 'units':
    k = sum(widths.values()) - int(round((1.0 - target) * dense_units))
    return _keeps(widths, order, int(np.clip(k, 0, len(order))))
  if kind != 'weights':
    raise ValueError(
      f'baselines.target_kind={kind!r} is not one of {list(config_lib.TARGET_KINDS)}.'
    )
  budget = (1.0 - target) * dense_params
  lo, hi = 0, len(order)  # smallest k whose parameter count is within budget
  while lo < hi:
    mid = (lo + hi) // 2
    if param_count(params, groups, _keeps(widths, order, mid)) <= budget:
      hi = mid
    else:
      lo = mid + 1
  return _keeps(widths, order, lo)


# ----------------------------------------------------------------------------
# Hooks.


def score_batches(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """``score_batches`` fixed training batches (eval preprocessing): ``[n, B, ...]``."""
  c = config_lib.resolve(config)
  n, b = c.score_batches, c.score_batch_size
  ex = data_lib.fixed_examples(config.data, n * b, seed=config.seed + 1)
  return (ex['image'].reshape((n, b) + ex['image'].shape[1:]), ex['label'].reshape((n, b)))


def _sparsity(run: Run, keeps: Mapping[str, np.ndarray], kind: str) -> float:
  if kind == 'units':
    return 1.0 - sum(int(np.sum(k)) for k in keeps.values()) / sum(run.dense_widths.values())
  return 1.0 - param_count(run.state['params'], run.model.unit_groups(), keeps) / run.dense_params


def select(
  run: Run,
  score: str,
  target: float,
  batches,
  kind: str,
  keeps: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Keep-masks for sparsity ``target``, scoring the network with ``keeps`` applied.

  The units already out of ``keeps`` are scored with their gates at zero, which
  is exactly the network without them (see ``gates.snap_scores``), and go
  first; the surgery happens once, after the last round.
  """
  keeps = keeps or {name: np.ones(w, bool) for name, w in run.model.widths.items()}
  if _sparsity(run, keeps, kind) >= target:
    return dict(keeps)
  images, labels = batches
  at = {k: np.asarray(v, np.float32) for k, v in keeps.items()}
  scores = jax.device_get(gates.SCORES[score](run.model, run.variables, images, labels, at))
  scores = {k: np.where(keeps[k], s, -np.inf) for k, s in scores.items()}
  return select_keeps(
    scores,
    target=target,
    kind=kind,
    params=run.state['params'],
    groups=run.model.unit_groups(),
    dense_units=sum(run.dense_widths.values()),
    dense_params=run.dense_params,
  )


def iterative_hook(run: Run, step: int, *, score: str) -> None:
  """SNAP-it / CroP-it-S: all rounds at step 0, rescoring between rounds."""
  c = config_lib.resolve(run.config)
  batches = score_batches(run.config)
  keeps, rounds = None, []
  for target in iterative_targets(c.target_sparsity):
    keeps = select(run, score, target, batches, c.target_kind, keeps)
    rounds.append({k: int(np.sum(v)) for k, v in keeps.items()})
  run.prune(keeps, reason=f'{score}-it target={c.target_sparsity:.4f} ({c.target_kind})')
  run.stats.update(
    prune_step=step, target_sparsity=c.target_sparsity, target_kind=c.target_kind, rounds=rounds
  )


def _flat(params) -> np.ndarray:
  return np.concatenate(
    [np.ravel(x).astype(np.float64) for x in jax.device_get(jax.tree.leaves(params))]
  )


def early_hook(run: Run, step: int, *, score: str) -> None:
  """EarlySNAP / EarlyCroP-S: at each epoch end until the one prune event."""
  if run.memo.get('pruned'):
    return
  c = config_lib.resolve(run.config)
  epoch = step // c.steps_per_epoch
  w_t = _flat(run.state['params'])
  if 'w1' not in run.memo:  # the first epoch end: W₁
    run.memo.update(w1=w_t, distances=[0.0])
  else:
    w1 = run.memo['w1']
    run.memo['distances'].append(float(np.linalg.norm(w_t - w1) / np.linalg.norm(w1)))
  distances = run.memo['distances']
  fired = early_trigger(distances, c.target_sparsity)
  if fired or epoch >= c.fallback_epoch:
    keeps = select(run, score, c.target_sparsity, score_batches(run.config), c.target_kind)
    run.prune(keeps, reason=f'early {score} target={c.target_sparsity:.4f} ({c.target_kind})')
    run.memo['pruned'] = True
    run.stats.update(
      prune_step=step,
      prune_epoch=epoch,
      trigger='distance' if fired else 'fallback',
      distances=list(distances),
      target_sparsity=c.target_sparsity,
      target_kind=c.target_kind,
    )


# ----------------------------------------------------------------------------
# Methods.


def _plain(config: ml_collections.ConfigDict, base: optax.GradientTransformation):
  """The base optimizer (no penalty, no noise), after validating ``config.baselines``."""
  config_lib.resolve(config)
  return base


def _plain_early(config: ml_collections.ConfigDict, base: optax.GradientTransformation):
  c = config_lib.resolve(config)
  if c.fallback_epoch * c.steps_per_epoch > config.num_steps:
    raise ValueError(
      f'baselines.fallback_epoch={c.fallback_epoch} is past the end of the run '
      f'({config.num_steps} steps = {config.num_steps / c.steps_per_epoch:.1f} epochs of '
      f'{c.steps_per_epoch} steps): {config.method} might never prune. Lower it.'
    )
  return base


for _score in ('snap', 'crop_s'):
  methods.register(
    _score,
    methods.Method(
      optimizer=_plain,
      hook=functools.partial(iterative_hook, score=_score),
      when=lambda config, step: step == 0,
    ),
  )
  methods.register(
    f'early_{_score}',
    methods.Method(
      optimizer=_plain_early,
      hook=functools.partial(early_hook, score=_score),
      when=config_lib.epoch_end,
    ),
  )
