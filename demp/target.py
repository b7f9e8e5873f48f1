r"""Ask for a sparsity, get it: a controller that steers DemP's λ_t to a target.

DemP's final sparsity is an indirect result of the peak λ, the noise and the
run length. With ``demp.target_sparsity > 0`` the trainer instead steers
``λ_t = shape(t) × gain``, where ``shape`` is the usual one-cycle (or constant)
shape of :func:`demp.trainer.optim.demp_schedules` and ``gain`` is adapted by a
controller so that the measured sparsity follows a target trajectory and stops
at the target. The pieces, each usable on its own:

* :func:`add_target_penalty`, a pure optax transform: the penalty of
  :func:`demp.transforms.add_scheduled_penalty` with strength
  ``shape(count) × gain``, the gain living in its state
  (:class:`TargetPenaltyState`) as a traced float: setting it never
  recompiles a jitted step. The state also carries the in-step signal
  ``dead``: the fraction of penalised scales whose loss gradient was exactly 0
  on the batch (units dead on that batch), logged between checks.
* :func:`with_gain_noise`: DemP's live noise whose std is ``std(t) × gain``
  (the noise follows the gain), the alternative to the noise's own schedule.
* :func:`find_gain_state` / :func:`set_gain`: find the
  :class:`TargetPenaltyState` inside any optax state by type and set its gain
  (through ``chain``, ``MultiSteps``, the noise wrapper, ...).
* :func:`update_gain`, the control law: a pure host function
  ``(ControllerState, measured, target_now, ...) -> ControllerState``.
* :func:`trajectory`: the target sparsity at each step.
* :func:`measure` / :func:`after_check`: the trainer's glue, run after every
  death check (live counts → units / weights / FLOPs sparsity) and
  :func:`log_fields` for the metrics records.

The control law (see ``docs/target.md``) acts at death checks, where the
sparsity is measured exactly; sparsity cannot be undone, so it approaches the
target from below: the gain rises while the measured sparsity lags the
trajectory, falls when it runs ahead, and is cut sharply (λ decays) once the
target is reached or the predicted sparsity at the next check would pass it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from demp import transforms

__all__ = [
  'ControllerParams',
  'ControllerState',
  'TARGET_KINDS',
  'TARGET_NOISE',
  'REACTING',
  'TargetPenaltyState',
  'add_target_penalty',
  'dead_fraction',
  'default_reach',
  'find_gain_state',
  'in_flight',
  'set_gain',
  'target_optimizer',
  'trajectory',
  'update_gain',
  'update_gain_in_flight',
  'with_gain_noise',
]

# ----------------------------------------------------------------------------
# The transforms.


class TargetPenaltyState(NamedTuple):
  """State of :func:`add_target_penalty`."""

  count: jax.Array  # shape=(), int32: the update count, for shape(t).
  gain: jax.Array  # shape=(), float32: λ_t = shape(count) × gain; set by the controller.
  dead: jax.Array  # shape=(), float32: fraction of penalised entries with a zero gradient.


def dead_fraction(updates: optax.Updates, selected: Any) -> jax.Array:
  """Fraction of the selected entries of ``updates`` that are exactly 0 (0 if none).

  Fed the raw loss gradient, the selected entries being normalization scales:
  the fraction of units whose gradient vanished on the batch, i.e. units dead
  on this batch (a superset of those the death check will find dead). Pure
  ``jnp``, the in-step signal of :func:`add_target_penalty`.
  """
  leaves = [g for g, m in zip(jax.tree.leaves(updates), jax.tree.leaves(selected)) if m]
  total = sum(int(np.size(g)) for g in leaves)
  if not total:
    return jnp.zeros([], jnp.float32)
  zero = sum(jnp.sum(g == 0) for g in leaves)
  return (zero / total).astype(jnp.float32)


def add_target_penalty(
  shape: optax.ScalarOrSchedule,
  kind: str = 'lasso',
  mask: transforms.MaskOrFn = transforms.NORM_SCALES,
  gain: float = 1.0,
) -> optax.GradientTransformation:
  r"""A scheduled penalty of strength ``λ_t = shape(t) × gain``, the gain in the state.

  Exactly :func:`demp.transforms.add_scheduled_penalty` (same ``kind`` and
  ``mask``) with ``strength = shape × gain``, where ``gain`` is
  :attr:`TargetPenaltyState.gain`: a traced float32 scalar that a controller
  sets between steps (:func:`set_gain`) without recompiling. Each update also
  writes the in-step signal :attr:`TargetPenaltyState.dead`, the fraction of
  penalised entries whose incoming gradient is exactly 0 (fed the raw loss
  gradient: the fraction of units dead on this batch, see :func:`dead_fraction`).

  Args:
    shape: the shape of λ_t, a number >= 0 or an ``optax.Schedule`` of the
      update count (e.g. ``one_cycle(peak_lambda, T)``).
    kind: ``'lasso'`` or ``'l2'`` (:data:`demp.transforms.PENALTY_KINDS`).
    mask: which leaves to penalise (regex, callable or bool pytree), see
      :func:`demp.transforms.add_scheduled_penalty`.
    gain: the initial gain (>= 0).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

  Raises:
    ValueError: on a negative ``shape`` / ``gain``, an unknown
      ``kind``; at update time, if ``params`` is None.

  Examples:
    >>> import jax.numpy as jnp
    >>> from demp.target import add_target_penalty, set_gain
    >>> params = {'BatchNorm_0': {'scale': jnp.array([0.5, -2.0, 0.01])}}
    >>> penalty = add_target_penalty(0.1, gain=1.0)
    >>> state = set_gain(penalty.init(params), 3.0)
    >>> grads = {'BatchNorm_0': {'scale': jnp.array([0.0, 1.0, 1.0])}}
    >>> updates, state = penalty.update(grads, state, params)
    >>> updates['BatchNorm_0']['scale']
    Array([0.3, 0.7, 1.3], dtype=float32)
    >>> round(float(state.dead), 4)
    0.3333
  """
  if kind not in transforms.PENALTY_KINDS:
    raise ValueError(
      f'Unknown penalty `kind`={kind!r}; allowed: {sorted(transforms.PENALTY_KINDS)}.'
    )
  for name, value in (('shape', shape), ('gain', gain)):
    if name != 'shape' or not callable(value):
      if not (isinstance(value, (int, float)) and value >= 0):
        raise ValueError(f'`{name}` must be a number >= 0, got {name}={value!r}.')
  penalty_grad = transforms.PENALTY_KINDS[kind]
  mask_fn = (
    transforms.path_mask(mask)
    if isinstance(mask, str)
    else mask
    if callable(mask)
    else (lambda params: mask)
  )

  def init_fn(params: optax.Params) -> TargetPenaltyState:
    del params
    return TargetPenaltyState(
      count=jnp.zeros([], jnp.int32),
      gain=jnp.asarray(gain, jnp.float32),
      dead=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        'add_target_penalty needs `params` in update(updates, state, params); got params=None.'
      )
    base = shape(state.count) if callable(shape) else shape
    lam = base * state.gain
    selected = mask_fn(params)
    dead = dead_fraction(updates, selected)

    def add(g, p, m):
      if g is None or not m:
        return g
      return g + (lam * penalty_grad(p)).astype(g.dtype)

    updates = jax.tree.map(add, updates, params, selected, is_leaf=lambda x: x is None)
    return updates, TargetPenaltyState(optax.safe_increment(state.count), state.gain, dead)

  return optax.GradientTransformation(init_fn, update_fn)


class GainNoiseState(NamedTuple):
  """State of :func:`with_gain_noise` (the fields of ``LiveNoiseState``)."""

  count: jax.Array
  key: jax.Array
  inner_state: optax.OptState


def with_gain_noise(
  inner: optax.GradientTransformation,
  std: optax.ScalarOrSchedule,
  seed: int = 0,
  symmetric: bool = False,
  key_impl: str = 'threefry2x32',
) -> optax.GradientTransformationExtraArgs:
  r"""DemP's live noise whose std follows the gain: ``σ_t = std(t) × gain``.

  Same as :func:`demp.transforms.with_live_noise` (mask ``∇L != 0`` read
  before ``inner``, one draw from ``fold_in(key, count)``), except that σ_t
  is multiplied by the gain of the :class:`TargetPenaltyState` inside
  ``inner``'s state (as it was before this update): when the controller cuts
  λ, the noise goes with it.

  Args:
    inner: the optimizer to wrap; its state must hold a
      :class:`TargetPenaltyState` (e.g. ``chain(add_target_penalty(...), base)``).
    std: σ's shape, a number >= 0 or a schedule of the step.
    seed: seed of the noise key.
    symmetric: noise on every parameter instead of live ones.
    key_impl: the noise key's PRNG implementation (a member of
      :data:`demp.transforms.NOISE_PRNGS`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`GainNoiseState`.
  """
  transforms._check_nonnegative('std', std)  # pylint: disable=protected-access
  if key_impl not in transforms.NOISE_PRNGS:
    raise ValueError(f'`key_impl`={key_impl!r} is not one of {list(transforms.NOISE_PRNGS)}.')
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    if find_gain_state(inner_state) is None:
      raise ValueError(
        'with_gain_noise: `inner` has no TargetPenaltyState (chain '
        'add_target_penalty into it), so there is no gain to follow.'
      )
    return GainNoiseState(
      jnp.zeros([], jnp.int32), jax.random.key(seed, impl=key_impl), inner_state
    )

  def update_fn(updates, state, params=None, **extra_args):
    live = jax.tree.map(lambda g: g != 0, updates)
    gain = find_gain_state(state.inner_state).gain
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    sigma = (std(state.count) if callable(std) else std) * gain
    noise = transforms._normal_like(  # pylint: disable=protected-access
      jax.random.fold_in(state.key, state.count), updates
    )

    def add(u, n, m):
      noisy = u + (sigma * n).astype(u.dtype)
      return noisy if symmetric else jnp.where(m, noisy, u)

    updates = jax.tree.map(add, updates, noise, live)
    return updates, GainNoiseState(optax.safe_increment(state.count), state.key, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


TARGET_NOISE = ('gain', 'schedule')
"""``demp.target_noise``: the noise std follows the gain, or keeps its own one-cycle schedule."""


def target_optimizer(
  base: optax.GradientTransformation,
  *,
  lambda_shape: optax.ScalarOrSchedule,
  noise_shape: optax.ScalarOrSchedule | None,
  noise: str = 'gain',
  penalty_kind: str = 'lasso',
  penalty_mask: transforms.MaskOrFn = transforms.NORM_SCALES,
  noise_seed: int = 0,
  symmetric_noise: bool = False,
  noise_prng: str = 'threefry2x32',
) -> optax.GradientTransformation:
  """DemP with a controlled gain: :func:`demp.transforms.demp_optimizer`'s layout.

  ``noise(chain(add_target_penalty(lambda_shape), base))`` where ``noise`` is
  :func:`with_gain_noise` (``noise='gain'``) or
  :func:`demp.transforms.with_live_noise` on ``noise_shape`` alone
  (``noise='schedule'``); no noise when ``noise_shape`` is None.
  """
  if noise not in TARGET_NOISE:
    raise ValueError(f'`noise`={noise!r} is not one of {list(TARGET_NOISE)}.')
  opt = optax.chain(add_target_penalty(lambda_shape, penalty_kind, penalty_mask), base)
  if noise_shape is None:
    return opt
  if noise == 'gain':
    return with_gain_noise(opt, noise_shape, noise_seed, symmetric_noise, key_impl=noise_prng)
  return transforms.with_live_noise(
    opt, noise_shape, noise_seed, symmetric_noise, key_impl=noise_prng
  )


# ----------------------------------------------------------------------------
# Finding and setting the gain inside any optax state.


def _is_gain_state(x: Any) -> bool:
  return isinstance(x, TargetPenaltyState)


def find_gain_state(opt_state: optax.OptState) -> TargetPenaltyState | None:
  """The first :class:`TargetPenaltyState` inside ``opt_state`` (any nesting), or None."""
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_gain_state) if _is_gain_state(x)]
  return found[0] if found else None


def set_gain(opt_state: optax.OptState, gain: float | jax.Array) -> optax.OptState:
  """``opt_state`` with the gain of every :class:`TargetPenaltyState` set to ``gain``.

  The gain stays a float32 scalar, so a step compiled for the old state runs
  the new one unchanged (no recompilation).

  Raises:
    ValueError: if ``opt_state`` holds no :class:`TargetPenaltyState`.
  """
  if find_gain_state(opt_state) is None:
    raise ValueError(
      'set_gain: the optimizer state holds no TargetPenaltyState '
      '(build the optimizer with add_target_penalty / target_optimizer).'
    )
  value = jnp.asarray(gain, jnp.float32)
  return jax.tree.map(
    lambda s: s._replace(gain=value) if _is_gain_state(s) else s, opt_state, is_leaf=_is_gain_state
  )


# ----------------------------------------------------------------------------
# The controller.


class ControllerParams(NamedTuple):
  """Constants of :func:`update_gain`.

  Attributes:
    kp: proportional factor: a predicted lag of ``e`` (a fraction of the target)
      multiplies the gain by ``1 + kp·e`` (capped at ``up_max``); a predicted
      lead of ``e`` by ``1 - kp·e`` (floored at ``down_min``).
    up_max: the most the gain grows at one check.
    up_idle: the most the gain grows at one check while nothing has been pruned
      yet (the plant's delay is unknown then: under Adam γ needs ~1/lr steps to
      reach 0, so a lag early in the run must not wind the gain up).
    down_min: the most the gain shrinks at one check when ahead but short of the target.
    cut: factor of the gain once the target is reached (every later check), and the
      floor of the cut when the prediction passes the target.
    gain_max: the gain never exceeds this.
    horizon: the prediction looks ``max(1, round(horizon × delay))`` checks ahead; 0: no
      prediction (``ŝ = s``, the law reacts to the measurement alone and relies on
      ``demp.target_cap`` to stop at the target).
  """

  kp: float = 4.0
  up_max: float = 2.0
  up_idle: float = 1.25
  down_min: float = 0.5
  cut: float = 0.1
  gain_max: float = 20.0
  horizon: float = 1.0


REACTING = ControllerParams(up_max=1.19, up_idle=1.057, down_min=1.0, horizon=0.0)
"""The law's constants for 48 checks a run, measured on the CIFAR ConvNet.

