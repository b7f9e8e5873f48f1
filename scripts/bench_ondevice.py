r"""Time per training batch: the tf.data pipeline vs the on-device path (:mod:`demp.data.ondevice`).

    taskset -c 0 python -m scripts.bench_ondevice --path=cifar10_subset.npz \
        --config_arg=width=0.5 --batches=200

The data config and batch size of ``configs/compare_cifar10_subset.py``. Per
batch, after ``--warmup`` batches: (a) ``next()`` on ``demp.data.train_iterator``
(decode, crop+flip, normalize, batch; prefetched), (a+put) the same plus
``jax.device_put`` of the batch, (b) one call of ``jax.jit(batch_at)``, and
(c) ``batch_at`` inside a ``lax.scan`` of ``--k`` steps (one dispatch per
``k`` batches), per batch. Prints the median wall time and the process CPU
time per batch (all threads; robust to other work on a shared machine).
"""

import functools
import json
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import compare_cifar10_subset
from demp import data
from demp.data import ondevice

_PATH = flags.DEFINE_string('path', None, 'The CIFAR-10 subset .npz.', required=True)
_ARG = flags.DEFINE_string('config_arg', 'width=0.5', 'compare_cifar10_subset argument.')
_BATCHES = flags.DEFINE_integer('batches', 200, 'Timed batches per variant.')
_WARMUP = flags.DEFINE_integer('warmup', 20, 'Untimed batches first.')
_K = flags.DEFINE_integer('k', 8, 'Steps per dispatch for the scanned variant.')


def _time(fn, n):
  """(median wall seconds per call, process CPU seconds per call) over n calls."""
  walls = []
  cpu0 = time.process_time()
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    walls.append(time.perf_counter() - t0)
  return float(np.median(walls)), (time.process_time() - cpu0) / n


def main(argv):
  del argv
  config = compare_cifar10_subset.get_config(f'{_ARG.value},path={_PATH.value}')
  batch_size, seed = config.batch_size, config.seed
  results = {'device': str(jax.devices()[0]), 'batch_size': batch_size}

  it = data.train_iterator(config.data, batch_size, seed=seed)
  for _ in range(_WARMUP.value):
    next(it)
  results['tf_data'] = _time(lambda: next(it), _BATCHES.value)
  put = lambda: jax.block_until_ready(jax.device_put(next(it)))
  results['tf_data_put'] = _time(put, _BATCHES.value)

  images, labels, mean, std = ondevice.load_train_split(config.data)
  dev = ondevice.put_on_device(images, labels, mean=mean, std=std)
  aug = ondevice.make_augment_config(config.data, config.batch_augment)
  one = jax.jit(functools.partial(ondevice.batch_at, batch_size=batch_size, augment_config=aug))
  step = iter(range(10**9))
  for _ in range(_WARMUP.value):
    jax.block_until_ready(one(dev, next(step), seed))
  results['batch_at'] = _time(
    lambda: jax.block_until_ready(one(dev, next(step), seed)), _BATCHES.value
  )

  k = _K.value

  def consume(total, batch):  # a stand-in train step that reads every pixel
    return total + jnp.sum(batch['image']), {}

  scanned = jax.jit(
    functools.partial(
      ondevice.scan_steps, consume, k=k, seed=seed, batch_size=batch_size, augment_config=aug
    )
  )
  start = iter(range(0, 10**9, k))
  run = lambda: jax.block_until_ready(scanned(jnp.float32(0), dev, next(start)))
  for _ in range(max(1, _WARMUP.value // k)):
    run()
  wall, cpu = _time(run, max(50, _BATCHES.value // k))
  results[f'scan_k{k}'] = (wall / k, cpu / k)
  for name in ('tf_data', 'tf_data_put', 'batch_at', f'scan_k{k}'):
    wall, cpu = results[name]
    print(
      f'{name:14s} median wall {wall * 1e3:8.3f} ms/batch   process CPU {cpu * 1e3:8.3f} ms/batch'
    )
  print(json.dumps(results))


if __name__ == '__main__':
  app.run(main)
