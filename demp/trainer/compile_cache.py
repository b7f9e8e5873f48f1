"""JAX's persistent compilation cache for a run, and counts of its hits and misses.

``config.compilation_cache`` says where compiled executables are kept on disk,
so that a rerun, a resume or a sweep with the same shapes loads them instead of
compiling again:

* ``'workdir'`` (the default): ``<workdir>/jax_cache``;
* any other non-empty string: that directory (share one between the runs of a
  sweep: every train step, eval step and death check of a width seen by any
  of them is then compiled once);
* ``''``: off (no cache is read or written).

:func:`start` (inside a :func:`session`, or :func:`use` for both) points JAX's cache at the
directory (``jax_compilation_cache_dir``), with the size and compile-time
thresholds at 0 so that the small CPU compiles of this project are cached too,
resets JAX's cache object so that a second run in the same process with another
directory really uses it; the session restores the settings it found on exit. It
counts, with :mod:`jax.monitoring` listeners, the compilations that were served
by the cache (``compile_cache_hits``), the ones compiled and written to it
(``compile_cache_misses``) and every XLA compilation that was not served by
it (``compiles``: the misses, plus any compile the cache did not see); the
trainer puts them in ``summary.json``. The counts are process-wide: a
background compilation of the run counts, and so would another thread's.

Each compilation not served by the cache is also attributed (:func:`attribution`)
to a *function* and an *architecture*: the trainer wraps each phase that may
compile in :func:`phase` (``'train_step'``, ``'eval_step'``, ``'death_check'``,
``'silence'``, ...) with the widths it compiles for; a compile outside every phase
is ``'other'``, attributed to the architecture the run is at
(:func:`set_architecture`), and named by XLA's function name in
``compiles_other``. The phase is thread-local, so a background compile is
attributed by its own thread's phase, never by what the main thread is doing.

Entries are keyed by a hash of the lowered program, the compile options, the
devices and the JAX/XLA versions, so a stale entry is never used; the
directory may be deleted at any time. As JAX warns, the cache is trusted code:
never point it at a directory others can write to.

Example::

    with compile_cache.use('workdir', workdir) as counts:
      ...  # compile and run
    print(counts.summary())  # {'compile_cache_dir': ..., 'compile_cache_hits': 3, ...}
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from typing import Any

import jax
from jax._src import compilation_cache as _jax_cache  # reset_cache: no public reset yet

DIRNAME = 'jax_cache'
"""The cache's directory under the workdir with ``compilation_cache='workdir'``."""

WORKDIR = 'workdir'

HIT = '/jax/compilation_cache/cache_hits'
MISS = '/jax/compilation_cache/cache_misses'  # recorded when an executable is written
COMPILE = '/jax/core/compile/backend_compile_duration'  # every XLA compile, hits included

_SETTINGS = (
  'jax_compilation_cache_dir',
  'jax_persistent_cache_min_compile_time_secs',
  'jax_persistent_cache_min_entry_size_bytes',
)

_lock = threading.Lock()
_counts = {HIT: 0, MISS: 0, COMPILE: 0}
_registered = False
_local = threading.local()  # .phases: the stack of (function, widths); .hit: a cache hit is due
_log: list[tuple[str, tuple | None, float, bool, str]] = []  # (function, arch, s, hit, fun_name)
_architecture: list[tuple | None] = [None]  # the run's widths now, for compiles outside a phase

OTHER = 'other'
FUNCTIONS = ('train_step', 'eval_step', 'death_check', 'silence', 'finite_check', 'switch')
"""The phases the trainer names (:func:`phase`); ``'flops'`` (the summary's FLOP counts) and
:data:`OTHER` complete ``compiles_by_function``."""


def _key(widths) -> tuple | None:
  return None if widths is None else tuple(sorted((str(k), int(v)) for k, v in widths.items()))


@contextlib.contextmanager
def phase(function: str, widths=None) -> Iterator[None]:
  """Attributes the compiles of this thread in the body to ``function`` at ``widths``.

  ``widths`` (group -> width) is the architecture compiled for; None: no
  architecture (the summary's FLOP counts). Phases nest: the innermost counts.
  """
  stack = _local.__dict__.setdefault('phases', [])
  stack.append((function, _key(widths)))
  try:
    yield
  finally:
    stack.pop()


def set_architecture(widths) -> None:
  """The run is now at ``widths``: compiles outside every phase are attributed to it."""
  _architecture[0] = _key(widths)


def _on_event(event: str, **kwargs) -> None:
  if event in (HIT, MISS):
    with _lock:
      _counts[event] += 1
    if event == HIT:  # the compile event that follows on this thread was served by the cache
      _local.hit = True


def _on_duration(event: str, duration: float, **kwargs) -> None:
  if event == COMPILE:
    hit = getattr(_local, 'hit', False)
    _local.hit = False
    stack = getattr(_local, 'phases', None)
    function, arch = stack[-1] if stack else (OTHER, _architecture[0])
    with _lock:
      _counts[COMPILE] += 1
      _log.append((function, arch, float(duration), hit, str(kwargs.get('fun_name', '?'))))


def _register() -> None:
  """Adds the listeners once per process (jax.monitoring has no scoped listeners)."""
  global _registered
  with _lock:
    if _registered:
      return
    jax.monitoring.register_event_listener(_on_event)
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    _registered = True


def _snapshot() -> dict[str, int]:
  with _lock:
    return {**_counts, 'log': len(_log)}


