r"""Runs a grid of training runs, resumably, one results directory per run.

    python -m scripts.sweep --config configs/analysis/convnet_cifar10_subset.py \
        --grid 'method=demp;demp.peak_lambda=1e-2,3e-2,1e-1;seed=0,1' \
        --grid 'method=dense;seed=0,1' --workdir /tmp/sweep --parallel 2

Keys are config keys (``--config.KEY=VALUE``) or ``arg.NAME`` for the config
file's argument. Re-running the same command skips the runs whose
``summary.json`` exists. See ``demp/sweep.py``.
"""

import sys

from absl import app, flags

from demp import sweep

_CONFIG = flags.DEFINE_string('config', None, 'Config file, optionally with :arguments.')
_GRID = flags.DEFINE_multi_string('grid', None, "Grid 'key=v1,v2;key2=v3'; repeat for a union.")
_WORKDIR = flags.DEFINE_string('workdir', None, 'Sweep directory (one subdirectory per run).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Runs at a time (independent processes).')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the commands of the runs to do and stop.')
flags.mark_flags_as_required(['config', 'grid', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  results = sweep.run_sweep(_CONFIG.value, _GRID.value, _WORKDIR.value,
                            parallel=_PARALLEL.value, dry_run=_DRY_RUN.value)
  failed = sorted(k for k, rc in results.items() if rc)
  if failed:
    print(f'{len(failed)} runs failed: {failed}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
