"""Prune any Flax Linen model: unit groups found automatically.

``make_prunable(module, *example_args, **example_kwargs)`` takes a plain Flax
Linen module (auto-named submodules, literal widths such as ``nn.Dense(64)``,
activations as functions) and returns a :class:`Prunable` that computes the
same function and follows the project's protocol: ``widths`` (group name ->
width), ``unit_groups()``, and the death-check tensors sown under
``intermediates``; ``init``/``apply``/``clone`` mirror the Linen API, so
``demp.dead_unit_stats``, ``demp.keep_masks``, ``demp.prune``, the trainer and
the checkpoints work on it unchanged. The variables are exactly those of the
plain module (same paths, same shapes)::

    pmodel = demp.make_prunable(Net(), jnp.zeros((1, 32, 32, 3)), train=False)
    variables = pmodel.init(jax.random.key(0), x, train=False)
    alive, activity = demp.dead_unit_stats(pmodel, variables, images)
    pmodel, variables, opt_state = demp.prune(pmodel, variables, opt_state,
                                              demp.keep_masks(alive, activity))
    print(demp.describe_groups(pmodel))

Design: method interceptors + one traced jaxpr
----------------------------------------------
*Discovery* (once, no FLOPs: abstract values only). ``nn.intercept_methods``
wraps every ``__call__`` of ``nn.Dense``, ``nn.Conv``, ``nn.BatchNorm``,
``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.RMSNorm``: it records the call
(module path, attributes, shapes) and wraps its input and output in an
identity primitive (``demp_mark``) tagged with the call's index. One forward
pass is traced to a jaxpr (``jax.make_jaxpr`` over the variables' shapes);
nested calls (``jit``, ``custom_jvp``/``custom_vjp`` such as ``nn.relu``,
``remat``) are inlined. The marks cut the graph into layer calls and the plain
``jnp`` code between them (activations, additions, pooling, reshapes...),
which Python-level interception alone cannot see. Every Dense/Conv output
starts a unit group whose units are its last axis; a forward pass over the
equations carries, per value, a *layout*: which axis holds units, of which
groups, at which offsets, repeated how many times. The rules, each exact:

* elementwise ops (every activation, ``x * 0.5``, dropout masks that are
  uniform along the unit axis) keep the layout; an elementwise op between two
  unit-carrying values (a residual ``+``, a gate ``x * s``) *couples* their
  groups (one group, channel ``j`` with channel ``j``);
* a BatchNorm over the unit axis, a GroupNorm with one channel per group and
  a depthwise conv (``feature_group_count == in == out``) are per-unit: their
  leaves join the group, the layout passes through;
* pooling, reductions, slices, pads, transposes over other axes keep the
  layout (the unit axis moves with a transpose);
* a reshape that merges axes into the unit axis with the units innermost
  (NHWC flatten) multiplies the repeats: the consumer's kernel rows are the
  keep-mask tiled, as for the project's own ``head='flatten'``;
* a concatenation along the unit axis places each group at its offset;
* a Dense/Conv reading the units on its feature (last) axis is a consumer:
  its kernel's input axis is sliced at the group's offset and period.

Anything else that touches the unit axis leaves the groups involved
*unprunable*, with the reason kept: a reduction, reshape, slice or matmul that
mixes units, a LayerNorm/RMSNorm/GroupNorm whose statistics include the units
(removing a unit changes the statistics of the others), an elementwise op with
a per-unit value that no prunable layer produced (a user's ``self.param``
bias, an attention projection, ``DenseGeneral``), a grouped conv, a control
flow primitive (``scan``, ``while``, ``cond``), any other primitive, and any
group whose units reach the model's output. A group coupled to an unprunable
one is unprunable too. Nothing is ever pruned that the rules did not prove.

*Run time*: the same kind of interceptor sets ``features`` of every
producer Dense/Conv to its group's current width (and ``features`` and
``feature_group_count`` of a depthwise conv to its input's channels), so a
pruned model is the user's module at smaller widths; norms read their size
from their input. It also sows, for the death check, the input of every
consumer call, one slice per group, last axis = units. That tensor is the
post-activation as the consumer reads it (after pooling / flattening, which
keep zeros at zero for ReLU-family activations): a unit may go exactly when
every consumer reads zero from it. Sowing is a no-op unless
``intermediates`` is mutable, and the width overrides happen while tracing:
the jitted step is the plain model's program (measured in docs/auto.md).

The discovery traces the call given by ``example_args``/``example_kwargs``;
code paths that only run with other arguments are not seen (trace with the
arguments that exercise every layer, e.g. ``train=False``). Reshapes must be
written from the input's shape (``x.reshape((x.shape[0], -1))``), not from
literal channel counts, for the pruned model to run.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
from jax.extend import core as jex_core

from demp import transforms
from demp.protocol import Slice, UnitGroup

Path = tuple[str, ...]
Form = tuple[int, tuple[str, ...]]  # const + sum(widths[g] for g in names): a size under pruning

# ----------------------------------------------------------------------------
# The marker primitive: identity, visible in a jaxpr with its tag.

_mark_p = jex_core.Primitive('demp_mark')
_mark_p.def_impl(lambda x, *, tag: x)
_mark_p.def_abstract_eval(lambda x, *, tag: x)

LAYERS = (nn.Dense, nn.Conv)
NORMS = (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
SITE_PREFIX = 'demp_in'

_UNARY = frozenset(
  '''neg exp exp2 log log1p expm1 tanh logistic sin cos tan sinh cosh asinh acosh
  atanh asin acos atan abs sign floor ceil round sqrt rsqrt cbrt erf erfc erf_inv integer_pow square
  convert_element_type reduce_precision copy copy_p is_finite not stop_gradient real imag
  sharding_constraint mesh_cast reciprocal'''.split()
)
_NARY = frozenset(
  '''add add_any sub mul div max min pow atan2 rem eq ne lt le gt ge and or xor
  select_n clamp nextafter'''.split()
)
_CALLS = frozenset(
  '''pjit jit closed_call core_call custom_jvp_call custom_vjp_call
  custom_vjp_call_jaxpr remat checkpoint remat2 named_call'''.split()
)
_REDUCE = frozenset(
  '''reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax
  argmin'''.split()
)
_WINDOW = frozenset('reduce_window_max reduce_window_min reduce_window_sum reduce_window'.split())


def _path(module: nn.Module) -> Path:
  return tuple(str(p) for p in module.path)


def _kind(module: nn.Module, in_channels: int) -> str:
  """What a call of an intercepted module is: 'dense', 'conv', 'depthwise', 'grouped', a norm."""
  if isinstance(module, nn.Conv):
    g = module.feature_group_count
    if g == 1:
      return 'conv'
    return 'depthwise' if g == in_channels == module.features else 'grouped'
  if isinstance(module, nn.Dense):
    return 'dense'
  if isinstance(module, nn.BatchNorm):
    return 'batchnorm'
  if isinstance(module, nn.GroupNorm):
    return 'groupnorm'
  if isinstance(module, nn.RMSNorm):
    return 'rmsnorm'
  return 'layernorm'


@dataclasses.dataclass
class _Call:
  index: int
  path: Path
  kind: str
  module: nn.Module
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------
# Flattening a jaxpr: nested calls inlined, every equation (prim, params, ins, outs).


@dataclasses.dataclass
class _Eqn:
  prim: str
  params: dict
  invars: list
  outvars: list


def _is_literal(atom) -> bool:
  return isinstance(atom, jex_core.Literal) or not isinstance(atom, jex_core.Var)


def _sub_jaxpr(eqn):
  for key in ('jaxpr', 'call_jaxpr', 'fun_jaxpr'):
    sub = eqn.params.get(key)
    if sub is not None:
      return getattr(sub, 'jaxpr', sub)
  return None


def _flatten(jaxpr, env: dict, out: list) -> None:
  read = lambda a: a if _is_literal(a) else env.get(a, a)
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn) if name in _CALLS else None
    ins = [read(a) for a in eqn.invars]
    if sub is not None and len(sub.invars) == len(ins) and len(sub.outvars) == len(eqn.outvars):
      sub_env = dict(zip(sub.invars, ins))
      _flatten(sub, sub_env, out)
      for o, so in zip(eqn.outvars, sub.outvars):
        out.append(_Eqn('copy', {}, [so if _is_literal(so) else sub_env.get(so, so)], [o]))
    else:
      out.append(_Eqn(name, dict(eqn.params), ins, list(eqn.outvars)))


# ----------------------------------------------------------------------------
# Layouts and groups (union-find over producer calls).


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Units on ``axis``: ``reps`` blocks of ``block`` entries, group ``g`` at its offset."""

  axis: int
  reps: int
  block: tuple[int, tuple[int, ...]]  # const, group ids
  segs: tuple[tuple[int, tuple[int, tuple[int, ...]]], ...]  # (gid, offset)


