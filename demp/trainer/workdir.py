"""A workdir belongs to one run: an exclusive lock and a run identity.

:func:`claim` is entered by the trainer before it reads or writes anything in
the workdir. It

* takes an exclusive ``fcntl.flock`` on ``<workdir>/.lock``, held for the
  run's life and released on any exit (the kernel drops it when the process
  dies, even on ``kill -9``). A second process on the same workdir is refused
  at once, naming the holder's pid. A lock file left with the pid of a process
  that is gone (killed) is taken over, with a log line;
* compares the config's **identity** (the config JSON minus the bookkeeping
  keys of :data:`demp.trainer.checkpoint.RESUME_MUTABLE`, which may change on resume,
  and minus keys added to the code since, at their defaults:
  :func:`demp.trainer.checkpoint.added_keys_at_default`) with the run that left results
  in the workdir (``summary.json``,
  ``metrics.jsonl`` or a checkpoint), read from ``run.json`` (or the
  ``config.json`` of runs older than ``run.json``):

  ====================================  ==========================================
  workdir                               start
  ====================================  ==========================================
  empty, or no results                  a fresh run
  same config, with a checkpoint        resumes (the checkpoint is checked too)
  same config, finished, no checkpoint  refused: the run is complete
  same config, partial, no checkpoint   refused: nothing to resume from
  different config                      refused, listing the keys that differ
  ====================================  ==========================================

  ``overwrite=True`` (``--overwrite``) instead moves every result aside into
  ``<workdir>/previous-<timestamp>/`` (nothing is deleted) and starts afresh.

Nothing is written while checking: a refused start leaves every file of the
workdir as it was (a ``.lock`` it had to create is removed again).
The trainer calls :meth:`Claim.commit` once its own checks (the checkpoint's)
have passed: that writes the pid into ``.lock`` and the identity into
``run.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
from absl import logging

from demp.trainer import checkpoint

LOCK = '.lock'
RUN = 'run.json'
RESULTS = ('summary.json', 'metrics.jsonl', 'final', 'checkpoints')
"""Files whose presence means a run already wrote results here."""
PREVIOUS = 'previous-'
KEEP_IN_PLACE = (LOCK,)
"""Entries :func:`move_aside` leaves where they are (besides earlier ``previous-*`` folders)."""


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run (held by another process, or another run's)."""


class WorkdirLockedError(WorkdirError):
  """Another live process holds the workdir's lock."""


class WorkdirConflictError(WorkdirError, ValueError):
  """The workdir holds results this start would overwrite or mix with its own."""


# ----------------------------------------------------------------------------
# Identity.


