r"""Train-step time of dense vs pruned models, side by side, and the cost of a prune event.

    python -m scripts.benchmark --models=resnet18,vgg16 --sparsities=0.25,0.5,0.75 \
        --batch_size=128 --out=/tmp/benchmark.json

For each model: the dense model and copies with ``sparsity`` of every unit
group's units removed at random by the surgery, compiled, then timed in
interleaved rounds (ratios are taken within one run); the FLOP ratio comes from
XLA's cost analysis of each compiled step. Then one prune event (death check on
``--num_examples`` images + surgery + recompiling the step) against τ steps.
The logic lives in :mod:`demp.benchmark`.
"""

import json

from absl import app, flags

from demp import benchmark

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


if __name__ == '__main__':
  app.run(main)