``up_idle`` / ``up_max`` are the defaults' ×1.25 / ×2 per 100 steps spread over
four checks (so the gain winds up at the same pace per step before the first
death); ``down_min = 1``: ahead of the trajectory the gain holds; ``horizon =
0``: no prediction, the law reacts to the measured sparsity and the cap
(``demp.target_cap``) stops the death wave at the target. The default recipe's
(``demp.target_recipe='reacting'``); see docs/target.md ("The reacting recipe").
"""


class ControllerState(NamedTuple):
  """The controller's explicit host state (plain numbers; saved with the run)."""

  gain: float = 1.0
  measured: float = 0.0  # sparsity at the last check
  reached: bool = False  # the target was reached: λ decays from then on
  checks: int = 0  # checks seen so far
  delay: int = 0  # checks until the first unit died (the plant's delay); 0 = not yet


def update_gain(
  state: ControllerState,
  measured: float,
  target_at: Callable[[int], float],
  target: float,
  *,
  step: int,
  every: int,
  params: ControllerParams = ControllerParams(),
) -> ControllerState:
  r"""One step of the control law, at a death check. Pure.

  The plant has a delay: a unit whose γ the penalty starts to win dies only
  when γ has shrunk to 0, about ``1/lr`` steps later under Adam. The law
  measures that delay once, as ``h`` = the number of checks until the first
  unit died, and works with a prediction ``h`` checks ahead (a Smith-predictor
  in its simplest form): ``ŝ = s + h·Δ``, where ``s = measured`` (after the
  surgery) and ``Δ = s - state.measured`` is the increase over the last
  interval (the units already committed keep dying at that rate for about
  ``h`` checks, whatever the gain does now). With ``S = target`` and
  ``s*_h = target_at(step + h·every)`` the trajectory ``h`` checks ahead:

  1. ``s >= S`` (or reached before): reached; ``gain ×= cut`` (λ decays).
  2. ``ŝ > S``: the units in flight will pass the target; scale the gain so the
     predicted increase is half the remaining gap:
     ``gain ×= clip(0.5 (S - s) / (h Δ), cut, 1)``.
  3. ``ŝ < s*_h`` (lagging): ``gain ×= min(1 + kp (s*_h - ŝ) / S, up_max)``,
     capped at ``up_idle`` while nothing has been pruned yet (``h`` unknown,
     ``h = 1`` is used).
  4. otherwise (ahead, short of S): ``gain ×= max(1 - kp (ŝ - s*_h) / S,
     down_min)``; exactly on it, the gain holds.

  The gain is capped at ``gain_max``. This is ``demp.target_law='trajectory'``,
  the default; :func:`update_gain_in_flight` is the experimental alternative.

  Args:
    state: the controller state after the previous check.
    measured: sparsity measured now, in [0, 1].
    target_at: the trajectory: step -> target sparsity (:func:`trajectory`).
    target: the final target S, in (0, 1).
    step: the step of this check (in the units ``target_at`` takes).
    every: steps between checks.
    params: the law's constants.

  Returns:
    The new :class:`ControllerState`.

  Examples:
    >>> from demp.target import ControllerState, update_gain
    >>> s = update_gain(ControllerState(gain=1.0, measured=0.05, delay=1), measured=0.1,
    ...                 target_at=lambda t: 0.3, target=0.5, step=10, every=10)
    >>> round(s.gain, 3)  # ŝ = 0.15 lags 0.3 by 0.15 / 0.5 = 0.3 of the target: × min(2.2, 2).
    2.0
  """
  p = params
  checks = state.checks + 1
  delay = state.delay or (checks if measured > 0 else 0)
  h = max(1, round(p.horizon * delay)) if p.horizon > 0 else 0
  delta = max(0.0, measured - state.measured)
  predicted = measured + h * delta
  ahead = target_at(step + h * every)
  reached = state.reached or measured >= target
  if reached:
    factor = p.cut
  elif predicted > target:
    factor = min(1.0, max(p.cut, 0.5 * (target - measured) / (h * delta)))
  elif predicted < ahead:
    factor = min(1.0 + p.kp * (ahead - predicted) / target, p.up_max if measured > 0 else p.up_idle)
  else:
    factor = max(1.0 - p.kp * (predicted - ahead) / target, p.down_min)
  gain = min(state.gain * factor, p.gain_max)
  return ControllerState(
    gain=float(gain), measured=float(measured), reached=bool(reached), checks=checks, delay=delay
  )


