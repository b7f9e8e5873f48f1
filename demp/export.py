"""Ship the final network of a run: architecture, variables, a self-contained inference function.

:func:`export_run` reads a finished run's last checkpoint and writes to a directory:

* ``architecture.json``: model name and kwargs, final and dense widths, input
  shape, number of classes, dtype, parameter counts, the BatchNorm folding
  report, how the artifact was checked (see :func:`export_run`);
* ``variables/``: ``params`` and ``batch_stats`` only (no optimizer state), an
  orbax ``StandardCheckpointer`` directory;
* ``inference.jax``: ``jax.export`` of ``x -> logits`` (StableHLO, parameters
  embedded as constants, batch dimension symbolic ``b``), the bytes of
  ``Exported.serialize()``. It needs JAX and nothing of this project::

      import jax, numpy as np
      with open('inference.jax', 'rb') as f:
        infer = jax.export.deserialize(bytearray(f.read()))
      logits = infer.call(np.zeros((7, 32, 32, 3), np.float32))   # any batch size

:func:`load_exported` rebuilds the Flax module at its final widths and its
variables (this needs ``demp``).

BatchNorm folding (``fold_bn=True``) is a parameter transformation plus one
interception, with no change to the model code: an abstract forward pass,
traced under :func:`flax.linen.intercept_methods`, finds every BatchNorm whose
input *is* the output array of a ``Conv`` or ``Dense`` (and that normalizes the
last axis). For each such pair the linear layer's kernel is scaled per output
channel and the BN becomes a bias::

    s = γ / sqrt(var + eps)
    w' = w · s          (over the output-channel axis)
    b' = (b - mean) · s + β        (b = the linear layer's bias, 0 without one)

In the folded variables the BN's ``params`` hold only ``bias = b'`` and it has
no batch statistics; at apply time a method interceptor replaces such a BN's
``__call__`` by ``x + b'``. A BN whose input is not a linear layer's output, a
LayerNorm (per-example statistics: nothing constant to fold) and any other
normalization are left as they are, and the report says why. The folded
function is checked against the unfolded one on random inputs before anything
is written (this also catches a linear output used elsewhere too, which the
tracing does not see).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from demp import models

PyTree = Any

FORMAT = 1
"""Version of the export layout; :func:`load_exported` rejects another."""

ARCHITECTURE = 'architecture.json'
VARIABLES = 'variables'
INFERENCE = 'inference.jax'
DEFAULT_PLATFORMS = ('cpu', 'cuda')
LINEAR_TYPES = (nn.Conv, nn.Dense)
VERIFY_TOLERANCE = 1e-4
"""Largest allowed |exported - Flax| logit difference on the check inputs, x max(1, |logits|)."""


class ExportCheckError(RuntimeError):
  """The written artifact does not reproduce the Flax model's logits."""


# ----------------------------------------------------------------------------
# Reading a finished run.


# ----------------------------------------------------------------------------
# BatchNorm folding.


def _path(module: nn.Module) -> tuple[str, ...]:
  return tuple(module.path)


