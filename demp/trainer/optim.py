"""Optimizers and schedules of a config, wired in one place.

* :func:`base_optimizer`: ``optimizer.name`` (:data:`OPTIMIZERS`) with the
  learning-rate schedule (:func:`learning_rate_schedule`) and gradient clipping;
* :func:`demp_schedules` and :func:`demp_wrap`: DemP's λ_t, σ_t and the
  penalty + live-noise transforms around a base optimizer
  (:func:`demp.transforms.demp_optimizer`);
* :func:`accumulate`: gradient accumulation around the whole method optimizer;
* :func:`make_optimizer`: all of the above for a run's method.

Every schedule counts optimizer updates (:func:`num_updates`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from demp import data as data_lib
from demp import models, schedules, target, transforms, units


def _base_adam(lr, c):
  wd = [optax.add_decayed_weights(c.weight_decay)] if c.weight_decay else []
  return optax.chain(*wd, optax.adam(lr, eps=c.eps))


def _base_sgd(lr, c):
  wd = [optax.add_decayed_weights(c.weight_decay)] if c.weight_decay else []
  return optax.chain(*wd, optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


OPTIMIZERS: dict[
  str, Callable[[optax.Schedule, ml_collections.ConfigDict], optax.GradientTransformation]
] = {
  'adam': _base_adam,  # torch-style Adam: L2 added to the gradient
  'adamw': lambda lr, c: optax.adamw(lr, eps=c.eps, weight_decay=c.weight_decay),
  'sgd': _base_sgd,  # torch-style SGD + momentum + L2
}

DEMP_SCHEDULES = ('one_cycle', 'constant')
"""Shapes of λ_t and σ_t (``demp.schedule``)."""

DEMP_WARMUPS = ('cosine', 'linear')
"""One-cycle warm-up shapes (``demp.warmup``)."""


def num_updates(config) -> int:
  """Optimizer updates in the run: ``num_steps // optimizer.accumulate_steps``."""
  return max(1, config.num_steps // config.optimizer.accumulate_steps)


def learning_rate_schedule(config) -> optax.Schedule:
  """``optimizer.lr_schedule`` peaking at ``optimizer.learning_rate``, in updates."""
  c = config.optimizer
  kwargs = dict(c.lr_kwargs)
  kind = c.lr_schedule
  if kind == 'constant':
    return schedules.make_schedule('constant', value=c.learning_rate)
  if kind == 'one_cycle':
    kwargs.setdefault('total_steps', num_updates(config))
    return schedules.make_schedule(kind, peak_value=c.learning_rate, **kwargs)
  if kind == 'cosine':
    kwargs.setdefault('decay_steps', num_updates(config))
  return schedules.make_schedule(kind, init_value=c.learning_rate, **kwargs)


def base_optimizer(config) -> optax.GradientTransformation:
  """``optimizer.name`` with the learning-rate schedule and optional global-norm clipping."""
  c = config.optimizer
  tx = OPTIMIZERS[c.name](learning_rate_schedule(config), c)
  if c.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx


def accumulate(config, tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """Gradient accumulation around the *whole* method optimizer (``optax.MultiSteps``).

  Outermost, so DemP's penalty, live noise and every schedule act once per
  update on the mean gradient of ``accumulate_steps`` batches (noise added on
  every micro-step would move parameters between updates). The accumulator is
  param-shaped: the surgery slices it like the moments.
  """
  k = config.optimizer.accumulate_steps
  return tx if k == 1 else optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()


def demp_schedules(config) -> tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule]:
  """λ_t and σ_t (noise std) of the config: one-cycle (or constant) shapes over the span."""
  c = config.demp
  if c.schedule == 'constant':
    return c.peak_lambda, c.noise_std
  span = max(1, int(round(c.span * num_updates(config))))
  shape = functools.partial(schedules.one_cycle, total_steps=span, warmup=c.warmup)
  return shape(c.peak_lambda), shape(c.noise_std)


def _config_model(config):
  """The config's model (unbuilt parameters) and one input's shape."""
  info = data_lib.get_info(config.data)
  return models.from_config(config.model, info.num_classes), tuple(info.image_shape)


def demp_wrap(config, base: optax.GradientTransformation) -> optax.GradientTransformation:
  """``base`` with DemP's scheduled penalty and live noise, as ``config.demp`` sets them.

  ``demp.penalty_mask = 'groups'`` penalises each unit group's own norm scales;
  ``demp.penalty_weighting`` multiplies a group's penalty by its per-unit cost
  (:func:`demp.units.penalty_multipliers`, fixed at the dense widths);
  ``demp.noise_liveness = 'auto'`` reads liveness from the gradient for ReLU
  and from the death check's mask otherwise (:mod:`demp.units`);
  ``demp.offset_penalty = κ > 0`` adds ``κ·λ_t·Σ max(β, 0)`` on the normalization
  offsets (:data:`demp.transforms.NORM_OFFSETS`), coupled, whatever
  ``demp.penalty_coupling`` says for the scales.
  """
  lam, std = demp_schedules(config)
  c = config.demp
  model, mask, mults, liveness = None, c.penalty_mask, None, c.noise_liveness
  if (
    c.penalty_mask == 'groups'
    or c.penalty_weighting != 'none'
    or (liveness == 'auto' and c.noise_std > 0)
  ):
    model, image_shape = _config_model(config)
  if c.penalty_mask == 'groups':
    mask = units.group_scales_mask(model)
  if c.penalty_weighting != 'none' and c.peak_lambda > 0:
    params = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1,) + image_shape), train=False)
    )['params']
    mults = units.penalty_multipliers(model, params, c.penalty_weighting, image_shape)
  if liveness == 'auto':
    liveness = 'gradient' if model is None or model.activation == 'relu' else 'mask'
  if c.offset_penalty > 0:  # coupled: added to the loss gradient before the base optimizer
    kappa = float(c.offset_penalty)
    offsets = (lambda count: kappa * lam(count)) if callable(lam) else kappa * lam
    base = optax.chain(
      transforms.add_scheduled_penalty(offsets, 'positive', transforms.NORM_OFFSETS), base
    )
  if enabled(config):  # λ_t = shape × gain, the gain set by the controller (demp.target)
    return target.target_optimizer(
      base,
      lambda_shape=lam,
      noise_shape=std if c.noise_std > 0 else None,
      noise=c.target_noise,
      penalty_kind=c.penalty,
      penalty_mask=mask,
      noise_seed=config.seed + 1,
      symmetric_noise=c.noise_symmetric,
      noise_prng=c.noise_prng,
    )
  return transforms.demp_optimizer(
    base,
    penalty_strength=lam if c.peak_lambda > 0 else None,
    penalty_kind=c.penalty,
    penalty_mask=mask,
    noise_std=std if c.noise_std > 0 else None,
    noise_seed=config.seed + 1,
    symmetric_noise=c.noise_symmetric,
    noise_liveness=liveness,
    penalty_coupling=c.penalty_coupling,
    penalty_multipliers=mults,
    learning_rate=learning_rate_schedule(config),
    noise_prng=c.noise_prng,
  )


def make_optimizer(config, method) -> optax.GradientTransformation:
  """The run's optimizer: ``method.optimizer`` around :func:`base_optimizer`, accumulated."""
  return accumulate(config, method.optimizer(config, base_optimizer(config)))


def enabled(config) -> bool:
  """Whether the run steers λ to a target (``demp.target_sparsity > 0``)."""
  return config.method == 'demp' and float(config.demp.target_sparsity) > 0
