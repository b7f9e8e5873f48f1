"""Dense against pruned inference, side by side: latency and throughput of exported functions.

    python -m scripts.export --workdir RUN --out DIR --benchmark

Each variant's inference function (:func:`demp.export.inference_fn`, optionally
BatchNorm-folded) is exported and timed in interleaved rounds.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from demp import export, flops, models
from demp.trainer import export as run_export

PyTree = Any

BENCHMARK = 'export_benchmark.json'


BENCHMARK = 'export_benchmark.json'


class Variant(NamedTuple):
  name: str
  model: nn.Module
  variables: PyTree
  folded: bool = False


def _random_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict:
  from tools import benchmark  # pylint: disable=g-import-not-at-top

  return benchmark.numpy_init(model, jnp.zeros((1, *input_shape), jnp.float32), seed)


def benchmark(
  variants: Sequence[Variant],
  input_shape: Sequence[int],
  *,
  batch_sizes: Sequence[int] = (1, 256),
  rounds: int = 5,
  round_s: float = 0.3,
) -> list[dict[str, Any]]:
  """Latency and throughput of each variant's exported inference function, interleaved.

  Every variant is exported (params as constants, as shipped), serialized,
  deserialized and compiled per batch size; then ``rounds`` rounds run each
  variant in turn for about ``round_s`` seconds (at least one call). A
  variant's latency is the median over rounds of its per-call mean; ratios are
  to the first variant (the dense model). FLOPs come from XLA's cost analysis
  of the same compiled call; sizes are of the serialized function and of the
  variables written with orbax.
  """
  prepared = []
  with tempfile.TemporaryDirectory() as tmp:
    for v in variants:
      blob = export.export_inference(
        export.inference_fn(v.model, v.variables, folded=v.folded), input_shape, platforms=None
      ).serialize()
      path = os.path.join(tmp, v.name)
      export.save_variables(path, v.variables)
      prepared.append(
        {
          'variant': v,
          'exported': jax.export.deserialize(blob),
          'inference_bytes': len(blob),
          'variables_bytes': _dir_bytes(path),
          'params': flops.num_params(v.variables['params']),
        }
      )
  rows = []
  for batch in batch_sizes:
    x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, *input_shape)), jnp.float32)
    runs = []
    for p in prepared:
      t0 = time.perf_counter()
      compiled = jax.jit(p['exported'].call).lower(x).compile()
      compile_s = time.perf_counter() - t0
      jax.block_until_ready(compiled(x))  # warm-up
      t0 = time.perf_counter()
      jax.block_until_ready(compiled(x))  # calibrates the calls per round
      once = max(time.perf_counter() - t0, 1e-6)
      runs.append(
        {
          'p': p,
          'fn': compiled,
          'calls': max(1, int(round_s / once)),
          'times': [],
          'flops': flops.compiled_flops(compiled),
          'compile_s': compile_s,
        }
      )
    for _ in range(rounds):
      for r in runs:
        t0 = time.perf_counter()
        for _ in range(r['calls']):
          out = r['fn'](x)
        jax.block_until_ready(out)
        r['times'].append((time.perf_counter() - t0) / r['calls'])
    base_t, base_f = float(np.median(runs[0]['times'])), runs[0]['flops']
    base_p = runs[0]['p']
    for r in runs:
      p, t = r['p'], float(np.median(r['times']))
      rows.append(
        {
          'variant': p['variant'].name,
          'batch': batch,
          'latency_s': t,
          'throughput_per_s': batch / t,
          'time_ratio': t / base_t,
          'flops': r['flops'],
          'flop_ratio': r['flops'] / base_f if base_f else float('nan'),
          'params': p['params'],
          'param_ratio': p['params'] / base_p['params'],
          'inference_bytes': p['inference_bytes'],
          'variables_bytes': p['variables_bytes'],
          'calls_per_round': r['calls'],
          'round_latencies_s': r['times'],
          'compile_s': r['compile_s'],
        }
      )
  return rows


def format_benchmark_table(rows: Sequence[Mapping[str, Any]]) -> str:
  lines = [
    '| variant | batch | latency [ms] | throughput [img/s] | time ratio | FLOP ratio | '
    'params | inference.jax [MB] | variables [MB] |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  for r in rows:
    lines.append(
      f"| {r['variant']} | {r['batch']} | {1e3 * r['latency_s']:.2f} | "
      f"{r['throughput_per_s']:.1f} | {r['time_ratio']:.3f} | {r['flop_ratio']:.3f} | "
      f"{r['params']:,} | {r['inference_bytes'] / 1e6:.2f} | "
      f"{r['variables_bytes'] / 1e6:.2f} |"
    )
  return '\n'.join(lines)


def benchmark_run(
  workdir: str,
  *,
  fold_bn: bool = False,
  batch_sizes: Sequence[int] = (1, 256),
  rounds: int = 5,
  round_s: float = 0.3,
  seed: int = 0,
) -> dict[str, Any]:
  """Dense (the run's dense widths, fresh params) vs the run's final network; writes
  ``<workdir>/export_benchmark.json`` and returns it."""
  model, variables, meta = run_export.load_run(workdir)
  input_shape = [int(d) for d in meta['model']['input_shape']]
  dense = run_export.dense_model(model, meta)
  variants = [
    Variant('dense', dense, _random_variables(dense, input_shape, seed)),
    Variant('pruned', model, variables),
  ]
  if fold_bn:
    variants.append(
      Variant(
        'pruned+fold_bn',
        model,
        export.fold_batch_norm(model, variables, input_shape)[0],
        folded=True,
      )
    )
  rows = benchmark(variants, input_shape, batch_sizes=batch_sizes, rounds=rounds, round_s=round_s)
  result = _benchmark_record(rows, model, dense, input_shape, rounds, workdir=workdir)
  with open(os.path.join(workdir, BENCHMARK), 'w') as f:
    json.dump(result, f, indent=2)
  return result


def benchmark_random(
  model_name: str,
  sparsity: float,
  *,
  num_classes: int = 10,
  image_size: int = 32,
  model_kwargs: Mapping[str, Any] | None = None,
  fold_bn: bool = False,
  batch_sizes: Sequence[int] = (1, 256),
  rounds: int = 5,
  round_s: float = 0.3,
  seed: int = 0,
) -> dict[str, Any]:
  """The same benchmark for a model at full width vs a copy with ``sparsity`` of every unit
  group's units removed at random by the surgery (random params: values do not change timings)."""
  from demp import surgery
  from tools import benchmark as bench  # pylint: disable=g-import-not-at-top

  input_shape = [image_size, image_size, 3]
  dense = models.build(model_name, num_classes, **dict(model_kwargs or {}))
  dense_vars = _random_variables(dense, input_shape, seed)
  keeps = bench.random_keeps(dense, sparsity, seed)
  variables = surgery.slice_variables(dense_vars, dense.unit_groups(), keeps)
  widths = {**dense.widths, **{k: int(np.sum(v)) for k, v in keeps.items()}}
  model = dense.clone(widths=flax.core.FrozenDict(widths))
  variants = [Variant('dense', dense, dense_vars), Variant('pruned', model, variables)]
  if fold_bn:
    variants.append(
      Variant(
        'pruned+fold_bn',
        model,
        export.fold_batch_norm(model, variables, input_shape)[0],
        folded=True,
      )
    )
  rows = benchmark(variants, input_shape, batch_sizes=batch_sizes, rounds=rounds, round_s=round_s)
  return _benchmark_record(rows, model, dense, input_shape, rounds, sparsity=sparsity)


def _benchmark_record(rows, model, dense, input_shape, rounds, **extra) -> dict[str, Any]:
  return {
    'rows': rows,
    'model': type(model).__name__,
    'widths': dict(model.widths),
    'dense_widths': dict(dense.widths),
    'neuron_sparsity': flops.neuron_sparsity(model.widths, dense.widths),
    'input_shape': list(input_shape),
    'rounds': rounds,
    'devices': [str(d) for d in jax.devices()],
    'jax_version': jax.__version__,
    **extra,
  }


def _dir_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
