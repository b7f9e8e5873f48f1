"""Checkpoints that survive pruning: orbax ``CheckpointManager`` with ``args.Composite``.

One checkpoint (a step directory under ``<workdir>/checkpoints``) holds two items:

* ``meta`` (JSON, read first): the format version, the step, the data position
  (training batches consumed), the **architecture spec** (model name, kwargs,
  current widths per unit group, input shape), the config it was written with,
  a table of every saved array (path, shape, dtype) with a fingerprint of each,
  the paths and implementations of typed PRNG keys, the run's host-side state
  (prune events, a method's ``memo``/``stats``, unit ids, ...: every field of
  :class:`demp.trainer.run.Run` listed in ``demp.trainer.run.HOST_FIELDS``) and
  the trainer's counters (time segments, FLOPs, the current log window);
* ``arrays`` (orbax ``StandardSave``): a flat dict ``path -> array`` of
  ``run.state`` (params, batch stats, optimizer state; typed PRNG keys as their
  raw key data) and of the arrays inside the host-side state.

Restoring reads ``meta`` first, rebuilds the model at the saved widths, derives
the abstract state of that model (``jax.eval_shape`` of ``init`` and of the
optimizer's ``init``: no compute), checks it against the saved table, then
restores the arrays straight into those shapes and shardings and checks their
fingerprints. A checkpoint written after any number of prune events therefore
restores into the right shapes; one that does not fit the config or the code
raises :class:`CheckpointMismatchError`, an unreadable or altered one
:class:`CheckpointCorruptError`. Neither is ever deleted or overwritten: the
error says what to do.

Writes are asynchronous (orbax copies the arrays to host memory, then writes in
a background thread while training goes on) and atomic (a temporary directory
renamed when complete): a process killed mid-save leaves the previous
checkpoint intact, and the leftover temporary directory is removed by the next
run. Keep-last-N is orbax's ``LatestN`` preservation policy.

Data position: the tf.data pipeline of :mod:`demp.data` is deterministic given
its seed, so the position is the number of batches consumed and a resumed run
skips that many examples inside the pipeline, before decoding and augmentation
(``data.train_iterator(start_batch=...)``). This is exact and needs no
iterator state on disk (tf.data iterator checkpoints would store the shuffle
buffer: gigabytes for ImageNet). Its cost is reading (not decoding) the
skipped records: negligible for in-memory and cached sources, but a late
ImageNet resume re-reads the consumed epochs' files;
``checkpoint.data_resume='reseed'`` instead restarts the stream from a seed
derived from the position (instant, not bit-identical).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
import zlib
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from demp import export, models, surgery
from demp.trainer import run as run_lib

PyTree = Any

FORMAT = 1
"""Version of the layout above; a checkpoint of another version is rejected."""

RESUME_MUTABLE = (
  'checkpoint',
  'log_every',
  'eval_every',
  'eval_batch_size',
  'progress_bar',
  'data.data_dir',
  'compilation_cache',
)
"""Config keys (and subtrees) that may differ between a checkpoint and the resumed run."""


class CheckpointCorruptError(RuntimeError):
  """A checkpoint cannot be read or its arrays do not match their fingerprints."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint that does not fit the config or the code."""


# ----------------------------------------------------------------------------
# The manager.


def manager(directory: str, *, keep: int = 3, async_save: bool = True) -> ocp.CheckpointManager:
  """A ``CheckpointManager`` keeping the last ``keep`` steps; saves are asynchronous.

  The trainer decides when to save (``save(..., force=True)``); temporary
  directories of interrupted saves are removed on creation.
  """
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(keep),
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
    create=True,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def step_dir(mngr: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(mngr.directory), str(step))


def read_meta(mngr: ocp.CheckpointManager, step: int | None = None) -> dict | None:
  """The ``meta`` item of ``step`` (default: the latest); None when there is no checkpoint."""
  step = mngr.latest_step() if step is None else step
  if step is None:
    return None
  path = step_dir(mngr, step)
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(
      f'cannot read the checkpoint metadata of {path}: {type(e).__name__}: {e}. {_advice(path)}'
    ) from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise CheckpointMismatchError(
      f'{path} is not a demp checkpoint of format {FORMAT} '
      f'(format={meta.get("format") if isinstance(meta, dict) else None!r}). {_advice(path)}'
    )
  if meta.get('step') != step:
    raise CheckpointCorruptError(f'{path} says it is step {meta.get("step")}. {_advice(path)}')
  return meta


