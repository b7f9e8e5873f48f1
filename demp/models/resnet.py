"""ResNets (He et al., 2016) whose channels are unit groups, residual streams included.

One class, :class:`ResNet`, covers ResNet-18 (basic blocks, ``[2, 2, 2, 2]``)
and ResNet-50 (bottleneck blocks with expansion 4, ``[3, 4, 6, 3]``), with the
CIFAR stem (3x3 conv, stride 1, no max-pool) or the ImageNet stem (7x7 conv,
stride 2, then a 3x3 max-pool with stride 2). Convolutions have no bias (BN
follows each); every BN is named ``*bn*`` so DemP's penalty finds its scale.
The stride of a bottleneck sits on its 3x3 conv (torchvision's "v1.5").

Unit groups (``widths`` holds one entry per group; a pruned model is the same
class built from smaller widths):

* ``stage{s}_block{b}_conv1`` (basic and bottleneck) and
  ``stage{s}_block{b}_conv2`` (bottleneck): block-internal channels, each an
  independent group. Producer: that conv and its BN; consumer: the next conv
  of the block; site: the block's ``act1`` / ``act2``.
* ``stage{s}_stream``: the residual-stream channels of stage ``s``, one
  coupled group. Producers: the last conv + BN of every block of the stage,
  the projection shortcut conv + BN of its first block (if any) and, when the
  first stage's shortcut is the identity (ResNet-18), the stem conv + BN.
  Consumers: ``conv1`` of every later block of the stage (and of the first
  block when the stem feeds it through the identity), ``conv1`` and the
  projection conv of the next stage's first block, or the head. Sites: every
  block output of the stage (after add + activation) and the stem output
  where it feeds the stream. A channel goes only where it is dead at every
  site, i.e. where every tensor that carries it is zero.
* ``stem`` (only when the first block has a projection shortcut, i.e.
  ResNet-50): the stem's channels, an independent group.

``prune_stream`` chooses how the residual stream is pruned (:data:`STREAM_MODES`):

* ``'stage'`` (or ``True``, the default): the coupled ``stage{s}_stream``
  groups above.
* ``'off'`` (or ``False``): the stream groups are not returned by
  :meth:`ResNet.unit_groups`, so they keep their full width while the
  block-internal channels are pruned.
* ``'site'``: every post-addition activation of the stream is a group of its
  own, as in the authors' code. Groups ``stem`` (the stem's output) and
  ``stage{s}_block{b}_out`` (a block's output) replace the stream groups; the
  widths of a stage's blocks may differ. Producer: the block's last conv + BN
  and its shortcut (the projection conv + BN, or the output side of a selected
  identity); consumers: the next block's ``conv1`` and shortcut (its
  projection conv, or the input side of its selected identity), or the head;
  site: the block's ``out`` (or ``stem_act``). An identity shortcut becomes a
  *selected identity* (:func:`select_channels`): output channel ``o`` carries
  the input channel with the same stream id, or zero where the input no longer
  has it. The ids are two vectors of non-trainable state in ``batch_stats``
  (``shortcut_in``, ``shortcut_out``, the dense stream's channel index + 1),
  sliced by the surgery like any other leaf, so ``model.clone(widths=...)``
  plus the sliced variables is the pruned network and no weight is added.

Which first blocks have a projection shortcut is structural (every stage but
the first; and the first too for bottlenecks), never inferred from widths, so
a pruned model keeps exactly the dense model's topology.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from demp.deadunits import probe
from demp.models import common
from demp.protocol import Slice, UnitGroup

Path = tuple[str, ...]

BLOCKS = ('basic', 'bottleneck')
STEMS = ('cifar', 'imagenet')
# Block kind -> (its internal convs, i.e. those whose channels are a group of their own).
INTERNAL_CONVS: dict[str, tuple[str, ...]] = {'basic': ('conv1',), 'bottleneck': ('conv1', 'conv2')}
LAST_CONV: dict[str, str] = {'basic': 'conv2', 'bottleneck': 'conv3'}
EXPANSION: dict[str, int] = {'basic': 1, 'bottleneck': 4}
STAGE_SIZES: dict[str, tuple[int, ...]] = {'resnet18': (2, 2, 2, 2), 'resnet50': (3, 4, 6, 3)}
BASE_WIDTHS = (64, 128, 256, 512)  # per stage: block-internal width (basic: also the stream)
STREAM_MODES = ('stage', 'off', 'site')
"""``model.prune_stream``: one coupled group per stage, streams kept, or one group per site."""
_STREAM_ALIASES = {True: 'stage', False: 'off', 'true': 'stage', 'false': 'off'}


def stream_mode(value) -> str:
  """``model.prune_stream`` as one of :data:`STREAM_MODES` (``True`` -> 'stage', ``False`` -> 'off')."""
  if isinstance(value, bool):
    return _STREAM_ALIASES[value]
  if isinstance(value, str):
    text = value.strip().lower()
    text = _STREAM_ALIASES.get(text, text)
    if text in STREAM_MODES:
      return text
  raise ValueError(
    f'model.prune_stream={value!r} is not one of {list(STREAM_MODES)} '
    f"(True means 'stage', False means 'off')."
  )


def _bn(prefix: Path, name: str) -> tuple[Slice, ...]:
  return tuple(Slice(prefix + (name, leaf), 0) for leaf in ('scale', 'bias', 'mean', 'var'))


def _producer(prefix: Path, conv: str, bn: str) -> tuple[Slice, ...]:
  """A conv's output channels and its BN (params and batch stats)."""
  return (Slice(prefix + (conv, 'kernel'), -1),) + _bn(prefix, bn)