def update_gain_in_flight(
  state: ControllerState,
  measured: float,
  target: float,
  *,
  near: float,
  far: float,
  params: ControllerParams = ControllerParams(),
) -> ControllerState:
  r"""The experimental control law (``demp.target_law='in_flight'``), at a death check. Pure.

  It works on scripted death-wave plants and the quickstart MLP but not on the
  CIFAR ConvNet under Adam, where it over-predicts (docs/target.md): there
  almost every scale falls at about the full Adam step early in the run
  (Adam normalizes the penalty, so a small λ already outweighs a small task
  gradient) and then settles near 0 instead of dying, so a falling scale does
  not predict a death.

  It steers the sparsity the run is heading for rather than the sparsity it
  has. Under a coupled penalty a unit whose task gradient λ outweighs has its
  scale shrinking steadily to 0; a unit that holds λ off does not. So the
  units whose scales are on their way to 0 (:func:`in_flight`) are those λ
  will kill if it holds, long before they die: their sparsity ``far`` (units
  reaching 0 by the trajectory's reach step) added to the measured ``s`` is
  where the run is heading, ``ŝ = s + far``, and ``near`` (by the next check)
  is what no change of λ can save any more. With ``S = target``:

  1. ``s >= S`` (or reached before): reached; ``gain ×= cut`` (λ decays).
  2. ``s + near > S``: units dying before the next check pass the target:
     ``gain ×= clip(0.5 (S - s) / near, cut, 1)``.
  3. otherwise, proportional on where the run is heading:
     ``gain ×= clip(1 + kp (S - ŝ) / S, down_min, up_max)``, capped at
     ``up_idle`` while nothing is pruned or in flight.

  Unlike :func:`update_gain` it needs no model of the plant's delay: a wave of
  deaths (units whose scales all started shrinking when λ rose past their
  task gradients, dying together ~1/lr steps later) shows up in ``far`` while
  λ can still be lowered to save part of it. The gain is capped at
  ``gain_max``.

  Args:
    state: the controller state after the previous check.
    measured: sparsity measured now, in [0, 1].
    target: the final target S, in (0, 1).
    near: the sparsity the units in flight add by the next check.
    far: the sparsity the units in flight add by the reach step (>= ``near``).
    params: the law's constants.

  Returns:
    The new :class:`ControllerState`.

  Examples:
    >>> from demp.target import ControllerState, update_gain_in_flight
    >>> s = update_gain_in_flight(ControllerState(gain=2.0, measured=0.1), 0.2, 0.5,
    ...                           near=0.05, far=0.4)
    >>> round(s.gain, 3)  # heading for 0.6 > 0.5: × (1 - 4 · 0.1 / 0.5) = 0.2, floored at 0.5
    1.0
  """
  p = params
  checks = state.checks + 1
  delay = state.delay or (checks if measured > 0 else 0)
  heading = measured + far
  reached = state.reached or measured >= target
  if reached:
    factor = p.cut
  elif measured + near > target:
    factor = min(1.0, max(p.cut, 0.5 * (target - measured) / near))
  else:
    up = p.up_max if heading > 0 else p.up_idle
    factor = min(max(1.0 + p.kp * (target - heading) / target, p.down_min), up)
  gain = min(state.gain * factor, p.gain_max)
  return ControllerState(
    gain=float(gain), measured=float(measured), reached=bool(reached), checks=checks, delay=delay
  )