def _advice(path: str) -> str:
  return (
    f'It was left untouched. To resume from an earlier checkpoint, move {path} out of '
    f'the checkpoints directory; to start afresh, use a new workdir.'
  )


# ----------------------------------------------------------------------------
# Flattening: any pytree <-> a flat dict of arrays with readable paths.


def _path(keypath) -> str:
  return jax.tree_util.keystr(keypath, simple=True, separator='/')


def _is_key(x) -> bool:
  return hasattr(x, 'dtype') and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten(tree: PyTree, prefix: str) -> tuple[dict[str, Any], dict[str, str]]:
  """``(path -> leaf, path -> PRNG impl)``; typed keys become their raw key data."""
  flat, keys = {}, {}
  for kp, leaf in jax.tree.flatten_with_path(tree)[0]:
    path = f'{prefix}/{_path(kp)}' if kp else prefix
    if _is_key(leaf):
      keys[path] = str(jax.random.key_impl(leaf))
      leaf = jax.random.key_data(leaf)
    flat[path] = leaf
  return flat, keys


def _table(flat: Mapping[str, Any]) -> dict[str, list]:
  return {
    k: [list(np.shape(v)), str(v.dtype if hasattr(v, 'dtype') else np.asarray(v).dtype)]
    for k, v in flat.items()
  }


def _targets(meta: Mapping, sharding) -> dict[str, Any]:
  """Restore targets: device arrays on ``sharding``; host-side arrays as numpy (exact dtype)."""
  return {
    k: np.empty(tuple(shape), np.dtype(dtype))
    if k.startswith('host/')
    else jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)
    for k, (shape, dtype) in meta['arrays'].items()
  }


def _abstract(tree: PyTree, prefix: str) -> dict[str, jax.ShapeDtypeStruct]:
  """Like :func:`flatten` for a tree of ``ShapeDtypeStruct`` (key leaves -> key data)."""
  flat = {}
  for kp, leaf in jax.tree.flatten_with_path(tree)[0]:
    path = f'{prefix}/{_path(kp)}' if kp else prefix
    if _is_key(leaf):
      leaf = jax.eval_shape(jax.random.key_data, leaf)
    flat[path] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
  return flat


# ----------------------------------------------------------------------------
# Fingerprints: CRC-32 of every leaf's bytes, computed on host.


def fingerprints(flat: Mapping[str, Any]) -> dict[str, int]:
  """``path -> CRC-32`` of each array's bytes (C order); written with, and checked against, the data.

  Costs a device-to-host copy and about 1.5 ms per MB on one CPU core (on host,
  not jitted, so a new architecture costs no compilation).
  """
  out = {}
  for k, v in flat.items():
    a = np.ascontiguousarray(np.asarray(v))
    out[k] = zlib.crc32(a.view(np.uint8).reshape(-1) if a.size else b'')
  return out


# ----------------------------------------------------------------------------
# Host-side state: JSON with tagged containers; arrays travel with the arrays item.