class _Groups:
  """Union-find over group ids (the index of the producer call) with refusal reasons."""

  def __init__(self):
    self.parent: dict[int, int] = {}
    self.reason: dict[int, str] = {}
    self.width: dict[int, int] = {}

  def add(self, gid: int, width: int) -> None:
    self.parent[gid] = gid
    self.width[gid] = width

  def find(self, g: int) -> int:
    while self.parent[g] != g:
      self.parent[g] = self.parent[self.parent[g]]
      g = self.parent[g]
    return g

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    lo, hi = min(ra, rb), max(ra, rb)
    self.parent[hi] = lo
    if hi in self.reason and lo not in self.reason:
      self.reason[lo] = self.reason[hi]

  def refuse(self, gids, reason: str) -> None:
    for g in gids:
      r = self.find(g)
      self.reason.setdefault(r, reason)

  def size(self, form) -> int:
    const, gids = form
    return const + sum(self.width[g] for g in gids)


def _shift(form, by):
  return (form[0] + by[0], form[1] + by[1])


# ----------------------------------------------------------------------------
# The plan: what discovery found, hashable (the module is a static jit argument).


@dataclasses.dataclass(frozen=True)
class Member:
  """A module of a group. ``role``: 'producer' (its outputs are the units),
  'per_unit' (a norm or depthwise conv that applies per unit), 'consumer'
  (its kernel's input axis reads the units) with ``offset``/``block``."""

  path: Path
  role: str
  kind: str
  leaves: tuple[tuple[str, str, int], ...]  # (collection, leaf name, axis)
  offset: Form = (0, ())
  block: Form | None = None


