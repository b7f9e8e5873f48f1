"""Speed of pruned models, measured side by side: the train step and the prune event.

* :func:`interleaved_times` and :func:`median_times`: the one timing helper of
  every benchmark here, in ``baselines/compare.py``, ``scripts/`` and
  ``experiments/`` (warm-up, then interleaved rounds, then the median), and
  :func:`run_step_fn`, a :class:`demp.trainer.run.Run`'s compiled step as a callable;
* :func:`step_times`: the jitted train step of the dense model and of copies
  pruned by the real surgery (random units removed from every unit group at
  given neuron sparsities), timed in interleaved rounds so that a shared
  machine's load drifts over every variant alike, next to the FLOPs of the
  compiled step from XLA's cost analysis.
* :func:`prune_event_time`: one prune event as the trainer runs it -- death
  check on the fixed examples (compiled for the current architecture, then
  run), surgery, and compiling the train step for the new shapes -- to set
  against ``τ`` train steps.

``compute_dtype='bfloat16'`` times the step in mixed precision through
:class:`ComputeDtype` (the models have no dtype argument): params and images
are cast to bf16 inside the loss; master params, optimizer state, BN statistics
and the loss stay float32.

Parameter values do not change the timings, so the models start from
:func:`numpy_init` (random kernels drawn by numpy, default BN), which needs no
compiled initializer: on a busy 2-core CPU compiling Flax's initializers for a
ResNet-50 takes minutes.

Example::

    rows = step_times('resnet18', num_classes=10, image_hw=32, batch_size=128,
                      sparsities=(0.25, 0.5, 0.75))
    print(format_step_table(rows))
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from demp import deadunits, models, surgery
from demp import flops as flops_lib
from demp.trainer import config as config_lib
from demp.trainer import methods, optim, steps
from demp.trainer import run as run_lib

PyTree = Any


def numpy_init(model, x_bhwc: jax.Array, seed: int = 0) -> dict[str, PyTree]:
  """Variables of ``model`` without compiling an initializer (shapes by ``eval_shape``).

  Kernels ~ N(0, 1/fan_in), biases 0, BN scale 1 / offset 0 / mean 0 / var 1.
  """
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x_bhwc, train=False))

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape), s.dtype)
    return jnp.ones(s.shape, s.dtype) if name in ('scale', 'var') else jnp.zeros(s.shape, s.dtype)

  return jax.tree.map_with_path(fill, shapes)


def random_keeps(model, sparsity: float, seed: int = 0) -> dict[str, np.ndarray]:
  """Keep-masks removing ``round(sparsity * width)`` random units of every unit group."""
  if not 0 <= sparsity < 1:
    raise ValueError(f'sparsity={sparsity!r} must be in [0, 1).')
  rng = np.random.default_rng(seed)
  keeps = {}
  for g in model.unit_groups():
    width = model.widths[g.name]
    n_keep = max(1, width - int(round(sparsity * width)))
    keep = np.zeros(width, bool)
    keep[rng.choice(width, n_keep, replace=False)] = True
    keeps[g.name] = keep
  return keeps


def interleaved_times(
  fns: Mapping[str, Callable[[], Any]],
  *,
  rounds: int = 3,
  steps_per_round: int = 2,
  warmup: int = 1,
  clock: Callable[[], float] | None = None,
) -> dict[str, list[float]]:
  """Seconds per call of each function, per round, measured in interleaved rounds.

  Every function is called ``warmup`` times first (compilation, caches); then
  each of ``rounds`` rounds calls every function ``steps_per_round`` times in
  turn, so that a shared machine's load drifts over every variant alike. A
  function returns what to wait for (``jax.block_until_ready``). ``clock``:
  wall time (``time.perf_counter``) by default; ``time.process_time`` (the CPU seconds of every
  thread of this process) keeps the ratios of CPU-bound steps steady on a CPU
  shared with other processes, whose load then does not count.

  Returns:
    name -> per-round mean seconds per call (``rounds`` values).
  """
  clock = clock or time.perf_counter
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = clock()
      out = None
      for _ in range(steps_per_round):
        out = fn()
      jax.block_until_ready(out)
      times[name].append((clock() - t0) / steps_per_round)
  return times


def median_times(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
  """The median of each variant's round times (:func:`interleaved_times`)."""
  return {name: float(statistics.median(t)) for name, t in times.items()}


