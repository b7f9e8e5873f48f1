"""Tracing Flax NNX models for :mod:`demp.nnx`: layer interception, paths, discovery.

NNX has no method interceptors, so :func:`intercepting` swaps the ``__call__``
of the NNX layer classes for one traced pass (and restores them afterwards):
every call of a ``Linear``/``Conv``/norm/attention layer goes through a hook
that knows the layer's path in the model. Discovery uses it to put the marks
of :mod:`demp.auto` around each call, then runs :mod:`demp.auto`'s jaxpr
analysis unchanged; the death check uses it to read each consumer's input.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from demp import auto

Path = tuple[str, ...]

# The layers whose calls are seen. Kinds 'dense', 'conv', 'depthwise', 'grouped', 'batchnorm',
# 'groupnorm' follow demp.auto; any other kind is a layer the units must not enter.
LAYER_CLASSES = (
  nnx.Linear,
  nnx.Conv,
  nnx.BatchNorm,
  nnx.LayerNorm,
  nnx.RMSNorm,
  nnx.GroupNorm,
  nnx.InstanceNorm,
  nnx.MultiHeadAttention,
  nnx.LinearGeneral,
  nnx.Einsum,
  nnx.ConvTranspose,
)
OPAQUE = {
  'MultiHeadAttention': 'its query/key/value projections contract the units (attention is not '
  'a Linear/Conv the surgery can slice)',
  'LinearGeneral': 'a LinearGeneral contracts them (not a Linear/Conv the surgery can slice)',
  'Einsum': 'an Einsum contracts them (not a Linear/Conv the surgery can slice)',
  'ConvTranspose': 'a ConvTranspose reads them (not supported by the surgery)',
  'masked Conv': 'a Conv with a kernel mask reads them (the mask would need slicing too)',
}

_lock = threading.RLock()


def path_str(path) -> Path:
  return tuple(str(p) for p in path)


def module_paths(model: nnx.Module) -> dict[int, Path]:
  """``id(module) -> path`` of every module in the graph (a shared module: its first path)."""
  out: dict[int, Path] = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      out.setdefault(id(node), path_str(path))
  return out


def kind_of(module: nnx.Module, x) -> tuple[str, Any]:
  """What a layer call is (a :mod:`demp.auto` kind or an :data:`OPAQUE` name) and the
  attributes :mod:`demp.auto`'s analysis reads from it."""
  if isinstance(module, nnx.Conv):
    if module.mask is not None:
      return 'masked Conv', None
    g = module.feature_group_count
    if g == 1:
      return 'conv', None
    return ('depthwise' if g == x.shape[-1] == module.out_features else 'grouped'), None
  if isinstance(module, nnx.Linear):
    return 'dense', None
  if isinstance(module, nnx.BatchNorm):
    return 'batchnorm', types.SimpleNamespace(axis=module.axis)
  if isinstance(module, nnx.GroupNorm):
    return 'groupnorm', types.SimpleNamespace(
      group_size=module.group_size, num_groups=module.num_groups
    )
  if isinstance(module, nnx.InstanceNorm):
    axes = module.feature_axes
    axes = (axes,) if isinstance(axes, int) else tuple(axes)
    per_unit = tuple(a % x.ndim for a in axes) == (x.ndim - 1,)
    size = 1 if per_unit else x.shape[-1]
    return 'groupnorm', types.SimpleNamespace(group_size=size, num_groups=x.shape[-1] // size)
  return type(module).__name__, None  # LayerNorm, RMSNorm, the opaque layers


@contextlib.contextmanager
def intercepting(hook: Callable) -> Iterator[None]:
  """Routes every call of the :data:`LAYER_CLASSES` through ``hook(call, module, args, kwargs)``
  (``call(*args, **kwargs)`` runs the layer) while the context is open."""
  originals = {cls: cls.__dict__['__call__'] for cls in LAYER_CLASSES if '__call__' in cls.__dict__}

  def wrap(orig):
    @functools.wraps(orig)
    def wrapped(self, *args, **kwargs):
      return hook(functools.partial(orig, self), self, args, kwargs)

    return wrapped

  with _lock:
    try:
      for cls, orig in originals.items():
        setattr(cls, '__call__', wrap(orig))
      yield
    finally:
      for cls, orig in originals.items():
        setattr(cls, '__call__', orig)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray)) or hasattr(x, 'aval')


