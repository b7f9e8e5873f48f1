r"""Dense and DemP next to the baselines on the CIFAR-10 subset: one command, one table.

Structured (``--kind=structured``, the default): dense, DemP, SNAP, CroP-S,
EarlySNAP, EarlyCroP-S, NEq::

    python -m scripts.compare --workdir /tmp/compare --arg path=PATH/cifar10_subset.npz

Trains every ``--methods`` entry with ``configs/compare_cifar10_subset.py``
(same model, data, steps and seed; ``--arg`` adds config arguments, e.g.
``--arg steps=300,lam=0.05``), the structured baselines at DemP's measured
weight sparsity, then times every run's final train step side by side
(interleaved rounds, same batch: the runs' own wall times depend on the
machine's load while each ran), and prints one Markdown table (also written to
``WORKDIR/compare.md``). Runs are sequential in one process; ``--reuse`` reads
back the runs a previous call of the same command finished.

Unstructured (``--kind=unstructured``): the ConvNet 32-64-128-256 of
``configs/analysis/convnet_cifar10_subset.py`` trained dense, with each of
``--algorithms`` (magnitude, saliency, SET, RigL) at each of ``--sparsities``
(targets over the pruned weights; ERK; first and last layer dense), and DemP at
each peak λ of ``--demp_lams``; masks change every ``--update_every`` steps
from 0.3 T to 0.8 T::

    python -m scripts.compare --kind=unstructured --workdir /tmp/compare_sparse \
        --arg path=PATH/cifar10_subset.npz

Prints accuracy, weight sparsity, theoretical FLOPs (masked methods) or XLA's
(DemP) relative to dense, each run's mean step time, then a side-by-side
benchmark of a dense step, a sparse step without and with a mask update (on
dense hardware the masks buy no wall-clock time). ``--steps`` shortens the runs
and ``--width`` narrows the model (say so when quoting the numbers).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from baselines import compare
from configs import compare_cifar10_subset
from configs.analysis import convnet_cifar10_subset
from demp.trainer import metrics

_KIND = flags.DEFINE_enum(
  'kind',
  'structured',
  ['structured', 'unstructured'],
  'Which baselines to compare with dense and DemP.',
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs write; default a fresh temp dir.')
_ARG = flags.DEFINE_string('arg', '', 'Extra config arguments, "k=v,k=v" (see the config).')
_BENCH_ROUNDS = flags.DEFINE_integer(
  'bench_rounds', 3, 'Interleaved rounds of the step benchmark (0 = skip it).'
)
_BENCH_STEPS = flags.DEFINE_integer('bench_steps', 3, 'Steps per variant per round.')
# --kind=structured
_METHODS = flags.DEFINE_list('methods', list(compare.ORDER), 'Methods to train (structured).')
_MATCH = flags.DEFINE_bool(
  'match_weight_sparsity', True, 'Structured baselines target the weight sparsity DemP reached.'
)
_REUSE = flags.DEFINE_bool(
  'reuse', False, 'Read back runs whose summary.json exists in the workdir.'
)
# --kind=unstructured
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps per run (unstructured).')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.8', '0.9'], 'Target weight sparsities.')
_ALGORITHMS = flags.DEFINE_list(
  'algorithms', ['magnitude', 'saliency', 'set', 'rigl'], 'Unstructured methods.'
)
_DISTRIBUTION = flags.DEFINE_string('distribution', 'erk', 'uniform | erk.')
_UPDATE_EVERY = flags.DEFINE_integer('update_every', 50, 'Steps between mask updates.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every run (unstructured).')
_WIDTH = flags.DEFINE_float('width', 1.0, 'Multiplier of the ConvNet widths 32-64-128-256.')
_DEMP_LAMS = flags.DEFINE_list(
  'demp_lams',
  ['0.1', '0.2'],
  'Peak λ of the DemP rows (pick values whose weight sparsity '
  'lands near --sparsities); empty for none.',
)


def structured(workdir: str) -> tuple[str, dict]:
  extra = f',{_ARG.value}' if _ARG.value else ''
  make_config = lambda method: compare_cifar10_subset.get_config(f'method={method}{extra}')
  t0 = time.perf_counter()
  summaries = compare.run_methods(
    make_config, _METHODS.value, workdir, match_weight_sparsity=_MATCH.value, reuse=_REUSE.value
  )
  train_s = time.perf_counter() - t0
  step_times = (
    compare.step_benchmark(
      make_config, summaries, rounds=_BENCH_ROUNDS.value, steps=_BENCH_STEPS.value
    )
    if _BENCH_ROUNDS.value
    else {}
  )
  config = make_config('dense')
  text = '\n'.join(
    [
      f'CIFAR-10 subset ({config.data.path}), ConvNet {"-".join(map(str, config.model.widths))}, '
      f'{config.num_steps} steps, batch {config.batch_size}, seed {config.seed}, DemP peak λ '
      f'{config.demp.peak_lambda}; training {train_s:.0f} s, step benchmark '
      f'{time.perf_counter() - t0 - train_s:.0f} s',
      '',
      compare.table(summaries, step_times),
      '',
      compare.notes(summaries),
    ]
  )
  return text, {'runs': summaries, 'step_times_s': step_times}


def unstructured_config(method: str, sparsity: float = 0.0, lam: float | None = None, **baselines):
  """The unstructured comparison's config of one run."""
  lam_arg = '' if lam is None else f',lam={lam}'
  extra = f',{_ARG.value}' if _ARG.value else ''
  c = convnet_cifar10_subset.get_config(
    f'method={method},steps={_STEPS.value},width={_WIDTH.value}{lam_arg}{extra}'
  )
  c.seed = _SEED.value
  c.progress_bar = False
  c.log_every = max(1, _STEPS.value // 4)
  c.baselines = {
    'target_sparsity': sparsity,
    'distribution': _DISTRIBUTION.value,
    'update_every': _UPDATE_EVERY.value,
    **baselines,
  }
  return c


def unstructured(workdir: str) -> tuple[str, dict]:
  t_start = time.perf_counter()
  rows = compare.run_unstructured(
    unstructured_config,
    algorithms=_ALGORITHMS.value,
    sparsities=[float(x) for x in _SPARSITIES.value],
    demp_lams=[float(x) for x in _DEMP_LAMS.value],
    workdir=workdir,
  )
  train_wall = time.perf_counter() - t_start
  widths = '-'.join(str(w) for w in unstructured_config('dense').model.widths)
  lines = [
    f'CIFAR-10 subset, ConvNet {widths}, {_STEPS.value} steps, batch 128, seed '
    f'{_SEED.value}, {_DISTRIBUTION.value}, masks updated every {_UPDATE_EVERY.value} '
    f'steps from 0.3 T to 0.8 T; training wall time {train_wall:.0f} s',
    '',
    compare.unstructured_table(rows),
    '',
    'FLOPs: theoretical for the masked methods (conv/dense kernels, dense FLOPs x '
    'density per layer); for DemP, XLA\'s cost analysis of the compiled steps of the '
    'shrinking network. Step time: mean over each run (runs are sequential, so the '
    'machine load differs).',
    '',
  ]
  bench = {}
  if _BENCH_ROUNDS.value:
    bench = compare.mask_update_benchmark(
      unstructured_config, rounds=_BENCH_ROUNDS.value, steps=_BENCH_STEPS.value
    )
    base = bench['dense']
    lines += [
      'Side-by-side step benchmark (interleaved rounds, same batch, median):',
      '',
      '| step | time [ms] | vs dense |',
      '|---|---|---|',
    ]
    lines += [f'| {name} | {1e3 * t:.0f} | {t / base:.2f}x |' for name, t in bench.items()]
  return '\n'.join(lines), {
    'rows': [
      {
        'method': n,
        'target': t,
        'test_accuracy': s['test_accuracy'],
        'weight_sparsity': s['weight_sparsity'],
        'step_time_s': s['step_time_final_s'],
        **fl,
      }
      for n, t, s, fl in rows
    ],
    'benchmark': bench,
  }


def main(argv):
  del argv
  kind = _KIND.value
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix=f'compare_{kind}_')
  text, record = (structured if kind == 'structured' else unstructured)(workdir)
  print(text, flush=True)
  name = 'compare' if kind == 'structured' else 'compare_sparse'
  with open(os.path.join(workdir, f'{name}.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(workdir, f'{name}.json'), 'w') as f:
    json.dump(metrics._to_json(record), f, indent=2)


if __name__ == '__main__':
  app.run(main)
