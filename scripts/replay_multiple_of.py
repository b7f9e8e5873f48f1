r"""What rounding widths to a multiple costs in sparsity and saves in compiles, from finished runs.

    python -m scripts.replay_multiple_of --multiples 1,4,8 \
        --runs 'results/fidelity/convnet_adam/arg.method-demp_arg.lam-0.0[248]_seed-*'

Replays each run's death checks (``metrics.jsonl``: the live units per group at
every prune event) with ``prune.multiple_of`` = m and prints, per m, the mean
number of distinct architectures trained (one train-step compile and one
death-check compile each) and the mean final weight and neuron sparsity (see
:func:`tools.benchmark.replay_multiple_of` for the approximation). With m = 1 it
reproduces the runs' own widths and segment counts.
"""

import glob

from absl import app, flags

from tools import benchmark

_RUNS = flags.DEFINE_string('runs', None, 'Glob of finished run directories.')
_MULTIPLES = flags.DEFINE_list('multiples', ['1', '4', '8'], 'prune.multiple_of values.')
flags.mark_flags_as_required(['runs'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runs = sorted(glob.glob(_RUNS.value))
  if not runs:
    raise app.UsageError(f'--runs={_RUNS.value!r} matches no directory.')
  rows = benchmark.multiple_of_table(runs, [int(m) for m in _MULTIPLES.value])
  print('| multiple_of | runs | architectures (compiles) | weight sparsity | neuron sparsity |')
  print('|---|---|---|---|---|')
  for r in rows:
    print(
      f'| {r["multiple_of"]} | {r["runs"]} | {r["architectures"]:.2f} | '
      f'{r["weight_sparsity"]:.3f} | {r["neuron_sparsity"]:.3f} |'
    )


if __name__ == '__main__':
  app.run(main)
