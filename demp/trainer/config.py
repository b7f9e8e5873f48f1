"""The config schema (:func:`base_config`) and its one validation (:func:`validate_config`).

Every key the trainer reads is in :func:`base_config`, with its default;
config files (``configs/*.py``) override them. :func:`validate_config` checks
every value before any data is read or anything is compiled, and raises a
ValueError that names the key, the value and what is allowed; an unknown key
(at any depth, the model's keyword arguments and plug-in sections included)
is named with the closest valid one.

Plug-ins with their own section (the ``baselines`` package:
``config.baselines``) declare its keys with :func:`register_section`; a
section nobody registered is an unknown key.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import ml_collections
from ml_collections import config_dict

from demp import data as data_lib
from demp import deadunits, models, schedules, target, transforms, units
from demp.data import augment
from demp.trainer import compile_cache, methods, optim, parallel, steering


def base_config() -> ml_collections.ConfigDict:
  """Every key the trainer reads, with its default. Config files override these."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = 'demp'
  c.model = ml_collections.ConfigDict({'name': 'mlp'})  # plus the model's kwargs
  c.data = data_lib.default_data_config()
  c.batch_size = 128
  c.num_steps = 1000
  c.label_smoothing = 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # adam (coupled L2) | adamw (decoupled) | sgd (momentum)
  c.optimizer.learning_rate = 1e-3  # the peak / initial value of the schedule
  c.optimizer.lr_schedule = 'constant'  # a key of demp.schedules.SCHEDULES
  c.optimizer.lr_kwargs = ml_collections.ConfigDict()  # extra schedule arguments, in steps
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  c.optimizer.accumulate_steps = (
    1  # optax.MultiSteps: one update per k steps (schedules count updates)
  )

  c.demp = ml_collections.ConfigDict()
  c.demp.penalty = 'lasso'  # lasso | l2 (kinds of demp.transforms.add_scheduled_penalty)
  c.demp.penalty_mask = transforms.NORM_SCALES  # regex over param paths | 'groups' (own scales)
  c.demp.penalty_coupling = 'coupled'  # coupled (before the optimizer) | decoupled (after, ×lr)
  c.demp.penalty_weighting = 'none'  # none | params | flops: × a unit's cost / mean
  # Beyond the paper: κ·λ_t·Σ max(β, 0) on normalization offsets (coupled), turning units whose
  # scale went to 0 with a positive offset (constant) into dead ones; 0 = off.
  c.demp.offset_penalty = 0.0
  c.demp.peak_lambda = 5e-3  # peak of λ_t
  c.demp.noise_std = (
    transforms.AUTHORS_NOISE_STD
  )  # peak σ_t, a standard deviation (authors' code: 5e-5;
  # the paper's text prints 5e-5 as a variance: 7.07e-3)
  c.demp.noise_symmetric = False
  c.demp.noise_prng = 'threefry2x32'  # the noise key's PRNG: threefry2x32 | rbg | unsafe_rbg
  c.demp.noise_liveness = 'auto'  # auto (relu: gradient, else mask) | gradient | mask
  c.demp.schedule = 'one_cycle'  # shape of λ_t and σ_t: one_cycle | constant
  c.demp.warmup = 'cosine'  # one-cycle warm-up: cosine (reference code) | linear (paper text)
  c.demp.span = 1.0  # the one-cycle spans this fraction of the run
  c.demp.target_sparsity = 0.0  # > 0: a controller steers λ_t = shape × gain to it (demp.target)
  c.demp.target_kind = 'units'  # units | weights | flops (relative to the dense model)
  # What a target brings by default: 'reacting' (a check every num_steps // 48 steps, no
  # prediction, the cap) | 'predicting' (the first law: prune.every, a trajectory, a prediction).
  c.demp.target_recipe = 'reacting'
  c.demp.target_reach = 0.0  # fraction of the run by which to reach it; 0 = the recipe's
  c.demp.target_every = 0  # τ with a target; 0 = the recipe's (reacting: num_steps // 48)
  c.demp.target_law = (
    'trajectory'  # the measured sparsity vs the trajectory | 'in_flight' (experimental)
  )
  c.demp.target_noise = 'gain'  # the noise std follows the gain | keeps its own 'schedule'
  c.demp.target_cap = True  # a prune event never removes past the target (steering.cap_keeps)
  c.demp.target_revive = False  # the units the cap holds back are woken (surgery.revive)
  # The control law's constants (demp.target.ControllerParams; docs/target.md); None = the
  # recipe's.
  c.demp.target_control = ml_collections.ConfigDict(
    {k: config_dict.placeholder(float) for k in target.ControllerParams._fields}
  )

  c.prune = ml_collections.ConfigDict()
  c.prune.every = 1000  # τ: steps between death checks
  c.prune.at_end = True
  c.prune.num_examples = 512  # fixed training examples of the death check
  c.prune.batch_size = 128
  c.prune.criterion = ''  # '' = from model.activation; else a key of deadunits.CRITERIA
  c.prune.eps = 0.01
  c.prune.min_width = 1
  c.prune.multiple_of = 1
  c.prune.dynamic = True  # False: every check only logs; only the final check (at_end) removes
  c.prune.revival_patience = (
    0  # >0: a group starts pruning once its live count stopped rising (demp.trainer.revival)
  )
  c.prune.start_steps = (
    ml_collections.ConfigDict()
  )  # group -> step its pruning starts (overrides patience)
  c.prune.remove_constant = False  # also remove units constant on the check set, folded
  c.prune.constant_eps = 0.01  # constant: max - min <= this over the check set
  c.prune.on_collapse = 'warn'  # every unit of a group died: warn | stop (raise)
  # A prune event removes its units this fraction of τ later (at least one step), the step
  # for the new widths compiling in the background meanwhile and the units silenced (exact);
  # 0 = synchronous: prune, then compile. Deterministic: the same steps on every run and host.
  c.prune.switch_after = 0.1

  c.batch_augment = (
    augment.default_config()
  )  # RandAugment / mixup / cutmix in JAX (demp.data.augment)
  c.log_every = 50
  # Steps per dispatch with the split on the device (data.placement, demp.trainer.feed):
  # 0 = the largest k <= 50 dividing every step the loop stops at (logs, checks, saves).
  c.steps_per_dispatch = 0
  c.eval_every = 0  # 0 = only at the end
  c.eval_batch_size = 256
  c.progress_bar = True
  c.compilation_cache = 'workdir'  # workdir (<workdir>/jax_cache) | a directory | '' (off)

  c.checkpoint = (
    ml_collections.ConfigDict()
  )  # demp.trainer.checkpoint: <workdir>/checkpoints, resumed automatically
  c.checkpoint.every = 0  # save every N steps and at the end; 0 = only on SIGTERM
  c.checkpoint.final = True  # the final network (params, batch stats) into <workdir>/final
  c.checkpoint.keep = 3  # keep the last N checkpoints
  c.checkpoint.async_save = True  # write in a background thread while training goes on
  c.checkpoint.data_resume = (
    'skip'  # skip: exact (re-reads consumed records) | reseed: instant, not exact
  )
  return c


