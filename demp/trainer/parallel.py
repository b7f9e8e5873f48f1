"""Data parallelism over every device: one mesh, the batch split on ``'data'``.

The trainer uses one 1-D mesh over all devices of all hosts (:func:`data_mesh`).
The batch is sharded along its leading axis on the ``'data'`` axis; params,
batch stats and optimizer state are replicated. The train step is an ordinary
``jax.jit`` with these shardings (:func:`step_shardings`): XLA's SPMD
partitioner turns the batch means of the loss and of BatchNorm's statistics
into all-reduces, so the step computes exactly what one device would compute on
the global batch, up to the order of floating-point reductions.

Multi-host: every process runs the same program (``jax.distributed.initialize``
first, :func:`initialize_distributed`), reads its own shard of the training
data (``demp.data.train_iterator`` shards by ``jax.process_index()``), and the
global batch is assembled with ``jax.make_array_from_process_local_data``
(:func:`global_batch`). Everything that is the same on every host (initial
params, the death-check examples, eval batches) is placed with
:func:`replicate` / :func:`shard_global`, which build global arrays from host
data without cross-host transfers.

The death check runs replicated: every device applies the model to all the
fixed examples, so the AND over examples spans all of them on every device and
the host-fetched masks are identical on every host (checked with
:func:`assert_same_across_hosts` before every surgery).

Example::

    mesh = data_mesh()                                  # all devices
    state = replicate(state, mesh)
    step = jax.jit(train_step, donate_argnums=0, **step_shardings(mesh))
    batch = global_batch(next(local_iterator), mesh)    # per-host numpy batch
    state, metrics = step(state, batch)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any

DATA_AXIS = 'data'


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Starts multi-host JAX (``jax.distributed.initialize``); call before any JAX op.

  With no arguments, JAX finds the cluster itself on Cloud TPU pod slices,
  SLURM and Open MPI; elsewhere give all three (the same address on every
  process, a distinct ``process_id`` in ``[0, num_processes)``).
  """
  kwargs = {
    k: v
    for k, v in (
      ('coordinator_address', coordinator_address),
      ('num_processes', num_processes),
      ('process_id', process_id),
    )
    if v is not None
  }
  jax.distributed.initialize(**kwargs)


def data_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named ``'data'`` over ``devices`` (default: all devices of all hosts)."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
    (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the ``'data'`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def step_shardings(mesh: Mesh) -> dict[str, Any]:
  """``jax.jit`` kwargs for ``step(state, batch) -> (state, metrics)``."""
  return {
    'in_shardings': (replicated(mesh), batch_sharded(mesh)),
    'out_shardings': (replicated(mesh), replicated(mesh)),
  }


def check_batch_size(key: str, batch_size: int, num_devices: int | None = None) -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the devices."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  if batch_size % num_devices:
    raise ValueError(
      f'{key}={batch_size} is not divisible by the device count {num_devices}; '
      f'the batch is split evenly over all devices: use a multiple of {num_devices}.'
    )


def host_batch_size(global_batch_size: int) -> int:
  """This host's share of the global batch."""
  n = jax.process_count()
  if global_batch_size % n:
    raise ValueError(f'batch_size={global_batch_size} is not divisible by the process count {n}.')
  return global_batch_size // n


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _place(x, sharding: NamedSharding):
  """One leaf onto ``sharding``; typed PRNG keys go through their raw key data."""
  if _is_key(x):
    return jax.random.wrap_key_data(
      _place(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x)
    )
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  # Multi-host: the same value is on every host; build the global array from it.
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Every leaf on every device of ``mesh`` (the value must be the same on every host)."""
  sharding = replicated(mesh)
  return jax.tree.map(lambda x: _place(x, sharding), tree)


def shard_global(tree: PyTree, mesh: Mesh) -> PyTree:
  """Leading axis split over ``'data'``, from a *global* value every host holds."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(lambda x: _place(x, sharding), tree)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """The global batch from each host's own rows (``[B / num_hosts, ...]`` per host)."""
  sharding = batch_sharded(mesh)
  return {
    k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
    for k, v in local_batch.items()
  }


def global_batches(
  local_batches: Iterator[Mapping[str, np.ndarray]], mesh: Mesh
) -> Iterator[dict[str, jax.Array]]:
  for batch in local_batches:
    yield global_batch(batch, mesh)


def assert_same_across_hosts(tree: PyTree, what: str) -> None:
  """Raises if a host-side value differs between hosts (no-op on one host)."""
  if jax.process_count() > 1:
    multihost_utils.assert_equal(tree, fail_message=f'{what} differ between hosts.')


def describe(mesh: Mesh) -> dict[str, int]:
  """Devices and processes of the mesh, for logs and summaries."""
  return {
    'devices': int(mesh.devices.size),
    'processes': jax.process_count(),
    'local_devices': jax.local_device_count(),
  }


__all__ = [
  'DATA_AXIS',
  'assert_same_across_hosts',
  'batch_sharded',
  'check_batch_size',
  'data_mesh',
  'describe',
  'global_batch',
  'global_batches',
  'host_batch_size',
  'initialize_distributed',
  'replicate',
  'replicated',
  'shard_global',
  'step_shardings',
]
