"""The one canonical trainer: ``train_and_evaluate(config, workdir)``.

The train step is a pure jitted function of ``(state, batch)``, compiled ahead
of time once per architecture. Every ``prune.every`` steps (and once at the
end) the method's hook may run the death check and the surgery: the model is
rebuilt at its new widths, params / batch stats / optimizer state are sliced,
and the step is compiled again for the smaller shapes.

Methods are entries of :data:`METHODS` (``dense``, ``demp``; the baselines
register theirs in ``baselines.METHODS``). A method is two functions: one that
wraps the base optimizer, one host hook called after every step that may call
``run.prune(keeps)`` or edit ``run.state``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from demp import data as data_lib
from demp import augment, checkpoint, deadunits, flops, metrics, models, parallel, revival, schedules, surgery, transforms
from demp import workdir as workdir_lib

PyTree = Any

# ----------------------------------------------------------------------------
# Configuration.


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default. Config files override these."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'demp'
  c.model = ml_collections.ConfigDict({'name': 'mlp'})   # plus the model's kwargs
  c.data = data_lib.default_data_config()
  c.batch_size = 128
  c.num_steps = 1000
  c.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'               # adam (coupled L2) | adamw (decoupled) | sgd (momentum)
  c.optimizer.learning_rate = 1e-3        # the peak / initial value of the schedule
  c.optimizer.lr_schedule = 'constant'    # a key of demp.schedules.SCHEDULES
  c.optimizer.lr_kwargs = ml_collections.ConfigDict()   # extra schedule arguments, in steps
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.0        # 0 = off
  c.optimizer.accumulate_steps = 1        # optax.MultiSteps: one update per k steps (schedules count updates)

  c.demp = ml_collections.ConfigDict()
  c.demp.penalty = 'lasso'                # lasso | l2 (kinds of demp.transforms.add_scheduled_penalty)
  c.demp.penalty_mask = transforms.NORM_SCALES   # regex over param paths
  c.demp.peak_lambda = 5e-3               # peak of λ_t
  c.demp.noise_std = transforms.AUTHORS_NOISE_STD   # peak σ_t, a standard deviation (authors' code: 5e-5;
                                          # the paper's text prints 5e-5 as a variance: 7.07e-3)
  c.demp.noise_symmetric = False
  c.demp.schedule = 'one_cycle'           # shape of λ_t and σ_t: one_cycle | constant
  c.demp.warmup = 'cosine'                # one-cycle warm-up: cosine (reference code) | linear (paper text)
  c.demp.span = 1.0                       # the one-cycle spans this fraction of the run

  c.prune = ml_collections.ConfigDict()
  c.prune.every = 1000                    # τ: steps between death checks
  c.prune.at_end = True
  c.prune.num_examples = 512              # fixed training examples of the death check
  c.prune.batch_size = 128
  c.prune.criterion = ''                  # '' = from model.activation; else a key of deadunits.CRITERIA
  c.prune.eps = 0.01
  c.prune.min_width = 1
  c.prune.multiple_of = 1
  c.prune.dynamic = True                  # False: every check only logs; only the final check (at_end) removes
  c.prune.revival_patience = 0            # >0: a group starts pruning once its live count stopped rising (demp.revival)
  c.prune.start_steps = ml_collections.ConfigDict()   # group -> step its pruning starts (overrides patience)
  c.prune.on_collapse = 'warn'            # every unit of a group died: warn | stop (raise)

  c.batch_augment = augment.default_config()   # RandAugment / mixup / cutmix in JAX (demp.augment)
  c.log_every = 50
  c.eval_every = 0                        # 0 = only at the end
  c.eval_batch_size = 256
  c.progress_bar = True

  c.checkpoint = ml_collections.ConfigDict()   # demp.checkpoint: <workdir>/checkpoints, resumed automatically
  c.checkpoint.every = 0                  # save every N steps and at the end; 0 = only on SIGTERM
  c.checkpoint.keep = 3                   # keep the last N checkpoints
  c.checkpoint.async_save = True          # write in a background thread while training goes on
  c.checkpoint.data_resume = 'skip'       # skip: exact (re-reads consumed records) | reseed: instant, not exact
  return c


def _allowed(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not one of {sorted(allowed)}.')


def _positive(key: str, value, *, strict: bool = True) -> None:
  if not isinstance(value, (int, float)) or (value <= 0 if strict else value < 0):
    raise ValueError(f'{key}={value!r} must be {"> 0" if strict else ">= 0"}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects a config that cannot work before any compute (errors name the key)."""
  _check_keys(config, base_config())
  _allowed('method', config.method, all_methods())
  _allowed('model.name', config.model.name, models.MODELS)
  _allowed('data.source', config.data.source, data_lib.SOURCES)
  _allowed('optimizer.name', config.optimizer.name, OPTIMIZERS)
  _allowed('optimizer.lr_schedule', config.optimizer.lr_schedule, schedules.SCHEDULES)
  _allowed('demp.penalty', config.demp.penalty, transforms.PENALTY_KINDS)
  _allowed('demp.schedule', config.demp.schedule, ('one_cycle', 'constant'))
  _allowed('demp.warmup', config.demp.warmup, ('cosine', 'linear'))
  _allowed('prune.on_collapse', config.prune.on_collapse, deadunits.ON_COLLAPSE)
  if config.prune.criterion:
    _allowed('prune.criterion', config.prune.criterion, deadunits.CRITERIA)
  for key in ('num_steps', 'batch_size', 'prune.every', 'prune.num_examples', 'prune.batch_size',
              'prune.min_width', 'prune.multiple_of', 'log_every', 'eval_batch_size',
              'optimizer.accumulate_steps'):
    _positive(key, _get(config, key))
  for key in ('demp.peak_lambda', 'demp.noise_std', 'optimizer.learning_rate',
              'optimizer.weight_decay', 'label_smoothing', 'eval_every', 'prune.eps',
              'optimizer.grad_clip_norm', 'prune.revival_patience'):
    _positive(key, _get(config, key), strict=False)
  for group, step in config.prune.start_steps.items():
    _positive(f'prune.start_steps.{group}', step, strict=False)
  augment.validate(config.batch_augment, normalize=config.data.normalize)
  if not 0 < config.demp.span <= 1:
    raise ValueError(f'demp.span={config.demp.span!r} must be in (0, 1].')
  if all_methods()[config.method].when is prune_steps and config.prune.every > config.num_steps:
    raise ValueError(f'prune.every={config.prune.every} (τ) is larger than num_steps={config.num_steps}: '
                     f'no death check would run during training. Use prune.every <= num_steps '
                     f'(prune.every=num_steps checks once, at the end).')
  _check_checkpoint_config(config.checkpoint)
  parallel.check_batch_size('batch_size', config.batch_size)


