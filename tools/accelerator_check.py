"""One prepared accelerator check: what a CPU cannot measure, in one short call.

:func:`run_check` measures, on the first device JAX sees, under a global time
budget (checked before every part; a part that would overrun it is skipped
with a note, never started):

1. ``steps/<model>/<dtype>``: the jitted train step of each model dense and with
   25 / 50 / 75 % of every unit group's units removed by the real surgery
   (:func:`tools.benchmark.step_times`: interleaved rounds, median), next to the
   FLOP ratio of XLA's cost analysis of each compiled step, and each step's
   compile time; in float32 and in bfloat16 (:class:`tools.benchmark.ComputeDtype`:
   the models have no dtype argument, so params and images are cast to bf16
   inside the loss; master params, optimizer state, BN statistics and the loss
   stay float32).
2. ``event/<model>``: one prune event (death check compiled and run, surgery,
   recompiling the step; :func:`tools.benchmark.prune_event_time`) as a fraction
   of τ = 1000 and 5000 steps of the pruned step. The bf16 row is derived: the
   same check and surgery plus the bf16 step's compile time from part 1.
3. ``real_run``: a short DemP run and a dense run with the same steps on real
   data (the caller's configs, e.g. ResNet-18 x0.5 on the CIFAR-10 subset):
   wall time (compiles and prune events included, and each apart), final
   widths, test accuracy. It drives the trainer's own :class:`demp.trainer.train.Run`
   (death check, surgery, recompile as in training) from a numpy input
   pipeline (:func:`train_batches`, every batch made and put on the device
   before the clock starts), so it needs no TensorFlow.

Results go to ``<out>/<device>/accelerator_check.{json,md}`` (rewritten after
every part, so a killed run leaves what it measured). On a CPU it refuses
unless ``allow_cpu``; the tiny plan (:func:`tiny_plan`) exists for that dry run
and its JSON says ``"platform": "cpu", "tiny": true``.

Example::

    plan = tiny_plan()
    results = run_check(plan, '/tmp/acc', allow_cpu=True)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform as platform_lib
import re
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from demp import flops, models
from demp.trainer import config as config_lib
from demp.trainer import methods, optim, steps
from demp.trainer import run as run_lib
from tools import benchmark

SCHEMA_VERSION = 1
JSON_NAME = 'accelerator_check.json'
MD_NAME = 'accelerator_check.md'
BF16_CAST = (
  'bfloat16: the models take no dtype, so the params collection and the input images '
  'are cast to bfloat16 inside the loss (every conv, matmul and BN output in bf16; '
  'BN statistics reduced in float32); master params, optimizer state, BN running '
  'statistics, logits and loss are float32 (tools.benchmark.ComputeDtype).'
)
TINY_WIDTH = 1 / 16


class NoAcceleratorError(RuntimeError):
  """JAX sees only CPU devices and the CPU dry run was not asked for."""


@dataclasses.dataclass(frozen=True)
class Plan:
  """What to measure. ``models``: ``(registry name, square image size)`` pairs."""

  models: tuple[tuple[str, int], ...] = (('resnet18', 32), ('vgg16', 64))
  model_kwargs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  batch_size: int = 128
  sparsities: tuple[float, ...] = (0.25, 0.5, 0.75)
  dtypes: tuple[str, ...] = ('float32', 'bfloat16')
  rounds: int = 7
  steps_per_round: int = 20
  event_examples: int = 512
  event_batch_size: int = 128
  taus: tuple[int, ...] = (1000, 5000)
  tiny: bool = False

  def __post_init__(self):
    for key in ('batch_size', 'rounds', 'steps_per_round', 'event_examples', 'event_batch_size'):
      if getattr(self, key) < 1:
        raise ValueError(f'Plan.{key}={getattr(self, key)!r} must be >= 1.')
    for name, size in self.models:
      if name not in models.MODELS:
        raise ValueError(f'Plan.models: {name!r} is not one of {sorted(models.MODELS)}.')
      if size < 1:
        raise ValueError(f'Plan.models: image size {size!r} of {name!r} must be >= 1.')
    for s in self.sparsities:
      if not 0 < s < 1:
        raise ValueError(f'Plan.sparsities: {s!r} must be in (0, 1).')
    for d in self.dtypes:
      if d not in benchmark.COMPUTE_DTYPES:
        raise ValueError(f'Plan.dtypes: {d!r} is not one of {sorted(benchmark.COMPUTE_DTYPES)}.')
    if self.event_examples % min(self.event_batch_size, self.event_examples):
      raise ValueError(
        f'Plan.event_examples={self.event_examples} must be a multiple of '
        f'event_batch_size={self.event_batch_size}.'
      )


def full_plan(**overrides) -> Plan:
  """The accelerator plan: ResNet-18 (CIFAR stem, 32x32) and VGG-16 (64x64), batch 128."""
  return Plan(**overrides)


def tiny_plan(**overrides) -> Plan:
  """The CPU dry run: widths x1/16, batch 4, 2 rounds of 1 step, 8 death-check images."""
  kwargs = {'resnet18': {'width_multiplier': TINY_WIDTH}, 'vgg16': {'width_multiplier': TINY_WIDTH}}
  return Plan(
    **{
      'model_kwargs': kwargs,
      'batch_size': 4,
      'rounds': 2,
      'steps_per_round': 1,
      'event_examples': 8,
      'event_batch_size': 4,
      'tiny': True,
      **overrides,
    }
  )


# ----------------------------------------------------------------------------
# Device.


def device_info() -> dict[str, Any]:
  """The first device, the versions and the XLA settings the numbers were taken with."""
  device = jax.devices()[0]
  try:
    platform_version = device.client.platform_version
  except Exception:  # pylint: disable=broad-except
    platform_version = ''
  return {
    'platform': device.platform,
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'platform_version': platform_version,
    'jax': jax.__version__,
    'jaxlib': getattr(jaxlib, '__version__', ''),
    'python': platform_lib.python_version(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'xla_python_client_mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', ''),
    'default_matmul_precision': str(getattr(jax.config, 'jax_default_matmul_precision', 'unknown')),
  }


def require_accelerator(allow_cpu: bool) -> dict[str, Any]:
  """:func:`device_info`; raises :class:`NoAcceleratorError` on CPU unless ``allow_cpu``."""
  info = device_info()
  if info['platform'] == 'cpu' and not allow_cpu:
    raise NoAcceleratorError(
      f'JAX sees only CPU devices ({jax.devices()}): this check measures an accelerator and '
      'refuses to produce CPU numbers that could be mistaken for GPU/TPU ones. Run it where '
      'jax.devices() lists a GPU or TPU (a CUDA/TPU build of jaxlib), or pass --allow_cpu for '
      'the tiny dry run (tiny widths and batch; its results say "platform": "cpu", '
      '"tiny": true).'
    )
  return info


def device_slug(info: Mapping[str, Any], tiny: bool) -> str:
  """Folder name of a device: ``'NVIDIA H200'`` -> ``nvidia-h200`` (``-tiny`` for a dry run)."""
  kind = str(info.get('device_kind') or info.get('platform') or 'device')
  slug = re.sub(r'[^a-z0-9]+', '-', kind.lower()).strip('-') or 'device'
  if info.get('platform') == 'cpu' and not slug.startswith('cpu'):
    slug = f'cpu-{slug}'
  return f'{slug}-tiny' if tiny else slug


# ----------------------------------------------------------------------------
# The budget and the parts.


class Budget:
  """Seconds since construction against a limit; a part runs only if its estimate fits."""

  def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
    if seconds < 0:
      raise ValueError(f'budget_s={seconds!r} must be >= 0.')
    self.seconds, self._clock, self._t0 = float(seconds), clock, clock()

  def spent(self) -> float:
    return self._clock() - self._t0

  def allows(self, estimate_s: float) -> bool:
    return self.spent() + max(0.0, estimate_s) <= self.seconds


def _estimate(name: str, parts: Sequence[Mapping[str, Any]]) -> float:
  """A part's expected seconds from the parts done so far (0 when nothing is comparable).

  A step part: the mean of the step parts done (same model first). An event:
  two compiles of its model (check + step; of the slowest model measured when
  its own is not). The real run: six compiles of the
  step part with the slowest compiles (its runs compile init, step, death checks
  and eval, of a narrower model).
  """
  done = [p for p in parts if p['status'] == 'done']
  steps = [p for p in done if p['name'].startswith('steps/')]
  kind, _, rest = name.partition('/')
  if kind == 'steps':
    same = [p for p in steps if p['name'].split('/')[1] == rest.split('/')[0]]
    pool = same or steps
    return float(np.mean([p['seconds'] for p in pool])) if pool else 0.0
  if kind == 'event':
    same = [p for p in steps if p['name'].split('/')[1] == rest]
    return 2.0 * max((p.get('mean_compile_s', 0.0) for p in same or steps), default=0.0)
  if kind == 'real_run':
    return 6.0 * max((p.get('mean_compile_s', 0.0) for p in steps), default=0.0)
  return 0.0


def run_check(
  plan: Plan,
  out: str,
  *,
  budget_s: float = 420.0,
  allow_cpu: bool = False,
  real_configs: tuple[ml_collections.ConfigDict, ml_collections.ConfigDict] | None = None,
  real_note: str = '',
  log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
  """Runs every part of ``plan`` that fits ``budget_s``; writes and returns the results.

  ``real_configs``: ``(demp_config, dense_config)`` of the real run (None skips
  it, with ``real_note`` as the reason). ``log``: progress lines (default:
  print, flushed). Raises :class:`NoAcceleratorError`
  on CPU unless ``allow_cpu``. A part that raises is recorded as failed (its
  error in the JSON) and the others still run.
  """
  budget = Budget(budget_s)
  log = log or functools.partial(print, flush=True)
  info = require_accelerator(allow_cpu)
  folder = os.path.join(out, device_slug(info, plan.tiny))
  os.makedirs(folder, exist_ok=True)
  results = {
    'schema_version': SCHEMA_VERSION,
    'platform': info['platform'],
    'tiny': plan.tiny,
    'device': info,
    'plan': _plain(dataclasses.asdict(plan)),
    'budget_s': budget.seconds,
    'bf16_cast': BF16_CAST,
    'steps': [],
    'events': [],
    'real_run': None,
    'parts': [],
    'notes': [],
    'spent_s': 0.0,
    'complete': False,
  }
  if plan.tiny:
    results['notes'].append('TINY DRY RUN: tiny widths and batch; not a measurement of anything.')

  def write():
    results['spent_s'] = budget.spent()
    with open(os.path.join(folder, JSON_NAME), 'w') as f:
      json.dump(_plain(results), f, indent=2)
    with open(os.path.join(folder, MD_NAME), 'w') as f:
      f.write(format_markdown(results) + '\n')

  def part(name: str, fn: Callable[[], dict | None], skip_note: str = ''):
    record = {
      'name': name,
      'status': 'skipped',
      'seconds': 0.0,
      'estimate_s': _estimate(name, results['parts']),
      'note': skip_note,
    }
    results['parts'].append(record)
    if skip_note:
      log(f'[{budget.spent():6.1f}s] {name}: skipped ({skip_note})')
    elif not budget.allows(record['estimate_s']):
      record['note'] = (
        f'budget: {budget.spent():.0f} s spent + {record["estimate_s"]:.0f} s '
        f'expected > {budget.seconds:.0f} s'
      )
      log(f'[{budget.spent():6.1f}s] {name}: skipped ({record["note"]})')
    else:
      log(f'[{budget.spent():6.1f}s] {name} ...')
      t0 = time.perf_counter()
      try:
        record.update(fn() or {})
        record['status'] = 'done'
      except Exception as e:  # pylint: disable=broad-except
        record.update(
          status='failed', note=f'{type(e).__name__}: {e}', traceback=traceback.format_exc(limit=8)
        )
        log(f'{name} FAILED: {record["traceback"]}')
      record['seconds'] = time.perf_counter() - t0
      log(f'[{budget.spent():6.1f}s] {name}: {record["status"]} in {record["seconds"]:.1f} s')
    write()

  def steps_part(name, size, dtype):
    def fn():
      rows = benchmark.step_times(
        name,
        image_hw=size,
        batch_size=plan.batch_size,
        sparsities=plan.sparsities,
        rounds=plan.rounds,
        steps_per_round=plan.steps_per_round,
        model_kwargs=plan.model_kwargs.get(name, {}),
        compute_dtype=dtype,
      )
      results['steps'].extend(rows)
      return {'mean_compile_s': float(np.mean([r['compile_s'] for r in rows]))}

    return fn

  def event_part(name, size):
    def fn():
      event = benchmark.prune_event_time(
        name,
        image_hw=size,
        batch_size=plan.batch_size,
        sparsity=plan.sparsities[0],
        num_examples=plan.event_examples,
        check_batch_size=plan.event_batch_size,
        model_kwargs=plan.model_kwargs.get(name, {}),
      )
      results['events'].extend(event_rows(event, results['steps'], plan.taus))

    return fn

  def real_part():
    results['real_run'] = real_run(*real_configs)

  for name, size in plan.models:
    for dtype in plan.dtypes:
      part(f'steps/{name}/{dtype}', steps_part(name, size, dtype))
  for name, size in plan.models:
    part(f'event/{name}', event_part(name, size))
  if real_configs is None:
    results['real_run'] = {'skipped': real_note or 'no real-run configs given'}
  part(
    'real_run',
    real_part,
    skip_note='' if real_configs is not None else (real_note or 'no real-run configs given'),
  )
  results['complete'] = all(p['status'] == 'done' for p in results['parts'])
  write()
  results['files'] = {'json': os.path.join(folder, JSON_NAME), 'md': os.path.join(folder, MD_NAME)}
  return results


def event_rows(
  event: Mapping[str, Any], steps: Sequence[Mapping[str, Any]], taus: Sequence[int]
) -> list[dict[str, Any]]:
  """The measured float32 prune event, and a derived row per other dtype timed in ``steps``.

  The event is set against τ steps of the *pruned* step: its median from
  ``steps`` when that variant was timed there, else the event's own single step.
  A derived row keeps the death check and surgery (dtype-independent here: the
  trainer checks in float32) and takes that dtype's compile time from ``steps``.
  """

  def pruned(dtype):
    return next(
      (
        r
        for r in steps
        if r['model'] == event['model']
        and r['dtype'] == dtype
        and r['sparsity'] == event['sparsity']
      ),
      None,
    )

  def ratios(event_s, step_s):
    return {f'event_over_{t}_steps': event_s / (t * step_s) for t in taus}

  row32 = pruned('float32')
  step_s = row32['step_s'] if row32 else event['step_s']
  rows = [
    {
      **event,
      'dtype': 'float32',
      'derived': False,
      'pruned_step_s': step_s,
      **ratios(event['event_s'], step_s),
    }
  ]
  for dtype in sorted({r['dtype'] for r in steps if r['model'] == event['model']} - {'float32'}):
    row = pruned(dtype)
    if row is None:
      continue
    event_s = event['check_compile_s'] + event['surgery_s'] + row['compile_s']
    rows.append(
      {
        **event,
        'dtype': dtype,
        'derived': True,
        'recompile_s': row['compile_s'],
        'event_s': event_s,
        'step_s': row['step_s'],
        'pruned_step_s': row['step_s'],
        **ratios(event_s, row['step_s']),
      }
    )
  return rows


# ----------------------------------------------------------------------------
# The real run: the trainer's Run on a numpy pipeline.


def load_npz(path: str) -> dict[str, np.ndarray]:
  """The four arrays of a ``demp.data`` npz file (uint8 or [0, 1] images, int labels)."""
  with np.load(os.path.expanduser(path)) as f:
    missing = [
      k for k in ('train_images', 'train_labels', 'test_images', 'test_labels') if k not in f.files
    ]
    if missing:
      raise ValueError(f'data path {path!r} lacks keys {missing} (found {sorted(f.files)}).')
    return {k: f[k] for k in ('train_images', 'train_labels', 'test_images', 'test_labels')}


def write_tiny_npz(
  path: str,
  *,
  num_train: int = 64,
  num_test: int = 32,
  size: int = 32,
  num_classes: int = 10,
  seed: int = 0,
) -> str:
  """A random uint8 image npz in ``demp.data``'s layout (for the dry run and tests)."""
  rng = np.random.default_rng(seed)
  np.savez(
    path,
    train_images=rng.integers(0, 256, (num_train, size, size, 3), dtype=np.uint8),
    train_labels=rng.integers(0, num_classes, num_train),
    test_images=rng.integers(0, 256, (num_test, size, size, 3), dtype=np.uint8),
    test_labels=rng.integers(0, num_classes, num_test),
  )
  return path


