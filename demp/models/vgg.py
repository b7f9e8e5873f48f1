"""VGG-16 with batch norm (Simonyan & Zisserman, 2015), widths per unit group.

Thirteen 3x3 convs ``64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M, 512 x3, M``
(``M``: 2x2 max-pool, stride 2), each conv -> BN -> activation, convs without
bias (BN follows each). The head is one ``Dense(num_classes)`` on the
**flattened** last feature map (``head='flatten'``, the default): at 64x64
inputs (the paper's CIFAR-10 recipe) the map after five pools is 2x2x512, so
the head reads 2048 features; at 32x32 it is 1x1x512. ``head='global'``
averages the map instead (input-size independent).

Unit groups: ``conv_0`` ... ``conv_12``, the channels of each conv. The last
group's consumer is the head's input axis; with ``head='flatten'`` it holds
every position times the channels (channels innermost) and the surgery tiles
the keep-mask over the positions.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax

from demp.deadunits import probe
from demp.models import common
from demp.protocol import UnitGroup, param_slices

# Conv widths; 'M' marks a 2x2 max-pool.
VGG16: tuple[int | str, ...] = (
  64,
  64,
  'M',
  128,
  128,
  'M',
  256,
  256,
  256,
  'M',
  512,
  512,
  512,
  'M',
  512,
  512,
  512,
  'M',
)
HEADS = common.HEADS
NUM_CONVS = sum(1 for v in VGG16 if v != 'M')


class VGG(nn.Module):
  widths: Mapping[str, int]  # {'conv_0': 64, ..., 'conv_12': 512}
  num_classes: int
  activation: str = 'relu'
  head: str = 'flatten'

  @property
  def names(self) -> list[str]:
    return [f'conv_{i}' for i in range(NUM_CONVS)]

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    act = common.activation(self.activation)
    i = 0
    for v in VGG16:
      if v == 'M':
        if x_bhwc.shape[1] < 2 or x_bhwc.shape[2] < 2:
          raise ValueError(
            f'VGG-16 pools five times; an input of {x_bhwc.shape[1:3]} at this '
            'depth is too small (use images of at least 32x32).'
          )
        x_bhwc = nn.max_pool(x_bhwc, (2, 2), strides=(2, 2))
        continue
      name = f'conv_{i}'
      x_bhwc = nn.Conv(self.widths[name], (3, 3), padding='SAME', use_bias=False, name=name)(x_bhwc)
      x_bhwc = common.batch_norm(train, f'norm_{i}')(x_bhwc)
      x_bhwc = probe(self, f'{name}_act', act(x_bhwc))
      i += 1
    x_bd = common.head_features(x_bhwc, self.head)
    return nn.Dense(self.num_classes, name='head')(x_bd)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    groups = []
    for i, name in enumerate(self.names):
      last = i + 1 == NUM_CONVS
      groups.append(
        UnitGroup(
          name=name,
          sites=((f'{name}_act',),),
          producers=param_slices(name, norm=f'norm_{i}'),
          consumers=param_slices('head', in_axis=0)
          if last
          else param_slices(f'conv_{i + 1}', in_axis=2),
        )
      )
    return tuple(groups)


def default_widths(width_multiplier: float = 1.0) -> dict[str, int]:
  widths = [max(1, int(round(v * width_multiplier))) for v in VGG16 if v != 'M']
  return {f'conv_{i}': w for i, w in enumerate(widths)}


def make(
  num_classes: int,
  width_multiplier: float = 1.0,
  widths: Mapping[str, int] | None = None,
  activation: str = 'relu',
  head: str = 'flatten',
) -> VGG:
  """VGG-16-BN. ``widths`` (group -> width, or a list of 13) overrides ``width_multiplier``."""
  if head not in HEADS:
    raise ValueError(f'model.head={head!r} is not one of {HEADS}.')
  if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
    raise ValueError(f'model.width_multiplier={width_multiplier!r} must be a number > 0.')
  common.activation(activation)
  names = [f'conv_{i}' for i in range(NUM_CONVS)]
  if widths is None:
    widths = default_widths(width_multiplier)
  elif hasattr(widths, 'to_dict'):
    widths = widths.to_dict()
  return VGG(
    widths=common.frozen_widths(names, widths),
    num_classes=num_classes,
    activation=activation,
    head=head,
  )