def run_step_fn(run, batch) -> Callable[[], Any]:
  """``run``'s train step on ``batch`` (compiled now if needed) as a callable advancing ``run.state``."""
  if run.compiled is None:
    run.compile(batch)

  def step():
    run.state, _ = run.compiled(run.state, batch)
    return run.state

  return step


def method_optimizer(
  config: ml_collections.ConfigDict | None = None, *, noise: bool = True
) -> optax.GradientTransformation:
  """The DemP optimizer of ``config`` (default: Adam + Lasso(γ) penalty + live noise).

  ``noise=False`` drops the live-noise transform (one normal draw per parameter
  per step: the only part of the step whose cost is not in the model's FLOPs).
  """
  if config is None:
    config = config_lib.base_config()
    config.method = 'demp'
  if not noise:
    config = config.copy_and_resolve_references()
    config.demp.noise_std = 0.0
  return methods.get('demp').optimizer(config, optim.base_optimizer(config))


@dataclasses.dataclass(frozen=True)
class ComputeDtype:
  """``model`` applied in ``dtype``: mixed precision for a model without a dtype argument.

  ``apply`` casts the ``params`` collection and the input to ``dtype`` (so every
  conv, matmul and BN output runs in it; Flax's BN still reduces its statistics
  in float32), and casts every floating output (logits, updated batch stats)
  back to float32. Gradients reach the float32 params through the casts, so
  the optimizer state and BN statistics stay float32. Only ``apply`` is
  provided: what :func:`demp.trainer.steps.make_train_step` calls.
  """

  model: Any
  dtype: Any

  def apply(self, variables, x, **kwargs):
    cast = lambda tree, dtype: jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )
    variables = {**variables, 'params': cast(variables['params'], self.dtype)}
    return cast(self.model.apply(variables, x.astype(self.dtype), **kwargs), jnp.float32)


COMPUTE_DTYPES = {'float32': None, 'bfloat16': jnp.bfloat16}


def with_compute_dtype(model, compute_dtype: str):
  """``model`` itself for float32, else :class:`ComputeDtype` (a key of :data:`COMPUTE_DTYPES`)."""
  if compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(f'compute_dtype={compute_dtype!r} is not one of {sorted(COMPUTE_DTYPES)}.')
  dtype = COMPUTE_DTYPES[compute_dtype]
  return model if dtype is None else ComputeDtype(model, dtype)


def _state(model, tx, x_bhwc, seed):
  variables = numpy_init(model, x_bhwc, seed)
  return run_lib.train_state(variables, tx.init(variables['params']))


def _batch(batch_size: int, image_hw: int, num_classes: int, seed: int = 0) -> dict[str, jax.Array]:
  rng = np.random.default_rng(seed)
  return {
    'image': jnp.asarray(rng.normal(size=(batch_size, image_hw, image_hw, 3)), jnp.float32),
    'label': jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
  }


