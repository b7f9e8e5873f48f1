"""Where a train step's batch comes from: the host's tf.data pipeline, or the device.

``data.placement`` picks (``'auto'`` by default):

* :class:`DeviceFeed` (``'device'``): the whole training split is put on the
  device once (:mod:`demp.data.ondevice`); each step gathers its batch by index
  and augments it inside the jitted step, with keys derived from the seed and
  the step, and ``k`` steps run per dispatch (one ``lax.scan``). No host input
  pipeline, one dispatch and one host round-trip per ``k`` steps. Batch ``s`` is
  a pure function of ``(seed, s)``, so a resumed run is bit-identical.
* :class:`HostFeed` (``'host'``): :func:`demp.data.train_iterator` (tf.data),
  one step per dispatch; any data set, including those that do not fit in memory.

``'auto'`` takes the device when the split has a fixed image shape and fits in a
quarter of the device's memory, the crop/flip augmentation (or none) is asked
for, and the run is on one device of one process; the host otherwise.

``k`` (``steps_per_dispatch``; 0 = auto: 1 on a CPU, where a loop around a
convolutional step runs many times slower, else up to 50) divides every step at
which the loop must stop for the host (a log record, the method's hook, an
evaluation, a checkpoint, the end), so the loop sees exactly the steps it would
with ``k = 1``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp

from demp.data import ondevice
from demp.data import pipeline as data_pipeline

PLACEMENTS = data_pipeline.PLACEMENTS
MAX_STEPS_PER_DISPATCH = 50
"""``steps_per_dispatch = 0`` picks the largest divisor of the event steps up to this."""


class HostFeed:
  """tf.data batches, one step per dispatch: ``step(state, batch)``."""

  on_device = False
  k = 1

  def __init__(self, batches: Iterator[dict]):
    self._batches = batches

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._batches)

  def inputs(self, step: int) -> tuple:
    del step  # the iterator holds the position
    return (next(self._batches),)

  def make_step(self, train_step: Callable) -> Callable:
    return train_step


class DeviceFeed:
  """The split on the device, ``k`` steps per dispatch: ``step(state, data, start)``."""

  on_device = True

  def __init__(
    self,
    data: ondevice.DeviceData,
    *,
    seed: int,
    batch_size: int,
    augment_config: ondevice.AugmentConfig,
    k: int,
  ):
    self.data, self.seed, self.batch_size = data, int(seed), int(batch_size)
    self.augment_config, self.k = augment_config, int(k)

  def inputs(self, step: int) -> tuple:
    """The arguments after the state for the steps ``step + 1 .. step + k`` (positions ``step ..``)."""
    return (self.data, jnp.asarray(step, jnp.int32))

  def make_step(self, train_step: Callable) -> Callable:
    if self.k == 1:  # one step per dispatch, its batch made inside: no loop around the step
      batch_at = functools.partial(
        ondevice.batch_at,
        seed=self.seed,
        batch_size=self.batch_size,
        augment_config=self.augment_config,
      )
      return lambda state, data, start: train_step(state, batch_at(data, start))
    return functools.partial(
      ondevice.scan_steps,
      train_step,
      k=self.k,
      seed=self.seed,
      batch_size=self.batch_size,
      augment_config=self.augment_config,
    )

  def batch_spec(self) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes of one step's batch (for XLA's FLOPs of a single step)."""
    return jax.eval_shape(
      functools.partial(
        ondevice.batch_at,
        seed=self.seed,
        batch_size=self.batch_size,
        augment_config=self.augment_config,
      ),
      self.data,
      0,
    )


def event_steps(
  config, when: Callable[[Any, int], bool] | None, extra: tuple[int, ...] = ()
) -> list[int]:
  """Every step after which the loop must stop for the host (a pure function of the config).

  ``extra``: more such steps (a test's ``stop_after``).
  """
  n = config.num_steps
  out = [s for s in extra if 0 < s < n]
  for s in range(1, n + 1):
    if (
      s == n
      or s % config.log_every == 0
      or (when is not None and when(config, s))
      or (config.eval_every and s % config.eval_every == 0)
      or (config.checkpoint.every and s % config.checkpoint.every == 0)
    ):
      out.append(s)
  return out


def steps_per_dispatch(
  config,
  when: Callable[[Any, int], bool] | None,
  extra: tuple[int, ...] = (),
  backend: str | None = None,
) -> int:
  """``config.steps_per_dispatch``, or (0) the largest k <= 50 dividing every event step.

  On a CPU backend the default is 1: XLA:CPU runs a convolutional train step inside
  a loop (``lax.scan``) many times slower than the same step on its own (measured:
  18× for the CIFAR-subset ConvNet), and a CPU pays little per dispatch anyway. An
  explicit value must divide every event step: otherwise a log record, a prune or
  a save would move to another step.
  """
  events = event_steps(config, when, extra)
  common = functools.reduce(math.gcd, events, 0)
  k = config.steps_per_dispatch
  if k:
    if common % k:
      raise ValueError(
        f'steps_per_dispatch={k} does not divide every step the loop stops at (log_every='
        f'{config.log_every}, the method\'s checks, eval_every, checkpoint.every, num_steps='
        f'{config.num_steps}: their gcd is {common}); use a divisor of {common}, or 0 (auto).'
      )
    return k
  if (backend or jax.default_backend()) == 'cpu':
    return 1
  return max(d for d in range(1, min(common, MAX_STEPS_PER_DISPATCH) + 1) if common % d == 0)


def device_reason(config, info, mesh) -> str | None:
  """Why the device feed cannot serve ``config`` (None: it can)."""
  if jax.process_count() > 1 or (mesh is not None and mesh.devices.size > 1):
    return 'the run spans several devices (the on-device batch is not sharded yet)'
  try:
    ondevice.make_augment_config(config.data, config.batch_augment)
  except ValueError as e:
    return str(e)
  nbytes = ondevice.split_nbytes(info.num_train, info.image_shape)
  if not ondevice.fits_in_memory(nbytes):
    return f'the training split ({nbytes / 2**20:.0f} MiB) does not fit in memory'
  return None


def make(
  config,
  info,
  mesh,
  when,
  *,
  placement: str,
  seed: int,
  host_batches: Callable[[], Iterator[dict]],
  extra_events: tuple[int, ...] = (),
):
  """The feed ``placement`` asks for (``data.placement``; ``'auto'``: the device where it can)."""
  if placement not in PLACEMENTS:
    raise ValueError(f'data.placement={placement!r} is not one of {list(PLACEMENTS)}.')
  why = None if placement == 'host' else device_reason(config, info, mesh)
  if placement == 'device' and why is not None:
    raise ValueError(f"data.placement='device' but {why}; use 'host' or 'auto'.")
  if placement == 'host' or why is not None:
    return HostFeed(host_batches())
  images, labels, mean, std = ondevice.load_train_split(config.data)
  return DeviceFeed(
    ondevice.put_on_device(images, labels, mean=mean, std=std),
    seed=seed,
    batch_size=config.batch_size,
    augment_config=ondevice.make_augment_config(config.data, config.batch_augment),
    k=steps_per_dispatch(config, when, extra_events),
  )


__all__ = [
  'DeviceFeed',
  'HostFeed',
  'MAX_STEPS_PER_DISPATCH',
  'PLACEMENTS',
  'device_reason',
  'event_steps',
  'make',
  'steps_per_dispatch',
]