def _encode(x, arrays: dict[str, np.ndarray], where: str):
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, np.generic):
    return {'__scalar__': x.item(), 'dtype': str(x.dtype)}
  if _is_key(x):
    return {
      '__key__': _encode(jax.random.key_data(x), arrays, where),
      'impl': str(jax.random.key_impl(x)),
    }
  if isinstance(x, (np.ndarray, jax.Array)):
    name = f'a{len(arrays)}'
    arrays[name] = np.asarray(x)
    return {'__array__': name}
  if isinstance(x, Mapping):
    if all(isinstance(k, str) and not k.startswith('__') for k in x):
      return {k: _encode(v, arrays, f'{where}.{k}') for k, v in x.items()}
    return {
      '__pairs__': [
        [_encode(k, arrays, where), _encode(v, arrays, f'{where}[{k!r}]')] for k, v in x.items()
      ]
    }
  if isinstance(x, list):
    return [_encode(v, arrays, f'{where}[{i}]') for i, v in enumerate(x)]
  if isinstance(x, (tuple, set, frozenset)):  # NamedTuples come back as plain tuples
    tag = (
      '__frozenset__'
      if isinstance(x, frozenset)
      else '__set__'
      if isinstance(x, set)
      else '__tuple__'
    )
    items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
    return {tag: [_encode(v, arrays, f'{where}[{i}]') for i, v in enumerate(items)]}
  raise TypeError(
    f'cannot checkpoint {where} of type {type(x).__name__}: host-side run state '
    f'must be numbers, strings, arrays, PRNG keys, and dicts/lists/tuples/sets of them.'
  )


def _decode(x, arrays: Mapping[str, np.ndarray]):
  if isinstance(x, list):
    return [_decode(v, arrays) for v in x]
  if not isinstance(x, dict):
    return x
  if '__scalar__' in x:
    return np.asarray(x['__scalar__'], x['dtype'])[()]
  if '__key__' in x:
    return jax.random.wrap_key_data(_decode(x['__key__'], arrays), impl=x['impl'])
  if '__array__' in x:
    return np.asarray(arrays[x['__array__']])
  if '__pairs__' in x:
    return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in x['__pairs__']}
  for tag, kind in (('__tuple__', tuple), ('__set__', set), ('__frozenset__', frozenset)):
    if tag in x:
      return kind(_hashable(_decode(v, arrays)) for v in x[tag])
  return {k: _decode(v, arrays) for k, v in x.items()}


def _hashable(x):
  return tuple(_hashable(v) for v in x) if isinstance(x, list) else x


def host_state(run) -> dict[str, Any]:
  """The run's host-side fields (events, a method's memo/stats, unit ids, ...)."""
  return {name: getattr(run, name) for name in run_lib.HOST_FIELDS}


def encode_host_state(run) -> tuple[dict, dict[str, np.ndarray]]:
  """``(JSON-able tree, arrays)``; raises TypeError naming a field that cannot be saved."""
  arrays: dict[str, np.ndarray] = {}
  return {k: _encode(v, arrays, f'run.{k}') for k, v in host_state(run).items()}, arrays


# ----------------------------------------------------------------------------
# Config compatibility.


def _flat_config(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat_config(v, key + '.'))
    else:
      out[key] = v
  return out


def config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _mutable(key: str) -> bool:
  return any(key == m or key.startswith(m + '.') for m in RESUME_MUTABLE)


