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


def parse_widths(text: str) -> list[int] | dict[str, int]:
  """``'32,64,128'`` -> ``[32, 64, 128]``; ``'conv_0=32,conv_1=64'`` -> a mapping.

  The string form of ``model.widths`` (brackets and spaces are ignored), for
  config files and command lines that cannot hold a list.
  """
  items = [t for t in text.strip().strip('[]()').replace(' ', '').split(',') if t]
  try:
    if items and all('=' in t for t in items):
      return {k: int(v) for k, v in (t.split('=', 1) for t in items)}
    return [int(t) for t in items]
  except ValueError:
    raise ValueError(
      f'model.widths={text!r}: expected integers separated by commas '
      f"('32,64,128') or group=width pairs ('hidden_0=32,hidden_1=64')."
    ) from None


def frozen_widths(names: list[str], widths) -> flax.core.FrozenDict:
  """Widths as a hashable mapping, from a list (in ``names`` order), a mapping or a string.

  A string is parsed by :func:`parse_widths` (``'32,64'``).
  """
  if isinstance(widths, str):
    widths = parse_widths(widths)
  if hasattr(widths, 'to_dict'):  # an ml_collections.ConfigDict
    widths = widths.to_dict()
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
    return x_bhwc.reshape((x_bhwc.shape[0], -1))  # (h, w, c): channels innermost
  raise ValueError(f'model.head={head!r} is not one of {HEADS}.')