# ----------------------------------------------------------------------------
# The units in flight: a leading indicator read from the normalization scales.


def in_flight(
  before: Mapping[str, tuple[np.ndarray, np.ndarray]],
  now: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
  lr_past: float,
  lr_ahead: float,
  *,
  rate_min: float = 0.5,
  constant_dies: bool = False,
) -> dict[str, np.ndarray]:
  r"""Group -> bool mask over ``now``'s units: losing to the penalty, their scale reaches 0 soon.

  Under Adam a unit whose task gradient the penalty outweighs has its scale γ
  shrink by about the learning rate every step (a sign-like step) until it is
  0, when (offset β <= 0, ReLU after the norm) the unit is dead. A unit that
  merely settles at a smaller γ (its task gradient grows to balance λ)
  shrinks far slower than that. So the rate is read in units of the learning
  rate, ``r = (|γ_before| - |γ_now|) / Σ lr`` over the interval: a unit is in
  flight when ``r >= rate_min`` (losing to λ at at least that fraction of the
  full step) and ``|γ_now| - r · lr_ahead <= 0`` (0 within the horizon, whose
  summed learning rate is ``lr_ahead``). A unit whose offset is positive
  becomes constant, not dead, and is not counted, unless ``constant_dies``
  (``prune.remove_constant``). Pure numpy.

  Args:
    before: group -> ``(ids, |γ|)`` at the previous reading (``ids``: the units'
      dense indices, ``demp.trainer.run.Run.unit_ids``).
    now: group -> ``(ids, |γ|, β or None)`` now. Units absent from ``before``
      are not counted (no rate yet).
    lr_past: the summed learning rate between the two readings (> 0).
    lr_ahead: the summed learning rate over the horizon.
    rate_min: the least shrink per unit of learning rate that counts as losing.
    constant_dies: count units with a positive offset too.

  Returns:
    group -> bool array, one entry per unit of ``now``.

  Examples:
    >>> import numpy as np
    >>> from demp.target import in_flight
    >>> before = {'g': (np.arange(4), np.array([1.0, 0.5, 0.5, 0.5]))}
    >>> now = {'g': (np.arange(4), np.array([1.0, 0.3, 0.3, 0.45]), np.array([0., -1., 1., 0.]))}
    >>> in_flight(before, now, lr_past=0.2, lr_ahead=0.4)['g'].tolist()  # r = 0, 1, 1, 0.25
    [False, True, False, False]
  """
  out = {}
  for name, (ids, gamma, beta) in now.items():
    doomed = np.zeros(len(ids), bool)
    if name in before and len(ids) and len(before[name][0]) and lr_past > 0:
      ids_b, gamma_b = before[name]
      order = np.argsort(ids_b)
      pos = np.clip(np.searchsorted(ids_b, ids, sorter=order), 0, len(ids_b) - 1)
      matched = order[pos]
      seen = ids_b[matched] == ids
      rate = np.where(seen, (gamma_b[matched] - gamma) / lr_past, 0.0)
      doomed = seen & (rate >= rate_min) & (gamma - rate * lr_ahead <= 0)
      if beta is not None and not constant_dies:
        doomed &= beta <= 0
    out[name] = doomed
  return out


