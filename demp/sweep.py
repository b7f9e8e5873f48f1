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

ARG_PREFIX = 'arg.'


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep: its overrides and where it lives."""

  name: str
  overrides: tuple[tuple[str, str], ...]   # (key, value) in grid order

  def config_args(self) -> dict[str, str]:
    return {k[len(ARG_PREFIX):]: v for k, v in self.overrides if k.startswith(ARG_PREFIX)}

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


def command(spec: RunSpec, config: str, workdir: str, python: str = sys.executable) -> list[str]:
  """The ``scripts.train`` command line of one run."""
  path, _, arg = config.partition(':')
  args = dict(kv.split('=', 1) for kv in arg.split(',') if kv) if arg else {}
  args.update(spec.config_args())
  config_flag = path + (':' + ','.join(f'{k}={v}' for k, v in args.items()) if args else '')
  cmd = [python, '-m', 'scripts.train', f'--config={config_flag}',
         f'--workdir={os.path.join(workdir, spec.name)}', '--config.progress_bar=False']
  cmd += [f'--config.{k}={v}' for k, v in spec.config_overrides().items()]
  return cmd


def is_done(workdir: str, spec: RunSpec) -> bool:
  return os.path.exists(os.path.join(workdir, spec.name, 'summary.json'))


def _has_checkpoint(run_dir: str) -> bool:
  """Whether the trainer will resume this run (a step directory under checkpoints/)."""
  ckpt = os.path.join(run_dir, 'checkpoints')
  return os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt))


def _run_one(spec: RunSpec, config: str, workdir: str, cwd: str) -> tuple[str, int, float]:
  run_dir = os.path.join(workdir, spec.name)
  os.makedirs(run_dir, exist_ok=True)
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


def run_sweep(config: str, grids: Sequence[str], workdir: str, *, parallel: int = 1,
              dry_run: bool = False, cwd: str | None = None, echo=print) -> dict[str, int]:
  """Runs every run of the grids not done yet; returns ``{name: return code}``.

  A failed run is reported and the sweep goes on; its directory has no
  ``summary.json``, so the next invocation retries it.
  """
  if parallel < 1:
    raise ValueError(f'parallel={parallel} must be >= 1.')
  cwd = cwd or os.getcwd()
  specs = expand(grids)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump({'config': config, 'grids': list(grids), 'runs': [s.name for s in specs]}, f, indent=2)
  todo = [s for s in specs if not is_done(workdir, s)]
  echo(f'{len(specs)} runs, {len(specs) - len(todo)} done, {len(todo)} to run '
       f'({parallel} at a time) in {workdir}')
  if dry_run:
    for s in todo:
      echo(' '.join(command(s, config, workdir)))
    return {}
  results = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    futures = [pool.submit(_run_one, s, config, workdir, cwd) for s in todo]
    for fut in concurrent.futures.as_completed(futures):
      name, rc, seconds = fut.result()
      results[name] = rc
      status = 'ok' if rc == 0 else f'FAILED (exit {rc}; see {os.path.join(workdir, name, "train.log")})'
      echo(f'[{len(results)}/{len(todo)}] {name}: {status} in {seconds:.0f} s')
  return results
