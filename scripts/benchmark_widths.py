r"""Side-by-side train-step time of a model at its dense widths and at a run's final widths.

    python -m scripts.benchmark_widths --config configs/vit_cifar10_subset.py:act=relu \
        --summary /tmp/demp_vit_relu/summary.json --steps 10 --rounds 7

Both train steps are built exactly as the trainer builds them (same model
family, optimizer and method transforms, same batch shapes), compiled ahead
of time, then timed in alternating rounds of ``--steps`` steps in one process
(so load on a shared machine hits both alike); prints the median step time of
each, their ratio, and XLA's FLOP counts. Without a run, ``--keep_fraction``
benchmarks hypothetical final widths (every group at that fraction), e.g.
0.094 for the paper's 90.6 % of ViT-B/16 MLP units pruned::

    python -m scripts.benchmark_widths --config configs/vit_cifar10_subset.py --keep_fraction 0.094
"""

import json
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from demp import data as data_lib
from demp import metrics, models, train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
_SUMMARY = flags.DEFINE_string('summary', None, 'summary.json of the run (dense and final widths).')
_KEEP = flags.DEFINE_float('keep_fraction', None, 'Instead of --summary: final widths = this '
                           'fraction of the dense widths (hypothetical, not from a run).')
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Alternating rounds (the median is reported).')
flags.mark_flags_as_required(['config'])


def _compiled_step(config, model, batch):
  tx = train.accumulate(config, train.all_methods()[config.method].optimizer(
      config, train.base_optimizer(config)))
  variables = jax.jit(model.init, static_argnames='train')(
      jax.random.key(config.seed), batch['image'][:1], train=False)
  state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
           'opt_state': tx.init(variables['params'])}
  step = jax.jit(train.make_train_step(model, tx, config.label_smoothing), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  return compiled, state


def _time(compiled, state, batch, steps):
  t0 = time.perf_counter()
  for _ in range(steps):
    state, out = compiled(state, batch)
  jax.block_until_ready(out)
  return state, (time.perf_counter() - t0) / steps


def main(argv):
  del argv
  config = _CONFIG.value
  if (_SUMMARY.value is None) == (_KEEP.value is None):
    raise app.UsageError('give exactly one of --summary and --keep_fraction.')
  info = data_lib.get_info(config.data)
  kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  dense = models.build(config.model.name, info.num_classes, **kwargs)
  if _SUMMARY.value is not None:
    with open(_SUMMARY.value) as f:
      summary = json.load(f)
  else:
    if not 0 < _KEEP.value <= 1:
      raise app.UsageError(f'--keep_fraction={_KEEP.value} must be in (0, 1].')
    summary = {'dense_widths': dict(dense.widths),
               'widths': {k: max(1, round(_KEEP.value * w)) for k, w in dense.widths.items()}}
  archs = {'dense': dense.clone(widths=flax.core.FrozenDict(summary['dense_widths'])),
           'final': dense.clone(widths=flax.core.FrozenDict(summary['widths']))}
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(size=(config.batch_size,) + tuple(info.image_shape)),
                                jnp.float32),
           'label': jnp.asarray(rng.integers(0, info.num_classes, config.batch_size), jnp.int32)}
  runs = {name: _compiled_step(config, m, batch) for name, m in archs.items()}
  flops = {name: metrics.compiled_flops(c) for name, (c, _) in runs.items()}
  states = {name: s for name, (_, s) in runs.items()}
  for name, (c, _) in runs.items():                      # warm-up
    states[name], _ = _time(c, states[name], batch, 2)
  times = {name: [] for name in runs}
  for _ in range(_ROUNDS.value):
    for name, (c, _) in runs.items():
      states[name], t = _time(c, states[name], batch, _STEPS.value)
      times[name].append(t)
  med = {name: float(np.median(ts)) for name, ts in times.items()}
  print(f'widths dense: {dict(summary["dense_widths"])}')
  print(f'widths final: {dict(summary["widths"])}')
  print(f'batch {config.batch_size}, {_ROUNDS.value} alternating rounds of {_STEPS.value} steps')
  for name in runs:
    print(f'{name:>5}: median {1e3 * med[name]:8.2f} ms/step  '
          f'(min {1e3 * min(times[name]):.2f}, max {1e3 * max(times[name]):.2f})  '
          f'{flops[name] / 1e9:.3f} GFLOP/step')
  print(f'ratio final/dense: time {med["final"] / med["dense"]:.3f}, '
        f'FLOPs {flops["final"] / flops["dense"]:.3f}')


if __name__ == '__main__':
  app.run(main)
