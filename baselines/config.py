"""``config.baselines``: the settings of the structured baselines and NEq.

``default_config()`` lists every key this package reads, with its default;
``resolve(config)`` returns them overridden by ``config.baselines`` and
validated, raising a ValueError that names the key. The section is shared with
the unstructured baselines (``baselines.sparse.methods``); both register their
keys with :func:`demp.trainer.config.register_section`, so a key neither reads (a
typo) is an error naming the closest valid key, in ``validate_config`` and here.
"""

from __future__ import annotations

import functools
import json

import ml_collections

from demp import data as data_lib
from demp.trainer import config as demp_config

TARGET_KINDS = ('units', 'weights')


def default_config() -> ml_collections.ConfigDict:
  """Every key of ``config.baselines`` read here, with its default.

  Fields:
    target_sparsity: ρ, the final sparsity of SNAP / CroP-S and their early
      variants, relative to the dense model.
    target_kind: 'units' (ρ = fraction of prunable units removed) or 'weights'
      (ρ = fraction of parameters removed; units are removed in score order
      until the parameter count reaches (1 - ρ) of the dense model's).
    score_batches: training batches whose summed loss the scores use (5).
    score_batch_size: examples per scoring batch; 0 = ``config.batch_size``.
    steps_per_epoch: 0 = ``num_train // config.batch_size``.
    fallback_epoch: the early variants prune at this epoch if the weight-distance
      trigger never fired (Rachwan et al.: 100); 0 = half the run's epochs.
    eps: NEq's ε: a unit whose |velocity| < ε is frozen for the next epoch.
    mu_eq: NEq's velocity momentum μ_eq.
    holdout_fraction: NEq's slice of the training set, as a fraction of it.
    stochastic_fraction: fraction of each group's units frozen at random each
      epoch by ``neq_stochastic``.
  """
  return ml_collections.ConfigDict(
    dict(
      target_sparsity=0.5,
      target_kind='units',
      score_batches=5,
      score_batch_size=0,
      steps_per_epoch=0,
      fallback_epoch=100,
      eps=1e-3,
      mu_eq=0.5,
      holdout_fraction=0.01,
      stochastic_fraction=0.2,
    )
  )


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Defaults overridden by ``config.baselines``, validated (errors name the key)."""
  c = check(config)
  if not c.score_batch_size:
    c.score_batch_size = config.batch_size
  c.steps_per_epoch = steps_per_epoch(config)
  if not c.fallback_epoch:
    c.fallback_epoch = max(1, config.num_steps // c.steps_per_epoch // 2)
  return c


def check(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.baselines``' keys read here, validated without reading data (0s not yet derived)."""
  demp_config.check_section(config, 'baselines')
  c = default_config()
  given = config.baselines if 'baselines' in config.keys() else {}
  for key in c.keys():
    if key in given:
      try:
        c[key] = given[key]
      except TypeError as e:
        raise ValueError(f'baselines.{key}={given[key]!r} has the wrong type: {e}') from e
  if c.target_kind not in TARGET_KINDS:
    raise ValueError(f'baselines.target_kind={c.target_kind!r} is not one of {list(TARGET_KINDS)}.')
  if not 0 <= c.target_sparsity < 1:
    raise ValueError(f'baselines.target_sparsity={c.target_sparsity!r} must be in [0, 1).')
  if not isinstance(c.score_batches, int) or c.score_batches < 1:
    raise ValueError(f'baselines.score_batches={c.score_batches!r} must be an int >= 1.')
  for key in ('score_batch_size', 'steps_per_epoch', 'fallback_epoch'):
    if not isinstance(c[key], int) or c[key] < 0:
      raise ValueError(f'baselines.{key}={c[key]!r} must be an int >= 0 (0 = derived).')
  if not c.eps >= 0:
    raise ValueError(f'baselines.eps={c.eps!r} must be >= 0.')
  if not 0 <= c.mu_eq < 1:
    raise ValueError(f'baselines.mu_eq={c.mu_eq!r} must be in [0, 1).')
  if not 0 < c.holdout_fraction <= 1:
    raise ValueError(f'baselines.holdout_fraction={c.holdout_fraction!r} must be in (0, 1].')
  if not 0 <= c.stochastic_fraction < 1:
    raise ValueError(f'baselines.stochastic_fraction={c.stochastic_fraction!r} must be in [0, 1).')
  return c


demp_config.register_section('baselines', default_config, check)


def steps_per_epoch(config: ml_collections.ConfigDict) -> int:
  """``baselines.steps_per_epoch``, or ``num_train // batch_size`` when it is 0.

  Cheap (it runs in ``Method.when``, i.e. after every step): no ConfigDict is
  built and the dataset size is looked up once per data config.
  """
  given = config.baselines.get('steps_per_epoch', 0) if 'baselines' in config.keys() else 0
  if given:
    return int(given)
  return max(1, _num_train(config.data.to_json()) // config.batch_size)


@functools.lru_cache(maxsize=16)
def _num_train(data_json: str) -> int:
  return data_lib.get_info(json.loads(data_json)).num_train


def epoch_end(config: ml_collections.ConfigDict, step: int) -> bool:
  """Whether ``step`` (after its update) ends an epoch."""
  return step > 0 and step % steps_per_epoch(config) == 0
