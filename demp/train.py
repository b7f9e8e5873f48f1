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
from demp import deadunits, metrics, models, schedules, surgery, transforms

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

  c.demp = ml_collections.ConfigDict()
  c.demp.penalty = 'lasso'                # lasso | l2 (kinds of demp.transforms.add_scheduled_penalty)
  c.demp.penalty_mask = transforms.NORM_SCALES   # regex over param paths
  c.demp.peak_lambda = 5e-3               # peak of λ_t
  c.demp.noise_variance = 5e-5            # peak of σ_t² (a variance, not a std)
  c.demp.noise_symmetric = False
  c.demp.schedule = 'one_cycle'           # shape of λ_t and σ_t²: one_cycle | constant
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

  c.log_every = 50
  c.eval_every = 0                        # 0 = only at the end
  c.eval_batch_size = 256
  c.progress_bar = True
  return c


def _allowed(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{key}={value!r} is not one of {sorted(allowed)}.')


def _positive(key: str, value, *, strict: bool = True) -> None:
  if not isinstance(value, (int, float)) or (value <= 0 if strict else value < 0):
    raise ValueError(f'{key}={value!r} must be {"> 0" if strict else ">= 0"}.')


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects a config that cannot work before any compute (errors name the key)."""
  unknown = set(config.keys()) - set(base_config().keys()) - {'baselines'}
  if unknown:
    raise ValueError(f'unknown config keys {sorted(unknown)}; known: {sorted(base_config().keys())}.')
  _allowed('method', config.method, all_methods())
  _allowed('model.name', config.model.name, models.MODELS)
  _allowed('data.source', config.data.source, data_lib.SOURCES)
  _allowed('optimizer.name', config.optimizer.name, OPTIMIZERS)
  _allowed('optimizer.lr_schedule', config.optimizer.lr_schedule, schedules.SCHEDULES)
  _allowed('demp.penalty', config.demp.penalty, transforms.PENALTY_KINDS)
  _allowed('demp.schedule', config.demp.schedule, ('one_cycle', 'constant'))
  _allowed('demp.warmup', config.demp.warmup, ('cosine', 'linear'))
  if config.prune.criterion:
    _allowed('prune.criterion', config.prune.criterion, deadunits.CRITERIA)
  for key in ('num_steps', 'batch_size', 'prune.every', 'prune.num_examples', 'prune.batch_size',
              'prune.min_width', 'prune.multiple_of', 'log_every', 'eval_batch_size'):
    _positive(key, _get(config, key))
  for key in ('demp.peak_lambda', 'demp.noise_variance', 'optimizer.learning_rate',
              'optimizer.weight_decay', 'label_smoothing', 'eval_every', 'prune.eps',
              'optimizer.grad_clip_norm'):
    _positive(key, _get(config, key), strict=False)
  if not 0 < config.demp.span <= 1:
    raise ValueError(f'demp.span={config.demp.span!r} must be in (0, 1].')
  if config.method == 'demp' and config.prune.every > config.num_steps and not config.prune.at_end:
    raise ValueError(f'prune.every={config.prune.every} is larger than num_steps='
                     f'{config.num_steps} and prune.at_end is False: DemP would never prune.')


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
    kwargs.setdefault('total_steps', config.num_steps)
    return schedules.make_schedule(kind, peak_value=c.learning_rate, **kwargs)
  if kind == 'cosine':
    kwargs.setdefault('decay_steps', config.num_steps)
  return schedules.make_schedule(kind, init_value=c.learning_rate, **kwargs)


def base_optimizer(config) -> optax.GradientTransformation:
  c = config.optimizer
  tx = OPTIMIZERS[c.name](learning_rate_schedule(config), c)
  if c.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(c.grad_clip_norm), tx)
  return tx


def demp_schedules(config) -> tuple[optax.ScalarOrSchedule, optax.ScalarOrSchedule]:
  """λ_t and σ_t² of the config: one-cycle (or constant) shapes over the span."""
  c = config.demp
  if c.schedule == 'constant':
    return c.peak_lambda, c.noise_variance
  span = max(1, int(round(c.span * config.num_steps)))
  shape = functools.partial(schedules.one_cycle, total_steps=span, warmup=c.warmup)
  return shape(c.peak_lambda), shape(c.noise_variance)


def _demp_optimizer(config, base: optax.GradientTransformation) -> optax.GradientTransformation:
  lam, var = demp_schedules(config)
  c = config.demp
  return transforms.demp_optimizer(
      base,
      penalty_strength=lam if c.peak_lambda > 0 else None,
      penalty_kind=c.penalty, penalty_mask=c.penalty_mask,
      noise_variance=var if c.noise_variance > 0 else None,
      noise_seed=config.seed + 1, symmetric_noise=c.noise_symmetric)


def prune_steps(config, step: int) -> bool:
  """Every τ steps, and at the last step when ``prune.at_end``."""
  c = config.prune
  return step % c.every == 0 or (c.at_end and step == config.num_steps)


class Method(NamedTuple):
  """A training method.

  ``optimizer(config, base)`` wraps the base optimizer; ``hook(run, step)`` runs
  on the host after the steps where ``when(config, step)`` is true (the only
  steps, besides logging, where the trainer syncs with the device).
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
  """:data:`METHODS` plus those the ``baselines`` package registers."""
  try:
    import baselines  # pylint: disable=g-import-not-at-top
    extra = getattr(baselines, 'METHODS', {})
  except ImportError:
    extra = {}
  return {**extra, **METHODS}


# ----------------------------------------------------------------------------
# The pure step functions.


def cross_entropy(logits_bk: jax.Array, labels_b: jax.Array, smoothing: float = 0.0) -> jax.Array:
  num_classes = logits_bk.shape[-1]
  targets_bk = optax.smooth_labels(jax.nn.one_hot(labels_b, num_classes), smoothing) if smoothing \
      else jax.nn.one_hot(labels_b, num_classes)
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
    accuracy = jnp.mean(jnp.argmax(logits_bk, -1) == batch['label'])
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

  @property
  def variables(self) -> dict:
    return {'params': self.state['params'], 'batch_stats': self.state['batch_stats']}

  def compile(self, batch) -> float:
    """Compiles the train step for the current shapes (AOT); returns seconds."""
    t0 = time.perf_counter()
    step = make_train_step(self.model, self.tx, self.config.label_smoothing)
    self.compiled = jax.jit(step, donate_argnums=0).lower(self.state, batch).compile()
    self.step_flops = metrics.compiled_flops(self.compiled)
    return time.perf_counter() - t0

  def dead_units(self) -> tuple[dict, dict]:
    c = self.config.prune
    criterion = c.criterion or deadunits.criterion_for(self.model.activation)
    return deadunits.dead_unit_stats(self.model, self.variables, self.death_images,
                                     criterion=criterion, eps=c.eps, batch_size=c.batch_size)

  def prune(self, keeps: Mapping[str, np.ndarray], reason: str = '') -> bool:
    """Removes the units not kept; returns whether any unit was removed."""
    before = dict(self.model.widths)
    removes = any(int(np.sum(k)) < before[name] for name, k in keeps.items())
    t0 = time.perf_counter()
    if removes:
      self.model, variables, opt_state = surgery.prune(
          self.model, self.variables, self.state['opt_state'], keeps)
      self.state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
                    'opt_state': opt_state}
      self.compiled = None   # compiled again, for the new shapes, before the next step
    event = {'event': 'prune', 'step': self.step, 'reason': reason, 'removed': removes,
             'widths': dict(self.model.widths), 'surgery_s': time.perf_counter() - t0}
    self.events.append(event)
    self.log(event)
    return removes

  def prune_dead(self) -> bool:
    """The DemP prune event: death check, keep-masks, surgery."""
    t0 = time.perf_counter()
    alive, activity = self.dead_units()
    check_s = time.perf_counter() - t0
    c = self.config.prune
    keeps = surgery.keep_masks(alive, activity, min_width=c.min_width, multiple_of=c.multiple_of)
    removed = self.prune(keeps, reason='dead')
    self.events[-1].update(check_s=check_s, live=deadunits.count(alive))
    return removed