def _consumer(prefix: Path, conv: str) -> Slice:
  """A conv's input channels (HWIO kernel)."""
  return Slice(prefix + (conv, 'kernel'), 2)


def block_name(stage: int, block: int) -> str:
  return f'stage{stage}_block{block}'


def has_projection(block: str, stage: int, index: int) -> bool:
  """Whether block ``index`` of ``stage`` has a 1x1 conv + BN shortcut (structural)."""
  return index == 0 and (stage > 0 or block == 'bottleneck')


def group_names(stage_sizes: Sequence[int], block: str, prune_stream='stage') -> list[str]:
  """Every unit group (every width of the model), in network order."""
  site = stream_mode(prune_stream) == 'site'
  names = ['stem'] if site or has_projection(block, 0, 0) else []
  for s, n in enumerate(stage_sizes):
    for b in range(n):
      names += [f'{block_name(s, b)}_{conv}' for conv in INTERNAL_CONVS[block]]
      if site:
        names.append(f'{block_name(s, b)}_out')
    if not site:
      names.append(f'stage{s}_stream')
  return names


def select_channels(x_bhwc: jax.Array, in_ids: jax.Array, out_ids: jax.Array) -> jax.Array:
  """The selected identity: output channel ``o`` is the input channel whose id is ``out_ids[o]``.

  Ids are positive integers (stored as floats and rounded); an output channel
  whose id no input channel has, or whose id is 0, is zero. The match is found
  by sorting the ``C_in`` input ids once per call (no ``C_in x C_out`` work);
  per element the shortcut is one gather and one select.
  """
  c_in, c_out = x_bhwc.shape[-1], out_ids.shape[0]
  in_ids = jnp.round(in_ids).astype(jnp.int32)
  out_ids = jnp.round(out_ids).astype(jnp.int32)
  order = jnp.argsort(in_ids)
  sorted_ids = in_ids[order]
  pos = jnp.clip(jnp.searchsorted(sorted_ids, out_ids), 0, c_in - 1)
  hit = (sorted_ids[pos] == out_ids) & (out_ids > 0)
  picked = jnp.take(x_bhwc, order[pos], axis=-1, mode='clip')
  return jnp.where(hit.reshape((1,) * (x_bhwc.ndim - 1) + (c_out,)), picked, 0)