# Sub-configs whose keys are free (model kwargs, schedule kwargs, per-group steps, baselines).
FREE_KEYS = ('model', 'optimizer.lr_kwargs', 'prune.start_steps', 'baselines')


def _check_keys(config, base, prefix: str = '') -> None:
  """Raises on a key (at any depth) that :func:`base_config` does not have."""
  unknown = set(config.keys()) - set(base.keys()) - ({'baselines'} if not prefix else set())
  if unknown:
    raise ValueError(f'unknown config keys {sorted(prefix + k for k in unknown)}; known: '
                     f'{sorted(prefix + k for k in base.keys())}.')
  for k, v in base.items():
    if isinstance(v, ml_collections.ConfigDict) and prefix + k not in FREE_KEYS and k in config:
      _check_keys(config[k], v, f'{prefix}{k}.')


def _check_checkpoint_config(c) -> None:
  for key, low in (('every', 0), ('keep', 1)):
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f'checkpoint.{key}={v!r} must be an int >= {low}.')
  _allowed('checkpoint.data_resume', c.data_resume, ('skip', 'reseed'))


def _get(config, dotted: str):
  for k in dotted.split('.'):
    config = config[k]
  return config


# ----------------------------------------------------------------------------
# Optimizers and methods.


def _base_adam(lr, c):
  wd = [optax.add_decayed_weights(c.weight_decay)] if c.weight_decay else []
  return optax.chain(*wd, optax.adam(lr, eps=c.eps))


def _base_sgd(lr, c):
  wd = [optax.add_decayed_weights(c.weight_decay)] if c.weight_decay else []
  return optax.chain(*wd, optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov))