def check(value) -> None:
  """Raises ValueError unless ``value`` is a valid ``compilation_cache`` setting.

  Allowed: ``'workdir'``, ``''`` (off), or a path that says it is one (it has a
  ``/`` or starts with ``~``: ``'/data/jax_cache'``, ``'./jax_cache'``), so a
  misspelt ``'workdir'`` is refused rather than used as a directory name.
  """
  allowed = (
    f"allowed: {WORKDIR!r} (<workdir>/{DIRNAME}), '' (off), or a directory path with a '/' "
    f"or a leading '~' (e.g. '/data/jax_cache', './jax_cache')"
  )
  if not isinstance(value, str):
    raise ValueError(f'compilation_cache={value!r} must be a string; {allowed}.')
  if value in (WORKDIR, ''):
    return
  if '/' not in value and not value.startswith('~'):
    raise ValueError(f'compilation_cache={value!r} is not a path; {allowed}.')
  path = os.path.expanduser(value)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f'compilation_cache={value!r} is a file, not a directory; {allowed}.')


def directory(value: str, workdir: str) -> str | None:
  """The cache directory of a ``compilation_cache`` setting (None: off)."""
  check(value)
  if not value:
    return None
  return os.path.join(workdir, DIRNAME) if value == WORKDIR else os.path.expanduser(value)


class Counts:
  """The cache's counts since :func:`use` was entered (see the module docstring)."""

  def __init__(self, path: str | None, workdir: str = '.'):
    self.path = path
    self.workdir = workdir
    self._start = _snapshot()

  def summary(self) -> dict[str, int | str]:
    """``compile_cache_dir`` ('' when off), ``compile_cache_hits``, ``..._misses``, ``compiles``.

    ``compile_cache_dir`` is relative to the workdir (``jax_cache`` for the
    default), so a run's summary names no directory of the machine it ran on.
    """
    now = _snapshot()
    hits, misses, compiles = (now[k] - self._start[k] for k in (HIT, MISS, COMPILE))
    return {
      'compile_cache_dir': os.path.relpath(self.path, self.workdir) if self.path else '',
      'compile_cache_hits': hits,
      'compile_cache_misses': misses,
      'compiles': compiles - hits,
    }

  def attribution(self) -> dict[str, Any]:
    """The compiles since :func:`use` (not served by the cache) by function and by architecture.

    ``compiles_by_function``: function -> count (every name of :data:`FUNCTIONS`,
    ``'flops'`` and ``'other'``, zeros included); ``compiles_by_architecture``: one
    record per architecture, in the order first compiled for, ``{'widths',
    'count', 'seconds', 'functions'}``; ``compiles_other``: XLA's names of the
    ``'other'`` compiles -> count. A compile with no architecture (``'flops'``)
    is in no architecture's record.
    """
    with _lock:
      log = [e for e in _log[self._start['log'] :] if not e[3]]
    by_function = dict.fromkeys((*FUNCTIONS, 'flops', OTHER), 0)
    archs: dict[tuple, dict[str, Any]] = {}
    other: dict[str, int] = {}
    for function, arch, seconds, _, name in log:
      by_function[function] = by_function.get(function, 0) + 1
      if function == OTHER:
        other[name] = other.get(name, 0) + 1
      if arch is None:
        continue
      record = archs.setdefault(
        arch, {'widths': dict(arch), 'count': 0, 'seconds': 0.0, 'functions': {}}
      )
      record['count'] += 1
      record['seconds'] += seconds
      record['functions'][function] = record['functions'].get(function, 0) + 1
    return {
      'compiles_by_function': by_function,
      'compiles_by_architecture': list(archs.values()),
      'compiles_other': dict(sorted(other.items(), key=lambda kv: -kv[1])),
    }


def _configure(path: str | None) -> None:
  jax.config.update('jax_compilation_cache_dir', path)
  if path is not None:  # cache every executable: the CPU compiles here are small and fast
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  _jax_cache.reset_cache()  # JAX opens its cache once per process: reopen it at `path`


_active: list[Counts] = []


@contextlib.contextmanager
def session() -> Iterator[None]:
  """Restores JAX's cache settings found on entry when the body exits (see :func:`start`)."""
  saved = {name: getattr(jax.config, name) for name in _SETTINGS}
  depth = len(_active)
  try:
    yield
  finally:
    del _active[depth:]
    for name, v in saved.items():
      jax.config.update(name, v)
    _jax_cache.reset_cache()


def start(value: str, workdir: str) -> Counts:
  """Points JAX's persistent cache at ``directory(value, workdir)``; returns its counts from now.

  Call it inside :func:`session`, which undoes it. The trainer enters the session
  around the run and starts the cache once its checks have passed (nothing is
  written into the workdir before): a refused start leaves no ``jax_cache``.
  """
  path = directory(value, workdir)
  _register()
  _configure(path)
  set_architecture(None)
  counts = Counts(path, workdir)
  _active.append(counts)
  return counts


@contextlib.contextmanager
def use(value: str, workdir: str) -> Iterator[Counts]:
  """:func:`start` inside a :func:`session`: the cache at ``value`` for the body; yields the counts.

  Repeated uses (several trainings in one process) each get their own directory
  and counts; the settings found on entry are restored on exit.
  """
  with session():
    yield start(value, workdir)


def summary() -> dict[str, int | str]:
  """The counts of the latest :func:`start` still in its session (``{}`` when none)."""
  return _active[-1].summary() if _active else {}


def attribution() -> dict[str, Any]:
  """:meth:`Counts.attribution` of the latest :func:`start` still in its session (``{}``: none)."""
  return _active[-1].attribution() if _active else {}
