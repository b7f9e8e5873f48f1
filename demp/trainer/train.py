"""The one canonical trainer: ``train_and_evaluate(config, workdir)``.

The train step is a pure jitted function of ``(state, batch)``
(:mod:`demp.trainer.steps`), compiled ahead of time once per architecture. Every
``prune.every`` steps (and once at the end) the method's hook
(:mod:`demp.trainer.methods`) may run the death check and the surgery on the
:class:`demp.trainer.run.Run`: the model is rebuilt at its new widths, params / batch
stats / optimizer state are sliced, and the step is compiled again for the
smaller shapes.

The config is validated once (:func:`demp.trainer.config.validate_config`) and resolved
once (:func:`init_run`) into what the run needs: dataset metadata, model,
method, optimizer (:func:`demp.trainer.optim.make_optimizer`), train state, death-check
examples and the train iterator. Methods of plug-ins (``baselines``,
:mod:`tools.analysis`) are registered when the plug-in is imported; the entry
points (``scripts/train.py``) import the ones they offer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from demp import data as data_lib
from demp import flops, models
from demp.data import augment
from demp.trainer import feed as feed_lib
from demp.trainer import (
  accounting,
  checkpoint,
  compile_cache,
  metrics,
  optim,
  parallel,
  revival,
  steering,
  steps,
)
from demp.trainer import config as config_lib
from demp.trainer import methods as methods_lib
from demp.trainer import run as run_lib
from demp.trainer import workdir as workdir_lib

PyTree = Any
Run = run_lib.Run


# ----------------------------------------------------------------------------
# train_and_evaluate.


def evaluate(model, variables, config, split: str = 'test', mesh=None) -> dict[str, float]:
  """Accuracy and loss over ``split``; with a ``mesh`` each batch is split over its devices."""
  eval_step = steps.make_eval_step(model)
  outs = []
  split_batch = mesh is not None and config.eval_batch_size % mesh.devices.size == 0
  with compile_cache.phase('eval_step', model.widths):
    for batch in data_lib.eval_batches(config.data, split, config.eval_batch_size):
      if mesh is not None:  # every host holds the whole batch
        batch = (
          parallel.shard_global(batch, mesh) if split_batch else parallel.replicate(batch, mesh)
        )
      outs.append(eval_step(variables, batch))
  # Summed on the host: one fetch at the end, and no program compiled for the sums.
  totals = {
    k: sum(float(o[k]) for o in jax.device_get(outs)) for k in ('loss_sum', 'correct', 'count')
  }
  return {
    'accuracy': float(totals['correct'] / totals['count']),
    'loss': float(totals['loss_sum'] / totals['count']),
  }


def init_run(
  config, log=lambda record: None, *, mesh=None, start_batch: int = 0
) -> tuple[Run, Any]:
  """Validates ``config`` and builds its run: see :func:`resolve_run`."""
  config_lib.validate_config(config)
  config = steering.resolve(config)
  return resolve_run(config, log, mesh=mesh, start_batch=start_batch)


def resolve_run(
  config,
  log=lambda record: None,
  *,
  mesh=None,
  start_batch: int = 0,
  device_feed: bool = False,
  stop_after: int | None = None,
) -> tuple[Run, Any]:
  """Builds model, optimizer, state and data of a validated config; returns the run and its feed.

  The feed (:mod:`demp.trainer.feed`, also ``run.feed``) is where the steps' batches
  come from: a host iterator of batches (``next(feed)``), or, with ``device_feed``
  (the trainer's loop) and ``data.placement`` allowing it, the split on the device.
  A run driven by hand gets the host iterator unless ``data.placement='device'``.
  With a ``mesh`` (:func:`demp.trainer.parallel.data_mesh`) the state and the death-check
  examples are replicated over it, and the iterator yields global batches split
  over its ``'data'`` axis, each host reading its own shard of the data.
  ``start_batch``: the data position of a resumed run (batches already consumed).
  """
  info = data_lib.get_info(config.data)
  config_lib.check_data(config, info)
  model = models.from_config(config.model, info.num_classes)
  method = methods_lib.get(config.method)
  revival.check_groups(config.prune.start_steps, model.widths)
  tx = optim.make_optimizer(config, method)
  state = run_lib.create_train_state(model, tx, jax.random.key(config.seed), info.image_shape)
  examples = data_lib.fixed_examples(config.data, config.prune.num_examples, seed=config.seed)
  death_images = jnp.asarray(examples['image'])
  dense_params = flops.num_params(state['params'])
  if mesh is not None:
    state, death_images = parallel.replicate((state, death_images), mesh)
  run = Run(
    config=config,
    model=model,
    tx=tx,
    state=state,
    death_images=death_images,
    dense_widths=dict(model.widths),
    dense_params=dense_params,
    log=log,
    mesh=mesh,
  )

  def host_batches():
    exact = config.checkpoint.data_resume == 'skip' or not start_batch
    data_seed = (
      config.seed
      if exact
      else int(np.random.SeedSequence([config.seed, start_batch]).generate_state(1)[0])
    )  # 'reseed': a fresh stream, not a replay
    batches = data_lib.train_iterator(
      config.data,
      parallel.host_batch_size(config.batch_size),
      seed=data_seed,
      start_batch=start_batch if exact else 0,
    )
    batches = augment.wrap_iterator(
      batches,
      config.batch_augment,
      num_classes=info.num_classes,
      seed=config.seed,
      start=start_batch,
    )
    return parallel.global_batches(batches, mesh) if mesh is not None else batches

  placement = config.data.placement
  if placement == 'auto' and not device_feed:
    placement = 'host'  # a run driven by hand calls run.compiled(state, batch) itself
  run.feed = feed_lib.make(
    config,
    info,
    mesh,
    method.when if method.hook is not None else None,
    placement=placement,
    seed=config.seed,
    host_batches=host_batches,
    extra_events=(stop_after,) if stop_after else (),
  )
  return run, run.feed


def _check_finite(
  step0: int, losses: np.ndarray, *, params_finite: bool = True, last_good: str = ''
) -> None:
  """Raises FloatingPointError at the first step whose loss, or after which the params, are NaN/Inf.

  ``last_good`` names the last checkpoint saved (all checkpoints are finite: the
  check runs before every save).
  """
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise FloatingPointError(
      f'loss is {losses[bad[0]]} at step {step0 + int(bad[0]) + 1}; '
      f'stopping. {last_good}Lower the learning rate or λ, or check the data.'
    )
  if not params_finite:
    raise FloatingPointError(
      f'parameters are NaN/Inf at step {step0 + len(losses)} (after steps '
      f'{step0 + 1}..{step0 + len(losses)}, whose losses were finite); '
      f'stopping. {last_good}Lower the learning rate or λ, or check the data.'
    )


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  stop_after: int | None = None,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Trains ``config.method`` in ``workdir``; returns (and writes) the run summary.

  Resumes from the latest checkpoint in ``<workdir>/checkpoints`` when there is
  one (it must have been written with the same config, else
  :class:`demp.trainer.checkpoint.CheckpointMismatchError`). Saves every
  ``checkpoint.every`` steps and at the end (when ``every > 0``), and on
  SIGTERM: then it saves, waits for the write and returns
  ``{'preempted': True, 'step': ...}`` without evaluating; run it again with the
  same workdir to continue. The batch is split over every device of every host
  (:mod:`demp.trainer.parallel`). ``stop_after`` (tests) acts like a SIGTERM after that step.

  The workdir belongs to one run (:mod:`demp.trainer.workdir`): it is locked for the
  run's life, and a workdir holding another config's results (or a finished
  run's) is refused unless ``overwrite``, which moves those results into
  ``<workdir>/previous-<timestamp>/``. Nothing in it is written until every
  check (the checkpoint's included) has passed.
  """
  config_lib.validate_config(config)  # the one validation of the run
  config = steering.resolve(config)  # a target brings its recipe's death-check interval
  mesh = parallel.data_mesh()
  data_lib.get_info(config.data)  # a bad data file: refused before the workdir
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  with workdir_lib.claim(workdir, config, overwrite=overwrite, primary=primary) as claim:
    mngr = checkpoint.manager(
      os.path.join(workdir, 'checkpoints'),
      keep=config.checkpoint.keep,
      async_save=config.checkpoint.async_save,
    )
    with (
      checkpoint.closing(mngr),
      checkpoint.Preemption() as preemption,
      compile_cache.session(),  # the JAX cache settings, restored at the end
    ):
      return _train(config, workdir, mesh, mngr, preemption, stop_after, claim)


@dataclasses.dataclass
class Loop:
  """The loop's host-side bookkeeping, one object instead of closures over shared dicts.

  ``segment`` is the current architecture's record (widths, step FLOPs, steps and
  seconds timed so far, ``t0`` the start of the current timing window);
  ``segments`` the finished ones. ``pending`` holds device metrics not yet
  fetched, ``fetched`` those fetched since the last log record. ``sync_cost``
  is the cost record of a synchronous prune until its step has compiled.
  """

  run: Run
  mngr: Any
  jsonl: Any
  bar: Any
  batches: int  # the data position: batches consumed per host
  segments: list
  train_flops: float
  compile_s: float
  wall_before: float
  resumed_at: list
  fetched: list
  last_good: str
  t_start: float = dataclasses.field(default_factory=time.perf_counter)
  segment: dict = dataclasses.field(
    default_factory=lambda: {'widths': {}, 'flops': 0.0, 'steps': 0, 'seconds': 0.0, 't0': 0.0}
  )
  pending: list = dataclasses.field(default_factory=list)
  sync_cost: dict | None = None
  postfix: dict = dataclasses.field(default_factory=dict)  # the bar's loss / acc / live units

  def restart_clock(self) -> None:
    """Host work (logging, evaluation, a save) is not train-step time."""
    self.segment['t0'] = time.perf_counter()

  def new_segment(self) -> None:
    """Closes the current architecture's record and opens one at the run's widths now."""
    if self.segment['steps']:
      self.segments.append(_segment_record(self.segment))
    self.segment = {
      'widths': dict(self.run.model.widths),
      'flops': self.run.step_flops,
      'steps': 0,
      'seconds': 0.0,
      't0': time.perf_counter(),
    }

  def flush(self) -> None:
    """The one host sync: fetch pending metrics, time them, stop on NaN/Inf."""
    got = _per_step(jax.device_get(self.pending))
    self.segment['seconds'] += time.perf_counter() - self.segment['t0']
    self.segment['steps'] += len(got)
    _check_finite(
      self.run.step - len(got),
      np.array([m['loss'] for m in got]),
      params_finite=self.run.params_finite(),
      last_good=self.last_good,
    )
    self.bar.update(len(got))
    self.fetched.extend(got)
    self.pending.clear()
    if self.segment['steps']:
      self.run.step_s = self.segment['seconds'] / self.segment['steps']

  def close_cost(self, cost: dict, **times) -> None:
    """Completes a prune event's cost record: its stall, logged and kept for the summary."""
    run = self.run
    cost.update(times)
    cost['stall_s'] = cost['decision_s'] + times.get('switch_s', times.get('compile_s', 0.0))
    cost['step_s'] = run.step_s  # the mean train step of the segment before
    cost['stall_steps'] = cost['stall_s'] / run.step_s if run.step_s > 0 else float('nan')
    run.costs.append(cost)
    self.jsonl.write(cost)

  def save(self) -> None:
    """Checks the state is finite, then starts an asynchronous checkpoint write."""
    run = self.run
    if self.pending:
      self.flush()
    else:
      _check_finite(
        run.step,
        np.zeros(0),
        params_finite=run.params_finite(),
        last_good=self.last_good,
      )
    current = [_segment_record(self.segment)] if self.segment['steps'] else []
    checkpoint.save(
      self.mngr,
      run,
      batches=self.batches,
      progress={
        'segments': self.segments + current,
        'train_flops': self.train_flops,
        'compile_s': self.compile_s,
        'resumed_at': self.resumed_at,
        'wall_s': self.wall_s(),
        'log_window': [[float(m['loss']), float(m['accuracy'])] for m in self.fetched],
      },
    )
    self.last_good = (
      f'The last good checkpoint is step {run.step}: {checkpoint.step_dir(self.mngr, run.step)}. '
    )
    self.restart_clock()

  def hook(self, method, step: int) -> None:
    """The method's hook, timed: a prune event's decision, and its cost record."""
    run = self.run
    n_events = len(run.events)
    t0 = time.perf_counter()
    method.hook(run, step)
    decision_s = time.perf_counter() - t0
    new = run.events[n_events:]
    if not new:
      return
    cost = {
      'event': 'prune_cost',
      'step': step,
      'removed': any(e['removed'] for e in new),
      'decision_s': decision_s,
      'check_s': sum(e.get('check_s', 0.0) for e in new),
      'surgery_s': sum(e.get('surgery_s', 0.0) for e in new),
      'background': False,  # the new step compiled while training went on
    }
    if run.pending is not None:  # deferred: completed at the switch
      run.pending['cost'] = cost
    elif run.compiled is None:  # synchronous: completed by the next compile
      self.sync_cost = cost
    else:
      self.close_cost(cost)

  def compile_step(self, inputs: tuple) -> None:
    """After a surgery (or at the start): the step for the current shapes, compiled now."""
    run = self.run
    if self.segment['steps']:
      self.segments.append(_segment_record(self.segment))
    self.segment.update(steps=0, seconds=0.0)
    run.state = parallel.replicate(run.state, run.mesh)  # after a surgery: back onto every device
    compile_s = run.compile(inputs)
    run.compile_ahead()  # in the background: this architecture's check, silencing, ...
    self.compile_s += compile_s
    if self.sync_cost is not None:
      self.close_cost(self.sync_cost, compile_s=compile_s, background=False)
      self.sync_cost = None
    self.segment.update(widths=dict(run.model.widths), flops=run.step_flops)
    self.restart_clock()

  def switch(self) -> None:
    """A deferred prune's switch to the step compiled in the background."""
    run = self.run
    self.flush()  # the old shapes' last step is done
    cost, switch_step = _pending_cost(run), run.pending['switch_step']
    times = run.switch()
    self.compile_s += times['compile_s']
    self.new_segment()
    self.close_cost(cost, switch_step=switch_step, background=True, **times)

  def log_record(self, step: int, lr_t, lam_t, std_t, demp_schedules: bool) -> dict[str, Any]:
    """The metrics record of ``step``: means over the steps fetched since the last one."""
    run = self.run
    self.flush()
    update = step // run.config.optimizer.accumulate_steps  # the schedules count updates
    record = {
      'step': step,
      'loss': float(np.mean([m['loss'] for m in self.fetched])),
      'accuracy': float(np.mean([m['accuracy'] for m in self.fetched])),
      'live_units': sum(run.model.widths.values()),
      'learning_rate': _value(lr_t, update),
    }
    if demp_schedules:  # only where the optimizer applies them
      record.update({'lambda': _value(lam_t, update), 'noise_std': _value(std_t, update)})
    record.update(steering.log_fields(run, record, update))
    self.fetched.clear()
    self.postfix.update(
      loss=f'{record["loss"]:.3f}', acc=f'{record["accuracy"]:.3f}', **steering.postfix(record)
    )
    return record

  def wall_s(self) -> float:
    return self.wall_before + time.perf_counter() - self.t_start


def _per_step(fetched: list) -> list[dict]:
  """One metrics dict per step: a dispatch of k steps returns them stacked ``[k]``."""
  rows = []
  for m in fetched:
    if np.ndim(m['loss']) == 0:
      rows.append(m)
    else:
      rows.extend({k: v[i] for k, v in m.items()} for i in range(len(m['loss'])))
  return rows


def _segment_record(segment: Mapping[str, Any]) -> dict[str, Any]:
  return {k: segment[k] for k in ('widths', 'flops', 'steps', 'seconds')}


def _train(
  config, workdir: str, mesh, mngr, preemption, stop_after: int | None, claim=None
) -> dict[str, Any]:
  """The loop of :func:`train_and_evaluate` (arguments as built there)."""
  primary = jax.process_index() == 0
  meta = checkpoint.read_meta(mngr)  # None for a fresh run; raises when unreadable
  log_path = os.path.join(workdir, 'metrics.jsonl')
  if meta is not None:
    checkpoint.check_config(meta, config, checkpoint.step_dir(mngr, meta['step']))
  run, feed = resolve_run(
    config,
    mesh=mesh,
    start_batch=meta['batches'] if meta else 0,
    device_feed=True,
    stop_after=stop_after,
  )
  method = methods_lib.get(config.method)
  progress = checkpoint.restore(mngr, meta, run, mesh) if meta else {}
  checkpoint.encode_host_state(run)  # fails now, not at the first save
  # Every check passed: only from here on is anything in the workdir written or truncated.
  if claim is not None:
    claim.commit()  # the pid into .lock, the identity into run.json
  compile_cache.start(config.compilation_cache, workdir)  # the persistent compilation cache
  if meta is not None and primary:
    checkpoint.truncate_log(log_path, meta['step'])  # records written after that checkpoint
    workdir_lib.announce_resume(meta['step'], checkpoint.step_dir(mngr, meta['step']))
  jsonl = metrics.JsonlWriter(log_path) if primary else _NoWriter()
  tb = _summary_writer(workdir) if primary else None
  run.log = jsonl.write
  if meta is not None:
    jsonl.write(
      {
        'step': run.step,
        'event': 'resume',
        'widths': dict(run.model.widths),
        **parallel.describe(mesh),
      }
    )
  if primary:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))

  lam_t, std_t = optim.demp_schedules(config)
  lr_t = optim.learning_rate_schedule(config)
  loop = Loop(
    run=run,
    mngr=mngr,
    jsonl=jsonl,
    bar=_progress(config) if primary else _NoBar(),
    batches=meta['batches'] if meta else 0,
    segments=list(progress.get('segments', [])),  # per architecture: widths, FLOPs, steps, s
    train_flops=progress.get('train_flops', 0.0),
    compile_s=progress.get('compile_s', 0.0),
    wall_before=progress.get('wall_s', 0.0),
    resumed_at=list(progress.get('resumed_at', [])) + ([run.step] if meta else []),
    fetched=[  # fetched since the last log record, kept across a resume
      {'loss': np.float32(l), 'accuracy': np.float32(a)} for l, a in progress.get('log_window', [])
    ],
    last_good=(
      f'The last good checkpoint is step {meta["step"]}: '
      f'{checkpoint.step_dir(mngr, meta["step"])}. '
      if meta is not None
      else f'No checkpoint was saved (checkpoint.every={config.checkpoint.every}). '
    ),
  )
  loop.bar.update(run.step)

  if run.step == 0 and method.hook is not None and method.when(run.config, 0):
    loop.hook(method, 0)  # step 0: before the first update
  while run.step < config.num_steps:  # feed.k steps per dispatch: 1 from the host
    inputs = feed.inputs(run.step)
    if run.compiled is None:
      loop.compile_step(inputs)
    run.state, step_metrics = run.compiled(run.state, *inputs)
    run.step = step = run.step + feed.k
    loop.batches += feed.k
    loop.train_flops += run.step_flops * feed.k
    loop.pending.append(step_metrics)

    if run.switch_due():
      loop.switch()

    if step % config.log_every == 0 or step == config.num_steps:
      record = loop.log_record(step, lr_t, lam_t, std_t, method.demp_schedules)
      jsonl.write(record)
      _tb_write(tb, step, record)
      _show_live(loop.bar, loop.postfix, run)
      loop.restart_clock()

    if method.hook is not None and method.when(run.config, step):
      if loop.pending:
        loop.flush()
      loop.hook(method, step)
      _show_live(loop.bar, loop.postfix, run)  # the widths after this prune (the last one included)
      loop.restart_clock()

    if config.eval_every and step % config.eval_every == 0 and step != config.num_steps:
      ev = evaluate(run.model, run.variables, config, mesh=mesh)
      record = {'step': step, 'test_accuracy': ev['accuracy'], 'test_loss': ev['loss']}
      jsonl.write(record)
      _tb_write(tb, step, record)
      loop.restart_clock()

    stop = preemption.reached(mngr, step) or (stop_after is not None and step >= stop_after)
    every = config.checkpoint.every
    if stop or (every and (step % every == 0 or step == config.num_steps)):
      loop.save()
    if stop:
      loop.bar.close()
      path = checkpoint.step_dir(mngr, step)
      # Relative to the workdir: metrics.jsonl names no directory of the machine.
      jsonl.write(
        {'step': step, 'event': 'preempted', 'checkpoint': os.path.relpath(path, workdir)}
      )
      jsonl.close()
      logging.warning(
        'stopped after step %d; checkpoint %s. Run again with the same workdir to continue.',
        step,
        path,
      )
      run.close()
      return {'preempted': True, 'step': step, 'checkpoint': path, 'widths': dict(run.model.widths)}
  if run.pending is not None:  # cannot happen (a switch lands before the last step); be safe
    loop.close_cost(_pending_cost(run), background=True, **run.switch())
  if loop.sync_cost is not None:  # the last event's removal, never compiled for
    loop.close_cost(loop.sync_cost, compile_s=0.0, background=False)
  if loop.segment['steps']:
    loop.segments.append(_segment_record(loop.segment))
  run.close()  # no compile outlives the run (nor its cache directory)
  loop.bar.close()
  wall = loop.wall_s()

  ev = evaluate(run.model, run.variables, config, mesh=mesh)
  with compile_cache.phase('flops'):  # XLA's FLOP counts of the summary: no architecture
    summary = accounting.run_summary(
      config, run, ev, loop.segments, loop.train_flops, wall, loop.compile_s
    )
  summary.update(parallel.describe(mesh), resumed_at=loop.resumed_at)
  summary.update(data_placement='device' if feed.on_device else 'host', steps_per_dispatch=feed.k)
  summary.update(compile_cache.summary())  # this process's cache hits / misses / compiles
  summary.update(compile_cache.attribution())  # ... by function and by architecture
  jsonl.write({'step': config.num_steps, 'summary': summary})
  jsonl.close()
  if tb is not None:
    tb.close()
  if primary and config.checkpoint.final:  # the run's product, whatever checkpoint.every says
    checkpoint.save_final(workdir, run)
  if primary:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(metrics._to_json(summary), f, indent=2)
    print(metrics.summary_table(summary), flush=True)
  return summary


class _NoWriter:
  """The metrics writer of every host but the first."""

  def write(self, record):
    pass

  def close(self):
    pass


def _value(schedule, step: int) -> float:
  return float(schedule(step)) if callable(schedule) else float(schedule)


def _pending_cost(run) -> dict[str, Any]:
  """The cost record of the pending deferred prune (a bare one when decided before a resume)."""
  return run.pending.get('cost') or {
    'event': 'prune_cost',
    'step': run.pending['switch_step'],
    'removed': True,
    'decision_s': 0.0,
  }


# ----------------------------------------------------------------------------
# Progress and TensorBoard (both optional and cheap).


def _show_live(bar, postfix: dict, run) -> None:
  postfix['live'] = f'{sum(run.model.widths.values())}/{sum(run.dense_widths.values())}'
  bar.set_postfix(**postfix)


class _NoBar:
  def update(self, n):
    pass

  def set_postfix(self, **kw):
    pass

  def close(self):
    pass


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
