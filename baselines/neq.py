"""NEq (neurons at equilibrium) and its stochastic baseline: freeze units, don't prune.

Each epoch NEq runs a fixed slice of the training set (``data.holdout``
examples carved out of the training split, so never trained on; NEq uses 1 %
for CIFAR. Without ``data.holdout`` it falls back to ``holdout_fraction`` of the
training examples, not held out: see :func:`measurement_images`) through the
model in eval mode and records every unit's
post-activation outputs. For unit ``i``:

* ``φ_i^t``: similarity of its outputs now and at the previous measurement:
  per example the cosine over positions (a conv channel's spatial map; a
  ViT unit's tokens), then the mean over the examples. A unit with one output
  per example (a dense layer) is the same rule with one position: the
  per-example cosine of two scalars is the agreement of their signs (1 same
  sign, -1 opposite), so φ is the mean sign agreement. An all-zero pair counts
  as 1, one zero vector as 0 (as NEq's code does);
* ``Δφ_i^t = φ_i^t - φ_i^{t-1}`` and the velocity ``v_t = Δφ_t - μ_eq·v_{t-1}``
  (slides' form, ``v = 0`` before the first ``Δφ``);
* ``|v| < ε``: the unit is frozen for the next epoch: its incoming parameters
  (producer slices) get no update, no decay and no optimizer-state change
  (:mod:`baselines.freeze`); it unfreezes when its velocity rises again.

Measurements happen at step 0 and at every epoch end, so ``φ`` exists from
epoch 1 and the first units can freeze at the end of epoch 2. The masks are
data in the optimizer state: changing them never recompiles.

``neq_stochastic`` (the slides' random baseline) instead freezes a random
``stochastic_fraction`` of each group's units at every epoch end.

Savings are reported as NEq does, back-propagation FLOPs: a frozen unit's
weight gradient (``2·B·P·K`` FLOPs for a producer kernel slice of ``K``
inputs per unit, ``P`` output positions, batch ``B``) need not be computed.
In this trainer it still is: shapes are static under ``jit``, the gradient of
the whole kernel is computed and then masked, so wall-clock time does not
drop (``experiments/neq_backward.py`` measures what splitting the kernels would
buy). ``run.stats`` holds the per-epoch frozen counts and the FLOP figures.

Reference:
  Bragagnolo et al., `To update or not to update? Neurons at equilibrium in
  deep models <https://arxiv.org/abs/2207.09455>`_, NeurIPS 2022.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from baselines import config as config_lib
from baselines import freeze
from demp import data as data_lib
from demp import flops
from demp.trainer import methods, steps
from demp.trainer.run import Run

# ----------------------------------------------------------------------------
# Pure pieces.


def cosine(x: jax.Array, y: jax.Array, axis: int) -> jax.Array:
  """Cosine similarity along ``axis``; 1 where both are zero, 0 where one is."""
  nx = jnp.sqrt(jnp.sum(x * x, axis=axis))
  ny = jnp.sqrt(jnp.sum(y * y, axis=axis))
  both = nx * ny
  cos = jnp.sum(x * y, axis=axis) / jnp.where(both > 0, both, 1.0)
  return jnp.where((nx == 0) & (ny == 0), 1.0, jnp.where(both > 0, cos, 0.0))


def phi(prev_npc: jax.Array, cur_npc: jax.Array) -> jax.Array:
  """``φ`` per unit from outputs ``[examples, positions, units]`` at two times.

  The mean over examples of the per-example cosine over positions, for every
  layer kind (one position for a dense unit: the mean sign agreement).
  """
  if prev_npc.shape != cur_npc.shape:
    raise ValueError(f'output shapes differ: {prev_npc.shape} vs {cur_npc.shape}.')
  return jnp.mean(cosine(prev_npc, cur_npc, axis=1), axis=0)


def velocity(
  phi_prev: np.ndarray, phi_now: np.ndarray, v_prev: np.ndarray, mu_eq: float
) -> np.ndarray:
  """``v_t = (φ_t - φ_{t-1}) - μ_eq·v_{t-1}``."""
  return (np.asarray(phi_now) - np.asarray(phi_prev)) - mu_eq * np.asarray(v_prev)


@functools.partial(jax.jit, static_argnames=('model',))
def unit_outputs(model, variables, images: jax.Array) -> dict[str, jax.Array]:
  """Each group's post-activations ``[N, positions, units]`` in eval mode (sites concatenated)."""
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  out = {}
  for g in model.unit_groups():
    parts = [
      a.reshape((a.shape[0], -1, a.shape[-1]))
      for site in g.sites
      for a in _at(state['intermediates'], site)
    ]
    out[g.name] = jnp.concatenate(parts, axis=1)
  return out