def added_keys_at_default(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
  """Flat keys ``now`` has and ``saved`` lacks whose value now is their default.

  Such a key was added to the code after the run started, and the run takes
  its default: it does not make the run another run, so a resume is allowed
  (with a warning). A key the user set to a non-default value still differs.
  """
  from demp.trainer import config as config_lib  # pylint: disable=g-import-not-at-top

  defaults = _flat_config(config_json(config_lib.base_config()))
  return sorted(k for k in now if k not in saved and k in defaults and now[k] == defaults[k])


def check_config(meta: Mapping, config: ml_collections.ConfigDict, path: str) -> None:
  """Raises :class:`CheckpointMismatchError` listing every key that differs.

  Keys added to the code since the checkpoint was written, at their defaults,
  do not differ (:func:`added_keys_at_default`; logged).
  """
  saved, now = _flat_config(meta['config']), _flat_config(config_json(config))
  added = added_keys_at_default(saved, now)
  if added:
    logging.warning('%s predates the config keys %s: the run takes their defaults.', path, added)
  missing = object()
  diffs = [
    k
    for k in sorted(set(saved) | set(now))
    if not _mutable(k) and k not in added and saved.get(k, missing) != now.get(k, missing)
  ]
  if diffs:
    lines = '; '.join(
      f'{k}: checkpoint {saved.get(k, "<absent>")!r} vs now {now.get(k, "<absent>")!r}'
      for k in diffs[:12]
    )
    raise CheckpointMismatchError(
      f'the checkpoint {path} was written with a different config ({len(diffs)} keys differ: '
      f'{lines}). Resuming would not continue the same run: use the original config, or a new '
      f'workdir for the new one (only {list(RESUME_MUTABLE)} may change on resume).'
    )


# ----------------------------------------------------------------------------
# Save.


def save(mngr: ocp.CheckpointManager, run, *, batches: int, progress: Mapping[str, Any]) -> None:
  """Starts writing ``run`` at ``run.step`` (asynchronous; see ``mngr.wait_until_finished``).

  Args:
    mngr: from :func:`manager`.
    run: a ``demp.trainer.run.Run`` (model, state, step and host-side fields are saved).
    batches: training batches consumed so far on each host (the data position).
    progress: the trainer's JSON-able counters, handed back by :func:`restore`.
  """
  state_flat, keys = flatten(run.state, 'state')
  host_json, host_arrays = encode_host_state(run)
  flat = {**state_flat, **{f'host/{k}': np.asarray(v) for k, v in host_arrays.items()}}
  model = run.model
  meta = {
    'format': FORMAT,
    'step': int(run.step),
    'batches': int(batches),
    'model': {
      'name': run.config.model.name,
      'widths': {k: int(v) for k, v in model.widths.items()},
      'input_shape': [int(d) for d in run.death_images.shape[1:]],
      'num_classes': int(getattr(model, 'num_classes', -1)),
    },
    'config': config_json(run.config),
    'arrays': _table(flat),
    'fingerprints': fingerprints(flat),
    'prng_keys': keys,
    'host': host_json,
    'progress': dict(progress),
    'written': {
      'time': time.time(),
      'processes': jax.process_count(),
      'devices': jax.device_count(),
      'jax': jax.__version__,
    },
  }
  mngr.save(
    run.step,
    args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), arrays=ocp.args.StandardSave(flat)),
    force=True,
  )


# ----------------------------------------------------------------------------
# The final network: what a finished run ships, whatever checkpoint.every says.

FINAL = 'final'
"""``<workdir>/final/``: ``meta.json`` and ``variables/`` (params and batch stats)."""


def save_final(workdir: str, run) -> str:
  """Writes the run's final network into ``<workdir>/final`` (replacing one there); returns it.

  Params and batch statistics only (no optimizer state), an orbax
  ``StandardCheckpointer`` directory, and ``meta.json`` with the config and the
  model's widths, input shape and class count: enough for :func:`load` and for
  ``python -m scripts.export``. A few hundred KB to a few MB for the subset models.
  """
  out = os.path.join(workdir, FINAL)
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.makedirs(out)
  variables = jax.device_get(
    {'params': run.state['params'], 'batch_stats': run.state['batch_stats']}
  )
  export.save_variables(os.path.join(out, 'variables'), variables)
  meta = {
    'format': FORMAT,
    'step': int(run.step),
    'model': {
      'name': run.config.model.name,
      'widths': {k: int(v) for k, v in run.model.widths.items()},
      'input_shape': [int(d) for d in run.death_images.shape[1:]],
      'num_classes': int(getattr(run.model, 'num_classes', -1)),
    },
    'config': config_json(run.config),
  }
  with open(os.path.join(out, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=2)
  return out


def load_final(workdir: str) -> tuple[Any, dict, dict]:
  """``(model, variables, meta)`` of ``<workdir>/final`` (see :func:`save_final`)."""
  path = os.path.join(workdir, FINAL)
  if not os.path.exists(os.path.join(path, 'meta.json')):
    raise FileNotFoundError(f'no final network in {workdir} ({path}/meta.json is missing).')
  with open(os.path.join(path, 'meta.json')) as f:
    meta = json.load(f)
  model = models.from_config(meta['config']['model'], meta['model']['num_classes'])
  model = model.clone(widths=flax.core.FrozenDict(meta['model']['widths']))
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *meta['model']['input_shape'])), train=False
    )
  )
  target = export.saved_collections(shapes)
  ckptr = ocp.StandardCheckpointer()
  variables = ckptr.restore(os.path.abspath(os.path.join(path, 'variables')), target)
  ckptr.close()
  return model, dict(variables), meta


