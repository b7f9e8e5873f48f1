r"""Dense vs DemP vs SNAP, CroP-S, EarlySNAP, EarlyCroP-S, NEq: one table, one command.

    PYTHONPATH=. python -m scripts.compare --workdir /tmp/compare

Trains every ``--methods`` entry with ``configs/compare_cifar10_subset.py``
(same model, data, steps and seed; ``--arg`` adds config arguments, e.g.
``--arg steps=300,lam=0.05``), the structured baselines at DemP's measured
weight sparsity, then times every run's final train step side by side
(interleaved rounds, same batch: the runs' own wall times depend on the
machine's load while each ran), and prints one Markdown table (also written to
``WORKDIR/compare.md``). Runs are sequential in one process; ``--reuse`` reads
back the runs a previous call of the same command finished.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from baselines import compare
from configs import compare_cifar10_subset
from demp import metrics

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs write; default a fresh temp dir.')
_METHODS = flags.DEFINE_list('methods', list(compare.ORDER), 'Methods to train.')
_ARG = flags.DEFINE_string('arg', '', 'Extra config arguments, "k=v,k=v" (see the config).')
_MATCH = flags.DEFINE_bool('match_weight_sparsity', True,
                           'Structured baselines target the weight sparsity DemP reached.')
_REUSE = flags.DEFINE_bool('reuse', False, 'Read back runs whose summary.json exists in the workdir.')
_BENCH_ROUNDS = flags.DEFINE_integer('bench_rounds', 3, 'Interleaved rounds of the step benchmark '
                                     '(0 = skip it).')
_BENCH_STEPS = flags.DEFINE_integer('bench_steps', 3, 'Steps per method per round.')


def main(argv):
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='compare_')
  extra = f',{_ARG.value}' if _ARG.value else ''
  make_config = lambda method: compare_cifar10_subset.get_config(f'method={method}{extra}')
  t0 = time.perf_counter()
  summaries = compare.run_methods(make_config, _METHODS.value, workdir,
                                  match_weight_sparsity=_MATCH.value, reuse=_REUSE.value)
  train_s = time.perf_counter() - t0
  step_times = (compare.step_benchmark(make_config, summaries, rounds=_BENCH_ROUNDS.value,
                                       steps=_BENCH_STEPS.value) if _BENCH_ROUNDS.value else {})
  config = make_config('dense')
  text = '\n'.join([
      f'CIFAR-10 subset ({config.data.path}), ConvNet {"-".join(map(str, config.model.widths))}, '
      f'{config.num_steps} steps, batch {config.batch_size}, seed {config.seed}, DemP peak λ '
      f'{config.demp.peak_lambda}; training {train_s:.0f} s, step benchmark '
      f'{time.perf_counter() - t0 - train_s:.0f} s', '',
      compare.table(summaries, step_times), '', compare.notes(summaries)])
  print(text, flush=True)
  with open(os.path.join(workdir, 'compare.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(workdir, 'compare.json'), 'w') as f:
    json.dump(metrics._to_json({'runs': summaries, 'step_times_s': step_times}), f, indent=2)


if __name__ == '__main__':
  app.run(main)
