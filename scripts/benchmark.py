r"""Train-step time of dense vs pruned models, side by side, and the cost of a prune event.

    python -m scripts.benchmark --models=resnet18,vgg16 --sparsities=0.25,0.5,0.75 \
        --batch_size=128 --out=/tmp/benchmark.json

For each model: the dense model and copies with ``sparsity`` of every unit
group's units removed at random by the surgery, compiled, then timed in
interleaved rounds (ratios are taken within one run); the FLOP ratio comes from
XLA's cost analysis of each compiled step. Then one prune event (death check on
``--num_examples`` images + surgery + recompiling the step) against τ steps.

``--optimizers`` instead times one model's train step under DemP's optimizer
variants (:data:`tools.benchmark.OPTIMIZER_VARIANTS`: bare Adam, DemP, penalty
only, noise only, ...) in interleaved rounds, as ratios to bare Adam with their
quartiles over rounds, and the same ratio estimated from the optimizer update
alone (:func:`tools.benchmark.optimizer_times`). On a CPU shared with other work
use ``--clock=process`` (CPU seconds of this process), pinned to one core and
one XLA thread::

    XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \
    taskset -c 1 python -m scripts.benchmark --optimizers --models=resnet18 \
        --width_multiplier=0.25 --batch_size=32 --rounds=30 --steps_per_round=2 --clock=process

``--breakdown`` instead splits one training step of a config's run into input
pipeline, dispatch, compute and host sync, at several width multipliers and for
a randomly pruned copy of the widest, next to XLA's FLOPs, and fits
``step = a·FLOPs + b`` over the widths (:func:`tools.benchmark.step_breakdown`)::

    python -m scripts.benchmark --breakdown --data_path=<cifar10_subset.npz> \
        --breakdown_widths=0.25,0.5,0.75,1.0 --batch_size=128 --rounds=7

The logic lives in :mod:`tools.benchmark`.
"""

import importlib.util
import json
import os
import time

from absl import app, flags

from tools import benchmark

_MODELS = flags.DEFINE_list('models', ['resnet18', 'vgg16'], 'Registry names of the models.')
_SPARSITIES = flags.DEFINE_list('sparsities', ['0.25', '0.5', '0.75'], 'Neuron sparsities.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Train batch size.')
_IMAGE = flags.DEFINE_list(
  'image_sizes', ['resnet18=32', 'vgg16=64'], 'Square input size per model, name=size (default 32).'
)
_WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Width multiplier of every model.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds.')
_STEPS = flags.DEFINE_integer('steps_per_round', 2, 'Steps per variant per round.')
_TAUS = flags.DEFINE_list(
  'taus',
  ['resnet18=5000', 'resnet50=5000', 'vgg16=1000'],
  'Prune interval τ per model, name=steps.',
)
_EXAMPLES = flags.DEFINE_integer('num_examples', 512, 'Death-check examples of the prune event.')
_EVENT = flags.DEFINE_bool('prune_event', True, 'Also time one prune event per model.')
_NOISE = flags.DEFINE_bool('noise', True, 'Include the live-noise transform in the optimizer.')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for every number.')
_OPTIMIZERS = flags.DEFINE_bool(
  'optimizers', False, 'Only time the step under the optimizer variants (--optimizer_variants).'
)
_VARIANTS = flags.DEFINE_list(
  'optimizer_variants',
  ['adam', 'demp', 'penalty', 'noise'],
  'Keys of tools.benchmark.OPTIMIZER_VARIANTS; the first is the reference of the ratios.',
)
_UPDATE_ROUNDS = flags.DEFINE_integer(
  'update_rounds', 200, '--optimizers: interleaved rounds (of 10) timing the update alone.'
)
_CLOCKS = {'wall': time.perf_counter, 'process': time.process_time}
_CLOCK = flags.DEFINE_enum(
  'clock',
  'wall',
  list(_CLOCKS),
  'wall: wall time; process: CPU seconds of this process (CPU only).',
)


