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

import flax
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

import baselines  # noqa: F401  (registers the baselines' methods)
from tools import analysis  # noqa: F401  (registers the analysis methods)
from tools import benchmark
from demp.trainer import methods, optim, steps
from demp import models
from demp.trainer import config as config_lib
from demp import data as data_lib
from demp.trainer import run as run_lib
from demp import flops

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file.', lock_config=True
)
_SUMMARY = flags.DEFINE_string('summary', None, 'summary.json of the run (dense and final widths).')
_KEEP = flags.DEFINE_float(
  'keep_fraction',
  None,
  'Instead of --summary: final widths = this '
  'fraction of the dense widths (hypothetical, not from a run).',
)
_STEPS = flags.DEFINE_integer('steps', 10, 'Steps per timed round.')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Alternating rounds (the median is reported).')
flags.mark_flags_as_required(['config'])


def _compiled_step(config, model, batch):
  tx = optim.make_optimizer(config, methods.get(config.method))
  state = run_lib.create_train_state(
    model, tx, jax.random.key(config.seed), batch['image'].shape[1:]
  )
  step = jax.jit(steps.make_train_step(model, tx, config.label_smoothing), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  return compiled, state


def main(argv):
  del argv
  config = _CONFIG.value
  if (_SUMMARY.value is None) == (_KEEP.value is None):
    raise app.UsageError('give exactly one of --summary and --keep_fraction.')
  config_lib.validate_config(config)
  info = data_lib.get_info(config.data)
  dense = models.from_config(config.model, info.num_classes)
  if _SUMMARY.value is not None:
    with open(_SUMMARY.value) as f:
      summary = json.load(f)
  else:
    if not 0 < _KEEP.value <= 1:
      raise app.UsageError(f'--keep_fraction={_KEEP.value} must be in (0, 1].')
    summary = {
      'dense_widths': dict(dense.widths),
      'widths': {k: max(1, round(_KEEP.value * w)) for k, w in dense.widths.items()},
    }
  archs = {
    'dense': dense.clone(widths=flax.core.FrozenDict(summary['dense_widths'])),
    'final': dense.clone(widths=flax.core.FrozenDict(summary['widths'])),
  }
  rng = np.random.default_rng(0)
  batch = {
    'image': jnp.asarray(
      rng.uniform(size=(config.batch_size,) + tuple(info.image_shape)), jnp.float32
    ),
    'label': jnp.asarray(rng.integers(0, info.num_classes, config.batch_size), jnp.int32),
  }
  runs = {name: _compiled_step(config, m, batch) for name, m in archs.items()}
  flops = {name: flops.compiled_flops(c) for name, (c, _) in runs.items()}
  states = {name: s for name, (_, s) in runs.items()}

  def step_fn(name, compiled):
    def step():
      states[name], out = compiled(states[name], batch)
      return out

    return step

  times = benchmark.interleaved_times(
    {name: step_fn(name, c) for name, (c, _) in runs.items()},
    rounds=_ROUNDS.value,
    steps_per_round=_STEPS.value,
    warmup=2,
  )
  med = benchmark.median_times(times)
  print(f'widths dense: {dict(summary["dense_widths"])}')
  print(f'widths final: {dict(summary["widths"])}')
  print(f'batch {config.batch_size}, {_ROUNDS.value} alternating rounds of {_STEPS.value} steps')
  for name in runs:
    print(
      f'{name:>5}: median {1e3 * med[name]:8.2f} ms/step  '
      f'(min {1e3 * min(times[name]):.2f}, max {1e3 * max(times[name]):.2f})  '
      f'{flops[name] / 1e9:.3f} GFLOP/step'
    )
  print(
    f'ratio final/dense: time {med["final"] / med["dense"]:.3f}, '
    f'FLOPs {flops["final"] / flops["dense"]:.3f}'
  )


if __name__ == '__main__':
  app.run(main)
