"""Schedules for the learning rate, the penalty strength λ_t and the noise std σ_t.

DemP drives both its regularization strength and its noise variance with a
one-cycle schedule (:func:`one_cycle`); the base recipes drive their learning
rates with step, multi-step, cosine or one-cycle schedules. All of them are
plain ``optax.Schedule`` callables built through one registry,
:data:`SCHEDULES`, so a config names a schedule by a string::

  lr = make_schedule('multistep', init_value=5e-3,
                     boundaries=[30 * spe, 70 * spe, 90 * spe], factor=0.1)

Every schedule here is a pure ``jnp`` function of the step: it takes a traced
integer inside ``jax.jit`` and never branches on its value in Python, so a
changing value never triggers a recompilation.
"""

import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ['SCHEDULES', 'make_schedule', 'one_cycle']

_WARMUPS = ('cosine', 'linear')


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> int:
  """Returns ``value`` as an int, raising if it is not a (non-)positive int."""
  ok = (
    isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
  ) and not isinstance(value, bool)
  if not ok or (value < 0 if allow_zero else value <= 0):
    allowed = 'an integer >= 0' if allow_zero else 'an integer > 0'
    raise ValueError(f'`{name}` must be {allowed}, got {name}={value!r}.')
  return int(value)


def _check_nonnegative(name: str, value: Any) -> None:
  """Raises unless ``value`` is a finite-or-infinite number >= 0 (not NaN)."""
  try:
    ok = float(value) >= 0.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'`{name}` must be a number >= 0, got {name}={value!r}.')


def _check_positive(name: str, value: Any) -> None:
  try:
    ok = float(value) > 0.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'`{name}` must be a number > 0, got {name}={value!r}.')


def one_cycle(
  peak_value: float,
  total_steps: int,
  pct_start: float = 0.3,
  div_factor: float = 25.0,
  final_div_factor: float = 1e4,
  warmup: str = 'cosine',
) -> optax.Schedule:
  r"""One-cycle schedule: warm up to ``peak_value``, then cosine-decay.

  * Step 0 starts at ``peak_value / div_factor``.
  * Over the first ``int(pct_start * total_steps)`` steps the value rises to
    ``peak_value``: along half a cosine (``warmup='cosine'``, what
    ``optax.cosine_onecycle_schedule`` and the DemP reference code do) or
    along a straight line (``warmup='linear'``, what the paper's text says).
  * It then follows half a cosine down to
    ``peak_value / (div_factor * final_div_factor)``, reached at
    ``total_steps``, and holds that final value for every later step. The
    span may end before the run does (the reference code uses ``0.9 * T``).

  With ``warmup='cosine'`` the schedule *is*
  ``optax.cosine_onecycle_schedule(total_steps, peak_value, pct_start,
  div_factor, final_div_factor)``, so values match it bit for bit; the
  warm-up length is floored (``int``) as optax does. With ``warmup='linear'``
  only the warm-up segment differs; the decay segment is the same function.

  DemP uses this shape for both the penalty strength λ_t and the noise
  variance σ_t².

  Args:
    peak_value: maximum value, reached at ``int(pct_start * total_steps)``.
      Must be >= 0; 0 gives the all-zero schedule.
    total_steps: length of the cycle, in steps; an integer > 0.
    pct_start: fraction of ``total_steps`` spent warming up, in (0, 1).
    div_factor: the initial value is ``peak_value / div_factor``; > 0.
    final_div_factor: the final value is
      ``peak_value / (div_factor * final_div_factor)``; > 0.
    warmup: ``'cosine'`` or ``'linear'``, the shape of the warm-up.

  Returns:
    An ``optax.Schedule`` mapping a (possibly traced) integer step to a value.

  Raises:
    ValueError: on an argument out of range or an unknown ``warmup``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from demp.schedules import one_cycle
    >>> lam = one_cycle(5e-3, total_steps=100, warmup='linear')
    >>> print(f'{lam(0):.1e} {lam(30):.1e} {lam(100):.1e} {lam(1000):.1e}')
    2.0e-04 5.0e-03 2.0e-08 2.0e-08

  References:
    Smith & Topin, `Super-Convergence: Very Fast Training of Neural Networks
    Using Large Learning Rates <https://arxiv.org/abs/1708.07120>`_, 2017.

    Dufort-Labbé et al., `Maxwell's Demon at Work: Efficient Pruning by
    Leveraging Saturation of Neurons <https://arxiv.org/abs/2403.07688>`_,
    2024 (the one-cycle λ_t and σ_t of DemP).
  """
  _check_nonnegative('peak_value', peak_value)
  total_steps = _check_positive_int('total_steps', total_steps)
  try:
    pct_ok = 0.0 < float(pct_start) < 1.0
  except (TypeError, ValueError):
    pct_ok = False
  if not pct_ok:
    raise ValueError(f'`pct_start` must be a number in (0, 1), got pct_start={pct_start!r}.')
  _check_positive('div_factor', div_factor)
  _check_positive('final_div_factor', final_div_factor)
  if warmup not in _WARMUPS:
    raise ValueError(f'`warmup` must be one of {_WARMUPS}, got warmup={warmup!r}.')

  cosine = optax.cosine_onecycle_schedule(
    total_steps, peak_value, pct_start, div_factor, final_div_factor
  )
  if warmup == 'cosine':
    return cosine

  warmup_steps = int(pct_start * total_steps)  # Same rounding as optax.
  linear = optax.linear_schedule(
    init_value=peak_value / div_factor,
    end_value=peak_value,
    transition_steps=warmup_steps,
  )

  def schedule(step: jax.typing.ArrayLike) -> jax.Array:
    return jnp.where(step < warmup_steps, linear(step), cosine(step))

  return schedule


