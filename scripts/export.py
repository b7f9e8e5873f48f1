r"""Export a finished run's final network; optionally benchmark dense vs pruned inference.

    python -m scripts.export --workdir=/tmp/run --out=/tmp/run_export [--fold_bn] [--benchmark]

writes ``architecture.json``, ``variables/`` (orbax: params and batch stats)
and ``inference.jax`` (``jax.export``, symbolic batch) to ``--out``; with
``--benchmark`` also times dense vs pruned inference (batch 1 and 256) and
writes ``<workdir>/export_benchmark.json``. Without a run,

    python -m scripts.export --random_model=resnet18 --sparsity=0.5 --json=/tmp/bench.json

benchmarks a full-width model against a copy with that fraction of every unit
group removed at random. The logic lives in :mod:`demp.export`; see docs/export.md.
"""

import json

from absl import app, flags

from demp import export
from demp.trainer import export as run_export
from tools import export_benchmark

_WORKDIR = flags.DEFINE_string('workdir', None, 'Workdir of a finished run with a checkpoint.')
_OUT = flags.DEFINE_string('out', None, 'Export directory.')
_FOLD = flags.DEFINE_bool('fold_bn', False, 'Fold BatchNorms into the preceding Conv/Dense.')
_BENCH = flags.DEFINE_bool('benchmark', False, 'Time dense vs pruned inference.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing export in --out.')
_PLATFORMS = flags.DEFINE_list(
  'platforms', list(export.DEFAULT_PLATFORMS), 'jax.export lowering platforms.'
)
_BATCHES = flags.DEFINE_list('batch_sizes', ['1', '256'], 'Benchmark batch sizes.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved benchmark rounds.')
_ROUND_S = flags.DEFINE_float('round_s', 0.3, 'Seconds per variant per round (>= 1 call).')
_RANDOM = flags.DEFINE_string(
  'random_model', None, 'Benchmark this registry model (random params) instead of a run.'
)
_SPARSITY = flags.DEFINE_float('sparsity', 0.5, 'With --random_model: fraction of units removed.')
_IMAGE = flags.DEFINE_integer('image_size', 32, 'With --random_model: square input size.')
_CLASSES = flags.DEFINE_integer('num_classes', 10, 'With --random_model: number of classes.')
_JSON = flags.DEFINE_string('json', None, 'With --random_model: write the numbers here.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  timing = dict(
    batch_sizes=[int(b) for b in _BATCHES.value],
    rounds=_ROUNDS.value,
    round_s=_ROUND_S.value,
    fold_bn=_FOLD.value,
  )
  if _RANDOM.value:
    result = export_benchmark.benchmark_random(
      _RANDOM.value, _SPARSITY.value, num_classes=_CLASSES.value, image_size=_IMAGE.value, **timing
    )
    print(export_benchmark.format_benchmark_table(result['rows']))
    if _JSON.value:
      with open(_JSON.value, 'w') as f:
        json.dump(result, f, indent=2)
    return
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError('--workdir and --out are required (or --random_model).')
  arch = run_export.export_run(
    _WORKDIR.value,
    _OUT.value,
    fold_bn=_FOLD.value,
    platforms=_PLATFORMS.value or None,
    overwrite=_OVERWRITE.value,
  )
  print(
    f'exported {arch["model"]} ({arch["params"]:,} params, {arch["dense_params"]:,} dense) '
    f'to {_OUT.value}; max |exported - Flax| = {arch["check"]["max_abs_diff_vs_flax"]:.2e}'
  )
  if arch['fold_bn'] is not None:
    print(
      f'BatchNorm folded: {len(arch["fold_bn"]["folded"])} layers; not folded: '
      f'{[(e["layer"], e["reason"]) for e in arch["fold_bn"]["not_folded"]]}'
    )
  if _BENCH.value:
    result = export_benchmark.benchmark_run(_WORKDIR.value, **timing)
    print(export_benchmark.format_benchmark_table(result['rows']))


if __name__ == '__main__':
  app.run(main)