def _at(tree, path: tuple[str, ...]):
  for k in path:
    tree = tree[k]
  return tree


# ----------------------------------------------------------------------------
# FLOPs.


def wgrad_flops_per_unit(
  model, params, positions: Mapping[str, int], batch_size: int
) -> dict[str, float]:
  """Weight-gradient FLOPs of one unit per step: ``2·B·P·(kernel size / width)``."""
  out = {}
  for g in model.unit_groups():
    kernels = [s.path for s in g.producers if s.path[-1] == 'kernel']
    size = sum(int(np.size(_at(params, p))) for p in kernels)
    out[g.name] = 2.0 * batch_size * positions[g.name] * size / model.widths[g.name]
  return out


def bprop_flops(run: Run) -> float:
  """Back-propagation FLOPs of one step: XLA's train-step FLOPs minus its forward pass."""
  c = run.config
  shape = (c.batch_size,) + tuple(run.death_images.shape[1:])

  def forward(params, batch_stats, x, y):
    logits, _ = run.model.apply(
      {'params': params, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    return steps.cross_entropy(logits, y, c.label_smoothing).mean()

  compiled = (
    jax.jit(forward)
    .lower(
      run.state['params'],
      run.state['batch_stats'],
      jax.ShapeDtypeStruct(shape, jnp.float32),
      jax.ShapeDtypeStruct(shape[:1], jnp.int32),
    )
    .compile()
  )
  return run.step_flops - flops.compiled_flops(compiled)


# ----------------------------------------------------------------------------
# Hooks.


def _positions(run: Run) -> dict[str, int]:
  shapes = jax.eval_shape(lambda x: unit_outputs(run.model, run.variables, x), run.death_images[:1])
  return {k: int(v.shape[1]) for k, v in shapes.items()}


def set_frozen(run: Run, step: int, frozen_units: Mapping[str, np.ndarray]) -> None:
  """Puts the masks in the optimizer state and accounts the FLOPs they save until the next epoch."""
  c = config_lib.resolve(run.config)
  params = run.state['params']
  masks = freeze.unit_masks(params, run.model.unit_groups(), frozen_units)
  run.state = {**run.state, 'opt_state': freeze.with_frozen(run.state['opt_state'], masks)}

  memo = run.memo
  if 'unit_flops' not in memo:
    memo.update(
      unit_flops=wgrad_flops_per_unit(run.model, params, _positions(run), run.config.batch_size),
      saved=0.0,
      frozen_unit_steps=0.0,
      per_epoch=[],
    )
  steps = min(c.steps_per_epoch, run.config.num_steps - step)  # steps these masks cover
  counts = {k: int(np.sum(v)) for k, v in frozen_units.items()}
  saved_per_step = sum(memo['unit_flops'][k] * n for k, n in counts.items())
  memo['saved'] += saved_per_step * steps
  memo['frozen_unit_steps'] += sum(counts.values()) * steps
  memo['per_epoch'].append({'step': step, 'frozen': counts})
  run.log({'event': 'freeze', 'step': step, 'frozen': counts})
  if np.isfinite(run.step_flops) and 'bprop_flops' not in memo:
    memo['bprop_flops'] = bprop_flops(run)
  total_units = sum(run.model.widths.values())
  num_steps = run.config.num_steps
  run.stats.update(
    frozen_fraction_mean=memo['frozen_unit_steps'] / (num_steps * total_units),
    wgrad_flops_saved_per_step_mean=memo['saved'] / num_steps,
    bprop_flops_per_step=memo.get('bprop_flops', float('nan')),
    bprop_flops_saved_frac=memo['saved'] / (num_steps * memo.get('bprop_flops', float('nan'))),
    frozen_per_epoch=memo['per_epoch'],
  )


def measurement_images(config: ml_collections.ConfigDict, holdout_fraction: float) -> np.ndarray:
  """NEq's measurement slice, held out from training when ``data.holdout > 0``.

  With ``data.holdout = N`` the last ``N`` training examples never enter the
  training stream (:func:`demp.data.train_iterator`) and are the slice, as in
  NEq. With ``data.holdout = 0`` (the trainer's default, kept so that every
  method of a comparison trains on the same examples unless asked) the slice is
  ``holdout_fraction`` of the training examples the model also trains on, and
  a warning says so.
  """
  if config.data.get('holdout', 0):
    return data_lib.fixed_examples(
      config.data, config.data.holdout, seed=config.seed + 2, split='holdout'
    )['image']
  logging.warning(
    'NEq measures φ on %.2f%% of the training examples it also trains on; set '
    'data.holdout to hold them out.',
    100 * holdout_fraction,
  )
  n = max(1, int(round(holdout_fraction * data_lib.get_info(config.data).num_train)))
  return data_lib.fixed_examples(config.data, n, seed=config.seed + 2)['image']


def neq_hook(run: Run, step: int) -> None:
  """Measures φ at step 0 and every epoch end; from the second Δφ on, freezes |v| < ε."""
  c = config_lib.resolve(run.config)
  memo = run.memo
  if 'holdout' not in memo:
    memo['holdout'] = jnp.asarray(measurement_images(run.config, c.holdout_fraction))
  outputs = unit_outputs(run.model, run.variables, memo['holdout'])
  prev = memo.get('outputs')
  memo['outputs'] = outputs
  if prev is None:
    return
  phi_now = {k: np.asarray(phi(prev[k], outputs[k])) for k in outputs}
  phi_prev = memo.get('phi')
  memo['phi'] = phi_now
  if phi_prev is None:
    return
  v_prev = memo.get('velocity', {k: np.zeros_like(v) for k, v in phi_now.items()})
  v = {k: velocity(phi_prev[k], phi_now[k], v_prev[k], c.mu_eq) for k in phi_now}
  memo['velocity'] = v
  set_frozen(run, step, {k: np.abs(x) < c.eps for k, x in v.items()})


def stochastic_hook(run: Run, step: int) -> None:
  """Freezes a random ``stochastic_fraction`` of every group's units for the next epoch."""
  c = config_lib.resolve(run.config)
  rng = np.random.default_rng([run.config.seed, step])
  frozen = {}
  for name, width in run.model.widths.items():
    mask = np.zeros(width, bool)
    mask[rng.choice(width, int(round(c.stochastic_fraction * width)), replace=False)] = True
    frozen[name] = mask
  set_frozen(run, step, frozen)


def _frozen_optimizer(config: ml_collections.ConfigDict, base: optax.GradientTransformation):
  config_lib.resolve(config)
  return freeze.freeze(base)


methods.register(
  'neq',
  methods.Method(
    optimizer=_frozen_optimizer,
    hook=neq_hook,
    when=lambda config, step: step == 0 or config_lib.epoch_end(config, step),
  ),
)
methods.register(
  'neq_stochastic',
  methods.Method(optimizer=_frozen_optimizer, hook=stochastic_hook, when=config_lib.epoch_end),
)