class Normalizer:
  """Images to float32 in [0, 1], then standardized per channel by the train set (as demp.data)."""

  def __init__(self, train_images: np.ndarray, normalize: bool = True):
    self.scale = 255.0 if train_images.dtype == np.uint8 else 1.0
    pixels = train_images.reshape(-1, train_images.shape[-1]).astype(np.float64) / self.scale
    self.mean_c = pixels.mean(0).astype(np.float32) if normalize else 0.0
    self.std_c = np.maximum(pixels.std(0), 1e-6).astype(np.float32) if normalize else 1.0

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return ((images.astype(np.float32) / self.scale - self.mean_c) / self.std_c).astype(np.float32)


def crop_flip(images_bhwc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Pad H/8 px (reflect), random crop back to H x W, random horizontal flip (as demp.data)."""
  b, h, w, _ = images_bhwc.shape
  pad = max(1, h // 8)
  padded = np.pad(images_bhwc, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
  dy, dx = rng.integers(0, 2 * pad + 1, b), rng.integers(0, 2 * pad + 1, b)
  rows = dy[:, None] + np.arange(h)[None]  # [B, H]
  cols = dx[:, None] + np.arange(w)[None]  # [B, W]
  flip = rng.random(b) < 0.5
  cols = np.where(flip[:, None], cols[:, ::-1], cols)
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


AUGMENTS = {'none': lambda images, rng: images, 'crop_flip': crop_flip}


def train_batches(
  arrays: Mapping[str, np.ndarray],
  batch_size: int,
  seed: int,
  *,
  augment: str = 'crop_flip',
  normalize: bool = True,
):
  """Infinite shuffled, augmented, normalized train batches (reshuffled every epoch)."""
  if augment not in AUGMENTS:
    raise ValueError(f'data.augment={augment!r} is not one of {sorted(AUGMENTS)} here.')
  images, labels = arrays['train_images'], np.asarray(arrays['train_labels'], np.int32)
  if len(images) < batch_size:
    raise ValueError(f'batch_size={batch_size} is larger than the {len(images)} train images.')
  norm, rng = Normalizer(images, normalize), np.random.default_rng(seed)
  while True:
    perm = rng.permutation(len(images))
    for i in range(0, len(images) - batch_size + 1, batch_size):
      idx = perm[i : i + batch_size]
      yield {'image': norm(AUGMENTS[augment](images[idx], rng)), 'label': labels[idx]}


def evaluate(
  model, variables, arrays: Mapping[str, np.ndarray], batch_size: int, normalize: bool = True
) -> dict[str, float]:
  """Test accuracy and loss (last batch padded and masked, so one compile)."""
  norm = Normalizer(arrays['train_images'], normalize)
  images, labels = arrays['test_images'], np.asarray(arrays['test_labels'], np.int32)
  step = steps.make_eval_step(model)
  totals = {'loss_sum': 0.0, 'correct': 0.0, 'count': 0.0}
  for i in range(0, len(images), batch_size):
    x, y = norm(images[i : i + batch_size]), labels[i : i + batch_size]
    n = len(y)
    mask = np.r_[np.ones(n, np.float32), np.zeros(batch_size - n, np.float32)]
    if n < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - n, y.dtype)])
    out = jax.device_get(step(variables, {'image': x, 'label': y, 'mask': mask}))
    totals = {k: totals[k] + float(out[k]) for k in totals}
  return {
    'accuracy': totals['correct'] / totals['count'],
    'loss': totals['loss_sum'] / totals['count'],
  }


def device_batches(
  config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray]
) -> list[dict[str, jax.Array]]:
  """All ``config.num_steps`` train batches of ``config``, made and put on the device up front.

  Made before the clock starts, so a run's wall time is the device's (and the
  compiles' and prune events'), not the host's augmentation: ResNet-18 x0.5
  steps take milliseconds on a GPU. 400 CIFAR batches of 128 are 630 MB.
  """
  it = train_batches(
    arrays,
    config.batch_size,
    config.seed,
    augment=config.data.augment,
    normalize=bool(config.data.normalize),
  )
  return [jax.device_put(next(it)) for _ in range(config.num_steps)]


def build_model(config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray]):
  """The dense model of ``config`` (classes: 10 for cifar10, else from the labels)."""
  num_classes = 10 if config.data.name == 'cifar10' else int(arrays['train_labels'].max()) + 1
  return models.from_config(config.model, num_classes)


def init_variables(
  config: ml_collections.ConfigDict, arrays: Mapping[str, np.ndarray]
) -> dict[str, Any]:
  """The variables of ``config``'s model as the trainer initializes them (``config.seed``)."""
  dummy = jnp.zeros((1,) + arrays['train_images'].shape[1:], jnp.float32)
  init = jax.jit(build_model(config, arrays).init, static_argnames='train')
  return init(jax.random.key(config.seed), dummy, train=False)


def train_run(
  config: ml_collections.ConfigDict,
  arrays: Mapping[str, np.ndarray],
  batches: Sequence[Mapping[str, jax.Array]] | None = None,
  variables: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """``config`` trained like :func:`demp.trainer.train.train_and_evaluate` does, data from ``arrays``.

  The same model, optimizer (method wrapper + accumulation), :class:`demp.trainer.train.Run`
  (AOT step per architecture, death check, keep-masks, surgery) and hook
  schedule; host syncs only at prune events and at the end. ``batches``: the
  train batches (default :func:`device_batches`); ``variables``: the initial
  variables (default :func:`init_variables`). ``wall_s`` runs from the
  first step to the last update done (compiles and prune events included;
  init, batches and evaluation not), ``compile_s`` and ``event_s`` are the
  parts of it spent compiling steps and in the method's hook.
  """
  config_lib.validate_config(config)
  method = methods.get(config.method)
  t0 = time.perf_counter()
  model = build_model(config, arrays)
  if variables is None:
    variables = init_variables(config, arrays)
  variables = jax.tree.map(jnp.copy, dict(variables))  # the step donates its state
  tx = optim.make_optimizer(config, method)
  state = run_lib.train_state(variables, tx.init(variables['params']))
  normalize = bool(config.data.normalize)
  rng = np.random.default_rng(config.seed)
  idx = rng.choice(len(arrays['train_images']), config.prune.num_examples, replace=False)
  death = jnp.asarray(Normalizer(arrays['train_images'], normalize)(arrays['train_images'][idx]))
  run = run_lib.Run(
    config=config,
    model=model,
    tx=tx,
    state=state,
    death_images=death,
    dense_widths=dict(model.widths),
    dense_params=flops.num_params(state['params']),
  )
  if batches is None:
    batches = device_batches(config, arrays)
  if len(batches) < config.num_steps:
    raise ValueError(f'{len(batches)} batches for num_steps={config.num_steps}.')
  jax.block_until_ready((run.state, batches))
  init_s = time.perf_counter() - t0
  compile_s = event_s = 0.0
  losses = []
  t0 = time.perf_counter()
  for step in range(1, config.num_steps + 1):
    batch = batches[step - 1]
    if run.compiled is None:
      compile_s += run.compile(batch)
    run.state, out = run.compiled(run.state, batch)
    run.step = step
    losses.append(out['loss'])
    if run.switch_due():  # a deferred prune: its step compiled in the background
      t_switch = time.perf_counter()
      run.switch()
      event_s += time.perf_counter() - t_switch
    if method.hook is not None and method.when(config, step):
      t_hook = time.perf_counter()
      jax.block_until_ready(run.state)
      method.hook(run, step)
      event_s += time.perf_counter() - t_hook
  jax.block_until_ready(run.state)
  wall_s = time.perf_counter() - t0
  losses = np.asarray(jax.device_get(losses), np.float64)
  if not np.all(np.isfinite(losses)):
    bad = int(np.flatnonzero(~np.isfinite(losses))[0])
    raise FloatingPointError(f'{config.method}: loss is {losses[bad]} at step {bad + 1}.')
  ev = evaluate(run.model, run.variables, arrays, config.eval_batch_size, normalize)
  return {
    'method': config.method,
    'steps': config.num_steps,
    'batch_size': config.batch_size,
    'model': config.model.name,
    'wall_s': wall_s,
    'compile_s': compile_s,
    'event_s': event_s,
    'train_s': wall_s - compile_s - event_s,
    'init_s': init_s,
    'test_accuracy': ev['accuracy'],
    'test_loss': ev['loss'],
    'final_train_loss': float(np.mean(losses[-min(10, len(losses)) :])),
    'widths': dict(run.model.widths),
    'dense_widths': dict(run.dense_widths),
    'neuron_sparsity': flops.neuron_sparsity(run.model.widths, run.dense_widths),
    'dense_params': run.dense_params,
    'final_params': flops.num_params(run.state['params']),
    'prune_events': len(run.events),
    'prune_events_effective': sum(bool(e['removed']) for e in run.events),
    'events': [
      {k: e[k] for k in ('step', 'removed', 'widths', 'check_s', 'surgery_s') if k in e}
      for e in run.events
    ],
  }


def real_run(
  demp_config: ml_collections.ConfigDict, dense_config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """The DemP and the dense run on the same device batches (same steps and seed), dense first."""
  if demp_config.num_steps != dense_config.num_steps:
    raise ValueError(
      f'num_steps differ: DemP {demp_config.num_steps}, dense '
      f'{dense_config.num_steps}; the comparison needs the same steps.'
    )
  if demp_config.data.path != dense_config.data.path:
    raise ValueError('the DemP and dense configs read different data.path values.')
  for key in ('batch_size', 'seed', 'data.augment', 'data.normalize', 'model'):
    a, b = config_lib._get(demp_config, key), config_lib._get(dense_config, key)
    if a != b:
      raise ValueError(
        f'{key} differs: DemP {a!r}, dense {b!r}; the runs share their batches '
        'and initial variables.'
      )
  arrays = load_npz(demp_config.data.path)
  t0 = time.perf_counter()
  batches = device_batches(demp_config, arrays)
  jax.block_until_ready(batches)
  data_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  variables = init_variables(demp_config, arrays)  # one init (compile) for both runs
  jax.block_until_ready(variables)
  init_s = time.perf_counter() - t0
  dense = train_run(dense_config, arrays, batches, variables)
  demp_out = train_run(demp_config, arrays, batches, variables)
  return {
    'data_path_name': os.path.basename(str(demp_config.data.path)),
    'batches_s': data_s,
    'init_s': init_s,
    'num_train': int(len(arrays['train_images'])),
    'num_test': int(len(arrays['test_images'])),
    'prune_every': int(demp_config.prune.every),
    'peak_lambda': float(demp_config.demp.peak_lambda),
    'dense': dense,
    'demp': demp_out,
    'wall_ratio': demp_out['wall_s'] / dense['wall_s'],
    'train_ratio': demp_out['train_s'] / dense['train_s'],
  }


# ----------------------------------------------------------------------------
# Output.


def _plain(x):
  if isinstance(x, Mapping):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array, np.generic)):
    x = np.asarray(x)
    return x.item() if x.ndim == 0 else x.tolist()
  if isinstance(x, float) and not np.isfinite(x):
    return None
  return x


def _fmt(x, spec: str) -> str:
  return '–' if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


def format_markdown(results: Mapping[str, Any]) -> str:
  """The report: header, step table, prune-event table, real run, parts and budget."""
  d, plan = results['device'], results['plan']
  lines = [
    f"# Accelerator check: {d['device_kind']} ({d['platform']}"
    f"{', TINY DRY RUN: not a measurement' if results['tiny'] else ''})",
    '',
    f"jax {d['jax']}, jaxlib {d['jaxlib']}, {d['device_count']} device(s), "
    f"platform version `{d['platform_version'] or '–'}`, "
    f"XLA_FLAGS=`{d['xla_flags'] or ''}`, "
    f"default matmul precision `{d['default_matmul_precision']}`. "
    f"Spent {results['spent_s']:.0f} s of a {results['budget_s']:.0f} s budget.",
    '',
  ]
  lines += [
    f"## Train step: time ratio vs FLOP ratio",
    '',
    f"Batch {plan['batch_size']}; median over {plan['rounds']} interleaved rounds of "
    f"{plan['steps_per_round']} steps; units removed uniformly at random from every unit "
    'group by the surgery; ratios to the dense step of the same dtype; FLOPs from XLA\'s '
    'cost analysis of the compiled step.',
    '',
  ]
  if results['steps']:
    lines += [
      '| model | dtype | removed | params | step [ms] | time ratio | FLOP ratio | '
      'GFLOP/step | compile [s] |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in results['steps']:
      lines.append(
        f"| {r['model']} | {r['dtype']} | {r['sparsity']:.2f} | {r['params']:,} | "
        f"{1e3 * r['step_s']:.2f} | {r['time_ratio']:.3f} | "
        f"{_fmt(r['flop_ratio'], '.3f')} | {_fmt(r['flops'] / 1e9, '.2f')} | "
        f"{r['compile_s']:.1f} |"
      )
  else:
    lines.append('(not measured: see Parts)')
  taus = plan['taus']
  lines += [
    '',
    '## Prune event vs τ steps',
    '',
    f"One event removing {plan['sparsities'][0]:.0%} of the units: death check on "
    f"{plan['event_examples']} images (compiled for the new architecture, then run), "
    'surgery, '
    'recompiling the step; against τ steps of the pruned step. bf16 rows are derived '
    '(same check + surgery, the bf16 step\'s compile time).',
    '',
  ]
  if results['events']:
    lines += [
      '| model | dtype | check compile+run [s] | check run [s] | surgery [s] | '
      'recompile [s] | event [s] | pruned step [ms] | '
      + ' | '.join(f'event / {t} steps' for t in taus)
      + ' |',
      '|---|---|---|---|---|---|---|---|' + '---|' * len(taus),
    ]
    for r in results['events']:
      lines.append(
        f"| {r['model']} | {r['dtype']}{' (derived)' if r['derived'] else ''} | "
        f"{r['check_compile_s']:.2f} | {r['check_s']:.3f} | {r['surgery_s']:.3f} | "
        f"{r['recompile_s']:.2f} | {r['event_s']:.2f} | "
        f"{1e3 * r['pruned_step_s']:.2f} | "
        + ' | '.join(f"{r[f'event_over_{t}_steps']:.4f}" for t in taus)
        + ' |'
      )
  else:
    lines.append('(not measured: see Parts)')
  lines += ['', '## Short real run: DemP vs dense, same steps', '']
  rr = results.get('real_run')
  if not rr or 'skipped' in rr:
    lines.append(f"Skipped: {(rr or {}).get('skipped', 'not run (see Parts)')}.")
  else:
    demp_r, dense_r = rr['demp'], rr['dense']
    lines += [
      f"{demp_r['model']} on `{rr['data_path_name']}` ({rr['num_train']} train / "
      f"{rr['num_test']} test images), {demp_r['steps']} steps of batch "
      f"{demp_r['batch_size']}, τ = {rr['prune_every']}, peak λ = {rr['peak_lambda']:g}. "
      'Wall time from the first step to the last (compiles and prune events included).',
      '',
      '| method | wall [s] | compile [s] | prune events [s] | steps only [s] | '
      'test accuracy | neuron sparsity | params | prune events (removed) |',
      '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in (dense_r, demp_r):
      lines.append(
        f"| {r['method']} | {r['wall_s']:.1f} | {r['compile_s']:.1f} | "
        f"{r['event_s']:.1f} | {r['train_s']:.1f} | {r['test_accuracy']:.4f} | "
        f"{r['neuron_sparsity']:.3f} | {r['final_params']:,} | "
        f"{r['prune_events']} ({r['prune_events_effective']}) |"
      )
    lines += [
      '',
      f"DemP / dense: wall {rr['wall_ratio']:.3f}, steps only {rr['train_ratio']:.3f}. "
      f"DemP final widths: {', '.join(f'{k}={v}' for k, v in demp_r['widths'].items())}.",
    ]
  lines += [
    '',
    '## Parts and budget',
    '',
    '| part | status | seconds | expected [s] | note |',
    '|---|---|---|---|---|',
  ]
  for p in results['parts']:
    note = str(p.get('note', '')).replace('|', '/').replace('\n', ' ')
    lines.append(
      f"| {p['name']} | {p['status']} | {p['seconds']:.1f} | {p['estimate_s']:.0f} | {note} |"
    )
  lines += ['', *[f'Note: {n}' for n in results['notes']], f"Note: {results['bf16_cast']}"]
  return '\n'.join(lines)
