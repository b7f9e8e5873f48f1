r"""Checkpoint cost: save / restore time and size, and the overhead of saving every N steps.

    python -m experiments.benchmark_checkpoint --model=resnet18 --sparsity=0.5 \
        --data_path=PATH/cifar10_subset.npz --out=/tmp/ckpt_bench.json

1. Save and restore, dense and pruned (``--sparsity`` of every unit group's
   units removed at random by the surgery): the blocking part of an
   asynchronous save (device-to-host copy, CRC-32 fingerprints, orbax's
   set-up), the time until the write is committed, the size on disk, and a
   full restore (metadata, abstract state at the saved widths, arrays,
   fingerprint check) into a freshly built run. Median of ``--rounds``.
2. Overhead on the step time: one compiled train step, timed over blocks of
   ``--block_steps`` steps with a checkpoint every N steps (``--every``,
   0 = never), the variants interleaved in ``--rounds`` rounds; each block
   waits for its writes, so background-write interference is counted.
3. The resume cost of the data position: skipping ``--skip_batches`` batches
   inside the pipeline vs consuming them.

Everything runs on the default backend (CPU here); state = params + batch stats
+ optimizer state of DemP over Adam (two moments, the noise key, counters).
"""

import json
import os
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np
from absl import app, flags, logging

from demp import data
from demp.trainer import checkpoint, train
from demp.trainer import config as config_lib
from tools import benchmark

_MODEL = flags.DEFINE_string('model', 'resnet18', 'Registry name of the model.')
_WIDTH = flags.DEFINE_float('width_multiplier', 1.0, 'Width multiplier (ResNet/VGG).')
_SPARSITY = flags.DEFINE_float('sparsity', 0.5, 'Fraction of units removed in the pruned variant.')
_DATA = flags.DEFINE_string('data_path', None, 'An .npz (see demp.data).', required=True)
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Train batch size for the step-time part.')
_ROUNDS = flags.DEFINE_integer('rounds', 3, 'Rounds (medians are reported).')
_EVERY = flags.DEFINE_list('every', ['0', '20', '5'], 'Checkpoint intervals to compare (0 = none).')
_BLOCK = flags.DEFINE_integer('block_steps', 20, 'Steps per timed block.')
_SKIP = flags.DEFINE_integer(
  'skip_batches', 2000, 'Batches for the data-position part (0 = skip it).'
)
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for every number.')


