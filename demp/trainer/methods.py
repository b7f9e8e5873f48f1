"""The method contract: what the trainer calls, and the registry of methods.

A method is two functions and a predicate (:class:`Method`): ``optimizer(config,
base)`` wraps the base optimizer; ``hook(run, step)`` runs on the host after the
steps where ``when(config, step)`` is true, and may call ``run.prune(keeps)`` or
edit ``run.state`` (:class:`demp.trainer.run.Run`).

The registry is a plain dict filled on import: this module registers ``dense``
and ``demp``; :mod:`tools.analysis` and the ``baselines`` package register theirs
when they are imported (the entry points import the plug-ins they offer)::

    from demp.trainer import methods
    methods.register('my_method', methods.Method(optimizer=lambda config, base: base))
    methods.get('my_method')
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import ml_collections
import optax

from demp.trainer import demp_policy, optim

if TYPE_CHECKING:
  from demp.trainer.run import Run


class Method(NamedTuple):
  """A training method.

  ``optimizer(config, base)`` wraps the base optimizer; ``hook(run, step)`` runs
  on the host after the steps where ``when(config, step)`` is true (the only
  steps, besides logging, where the trainer syncs with the device). Step 0 is
  before the first update (pruning at initialization). ``demp_schedules``: the
  optimizer applies DemP's scheduled penalty and noise (:func:`demp.trainer.optim.demp_wrap`),
  so the metrics log their values (``lambda``, ``noise_std``); a method whose
  optimizer has neither leaves it False and logs neither.
  """

  optimizer: Callable[
    [ml_collections.ConfigDict, optax.GradientTransformation], optax.GradientTransformation
  ]
  hook: Callable[['Run', int], None] | None = None
  when: Callable[[ml_collections.ConfigDict, int], bool] = lambda config, step: False
  demp_schedules: bool = False


_REGISTRY: dict[str, Method] = {}


def register(name: str, method: Method) -> Method:
  """Adds ``method`` under ``name``; a name taken by another module's method is an error."""
  if not isinstance(method, Method):
    raise TypeError(
      f'register({name!r}, ...): expected a demp.trainer.methods.Method, got {method!r}.'
    )
  old = _REGISTRY.get(name)
  if old is not None and _origin(old) != _origin(method):
    raise ValueError(
      f'method {name!r} is already registered by {_origin(old)}; pick another '
      f'name (registering from {_origin(method)}).'
    )
  _REGISTRY[name] = method
  return method


def _origin(method: Method) -> str:
  fn = method.optimizer
  while hasattr(fn, 'func'):  # functools.partial
    fn = fn.func
  return getattr(fn, '__module__', '?')


def get(name: str) -> Method:
  """The method registered as ``name``; a ValueError names the closest registered one."""
  if name not in _REGISTRY:
    raise ValueError(f'method={name!r} is not one of {names()}{closest_hint(name, names())}')
  return _REGISTRY[name]


def names() -> list[str]:
  """The registered method names, sorted."""
  return sorted(_REGISTRY)


def closest_hint(name: str, candidates) -> str:
  """``" (did you mean 'x'?)."`` for the candidate closest to ``name`` (or ``"."``)."""
  match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
  return (f" (did you mean '{match[0]}'?)" if match else '') + '.' + _plugin_hint()


def _plugin_hint() -> str:
  if any(n in _REGISTRY for n in ('snap', 'rigl')):
    return ''
  return (
    ' (methods of plug-ins are registered when the plug-in is imported: '
    '`import baselines` for the baselines.)'
  )


def prune_steps(config, step: int) -> bool:
  """Every τ steps, and at the last step when ``prune.at_end``."""
  c = config.prune
  return step > 0 and (step % c.every == 0 or (c.at_end and step == config.num_steps))


def demp_method_optimizer(
  config, base: optax.GradientTransformation
) -> optax.GradientTransformation:
  """DemP's optimizer for ``config``: ``base`` with the scheduled penalty and live noise."""
  return optim.demp_wrap(config, base)


register('dense', Method(optimizer=lambda config, base: base))
register(
  'demp',
  Method(
    optimizer=demp_method_optimizer,
    hook=lambda run, step: demp_policy.prune_dead(run),
    when=prune_steps,
    demp_schedules=True,
  ),
)