OPTIMIZERS: dict[str, Callable[[optax.Schedule, ml_collections.ConfigDict], optax.GradientTransformation]] = {
    'adam': _base_adam,                                        # torch-style Adam: L2 added to the gradient
    'adamw': lambda lr, c: optax.adamw(lr, eps=c.eps, weight_decay=c.weight_decay),
    'sgd': _base_sgd,                                          # torch-style SGD + momentum + L2
}


def learning_rate_schedule(config) -> optax.Schedule:
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
  c = config.optimizer
  tx = OPTIMIZERS[c.name](learning_rate_schedule(config), c)
  if c.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx


def num_updates(config) -> int:
  """Optimizer updates in the run: ``num_steps // optimizer.accumulate_steps``."""
  return max(1, config.num_steps // config.optimizer.accumulate_steps)


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


def _demp_optimizer(config, base: optax.GradientTransformation) -> optax.GradientTransformation:
  lam, std = demp_schedules(config)
  c = config.demp
  return transforms.demp_optimizer(
      base,
      penalty_strength=lam if c.peak_lambda > 0 else None,
      penalty_kind=c.penalty, penalty_mask=c.penalty_mask,
      noise_std=std if c.noise_std > 0 else None,
      noise_seed=config.seed + 1, symmetric_noise=c.noise_symmetric)


def prune_steps(config, step: int) -> bool:
  """Every τ steps, and at the last step when ``prune.at_end``."""
  c = config.prune
  return step > 0 and (step % c.every == 0 or (c.at_end and step == config.num_steps))


class Method(NamedTuple):
  """A training method.

  ``optimizer(config, base)`` wraps the base optimizer; ``hook(run, step)`` runs
  on the host after the steps where ``when(config, step)`` is true (the only
  steps, besides logging, where the trainer syncs with the device). Step 0 is
  before the first update (pruning at initialization).
  """
  optimizer: Callable[[ml_collections.ConfigDict, optax.GradientTransformation], optax.GradientTransformation]
  hook: Callable[['Run', int], None] | None = None
  when: Callable[[ml_collections.ConfigDict, int], bool] = lambda config, step: False


METHODS: dict[str, Method] = {
    'dense': Method(optimizer=lambda config, base: base),
    'demp': Method(optimizer=_demp_optimizer, hook=lambda run, step: run.prune_dead(),
                   when=prune_steps),
}


def all_methods() -> dict[str, Method]:
  """:data:`METHODS`, the analysis methods (``demp.analysis``) and the ``baselines`` package's."""
  try:
    import baselines  # pylint: disable=g-import-not-at-top
    extra = getattr(baselines, 'METHODS', {})
  except ImportError:
    extra = {}
  from demp import analysis  # pylint: disable=g-import-not-at-top  (it imports this module)
  return {**extra, **analysis.METHODS, **METHODS}


# ----------------------------------------------------------------------------
# The pure step functions.


def cross_entropy(logits_bk: jax.Array, labels_b: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """Per-example loss; labels are class ids ``[B]`` or distributions ``[B, K]`` (mixup)."""
  num_classes = logits_bk.shape[-1]
  targets_bk = labels_b if labels_b.ndim == 2 else jax.nn.one_hot(labels_b, num_classes)
  targets_bk = optax.smooth_labels(targets_bk, smoothing) if smoothing else targets_bk
  return optax.softmax_cross_entropy(logits_bk, targets_bk)


def make_train_step(model, tx: optax.GradientTransformation, label_smoothing: float = 0.0):
  """``step(state, batch) -> (state, metrics)``; state = {params, batch_stats, opt_state}."""

  def loss_fn(params, batch_stats, batch):
    logits_bk, updated = model.apply({'params': params, 'batch_stats': batch_stats},
                                     batch['image'], train=True, mutable=['batch_stats'])
    loss = cross_entropy(logits_bk, batch['label'], label_smoothing).mean()
    return loss, (updated.get('batch_stats', {}), logits_bk)

  def step(state, batch):
    (loss, (batch_stats, logits_bk)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['batch_stats'], batch)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    labels_b = batch['label'] if batch['label'].ndim == 1 else jnp.argmax(batch['label'], -1)
    accuracy = jnp.mean(jnp.argmax(logits_bk, -1) == labels_b)
    new_state = {'params': params, 'batch_stats': batch_stats, 'opt_state': opt_state}
    return new_state, {'loss': loss, 'accuracy': accuracy}

  return step


def make_eval_step(model):
  def step(variables, batch):
    logits_bk = model.apply(variables, batch['image'], train=False)
    mask_b = batch['mask']
    loss = cross_entropy(logits_bk, batch['label'])
    correct = (jnp.argmax(logits_bk, -1) == batch['label'])
    return {'loss_sum': jnp.sum(loss * mask_b), 'correct': jnp.sum(correct * mask_b),
            'count': jnp.sum(mask_b)}
  return jax.jit(step)


# ----------------------------------------------------------------------------
# The run: host-side state of one training run.


@dataclasses.dataclass
class Run:
  """Everything one run holds on the host: the model, its state, compiled steps.

  A method's hook may call :meth:`prune` / :meth:`prune_dead` or edit
  :attr:`state`; nothing else is hidden here.
  """

  config: ml_collections.ConfigDict
  model: Any
  tx: optax.GradientTransformation
  state: dict
  death_images: jax.Array
  dense_widths: dict
  dense_params: int
  step: int = 0
  compiled: Any = None
  step_flops: float = float('nan')
  events: list = dataclasses.field(default_factory=list)
  log: Callable[[dict], None] = lambda record: None
  memo: dict = dataclasses.field(default_factory=dict)    # a method's host state between hook calls
  stats: dict = dataclasses.field(default_factory=dict)   # a method's numbers, copied into the summary
  unit_ids: dict = dataclasses.field(default_factory=dict)  # group -> dense indices of the units present
  dead_set: frozenset | None = None       # (group, dense index) dead at the last check
  mesh: Any = None                        # demp.parallel mesh: batch split on 'data', state replicated

  @property
  def variables(self) -> dict:
    return {'params': self.state['params'], 'batch_stats': self.state['batch_stats']}

  def compile(self, batch) -> float:
    """Compiles the train step for the current shapes (AOT); returns seconds."""
    t0 = time.perf_counter()
    step = make_train_step(self.model, self.tx, self.config.label_smoothing)
    shardings = parallel.step_shardings(self.mesh) if self.mesh is not None else {}
    self.compiled = jax.jit(step, donate_argnums=0, **shardings).lower(self.state, batch).compile()
    self.step_flops = metrics.compiled_flops(self.compiled)
    return time.perf_counter() - t0

  def dead_units(self) -> tuple[dict, dict]:
    c = self.config.prune
    criterion = c.criterion or deadunits.criterion_for(self.model.activation)
    return deadunits.dead_unit_stats(self.model, self.variables, self.death_images,
                                     criterion=criterion, eps=c.eps, batch_size=c.batch_size)

  def prune(self, keeps: Mapping[str, np.ndarray], reason: str = '', **info) -> bool:
    """Removes the units not kept; returns whether any unit was removed."""
    parallel.assert_same_across_hosts(dict(keeps), 'keep-masks')   # every host cuts the same units
    before = dict(self.model.widths)
    removes = any(int(np.sum(k)) < before[name] for name, k in keeps.items())
    t0 = time.perf_counter()
    if removes:
      example = jax.ShapeDtypeStruct((1, *self.death_images.shape[1:]), self.death_images.dtype)
      self.model, variables, opt_state = surgery.prune(
          self.model, self.variables, self.state['opt_state'], keeps, example_input=example)
      self.state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
                    'opt_state': opt_state}
      self.compiled = None   # compiled again, for the new shapes, before the next step
      for name, keep in keeps.items():
        ids = self.unit_ids.get(name, np.arange(before[name]))
        self.unit_ids[name] = ids[np.asarray(keep, bool)]
    event = {'event': 'prune', 'step': self.step, 'reason': reason, 'removed': removes,
             'widths': dict(self.model.widths), 'surgery_s': time.perf_counter() - t0, **info}
    self.events.append(event)
    self.log(event)
    return removes

  def prune_dead(self) -> bool:
    """The DemP prune event: death check, keep-masks, surgery."""
    t0 = time.perf_counter()
    alive, activity = self.dead_units()
    check_s = time.perf_counter() - t0
    c = self.config.prune
    collapsed = deadunits.check_collapse(alive, step=self.step, on_collapse=c.on_collapse)
    keeps = surgery.keep_masks(alive, activity, min_width=c.min_width, multiple_of=c.multiple_of)
    keeps, started = revival.gate(keeps, self.events, self.step, deadunits.count(alive),
                                  patience=c.revival_patience, fixed=dict(c.start_steps))
    if not (c.dynamic or (c.at_end and self.step == self.config.num_steps)):
      keeps = {name: np.ones_like(keep) for name, keep in keeps.items()}   # check and log only
    dead = metrics.dead_set(alive, self.unit_ids, self.dense_widths)
    overlap, self.dead_set = metrics.overlap_ratio(self.dead_set, dead), dead
    return self.prune(keeps, reason='dead', check_s=check_s, live=deadunits.count(alive),
                      dead=len(dead), dead_overlap=overlap, started=started,
                      **({'collapsed': collapsed} if collapsed else {}))


# ----------------------------------------------------------------------------
# train_and_evaluate.


def evaluate(model, variables, config, split: str = 'test', mesh=None) -> dict[str, float]:
  """Accuracy and loss over ``split``; with a ``mesh`` each batch is split over its devices."""
  eval_step = make_eval_step(model)
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  split_batch = mesh is not None and config.eval_batch_size % mesh.devices.size == 0
  for batch in data_lib.eval_batches(config.data, split, config.eval_batch_size):
    if mesh is not None:   # every host holds the whole batch
      batch = parallel.shard_global(batch, mesh) if split_batch else parallel.replicate(batch, mesh)
    out = eval_step(variables, batch)
    totals = {k: totals[k] + out[k] for k in totals}
  totals = jax.device_get(totals)
  return {'accuracy': float(totals['correct'] / totals['count']),
          'loss': float(totals['loss_sum'] / totals['count'])}


def init_run(config, log=lambda record: None, *, mesh=None,
             start_batch: int = 0) -> tuple[Run, Any]:
  """Builds model, optimizer, state and data; returns the run and the train iterator.

  With a ``mesh`` (:func:`demp.parallel.data_mesh`) the state and the death-check
  examples are replicated over it, and the iterator yields global batches split
  over its ``'data'`` axis, each host reading its own shard of the data.
  ``start_batch``: the data position of a resumed run (batches already consumed).
  """
  validate_config(config)
  info = data_lib.get_info(config.data)
  model_kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  model = models.build(config.model.name, info.num_classes, **model_kwargs)
  method = all_methods()[config.method]
  revival.check_groups(config.prune.start_steps, model.widths)
  tx = accumulate(config, method.optimizer(config, base_optimizer(config)))
  init_key = jax.random.key(config.seed)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
           'opt_state': tx.init(variables['params'])}
  examples = data_lib.fixed_examples(config.data, config.prune.num_examples, seed=config.seed)
  death_images = jnp.asarray(examples['image'])
  dense_params = metrics.num_params(state['params'])
  if mesh is not None:
    state, death_images = parallel.replicate((state, death_images), mesh)
  run = Run(config=config, model=model, tx=tx, state=state, death_images=death_images,
            dense_widths=dict(model.widths), dense_params=dense_params, log=log, mesh=mesh)
  exact = config.checkpoint.data_resume == 'skip' or not start_batch
  data_seed = config.seed if exact else int(np.random.SeedSequence(
      [config.seed, start_batch]).generate_state(1)[0])   # 'reseed': a fresh stream, not a replay
  train_iter = data_lib.train_iterator(config.data, parallel.host_batch_size(config.batch_size),
                                       seed=data_seed, start_batch=start_batch if exact else 0)
  train_iter = augment.wrap_iterator(train_iter, config.batch_augment,
                                     num_classes=info.num_classes, seed=config.seed,
                                     start=start_batch)
  if mesh is not None:
    train_iter = parallel.global_batches(train_iter, mesh)
  return run, train_iter


