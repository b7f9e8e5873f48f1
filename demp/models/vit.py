"""Vision Transformer (Dosovitskiy et al., 2021) with prunable MLP blocks.

Patch embedding (a strided conv), a class token, learned position
embeddings, pre-norm encoder blocks::

    x = x + MHSA(LayerNorm(x))
    x = x + fc2(act(fc1(LayerNorm(x))))      # act: gelu (default) or relu

a final LayerNorm and a linear head on the class token.

Unit groups: ``mlp_{i}``, the hidden units of block ``i``'s MLP: ``fc1``'s
output columns and bias (producers) and ``fc2``'s input rows (consumer). The
site is the MLP's post-activation ``[B, tokens, units]``, so a unit is dead
only when it is inactive on every example *and* every token. Attention and the
residual width are not pruned (the paper's §4.3 and its stated limitation).

Sizes by name (``variant='B/16'``: width, depth, heads, MLP width of the
``B`` family and patch 16), or explicit dims for small custom models::

    model = make(num_classes=10, hidden_dim=192, depth=4, num_heads=3,
                 mlp_dim=384, patch_size=4)                     # CIFAR-size
    model = make(num_classes=1000, variant='B/16')             # 86,567,656 params
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from demp.deadunits import probe
from demp.models import common
from demp.protocol import Slice, UnitGroup

ACTIVATIONS = ('gelu', 'relu')


class Size(NamedTuple):
  """Width of the residual stream, number of blocks, heads, MLP hidden width."""

  hidden_dim: int
  depth: int
  num_heads: int
  mlp_dim: int


# The ViT families of Dosovitskiy et al. (2021) and Touvron et al. (2021, Ti/S).
SIZES: dict[str, Size] = {
  'Ti': Size(192, 12, 3, 768),
  'S': Size(384, 12, 6, 1536),
  'B': Size(768, 12, 12, 3072),
  'L': Size(1024, 24, 16, 4096),
}

_VARIANT = re.compile(r'^(?P<size>[A-Za-z]+)/(?P<patch>\d+)$')


def parse_variant(variant: str) -> tuple[Size, int]:
  """``'B/16'`` -> (``SIZES['B']``, 16)."""
  m = _VARIANT.match(variant)
  if m is None or m['size'] not in SIZES:
    raise ValueError(
      f'model.variant={variant!r} is not <size>/<patch> with size one of '
      f'{sorted(SIZES)} (e.g. "B/16").'
    )
  return SIZES[m['size']], int(m['patch'])


class MlpBlock(nn.Module):
  """fc1 -> activation (probed as ``act``) -> fc2."""

  mlp_dim: int
  activation: str = 'gelu'

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    dim = x_btd.shape[-1]
    init = dict(
      kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(stddev=1e-6)
    )
    h_btu = nn.Dense(self.mlp_dim, name='fc1', **init)(x_btd)
    h_btu = probe(self, 'act', common.activation(self.activation)(h_btu))
    return nn.Dense(dim, name='fc2', **init)(h_btu)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: LN -> MHSA -> residual; LN -> MLP -> residual."""

  mlp_dim: int
  num_heads: int
  activation: str = 'gelu'

  @nn.compact
  def __call__(self, x_btd: jax.Array) -> jax.Array:
    y_btd = nn.LayerNorm(name='norm_attn')(x_btd)
    y_btd = nn.MultiHeadDotProductAttention(
      num_heads=self.num_heads,
      kernel_init=nn.initializers.xavier_uniform(),
      deterministic=True,
      name='attn',
    )(y_btd, y_btd)
    x_btd = x_btd + y_btd
    y_btd = nn.LayerNorm(name='norm_mlp')(x_btd)
    return x_btd + MlpBlock(self.mlp_dim, self.activation, name='mlp')(y_btd)


