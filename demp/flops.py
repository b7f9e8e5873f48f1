"""FLOP counting: XLA's cost analysis of compiled functions, and hand counts.

The numbers the summaries and tables report come from XLA: a function is
compiled ahead of time for abstract shapes (no arrays needed, so the dense
model's cost is known after its units are gone) and its ``cost_analysis()``
read. Hand counts of the two layers that dominate, to test XLA against:

* dense ``[B, K] @ [K, N]``: ``2·B·K·N`` (a multiply-accumulate is 2 FLOPs);
* convolution: ``2·C_in·C_out`` per *non-padded* kernel tap per output
  position -- XLA does not count multiplications by the zero padding, so a
  3x3 'SAME' convolution over 8x8 costs ``2·C_in·C_out·22²`` per image, not
  ``2·C_in·C_out·9·64``.

Elementwise work is counted by XLA too (a bias add or a ReLU is 1 FLOP per
element; an eval-mode BatchNorm about 3 per element plus a few per channel).

Example::

    >>> import flax.linen as nn, jax, jax.numpy as jnp
    >>> layer = nn.Dense(100, use_bias=False)
    >>> x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    >>> v = jax.eval_shape(layer.init, jax.random.key(0), x)
    >>> xla_flops(layer.apply, v, x) == dense_flops(8, 64, 100)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


# ----------------------------------------------------------------------------
# Hand counts.


def dense_flops(batch: int, d_in: int, d_out: int, *, bias: bool = False) -> int:
  """FLOPs of ``x_bk @ w_kn (+ b_n)``: ``2·B·K·N`` (+ ``B·N`` for the bias)."""
  return 2 * batch * d_in * d_out + (batch * d_out if bias else 0)


def _valid_taps(size_in: int, kernel: int, stride: int, pad_lo: int, size_out: int) -> int:
  """Σ over output positions of the kernel taps that land inside the input."""
  total = 0
  for o in range(size_out):
    first = o * stride - pad_lo
    total += sum(0 <= first + j < size_in for j in range(kernel))
  return total


def conv_output_size(
  size_in: int, kernel: int, stride: int, padding: str | tuple[int, int]
) -> tuple[int, int]:
  """``(size_out, pad_lo)`` of one spatial axis, for 'SAME', 'VALID' or ``(lo, hi)``."""
  if padding == 'SAME':
    size_out = -(-size_in // stride)
    pad_total = max((size_out - 1) * stride + kernel - size_in, 0)
    return size_out, pad_total // 2
  if padding == 'VALID':
    return (size_in - kernel) // stride + 1, 0
  if isinstance(padding, (tuple, list)) and len(padding) == 2:
    lo, hi = padding
    return (size_in + lo + hi - kernel) // stride + 1, lo
  raise ValueError(f'padding={padding!r} is not one of SAME, VALID or a (lo, hi) pair.')


def conv_flops(
  batch: int,
  in_hw: Sequence[int],
  kernel_hw: Sequence[int],
  c_in: int,
  c_out: int,
  *,
  strides: Sequence[int] = (1, 1),
  padding: str | Sequence[tuple[int, int]] = 'SAME',
  bias: bool = False,
) -> int:
  """FLOPs of a (non-dilated, ungrouped) convolution the way XLA counts them.

  ``2·B·C_in·C_out·Π_axes(Σ_output positions valid taps)`` (+ ``B·H'·W'·C_out``
  for the bias), where a tap is valid when it reads the input, not padding.
  """
  pads = [padding] * len(in_hw) if isinstance(padding, str) else list(padding)
  taps, out_elems = 1, 1
  for size, k, s, p in zip(in_hw, kernel_hw, strides, pads, strict=True):
    size_out, pad_lo = conv_output_size(size, k, s, p)
    taps *= _valid_taps(size, k, s, pad_lo, size_out)
    out_elems *= size_out
  return 2 * batch * c_in * c_out * taps + (batch * out_elems * c_out if bias else 0)


# ----------------------------------------------------------------------------
# XLA cost analysis.


def compiled_flops(compiled) -> float:
  """FLOPs of one call of an AOT-compiled function, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get('flops', float('nan')))


def abstract(tree: PyTree) -> PyTree:
  """``ShapeDtypeStruct`` leaves of a tree of arrays (or of structs)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def xla_flops(fn: Callable, *args) -> float:
  """XLA's FLOPs of ``fn(*args)``; ``args`` may be abstract (``ShapeDtypeStruct``)."""
  return compiled_flops(jax.jit(fn).lower(*abstract(args)).compile())


def lowered_flops(fn: Callable, *args) -> float:
  """XLA's FLOPs of ``fn(*args)`` from the lowered program, without compiling it.

  The count of the unoptimized HLO: the same operations as :func:`xla_flops`
  before fusion (equal for the models here, see tests/test_flops.py). Used where a
  compile would be one too many (a step run inside a ``lax.scan``, whose compiled
  cost counts the loop body once).
  """
  return compiled_flops(jax.jit(fn).lower(*abstract(args)))


def variables_shape(model, image_shape: Sequence[int]) -> PyTree:
  """Abstract ``init`` variables of ``model`` (no memory, no compute)."""
  dummy = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)


def forward_flops(model, image_shape: Sequence[int], batch_size: int = 1) -> float:
  """XLA's FLOPs of the eval-mode forward pass of ``batch_size`` images."""
  variables = variables_shape(model, image_shape)
  x = jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), jnp.float32)
  return xla_flops(lambda v, x: model.apply(v, x, train=False), variables, x)


def at_widths(model, widths: Mapping[str, int]):
  """``model`` rebuilt at other widths (the same class, a different spec)."""
  return model.clone(widths=flax.core.FrozenDict({k: int(v) for k, v in widths.items()}))


def params_at(model, widths: Mapping[str, int], image_shape: Sequence[int]) -> int:
  """Parameters of ``model`` rebuilt at ``widths`` (from shapes: nothing is compiled)."""
  pruned = at_widths(model, widths)
  x = jnp.zeros((1, *image_shape))
  shapes = jax.eval_shape(lambda: pruned.init(jax.random.key(0), x, train=False))
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(shapes['params'])))


def inference_flops(
  model, dense_widths: Mapping[str, int], image_shape: Sequence[int]
) -> dict[str, float]:
  """Per-image eval FLOPs of ``model`` and of its dense version, and their ratio.

  The dense eval step is compiled here once, from abstract shapes.
  """
  final = forward_flops(model, image_shape)
  dense = (
    final
    if dict(model.widths) == dict(dense_widths)
    else forward_flops(at_widths(model, dense_widths), image_shape)
  )
  return {
    'inference_flops': final,
    'inference_flops_dense': dense,
    'inference_flops_rel': final / dense if dense else float('nan'),
  }


def num_params(params: PyTree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def num_nonzero(params: PyTree) -> int:
  return int(sum(int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(params)))


def neuron_sparsity(widths: Mapping[str, int], dense_widths: Mapping[str, int]) -> float:
  """Fraction of prunable units removed (over every unit group)."""
  return 1.0 - sum(widths.values()) / sum(dense_widths.values())


def weight_sparsity(params: PyTree, dense_num_params: int) -> float:
  """1 - (nonzero parameters now) / (parameters of the dense model), over all weights.

  Counts both physically removed weights (structured methods) and weights held
  at zero by a mask (unstructured methods).
  """
  return 1.0 - num_nonzero(params) / dense_num_params