# ----------------------------------------------------------------------------
# Restore.


def abstract_state(model, tx, input_shape) -> PyTree:
  """``ShapeDtypeStruct`` tree of ``{params, batch_stats, opt_state}`` for ``model`` (no compute)."""
  return jax.eval_shape(
    lambda: run_lib.create_train_state(model, tx, jax.random.key(0), input_shape)
  )


def _compare(saved: Mapping[str, list], expected: Mapping[str, jax.ShapeDtypeStruct]) -> list[str]:
  out = [f'{k}: missing from the checkpoint' for k in expected if k not in saved]
  out += [f'{k}: in the checkpoint but not expected' for k in saved if k not in expected]
  for k, sds in expected.items():
    if k in saved and (tuple(saved[k][0]) != tuple(sds.shape) or saved[k][1] != str(sds.dtype)):
      out.append(
        f'{k}: checkpoint {tuple(saved[k][0])} {saved[k][1]} vs expected '
        f'{tuple(sds.shape)} {sds.dtype}'
      )
  return out


def _restore_arrays(mngr, step: int, meta: Mapping, targets: Mapping[str, jax.ShapeDtypeStruct]):
  path = step_dir(mngr, step)
  try:
    flat = mngr.restore(
      step, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(dict(targets)))
    )['arrays']
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(
      f'cannot read the arrays of {path}: {type(e).__name__}: {e}. {_advice(path)}'
    ) from e
  got = fingerprints(flat)
  bad = sorted(k for k in meta['fingerprints'] if got.get(k) != meta['fingerprints'][k])
  if bad:
    raise CheckpointCorruptError(
      f'{path} is corrupt: {len(bad)} arrays do not match the fingerprints written with them '
      f'(first: {bad[:5]}). {_advice(path)}'
    )
  return flat


def restore(mngr: ocp.CheckpointManager, meta: Mapping, run, mesh=None) -> dict[str, Any]:
  """Restores ``meta['step']`` into ``run`` in place; returns the trainer's ``progress``.

  ``run`` must be freshly built from the same config (:func:`check_config`):
  its model is rebuilt at the saved widths, its state replaced (replicated over
  ``mesh`` when given, else on the default device), and its step and host-side
  fields set. Raises :class:`CheckpointMismatchError` when the saved arrays do
  not have the shapes this code derives for the saved architecture, and
  :class:`CheckpointCorruptError` when they cannot be read or were altered.
  """
  step = int(meta['step'])
  path = step_dir(mngr, step)
  widths = meta['model']['widths']
  if set(widths) != set(run.model.widths):
    raise CheckpointMismatchError(
      f'{path} has unit groups {sorted(widths)}, the model has {sorted(run.model.widths)}. '
      f'{_advice(path)}'
    )
  model = run.model.clone(widths=flax.core.FrozenDict(widths))
  abstract = abstract_state(model, run.tx, tuple(meta['model']['input_shape']))
  expected = _abstract(abstract, 'state')
  saved_state = {k: v for k, v in meta['arrays'].items() if k.startswith('state/') or k == 'state'}
  problems = _compare(saved_state, expected)
  if problems:
    raise CheckpointMismatchError(
      f'{path} does not fit the model {meta["model"]["name"]} at widths {widths}: '
      f'{"; ".join(problems[:8])}{" ..." if len(problems) > 8 else ""}. The model or optimizer '
      f'code changed since it was written. {_advice(path)}'
    )

  if mesh is not None:
    from demp.trainer import parallel  # pylint: disable=g-import-not-at-top

    sharding = parallel.replicated(mesh)
  else:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  flat = _restore_arrays(mngr, step, meta, _targets(meta, sharding))

  leaves = []
  for path_k in expected:
    leaf = flat[path_k]
    if path_k in meta['prng_keys']:
      leaf = jax.random.wrap_key_data(leaf, impl=meta['prng_keys'][path_k])
    leaves.append(leaf)
  treedef = jax.tree.structure(abstract)
  run.state = jax.tree.unflatten(treedef, leaves)
  run.model = model
  run.step = step
  run.compiled = None
  host_arrays = {k[len('host/') :]: np.asarray(v) for k, v in flat.items() if k.startswith('host/')}
  for name, value in meta['host'].items():
    if not hasattr(run, name):
      raise CheckpointMismatchError(
        f'{path} holds run.{name}, which this code\'s Run lacks. {_advice(path)}'
      )
    setattr(run, name, _decode(value, host_arrays))
  return dict(meta['progress'])


