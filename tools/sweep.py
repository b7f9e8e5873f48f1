"""Grids of runs: parse a grid, name its runs, run them resumably.

A grid is ``'key=v1,v2;key2=v3'``: the cartesian product of the listed
values. Keys are config keys (``demp.peak_lambda``, ``seed``, ``method``...),
passed as ``--config.KEY=VALUE`` overrides, or ``arg.NAME`` for an argument
of the config file (``configs/x.py:NAME=VALUE``). Several grids are a union
(``method=dense;seed=0,1`` next to ``method=demp;demp.peak_lambda=...``).

Every run gets its own directory under the sweep's workdir, named after its
overrides, holding the trainer's ``metrics.jsonl`` / ``summary.json`` /
``config.json``, the run's ``train.log`` and ``overrides.json``. A run whose
``summary.json`` exists is skipped, so re-running a sweep resumes it (an
interrupted run restarts, or continues from its checkpoint when the trainer
saved one). Runs are independent ``python -m scripts.train`` processes,
``parallel`` at a time.

Long sweeps outlive sessions and scratch disks: with a ``results_dir`` (e.g.
a folder under version control), each finished run's small outputs
(:data:`RESULT_FILES`) are copied to ``<results_dir>/<run name>/`` as the run
completes, and a run already there counts as done, so a sweep restarted on a
fresh machine with the same ``results_dir`` skips it. :func:`collect` copies
what a running or finished sweep has done so far.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence

from demp.trainer import workdir as workdir_lib

ARG_PREFIX = 'arg.'

RESULT_FILES = ('summary.json', 'metrics.jsonl', 'config.json')
"""What :func:`collect` keeps of a finished run: small, and enough for the reports."""


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep: its overrides and where it lives."""

  name: str
  overrides: tuple[tuple[str, str], ...]  # (key, value) in grid order

  def config_args(self) -> dict[str, str]:
    return {k[len(ARG_PREFIX) :]: v for k, v in self.overrides if k.startswith(ARG_PREFIX)}

  def config_overrides(self) -> dict[str, str]:
    return {k: v for k, v in self.overrides if not k.startswith(ARG_PREFIX)}


def parse_grid(grid: str) -> list[tuple[str, list[str]]]:
  """``'a=1,2;b=x'`` -> ``[('a', ['1', '2']), ('b', ['x'])]`` (values stay strings)."""
  axes = []
  for part in grid.split(';'):
    part = part.strip()
    if not part:
      continue
    if '=' not in part:
      raise ValueError(f'grid entry {part!r} is not key=v1,v2,...')
    key, values = (s.strip() for s in part.split('=', 1))
    vals = [v.strip() for v in values.split(',') if v.strip()]
    if not key or not vals:
      raise ValueError(f'grid entry {part!r} needs a key and at least one value.')
    if key in dict(axes):
      raise ValueError(f'grid key {key!r} appears twice in {grid!r}.')
    axes.append((key, vals))
  if not axes:
    raise ValueError(f'empty grid {grid!r}.')
  return axes


def run_name(overrides: Sequence[tuple[str, str]]) -> str:
  """A directory name for a run: ``key-value`` pairs joined by ``_``, filesystem-safe."""
  parts = [f'{k}-{v}' for k, v in overrides]
  return re.sub(r'[^A-Za-z0-9.+\-=_]', '_', '_'.join(parts)) or 'run'


def expand(grids: Sequence[str]) -> list[RunSpec]:
  """The runs of the union of ``grids``, in order, without duplicates."""
  runs, seen = [], set()
  for grid in grids:
    axes = parse_grid(grid)
    keys = [k for k, _ in axes]
    for values in itertools.product(*[v for _, v in axes]):
      overrides = tuple(zip(keys, values))
      name = run_name(overrides)
      if name not in seen:
        seen.add(name)
        runs.append(RunSpec(name, overrides))
  return runs


def config_flag(spec: RunSpec, config: str) -> str:
  """The ``--config`` value of one run: ``config``'s arguments, the run's ``arg.*`` on top."""
  path, _, arg = config.partition(':')
  args = dict(kv.split('=', 1) for kv in arg.split(',') if kv) if arg else {}
  args.update(spec.config_args())
  return path + (':' + ','.join(f'{k}={v}' for k, v in args.items()) if args else '')


def command(spec: RunSpec, config: str, workdir: str, python: str = sys.executable) -> list[str]:
  """The ``scripts.train`` command line of one run."""
  cmd = [
    python,
    '-m',
    'scripts.train',
    f'--config={config_flag(spec, config)}',
    f'--workdir={os.path.join(workdir, spec.name)}',
    '--config.progress_bar=False',
  ]
  cmd += [f'--config.{k}={v}' for k, v in spec.config_overrides().items()]
  return cmd