class _Discovery(auto._Discovery):  # pylint: disable=protected-access
  """:mod:`demp.auto`'s analysis, plus the NNX layers the units must not enter."""

  def mark(self, eqn) -> None:
    side, index = eqn.params['tag']
    call = self.calls[index]
    if call.kind not in OPAQUE:
      super().mark(eqn)
      return
    self.seen.add(index)
    if side == 'in':
      name = '/'.join(call.path)
      self.refuse(self.lay(eqn.invars[0]), f'read by {call.kind} {name!r}: {OPAQUE[call.kind]}')


def collections(state: nnx.State) -> dict[str, dict]:
  """Nested ``{collection: {name: ... leaf}}`` of a model's state, every key a string:
  ``nnx.Param`` -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``, any other variable
  type under its class name (the layout :mod:`demp.surgery` slices)."""
  out: dict[str, dict] = {}
  for path, var in nnx.to_flat_state(state):
    if isinstance(var, nnx.Param):
      col = 'params'
    elif isinstance(var, nnx.BatchStat):
      col = 'batch_stats'
    else:
      col = type(var).__name__
    node = out.setdefault(col, {})
    keys = path_str(path)
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = var.get_value()
  return out


def flat(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def discover(model: nnx.Module, args, kwargs) -> auto.Plan:
  """The unit groups of ``model`` (see :mod:`demp.nnx`): one abstract pass, in eval mode."""
  t0 = time.perf_counter()
  graphdef, state = nnx.split(model)
  calls: list[auto._Call] = []  # pylint: disable=protected-access
  depth = [0]
  mark = auto._mark_p.bind  # pylint: disable=protected-access

  def hook(run, module, a, kw, paths):
    if depth[0] or not a or not _is_array(a[0]):
      return run(*a, **kw)
    kind, attrs = kind_of(module, a[0])
    path = paths.get(id(module), (f'<{type(module).__name__} outside the model>',))
    call = auto._Call(len(calls), path, kind, attrs, tuple(a[0].shape))  # pylint: disable=protected-access
    calls.append(call)
    tag = ('in', call.index)
    if kind in OPAQUE:  # every array it reads is marked: the units may enter any of them
      a = jax.tree.map(lambda v: mark(v, tag=tag) if _is_array(v) else v, a)
      kw = jax.tree.map(lambda v: mark(v, tag=tag) if _is_array(v) else v, kw)
    else:
      a = (mark(a[0], tag=tag),) + tuple(a[1:])
    depth[0] += 1
    try:
      y = run(*a, **kw)
    finally:
      depth[0] -= 1
    if not _is_array(y):
      return y
    call.out_shape = tuple(y.shape)
    return mark(y, tag=('out', call.index))

  def forward(state):
    m = nnx.merge(graphdef, state)
    m.eval()
    with intercepting(functools.partial(hook, paths=module_paths(m))):
      return m(*args, **kwargs)

  closed = jax.make_jaxpr(forward)(state)
  eqns: list = []
  auto._flatten(closed.jaxpr, {}, eqns)  # pylint: disable=protected-access
  d = _Discovery(calls)
  for eqn in eqns:
    d.step(eqn)
  for atom in closed.jaxpr.outvars:
    d.refuse(d.lay(atom), 'its units reach the model output')
  variables = collections(state)
  return auto._finish(d, variables, time.perf_counter() - t0)  # pylint: disable=protected-access