def load(directory: str, step: int | None = None) -> tuple[Any, dict, dict]:
  """``(model, variables, meta)`` of a checkpoint, for evaluation and inspection.

  ``directory`` is a workdir or its ``checkpoints`` folder. The model is built
  from the saved config at the saved widths; ``variables`` holds ``params`` and
  ``batch_stats`` (the optimizer state needs the optimizer: use the trainer).
  A checkpoint saved between a prune decision and its switch
  (``prune.switch_after``) holds the units silenced: they are removed here, so
  the model is the one the run trains from the switch on (the same function).
  """
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  mngr = ocp.CheckpointManager(
    os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True)
  )
  meta = read_meta(mngr, step)
  if meta is None:
    raise FileNotFoundError(f'no checkpoint in {directory}.')
  model = models.from_config(meta['config']['model'], meta['model']['num_classes'])
  model = model.clone(widths=flax.core.FrozenDict(meta['model']['widths']))
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  flat = _restore_arrays(mngr, meta['step'], meta, _targets(meta, sharding))
  variables = {
    'params': _nest(flat, 'state/params/'),
    'batch_stats': _nest(flat, 'state/batch_stats/'),
  }
  host_arrays = {k[len('host/') :]: np.asarray(v) for k, v in flat.items() if k.startswith('host/')}
  pending = _decode(meta['host'].get('pending'), host_arrays)
  if pending:
    model, variables, _ = surgery.prune(model, variables, {}, pending['keeps'])
  return model, variables, meta


def _nest(flat: Mapping[str, Any], prefix: str) -> dict:
  out: dict = {}
  for k, v in flat.items():
    if k.startswith(prefix):
      *parents, leaf = k[len(prefix) :].split('/')
      node = out
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = v
  return out


# ----------------------------------------------------------------------------
# Preemption.


class Preemption:
  """Has SIGTERM been received (this host) or a preemption sync point reached (all hosts)?

  Used as a context manager: installs a SIGTERM handler that only sets a flag
  (the trainer saves a checkpoint at the end of the current step and returns)
  and restores the previous handler on exit. With several processes, JAX's
  preemption service (started by ``jax.distributed.initialize``) notices the
  signal and every host agrees on the step through
  ``CheckpointManager.reached_preemption``.
  """

  def __init__(self):
    self.signalled = False
    self._previous = None

  def _handler(self, signum, frame):
    del frame
    logging.warning(
      'signal %d received: saving a checkpoint after this step, then stopping.', signum
    )
    self.signalled = True

  def __enter__(self) -> 'Preemption':
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def reached(self, mngr: ocp.CheckpointManager, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(mngr.reached_preemption(step)) or self.signalled
    return self.signalled


@contextlib.contextmanager
def closing(mngr: ocp.CheckpointManager):
  """Waits for in-flight writes and closes the manager, even on an exception."""
  try:
    yield mngr
  finally:
    mngr.wait_until_finished()
    mngr.close()


def truncate_log(path: str, step: int) -> None:
  """Drops records after ``step`` from a JSONL log (written after the checkpoint resumed from)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  keep = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by the kill
    if record.get('step', 0) <= step and 'summary' not in record:
      keep.append(line if line.endswith('\n') else line + '\n')
  with open(path + '.tmp', 'w') as f:
    f.writelines(keep)
  os.replace(path + '.tmp', path)


__all__ = [
  'CheckpointCorruptError',
  'CheckpointMismatchError',
  'FORMAT',
  'Preemption',
  'RESUME_MUTABLE',
  'abstract_state',
  'check_config',
  'closing',
  'load',
  'manager',
  'read_meta',
  'restore',
  'save',
  'truncate_log',
]