# ----------------------------------------------------------------------------
# The target trajectory.

PCT_START = 0.3
"""The one-cycle warm-up fraction used by :func:`demp.trainer.optim.demp_schedules`."""


def default_reach(span: float) -> float:
  """The default ``demp.target_reach``: mid-way down the cosine phase of λ's one-cycle.

  ``span·(pct_start + (1 - pct_start)/2) = 0.65·span``: the warm-up (30 % of
  the span) plus half of the cosine decay, where λ's shape is at half its peak.
  The rest of the run, at a falling λ, recovers accuracy at the target.
  """
  return span * (PCT_START + (1.0 - PCT_START) / 2.0)


def trajectory(
  shape: optax.ScalarOrSchedule, num_updates: int, target: float, reach: float
) -> Callable[[int], float]:
  """``update -> target sparsity``: ``S · min(1, C(t) / C(reach·T))``.

  ``C(t) = Σ_{u<t} shape(u)`` is the cumulative λ shape (sparsity accumulates
  with the integrated penalty): slow during the warm-up, fastest around the
  peak, reaching ``S`` at update ``reach·T`` and holding it after. A constant
  shape gives a straight ramp.

  Args:
    shape: λ's shape (number or schedule of the update).
    num_updates: ``T``, the optimizer updates of the run.
    target: ``S``, the final target sparsity.
    reach: the fraction of the run by which the trajectory reaches ``S``.

  Returns:
    A host function of the update count.

  Examples:
    >>> from demp.target import trajectory
    >>> at = trajectory(1.0, num_updates=100, target=0.6, reach=0.5)
    >>> at(0), at(25), at(50), at(99)
    (0.0, 0.3, 0.6, 0.6)
  """
  steps = np.arange(num_updates)
  values = (
    np.asarray(jax.device_get(jax.vmap(shape)(jnp.asarray(steps))), np.float64)
    if callable(shape)
    else np.full(num_updates, float(shape))
  )
  cum = np.concatenate([[0.0], np.cumsum(np.broadcast_to(values, (num_updates,)))])
  t_reach = max(1, min(num_updates, int(round(reach * num_updates))))
  if not cum[t_reach] > 0:  # an all-zero shape: a straight ramp
    cum = np.arange(num_updates + 1, dtype=np.float64)

  def at(update: int) -> float:
    u = int(min(max(update, 0), num_updates))
    return float(target * min(1.0, cum[u] / cum[t_reach]))

  return at


TARGET_KINDS = ('units', 'weights', 'flops')
"""``demp.target_kind``: what the target counts (relative to the dense model).

* ``units``: the fraction of prunable units removed (``neuron_sparsity``);
* ``weights``: the fraction of parameters removed (``weight_sparsity``);
* ``flops``: ``1 -`` inference FLOPs per image relative to dense (XLA's count,
  as ``inference_flops_rel`` in the summary).
"""