def _check_finite(step0: int, losses: np.ndarray, *, params_finite: bool = True,
                  last_good: str = '') -> None:
  """Raises FloatingPointError at the first step whose loss, or after which the params, are NaN/Inf.

  ``last_good`` names the last checkpoint saved (all checkpoints are finite: the
  check runs before every save).
  """
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise FloatingPointError(f'loss is {losses[bad[0]]} at step {step0 + int(bad[0]) + 1}; '
                             f'stopping. {last_good}Lower the learning rate or λ, or check the data.')
  if not params_finite:
    raise FloatingPointError(f'parameters are NaN/Inf at step {step0 + len(losses)} (after steps '
                             f'{step0 + 1}..{step0 + len(losses)}, whose losses were finite); '
                             f'stopping. {last_good}Lower the learning rate or λ, or check the data.')


@jax.jit
def _all_finite(tree: PyTree) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       stop_after: int | None = None, overwrite: bool = False) -> dict[str, Any]:
  """Trains ``config.method`` in ``workdir``; returns (and writes) the run summary.

  Resumes from the latest checkpoint in ``<workdir>/checkpoints`` when there is
  one (it must have been written with the same config, else
  :class:`demp.checkpoint.CheckpointMismatchError`). Saves every
  ``checkpoint.every`` steps and at the end (when ``every > 0``), and on
  SIGTERM: then it saves, waits for the write and returns
  ``{'preempted': True, 'step': ...}`` without evaluating; run it again with the
  same workdir to continue. The batch is split over every device of every host
  (:mod:`demp.parallel`). ``stop_after`` (tests) acts like a SIGTERM after that step.

  The workdir belongs to one run (:mod:`demp.workdir`): it is locked for the
  run's life, and a workdir holding another config's results (or a finished
  run's) is refused unless ``overwrite``, which moves those results into
  ``<workdir>/previous-<timestamp>/``. Nothing in it is written until every
  check (the checkpoint's included) has passed.
  """
  validate_config(config)
  mesh = parallel.data_mesh()
  data_lib.get_info(config.data)                 # a bad data file: refused before the workdir
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.claim(workdir, config, overwrite=overwrite, primary=primary) as claim:
    mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=config.checkpoint.keep,
                              async_save=config.checkpoint.async_save)
    with checkpoint.closing(mngr), checkpoint.Preemption() as preemption:
      return _train(config, workdir, mesh, mngr, preemption, stop_after, claim)