class Block(nn.Module):
  """A basic or bottleneck residual block; widths of its convs given explicitly.

  ``widths``: the internal widths (``conv1``, and ``conv2`` for bottlenecks),
  then the stream width (output of the last conv, of the shortcut, of the block).
  ``select``: an identity shortcut is a selected identity (:func:`select_channels`,
  ``prune_stream='site'``), its ids in ``batch_stats`` (dense: ``1 .. width``).
  """

  kind: str
  widths: tuple[int, ...]
  strides: int
  projection: bool
  activation: str
  select: bool = False

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    act = common.activation(self.activation)
    *internal, out = self.widths
    if self.kind == 'basic':
      specs = [(internal[0], (3, 3), self.strides), (out, (3, 3), 1)]
    else:
      specs = [(internal[0], (1, 1), 1), (internal[1], (3, 3), self.strides), (out, (1, 1), 1)]
    y_bhwc = x_bhwc
    for i, (width, kernel, strides) in enumerate(specs, start=1):
      y_bhwc = nn.Conv(
        width, kernel, strides=strides, padding='SAME', use_bias=False, name=f'conv{i}'
      )(y_bhwc)
      y_bhwc = common.batch_norm(train, f'bn{i}')(y_bhwc)
      if i < len(specs):
        y_bhwc = probe(self, f'act{i}', act(y_bhwc))
    if self.projection:
      x_bhwc = nn.Conv(out, (1, 1), strides=self.strides, use_bias=False, name='proj_conv')(x_bhwc)
      x_bhwc = common.batch_norm(train, 'proj_bn')(x_bhwc)
    elif self.select:
      ids = lambda n: jnp.arange(1, n + 1, dtype=jnp.float32)
      in_ids = self.variable('batch_stats', 'shortcut_in', ids, x_bhwc.shape[-1])
      out_ids = self.variable('batch_stats', 'shortcut_out', ids, out)
      x_bhwc = select_channels(x_bhwc, in_ids.value, out_ids.value)
    return probe(self, 'out', act(y_bhwc + x_bhwc))