_BREAKDOWN = flags.DEFINE_bool(
  'breakdown', False, 'Only split a run\'s train step into input, dispatch, compute, sync.'
)
_BREAKDOWN_CONFIG = flags.DEFINE_string(
  'breakdown_config',
  'configs/compare_cifar10_subset.py',
  '--breakdown: a config file whose get_config takes method=, width= and path=.',
)
_DATA_PATH = flags.DEFINE_string('data_path', None, '--breakdown: the config\'s path= (the .npz).')
_BREAKDOWN_WIDTHS = flags.DEFINE_list(
  'breakdown_widths', ['0.25', '0.5', '0.75', '1.0'], '--breakdown: width multipliers.'
)
_BREAKDOWN_SPARSITY = flags.DEFINE_float(
  'breakdown_sparsity', 0.5, '--breakdown: the pruned variant\'s random neuron sparsity.'
)
_METHOD = flags.DEFINE_string('method', 'demp', '--breakdown: the config\'s method=.')


def _breakdown() -> None:
  if not _DATA_PATH.value:
    raise app.UsageError('--breakdown needs --data_path (the npz of the config).')
  path = _BREAKDOWN_CONFIG.value
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  def config_fn(width: float):
    c = module.get_config(f'method={_METHOD.value},width={width},path={_DATA_PATH.value}')
    c.batch_size = _BATCH.value
    return c

  result = benchmark.step_breakdown(
    config_fn,
    [float(w) for w in _BREAKDOWN_WIDTHS.value],
    sparsity=_BREAKDOWN_SPARSITY.value,
    rounds=_ROUNDS.value,
    steps_per_round=_STEPS.value,
  )
  print(
    f'{path} method={_METHOD.value}, batch {_BATCH.value}, {_ROUNDS.value} interleaved rounds x '
    f'{_STEPS.value} steps, medians over rounds',
    flush=True,
  )
  print(benchmark.format_breakdown_table(result), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(result, f, indent=2)


def _pairs(items: list[str]) -> dict[str, int]:
  out = {}
  for item in items:
    name, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'expected name=value, got {item!r}.')
    out[name] = int(value)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sizes, taus = _pairs(_IMAGE.value), _pairs(_TAUS.value)
  sparsities = tuple(float(s) for s in _SPARSITIES.value)
  kwargs = {'width_multiplier': _WIDTH.value}
  if _OPTIMIZERS.value:
    _optimizers(sizes, kwargs)
    return
  if _BREAKDOWN.value:
    _breakdown()
    return
  results = {'steps': [], 'events': []}
  for name in _MODELS.value:
    rows = benchmark.step_times(
      name,
      image_hw=sizes.get(name, 32),
      batch_size=_BATCH.value,
      sparsities=sparsities,
      rounds=_ROUNDS.value,
      steps_per_round=_STEPS.value,
      model_kwargs=kwargs,
      noise=_NOISE.value,
    )
    results['steps'] += rows
    print(benchmark.format_step_table(rows), flush=True)
    if _EVENT.value:
      event = benchmark.prune_event_time(
        name,
        image_hw=sizes.get(name, 32),
        batch_size=_BATCH.value,
        sparsity=sparsities[0],
        num_examples=_EXAMPLES.value,
        model_kwargs=kwargs,
        noise=_NOISE.value,
      )
      results['events'].append(event)
      print(benchmark.format_event_table([event], taus), flush=True)
  if _EVENT.value:
    print(benchmark.format_event_table(results['events'], taus))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


def _optimizers(sizes: dict[str, int], kwargs: dict) -> None:
  unknown = sorted(set(_VARIANTS.value) - set(benchmark.OPTIMIZER_VARIANTS))
  if unknown:
    raise app.UsageError(
      f'--optimizer_variants: unknown {unknown}; known: {sorted(benchmark.OPTIMIZER_VARIANTS)}.'
    )
  config = benchmark.config_lib.base_config()
  results = {}
  for name in _MODELS.value:
    result = benchmark.optimizer_times(
      name,
      variants={v: benchmark.OPTIMIZER_VARIANTS[v](config) for v in _VARIANTS.value},
      image_hw=sizes.get(name, 32),
      batch_size=_BATCH.value,
      rounds=_ROUNDS.value,
      steps_per_round=_STEPS.value,
      update_rounds=_UPDATE_ROUNDS.value,
      model_kwargs=kwargs,
      clock=_CLOCKS[_CLOCK.value],
    )
    results[name] = result
    print(
      f'{name} width {_WIDTH.value}, batch {_BATCH.value}, {_ROUNDS.value} rounds x '
      f'{_STEPS.value} steps, clock={_CLOCK.value}',
      flush=True,
    )
    print(benchmark.format_optimizer_table(result), flush=True)
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  app.run(main)