# ----------------------------------------------------------------------------
# Plug-in sections.


class _Section(NamedTuple):
  default_config: Callable[[], Mapping[str, Any]]
  check: Callable[[ml_collections.ConfigDict], Any] | None


_SECTIONS: dict[str, dict[str, _Section]] = {}


def register_section(
  name: str,
  default_config: Callable[[], Mapping[str, Any]],
  check: Callable[[ml_collections.ConfigDict], Any] | None = None,
) -> None:
  """Declares the keys a plug-in reads from ``config.<name>`` (several plug-ins may share one).

  ``default_config()`` returns them with their defaults; :func:`validate_config`
  refuses any other key under ``config.<name>`` and calls ``check(config)``
  (which raises ValueError naming a bad value) when the config has the section.
  """
  owner = f'{default_config.__module__}.{default_config.__qualname__}'
  _SECTIONS.setdefault(name, {})[owner] = _Section(default_config, check)


def section_keys(name: str) -> list[str]:
  """Every key registered for ``config.<name>``, sorted."""
  return sorted({k for s in _SECTIONS.get(name, {}).values() for k in s.default_config().keys()})


def check_section(config, name: str) -> None:
  """Raises ValueError on a key of ``config.<name>`` that no registered plug-in reads."""
  if name in config.keys():
    _check_unknown(config[name].keys(), section_keys(name), f'{name}.')


# ----------------------------------------------------------------------------
# Checks.

# Sub-configs whose keys are not in base_config: model kwargs (checked against the
# model's factory), schedule kwargs (against the schedule's), per-group steps.
FREE_KEYS = ('model', 'optimizer.lr_kwargs', 'prune.start_steps')


def closest(name: str, candidates: Iterable[str]) -> str:
  """``" (did you mean 'x'?)"`` for the candidate closest to ``name``, or ``''``."""
  match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1)
  return f" (did you mean '{match[0]}'?)" if match else ''


def _check_unknown(given: Iterable[str], known: Iterable[str], prefix: str = '') -> None:
  """Raises ValueError naming the unknown keys, each with the closest known one."""
  known = sorted(known)
  unknown = sorted(set(given) - set(known))
  if unknown:
    hints = [
      f'{prefix}{k}: did you mean {prefix}{m[0]}?'
      for k in unknown
      if (m := difflib.get_close_matches(k, known, n=1))
    ]
    hint = f' ({"; ".join(hints)})' if hints else ''
    raise ValueError(
      f'unknown config keys {[prefix + k for k in unknown]}{hint}; known: '
      f'{[prefix + k for k in known]}.'
    )