def _constant(value: float) -> optax.Schedule:
  """``value`` at every step."""
  return optax.constant_schedule(value)


def _step(init_value: float, step_size: int, decay_factor: float) -> optax.Schedule:
  """``init_value * decay_factor ** (step // step_size)``.

  E.g. the ResNet-18/CIFAR-10 recipe divides the learning rate by 5 every 77
  epochs: ``decay_factor=0.2, step_size=77 * steps_per_epoch``.
  """
  step_size = _check_positive_int('step_size', step_size)
  _check_positive('decay_factor', decay_factor)
  return optax.exponential_decay(
    init_value=init_value,
    transition_steps=step_size,
    decay_rate=decay_factor,
    staircase=True,
  )


def _multistep(init_value: float, boundaries: Sequence[int], factor: float) -> optax.Schedule:
  """``init_value`` multiplied by ``factor`` at each step in ``boundaries``.

  The value at a boundary step is already multiplied.
  """
  if isinstance(boundaries, (str, bytes)) or not isinstance(boundaries, Sequence):
    raise ValueError(
      f'`boundaries` must be a sequence of increasing integer steps, got boundaries={boundaries!r}.'
    )
  bounds = [_check_positive_int('boundaries', b, allow_zero=True) for b in boundaries]
  if any(b1 <= b0 for b0, b1 in zip(bounds, bounds[1:])):
    raise ValueError(f'`boundaries` must be strictly increasing, got boundaries={boundaries!r}.')
  _check_nonnegative('factor', factor)
  return optax.piecewise_constant_schedule(init_value, {b: float(factor) for b in bounds})


def _cosine(init_value: float, decay_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Optional linear warm-up from 0, then cosine decay to 0.

  ``decay_steps`` is the whole span *including* the warm-up (as in
  ``optax.warmup_cosine_decay_schedule``); the value is 0 from
  ``decay_steps`` on.
  """
  decay_steps = _check_positive_int('decay_steps', decay_steps)
  warmup_steps = _check_positive_int('warmup_steps', warmup_steps, allow_zero=True)
  if warmup_steps == 0:
    return optax.cosine_decay_schedule(init_value, decay_steps)
  if warmup_steps >= decay_steps:
    raise ValueError(
      '`warmup_steps` must be smaller than `decay_steps`, got '
      f'warmup_steps={warmup_steps!r}, decay_steps={decay_steps!r}.'
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=init_value,
    warmup_steps=warmup_steps,
    decay_steps=decay_steps,
    end_value=0.0,
  )


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
  'constant': _constant,
  'one_cycle': one_cycle,
  'step': _step,
  'multistep': _multistep,
  'cosine': _cosine,
}
"""Schedule factories by name; the keyword arguments of each:

* ``'constant'``: ``value``.
* ``'one_cycle'``: see :func:`one_cycle`.
* ``'step'``: ``init_value, step_size, decay_factor`` (multiply by
  ``decay_factor`` every ``step_size`` steps).
* ``'multistep'``: ``init_value, boundaries, factor`` (multiply by ``factor``
  at each step in ``boundaries``).
* ``'cosine'``: ``init_value, decay_steps, warmup_steps=0``.
"""


def make_schedule(kind: str, **kwargs: Any) -> optax.Schedule:
  """Builds the schedule registered in :data:`SCHEDULES` under ``kind``.

  Args:
    kind: one of ``SCHEDULES``' names.
    **kwargs: the keyword arguments of that schedule.

  Returns:
    An ``optax.Schedule``.

  Raises:
    ValueError: if ``kind`` is not a registered name, or an argument is out of
      range.

  Examples:
    >>> from demp.schedules import make_schedule
    >>> lr = make_schedule('multistep', init_value=1.0, boundaries=[3, 7],
    ...                    factor=0.1)
    >>> print(f'{lr(2):.2f} {lr(3):.2f} {lr(7):.3f}')
    1.00 0.10 0.010
  """
  if kind not in SCHEDULES:
    raise ValueError(f'Unknown schedule `kind`={kind!r}; allowed: {sorted(SCHEDULES)}.')
  return SCHEDULES[kind](**kwargs)
