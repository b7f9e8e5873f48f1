r"""Runs a grid of training runs, resumably, one results directory per run.

    python -m scripts.sweep --config configs/analysis/convnet_cifar10_subset.py \
        --grid 'method=demp;demp.peak_lambda=1e-2,3e-2,1e-1;seed=0,1' \
        --grid 'method=dense;seed=0,1' --workdir /tmp/sweep --parallel 2

Keys are config keys (``--config.KEY=VALUE``) or ``arg.NAME`` for the config
file's argument. Re-running the same command skips the runs whose
``summary.json`` exists. ``--results_dir DIR`` keeps each finished run's small
outputs in DIR (commit it) and skips the runs already there, so a sweep resumes
on a fresh machine; ``--collect_only`` copies what a running sweep has finished.
See ``tools/sweep.py``.
"""

import sys

from absl import app, flags

from tools import sweep

_CONFIG = flags.DEFINE_string('config', None, 'Config file, optionally with :arguments.')
_GRID = flags.DEFINE_multi_string('grid', None, "Grid 'key=v1,v2;key2=v3'; repeat for a union.")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (one subdirectory per run).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at a time (independent processes).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands of the runs to do and stop.')
_RESULTS_DIR = flags.DEFINE_string(
  'results_dir',
  None,
  "Keep each finished run's summary.json / metrics.jsonl / config.json "
  'here (e.g. under version control); runs found here are skipped.',
)
_COLLECT_ONLY = flags.DEFINE_bool(
  'collect_only', False, 'Copy the finished runs of --workdir to --results_dir; run nothing.'
)
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _COLLECT_ONLY.value:
    if not _RESULTS_DIR.value:
      raise app.UsageError('--collect_only needs --results_dir.')
    names = sweep.collect(_WORKDIR.value, _RESULTS_DIR.value)
    print(f'{len(names)} finished runs copied to {_RESULTS_DIR.value}')
    return
  if not _CONFIG.value or not _GRID.value:
    raise app.UsageError('--config and --grid are required (unless --collect_only).')
  results = sweep.run_sweep(
    _CONFIG.value,
    _GRID.value,
    _WORKDIR.value,
    parallel=_PARALLEL.value,
    dry_run=_DRY_RUN.value,
    results_dir=_RESULTS_DIR.value,
  )
  sys.exit(sweep.exit_status(results))


if __name__ == '__main__':
  app.run(main)