def trace_normalizations(
  model: nn.Module, variables: PyTree, input_shape: Sequence[int]
) -> list[dict[str, Any]]:
  """Every normalization layer of an eval-mode forward pass, in call order.

  Each entry: ``layer`` (module path, '/'-joined), ``kind`` (class name),
  ``producer`` (path of the Conv/Dense whose output array is the layer's input,
  or None), and for BatchNorm ``epsilon``, ``axis``. No compute (abstract pass).
  """
  outputs: list[tuple[Any, tuple[str, ...]]] = []  # (array, producer path); keeps arrays alive
  found: list[dict[str, Any]] = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if isinstance(module, LINEAR_TYPES):
      out = next_fun(*args, **kwargs)
      outputs.append((out, _path(module)))
      return out
    if isinstance(module, (nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
      x = args[0]
      producer = next((p for o, p in outputs if o is x), None)
      entry = {
        'layer': '/'.join(_path(module)),
        'kind': type(module).__name__,
        'producer': '/'.join(producer) if producer else None,
      }
      if isinstance(module, nn.BatchNorm):
        entry.update(epsilon=float(module.epsilon), axis=module.axis)
      found.append(entry)
    return next_fun(*args, **kwargs)

  def forward(v, x):
    with nn.intercept_methods(interceptor):
      return model.apply(v, x, train=False)

  jax.eval_shape(forward, variables, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return found


def _why_not(entry: Mapping[str, Any]) -> str | None:
  if entry['kind'] != 'BatchNorm':
    return (
      f'{entry["kind"]} normalizes with statistics of each example: there is no '
      f'inference-time constant to fold'
    )
  if entry['producer'] is None:
    return 'its input is not the output of a Conv or Dense layer'
  if entry['axis'] not in (-1,):
    return f'it normalizes axis {entry["axis"]}, not the output-channel axis (-1)'
  return None


def _get(tree: Mapping, path: Sequence[str]) -> Any:
  for p in path:
    tree = tree[p]
  return tree


def _copy(tree):
  return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def fold_batch_norm(
  model: nn.Module, variables: PyTree, input_shape: Sequence[int]
) -> tuple[dict, dict[str, list]]:
  """``(folded variables, report)``; apply the former with :func:`apply_folded`.

  ``report``: ``folded`` (``[linear layer, BN]`` path pairs) and ``not_folded``
  (``{'layer', 'kind', 'reason'}``). See the module docstring for the maths.
  """
  entries = trace_normalizations(model, variables, input_shape)
  params = _copy(flax.core.unfreeze(variables['params']))
  stats = _copy(flax.core.unfreeze(variables.get('batch_stats', {})))
  report: dict[str, list] = {'folded': [], 'not_folded': []}
  for entry in entries:
    reason = _why_not(entry)
    if reason is not None:
      report['not_folded'].append(
        {'layer': entry['layer'], 'kind': entry['kind'], 'reason': reason}
      )
      continue
    lin, bn = entry['producer'].split('/'), entry['layer'].split('/')
    lin_p, bn_p, bn_s = _get(params, lin), _get(params, bn), _get(stats, bn)
    kernel = np.asarray(lin_p['kernel'], np.float64)
    n = kernel.shape[-1]
    gamma = np.asarray(bn_p.get('scale', np.ones(n)), np.float64)
    beta = np.asarray(bn_p.get('bias', np.zeros(n)), np.float64)
    mean, var = np.asarray(bn_s['mean'], np.float64), np.asarray(bn_s['var'], np.float64)
    bias = np.asarray(lin_p.get('bias', np.zeros(n)), np.float64)
    s = gamma / np.sqrt(var + entry['epsilon'])
    dtype = np.asarray(lin_p['kernel']).dtype
    lin_p['kernel'] = jnp.asarray(kernel * s, dtype)
    if 'bias' in lin_p:
      lin_p['bias'] = jnp.zeros((n,), dtype)
    parent_p, parent_s = _get(params, bn[:-1]), _get(stats, bn[:-1])
    parent_p[bn[-1]] = {'bias': jnp.asarray((bias - mean) * s + beta, dtype)}
    del parent_s[bn[-1]]
    report['folded'].append([entry['producer'], entry['layer']])
  folded = {'params': params}
  stats = _prune_empty(stats)
  if stats:
    folded['batch_stats'] = stats
  return folded, report


def _prune_empty(tree):
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      v = _prune_empty(v)
      if not v:
        continue
    out[k] = v
  return out


def _folded_interceptor(next_fun, args, kwargs, context):
  module = context.module
  if (
    isinstance(module, nn.BatchNorm)
    and context.method_name == '__call__'
    and not module.has_variable('batch_stats', 'mean')
  ):
    x = args[0]  # a folded BN: only its bias is left
    return x + jnp.reshape(module.get_variable('params', 'bias'), (1,) * (x.ndim - 1) + (-1,))
  return next_fun(*args, **kwargs)


def apply_folded(model: nn.Module, folded_variables: PyTree, x: jax.Array) -> jax.Array:
  """Eval-mode logits of ``model`` with the variables of :func:`fold_batch_norm`."""
  with nn.intercept_methods(_folded_interceptor):
    return model.apply(folded_variables, x, train=False)


def inference_fn(
  model: nn.Module, variables: PyTree, *, folded: bool = False
) -> Callable[[jax.Array], jax.Array]:
  """``x -> logits`` (eval mode) with ``variables`` closed over."""
  if folded:
    return lambda x: apply_folded(model, variables, x)
  return lambda x: model.apply(variables, x, train=False)


# ----------------------------------------------------------------------------
# jax.export.


def export_inference(
  fn: Callable[[jax.Array], jax.Array],
  input_shape: Sequence[int],
  *,
  dtype: str = 'float32',
  platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
) -> jax.export.Exported:
  """``jax.export`` of ``fn`` for inputs ``[b, *input_shape]`` with a symbolic batch ``b``."""
  (b,) = jax.export.symbolic_shape('b')
  spec = jax.ShapeDtypeStruct((b, *map(int, input_shape)), jnp.dtype(dtype))
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms) if platforms else None)(spec)


def load_inference(directory: str) -> jax.export.Exported:
  """The ``jax.export.Exported`` in ``directory`` (only JAX is needed for this part)."""
  with open(os.path.join(directory, INFERENCE), 'rb') as f:
    return jax.export.deserialize(bytearray(f.read()))


def check_close(name: str, got, want, tolerance: float) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  diff = float(np.max(np.abs(got - want)))
  scale = max(1.0, float(np.max(np.abs(want))))
  if not diff <= tolerance * scale:
    raise ExportCheckError(
      f'{name}: max |logits - Flax logits| = {diff:.3g} on the check inputs, '
      f'above {tolerance:g} x max(1, |logits|) = {tolerance * scale:.3g}; '
      f'nothing usable was written.'
    )
  return diff


# ----------------------------------------------------------------------------
# Export and load.


def saved_collections(variables: PyTree) -> dict:
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats') and v}


def save_variables(directory: str, variables: PyTree) -> None:
  """``params`` / ``batch_stats`` with orbax ``StandardCheckpointer`` into ``directory`` (new)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), jax.tree.map(np.asarray, saved_collections(variables)))
  ckptr.wait_until_finished()
  ckptr.close()


def read_json(path: str) -> dict | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


class Exported(NamedTuple):
  """What :func:`load_exported` returns: the Flax module at its final widths and its variables."""

  model: nn.Module
  variables: dict
  architecture: dict

  def apply(self, x: jax.Array) -> jax.Array:
    """Eval-mode logits."""
    return self.model.apply(self.variables, x, train=False)


def build_model(architecture: Mapping[str, Any]) -> nn.Module:
  """The Flax module of an ``architecture.json`` (the same class, at the final widths)."""
  model = models.build(
    architecture['model'], int(architecture['num_classes']), **architecture['kwargs']
  )
  return model.clone(
    widths=flax.core.FrozenDict({k: int(v) for k, v in architecture['widths'].items()})
  )


def load_exported(directory: str) -> Exported:
  """Rebuilds the module of an export directory and restores its variables (shapes checked)."""
  architecture = read_json(os.path.join(directory, ARCHITECTURE))
  if architecture is None:
    raise FileNotFoundError(
      f'{directory} has no {ARCHITECTURE}: not an export directory '
      f'(write one with python -m scripts.export).'
    )
  if architecture.get('format') != FORMAT:
    raise ValueError(
      f'{directory}/{ARCHITECTURE} has format {architecture.get("format")!r}; '
      f'this code reads format {FORMAT}.'
    )
  model = build_model(architecture)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.key(0),
      jnp.zeros((1, *architecture['input_shape']), architecture['dtype']),
      train=False,
    )
  )
  target = {k: shapes[k] for k in architecture['variables']['collections']}
  ckptr = ocp.StandardCheckpointer()
  variables = ckptr.restore(os.path.abspath(os.path.join(directory, VARIABLES)), target)
  ckptr.close()
  return Exported(model=model, variables=variables, architecture=architecture)


# ----------------------------------------------------------------------------
# Benchmark: dense vs pruned inference, side by side.


__all__ = [
  'ARCHITECTURE',
  'ExportCheckError',
  'Exported',
  'FORMAT',
  'INFERENCE',
  'VARIABLES',
  'apply_folded',
  'build_model',
  'export_inference',
  'fold_batch_norm',
  'inference_fn',
  'load_exported',
  'load_inference',
  'trace_normalizations',
]