def _train(config, workdir: str, mesh, mngr, preemption, stop_after: int | None,
           claim=None) -> dict[str, Any]:
  """The loop of :func:`train_and_evaluate` (arguments as built there)."""
  primary = jax.process_index() == 0
  meta = checkpoint.read_meta(mngr)              # None for a fresh run; raises when unreadable
  log_path = os.path.join(workdir, 'metrics.jsonl')
  if meta is not None:
    checkpoint.check_config(meta, config, checkpoint.step_dir(mngr, meta['step']))
  batches = meta['batches'] if meta else 0       # the data position: batches consumed per host
  run, train_iter = init_run(config, mesh=mesh, start_batch=batches)
  method = all_methods()[config.method]
  progress = checkpoint.restore(mngr, meta, run, mesh) if meta else {}
  checkpoint.encode_host_state(run)              # fails now, not at the first save
  # Every check passed: only from here on is anything in the workdir written or truncated.
  if claim is not None:
    claim.commit()                               # the pid into .lock, the identity into run.json
  if meta is not None and primary:
    checkpoint.truncate_log(log_path, meta['step'])   # records written after that checkpoint
    workdir_lib.announce_resume(meta['step'], checkpoint.step_dir(mngr, meta['step']))
  jsonl = metrics.JsonlWriter(log_path) if primary else _NoWriter()
  tb = _summary_writer(workdir) if primary else None
  run.log = jsonl.write
  if meta is not None:
    jsonl.write({'step': run.step, 'event': 'resume', 'widths': dict(run.model.widths),
                 **parallel.describe(mesh)})
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  lam_t, std_t = demp_schedules(config)
  lr_t = learning_rate_schedule(config)
  t_start = time.perf_counter()
  timing = {'steps': 0, 'seconds': 0.0, 't0': 0.0, 'widths': {}, 'flops': 0.0}  # current architecture
  segments = list(progress.get('segments', []))   # per architecture: widths, step FLOPs, steps, seconds
  totals = {'train_flops': progress.get('train_flops', 0.0), 'compile_s': progress.get('compile_s', 0.0)}
  wall_before = progress.get('wall_s', 0.0)
  resumed_at = list(progress.get('resumed_at', [])) + ([run.step] if meta else [])
  pending = []                            # device metrics not yet fetched
  fetched = [{'loss': np.float32(l), 'accuracy': np.float32(a)}   # fetched since the last log
             for l, a in progress.get('log_window', [])]
  last_good = {'text': f'No checkpoint was saved (checkpoint.every={config.checkpoint.every}). '}
  if meta is not None:
    last_good['text'] = (f'The last good checkpoint is step {meta["step"]}: '
                         f'{checkpoint.step_dir(mngr, meta["step"])}. ')
  bar = _progress(config) if primary else _NoBar()
  bar.update(run.step)
  postfix = {}                            # the bar's loss / acc / live units, kept across updates

  def close_segment():
    if timing['steps']:
      segments.append({k: timing[k] for k in ('widths', 'flops', 'steps', 'seconds')})

  def flush():
    """The one host sync: fetch pending metrics, time them, stop on NaN/Inf."""
    got = jax.device_get(pending)
    timing['seconds'] += time.perf_counter() - timing['t0']
    timing['steps'] += len(got)
    _check_finite(run.step - len(got), np.array([m['loss'] for m in got]),
                  params_finite=bool(_all_finite(run.state['params'])), last_good=last_good['text'])
    bar.update(len(got))
    fetched.extend(got)
    pending.clear()

  def save():
    """Checks the state is finite, then starts an asynchronous checkpoint write."""
    if pending:
      flush()
    else:
      _check_finite(run.step, np.zeros(0), params_finite=bool(_all_finite(run.state['params'])),
                    last_good=last_good['text'])
    current = [{k: timing[k] for k in ('widths', 'flops', 'steps', 'seconds')}] if timing['steps'] else []
    checkpoint.save(mngr, run, batches=batches, progress={
        'segments': segments + current, **totals, 'resumed_at': resumed_at,
        'wall_s': wall_before + time.perf_counter() - t_start,
        'log_window': [[float(m['loss']), float(m['accuracy'])] for m in fetched]})
    last_good['text'] = (f'The last good checkpoint is step {run.step}: '
                         f'{checkpoint.step_dir(mngr, run.step)}. ')
    timing['t0'] = time.perf_counter()

  if run.step == 0 and method.hook is not None and method.when(run.config, 0):
    method.hook(run, 0)                   # step 0: before the first update
  for step in range(run.step + 1, config.num_steps + 1):
    batch = next(train_iter)
    batches += 1
    if run.compiled is None:
      close_segment()
      timing.update(steps=0, seconds=0.0)
      run.state = parallel.replicate(run.state, mesh)   # after a surgery: back onto every device
      totals['compile_s'] += run.compile(batch)
      timing.update(widths=dict(run.model.widths), flops=run.step_flops, t0=time.perf_counter())
    run.state, step_metrics = run.compiled(run.state, batch)
    run.step = step
    totals['train_flops'] += run.step_flops
    pending.append(step_metrics)

    if step % config.log_every == 0 or step == config.num_steps:
      flush()
      update = step // config.optimizer.accumulate_steps   # the schedules count updates
      record = {'step': step, 'loss': float(np.mean([m['loss'] for m in fetched])),
                'accuracy': float(np.mean([m['accuracy'] for m in fetched])),
                'live_units': sum(run.model.widths.values()),
                'lambda': _value(lam_t, update), 'noise_std': _value(std_t, update),
                'learning_rate': _value(lr_t, update)}
      fetched.clear()
      jsonl.write(record)
      _tb_write(tb, step, record)
      postfix.update(loss=f'{record["loss"]:.3f}', acc=f'{record["accuracy"]:.3f}')
      _show_live(bar, postfix, run)
      timing['t0'] = time.perf_counter()

    if method.hook is not None and method.when(run.config, step):
      if pending:
        flush()
      method.hook(run, step)
      _show_live(bar, postfix, run)       # the widths after this prune (the last one included)
      timing['t0'] = time.perf_counter()

    if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
      ev = evaluate(run.model, run.variables, config, mesh=mesh)
      record = {'step': step, 'test_accuracy': ev['accuracy'], 'test_loss': ev['loss']}
      jsonl.write(record)
      _tb_write(tb, step, record)
      timing['t0'] = time.perf_counter()

    stop = preemption.reached(mngr, step) or (stop_after is not None and step >= stop_after)
    every = config.checkpoint.every
    if stop or (every and (step % every == 0 or step == config.num_steps)):
      save()
    if stop:
      bar.close()
      path = checkpoint.step_dir(mngr, step)
      jsonl.write({'step': step, 'event': 'preempted', 'checkpoint': path})
      jsonl.close()
      logging.warning('stopped after step %d; checkpoint %s. Run again with the same workdir '
                      'to continue.', step, path)
      return {'preempted': True, 'step': step, 'checkpoint': path, 'widths': dict(run.model.widths)}
  close_segment()
  bar.close()
  wall = wall_before + time.perf_counter() - t_start

  ev = evaluate(run.model, run.variables, config, mesh=mesh)
  summary = _summary(config, run, ev, segments, totals['train_flops'], wall, totals['compile_s'])
  summary.update(parallel.describe(mesh), resumed_at=resumed_at)
  jsonl.write({'step': config.num_steps, 'summary': summary})
  jsonl.close()
  if tb is not None:
    tb.close()
  if primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(metrics._to_json(summary), f, indent=2)
    print(metrics.summary_table(summary), flush=True)
  return summary


