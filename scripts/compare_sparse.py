r"""Unstructured baselines on the CIFAR-10 subset: accuracy, FLOPs and step time vs dense.

    PYTHONPATH=. python -m scripts.compare_sparse --workdir /tmp/compare_sparse

The ConvNet 32-64-128-256 of ``configs/analysis/convnet_cifar10_subset.py``
(AdamW 5e-3 one-cycle, weight decay 5e-4, batch 128, crop+flip), trained
dense and with each of ``--algorithms`` at each of ``--sparsities`` (targets
over the pruned weights; ERK; first and last layer dense), one seed. Masks
change every ``--update_every`` steps from 0.3 T to 0.8 T (the DemP authors'
window; their 500-step period is scaled down to the short run).

Prints one Markdown table: test accuracy, weight sparsity over all parameters
(counted nonzeros), theoretical inference and training FLOPs relative to
dense (per layer, dense FLOPs x density, from the layers' shapes), and the
measured mean train-step time of each run (at its final architecture)
relative to the dense run. DemP rows (``--demp_lams``, peak λ values) sit
beside them at the weight sparsity they reach, with XLA's FLOPs of the
network as it shrank. Then a
side-by-side benchmark (interleaved rounds, same batch, same process) of the
dense step, a sparse step without a mask update and a sparse step with one:
on dense hardware the masks buy no wall-clock time.

``--steps`` shortens the runs and ``--width`` narrows the model (say so when
quoting the numbers).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

from baselines import sparse
from configs.analysis import convnet_cifar10_subset
from demp import benchmark, train

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs write; default a fresh temp dir.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps per run.')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.8', '0.9'], 'Target weight sparsities.')
_ALGORITHMS = flags.DEFINE_list('algorithms', ['magnitude', 'saliency', 'set', 'rigl'], 'Methods.')
_DISTRIBUTION = flags.DEFINE_string('distribution', 'erk', 'uniform | erk.')
_UPDATE_EVERY = flags.DEFINE_integer('update_every', 50, 'Steps between mask updates.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of every run.')
_WIDTH = flags.DEFINE_float('width', 1.0, 'Multiplier of the ConvNet widths 32-64-128-256.')
_DEMP_LAMS = flags.DEFINE_list('demp_lams', ['0.1', '0.2'],
                                'Peak λ of the DemP rows (pick values whose weight sparsity '
                                'lands near --sparsities); empty for none.')
_BENCH_ROUNDS = flags.DEFINE_integer('bench_rounds', 6, 'Interleaved rounds of the step benchmark.')
_BENCH_STEPS = flags.DEFINE_integer('bench_steps', 4, 'Steps per variant per round.')


def make_config(method: str, steps: int, sparsity: float = 0.0, lam: float | None = None,
                **baselines):
  lam_arg = '' if lam is None else f',lam={lam}'
  c = convnet_cifar10_subset.get_config(f'method={method},steps={steps},width={_WIDTH.value}{lam_arg}')
  c.seed = _SEED.value
  c.progress_bar = False
  c.log_every = max(1, steps // 4)
  c.baselines = {'target_sparsity': sparsity, 'distribution': _DISTRIBUTION.value,
                 'update_every': _UPDATE_EVERY.value, **baselines}
  return c


def step_benchmark(steps: int) -> list[tuple[str, float]]:
  """Median seconds per train step: dense, sparse (no mask update), sparse (mask update)."""
  variants = {
      'dense': make_config('dense', steps),
      'rigl, no mask update': make_config('rigl', steps, 0.9, start_fraction=1.0,
                                          end_fraction=1.0),
      'rigl, mask update every step': make_config('rigl', steps, 0.9, update_every=1,
                                                  start_fraction=0.0, end_fraction=1.0),
  }
  fns = {}
  for name, config in variants.items():
    run, it = train.init_run(config)
    fns[name] = benchmark.run_step_fn(run, next(it))
  times = benchmark.interleaved_times(fns, rounds=_BENCH_ROUNDS.value,
                                      steps_per_round=_BENCH_STEPS.value)
  return list(benchmark.median_times(times).items())


def main(argv):
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix='compare_sparse_')
  steps = _STEPS.value
  rows = []
  t_start = time.perf_counter()
  dense = train.train_and_evaluate(make_config('dense', steps), os.path.join(workdir, 'dense'))
  rows.append(('dense', '-', dense, sparse.flops_summary(make_config('dense', steps))))
  for s in (float(x) for x in _SPARSITIES.value):
    for algorithm in _ALGORITHMS.value:
      config = make_config(algorithm, steps, s)
      summary = train.train_and_evaluate(config, os.path.join(workdir, f'{algorithm}_{s}'))
      rows.append((algorithm, f'{s:.2f}', summary, sparse.flops_summary(config)))
  for lam in (float(x) for x in _DEMP_LAMS.value):
    # DemP removes units physically: its FLOPs are XLA's, integrated as the network shrinks.
    summary = train.train_and_evaluate(make_config('demp', steps, lam=lam),
                                       os.path.join(workdir, f'demp_{lam:g}'))
    rows.append((f'demp (λ={lam:g})', '-', summary,
                 {'inference_flops_rel': summary['inference_flops_rel'],
                  'training_flops_rel': summary['train_flops_rel']}))
  train_wall = time.perf_counter() - t_start

  dense_step = dense['step_time_final_s']
  widths = '-'.join(str(w) for w in make_config('dense', steps).model.widths)
  lines = [f'CIFAR-10 subset, ConvNet {widths}, {steps} steps, batch 128, seed '
           f'{_SEED.value}, {_DISTRIBUTION.value}, masks updated every {_UPDATE_EVERY.value} '
           f'steps from 0.3 T to 0.8 T; training wall time {train_wall:.0f} s',
           '',
           '| method | target sparsity (pruned weights) | weight sparsity (all params) | test acc '
           '| inference FLOPs | training FLOPs | step time [ms] | step time vs dense |',
           '|---|---|---|---|---|---|---|---|']
  for name, target, summary, fl in rows:
    step = summary['step_time_final_s']
    lines.append(f'| {name} | {target} | {summary["weight_sparsity"]:.3f} | '
                 f'{summary["test_accuracy"]:.3f} | {fl["inference_flops_rel"]:.2f}x | '
                 f'{fl["training_flops_rel"]:.2f}x | {1e3 * step:.0f} | {step / dense_step:.2f}x |')
  lines += ['', 'FLOPs: theoretical for the masked methods (conv/dense kernels, dense FLOPs x '
            'density per layer); for DemP, XLA\'s cost analysis of the compiled steps of the '
            'shrinking network. Step time: mean over each run (runs are sequential, so the '
            'machine load differs).', '']
  bench = step_benchmark(steps)
  base = bench[0][1]
  lines += ['Side-by-side step benchmark (interleaved rounds, same batch, median):', '',
            '| step | time [ms] | vs dense |', '|---|---|---|']
  lines += [f'| {name} | {1e3 * t:.0f} | {t / base:.2f}x |' for name, t in bench]
  text = '\n'.join(lines)
  print(text, flush=True)
  with open(os.path.join(workdir, 'compare_sparse.md'), 'w') as f:
    f.write(text + '\n')
  with open(os.path.join(workdir, 'compare_sparse.json'), 'w') as f:
    json.dump({'rows': [{'method': n, 'target': t, 'test_accuracy': s['test_accuracy'],
                         'weight_sparsity': s['weight_sparsity'],
                         'step_time_s': s['step_time_final_s'], **fl}
                        for n, t, s, fl in rows],
               'benchmark': dict(bench)}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
