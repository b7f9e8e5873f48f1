"""When masks change and how sparse they are at a step: one-shot, periodic, polynomial.

The vocabulary is JaxPruner's (Lee et al., 2023): a scheduler answers two
questions about a (possibly traced) step, both as pure ``jnp`` functions, so a
changing step never recompiles anything:

* ``is_mask_update_iter(step)``: is this a step where the masks are recomputed?
* ``get_sparsity_at_step(target_sparsity, step)``: the sparsity a mask update
  at this step must reach.

Steps count the way the trainer does: the first parameter update is step 1.

* :class:`OneShotSchedule` prunes once, at ``target_step``, to the target.
* :class:`PeriodicSchedule` updates every ``update_freq`` steps in
  ``[update_start_step, update_end_step]`` at a constant sparsity (dynamic
  sparse training: SET, RigL).
* :class:`PolynomialSchedule` ramps the sparsity from 0 at
  ``update_start_step`` to the target at ``update_end_step`` as
  ``s_t = s (1 - (1 - (t - t0) / (t1 - t0)) ** power)`` (Zhu & Gupta, 2017;
  power 3), updating every ``update_freq`` steps and once more at
  ``update_end_step`` so the target is always reached.

:func:`default_schedule` builds the DemP authors' settings: every 500 steps
from ``0.3 T`` to ``0.8 T``.

References:
  Zhu & Gupta, `To prune, or not to prune
  <https://arxiv.org/abs/1710.01878>`_, 2017.

  Lee et al., `JaxPruner: A concise library for sparsity research
  <https://arxiv.org/abs/2304.14082>`_, 2023.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Union

import jax
import jax.numpy as jnp

Step = Union[int, jax.Array]


def _check_step(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f'{name}={value!r} must be an integer >= 0.')
  return value


@dataclasses.dataclass(frozen=True)
class OneShotSchedule:
  """Prunes once, at ``target_step``; dense before it, at the target after it."""

  target_step: int

  def __post_init__(self):
    _check_step('target_step', self.target_step)

  def is_mask_update_iter(self, step: Step) -> jax.Array:
    return jnp.asarray(step) == self.target_step

  def get_sparsity_at_step(self, target_sparsity, step: Step) -> jax.Array:
    return jnp.where(jnp.asarray(step) >= self.target_step, target_sparsity, 0.0)


@dataclasses.dataclass(frozen=True)
class PeriodicSchedule:
  """Every ``update_freq`` steps in ``[update_start_step, update_end_step]``, at the target."""

  update_freq: int
  update_start_step: int
  update_end_step: int

  def __post_init__(self):
    _check_window(self)

  def is_mask_update_iter(self, step: Step) -> jax.Array:
    return _on_grid(self, jnp.asarray(step))

  def get_sparsity_at_step(self, target_sparsity, step: Step) -> jax.Array:
    del step
    return jnp.asarray(target_sparsity, jnp.float32)


@dataclasses.dataclass(frozen=True)
class PolynomialSchedule:
  """Sparsity 0 → target along ``1 - (1 - progress) ** power`` (Zhu & Gupta's gradual pruning)."""

  update_freq: int
  update_start_step: int
  update_end_step: int
  power: float = 3.0

  def __post_init__(self):
    _check_window(self)
    if not self.power > 0:
      raise ValueError(f'power={self.power!r} must be > 0.')

  def is_mask_update_iter(self, step: Step) -> jax.Array:
    step = jnp.asarray(step)
    return _on_grid(self, step) | (step == self.update_end_step)

  def get_sparsity_at_step(self, target_sparsity, step: Step) -> jax.Array:
    span = max(1, self.update_end_step - self.update_start_step)
    progress = jnp.clip((jnp.asarray(step) - self.update_start_step) / span, 0.0, 1.0)
    return (target_sparsity * (1.0 - (1.0 - progress) ** self.power)).astype(jnp.float32)


Schedule = Union[OneShotSchedule, PeriodicSchedule, PolynomialSchedule]


def _check_window(s) -> None:
  if isinstance(s.update_freq, bool) or not isinstance(s.update_freq, int) or s.update_freq < 1:
    raise ValueError(f'update_freq={s.update_freq!r} must be an integer >= 1.')
  _check_step('update_start_step', s.update_start_step)
  _check_step('update_end_step', s.update_end_step)
  if s.update_end_step < s.update_start_step:
    raise ValueError(
      f'update_end_step={s.update_end_step} is before update_start_step={s.update_start_step}.'
    )


def _on_grid(s, step: jax.Array) -> jax.Array:
  inside = (step >= s.update_start_step) & (step <= s.update_end_step)
  return inside & ((step - s.update_start_step) % s.update_freq == 0)


def cosine_drop_fraction(
  drop_fraction: float, start_step: int, end_step: int
) -> Callable[[Step], jax.Array]:
  """``d_t = d / 2 (1 + cos(π (t - t0) / (t1 - t0)))``: RigL's and SET's decaying drop fraction."""
  if not 0.0 <= drop_fraction <= 1.0:
    raise ValueError(f'drop_fraction={drop_fraction!r} must be in [0, 1].')
  span = max(1, end_step - start_step)

  def fn(step: Step) -> jax.Array:
    progress = jnp.clip((jnp.asarray(step) - start_step) / span, 0.0, 1.0)
    return (0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * progress))).astype(jnp.float32)

  return fn


def window(total_steps: int, start_fraction: float, end_fraction: float) -> tuple[int, int]:
  """``(round(start_fraction T), round(end_fraction T))``, clipped to ``[1, T]``."""
  if not 0.0 <= start_fraction <= end_fraction <= 1.0:
    raise ValueError(
      f'start_fraction={start_fraction!r} and end_fraction={end_fraction!r} '
      'must satisfy 0 <= start_fraction <= end_fraction <= 1.'
    )
  start = min(total_steps, max(1, int(round(start_fraction * total_steps))))
  end = min(total_steps, max(start, int(round(end_fraction * total_steps))))
  return start, end


def _one_shot(total_steps, update_freq, start_fraction, end_fraction):
  del update_freq, end_fraction
  return OneShotSchedule(window(total_steps, start_fraction, start_fraction)[0])


def _periodic(total_steps, update_freq, start_fraction, end_fraction):
  return PeriodicSchedule(update_freq, *window(total_steps, start_fraction, end_fraction))


def _polynomial(total_steps, update_freq, start_fraction, end_fraction):
  start, end = window(total_steps, start_fraction, end_fraction)
  return PolynomialSchedule(update_freq, start, end, power=3.0)


SCHEDULES: dict[str, Callable[[int, int, float, float], Schedule]] = {
  'one_shot': _one_shot,  # prune once, at start_fraction * T
  'periodic': _periodic,  # constant sparsity, updates in the window (SET, RigL)
  'polynomial': _polynomial,  # cubic ramp 0 -> target over the window (magnitude, saliency)
}
"""``SCHEDULES[kind](total_steps, update_freq, start_fraction, end_fraction)``."""


def default_schedule(
  kind: str,
  total_steps: int,
  update_freq: int = 500,
  start_fraction: float = 0.3,
  end_fraction: float = 0.8,
) -> Schedule:
  """A schedule by name, defaulting to the DemP authors' window (every 500 steps, 0.3 T → 0.8 T)."""
  if kind not in SCHEDULES:
    raise ValueError(f'schedule={kind!r} is not one of {sorted(SCHEDULES)}.')
  if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
    raise ValueError(f'total_steps={total_steps!r} must be an integer >= 1.')
  return SCHEDULES[kind](total_steps, update_freq, start_fraction, end_fraction)