# ----------------------------------------------------------------------------
# train_and_evaluate.


def evaluate(model, variables, config, split: str = 'test') -> dict[str, float]:
  eval_step = make_eval_step(model)
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for batch in data_lib.eval_batches(config.data, split, config.eval_batch_size):
    out = eval_step(variables, batch)
    totals = {k: totals[k] + out[k] for k in totals}
  totals = jax.device_get(totals)
  return {'accuracy': float(totals['correct'] / totals['count']),
          'loss': float(totals['loss_sum'] / totals['count'])}


def init_run(config, log=lambda record: None) -> tuple[Run, Any]:
  """Builds model, optimizer, state and data; returns the run and the train iterator."""
  validate_config(config)
  info = data_lib.get_info(config.data)
  model_kwargs = {k: v for k, v in config.model.items() if k != 'name'}
  model = models.build(config.model.name, info.num_classes, **model_kwargs)
  method = all_methods()[config.method]
  tx = method.optimizer(config, base_optimizer(config))
  init_key = jax.random.key(config.seed)
  dummy = jnp.zeros((1,) + tuple(info.image_shape), jnp.float32)
  variables = model.init(init_key, dummy, train=False)
  state = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {}),
           'opt_state': tx.init(variables['params'])}
  examples = data_lib.fixed_examples(config.data, config.prune.num_examples, seed=config.seed)
  run = Run(config=config, model=model, tx=tx, state=state,
            death_images=jnp.asarray(examples['image']),
            dense_widths=dict(model.widths), dense_params=metrics.num_params(state['params']),
            log=log)
  train_iter = data_lib.train_iterator(config.data, config.batch_size, seed=config.seed)
  return run, train_iter


