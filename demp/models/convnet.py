"""A small BN ConvNet: [conv -> BN -> activation -> (max-pool)] x n -> pool/flatten -> dense.

Unit groups: ``conv_i``, the channels of the i-th conv layer. With
``head='flatten'`` the last group's consumer is the dense head's input axis,
which holds every spatial position times the channels (channels innermost):
the surgery tiles the keep-mask over the positions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from demp.deadunits import probe
from demp.models import common
from demp.protocol import UnitGroup, param_slices

HEADS = common.HEADS


class ConvNet(nn.Module):
  widths: Mapping[str, int]  # {'conv_0': 32, 'conv_1': 64, ...}
  num_classes: int
  activation: str = 'relu'
  pool: bool = True  # 2x2 max-pool after every conv block
  head: str = 'global'  # 'global' average pool or 'flatten'
  norm: bool = True

  @property
  def names(self) -> list[str]:
    return [f'conv_{i}' for i in range(len(self.widths))]

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    act = common.activation(self.activation)
    for i, name in enumerate(self.names):
      x_bhwc = nn.Conv(self.widths[name], (3, 3), use_bias=not self.norm, name=f'conv_{i}')(x_bhwc)
      if self.norm:
        x_bhwc = common.batch_norm(train, f'norm_{i}')(x_bhwc)
      x_bhwc = probe(self, f'{name}_act', act(x_bhwc))
      if self.pool:
        x_bhwc = nn.max_pool(x_bhwc, (2, 2), strides=(2, 2))
    x_bd = common.head_features(x_bhwc, self.head)
    return nn.Dense(self.num_classes, name='head')(x_bd)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    groups = []
    for i, name in enumerate(self.names):
      last = i + 1 == len(self.names)
      consumer = (
        param_slices('head', in_axis=0) if last else param_slices(f'conv_{i + 1}', in_axis=2)
      )
      groups.append(
        UnitGroup(
          name=name,
          sites=((f'{name}_act',),),
          producers=param_slices(
            f'conv_{i}', bias=not self.norm, norm=f'norm_{i}' if self.norm else None
          ),
          consumers=consumer,
        )
      )
    return tuple(groups)


def make(
  num_classes: int,
  widths: Sequence[int] = (32, 64, 128, 256),
  activation: str = 'relu',
  pool: bool = True,
  head: str = 'global',
  norm: bool = True,
) -> ConvNet:
  if head not in HEADS:
    raise ValueError(f'model.head={head!r} is not one of {HEADS}.')
  widths = common.parse_widths(widths) if isinstance(widths, str) else widths  # '32,64'
  names = [f'conv_{i}' for i in range(len(widths))]
  return ConvNet(
    widths=common.frozen_widths(names, widths),
    num_classes=num_classes,
    activation=activation,
    pool=pool,
    head=head,
    norm=norm,
  )