def _check_keys(config, base, prefix: str = '') -> None:
  """Raises on a key (at any depth) that :func:`base_config` (or a plug-in section) lacks."""
  sections = [k for k in _SECTIONS if not prefix]
  _check_unknown(config.keys(), list(base.keys()) + sections, prefix)
  for k, v in base.items():
    if isinstance(v, ml_collections.ConfigDict) and prefix + k not in FREE_KEYS and k in config:
      _check_keys(config[k], v, f'{prefix}{k}.')
  for name in sections:
    check_section(config, name)
    if name in config.keys():
      for section in _SECTIONS[name].values():
        if section.check is not None:
          section.check(config)


def _allowed(key: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(
      f'{key}={value!r} is not one of {sorted(allowed)}'
      f'{closest(value, allowed) if isinstance(value, str) else ""}.'
    )


def _number(key: str, value, *, low: float = 0.0, strict: bool = True) -> None:
  """A finite real number > low (or >= low when not ``strict``)."""
  ok = (
    isinstance(value, numbers.Real)
    and not isinstance(value, bool)
    and math.isfinite(value)
    and (value > low if strict else value >= low)
  )
  if not ok:
    raise ValueError(f'{key}={value!r} must be a finite number {">" if strict else ">="} {low}.')


def _positive(key: str, value, *, strict: bool = True) -> None:
  _number(key, value, strict=strict)


def _int(key: str, value, *, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f'{key}={value!r} must be an int >= {low}.')


def _get(config, dotted: str):
  for k in dotted.split('.'):
    config = config[k]
  return config


def check_model(model_config) -> None:
  """The model's name and keyword arguments (named ``model.<kw>``), before it is built."""
  _allowed('model.name', model_config.name, models.MODELS)
  factory = models.MODELS[model_config.name]
  params = inspect.signature(factory).parameters
  accepted = [
    p
    for p in params
    if p != 'num_classes'
    and params[p].kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  ]
  given = [k for k in model_config.keys() if k != 'name']
  unknown = sorted(set(given) - set(accepted))
  if unknown:
    k = unknown[0]
    raise ValueError(
      f'model.{k}={model_config[k]!r}: model {model_config.name!r} takes no '
      f'argument {k!r}{closest(k, accepted)}; its arguments: '
      f'{["model." + p for p in accepted]}.'
    )
  widths = model_config.get('widths', None)
  if widths is not None:
    values = widths.values() if hasattr(widths, 'values') else widths
    for i, w in enumerate(values):
      if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1:
        raise ValueError(
          f'model.widths={_plain(widths)!r}: width {i} is {w!r}; every width must be an int >= 1.'
        )
  if 'width_multiplier' in given:
    _number('model.width_multiplier', model_config.width_multiplier)


def _plain(x):
  return x.to_dict() if hasattr(x, 'to_dict') else list(x) if isinstance(x, tuple) else x


def check_lr_schedule(config) -> None:
  """``optimizer.lr_schedule`` and its ``lr_kwargs``: known names, finite values."""
  c = config.optimizer
  _allowed('optimizer.lr_schedule', c.lr_schedule, schedules.SCHEDULES)
  params = inspect.signature(schedules.SCHEDULES[c.lr_schedule]).parameters
  accepted = [p for p in params if p not in ('value', 'init_value', 'peak_value')]
  _check_unknown(c.lr_kwargs.keys(), accepted, 'optimizer.lr_kwargs.')
  for k, v in c.lr_kwargs.items():
    for x in v if isinstance(v, (list, tuple)) else [v]:
      if isinstance(x, numbers.Real) and not isinstance(x, bool) and not math.isfinite(x):
        raise ValueError(f'optimizer.lr_kwargs.{k}={v!r} must be finite.')
  try:
    optim.learning_rate_schedule(config)  # builds the schedule (no compute): checks the ranges
  except (TypeError, ValueError) as e:
    raise ValueError(
      f'optimizer.lr_schedule={c.lr_schedule!r} with optimizer.lr_kwargs='
      f'{c.lr_kwargs.to_dict()}: {e}'
    ) from e


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Rejects a config that cannot work before any compute (errors name the key).

  Every key (at any depth) must be one of :func:`base_config`'s, a model
  argument or a registered plug-in section's; every value is checked. Data
  sizes (``batch_size`` against the training set) are checked by
  :func:`check_data` once the dataset's metadata is known.
  """
  _check_keys(config, base_config())
  _allowed('method', config.method, methods.names())
  check_model(config.model)
  _allowed('data.source', config.data.source, data_lib.SOURCES)
  _allowed('optimizer.name', config.optimizer.name, optim.OPTIMIZERS)
  _allowed('demp.penalty', config.demp.penalty, ('lasso', 'l2'))
  kappa = config.demp.offset_penalty
  if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or kappa < 0:
    raise ValueError(f'demp.offset_penalty={kappa!r} must be a number >= 0 (0 = off).')
  if kappa and config.demp.target_sparsity:
    raise ValueError(
      f'demp.offset_penalty={kappa!r} with demp.target_sparsity='
      f'{config.demp.target_sparsity!r}: the offset penalty follows the fixed λ_t schedule only; '
      'set one of them to 0.'
    )
  _allowed('demp.schedule', config.demp.schedule, optim.DEMP_SCHEDULES)
  _allowed('demp.warmup', config.demp.warmup, optim.DEMP_WARMUPS)
  _allowed('demp.penalty_coupling', config.demp.penalty_coupling, transforms.PENALTY_COUPLINGS)
  _allowed('demp.penalty_weighting', config.demp.penalty_weighting, units.WEIGHTINGS)
  _allowed('prune.on_collapse', config.prune.on_collapse, deadunits.ON_COLLAPSE)
  _allowed('demp.noise_prng', config.demp.noise_prng, transforms.NOISE_PRNGS)
  _allowed('demp.noise_liveness', config.demp.noise_liveness, ('auto',) + transforms.LIVENESS_MODES)
  if config.prune.criterion:
    _allowed('prune.criterion', config.prune.criterion, deadunits.CRITERIA)
  for key in (
    'num_steps',
    'batch_size',
    'prune.every',
    'prune.num_examples',
    'prune.batch_size',
    'prune.min_width',
    'prune.multiple_of',
    'log_every',
    'eval_batch_size',
    'optimizer.accumulate_steps',
  ):
    _positive(key, _get(config, key))
  spd = config.steps_per_dispatch
  if isinstance(spd, bool) or not isinstance(spd, int) or spd < 0:
    raise ValueError(f'steps_per_dispatch={spd!r} must be an int >= 0 (0 = auto).')
  for key in (
    'demp.peak_lambda',
    'demp.noise_std',
    'optimizer.learning_rate',
    'optimizer.weight_decay',
    'label_smoothing',
    'eval_every',
    'prune.eps',
    'optimizer.grad_clip_norm',
    'prune.revival_patience',
    'optimizer.momentum',
    'optimizer.eps',
    'prune.constant_eps',
  ):
    _positive(key, _get(config, key), strict=False)
  if not 0 <= config.prune.switch_after < 1:
    raise ValueError(
      f'prune.switch_after={config.prune.switch_after!r}: allowed is a fraction of '
      f'prune.every in [0, 1) (0 = synchronous).'
    )
  for group, step in config.prune.start_steps.items():
    _positive(f'prune.start_steps.{group}', step, strict=False)
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'label_smoothing={config.label_smoothing!r} must be in [0, 1).')
  check_lr_schedule(config)
  augment.validate(config.batch_augment, normalize=config.data.normalize)
  steering.validate(config)
  if not 0 < config.demp.span <= 1:
    raise ValueError(f'demp.span={config.demp.span!r} must be in (0, 1].')
  if (
    methods.get(config.method).when is methods.prune_steps and config.prune.every > config.num_steps
  ):
    raise ValueError(
      f'prune.every={config.prune.every} (τ) is larger than num_steps={config.num_steps}: '
      f'no death check would run during training. Use prune.every <= num_steps '
      f'(prune.every=num_steps checks once, at the end).'
    )
  _check_checkpoint_config(config.checkpoint)
  compile_cache.check(config.compilation_cache)
  parallel.check_batch_size('batch_size', config.batch_size)


def check_data(config, info) -> None:
  """Checks the config against the dataset's metadata (``demp.data.get_info``), before reading it."""
  if config.batch_size > info.num_train:
    raise ValueError(
      f'batch_size={config.batch_size} is larger than the training set '
      f'({info.num_train} examples in {config.data.source}:{config.data.name}); '
      f'use batch_size <= {info.num_train}.'
    )


def _check_checkpoint_config(c) -> None:
  for key, low in (('every', 0), ('keep', 1)):
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
      raise ValueError(f'checkpoint.{key}={v!r} must be an int >= {low}.')
  _allowed('checkpoint.data_resume', c.data_resume, ('skip', 'reseed'))
  if not isinstance(c.final, bool):
    raise ValueError(f'checkpoint.final={c.final!r} must be True or False.')