@dataclasses.dataclass(frozen=True)
class Group:
  name: str
  width: int
  members: tuple[Member, ...]
  sites: tuple[Path, ...]


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """What a consumer call sows: the slice of its input that holds one group."""

  name: str
  group: str
  reps: int
  block: Form
  offset: Form


@dataclasses.dataclass(frozen=True)
class Refused:
  name: str
  width: int
  producers: tuple[Path, ...]
  reason: str


@dataclasses.dataclass(frozen=True)
class Plan:
  groups: tuple[Group, ...]
  refused: tuple[Refused, ...]
  producers: tuple[tuple[Path, str], ...]  # path -> group
  depthwise: tuple[Path, ...]
  sites: tuple[tuple[Path, tuple[SiteSpec, ...]], ...]
  unseen: tuple[Path, ...]  # intercepted calls the trace did not show
  penalty_leaves: tuple[str, ...]  # params leaves NORM_SCALES selects
  discovery_s: float = dataclasses.field(default=0.0, compare=False)


def _size(form: Form, widths: Mapping[str, int]) -> int:
  return form[0] + sum(int(widths[g]) for g in form[1])


# ----------------------------------------------------------------------------
# Discovery.


class _Discovery:
  """One forward pass over the flat equations, carrying layouts."""

  def __init__(self, calls: list[_Call]):
    self.calls = calls
    self.groups = _Groups()
    self.layout: dict[Any, _Layout] = {}
    self.uniform: dict[Any, frozenset] = {}
    self.pending: dict[int, _Layout] = {}  # per-unit call index -> input layout
    self.per_unit: dict[int, list] = {}  # gid -> [(call, offset, block)]
    self.consumers: dict[int, list] = {}  # gid -> [(call, offset, block)]
    self.site_specs: dict[Path, tuple] = {}  # consumer path -> (layout, [(k, gid, offset)])
    self.producer_paths: dict[Path, int] = {}
    self.seen: set[int] = set()
    self.consumer_ranges: dict[tuple, list] = {}  # (path, role) -> [(offset, width, gid)]

  # -- helpers
  def gids(self, lay: _Layout) -> list[int]:
    return [g for g, _ in lay.segs]

  def refuse(self, lay: _Layout | None, reason: str) -> None:
    if lay is not None:
      self.groups.refuse(self.gids(lay), reason)

  def lay(self, atom):
    return None if _is_literal(atom) else self.layout.get(atom)

  def is_uniform(self, atom, axis: int) -> bool:
    if _is_literal(atom):
      return True
    shape = atom.aval.shape
    if len(shape) == 0 or shape[axis] == 1:
      return True
    return axis in self.uniform.get(atom, frozenset())

  def same(self, a: _Layout, b: _Layout) -> bool:
    size = self.groups.size
    return (
      a.axis == b.axis
      and a.reps == b.reps
      and size(a.block) == size(b.block)
      and len(a.segs) == len(b.segs)
      and all(
        size(oa) == size(ob) and self.groups.width[ga] == self.groups.width[gb]
        for (ga, oa), (gb, ob) in zip(a.segs, b.segs)
      )
    )

  def claim(self, path: Path, role: str, gid: int, offset) -> None:
    """A leaf range read by two groups couples them; overlapping differently refuses both."""
    key = (path, role)
    o, w = self.groups.size(offset), self.groups.width[gid]
    for o2, w2, g2 in self.consumer_ranges.setdefault(key, []):
      if (o2, w2) == (o, w):
        self.groups.union(gid, g2)
      elif o < o2 + w2 and o2 < o + w:
        self.groups.refuse([gid, g2], f'{"/".join(path)} reads them at overlapping offsets')
    self.consumer_ranges[key].append((o, w, gid))

  # -- marks
  def mark(self, eqn: _Eqn) -> None:
    side, index = eqn.params['tag']
    call = self.calls[index]
    self.seen.add(index)
    x, y = eqn.invars[0], eqn.outvars[0]
    lay = self.lay(x)
    name = '/'.join(call.path)
    if side == 'in':
      if lay is None:
        return
      ndim = len(call.in_shape)
      last = lay.axis == ndim - 1
      if call.kind in ('dense', 'conv'):
        if not last:
          self.refuse(lay, f'read by {name} on an axis that is not its feature axis')
          return
        prev = self.site_specs.get(call.path)
        if prev is not None and not self.same(prev[0], lay):
          self.refuse(lay, f'{name} is called on inputs with different unit layouts')
          self.refuse(prev[0], f'{name} is called on inputs with different unit layouts')
          return
        if prev is None:
          self.site_specs[call.path] = (lay, [])
        for k, (gid, offset) in enumerate(lay.segs):
          self.claim(call.path, 'in', gid, offset)
          self.consumers.setdefault(gid, []).append((call, offset, lay.block, lay.reps))
          if prev is None:
            self.site_specs[call.path][1].append((k, gid, offset))
        return
      if call.kind in ('batchnorm', 'groupnorm', 'depthwise'):
        ok, why = last and lay.reps == 1, 'not on its feature axis'
        if call.kind == 'batchnorm':
          axes = call.module.axis if isinstance(call.module.axis, tuple) else (call.module.axis,)
          ok = ok and tuple(a % ndim for a in axes) == (ndim - 1,)
        if call.kind == 'groupnorm':
          gs = call.module.group_size or call.in_shape[-1] // call.module.num_groups
          ok = ok and gs == 1
          why = 'normalized together by its groups (statistics include other units)'
        if not ok:
          self.refuse(lay, f'{call.kind} {name}: {why}')
          return
        for gid, offset in lay.segs:
          self.claim(call.path, 'per_unit', gid, offset)
          self.per_unit.setdefault(gid, []).append((call, offset, lay.block))
        self.pending[index] = lay
        return
      if call.kind == 'grouped':
        self.refuse(lay, f'read by the grouped conv {name}')
        return
      # LayerNorm, RMSNorm.
      self.refuse(
        lay, f'{call.kind} {name} normalizes over the units (its statistics include them)'
      )
      return
    # side == 'out'
    if index in self.pending:
      self.layout[y] = self.pending.pop(index)
      return
    if call.kind in ('dense', 'conv', 'grouped'):
      width = call.out_shape[-1]
      if call.path in self.producer_paths:  # shared weights: one group
        gid = self.producer_paths[call.path]
      else:
        gid = index
        self.groups.add(gid, width)
        self.producer_paths[call.path] = gid
        if call.kind == 'grouped':
          self.groups.refuse([gid], f'produced by the grouped conv {name}')
      self.layout[y] = _Layout(len(call.out_shape) - 1, 1, (0, (gid,)), ((gid, (0, ())),))

  # -- the other primitives
  def step(self, eqn: _Eqn) -> None:
    p = eqn.prim
    if p == 'demp_mark':
      self.mark(eqn)
      return
    lays = [self.lay(a) for a in eqn.invars]
    if not any(lays):
      if p == 'broadcast_in_dim':
        shape, dims = eqn.params['shape'], eqn.params['broadcast_dimensions']
        src = eqn.invars[0].aval.shape
        uni = {i for i in range(len(shape)) if i not in dims}
        uni |= {d for d, s in zip(dims, src) if s == 1}
        self.uniform[eqn.outvars[0]] = frozenset(uni)
      elif p in _UNARY or p == 'copy':
        if not _is_literal(eqn.invars[0]) and eqn.invars[0] in self.uniform:
          self.uniform[eqn.outvars[0]] = self.uniform[eqn.invars[0]]
      return
    out = eqn.outvars[0] if eqn.outvars else None
    lay = next(l for l in lays if l is not None)
    a = lay.axis
    prm = eqn.params
    if p in _UNARY or p == 'copy':
      self.layout[out] = lay
    elif p in _NARY:
      for atom, l in zip(eqn.invars, lays):
        if l is None and not self.is_uniform(atom, a):
          for l2 in lays:
            self.refuse(l2, f'combined ({p}) with a per-unit value that no prunable layer produced')
          return
      ref = lay
      for l in lays:
        if l is None or l is ref:
          continue
        if not self.same(ref, l):
          for l2 in lays:
            self.refuse(l2, f'combined ({p}) with units of a different layout')
          return
        for (g1, _), (g2, _) in zip(ref.segs, l.segs):
          self.groups.union(g1, g2)
      self.layout[out] = ref
    elif p == 'optimization_barrier':
      for atom, o in zip(eqn.invars, eqn.outvars):
        if self.lay(atom) is not None:
          self.layout[o] = self.lay(atom)
    elif p == 'transpose':
      perm = tuple(prm['permutation'])
      self.layout[out] = dataclasses.replace(lay, axis=perm.index(a))
    elif p in _REDUCE:
      axes = tuple(prm['axes'])
      if a in axes:
        self.refuse(lay, f'reduced over the units ({p})')
        return
      self.layout[out] = dataclasses.replace(lay, axis=a - sum(1 for x in axes if x < a))
    elif p in _WINDOW:
      ok = (
        prm['window_dimensions'][a] == 1
        and prm['window_strides'][a] == 1
        and tuple(prm['padding'][a]) == (0, 0)
        and all(prm.get(k, (1,) * (a + 1))[a] == 1 for k in ('base_dilation', 'window_dilation'))
      )
      if not ok:
        self.refuse(lay, f'pooled across units ({p})')
        return
      self.layout[out] = lay
    elif p in ('cumsum', 'cumprod', 'cummax', 'cummin', 'cumlogsumexp'):
      if prm['axis'] == a:
        self.refuse(lay, f'{p} over the units')
        return
      self.layout[out] = lay
    elif p == 'rev':
      if a in prm['dimensions']:
        self.refuse(lay, 'reversed along the units')
        return
      self.layout[out] = lay
    elif p == 'squeeze':
      dims = tuple(d % len(eqn.invars[0].aval.shape) for d in prm['dimensions'])
      if a in dims:
        self.refuse(lay, 'squeezed along the units')
        return
      self.layout[out] = dataclasses.replace(lay, axis=a - sum(1 for d in dims if d < a))
    elif p == 'expand_dims':
      dims = sorted(prm['dimensions'])
      axis = a
      for d in dims:
        if d <= axis:
          axis += 1
      self.layout[out] = dataclasses.replace(lay, axis=axis)
    elif p == 'broadcast_in_dim':
      if lays[0] is None:  # a shape operand carries units: not handled
        self.refuse(lay, f'{p} with a dynamic shape')
        return
      new = prm['broadcast_dimensions'][a]
      if prm['shape'][new] != eqn.invars[0].aval.shape[a]:
        self.refuse(lay, 'broadcast along the units')
        return
      self.layout[out] = dataclasses.replace(lay, axis=new)
    elif p == 'reshape':
      self.reshape(eqn, lay)
    elif p == 'concatenate':
      self.concatenate(eqn, lays)
    elif p == 'slice':
      start, limit = prm['start_indices'][a], prm['limit_indices'][a]
      strides = prm.get('strides')
      size = eqn.invars[0].aval.shape[a]
      if start != 0 or limit != size or (strides is not None and strides[a] != 1):
        self.refuse(lay, 'sliced along the units')
        return
      self.layout[out] = lay
    elif p == 'dynamic_slice':
      if (
        lays[0] is None
        or any(l is not None for l in lays[1:])
        or prm['slice_sizes'][a] != eqn.invars[0].aval.shape[a]
      ):
        self.refuse(lay, 'dynamic_slice along the units')
        return
      self.layout[out] = lay
    elif p == 'pad':
      if lays[0] is None or tuple(prm['padding_config'][a]) != (0, 0, 0):
        self.refuse(lay, 'padded along the units')
        return
      self.layout[out] = lay
    elif p == 'split':
      if prm['axis'] == a:
        self.refuse(lay, 'split along the units')
        return
      for o in eqn.outvars:
        self.layout[o] = lay
    elif p == 'dot_general':
      self.dot_general(eqn, lays)
    else:
      for l in lays:
        self.refuse(l, f'flows into {p}, which is not known to keep units apart')

  def reshape(self, eqn: _Eqn, lay: _Layout) -> None:
    src, dst = eqn.invars[0].aval.shape, eqn.params['new_sizes']
    if eqn.params.get('dimensions') is not None:
      self.refuse(lay, 'reshape with a dimension permutation')
      return
    a = lay.axis
    S = src[a]
    pre, post = math.prod(src[:a]), math.prod(src[a + 1 :])
    block = self.groups.size(lay.block)
    for j in range(len(dst)):
      if math.prod(dst[j + 1 :]) != post or math.prod(dst[: j + 1]) != pre * S:
        continue
      s2 = dst[j]
      if s2 % S == 0:
        self.layout[eqn.outvars[0]] = dataclasses.replace(lay, axis=j, reps=lay.reps * (s2 // S))
        return
      if S % s2 == 0 and s2 % block == 0:
        self.layout[eqn.outvars[0]] = dataclasses.replace(lay, axis=j, reps=s2 // block)
        return
    self.refuse(
      lay,
      f'reshaped {tuple(src)} -> {tuple(dst)} with the units not innermost '
      f'(the reshape mixes units with other axes)',
    )

  def concatenate(self, eqn: _Eqn, lays) -> None:
    d = eqn.params['dimension']
    present = [l for l in lays if l is not None]
    a = present[0].axis
    if d != a:
      for atom, l in zip(eqn.invars, lays):
        if l is None or not self.same(present[0], l):
          for l2 in present:
            self.refuse(
              l2, 'concatenated (along another axis) with values that are not the same units'
            )
          return
      for l in present[1:]:
        for (g1, _), (g2, _) in zip(present[0].segs, l.segs):
          self.groups.union(g1, g2)
      self.layout[eqn.outvars[0]] = present[0]
      return
    if any(l.reps != 1 for l in present):
      for l in present:
        self.refuse(l, 'concatenated along a flattened unit axis')
      return
    offset, segs = (0, ()), []
    for atom, l in zip(eqn.invars, lays):
      if l is None:
        offset = _shift(offset, (atom.aval.shape[d], ()))
        continue
      segs += [(g, _shift(offset, o)) for g, o in l.segs]
      offset = _shift(offset, l.block)
    self.layout[eqn.outvars[0]] = _Layout(a, 1, offset, tuple(segs))

  def dot_general(self, eqn: _Eqn, lays) -> None:
    (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
    if sum(l is not None for l in lays) != 1:
      for l in lays:
        self.refuse(l, 'multiplied (dot_general) by other units')
      return
    side = 0 if lays[0] is not None else 1
    lay = lays[side]
    contract, batch = (lc, lb) if side == 0 else (rc, rb)
    if lay.axis in contract or lay.axis in batch:
      self.refuse(lay, 'contracted by a matmul that is not a Dense/Conv layer (dot_general)')
      return
    nd = [len(v.aval.shape) for v in eqn.invars]
    free = [i for i in range(nd[side]) if i not in contract and i not in batch]
    pos = len(lb) + free.index(lay.axis)
    if side == 1:
      pos += nd[0] - len(lc) - len(lb)
    self.layout[eqn.outvars[0]] = dataclasses.replace(lay, axis=pos)


def _leaf_exists(variables, col: str, path: Path, leaf: str) -> bool:
  tree = variables.get(col, {})
  for k in path + (leaf,):
    if not hasattr(tree, 'keys') or k not in tree:
      return False
    tree = tree[k]
  return True


def _discover(module: nn.Module, args, kwargs) -> Plan:
  t0 = time.perf_counter()
  key = jax.random.key(0)
  rngs = {'params': key, 'dropout': key}
  variables = jax.eval_shape(lambda: module.init(rngs, *args, **kwargs))
  variables = flax.core.unfreeze(variables)
  calls: list[_Call] = []

  def interceptor(next_fun, a, kw, ctx):
    if ctx.method_name != '__call__' or not isinstance(ctx.module, LAYERS + NORMS) or not a:
      return next_fun(*a, **kw)
    x = a[0]
    call = _Call(
      len(calls), _path(ctx.module), _kind(ctx.module, x.shape[-1]), ctx.module, tuple(x.shape)
    )
    calls.append(call)
    y = next_fun(_mark_p.bind(x, tag=('in', call.index)), *a[1:], **kw)
    call.out_shape = tuple(y.shape)
    return _mark_p.bind(y, tag=('out', call.index))

  def forward(v):
    with nn.intercept_methods(interceptor):
      out, _ = module.apply(v, *args, rngs={'dropout': key}, mutable=True, **kwargs)
    return out

  closed = jax.make_jaxpr(forward)(variables)
  eqns: list[_Eqn] = []
  _flatten(closed.jaxpr, {}, eqns)
  d = _Discovery(calls)
  for eqn in eqns:
    d.step(eqn)
  for atom in closed.jaxpr.outvars:
    d.refuse(d.lay(atom), 'its units reach the model output')
  return _finish(d, variables, time.perf_counter() - t0)


def _finish(d: _Discovery, variables, seconds: float) -> Plan:
  g = d.groups
  roots = sorted({g.find(x) for x in g.parent})
  for r in roots:
    if r not in g.reason and not any(g.find(c) == r for c in d.consumers):
      g.reason[r] = 'no Dense/Conv reads its units'
  members = {r: [] for r in roots}
  for path, gid in d.producer_paths.items():
    members[g.find(gid)].append(path)
  name_of = {r: '/'.join(members[r][0]) for r in roots}
  live = [r for r in roots if r not in g.reason]

  def form(f) -> Form:
    const, gids = f
    names = []
    for x in gids:
      r = g.find(x)
      if r in g.reason:
        const += g.width[x]
      else:
        names.append(name_of[r])
    return const, tuple(sorted(names))

  def leaves(call: _Call, role: str):
    kind, path, out = call.kind, call.path, []
    cands = {
      'producer': [('params', 'kernel', -1), ('params', 'bias', 0)],
      'per_unit': {
        'batchnorm': [
          ('params', 'scale', 0),
          ('params', 'bias', 0),
          ('batch_stats', 'mean', 0),
          ('batch_stats', 'var', 0),
        ],
        'groupnorm': [('params', 'scale', 0), ('params', 'bias', 0)],
        'depthwise': [('params', 'kernel', -1), ('params', 'bias', 0)],
      }.get(kind),
      'consumer': [('params', 'kernel', 0 if kind == 'dense' else len(call.in_shape) - 2)],
    }[role]
    for col, leaf, axis in cands:
      if _leaf_exists(variables, col, path, leaf):
        out.append((col, leaf, axis))
    return tuple(out)

  groups, producers, depthwise = [], [], []
  by_root_members: dict[int, dict] = {r: {} for r in live}
  for call in d.calls:
    if call.path in d.producer_paths:
      r = g.find(d.producer_paths[call.path])
      if r in by_root_members:
        by_root_members[r].setdefault(
          (call.path, 'producer'),
          Member(call.path, 'producer', call.kind, leaves(call, 'producer')),
        )
  for gid, uses in d.per_unit.items():
    r = g.find(gid)
    if r not in by_root_members:
      continue
    for call, offset, block in uses:
      m = Member(
        call.path, 'per_unit', call.kind, leaves(call, 'per_unit'), form(offset), form(block)
      )
      by_root_members[r].setdefault((call.path, 'per_unit', m.offset), m)
      if call.kind == 'depthwise' and call.path not in depthwise:
        depthwise.append(call.path)
  site_of: dict[int, list] = {r: [] for r in live}
  for gid, uses in d.consumers.items():
    r = g.find(gid)
    if r not in by_root_members:
      continue
    for call, offset, block, reps in uses:
      m = Member(
        call.path, 'consumer', call.kind, leaves(call, 'consumer'), form(offset), form(block)
      )
      by_root_members[r].setdefault((call.path, 'consumer', m.offset), m)
  sites = []
  for path, (lay, segs) in d.site_specs.items():
    specs = []
    for k, gid, offset in segs:
      r = g.find(gid)
      if r not in site_of:
        continue
      specs.append(
        SiteSpec(f'{SITE_PREFIX}{k}', name_of[r], lay.reps, form(lay.block), form(offset))
      )
      site_of[r].append(path + (f'{SITE_PREFIX}{k}',))
    if specs:
      sites.append((path, tuple(specs)))
  for r in live:
    groups.append(
      Group(
        name_of[r], g.width[r], tuple(by_root_members[r].values()), tuple(dict.fromkeys(site_of[r]))
      )
    )
    for path in members[r]:
      producers.append((path, name_of[r]))
  refused = tuple(
    Refused(name_of[r], g.width[r], tuple(members[r]), g.reason[r]) for r in roots if r in g.reason
  )
  unseen = tuple(dict.fromkeys(c.path for c in d.calls if c.index not in d.seen))
  mask = transforms.path_mask(transforms.NORM_SCALES)(variables.get('params', {}))
  penalty = tuple(
    '/'.join(str(k.key) for k in kp) for kp, v in jax.tree.flatten_with_path(mask)[0] if v
  )
  return Plan(
    tuple(groups),
    refused,
    tuple(producers),
    tuple(depthwise),
    tuple(sites),
    unseen,
    penalty,
    seconds,
  )


# ----------------------------------------------------------------------------
# The prunable module.


def _interceptor(plan: Plan, widths: Mapping[str, int]):
  producers = dict(plan.producers)
  depthwise = frozenset(plan.depthwise)
  sites = dict(plan.sites)

  def interceptor(next_fun, args, kwargs, ctx):
    if ctx.method_name != '__call__' or not isinstance(ctx.module, LAYERS) or not args:
      return next_fun(*args, **kwargs)
    m = ctx.module
    path = _path(m)
    if path in producers:
      object.__setattr__(m, 'features', int(widths[producers[path]]))
    elif path in depthwise:
      c = args[0].shape[-1]
      object.__setattr__(m, 'features', c)
      object.__setattr__(m, 'feature_group_count', c)
    for spec in sites.get(path, ()):
      x = args[0]
      block, offset = _size(spec.block, widths), _size(spec.offset, widths)
      width = int(widths[spec.group])
      if not (spec.reps == 1 and offset == 0 and width == x.shape[-1]):
        x = x.reshape(x.shape[:-1] + (x.shape[-1] // block, block))[..., offset : offset + width]
      m.sow('intermediates', spec.name, x)
    return next_fun(*args, **kwargs)

  return interceptor


@dataclasses.dataclass(frozen=True)
class Prunable:
  """A plain Flax module with its unit groups (see the module docstring).

  Attributes:
    module: the user's Linen module, unchanged.
    widths: group name -> current width (a ``FrozenDict``).
    plan: what discovery found (groups, members, sites, refusals).
    activation: the death criterion's name (``demp.CRITERIA``), read by the trainer.
  """

  module: nn.Module
  widths: flax.core.FrozenDict
  plan: Plan
  activation: str = 'relu'

  def _ctx(self):
    return nn.intercept_methods(_interceptor(self.plan, self.widths))

  def init(self, rngs, *args, **kwargs):
    with self._ctx():
      return self.module.init(rngs, *args, **kwargs)

  def init_with_output(self, rngs, *args, **kwargs):
    with self._ctx():
      return self.module.init_with_output(rngs, *args, **kwargs)

  def apply(self, variables, *args, **kwargs):
    with self._ctx():
      return self.module.apply(variables, *args, **kwargs)

  def clone(self, **updates) -> Prunable:
    unknown = set(updates) - {'widths', 'activation'}
    if unknown:
      raise ValueError(f'Prunable.clone: only widths/activation can change, got {sorted(unknown)}.')
    if 'widths' in updates:
      widths = dict(updates['widths'])
      if set(widths) != set(self.widths):
        raise ValueError(
          f'widths must name the groups {sorted(self.widths)}, got {sorted(widths)}.'
        )
      updates['widths'] = flax.core.FrozenDict({k: int(widths[k]) for k in self.widths})
    return dataclasses.replace(self, **updates)

  def unit_groups(self) -> tuple[UnitGroup, ...]:
    out = []
    for group in self.plan.groups:
      width = self.widths[group.name]
      producers, consumers = [], []
      for m in group.members:
        offset = _size(m.offset, self.widths)
        block = None if m.block is None else _size(m.block, self.widths)
        if block == width and offset == 0:
          block = None
        for _, leaf, axis in m.leaves:
          s = Slice(m.path + (leaf,), axis, offset, block)
          (consumers if m.role == 'consumer' else producers).append(s)
      out.append(UnitGroup(group.name, group.sites, tuple(producers), tuple(consumers)))
    return tuple(out)

  def __getattr__(self, name):  # the user's fields (num_classes, ...) read through
    if name.startswith('_') or name in ('module', 'widths', 'plan', 'activation'):
      raise AttributeError(name)
    return getattr(self.module, name)


def make_prunable(
  module: nn.Module, *example_args, activation: str = 'relu', **example_kwargs
) -> Prunable:
  """Finds the unit groups of a plain Flax module; returns it as a :class:`Prunable`.

  Args:
    module: any ``flax.linen.Module``.
    *example_args: inputs of one forward pass (shapes matter, values do not),
      e.g. ``jnp.zeros((1, 32, 32, 3))``.
    activation: the death criterion (a key of ``demp.CRITERIA``) the trainer uses.
    **example_kwargs: keyword arguments of that pass, e.g. ``train=False``.
  """
  if not isinstance(module, nn.Module):
    raise TypeError(f'make_prunable needs a flax.linen.Module, got {type(module).__name__}.')
  plan = _discover(module, example_args, example_kwargs)
  widths = flax.core.FrozenDict({g.name: g.width for g in plan.groups})
  return Prunable(module, widths, plan, activation)


def describe_groups(pmodule: Prunable) -> str:
  """A report: every group, its width, producers, per-unit layers, consumers; and refusals."""
  plan, lines = pmodule.plan, []
  total = sum(pmodule.widths.values())
  lines.append(
    f'{len(plan.groups)} prunable unit groups, {total} units '
    f'(discovered in {plan.discovery_s:.2f} s):'
  )
  for group in plan.groups:
    lines.append(f'  {group.name}  width {pmodule.widths[group.name]}')
    for role, label in (
      ('producer', 'producers'),
      ('per_unit', 'per-unit'),
      ('consumer', 'consumers'),
    ):
      ms = [m for m in group.members if m.role == role]
      if not ms:
        continue
      parts = []
      for m in ms:
        where = ''
        if m.role != 'producer':
          off, blk = _size(m.offset, pmodule.widths), _size(m.block, pmodule.widths)
          if (off, blk) != (0, pmodule.widths[group.name]):
            where = f'[{off}:{off + pmodule.widths[group.name]} of {blk}]'
        parts.append(f'{"/".join(m.path)}({",".join(l for _, l, _ in m.leaves)}){where}')
      lines.append(f'    {label}: {"; ".join(parts)}')
    lines.append(f'    sites: {", ".join("/".join(s) for s in group.sites)}')
  lines.append(f'{len(plan.refused)} left unprunable:')
  for r in plan.refused:
    prods = ', '.join('/'.join(p) for p in r.producers)
    lines.append(f'  {r.name}  width {r.width} (producers {prods}): {r.reason}')
  if plan.unseen:
    lines.append(
      'not analysed (called inside scan/while/cond or another opaque primitive): '
      + ', '.join('/'.join(p) for p in plan.unseen)
    )
  lines.append(
    'penalty targets (demp.NORM_SCALES): '
    + (', '.join(plan.penalty_leaves) if plan.penalty_leaves else 'none')
  )
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The trainer's hook: model.name = 'auto'.


def load(spec: str):
  """``'package.module:Name'`` -> the object (a Module class or a factory)."""
  if not isinstance(spec, str) or ':' not in spec:
    raise ValueError(f'model.module={spec!r} must be "package.module:ClassName".')
  mod, _, attr = spec.partition(':')
  obj = importlib.import_module(mod)
  for part in attr.split('.'):
    obj = getattr(obj, part)
  return obj


def make(
  num_classes: int,
  module: str = '',
  kwargs: Mapping[str, Any] | None = None,
  input_shape: Sequence[int] = (32, 32, 3),
  activation: str = 'relu',
  num_classes_arg: str = 'num_classes',
  widths: Mapping[str, int] | None = None,
) -> Prunable:
  """Builds the user's module by import path and makes it prunable (``model.name='auto'``).

  Args:
    num_classes: passed as ``num_classes_arg`` (``''``: not passed).
    module: ``'package.module:ClassName'`` (a Linen class or a factory returning a module).
    kwargs: the module's own arguments (a mapping; a ConfigDict is accepted).
    input_shape: one example's shape (``(H, W, C)``), for discovery.
    activation: the death criterion (``demp.CRITERIA``).
    widths: group -> width (a pruned spec, e.g. from a checkpoint).
  """
  cls = load(module)
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else (kwargs or {}))
  if num_classes_arg:
    kwargs[num_classes_arg] = num_classes
  net = cls(**kwargs)
  x = np.zeros((1, *tuple(input_shape)), np.float32)
  pmodel = make_prunable(net, x, activation=activation, train=False)
  if widths is not None:
    widths = widths.to_dict() if hasattr(widths, 'to_dict') else dict(widths)
    pmodel = pmodel.clone(widths=widths)
  return pmodel


__all__ = ['Prunable', 'Plan', 'describe_groups', 'make', 'make_prunable']