def is_done(workdir: str, spec: RunSpec, results_dir: str | None = None) -> bool:
  """Whether the run finished: its ``summary.json`` is in ``workdir`` or ``results_dir``."""
  dirs = (workdir,) if results_dir is None else (workdir, results_dir)
  return any(os.path.exists(os.path.join(d, spec.name, 'summary.json')) for d in dirs)


_ABSOLUTE_PATH = re.compile(r'^(?:/|~/)\S+$')


def scrub_path(value: str, key: str, run_name: str) -> str:
  """What a result file keeps of one string value (see :func:`scrub_result`)."""
  if key == 'path' or key == 'data_dir':  # data files: their name is what identifies them
    return os.path.basename(os.path.normpath(value)) if value else value
  if not _ABSOLUTE_PATH.match(value):
    return value
  parts = os.path.normpath(value).split(os.sep)
  if run_name in parts:  # inside the run's own directory: relative to it
    inside = parts[len(parts) - parts[::-1].index(run_name) :]
    return os.path.join(*inside) if inside else '.'
  return os.path.basename(os.path.normpath(value))


def scrub_result(text: str, run_name: str) -> str:
  """A result file's text (JSON, or JSON lines) without the paths of the machine it ran on.

  Every string value is looked at: a data path (a ``path`` or ``data_dir`` key,
  e.g. ``data.path``) is reduced to its file name; any other value that is an
  absolute path (starts with ``/`` or ``~/``, no whitespace) becomes relative
  to the run's directory when it lies inside it (a directory named
  ``run_name``: ``.../<run>/checkpoints/40`` -> ``checkpoints/40``) and its
  last component otherwise. Only the changed string literals are rewritten, so
  the file keeps its formatting; a text that is not JSON is returned as it is.
  """
  try:
    docs = [json.loads(text)]
  except ValueError:
    try:
      docs = [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
      return text
  changes = {}

  def visit(x, key):
    if isinstance(x, dict):
      for k, v in x.items():
        visit(v, k)
    elif isinstance(x, list):
      for v in x:
        visit(v, key)
    elif isinstance(x, str):
      new = scrub_path(x, key, run_name)
      if new != x:
        changes[x] = new

  for doc in docs:
    visit(doc, '')
  for old, new in changes.items():
    for ascii_ in (True, False):
      text = text.replace(
        json.dumps(old, ensure_ascii=ascii_), json.dumps(new, ensure_ascii=ascii_)
      )
  return text


def _scrubbed(src: str, run_name: str) -> bytes:
  with open(src, encoding='utf-8') as f:
    return scrub_result(f.read(), run_name).encode('utf-8')


def collect_run(run_dir: str, results_dir: str) -> bool:
  """Copies one finished run's :data:`RESULT_FILES` to ``results_dir/<name>``; False if unfinished.

  The copies name no directory of the machine (:func:`scrub_result`: data
  paths reduced to their file name, other absolute paths made relative to the
  run or reduced to their last component). ``summary.json`` is copied last, so
  a copy interrupted half-way does not count as done.
  """
  if not os.path.exists(os.path.join(run_dir, 'summary.json')):
    return False
  name = os.path.basename(os.path.normpath(run_dir))
  dest = os.path.join(results_dir, name)
  os.makedirs(dest, exist_ok=True)
  for file in sorted(RESULT_FILES, key=lambda n: n == 'summary.json'):
    src = os.path.join(run_dir, file)
    if os.path.exists(src):
      with open(os.path.join(dest, file), 'wb') as f:
        f.write(_scrubbed(src, name))
  return True


def collect(workdir: str, results_dir: str) -> list[str]:
  """Copies every finished run of the sweep in ``workdir`` to ``results_dir``; returns their names.

  Runs already in ``results_dir`` with the same ``summary.json`` are left alone.
  """
  done = []
  for name in sorted(os.listdir(workdir)):
    run_dir = os.path.join(workdir, name)
    summary = os.path.join(run_dir, 'summary.json')
    if not os.path.isfile(summary):
      continue
    kept = os.path.join(results_dir, name, 'summary.json')
    if os.path.isfile(kept):
      with open(kept, 'rb') as b:
        if _scrubbed(summary, name) == b.read():
          continue
    collect_run(run_dir, results_dir)
    done.append(name)
  return done


STOPPED = 75
"""The code :func:`run_sweep` gives a run whose trainer exited cleanly without a summary.

``scripts.train`` exits with status 0 when a SIGTERM stops it (it saves a
checkpoint first, so the same command resumes); the sweep tells that apart from
a finished run by its missing ``summary.json``. 75 is ``EX_TEMPFAIL``: try again.
"""

BUSY = 73
"""The code :func:`run_sweep` gives a run another process holds (its workdir lock): left untouched."""


def exit_status(results: dict[str, int], err=sys.stderr) -> int:
  """Prints the runs that failed or stopped early to ``err``; the sweep's exit status.

  1 if any run failed, :data:`STOPPED` if some were only stopped or :data:`BUSY` (run the
  sweep again to resume them), else 0.
  """
  failed = sorted(k for k, rc in results.items() if rc and rc not in (STOPPED, BUSY))
  stopped = sorted(k for k, rc in results.items() if rc == STOPPED)
  busy = sorted(k for k, rc in results.items() if rc == BUSY)
  if busy:
    print(f'{len(busy)} runs skipped: another process is training them: {busy}', file=err)
  if stopped:
    print(f'{len(stopped)} runs stopped before the end (run again to resume): {stopped}', file=err)
  if failed:
    print(f'{len(failed)} runs failed: {failed}', file=err)
  return 1 if failed else STOPPED if stopped or busy else 0


def _has_checkpoint(run_dir: str) -> bool:
  """Whether the trainer will resume this run (a step directory under checkpoints/)."""
  ckpt = os.path.join(run_dir, 'checkpoints')
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _run_one(spec: RunSpec, config: str, workdir: str, cwd: str) -> tuple[str, int, float]:
  run_dir = os.path.join(workdir, spec.name)
  os.makedirs(run_dir, exist_ok=True)
  # A run another process is training (a second sweep over the same workdir): touch nothing.
  try:
    fd, created = workdir_lib.acquire(run_dir)
  except workdir_lib.WorkdirLockedError:
    return spec.name, BUSY, 0.0
  if created:
    os.unlink(os.path.join(run_dir, workdir_lib.LOCK))
  os.close(fd)  # closing releases the flock; the trainer takes it again
  stale = os.path.join(run_dir, 'metrics.jsonl')
  if os.path.exists(stale) and not _has_checkpoint(run_dir):
    # An interrupted attempt that the trainer cannot resume: keep its log aside, start clean.
    os.replace(stale, stale + f'.interrupted-{int(time.time())}')
  cmd = command(spec, config, workdir)
  with open(os.path.join(run_dir, 'overrides.json'), 'w') as f:
    json.dump({'config': config, 'overrides': dict(spec.overrides), 'command': cmd}, f, indent=2)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (cwd, env.get('PYTHONPATH', '')) if p)
  t0 = time.perf_counter()
  with open(os.path.join(run_dir, 'train.log'), 'w') as log:
    rc = subprocess.run(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
  return spec.name, rc, time.perf_counter() - t0


def run_sweep(
  config: str,
  grids: Sequence[str],
  workdir: str,
  *,
  parallel: int = 1,
  dry_run: bool = False,
  cwd: str | None = None,
  echo=print,
  results_dir: str | None = None,
) -> dict[str, int]:
  """Runs every run of the grids not done yet; returns ``{name: return code}``.

  A failed run is reported and the sweep goes on; its directory has no
  ``summary.json``, so the next invocation retries it. A run stopped before
  its end (SIGTERM: a clean exit, no summary) gets :data:`STOPPED` and is
  resumed from its checkpoint by the next invocation. With ``results_dir``,
  a finished run's small outputs are copied there as it completes, and runs
  found there are not run again (see the module docstring).
  """
  if parallel < 1:
    raise ValueError(f'parallel={parallel} must be >= 1.')
  cwd = cwd or os.getcwd()
  specs = expand(grids)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(
      {'config': config, 'grids': list(grids), 'runs': [s.name for s in specs]}, f, indent=2
    )
  todo = [s for s in specs if not is_done(workdir, s, results_dir)]
  echo(
    f'{len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run '
    f'({parallel} at a time) in {workdir}'
  )
  if dry_run:
    for s in todo:
      echo(' '.join(command(s, config, workdir)))
    return {}
  results = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = [pool.submit(_run_one, s, config, workdir, cwd) for s in todo]
    for fut in concurrent.futures.as_completed(futures):
      name, rc, seconds = fut.result()
      if rc == 0 and not os.path.exists(os.path.join(workdir, name, 'summary.json')):
        rc = STOPPED  # a clean exit before the end: the trainer was preempted (SIGTERM)
      results[name] = rc
      if rc == 0 and results_dir is not None:
        collect_run(os.path.join(workdir, name), results_dir)
      log = os.path.join(workdir, name, 'train.log')
      status = (
        'ok'
        if rc == 0
        else f'stopped before the end (preempted; the next sweep resumes it; see {log})'
        if rc == STOPPED
        else f'FAILED (exit {rc}; see {log})'
      )
      echo(f'[{len(results)}/{len(todo)}] {name}: {status} in {seconds:.0f} s')
  return results