def _config():
  c = config_lib.base_config()
  c.model.name = _MODEL.value
  if _MODEL.value != 'mlp' and _MODEL.value != 'convnet':
    c.model.width_multiplier = _WIDTH.value
  c.data.source = 'npz'
  c.data.path = _DATA.value
  c.data.augment = 'crop_flip'
  c.batch_size = _BATCH.value
  c.num_steps = 1000
  c.prune.every = 1000
  c.prune.num_examples = 128
  c.progress_bar = False
  return c


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _pruned(run, sparsity: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  keeps = {}
  for name, width in run.model.widths.items():
    keep = np.zeros(width, bool)
    keep[rng.choice(width, max(1, int(round(width * (1 - sparsity)))), replace=False)] = True
    keeps[name] = keep
  run.prune(keeps, reason='benchmark')
  return run


def save_restore(config, variant: str, rounds: int) -> dict:
  run, _ = train.init_run(config)
  if variant == 'pruned':
    _pruned(run, _SPARSITY.value)
  jax.block_until_ready(run.state)
  flat, _ = checkpoint.flatten(run.state, 'state')
  nbytes = sum(np.asarray(x).nbytes for x in flat.values())
  block, total, restore, crc, sizes = [], [], [], [], []
  fresh, _ = train.init_run(config)
  for r in range(rounds):
    directory = tempfile.mkdtemp(prefix='ckpt_bench_')
    mngr = checkpoint.manager(directory)
    run.step = r + 1
    t0 = time.perf_counter()
    checkpoint.save(mngr, run, batches=run.step, progress={})
    t1 = time.perf_counter()
    mngr.wait_until_finished()
    t2 = time.perf_counter()
    sizes.append(_du(directory))
    t3 = time.perf_counter()
    checkpoint.fingerprints(flat)
    crc.append(time.perf_counter() - t3)
    mngr.close()
    reader = checkpoint.manager(directory)
    t4 = time.perf_counter()
    progress = checkpoint.restore(reader, checkpoint.read_meta(reader), fresh)
    jax.block_until_ready(fresh.state)
    restore.append(time.perf_counter() - t4)
    del progress
    assert dict(fresh.model.widths) == dict(run.model.widths)
    reader.close()
    shutil.rmtree(directory)
    block.append(t1 - t0)
    total.append(t2 - t0)
  return {
    'variant': variant,
    'params': int(sum(np.size(x) for x in jax.tree.leaves(run.state['params']))),
    'state_mb': nbytes / 2**20,
    'disk_mb': statistics.median(sizes) / 2**20,
    'save_blocking_s': statistics.median(block),
    'save_total_s': statistics.median(total),
    'crc32_s': statistics.median(crc),
    'restore_s': statistics.median(restore),
    'widths_total': int(sum(run.model.widths.values())),
  }


def overhead(config, everies: list[int], rounds: int, block_steps: int) -> dict:
  run, it = train.init_run(config)
  batches = [next(it) for _ in range(block_steps)]
  run.compile(batches[0])
  directory = tempfile.mkdtemp(prefix='ckpt_overhead_')
  mngr = checkpoint.manager(directory, keep=2)

  def block(every):
    """``block_steps`` steps with a save every ``every``; waits for the writes."""

    def fn():
      for i, b in enumerate(batches, 1):
        run.state, m = run.compiled(run.state, b)
        run.step += 1
        if every and i % every == 0:
          jax.block_until_ready(m)  # the trainer syncs before a save
          checkpoint.save(mngr, run, batches=run.step, progress={})
      jax.block_until_ready(m)
      mngr.wait_until_finished()
      return m

    return fn

  times = benchmark.interleaved_times(
    {e: block(e) for e in everies}, rounds=rounds, steps_per_round=1
  )
  mngr.close()
  shutil.rmtree(directory)
  med = {e: t / block_steps for e, t in benchmark.median_times(times).items()}
  return {str(e): {'step_s': t, 'ratio_to_first': t / med[everies[0]]} for e, t in med.items()}


def data_skip(config, batches: int) -> dict:
  t0 = time.perf_counter()
  it = data.train_iterator(config.data, config.batch_size, seed=0)
  for _ in range(batches):
    next(it)
  consumed = time.perf_counter() - t0
  t0 = time.perf_counter()
  next(data.train_iterator(config.data, config.batch_size, seed=0, start_batch=batches))
  skipped = time.perf_counter() - t0
  return {
    'batches': batches,
    'examples': batches * config.batch_size,
    'consume_s': consumed,
    'skip_s': skipped,
  }


def main(argv):
  del argv
  if not flags.FLAGS['verbosity'].present:  # orbax logs every save at INFO
    logging.set_verbosity(logging.WARNING)
  config = _config()
  out = {
    'model': _MODEL.value,
    'width_multiplier': _WIDTH.value,
    'sparsity': _SPARSITY.value,
    'backend': jax.default_backend(),
    'devices': jax.device_count(),
  }
  out['save_restore'] = [save_restore(config, v, _ROUNDS.value) for v in ('dense', 'pruned')]
  for r in out['save_restore']:
    print(
      f"{r['variant']:>6}: {r['params']:,} params, state {r['state_mb']:.1f} MB, on disk "
      f"{r['disk_mb']:.1f} MB; save blocking {r['save_blocking_s']:.3f} s (of which CRC-32 "
      f"{r['crc32_s']:.3f} s), committed {r['save_total_s']:.3f} s; restore {r['restore_s']:.3f} s",
      flush=True,
    )
  everies = [int(e) for e in _EVERY.value]
  out['overhead'] = overhead(config, everies, _ROUNDS.value, _BLOCK.value)
  for e, r in out['overhead'].items():
    print(f'every {e:>3}: {1e3 * r["step_s"]:.1f} ms/step, {r["ratio_to_first"]:.3f}x', flush=True)
  if _SKIP.value:
    out['data_skip'] = data_skip(config, _SKIP.value)
    d = out['data_skip']
    print(
      f"data position: consuming {d['batches']} batches ({d['examples']} examples) "
      f"{d['consume_s']:.1f} s, skipping them {d['skip_s']:.1f} s",
      flush=True,
    )
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(out, f, indent=2)


if __name__ == '__main__':
  app.run(main)
