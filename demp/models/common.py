"""Pieces every model shares: activations by name and the BN layer."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import flax
import flax.linen as nn
import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': nn.relu,
    'leaky_relu': functools.partial(nn.leaky_relu, negative_slope=0.05),
    'gelu': nn.gelu,
    'swish': nn.swish,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'model.activation={name!r} is not one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


def frozen_widths(names: list[str], widths) -> flax.core.FrozenDict:
  """Widths as a hashable mapping, from a list (in ``names`` order) or a mapping."""
  if isinstance(widths, Mapping):
    missing = set(names) - set(widths)
    if missing:
      raise ValueError(f'model.widths lacks groups {sorted(missing)}.')
    widths = [widths[n] for n in names]
  widths = [int(w) for w in widths]
  if len(widths) != len(names) or min(widths, default=1) < 1:
    raise ValueError(f'model.widths={widths} must give {len(names)} positive widths.')
  return flax.core.FrozenDict(zip(names, widths))


HEADS = ('global', 'flatten')


def head_features(x_bhwc: jax.Array, head: str) -> jax.Array:
  """The classifier's input: global average pool, or flatten with channels innermost."""
  if head == 'global':
    return x_bhwc.mean(axis=(1, 2))
  if head == 'flatten':
    return x_bhwc.reshape((x_bhwc.shape[0], -1))   # (h, w, c): channels innermost
  raise ValueError(f'model.head={head!r} is not one of {HEADS}.')