def _compile(model, tx, state, batch):
  t0 = time.perf_counter()
  step = jax.jit(steps.make_train_step(model, tx), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  return compiled, time.perf_counter() - t0


def step_times(
  model_name: str,
  *,
  num_classes: int = 10,
  image_hw: int = 32,
  batch_size: int = 128,
  sparsities: Sequence[float] = (0.25, 0.5, 0.75),
  rounds: int = 3,
  steps_per_round: int = 2,
  seed: int = 0,
  model_kwargs: Mapping[str, Any] | None = None,
  config: ml_collections.ConfigDict | None = None,
  noise: bool = True,
  compute_dtype: str = 'float32',
) -> list[dict[str, Any]]:
  """Train-step seconds and FLOPs of the dense model and of randomly pruned copies.

  ``compute_dtype``: 'float32' or 'bfloat16' (:func:`with_compute_dtype`).
  Every variant is compiled and warmed up first; then ``rounds`` rounds each run
  ``steps_per_round`` steps of every variant in turn. A variant's time is the
  median over rounds of its per-step mean; ratios are to the dense model.
  """
  tx = method_optimizer(config, noise=noise)
  dense = models.build(model_name, num_classes, **dict(model_kwargs or {}))
  batch = _batch(batch_size, image_hw, num_classes, seed)
  dense_state = _state(dense, tx, batch['image'][:1], seed)
  pruned = [(0.0, dense, dense_state)]
  for s in sparsities:  # all pruned before any step runs: the steps donate their state
    model, variables, opt_state = surgery.prune(
      dense,
      {k: dense_state[k] for k in ('params', 'batch_stats')},
      dense_state['opt_state'],
      random_keeps(dense, s, seed),
    )
    pruned.append((s, model, run_lib.train_state(variables, opt_state)))
  variants = []
  for s, model, state in pruned:
    state = jax.tree.map(jnp.copy, state)  # the surgery shares untouched leaves; steps donate
    compiled, compile_s = _compile(with_compute_dtype(model, compute_dtype), tx, state, batch)
    variants.append(
      {
        'sparsity': s,
        'model': model,
        'state': state,
        'compiled': compiled,
        'compile_s': compile_s,
        'flops': flops_lib.compiled_flops(compiled),
        'params': flops_lib.num_params(state['params']),
      }
    )

  def step_fn(v):
    def step():
      v['state'], out = v['compiled'](v['state'], batch)
      return out

    return step

  times = interleaved_times(
    {i: step_fn(v) for i, v in enumerate(variants)}, rounds=rounds, steps_per_round=steps_per_round
  )
  for i, v in enumerate(variants):
    v['times'] = times[i]
  base = variants[0]
  base_t, base_f = float(np.median(base['times'])), base['flops']
  rows = []
  for v in variants:
    t = float(np.median(v['times']))
    rows.append(
      {
        'model': model_name,
        'dtype': compute_dtype,
        'sparsity': v['sparsity'],
        'neuron_sparsity': flops_lib.neuron_sparsity(v['model'].widths, dense.widths),
        'params': v['params'],
        'param_ratio': v['params'] / base['params'],
        'step_s': t,
        'time_ratio': t / base_t,
        'flops': v['flops'],
        'flop_ratio': v['flops'] / base_f,
        'compile_s': v['compile_s'],
        'round_times_s': v['times'],
      }
    )
  return rows


def prune_event_time(
  model_name: str,
  *,
  num_classes: int = 10,
  image_hw: int = 32,
  batch_size: int = 128,
  sparsity: float = 0.25,
  num_examples: int = 512,
  check_batch_size: int = 128,
  seed: int = 0,
  model_kwargs: Mapping[str, Any] | None = None,
  config: ml_collections.ConfigDict | None = None,
  noise: bool = True,
) -> dict[str, float]:
  """Seconds of one prune event that removes ``sparsity`` of the units, by phase.

  ``check_compile_s``: the death check's first call for this architecture
  (compile + run; every architecture gets one), ``check_s``: a second call (run
  only), ``surgery_s``: :func:`demp.surgery.prune` (params, batch stats and
  optimizer state), ``recompile_s``: compiling the train step at the new widths,
  ``step_s``: one step of the pruned model (for the τ-steps comparison).
  """
  tx = method_optimizer(config, noise=noise)
  model = models.build(model_name, num_classes, **dict(model_kwargs or {}))
  batch = _batch(batch_size, image_hw, num_classes, seed)
  state = _state(model, tx, batch['image'][:1], seed)
  images = _batch(num_examples, image_hw, num_classes, seed + 1)['image']
  variables = {k: state[k] for k in ('params', 'batch_stats')}
  criterion = deadunits.criterion_for(model.activation)

  def check():
    t0 = time.perf_counter()
    deadunits.dead_unit_stats(
      model, variables, images, criterion=criterion, batch_size=check_batch_size
    )
    return time.perf_counter() - t0

  check_compile_s, check_s = check(), check()
  t0 = time.perf_counter()
  new_model, new_vars, new_opt = surgery.prune(
    model, variables, state['opt_state'], random_keeps(model, sparsity, seed)
  )
  jax.block_until_ready((new_vars, new_opt))
  surgery_s = time.perf_counter() - t0
  new_state = run_lib.train_state(new_vars, new_opt)
  compiled, recompile_s = _compile(new_model, tx, new_state, batch)
  new_state, _ = compiled(new_state, batch)
  jax.block_until_ready(new_state)
  t0 = time.perf_counter()
  new_state, out = compiled(new_state, batch)
  jax.block_until_ready(out)
  step_s = time.perf_counter() - t0
  return {
    'model': model_name,
    'sparsity': sparsity,
    'num_examples': num_examples,
    'check_compile_s': check_compile_s,
    'check_s': check_s,
    'surgery_s': surgery_s,
    'recompile_s': recompile_s,
    'event_s': check_compile_s + surgery_s + recompile_s,
    'step_s': step_s,
  }


def format_step_table(rows: Sequence[Mapping[str, Any]]) -> str:
  lines = [
    '| model | neuron sparsity | params | step [s] | time ratio | FLOP ratio | compile [s] |',
    '|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f"| {r['model']} | {r['neuron_sparsity']:.2f} | {r['params']:,} | "
      f"{r['step_s']:.3f} | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | "
      f"{r['compile_s']:.1f} |"
    )
  return '\n'.join(lines)


def format_event_table(rows: Sequence[Mapping[str, Any]], taus: Mapping[str, int]) -> str:
  lines = [
    '| model | death check (compile+run) [s] | death check (run) [s] | surgery [s] | '
    'recompile [s] | event [s] | τ | τ steps [s] | event / τ steps |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    tau = taus[r['model']]
    tau_s = tau * r['step_s']
    lines.append(
      f"| {r['model']} | {r['check_compile_s']:.2f} | {r['check_s']:.2f} | "
      f"{r['surgery_s']:.2f} | {r['recompile_s']:.2f} | {r['event_s']:.2f} | {tau} | "
      f"{tau_s:.0f} | {r['event_s'] / tau_s:.4f} |"
    )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Whole runs: what prune events cost a DemP run, synchronous vs deferred, vs dense.


def event_overhead_runs(
  config: ml_collections.ConfigDict,
  workdir: str,
  switch_after: Sequence[float] = (0.0, 0.1),
  *,
  dense: bool = True,
  echo=print,
) -> list[dict[str, Any]]:
  """Trains ``config`` (a DemP config) once per ``prune.switch_after``, and dense; one row each.

  The runs go one after the other in this process, dense first (so it pays the
  process's warm-up); each row has the run's wall time, its prune events' total
  stall and share of the wall time (``prune_overhead_share``), the largest
  stall in seconds and in train steps, the background compile time, and the
  wall time relative to the dense run. Runs found finished in ``workdir`` are
  read, not trained again.
  """
  from demp.trainer import train  # pylint: disable=g-import-not-at-top

  variants = [('dense', None)] if dense else []
  variants += [(f'demp switch_after={s:g}', s) for s in switch_after]
  rows = []
  for name, after in variants:
    c = ml_collections.ConfigDict(config.to_dict())
    if after is None:
      c.method = 'dense'
    else:
      c.prune.switch_after = float(after)
    run_dir = f'{workdir}/{name.replace(" ", "_").replace("=", "-")}'
    summary_path = f'{run_dir}/summary.json'
    try:
      with open(summary_path) as f:
        summary = json.load(f)
      echo(f'{name}: read {summary_path}')
    except FileNotFoundError:
      echo(f'{name}: training in {run_dir}')
      summary = train.train_and_evaluate(c, run_dir)
    rows.append({'variant': name, **_overhead_row(summary)})
  dense_wall = rows[0]['wall_s'] if dense else float('nan')
  for row in rows:
    row['wall_vs_dense'] = row['wall_s'] / dense_wall
  return rows


def _overhead_row(summary: Mapping[str, Any]) -> dict[str, Any]:
  costs = summary.get('prune_costs', [])
  return {
    'wall_s': summary['wall_time_s'],
    'test_accuracy': summary['test_accuracy'],
    'weight_sparsity': summary['weight_sparsity'],
    'events': len(costs),
    'events_removing': sum(bool(c['removed']) for c in costs),
    'overhead_s': summary.get('prune_overhead_s', 0.0),
    'overhead_share': summary.get('prune_overhead_share', 0.0),
    'stall_max_s': summary.get('prune_stall_max_s', 0.0),
    'stall_max_steps': summary.get('prune_stall_max_steps', 0.0),
    'stall_median_steps': float(np.median([c['stall_steps'] for c in costs])) if costs else 0.0,
    'check_s': float(sum(c.get('check_s', 0.0) for c in costs)),
    'compile_background_s': summary.get('prune_compile_background_s', 0.0),
    'compile_s': summary['compile_time_s'],
  }


def format_overhead_table(rows: Sequence[Mapping[str, Any]]) -> str:
  """:func:`event_overhead_runs`'s rows as a Markdown table."""
  head = (
    '| variant | wall [s] | wall / dense | events (removing) | stall total [s] | share of wall '
    '| max stall [s] | max stall [steps] | median stall [steps] | checks [s] '
    '| background compile [s] | test acc | weight sparsity |'
  )
  lines = [head, '|' + '---|' * 13]
  for r in rows:
    lines.append(
      f'| {r["variant"]} | {r["wall_s"]:.1f} | {r["wall_vs_dense"]:.3f} | '
      f'{r["events"]} ({r["events_removing"]}) | {r["overhead_s"]:.2f} | '
      f'{r["overhead_share"]:.2%} | {r["stall_max_s"]:.2f} | {r["stall_max_steps"]:.1f} | '
      f'{r["stall_median_steps"]:.1f} | {r["check_s"]:.2f} | {r["compile_background_s"]:.1f} | '
      f'{r["test_accuracy"]:.4f} | {r["weight_sparsity"]:.3f} |'
    )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# prune.multiple_of, replayed: fewer distinct widths (compiles) against sparsity.


def replay_multiple_of(
  events: Sequence[Mapping[str, Any]],
  dense_widths: Mapping[str, int],
  multiple_of: int,
  *,
  min_width: int = 1,
) -> dict[str, Any]:
  """A run's death checks replayed with widths rounded up to ``multiple_of``.

  Each prune event's live counts (``event['live']``) set the widths
  :func:`demp.surgery.keep_masks` would keep with rounding: ``min(width,
  ceil(max(live, min_width) / m) · m)``. The units kept by rounding are dead,
  get no noise and stay dead, so the run's later live counts are taken as they
  were (an approximation: measured runs with rounding can differ a little).
  Returns the final widths and ``architectures``, the number of distinct
  widths trained (each one compile of the train step and of the death check).
  """
  widths = dict(dense_widths)
  architectures = 1
  for event in events:
    if event.get('event') != 'prune' or 'live' not in event:
      continue
    new = {}
    for name, width in widths.items():
      n = max(int(event['live'][name]), min(min_width, width))
      new[name] = min(width, -(-n // multiple_of) * multiple_of)
    if new != widths:
      architectures += 1
      widths = new
  return {'widths': widths, 'architectures': architectures}


def multiple_of_table(run_dirs: Sequence[str], multiples: Sequence[int]) -> list[dict[str, Any]]:
  """:func:`replay_multiple_of` over finished runs (``metrics.jsonl`` + ``config.json``).

  One row per ``multiple_of``: the mean number of architectures (compiles) and
  the mean final weight and neuron sparsity over the runs, the weights counted
  on the model rebuilt at the replayed widths.
  """
  rows = []
  for m in multiples:
    archs, weights, neurons = [], [], []
    for run_dir in run_dirs:
      with open(f'{run_dir}/config.json') as f:
        config = ml_collections.ConfigDict(json.load(f))
      events = [json.loads(line) for line in open(f'{run_dir}/metrics.jsonl')]
      model = models.from_config(config.model, _num_classes(events, config))
      dense = dict(model.widths)
      out = replay_multiple_of(events, dense, m, min_width=config.prune.min_width)
      shape = _image_shape(config)
      dense_params = flops_lib.params_at(model, dense, shape)
      archs.append(out['architectures'])
      weights.append(1 - flops_lib.params_at(model, out['widths'], shape) / dense_params)
      neurons.append(flops_lib.neuron_sparsity(out['widths'], dense))
    rows.append(
      {
        'multiple_of': m,
        'runs': len(run_dirs),
        'architectures': float(np.mean(archs)),
        'weight_sparsity': float(np.mean(weights)),
        'neuron_sparsity': float(np.mean(neurons)),
      }
    )
  return rows


def _num_classes(events, config) -> int:
  for e in events:
    if 'summary' in e:
      return int(e['summary'].get('num_classes', 10))
  return 10


def _image_shape(config) -> tuple[int, ...]:
  size = int(config.data.get('image_size', 0) or 32)
  return (size, size, 3)


# The cost of DemP's own transforms in the step.

OPTIMIZER_VARIANTS: dict[
  str, Callable[[ml_collections.ConfigDict], ml_collections.ConfigDict | None]
] = {
  'adam': lambda c: None,  # the bare base optimizer, no DemP transform
  'demp': lambda c: c,  # penalty + live noise, as configured
  'penalty': lambda c: _with(c, {'demp.noise_std': 0.0}),
  'noise': lambda c: _with(c, {'demp.peak_lambda': 0.0}),
  'demp_rbg': lambda c: _with(c, {'demp.noise_prng': 'rbg'}),
  'demp_unsafe_rbg': lambda c: _with(c, {'demp.noise_prng': 'unsafe_rbg'}),
}
"""The optimizers of :func:`optimizer_times`: a config -> the config of the
``demp`` method's optimizer (None: the base optimizer alone)."""


def _with(
  config: ml_collections.ConfigDict, values: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  for dotted, value in values.items():
    node = config
    *path, last = dotted.split('.')
    for k in path:
      node = node[k]
    node[last] = value
  return config


def optimizer_times(
  model_name: str = 'resnet18',
  *,
  variants: Mapping[str, ml_collections.ConfigDict | optax.GradientTransformation | None]
  | None = None,
  num_classes: int = 10,
  image_hw: int = 32,
  batch_size: int = 32,
  rounds: int = 20,
  steps_per_round: int = 5,
  update_rounds: int = 200,
  seed: int = 0,
  model_kwargs: Mapping[str, Any] | None = None,
  config: ml_collections.ConfigDict | None = None,
  clock: Callable[[], float] | None = None,
) -> dict[str, Any]:
  """Train-step seconds of one model under several optimizers, side by side, and their updates.

  Two measurements, each in interleaved rounds (:func:`interleaved_times`):

  * the whole jitted train step of every variant (``rounds`` rounds of
    ``steps_per_round`` steps): ``step_ratio`` is the median over rounds of the
    variant's time / the reference's time in the same round;
  * the optimizer update alone (``tx.update`` + ``apply_updates`` on the
    model's params and fixed gradients, ``update_rounds`` rounds of 10): its
    cost over the reference's update, in units of the reference's whole step,
    gives ``update_ratio = 1 + (update - reference update) / reference step``.
    The update is a few ms against a step of a few hundred, so this estimate
    of the same ratio is far steadier on a shared machine.

  Args:
    variants: name -> config of the ``demp`` method's optimizer (None: the
      base optimizer alone), or an optimizer itself. Default: ``adam``, ``demp``, ``penalty`` and
      ``noise`` of :data:`OPTIMIZER_VARIANTS` applied to ``config`` (default
      :func:`demp.trainer.config.base_config`: Adam, λ = 5e-3, σ = 5e-5, one-cycle).
      The first variant is the reference of the ratios.
    rounds, steps_per_round, clock: as :func:`interleaved_times`.

  Returns:
    ``step_s``, ``update_s``: name -> median seconds; ``step_ratio``,
    ``update_ratio``: name -> ``(median, lower quartile, upper quartile)`` over
    rounds; ``round_times_s``, ``update_round_times_s``: the raw rounds.
  """
  if config is None:
    config = config_lib.base_config()
  if variants is None:
    variants = {
      name: OPTIMIZER_VARIANTS[name](config) for name in ('adam', 'demp', 'penalty', 'noise')
    }
  model = models.build(model_name, num_classes, **dict(model_kwargs or {}))
  batch = _batch(batch_size, image_hw, num_classes, seed)
  steps_fns, update_fns = {}, {}
  for name, c in variants.items():
    if c is None:
      tx = optim.base_optimizer(config)
    elif isinstance(c, optax.GradientTransformation):
      tx = c
    else:
      tx = methods.get('demp').optimizer(c, optim.base_optimizer(c))
    state = _state(model, tx, batch['image'][:1], seed)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p) + 1e-2 * p, state['params'])
    holder = {'state': state, 'update': (state['params'], state['opt_state'])}
    compiled, _ = _compile(model, tx, jax.tree.map(jnp.copy, state), batch)

    def step(compiled=compiled, holder=holder):
      holder['state'], out = compiled(holder['state'], batch)
      return out

    def update_fn(params, opt_state, tx=tx, grads=grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    update_jit = jax.jit(update_fn, donate_argnums=(0, 1))

    def update(update_jit=update_jit, holder=holder):
      holder['update'] = update_jit(*holder['update'])
      return holder['update']

    holder['state'] = jax.tree.map(jnp.copy, state)
    holder['update'] = jax.tree.map(jnp.copy, holder['update'])
    steps_fns[name], update_fns[name] = step, update
  times = interleaved_times(
    steps_fns, rounds=rounds, steps_per_round=steps_per_round, warmup=2, clock=clock
  )
  update_times = interleaved_times(
    update_fns, rounds=update_rounds, steps_per_round=10, warmup=2, clock=clock
  )
  ref = next(iter(variants))
  ref_step = float(np.median(times[ref]))

  def spread(values):
    return tuple(float(np.percentile(values, q)) for q in (50, 25, 75))

  return {
    'step_s': median_times(times),
    'update_s': median_times(update_times),
    'step_ratio': {name: spread(np.array(times[name]) / np.array(times[ref])) for name in variants},
    'update_ratio': {
      name: spread(1 + (np.array(update_times[name]) - np.array(update_times[ref])) / ref_step)
      for name in variants
    },
    'round_times_s': times,
    'update_round_times_s': update_times,
  }


def format_optimizer_table(result: Mapping[str, Any]) -> str:
  """The rows of :func:`optimizer_times`: times, and both ratios with their quartiles."""
  lines = [
    '| optimizer | step [ms] | step ratio [quartiles] | update [ms] | '
    'ratio from the update [quartiles] |',
    '|---|---|---|---|---|',
  ]
  for name, t in result['step_s'].items():
    (r, r_lo, r_hi), (u, u_lo, u_hi) = result['step_ratio'][name], result['update_ratio'][name]
    lines.append(
      f'| {name} | {t * 1e3:.1f} | {r:.3f} [{r_lo:.3f}, {r_hi:.3f}] | '
      f"{result['update_s'][name] * 1e3:.2f} | {u:.4f} [{u_lo:.4f}, {u_hi:.4f}] |"
    )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# Where a step's time goes.

BREAKDOWN_PARTS = ('input_s', 'dispatch_s', 'compute_s', 'sync_s')
"""The parts of one training step that :func:`step_breakdown` times, in order."""


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
  """Least-squares ``y ≈ a·x + b``: returns ``(a, b)`` (exact through two points)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.size < 2 or np.ptp(x) == 0:
    raise ValueError(f'a line needs two distinct x values, got {x.tolist()}.')
  a, b = np.polyfit(x, y, 1)
  return float(a), float(b)


def step_breakdown(
  config_fn: Callable[[float], ml_collections.ConfigDict],
  widths: Sequence[float],
  *,
  sparsity: float | None = 0.5,
  rounds: int = 5,
  steps_per_round: int = 2,
  warmup: int = 2,
  seed: int = 0,
) -> dict[str, Any]:
  """Per training step: input pipeline, dispatch, compute and host sync, next to XLA's FLOPs.

  ``config_fn(width)`` is a run's config at a width multiplier (batch size,
  data, model and optimizer as the trainer builds them, :func:`demp.trainer.train.init_run`);
  one variant per width, plus (``sparsity``) the widest one with that fraction of
  every unit group removed at random (:func:`random_keeps`) by the run's own
  surgery. Each step is timed in four parts:

  * ``input_s``: ``next(train_iterator)`` and its transfer to the device (blocked);
  * ``dispatch_s``: the jitted step's call until it returns (asynchronous dispatch);
  * ``compute_s``: from then until the new state is ready (``block_until_ready``);
  * ``sync_s``: ``jax.device_get`` of the step's metrics.

  Every variant is compiled and warmed up first; then ``rounds`` rounds run
  ``steps_per_round`` steps of every variant in turn, so that a shared
  machine's load drifts over all alike; each part's value is the median over
  rounds of its per-step mean. ``step_s`` = dispatch + compute. Over the
  widths (not the pruned variant) ``step_s ≈ a·FLOPs + b`` is fitted
  (:func:`fit_line`): ``b``, the time a step takes whatever its FLOPs, is also
  given as a fraction of the widest variant's step.

  Returns:
    ``{'rows': [...], 'fit': {'a_s_per_flop', 'b_s', 'b_fraction'}}``; each row
    has ``name``, ``width``, ``sparsity``, ``flops``, the parts, ``step_s``,
    ``total_s``, ``fit_s`` (the line at its FLOPs) and ``round_times_s``.
  """
  from demp.trainer import train  # pylint: disable=g-import-not-at-top

  if len(set(widths)) < 2:
    raise ValueError(f'widths={list(widths)!r}: the fit needs two distinct widths at least.')
  variants = []
  for width in widths:
    variants.append({'name': f'width {width:g}', 'width': width, 'sparsity': 0.0})
  if sparsity is not None:
    widest = max(widths)
    variants.append(
      {'name': f'width {widest:g} pruned {sparsity:g}', 'width': widest, 'sparsity': sparsity}
    )
  for v in variants:
    run, it = train.init_run(config_fn(v['width']))
    if v['sparsity']:
      run.prune(random_keeps(run.model, v['sparsity'], seed), reason='benchmark')
    batch = jax.device_put(next(it))
    run.compile(batch)
    v.update(run=run, it=it, flops=run.step_flops, times={p: [] for p in BREAKDOWN_PARTS})

  def one_step(v) -> dict[str, float]:
    run = v['run']
    t0 = time.perf_counter()
    batch = jax.block_until_ready(jax.device_put(next(v['it'])))
    t1 = time.perf_counter()
    run.state, metrics = run.compiled(run.state, batch)
    t2 = time.perf_counter()
    jax.block_until_ready(run.state)
    t3 = time.perf_counter()
    jax.device_get(metrics)
    t4 = time.perf_counter()
    return dict(zip(BREAKDOWN_PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True))

  for v in variants:
    for _ in range(warmup):
      one_step(v)
  for _ in range(rounds):
    for v in variants:
      parts = [one_step(v) for _ in range(steps_per_round)]
      for p in BREAKDOWN_PARTS:
        v['times'][p].append(sum(x[p] for x in parts) / steps_per_round)
  rows = []
  for v in variants:
    row = {
      'name': v['name'],
      'width': v['width'],
      'sparsity': v['sparsity'],
      'widths': dict(v['run'].model.widths),
      'flops': v['flops'],
      **{p: float(np.median(v['times'][p])) for p in BREAKDOWN_PARTS},
      'round_times_s': v['times'],
    }
    row['step_s'] = row['dispatch_s'] + row['compute_s']
    row['total_s'] = sum(row[p] for p in BREAKDOWN_PARTS)
    rows.append(row)
  dense = [r for r in rows if not r['sparsity']]
  a, b = fit_line([r['flops'] for r in dense], [r['step_s'] for r in dense])
  for row in rows:
    row['fit_s'] = a * row['flops'] + b
  widest = max(dense, key=lambda r: r['flops'])
  return {'rows': rows, 'fit': {'a_s_per_flop': a, 'b_s': b, 'b_fraction': b / widest['step_s']}}


def format_breakdown_table(result: Mapping[str, Any]) -> str:
  """The rows of :func:`step_breakdown` in milliseconds, and the fit's intercept."""
  lines = [
    '| variant | GFLOPs/step | input [ms] | dispatch [ms] | compute [ms] | sync [ms] | '
    'step [ms] | total [ms] | fit a·F+b [ms] |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in result['rows']:
    ms = lambda k: f'{r[k] * 1e3:.2f}'
    lines.append(
      f"| {r['name']} | {r['flops'] / 1e9:.3f} | {ms('input_s')} | {ms('dispatch_s')} | "
      f"{ms('compute_s')} | {ms('sync_s')} | {ms('step_s')} | {ms('total_s')} | {ms('fit_s')} |"
    )
  fit = result['fit']
  lines.append('')
  lines.append(
    f"step ≈ a·FLOPs + b over the widths: a = {fit['a_s_per_flop'] * 1e12:.3f} ms/GFLOP, "
    f"b = {fit['b_s'] * 1e3:.2f} ms = {fit['b_fraction']:.1%} of the widest dense step"
  )
  return '\n'.join(lines)
