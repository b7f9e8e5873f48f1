r"""Cost of ``demp.make_prunable``: discovery time, and the wrapped vs the plain train step.

    python -m scripts.benchmark_auto --image 32 --batch 8 --rounds 7 --steps 3

The model is ResNet-50 written as in the Flax examples (``BottleneckResNetBlock``,
``[3, 4, 6, 3]``, 7x7 stem, plain Flax: no project code inside). Prints the
discovery time (abstract init + one traced forward + the analysis), then
compiles the same Adam train step for the plain module and for the prunable
one (ahead of time), checks that the two compiled programs compute the same
loss, and times them in alternating rounds of ``--steps`` steps in one
process (load on a shared machine hits both alike): median step time of
each, and their ratio. It also reports whether the two lowered programs are
the same text once source locations are stripped.
"""

import functools
import re
import statistics
import time

import flax
import flax.linen as nn
import numpy as np
import jax
import jax.numpy as jnp
import optax
from absl import app, flags

import demp

_IMAGE = flags.DEFINE_integer('image', 32, 'Input height = width.')
_BATCH = flags.DEFINE_integer('batch', 8, 'Batch size.')
_FILTERS = flags.DEFINE_integer('filters', 64, 'Stem width (64: ResNet-50).')
_ROUNDS = flags.DEFINE_integer('rounds', 7, 'Alternating rounds (the median is reported).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Steps per timed round.')


class BottleneckResNetBlock(nn.Module):
  """The Flax examples' bottleneck block."""

  filters: int
  conv: type
  norm: type
  act: callable
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.act(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = self.act(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class ResNet50(nn.Module):
  num_classes: int = 1000
  num_filters: int = 64
  stage_sizes: tuple = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, n in enumerate(self.stage_sizes):
      for j in range(n):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = BottleneckResNetBlock(self.num_filters * 2**i, conv, norm, nn.relu, strides)(x)
    return nn.Dense(self.num_classes)(jnp.mean(x, axis=(1, 2)))


def _step(model, tx):
  def step(variables, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({**variables, 'params': p}, x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
    updates, opt_state = tx.update(g, opt_state, variables['params'])
    return {**upd, 'params': optax.apply_updates(variables['params'], updates)}, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def _strip(text: str) -> str:
  return re.sub(r'loc\([^)]*\)|#loc\d*( = .*)?', '', text)


def main(argv):
  del argv
  plain = ResNet50(num_filters=_FILTERS.value)
  x = jax.random.normal(jax.random.key(0), (_BATCH.value, _IMAGE.value, _IMAGE.value, 3))
  y = jnp.arange(_BATCH.value) % 1000
  t0 = time.perf_counter()
  pmodel = demp.make_prunable(plain, x[:1], train=False)
  discovery = time.perf_counter() - t0
  print(demp.describe_groups(pmodel).splitlines()[0])
  print(f'discovery: {discovery:.2f} s (make_prunable, one abstract pass)')
  tx = optax.adam(1e-3)
  # Random values from the shapes alone (compiling ResNet-50's init takes minutes on a CPU).
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(1), x[:1], train=False))
  rng = np.random.default_rng(0)
  variables = jax.tree.map_with_path(
    lambda p, s: (
      (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(s.dtype)
      if p[-1].key == 'kernel'
      else (np.ones if p[-1].key in ('scale', 'var') else np.zeros)(s.shape, s.dtype)
    ),
    flax.core.unfreeze(shapes),
  )
  variables = jax.tree.map(jnp.asarray, variables)
  opt_state = tx.init(variables['params'])
  compiled, texts = {}, {}
  for name, model in (('plain', plain), ('prunable', pmodel)):
    lowered = _step(model, tx).lower(variables, opt_state, x, y)
    texts[name] = _strip(lowered.as_text())
    t0 = time.perf_counter()
    compiled[name] = lowered.compile()
    print(f'{name}: compiled in {time.perf_counter() - t0:.1f} s')
  print('same program text (locations stripped):', texts['plain'] == texts['prunable'])
  states = {n: jax.tree.map(jnp.copy, (variables, opt_state)) for n in compiled}
  losses = {}
  for name, fn in compiled.items():
    v, o, loss = fn(*states[name], x, y)
    states[name] = (v, o)
    losses[name] = float(loss)
  print(f'first-step loss: plain {losses["plain"]:.6f}, prunable {losses["prunable"]:.6f}')
  times = {n: [] for n in compiled}
  for _ in range(_ROUNDS.value):
    for name, fn in compiled.items():
      v, o = states[name]
      t0 = time.perf_counter()
      for _ in range(_STEPS.value):
        v, o, loss = fn(v, o, x, y)
      loss.block_until_ready()
      times[name].append((time.perf_counter() - t0) / _STEPS.value)
      states[name] = (v, o)
  med = {n: statistics.median(t) for n, t in times.items()}
  for name, t in times.items():
    print(f'{name} rounds (ms/step):', ' '.join(f'{v * 1e3:.0f}' for v in t))
  print(
    f'step time (median of {_ROUNDS.value} rounds x {_STEPS.value} steps, '
    f'batch {_BATCH.value}, {_IMAGE.value}x{_IMAGE.value}): plain {med["plain"] * 1e3:.1f} ms, '
    f'prunable {med["prunable"] * 1e3:.1f} ms, ratio {med["prunable"] / med["plain"]:.3f}'
  )


if __name__ == '__main__':
  app.run(main)