class ResNet(nn.Module):
  """A ResNet whose widths are given per unit group (see the module docstring)."""

  widths: Mapping[str, int]
  num_classes: int
  stage_sizes: tuple[int, ...] = STAGE_SIZES['resnet18']
  block: str = 'basic'
  stem: str = 'cifar'
  activation: str = 'relu'
  prune_stream: bool | str = True  # a STREAM_MODES entry; True = 'stage', False = 'off'

  @property
  def names(self) -> list[str]:
    return group_names(self.stage_sizes, self.block, self.prune_stream)

  @property
  def per_site(self) -> bool:
    return stream_mode(self.prune_stream) == 'site'

  def _stem_width(self) -> int:
    if self.per_site or has_projection(self.block, 0, 0):
      return self.widths['stem']
    return self.widths['stage0_stream']

  def _out_width(self, s: int, b: int) -> int:
    """The width of block ``b`` of stage ``s``'s output (its stream site)."""
    return self.widths[f'{block_name(s, b)}_out' if self.per_site else f'stage{s}_stream']

  @nn.compact
  def __call__(self, x_bhwc: jax.Array, *, train: bool) -> jax.Array:
    if self.block not in BLOCKS:
      raise ValueError(f'model.block={self.block!r} is not one of {BLOCKS}.')
    if self.stem not in STEMS:
      raise ValueError(f'model.stem={self.stem!r} is not one of {STEMS}.')
    act = common.activation(self.activation)
    if self.stem == 'cifar':
      x_bhwc = nn.Conv(
        self._stem_width(), (3, 3), padding='SAME', use_bias=False, name='stem_conv'
      )(x_bhwc)
    else:
      x_bhwc = nn.Conv(
        self._stem_width(),
        (7, 7),
        strides=2,
        padding=((3, 3), (3, 3)),
        use_bias=False,
        name='stem_conv',
      )(x_bhwc)
    x_bhwc = common.batch_norm(train, 'stem_bn')(x_bhwc)
    x_bhwc = probe(self, 'stem_act', act(x_bhwc))
    if self.stem == 'imagenet':
      x_bhwc = nn.max_pool(x_bhwc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, n in enumerate(self.stage_sizes):
      for b in range(n):
        name = block_name(s, b)
        widths = tuple(self.widths[f'{name}_{c}'] for c in INTERNAL_CONVS[self.block])
        x_bhwc = Block(
          kind=self.block,
          widths=widths + (self._out_width(s, b),),
          strides=2 if (s > 0 and b == 0) else 1,
          projection=has_projection(self.block, s, b),
          activation=self.activation,
          select=self.per_site,
          name=name,
        )(x_bhwc, train=train)
    x_bd = jnp.mean(x_bhwc, axis=(1, 2))
    return nn.Dense(self.num_classes, name='head')(x_bd)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    mode = stream_mode(self.prune_stream)
    kind, groups = self.block, []
    internal, last = INTERNAL_CONVS[kind], LAST_CONV[kind]
    stem_in_stream = not has_projection(kind, 0, 0)
    if mode == 'site':
      groups.append(self._site_group(None, 0))
    elif not stem_in_stream:
      first = (block_name(0, 0),)
      groups.append(
        UnitGroup(
          name='stem',
          sites=(('stem_act',),),
          producers=_producer((), 'stem_conv', 'stem_bn'),
          consumers=(_consumer(first, 'conv1'), _consumer(first, 'proj_conv')),
        )
      )
    for s, n in enumerate(self.stage_sizes):
      for b in range(n):
        prefix = (block_name(s, b),)
        nexts = internal[1:] + (last,)
        for i, (conv, nxt) in enumerate(zip(internal, nexts), start=1):
          groups.append(
            UnitGroup(
              name=f'{prefix[0]}_{conv}',
              sites=(prefix + (f'act{i}',),),
              producers=_producer(prefix, conv, f'bn{i}'),
              consumers=(_consumer(prefix, nxt),),
            )
          )
        if mode == 'site':
          groups.append(self._site_group(s, b))
      if mode == 'stage':
        groups.append(self._stream_group(s, stem_in_stream and s == 0))
    return tuple(groups)

  def _readers(self, s: int, b: int) -> tuple:
    """Consumer slices of what enters block ``b`` of stage ``s`` (the head past the last block)."""
    if s == len(self.stage_sizes):
      return (Slice(('head', 'kernel'), 0),)
    nxt = (block_name(s, b),)
    if has_projection(self.block, s, b):
      return (_consumer(nxt, 'conv1'), _consumer(nxt, 'proj_conv'))
    return (_consumer(nxt, 'conv1'), Slice(nxt + ('shortcut_in',), 0))

  def _site_group(self, s: int | None, b: int) -> UnitGroup:
    """``prune_stream='site'``: the stem's output (``s=None``) or block ``b`` of stage ``s``'s."""
    if s is None:
      return UnitGroup(
        name='stem',
        sites=(('stem_act',),),
        producers=_producer((), 'stem_conv', 'stem_bn'),
        consumers=self._readers(0, 0),
      )
    prefix = (block_name(s, b),)
    producers = _producer(prefix, LAST_CONV[self.block], f'bn{len(INTERNAL_CONVS[self.block]) + 1}')
    if has_projection(self.block, s, b):
      producers += _producer(prefix, 'proj_conv', 'proj_bn')
    else:
      producers += (Slice(prefix + ('shortcut_out',), 0),)
    nxt = (s, b + 1) if b + 1 < self.stage_sizes[s] else (s + 1, 0)
    return UnitGroup(
      name=f'{prefix[0]}_out',
      sites=(prefix + ('out',),),
      producers=producers,
      consumers=self._readers(*nxt),
    )

  def _stream_group(self, s: int, with_stem: bool) -> UnitGroup:
    kind, n = self.block, self.stage_sizes[s]
    blocks = [(block_name(s, b),) for b in range(n)]
    producers = [
      sl
      for p in blocks
      for sl in _producer(p, LAST_CONV[kind], f'bn{len(INTERNAL_CONVS[kind]) + 1}')
    ]
    if has_projection(kind, s, 0):
      producers += _producer(blocks[0], 'proj_conv', 'proj_bn')
    sites = [p + ('out',) for p in blocks]
    consumers = [_consumer(p, 'conv1') for p in blocks[1:]]
    if with_stem:
      producers += _producer((), 'stem_conv', 'stem_bn')
      sites.insert(0, ('stem_act',))
      consumers.insert(0, _consumer(blocks[0], 'conv1'))
    if s + 1 < len(self.stage_sizes):
      nxt = (block_name(s + 1, 0),)
      consumers.append(_consumer(nxt, 'conv1'))
      if has_projection(kind, s + 1, 0):
        consumers.append(_consumer(nxt, 'proj_conv'))
    else:
      consumers.append(Slice(('head', 'kernel'), 0))
    return UnitGroup(
      name=f'stage{s}_stream',
      sites=tuple(sites),
      producers=tuple(producers),
      consumers=tuple(consumers),
    )


def default_widths(
  stage_sizes: Sequence[int], block: str, width_multiplier: float = 1.0, prune_stream='stage'
) -> dict[str, int]:
  """The standard widths (64-128-256-512 per stage, streams x expansion), scaled."""
  scale = lambda w: max(1, int(round(w * width_multiplier)))
  widths = {'stem': scale(BASE_WIDTHS[0])}
  for s, n in enumerate(stage_sizes):
    stream = scale(BASE_WIDTHS[s] * EXPANSION[block])
    for b in range(n):
      for conv in INTERNAL_CONVS[block]:
        widths[f'{block_name(s, b)}_{conv}'] = scale(BASE_WIDTHS[s])
      widths[f'{block_name(s, b)}_out'] = stream
    widths[f'stage{s}_stream'] = stream
  return {k: widths[k] for k in group_names(stage_sizes, block, prune_stream)}


def _expand_streams(widths: Mapping[str, int], stage_sizes: Sequence[int]) -> dict[str, int]:
  """``prune_stream='site'``: ``stage{s}_stream=w`` sets every block output of stage ``s``."""
  out = {}
  for key, w in widths.items():
    if key.startswith('stage') and key.endswith('_stream') and key[5:-7].isdigit():
      s = int(key[5:-7])
      if s < len(stage_sizes):
        out.update({f'{block_name(s, b)}_out': w for b in range(stage_sizes[s])})
        continue
    out[key] = w
  return {**out, **{k: v for k, v in widths.items() if k.endswith('_out')}}


def _make(
  depth: str,
  block: str,
  num_classes: int,
  stem: str,
  width_multiplier: float,
  widths: Mapping[str, int] | None,
  activation: str,
  prune_stream: bool | str,
) -> ResNet:
  mode = stream_mode(prune_stream)
  if stem not in STEMS:
    raise ValueError(f'model.stem={stem!r} is not one of {STEMS}.')
  if not (isinstance(width_multiplier, (int, float)) and width_multiplier > 0):
    raise ValueError(f'model.width_multiplier={width_multiplier!r} must be a number > 0.')
  common.activation(activation)  # fail early on an unknown name
  stage_sizes = STAGE_SIZES[depth]
  names = group_names(stage_sizes, block, mode)
  if widths is None:
    widths = default_widths(stage_sizes, block, width_multiplier, mode)
  elif isinstance(widths, str):  # 'stem=32,...' (common.parse_widths)
    widths = common.parse_widths(widths)
  elif hasattr(widths, 'to_dict'):  # an ml_collections.ConfigDict
    widths = widths.to_dict()
  if isinstance(widths, Mapping) and mode == 'site':
    widths = _expand_streams(widths, stage_sizes)
  if isinstance(widths, Mapping):
    extra = set(widths) - set(names)
    if extra:
      raise ValueError(f'model.widths has unknown groups {sorted(extra)}; groups are {names}.')
  return ResNet(
    widths=common.frozen_widths(names, widths),
    num_classes=num_classes,
    stage_sizes=stage_sizes,
    block=block,
    stem=stem,
    activation=activation,
    prune_stream=mode,
  )


def make_resnet18(
  num_classes: int,
  stem: str = 'cifar',
  width_multiplier: float = 1.0,
  widths: Mapping[str, int] | None = None,
  activation: str = 'relu',
  prune_stream: bool | str = 'stage',
) -> ResNet:
  """ResNet-18 (basic blocks). ``widths`` (group -> width) overrides ``width_multiplier``.

  ``prune_stream``: 'stage' (True), 'off' (False) or 'site' (see the module docstring).
  """
  return _make(
    'resnet18', 'basic', num_classes, stem, width_multiplier, widths, activation, prune_stream
  )


def make_resnet50(
  num_classes: int,
  stem: str = 'imagenet',
  width_multiplier: float = 1.0,
  widths: Mapping[str, int] | None = None,
  activation: str = 'relu',
  prune_stream: bool | str = 'stage',
) -> ResNet:
  """ResNet-50 (bottlenecks, expansion 4). ``widths`` overrides ``width_multiplier``.

  ``prune_stream``: 'stage' (True), 'off' (False) or 'site' (see the module docstring).
  """
  return _make(
    'resnet50', 'bottleneck', num_classes, stem, width_multiplier, widths, activation, prune_stream
  )
