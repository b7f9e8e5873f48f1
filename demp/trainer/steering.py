"""Steering DemP to a target sparsity: the trainer's side of :mod:`demp.target`.

:mod:`demp.target` holds the pure parts (the gain transforms, the control law,
the trajectory, the in-flight reading). This module is their glue to a run:
it reads the config (:func:`validate`, :func:`config_trajectory`,
:func:`controller_params`), measures the run's sparsity after every death
check (:func:`measure`), caps a check's removals at the target
(:func:`cap_keeps`), updates the gain (:func:`after_check`) and supplies the
metrics records' fields (:func:`log_fields`, :func:`postfix`).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from demp import flops as flops_lib
from demp import schedules, surgery
from demp import units as units_lib
from demp.target import (
  REACTING,
  TARGET_KINDS,
  TARGET_NOISE,
  ControllerParams,
  ControllerState,
  default_reach,
  find_gain_state,
  in_flight,
  set_gain,
  trajectory,
  update_gain,
  update_gain_in_flight,
)
from demp.trainer import optim


class Recipe(NamedTuple):
  """What a target brings by default (``demp.target_recipe``): each used where the key is unset.

  Attributes:
    control: the law's constants (``demp.target_control``'s fields left ``None``).
    reach: the fraction of the run by which to reach the target (``demp.target_reach``
      = 0); 0 here: :func:`demp.target.default_reach` of ``demp.span``.
    checks: death checks a run, τ = ``num_steps // checks`` (``demp.target_every`` =
      0); 0 here: τ = ``prune.every``.
  """

  control: ControllerParams
  reach: float
  checks: int


RECIPES: dict[str, Recipe] = {
  # Measured on the CIFAR-subset ConvNet and ResNet-18 under Adam (docs/target.md): the
  # death wave of a coupled penalty kills most of its units within ~25 steps, so a check
  # every 100 steps sees it only once it is over; no prediction, the cap stops the wave.
  'reacting': Recipe(control=REACTING, reach=0.35, checks=48),
  # The first law: a trajectory to reach by 0.65 × span, a one-check-ahead prediction,
  # death checks every prune.every steps.
  'predicting': Recipe(control=ControllerParams(), reach=0.0, checks=0),
}
"""``demp.target_recipe`` -> :class:`Recipe`; ``'reacting'`` is the default."""


def target_every(config) -> int:
  """τ of a run steered to a target: ``demp.target_every``, else the recipe's."""
  c = config.demp
  if c.target_every:
    return int(c.target_every)
  checks = RECIPES[c.target_recipe].checks
  return max(1, config.num_steps // checks) if checks else int(config.prune.every)


def resolve(config):
  """``config`` with the target recipe's τ in ``prune.every`` (a copy; ``config`` itself if no target).

  A run steered to a target checks for dead units every :func:`target_every` steps,
  whatever ``prune.every`` says: a target set in any config, from any front end,
  lands without knowing the recipe. The change is logged.
  """
  if not optim.enabled(config):
    return config
  every = target_every(config)
  if every == config.prune.every:
    return config
  out = copy.deepcopy(config)
  out.prune.every = every  # an existing key: allowed in a locked config
  c = config.demp
  source = (
    f'demp.target_every={c.target_every}'
    if c.target_every
    else f'num_steps // {RECIPES[c.target_recipe].checks}, the {c.target_recipe!r} recipe'
  )
  logging.warning(
    'demp.target_sparsity=%s: a death check every %d steps (%s) instead of prune.every=%d; '
    'set demp.target_every to choose τ.',
    c.target_sparsity,
    every,
    source,
    config.prune.every,
  )
  return out


def _unit_scales(run) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
  """Group -> ``(ids, |γ|, β)`` of the units present after the last prune decision.

  A group with several norm scales (a residual stream) takes the largest |γ|
  and the largest β over them (its unit is dead only if all are). Groups
  without a norm scale are left out.
  """

  params = jax.device_get(run.state['params'])
  keeps = run.pending['keeps'] if run.pending else {}
  out = {}
  for name, paths in units_lib.group_scale_paths(run.model).items():
    if not paths:
      continue
    gammas, betas = [], []
    for path in paths:
      gamma = units_lib._at(params, path)  # pylint: disable=protected-access
      if gamma is None:
        continue
      beta = units_lib._at(params, path[:-1] + ('bias',))  # pylint: disable=protected-access
      gammas.append(np.abs(np.asarray(gamma, np.float64)))
      betas.append(None if beta is None else np.asarray(beta, np.float64))
    if not gammas:
      continue
    gamma = np.max(gammas, axis=0)
    beta = None if any(b is None for b in betas) else np.max(betas, axis=0)
    if name in keeps:  # a deferred prune: the removed units are still there, silenced
      keep = np.asarray(keeps[name], bool)
      gamma, beta = gamma[keep], None if beta is None else beta[keep]
    ids = np.asarray(run.unit_ids.get(name, np.arange(len(gamma))))
    out[name] = (ids, gamma, beta)
  return out


def _summed_lr(config, start: int, stop: int) -> float:
  """Σ of the learning rate over updates ``[start, stop)`` of the config's schedule."""

  if stop <= start:
    return 0.0
  lr = optim.learning_rate_schedule(config)
  return float(np.sum(jax.device_get(jax.vmap(lr)(jnp.arange(start, stop)))))


def _cost_per_unit(run, kind: str) -> Callable[[Mapping[str, int]], float]:
  """``counts -> sparsity of kind``: what removing ``counts[g]`` units of each group removes."""

  if kind == 'units':
    total = sum(run.dense_widths.values())
    return lambda counts: sum(counts.values()) / total
  if kind == 'weights':
    costs, total = units_lib.unit_costs(run.model, run.state['params'], 'params'), run.dense_params
  else:  # a unit's multiply-adds over the dense forward pass's (XLA counts one as 2 FLOPs)
    image_shape = tuple(run.death_images.shape[1:])
    costs = units_lib.unit_costs(run.model, run.state['params'], 'flops', image_shape)
    total = run.memo['target_dense_flops'] / 2
  return lambda counts: sum(n * costs[k] for k, n in counts.items()) / total


def in_flight_sparsity(run, kind: str, horizons: tuple[int, ...]) -> tuple[float, ...]:
  """The sparsity of ``kind`` the units in flight add within each horizon (updates); 0s at first.

  Reads every group's norm scales now (:func:`_unit_scales`), compares them with
  the reading of the previous check (kept in ``run.memo['target_scales']``, saved
  with checkpoints), and stores this one.

  Raises:
    ValueError: if no prunable group of the model has a norm scale of its own.
  """
  now = _unit_scales(run)
  if not now:
    raise ValueError(
      "demp.target_law='in_flight' reads the prunable groups' norm scales; "
      f"{type(run.model).__name__} has none. Use demp.target_law='trajectory'."
    )
  update = _updates(run)
  snap = run.memo.get('target_scales')
  run.memo['target_scales'] = {
    'update': update,
    'ids': {k: v[0] for k, v in now.items()},
    'gamma': {k: v[1] for k, v in now.items()},
  }
  if not snap or update <= snap['update']:
    return tuple(0.0 for _ in horizons)
  before = {k: (snap['ids'][k], snap['gamma'][k]) for k in snap['ids']}
  lr_past = _summed_lr(run.config, snap['update'], update)
  total = max(1, run.config.num_steps // run.config.optimizer.accumulate_steps)
  sparsity = _cost_per_unit(run, kind)
  out = []
  for horizon in horizons:
    doomed = in_flight(
      before,
      now,
      lr_past,
      _summed_lr(run.config, update, min(total, update + horizon)),
      constant_dies=bool(run.config.prune.remove_constant),
    )
    out.append(sparsity({k: int(np.sum(v)) for k, v in doomed.items()}))
  return tuple(out)


@functools.lru_cache(maxsize=16)
def _run_trajectory(
  schedule: str, warmup: str, span: float, num_updates: int, target: float, reach_: float
) -> Callable[[int], float]:
  """The trajectory of a config's λ shape (that of ``demp.trainer.optim.demp_schedules``, unit peak)."""
  if schedule == 'constant':
    shape = 1.0
  else:
    shape = schedules.one_cycle(
      1.0, total_steps=max(1, int(round(span * num_updates))), warmup=warmup
    )
  return trajectory(shape, num_updates, target, reach_)


def config_trajectory(config) -> Callable[[int], float]:
  """The target trajectory of ``config`` (cached): a function of the update count."""
  c = config.demp
  num_updates = max(1, config.num_steps // config.optimizer.accumulate_steps)
  return _run_trajectory(
    c.schedule, c.warmup, float(c.span), num_updates, float(c.target_sparsity), reach(config)
  )


def validate(config) -> None:
  """Raises a ValueError naming the key, the value and what is allowed."""
  c = config.demp
  ts = c.target_sparsity
  if not (isinstance(ts, (int, float)) and not isinstance(ts, bool) and 0 <= ts < 1):
    raise ValueError(
      f'demp.target_sparsity={ts!r} must be a number in [0, 1) (0 = fixed λ, no target).'
    )
  if c.target_kind not in TARGET_KINDS:
    raise ValueError(f'demp.target_kind={c.target_kind!r} is not one of {list(TARGET_KINDS)}.')
  tr = c.target_reach
  if not (isinstance(tr, (int, float)) and not isinstance(tr, bool) and 0 <= tr <= 1):
    raise ValueError(
      f'demp.target_reach={tr!r} must be a number in [0, 1] '
      "(a fraction of the run; 0 = the recipe's)."
    )
  if c.target_recipe not in RECIPES:
    raise ValueError(f'demp.target_recipe={c.target_recipe!r} is not one of {list(RECIPES)}.')
  te = c.target_every
  if isinstance(te, bool) or not isinstance(te, int) or te < 0:
    raise ValueError(f'demp.target_every={te!r} must be an int >= 0 (0 = the recipe\'s τ).')
  if c.target_law not in LAWS:
    raise ValueError(f'demp.target_law={c.target_law!r} is not one of {list(LAWS)}.')
  for key in ('target_cap', 'target_revive'):
    if not isinstance(c[key], bool):
      raise ValueError(f'demp.{key}={c[key]!r} must be True or False.')
  _validate_control(c.target_control)
  if c.target_noise not in TARGET_NOISE:
    raise ValueError(f'demp.target_noise={c.target_noise!r} is not one of {list(TARGET_NOISE)}.')
  if ts > 0 and config.method == 'demp':
    if not c.peak_lambda > 0:
      raise ValueError(
        f'demp.peak_lambda={c.peak_lambda!r} must be > 0 with demp.target_sparsity'
        f'={ts!r}: it is the scale of λ_t = shape(t) × gain (gain starts at 1).'
      )
    if not config.prune.dynamic:
      raise ValueError(
        f'prune.dynamic={config.prune.dynamic!r} must be True with '
        f'demp.target_sparsity={ts!r}: the controller measures the pruned model.'
      )


def _validate_control(control) -> None:
  """Raises a ValueError naming the ``demp.target_control`` key, its value and what is allowed."""
  # Unknown keys are refused by the config check (demp.trainer.config) before this runs.
  for key, (low, high, rule) in _CONTROL_BOUNDS.items():
    value = control.get(key)
    if value is None:  # the recipe's
      continue
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
      raise ValueError(f'demp.target_control.{key}={value!r} must be a number {rule}.')


def reach(config) -> float:
  """``demp.target_reach``, else the recipe's, else :func:`default_reach` of ``demp.span``."""
  c = config.demp
  return float(c.target_reach) or RECIPES[c.target_recipe].reach or default_reach(float(c.span))


def _flops_sparsity(run, widths: Mapping[str, int] | None = None) -> float:
  """``1 -`` inference FLOPs at ``widths`` (default: after the last prune decision) ÷ dense."""
  image_shape = tuple(run.death_images.shape[1:])
  if 'target_dense_flops' not in run.memo:  # compiled once, from shapes
    dense = flops_lib.at_widths(run.model, run.dense_widths)
    run.memo['target_dense_flops'] = flops_lib.forward_flops(dense, image_shape)
  now = flops_lib.at_widths(run.model, run.widths_after if widths is None else widths)
  return 1.0 - flops_lib.forward_flops(now, image_shape) / run.memo['target_dense_flops']


MEASURES: dict[str, Callable[[Any], float]] = {
  'units': lambda run: flops_lib.neuron_sparsity(run.widths_after, run.dense_widths),
  # Nonzero weights: the units of a pending deferred prune are silenced (zero) already.
  'weights': lambda run: flops_lib.weight_sparsity(run.state['params'], run.dense_params),
  'flops': _flops_sparsity,
}
"""The sparsity of each :data:`TARGET_KINDS` entry, from a run (the summary's counting), at
the widths after the run's last prune decision (a deferred prune counts before its switch)."""


def measure(run, kind: str) -> float:
  """The run's sparsity of ``kind`` now, relative to the dense model (see :data:`TARGET_KINDS`)."""
  if kind not in MEASURES:
    raise ValueError(f'demp.target_kind={kind!r} is not one of {list(TARGET_KINDS)}.')
  return MEASURES[kind](run)


def _sparsity_after(run, kind: str) -> Callable[[Mapping[str, int]], float]:
  """``widths -> sparsity of kind`` once the model is cut to ``widths``, counted like :func:`measure`.

  ``units`` and ``flops`` are exact; ``weights`` is the measured (nonzero) sparsity now
  plus the parameters the cut removes (a removed unit's weights are nonzero).
  """
  if kind == 'flops':
    return lambda widths: _flops_sparsity(run, widths)
  now, widths_now = measure(run, kind), run.widths_after
  if kind == 'units':
    total = sum(run.dense_widths.values())
    return lambda widths: now + (sum(widths_now.values()) - sum(widths.values())) / total
  image_shape = run.death_images.shape[1:]
  params_now = flops_lib.params_at(run.model, widths_now, image_shape)
  return lambda widths: (
    now + (params_now - flops_lib.params_at(run.model, widths, image_shape)) / run.dense_params
  )


def cap_keeps(
  run, keeps: Mapping[str, np.ndarray], activity: Mapping[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], int]:
  """Keep-masks that remove no more than the target: ``demp.target_cap``.

  Sparsity cannot be undone, and the units the penalty has already doomed keep
  dying for a few checks after the controller cuts λ (a CIFAR ConvNet asked for
  70 % of its weights lost 77.7 %). The cap is the hard stop: if removing every
  unit of ``keeps`` would pass ``demp.target_sparsity`` (counted as
  ``demp.target_kind``), the most active of the units to remove are kept
  instead, as few as needed to stay at or below the target (a bisection over
  how many; ``prune.min_width`` / ``prune.multiple_of`` still hold). Those
  units are dead: they stay in the network, silent, and are counted as
  ``capped`` in the prune event.

  Returns:
    ``(keeps, capped)``: the new keep-masks and how many units they keep back.
  """
  keeps = {k: np.asarray(v, bool) for k, v in keeps.items()}
  goal = float(run.config.demp.target_sparsity)
  after = _sparsity_after(run, run.config.demp.target_kind)
  widths_of = lambda ks: {**run.widths_after, **{k: int(np.sum(v)) for k, v in ks.items()}}
  if after(widths_of(keeps)) <= goal:
    return keeps, 0
  c = run.config.prune
  # The units to remove, most active first: the first r of them are kept back.
  out = [(float(activity[k][i]), k, int(i)) for k, v in keeps.items() for i in np.flatnonzero(~v)]
  out.sort(key=lambda x: -x[0])

  def keeping(r: int) -> dict[str, np.ndarray]:
    ks = {k: v.copy() for k, v in keeps.items()}
    for _, k, i in out[:r]:
      ks[k][i] = True
    return surgery.keep_masks(ks, activity, min_width=c.min_width, multiple_of=c.multiple_of)

  lo, hi = 0, len(out)  # after(keeping(lo)) > goal; keeping(hi) removes nothing
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if after(widths_of(keeping(mid))) <= goal else (mid, hi)
  final = keeping(hi)
  kept = sum(int(np.sum(final[k])) - int(np.sum(keeps[k])) for k in keeps)
  return final, kept


def controller_params(config) -> ControllerParams:
  """The law's constants: the recipe's, with the ``demp.target_control`` fields that are set."""
  base = RECIPES[config.demp.target_recipe].control
  return base._replace(**{k: v for k, v in config.demp.target_control.items() if v is not None})


def _controller(run) -> ControllerState:
  return ControllerState(**run.memo.get('target', {}))


def _updates(run) -> int:
  return max(0, run.step // run.config.optimizer.accumulate_steps)


def _steer_in_flight(run, before: ControllerState, measured: float):
  """:func:`update_gain_in_flight` on the units in flight by the next check and by the reach step."""
  c = run.config
  accumulate = max(1, c.optimizer.accumulate_steps)
  update, every = _updates(run), max(1, c.prune.every // accumulate)
  reach_update = int(round(reach(c) * c.num_steps)) // accumulate
  horizons = (every, max(every, reach_update - update))
  near, far = in_flight_sparsity(run, c.demp.target_kind, horizons)
  after = update_gain_in_flight(
    before, measured, float(c.demp.target_sparsity), near=near, far=far, params=controller_params(c)
  )
  return after, {'in_flight_near': near, 'in_flight_far': far}


def _steer_trajectory(run, before: ControllerState, measured: float):
  """:func:`update_gain` on the measured sparsity against the trajectory."""
  every = max(1, run.config.prune.every // run.config.optimizer.accumulate_steps)
  after = update_gain(
    before,
    measured,
    config_trajectory(run.config),
    float(run.config.demp.target_sparsity),
    step=_updates(run),
    every=every,
    params=controller_params(run.config),
  )
  return after, {}


def after_check(run, capped: int = 0) -> dict[str, Any]:
  """After a death check and its surgery: measure, update the gain, set it in the state.

  ``capped`` > 0 (:func:`cap_keeps` held units back at this check) means the
  target is reached, whatever the measurement's rounding: λ decays from here.

  Writes the controller state into ``run.memo['target']`` (saved with
  checkpoints), the new gain into the optimizer state, a ``'target'`` event
  into the log and ``run.stats``; returns the event.
  """
  c = run.config.demp
  kind = c.target_kind
  measured = measure(run, kind)
  target_now = config_trajectory(run.config)(_updates(run))
  before = _controller(run)
  if capped:
    before = before._replace(reached=True)
  after, flight = LAWS[c.target_law](run, before, measured)
  run.memo['target'] = after._asdict()
  run.state = dict(run.state, opt_state=set_gain(run.state['opt_state'], after.gain))
  if run.mesh is not None:
    from demp.trainer import parallel  # pylint: disable=g-import-not-at-top

    run.state = parallel.replicate(run.state, run.mesh)
  event = {
    'step': run.step,
    'event': 'target',
    'target_kind': kind,
    'target_sparsity': float(c.target_sparsity),
    'target_now': target_now,
    'measured_sparsity': measured,
    **flight,
    'gain_before': before.gain,
    'gain': after.gain,
    'reached': after.reached,
    'delay_checks': after.delay,
  }
  run.log(event)
  run.stats.update(
    target_sparsity=float(c.target_sparsity),
    target_kind=kind,
    target_reached_sparsity=measured,
    target_reached=after.reached,
    target_gain_final=after.gain,
  )
  run.stats.setdefault('target_history', []).append(
    {k: event[k] for k in ('step', 'target_now', 'measured_sparsity', 'gain')}
  )
  return event


def log_fields(run, record: Mapping[str, Any], update: int) -> dict[str, float]:
  """The target's numbers for a metrics record (empty when no target is set).

  ``record`` holds the fixed-shape ``lambda`` / ``noise_std`` (gain 1); this
  returns ``lambda`` × gain (and ``noise_std`` × gain when the noise follows
  it), ``target_gain``, ``target_sparsity`` (the trajectory now),
  ``measured_sparsity`` (the last check's) and ``target_dead`` (the in-step
  signal of the last step: the fraction of live penalised units dead on its batch).
  """
  if not optim.enabled(run.config):
    return {}
  ctrl = _controller(run)
  gain_state = find_gain_state(run.state['opt_state'])
  out = {
    'lambda': record['lambda'] * ctrl.gain,
    'target_gain': ctrl.gain,
    'target_sparsity': config_trajectory(run.config)(update),
    'measured_sparsity': ctrl.measured,
    'target_dead': float(gain_state.dead) if gain_state is not None else math.nan,
  }
  if run.config.demp.target_noise == 'gain':
    out['noise_std'] = record['noise_std'] * ctrl.gain
  return out


def postfix(record: Mapping[str, Any]) -> dict[str, str]:
  """Progress-bar fields of a record: measured / target sparsity and the gain."""
  if 'target_gain' not in record:
    return {}
  return {
    'sparsity': f'{record["measured_sparsity"]:.3f}/{record["target_sparsity"]:.3f}',
    'gain': f'{record["target_gain"]:.3g}',
  }


_CONTROL_BOUNDS: dict[str, tuple[float, float, str]] = {
  'kp': (0.0, math.inf, '>= 0'),
  'up_max': (1.0, math.inf, '>= 1'),
  'up_idle': (1.0, math.inf, '>= 1'),
  'down_min': (0.0, 1.0, 'in [0, 1]'),
  'cut': (0.0, 1.0, 'in [0, 1]'),
  'gain_max': (0.0, math.inf, '>= 0'),
  'horizon': (0.0, math.inf, '>= 0'),
}
"""``demp.target_control`` key -> (low, high, the rule in words): every :class:`ControllerParams` field."""


LAWS: dict[str, Callable[[Any, ControllerState, float], tuple[ControllerState, dict]]] = {
  'in_flight': _steer_in_flight,
  'trajectory': _steer_trajectory,
}
"""``demp.target_law`` -> ``(run, state, measured) -> (new state, extra event fields)``."""