def _flat(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _bookkeeping(key: str) -> bool:
  return any(key == m or key.startswith(m + '.') for m in checkpoint.RESUME_MUTABLE)


def identity_keys(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """The flat ``key -> value`` of a config's JSON that identify its run (bookkeeping dropped)."""
  return {k: v for k, v in _flat(config_json).items() if not _bookkeeping(k)}


def fingerprint(config: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
  """A hash of the config minus its bookkeeping keys: equal exactly when a run may resume."""
  config_json = (
    checkpoint.config_json(config) if isinstance(config, ml_collections.ConfigDict) else config
  )
  text = json.dumps(identity_keys(config_json), sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 8) -> str:
  a, b = identity_keys(old), identity_keys(new)
  added = set(checkpoint.added_keys_at_default(a, b))  # not differences (see check)
  b = {k: v for k, v in b.items() if k not in added}
  missing = '<absent>'
  keys = [k for k in sorted(set(a) | set(b)) if a.get(k, missing) != b.get(k, missing)]
  shown = '; '.join(
    f'{k}: {a.get(k, missing)!r} there, {b.get(k, missing)!r} now' for k in keys[:limit]
  )
  verb = 'key differs' if len(keys) == 1 else 'keys differ'
  return f'{len(keys)} {verb}: {shown}{" ..." if len(keys) > limit else ""}'


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      out = json.load(f)
    return out if isinstance(out, dict) else None
  except (OSError, ValueError):
    return None


def previous_config(workdir: str) -> tuple[dict | None, str]:
  """``(config JSON, file it came from)`` of the run that used ``workdir``; None if unknown."""
  run = _read_json(os.path.join(workdir, RUN))
  if run is not None and isinstance(run.get('config'), dict):
    return run['config'], RUN
  config = _read_json(os.path.join(workdir, 'config.json'))
  return (config, 'config.json') if config is not None else (None, '')


def has_checkpoint(workdir: str) -> bool:
  """Whether ``<workdir>/checkpoints`` holds any step (finished or not)."""
  path = os.path.join(workdir, 'checkpoints')
  return os.path.isdir(path) and any(name.split('.')[0].isdigit() for name in os.listdir(path))


def results(workdir: str) -> list[str]:
  """The result files present in ``workdir`` (an empty checkpoints folder does not count)."""
  found = [name for name in RESULTS[:-1] if os.path.exists(os.path.join(workdir, name))]
  return found + (['checkpoints'] if has_checkpoint(workdir) else [])


def _last_step(workdir: str) -> int | None:
  """The last step recorded in ``metrics.jsonl`` (None when unreadable or empty)."""
  step = None
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      for line in f:
        try:
          step = json.loads(line).get('step', step)
        except ValueError:
          continue
  except OSError:
    return None
  return step


def check(workdir: str, config: ml_collections.ConfigDict) -> str | None:
  """Why ``config`` may not start in ``workdir`` (None: it may). Reads only.

  A different config where results are, or the same config where there is
  nothing to resume from (finished, or stopped without a checkpoint).
  """
  found = results(workdir)
  if not found:
    return None
  now = checkpoint.config_json(config)
  old, source = previous_config(workdir)
  advice = (
    f'Use a new workdir, or pass --overwrite (train_and_evaluate(..., overwrite=True)) '
    f'to move the old results into {os.path.join(workdir, PREVIOUS)}<timestamp>/ '
    f'and start afresh.'
  )
  if old is None:
    if 'checkpoints' in found:
      return None  # an older layout: demp.trainer.checkpoint.check_config compares the configs
    return (
      f'workdir {workdir} holds results ({", ".join(found)}) of a run whose config is '
      f'unknown (no {RUN} or config.json). {advice}'
    )
  added = set(checkpoint.added_keys_at_default(identity_keys(old), identity_keys(now)))
  same = identity_keys(old) == {k: v for k, v in identity_keys(now).items() if k not in added}
  if not same:
    return (
      f'workdir {workdir} holds the results ({", ".join(found)}) of a different config '
      f'(from {source}: {_diff(old, now)}). {advice}'
    )
  if 'checkpoints' in found:
    return None  # the same run: resume
  if 'summary.json' in found:
    return (
      f'the run in workdir {workdir} is complete (summary.json is there, with this same '
      f'config, and no checkpoint to resume from). Nothing to do. {advice}'
    )
  step = _last_step(workdir)
  return (
    f'workdir {workdir} holds a run of this same config that stopped '
    f'{f"after step {step} " if step is not None else ""}without a checkpoint to resume '
    f'from (checkpoint.every=0 saves only on SIGTERM). Restarting would mix two runs in '
    f'metrics.jsonl. {advice}'
  )


def move_aside(workdir: str) -> str:
  """Moves every entry of ``workdir`` but ``.lock`` and ``previous-*`` into a new ``previous-*``."""
  stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
  dest = os.path.join(workdir, PREVIOUS + stamp)
  n = 1
  while os.path.exists(dest):
    dest = os.path.join(workdir, f'{PREVIOUS}{stamp}-{n}')
    n += 1
  entries = [
    e for e in sorted(os.listdir(workdir)) if e not in KEEP_IN_PLACE and not e.startswith(PREVIOUS)
  ]
  os.makedirs(dest)
  for e in entries:
    os.replace(os.path.join(workdir, e), os.path.join(dest, e))
  return dest


# ----------------------------------------------------------------------------
# The lock.


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_pid(fd: int) -> int | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 64).decode(errors='replace').strip()
  return int(text) if text.isdigit() else None


@dataclasses.dataclass
class Claim:
  """The lock held on a workdir; :meth:`commit` writes the pid and the run identity."""

  workdir: str
  fd: int
  config: ml_collections.ConfigDict
  created: bool = False  # .lock did not exist before this start
  moved_to: str | None = None
  committed: bool = False

  def commit(self) -> None:
    """Writes the pid into ``.lock`` and ``run.json``: call once every check has passed."""
    os.ftruncate(self.fd, 0)
    os.lseek(self.fd, 0, os.SEEK_SET)
    os.write(self.fd, f'{os.getpid()}\n'.encode())
    record = {
      'fingerprint': fingerprint(self.config),
      'pid': os.getpid(),
      'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
      'config': checkpoint.config_json(self.config),
    }
    tmp = os.path.join(self.workdir, RUN + '.tmp')
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(self.workdir, RUN))
    self.committed = True

  def release(self) -> None:
    if self.fd < 0:
      return
    if self.committed:  # a clean exit leaves an empty lock file
      os.ftruncate(self.fd, 0)
    elif self.created:  # a refused start leaves no file behind
      os.unlink(os.path.join(self.workdir, LOCK))
    fcntl.flock(self.fd, fcntl.LOCK_UN)
    os.close(self.fd)
    self.fd = -1


def acquire(workdir: str) -> tuple[int, bool]:
  """Takes the exclusive lock of ``workdir``; returns ``(fd, whether this call created .lock)``.

  Raises :class:`WorkdirLockedError` when a live process holds it. A lock file
  unlinked by its holder between our open and our flock is opened again (the
  inode check), so removing an unused lock file is safe.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK)
  while True:
    created = False
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      created = True
    except FileExistsError:
      try:
        fd = os.open(path, os.O_RDWR)  # never truncates
      except FileNotFoundError:
        continue  # unlinked meanwhile
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_pid(fd)
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise WorkdirLockedError(
        f'workdir {workdir} is in use by another run (process '
        f'{holder if holder is not None else "unknown: it is still checking its workdir"} '
        f'holds {path}). Wait for it to finish, stop it, or use another workdir.'
      ) from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:
      break
    os.close(fd)  # we locked an unlinked file: again
  stale = _read_pid(fd)
  if stale is not None and stale != os.getpid():
    logging.warning(
      'workdir %s: taking over the lock left by process %d, which is %s.',
      workdir,
      stale,
      'still alive but no longer holds it' if _pid_alive(stale) else 'gone',
    )
  return fd, created


@contextlib.contextmanager
def claim(
  workdir: str, config: ml_collections.ConfigDict, *, overwrite: bool = False, primary: bool = True
) -> Iterator[Claim | None]:
  """Locks ``workdir`` and checks the run identity (module docstring); yields a :class:`Claim`.

  Raises :class:`WorkdirLockedError` or :class:`WorkdirConflictError` without
  writing anything. Only the ``primary`` process (process 0) locks and checks;
  the others yield None.
  """
  if not primary:
    yield None
    return
  fd, created = acquire(workdir)
  held = Claim(workdir=workdir, fd=fd, config=config, created=created)
  try:
    problem = check(workdir, config)
    if problem is not None and not overwrite:
      raise WorkdirConflictError(problem)
    if overwrite and results(workdir):
      held.moved_to = move_aside(workdir)
      logging.warning(
        'workdir %s: moved the earlier results into %s (--overwrite).', workdir, held.moved_to
      )
      print(f'--overwrite: moved the earlier results of {workdir} into {held.moved_to}', flush=True)
    yield held
  finally:
    held.release()


def announce_resume(step: int, path: str) -> None:
  """Says on the console and in the log that a run resumed."""
  logging.warning('resumed from step %d (%s).', step, path)
  print(f'resumed from step {step} ({path})', flush=True)


__all__ = [
  'Claim',
  'LOCK',
  'RUN',
  'WorkdirConflictError',
  'WorkdirError',
  'WorkdirLockedError',
  'acquire',
  'announce_resume',
  'check',
  'claim',
  'fingerprint',
  'move_aside',
  'previous_config',
  'results',
]