class ViT(nn.Module):
  """ViT classifier whose MLP widths (one per block) are the prunable spec."""

  widths: Mapping[str, int]  # {'mlp_0': 3072, ..., 'mlp_11': 3072}
  num_classes: int
  patch_size: int = 16
  hidden_dim: int = 768
  num_heads: int = 12
  activation: str = 'gelu'

  @property
  def names(self) -> list[str]:
    return [f'mlp_{i}' for i in range(len(self.widths))]

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    del train  # no dropout, no batch statistics
    p = self.patch_size
    x_bhwd = nn.Conv(self.hidden_dim, (p, p), strides=(p, p), padding='VALID', name='embedding')(
      x_bhwc
    )
    b, h, w, d = x_bhwd.shape
    x_btd = x_bhwd.reshape((b, h * w, d))
    cls_11d = self.param('cls', nn.initializers.zeros, (1, 1, d), x_btd.dtype)
    x_btd = jnp.concatenate([jnp.broadcast_to(cls_11d, (b, 1, d)), x_btd], axis=1)
    pos_1td = self.param(
      'pos_embedding', nn.initializers.normal(stddev=0.02), (1, h * w + 1, d), x_btd.dtype
    )
    x_btd = x_btd + pos_1td
    for i, name in enumerate(self.names):
      x_btd = EncoderBlock(self.widths[name], self.num_heads, self.activation, name=f'block_{i}')(
        x_btd
      )
    x_bd = nn.LayerNorm(name='norm')(x_btd)[:, 0]
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name='head')(x_bd)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    return tuple(
      UnitGroup(
        name=name,
        sites=((f'block_{i}', 'mlp', 'act'),),
        producers=(
          Slice((f'block_{i}', 'mlp', 'fc1', 'kernel'), -1),
          Slice((f'block_{i}', 'mlp', 'fc1', 'bias'), 0),
        ),
        consumers=(Slice((f'block_{i}', 'mlp', 'fc2', 'kernel'), 0),),
      )
      for i, name in enumerate(self.names)
    )


def make(
  num_classes: int,
  variant: str | None = None,
  *,
  hidden_dim: int | None = None,
  depth: int | None = None,
  num_heads: int | None = None,
  mlp_dim: int | None = None,
  patch_size: int | None = None,
  widths: Sequence[int] | Mapping[str, int] | None = None,
  activation: str = 'gelu',
) -> ViT:
  """Builds a ViT by variant name (``'Ti/16'``, ``'S/16'``, ``'B/16'``) or explicit dims.

  Explicit dims override the variant's; ``widths`` (one MLP width per block,
  e.g. a pruned spec) overrides ``depth`` x ``mlp_dim``.
  """
  size, patch = parse_variant(variant) if variant else (None, None)
  given = dict(hidden_dim=hidden_dim, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim)
  dims = {k: v if v is not None else (getattr(size, k) if size else None) for k, v in given.items()}
  patch = patch_size if patch_size is not None else patch
  if widths is None:
    missing = [k for k in ('depth', 'mlp_dim') if dims[k] is None]
  else:
    missing = []
    depth_w = len(widths)
    if dims['depth'] is not None and dims['depth'] != depth_w:
      raise ValueError(f'model.widths has {depth_w} entries but model.depth={dims["depth"]}.')
    dims['depth'] = depth_w
  missing += [k for k in ('hidden_dim', 'num_heads') if dims[k] is None]
  if patch is None:
    missing.append('patch_size')
  if missing:
    raise ValueError(f'model: give a variant (e.g. "B/16") or every one of {sorted(missing)}.')
  if activation not in ACTIVATIONS:
    raise ValueError(f'model.activation={activation!r} is not one of {ACTIVATIONS}.')
  if dims['hidden_dim'] % dims['num_heads']:
    raise ValueError(
      f'model.hidden_dim={dims["hidden_dim"]} is not a multiple of '
      f'model.num_heads={dims["num_heads"]}.'
    )
  names = [f'mlp_{i}' for i in range(dims['depth'])]
  if widths is None:
    widths = [dims['mlp_dim']] * dims['depth']
  return ViT(
    widths=common.frozen_widths(names, widths),
    num_classes=num_classes,
    patch_size=int(patch),
    hidden_dim=dims['hidden_dim'],
    num_heads=dims['num_heads'],
    activation=activation,
  )
