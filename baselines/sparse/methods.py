"""The trainer's methods ``magnitude``, ``saliency``, ``set``, ``rigl``, and their config.

Each is a :class:`demp.trainer.methods.Method`, registered on import, whose optimizer is the base optimizer
wrapped by the sparse updater; no host hook is needed (the masks live and
change inside the jitted step). Select one with ``config.method`` and set
``config.baselines`` (keys below; the structured baselines read other keys of
the same section)::

  python -m scripts.train --config configs/quickstart.py:method=rigl --workdir /tmp/rigl \
      --config.baselines.target_sparsity=0.9

The trainer's summary reports the weight sparsity over *all* parameters
(nonzeros, so masked zeros count); ``target_sparsity`` is over the pruned
weights (JaxPruner's convention), so the summary's number is a little lower
when the first/last layers, biases and normalization parameters stay dense.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import ml_collections
import optax

from baselines.sparse import algorithms, distributions, updater
from baselines.sparse import sparsity_schedules as schedules
from baselines.sparse import theoretical_flops as flops
from demp import data as data_lib
from demp import models
from demp.trainer import config as demp_config
from demp.trainer import methods, optim


def default_config() -> ml_collections.ConfigDict:
  """Every key of ``config.baselines`` the sparse methods read, with its default.

  Fields:
    target_sparsity: final sparsity of the pruned weights, in [0, 1).
    distribution: ``erk`` | ``uniform`` (across layers).
    schedule: ``''`` = the algorithm's own (``polynomial`` for magnitude and
      saliency, ``periodic`` for SET and RigL) | ``one_shot`` | ``periodic`` |
      ``polynomial``.
    update_every: steps between mask updates (the DemP authors: 500).
    start_fraction, end_fraction: masks change from ``start_fraction T`` to
      ``end_fraction T`` (the DemP authors: 0.3 and 0.8).
    drop_fraction: SET/RigL's drop fraction at the start of the window,
      decayed by a cosine to 0 at its end (0.3).
    prune_first_layer, prune_last_layer: prune those layers too (off).
    custom_sparsity: ``{path regex: sparsity}`` or ``'regex=s;regex=s'``,
      overriding the distribution for the weights it matches.
  """
  return ml_collections.ConfigDict(
    dict(
      target_sparsity=0.8,
      distribution='erk',
      schedule='',
      update_every=500,
      start_fraction=0.3,
      end_fraction=0.8,
      drop_fraction=0.3,
      prune_first_layer=False,
      prune_last_layer=False,
      custom_sparsity='',
    )
  )


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Defaults overridden by ``config.baselines``, validated (errors name the key)."""
  demp_config.check_section(config, 'baselines')
  given = config.get('baselines', None) or {}
  c = ml_collections.ConfigDict(
    {k: given.get(k, v) for k, v in default_config().items()}, type_safe=False
  )
  ts = c.target_sparsity
  if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not 0 <= ts < 1:
    raise ValueError(f'baselines.target_sparsity={ts!r} must be a number in [0, 1).')
  if c.distribution not in distributions.DISTRIBUTIONS:
    raise ValueError(
      f'baselines.distribution={c.distribution!r} is not one of '
      f'{sorted(distributions.DISTRIBUTIONS)}.'
    )
  if c.schedule and c.schedule not in schedules.SCHEDULES:
    raise ValueError(
      f'baselines.schedule={c.schedule!r} is not one of '
      f"{[''] + sorted(schedules.SCHEDULES)} ('' = the algorithm's default)."
    )
  if isinstance(c.update_every, bool) or not isinstance(c.update_every, int) or c.update_every < 1:
    raise ValueError(f'baselines.update_every={c.update_every!r} must be an int >= 1.')
  if not 0 <= c.start_fraction <= c.end_fraction <= 1:
    raise ValueError(
      f'baselines.start_fraction={c.start_fraction!r} and baselines.end_fraction='
      f'{c.end_fraction!r} must satisfy 0 <= start <= end <= 1.'
    )
  if not 0 <= c.drop_fraction <= 1:
    raise ValueError(f'baselines.drop_fraction={c.drop_fraction!r} must be in [0, 1].')
  c.custom_sparsity = tuple(parse_custom_sparsity(c.custom_sparsity).items())  # (regex, s) pairs
  return c


def parse_custom_sparsity(value) -> dict[str, float]:
  """``{regex: sparsity}`` from a mapping or from ``'regex=s;regex=s'``."""
  if isinstance(value, Mapping) or hasattr(value, 'items'):  # a dict or a ConfigDict
    return {str(k): float(v) for k, v in value.items()}
  if not value:
    return {}
  out = {}
  for item in str(value).split(';'):
    regex, sep, s = item.rpartition('=')
    try:
      out[regex] = float(s)
    except ValueError:
      sep = ''
    if not sep or not regex:
      raise ValueError(f"baselines.custom_sparsity={value!r}: {item!r} is not 'regex=sparsity'.")
  return out


def _model(config: ml_collections.ConfigDict):
  info = data_lib.get_info(config.data)
  return models.from_config(config.model, info.num_classes), tuple(info.image_shape)


def model_layers(config: ml_collections.ConfigDict) -> list[flops.LayerRecord]:
  """The config's model's kernel-owning layers, in call order, with their shapes."""
  model, image_shape = _model(config)
  return flops.layer_records(model, image_shape)


def flops_summary(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Theoretical FLOPs of ``config.method``'s run relative to dense (:func:`flops.flops_report`).

  ``{'dense_forward_flops', 'inference_flops_rel', 'training_flops_rel'}``,
  from the layers' shapes and the target sparsities alone (the masks reach
  them exactly, up to rounding); a dense method gives 1.0 for both ratios.
  """
  model, image_shape = _model(config)
  records = flops.layer_records(model, image_shape)
  if config.method not in algorithms.ALGORITHMS:
    dense = flops.forward_flops(records)
    return {'dense_forward_flops': dense, 'inference_flops_rel': 1.0, 'training_flops_rel': 1.0}
  u = make_updater(config.method, config, records)
  x = jax.numpy.zeros((1,) + image_shape, jax.numpy.float32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))['params']
  per_module = flops.module_sparsities(u.sparsity_distribution_fn(params))
  return flops.flops_report(
    records, per_module, config.method, u.scheduler, optim.num_updates(config)
  )


def make_updater(
  algorithm: str, config: ml_collections.ConfigDict, records: list[flops.LayerRecord] | None = None
) -> updater.SparseUpdater:
  """The sparse updater of ``config`` (``records`` default to :func:`model_layers`)."""
  c = resolve(config)
  records = model_layers(config) if records is None else records
  return updater.create_updater(
    algorithm,
    sparsity=float(c.target_sparsity),
    total_steps=optim.num_updates(config),
    distribution=c.distribution,
    schedule=c.schedule or None,
    update_freq=c.update_every,
    start_fraction=c.start_fraction,
    end_fraction=c.end_fraction,
    drop_fraction=c.drop_fraction,
    layer_order=flops.layer_order(records),
    prune_first_layer=c.prune_first_layer,
    prune_last_layer=c.prune_last_layer,
    custom_sparsity=dict(c.custom_sparsity),
    seed=config.seed + 2,
  )


def _optimizer(
  algorithm: str, config: ml_collections.ConfigDict, base: optax.GradientTransformation
) -> optax.GradientTransformation:
  return make_updater(algorithm, config).wrap_optax(base)


demp_config.register_section('baselines', default_config, resolve)
for _name in algorithms.ALGORITHMS:
  methods.register(_name, methods.Method(optimizer=functools.partial(_optimizer, _name)))
