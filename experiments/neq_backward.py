r"""Can NEq's frozen units skip backward compute in JAX? A side-by-side measurement.

    python -m experiments.neq_backward

A ConvNet 32-64-128-256 (3x3 conv -> ReLU -> 2x2 max-pool, global pool ->
dense; the comparison's model without BN), batch 128 at 32x32, loss and
gradients w.r.t. every parameter, jitted. A fraction ``f`` of every conv
layer's output channels is frozen (taken to be the first ``f·C``: a real
implementation would permute the units once per epoch, as the surgery can).
Variants:

* ``masked``: the whole kernel's gradient, masked afterwards (what
  ``baselines.freeze`` does: shapes static, no FLOP saved);
* ``split``: two convolutions per layer, ``conv(x, stop_gradient(W_frozen))``
  and ``conv(x, W_live)``, outputs concatenated: the frozen slice's weight
  gradient is never built (the input gradient still flows through both);
* ``concat``: one convolution with ``concat(stop_gradient(W_frozen), W_live)``
  as its kernel: does XLA prune the frozen part of the filter gradient?

Prints XLA's FLOPs and the median step time of each, interleaved in rounds,
relative to ``masked``; and the compile time a new frozen split costs (it
changes every epoch, so ``split`` recompiles every epoch).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from tools import benchmark

_FRACTIONS = flags.DEFINE_list('fractions', ['0', '0.25', '0.5', '0.75'], 'Frozen fractions.')
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per variant per round.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Batch size.')

WIDTHS = (32, 64, 128, 256)


def init(key) -> dict:
  params, c_in = {}, 3
  for i, c in enumerate(WIDTHS):
    key, sub = jax.random.split(key)
    params[f'conv_{i}'] = jax.random.normal(sub, (3, 3, c_in, c)) * np.sqrt(2 / (9 * c_in))
    c_in = c
  params['head'] = jax.random.normal(key, (c_in, 10)) * np.sqrt(1 / c_in)
  return params


def _conv(x, w):
  return jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


def make_loss(variant: str, fraction: float):
  def layer(x, w):
    n = int(round(fraction * w.shape[-1]))
    if variant == 'masked' or n == 0:
      return _conv(x, w)
    frozen, live = jax.lax.stop_gradient(w[..., :n]), w[..., n:]
    if variant == 'split':
      return jnp.concatenate([_conv(x, frozen), _conv(x, live)], axis=-1)
    return _conv(x, jnp.concatenate([frozen, live], axis=-1))  # 'concat'

  def loss(params, x, y):
    for i in range(len(WIDTHS)):
      x = jax.nn.relu(layer(x, params[f'conv_{i}']))
      x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
    logits = x.mean(axis=(1, 2)) @ params['head']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.jit(jax.value_and_grad(loss))


def main(argv):
  del argv
  params = init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (_BATCH.value, 32, 32, 3))
  y = jax.random.randint(jax.random.key(2), (_BATCH.value,), 0, 10)
  compiled, flops, compile_s = {}, {}, {}
  for f in (float(s) for s in _FRACTIONS.value):
    for variant in ('masked', 'split', 'concat'):
      if variant == 'masked' and f > 0:
        continue
      t0 = time.perf_counter()
      c = make_loss(variant, f).lower(params, x, y).compile()
      compile_s[(variant, f)] = time.perf_counter() - t0
      compiled[(variant, f)] = c
      flops[(variant, f)] = flops.compiled_flops(c)
  times = benchmark.median_times(
    benchmark.interleaved_times(
      {k: functools.partial(c, params, x, y) for k, c in compiled.items()},
      rounds=_ROUNDS.value,
      steps_per_round=_STEPS.value,
    )
  )
  base_t = times[('masked', 0.0)]
  base_f = flops[('masked', 0.0)]
  print(
    f'ConvNet {"-".join(map(str, WIDTHS))}, batch {_BATCH.value}, value_and_grad, '
    f'{jax.devices()[0].platform}, median of {_ROUNDS.value} interleaved rounds x '
    f'{_STEPS.value} steps\n'
  )
  print(
    '| variant | frozen fraction | XLA GFLOPs | FLOPs vs masked | step [ms] | time vs masked '
    '| compile [s] |'
  )
  print('|---|---|---|---|---|---|---|')
  for (variant, f), m in times.items():
    print(
      f'| {variant} | {f:.2f} | {flops[(variant, f)] / 1e9:.2f} | '
      f'{flops[(variant, f)] / base_f:.3f} | {1e3 * m:.1f} | {m / base_t:.3f} | '
      f'{compile_s[(variant, f)]:.1f} |'
    )


if __name__ == '__main__':
  app.run(main)