class _NoWriter:
  """The metrics writer of every host but the first."""
  def write(self, record): pass
  def close(self): pass


def _value(schedule, step: int) -> float:
  return float(schedule(step)) if callable(schedule) else float(schedule)


def _step_time(segment) -> float:
  # The first step of a segment can include host/device warm-up; the mean is fine for
  # the table, scripts/benchmark.py measures clean ratios side by side.
  return segment['seconds'] / max(1, segment['steps'])


def _summary(config, run: Run, ev, segments, train_flops, wall, compile_s) -> dict[str, Any]:
  first, final = segments[0], segments[-1]
  return {
      'method': config.method,
      'steps': config.num_steps,
      'test_accuracy': ev['accuracy'],
      'test_loss': ev['loss'],
      'neuron_sparsity': metrics.neuron_sparsity(run.model.widths, run.dense_widths),
      'weight_sparsity': metrics.weight_sparsity(run.state['params'], run.dense_params),
      'widths': dict(run.model.widths),
      'dense_widths': run.dense_widths,
      'dense_params': run.dense_params,
      'final_params': metrics.num_params(run.state['params']),
      'prune_events': len(run.events),
      'prune_events_effective': sum(e['removed'] for e in run.events),
      'events': run.events,
      'wall_time_s': wall,
      'compile_time_s': compile_s,
      'step_time_first_s': _step_time(first),
      'step_time_final_s': _step_time(final),
      'step_time_ratio': _step_time(final) / _step_time(first),
      'step_flops_first': first['flops'],
      'step_flops_final': final['flops'],
      'step_flops_ratio': final['flops'] / first['flops'],
      **flops.run_flops(model=run.model, tx=run.tx, dense_widths=run.dense_widths,
                        image_shape=run.death_images.shape[1:], batch_size=config.batch_size,
                        num_steps=config.num_steps, segments=segments, train_flops=train_flops,
                        make_step=make_train_step, label_smoothing=config.label_smoothing),
      'segments': segments,
      'method_stats': dict(run.stats),
  }


# ----------------------------------------------------------------------------
# Progress and TensorBoard (both optional and cheap).


def _show_live(bar, postfix: dict, run: Run) -> None:
  postfix['live'] = f'{sum(run.model.widths.values())}/{sum(run.dense_widths.values())}'
  bar.set_postfix(**postfix)


class _NoBar:
  def update(self, n): pass
  def set_postfix(self, **kw): pass
  def close(self): pass


def _progress(config):
  if not config.progress_bar:
    return _NoBar()
  import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=config.num_steps, desc=config.method, dynamic_ncols=True, mininterval=1.0)


def _summary_writer(workdir: str):
  try:
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
    return tensorboard.SummaryWriter(os.path.join(workdir, 'tb'))
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('TensorBoard summaries disabled: %s', e)
    return None


def _tb_write(tb, step: int, record: Mapping[str, Any]) -> None:
  if tb is None:
    return
  for k, v in record.items():
    if k != 'step' and isinstance(v, (int, float)):
      tb.scalar(k, v, step)