def _check_finite(step0: int, losses: np.ndarray) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise FloatingPointError(f'loss is {losses[bad[0]]} at step {step0 + int(bad[0]) + 1}; '
                             f'stopping. Lower the learning rate or λ, or check the data.')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config.method`` and returns (and writes) the run summary."""
  os.makedirs(workdir, exist_ok=True)
  jsonl = metrics.JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))
  tb = _summary_writer(workdir)
  run, train_iter = init_run(config, log=jsonl.write)
  method = all_methods()[config.method]
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))

  lam_t, var_t = demp_schedules(config)
  lr_t = learning_rate_schedule(config)
  t_start = time.perf_counter()
  timing = {'steps': 0, 'seconds': 0.0, 't0': 0.0, 'widths': {}, 'flops': 0.0}  # current architecture
  segments = []                           # per architecture: widths, step FLOPs, steps, seconds
  train_flops = compile_s = 0.0
  pending, fetched = [], []               # device metrics not yet fetched / fetched since last log
  bar = _progress(config)

  def close_segment():
    if timing['steps']:
      segments.append({k: timing[k] for k in ('widths', 'flops', 'steps', 'seconds')})

  def flush():
    """The one host sync: fetch pending metrics, time them, stop on NaN/Inf."""
    got = jax.device_get(pending)
    timing['seconds'] += time.perf_counter() - timing['t0']
    timing['steps'] += len(got)
    _check_finite(run.step - len(got), np.array([m['loss'] for m in got]))
    bar.update(len(got))
    fetched.extend(got)
    pending.clear()

  for step in range(1, config.num_steps + 1):
    batch = next(train_iter)
    if run.compiled is None:
      close_segment()
      timing.update(steps=0, seconds=0.0)
      compile_s += run.compile(batch)
      timing.update(widths=dict(run.model.widths), flops=run.step_flops, t0=time.perf_counter())
    run.state, step_metrics = run.compiled(run.state, batch)
    run.step = step
    train_flops += run.step_flops
    pending.append(step_metrics)

    if step % config.log_every == 0 or step == config.num_steps:
      flush()
      record = {'step': step, 'loss': float(np.mean([m['loss'] for m in fetched])),
                'accuracy': float(np.mean([m['accuracy'] for m in fetched])),
                'live_units': sum(run.model.widths.values()),
                'lambda': _value(lam_t, step), 'noise_variance': _value(var_t, step),
                'learning_rate': _value(lr_t, step)}
      fetched.clear()
      jsonl.write(record)
      _tb_write(tb, step, record)
      bar.set_postfix(loss=f'{record["loss"]:.3f}', acc=f'{record["accuracy"]:.3f}',
                      live=f'{record["live_units"]}/{sum(run.dense_widths.values())}')
      timing['t0'] = time.perf_counter()

    if method.hook is not None and method.when(run.config, step):
      if pending:
        flush()
      method.hook(run, step)
      timing['t0'] = time.perf_counter()

    if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
      ev = evaluate(run.model, run.variables, config)
      record = {'step': step, 'test_accuracy': ev['accuracy'], 'test_loss': ev['loss']}
      jsonl.write(record)
      _tb_write(tb, step, record)
      timing['t0'] = time.perf_counter()
  close_segment()
  bar.close()
  wall = time.perf_counter() - t_start

  ev = evaluate(run.model, run.variables, config)
  summary = _summary(config, run, ev, segments, train_flops, wall, compile_s)
  jsonl.write({'step': config.num_steps, 'summary': summary})
  jsonl.close()
  if tb is not None:
    tb.close()
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(metrics._to_json(summary), f, indent=2)
  print(metrics.summary_table(summary), flush=True)
  return summary


def _value(schedule, step: int) -> float:
  return float(schedule(step)) if callable(schedule) else float(schedule)


def _step_time(segment) -> float:
  # The first step of a segment can include host/device warm-up; the mean is fine for
  # the table, scripts/benchmark.py measures clean ratios side by side.
  return segment['seconds'] / max(1, segment['steps'])


def _summary(config, run: Run, ev, segments, train_flops, wall, compile_s) -> dict[str, Any]:
  first, final = segments[0], segments[-1]
  dense_flops = first['flops'] * config.num_steps
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
      'train_flops_rel': train_flops / dense_flops if dense_flops else float('nan'),
      'segments': segments,
  }


# ----------------------------------------------------------------------------
# Progress and TensorBoard (both optional and cheap).


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
