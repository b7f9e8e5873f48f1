"""A multi-layer perceptron: Dense -> (BatchNorm) -> activation, then a linear head.

Unit groups: ``hidden_i``, the outputs of the i-th hidden layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax

from demp.deadunits import probe
from demp.models import common
from demp.protocol import UnitGroup, param_slices


class MLP(nn.Module):
  widths: Mapping[str, int]  # {'hidden_0': 256, 'hidden_1': 128}
  num_classes: int
  activation: str = 'relu'
  norm: bool = True  # BatchNorm after each hidden Dense (DemP penalises its scale)

  @property
  def names(self) -> list[str]:
    return [f'hidden_{i}' for i in range(len(self.widths))]

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    act = common.activation(self.activation)
    x_bd = x_bhwc.reshape((x_bhwc.shape[0], -1))
    for i, name in enumerate(self.names):
      x_bd = nn.Dense(self.widths[name], use_bias=not self.norm, name=f'dense_{i}')(x_bd)
      if self.norm:
        x_bd = common.batch_norm(train, f'norm_{i}')(x_bd)
      x_bd = probe(self, name, act(x_bd))
    return nn.Dense(self.num_classes, name='head')(x_bd)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    groups = []
    for i, name in enumerate(self.names):
      consumer = f'dense_{i + 1}' if i + 1 < len(self.names) else 'head'
      groups.append(
        UnitGroup(
          name=name,
          sites=((name,),),
          producers=param_slices(
            f'dense_{i}', bias=not self.norm, norm=f'norm_{i}' if self.norm else None
          ),
          consumers=param_slices(consumer, in_axis=0),
        )
      )
    return tuple(groups)


def make(
  num_classes: int, widths: Sequence[int] = (256, 256), activation: str = 'relu', norm: bool = True
) -> MLP:
  widths = common.parse_widths(widths) if isinstance(widths, str) else widths  # '32,64'
  names = [f'hidden_{i}' for i in range(len(widths))]
  return MLP(
    widths=common.frozen_widths(names, widths),
    num_classes=num_classes,
    activation=activation,
    norm=norm,
  )
