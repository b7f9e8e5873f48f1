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
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from demp import checkpoint, metrics, models

PyTree = Any

FORMAT = 1
"""Version of the export layout; :func:`load_exported` rejects another."""

ARCHITECTURE = 'architecture.json'
VARIABLES = 'variables'
INFERENCE = 'inference.jax'
BENCHMARK = 'export_benchmark.json'
DEFAULT_PLATFORMS = ('cpu', 'cuda')
LINEAR_TYPES = (nn.Conv, nn.Dense)
VERIFY_TOLERANCE = 1e-4
"""Largest allowed |exported - Flax| logit difference on the check inputs, x max(1, |logits|)."""


class NotExportableError(ValueError):
  """The workdir holds no finished run with a checkpoint."""


class ExportCheckError(RuntimeError):
  """The written artifact does not reproduce the Flax model's logits."""


# ----------------------------------------------------------------------------
# Reading a finished run.


def load_run(workdir: str) -> tuple[nn.Module, dict, dict]:
  """``(model, variables, meta)`` of the final checkpoint of a finished run.

  Raises :class:`NotExportableError` naming ``workdir`` when it has no
  checkpoint or when the latest one is before ``num_steps``.
  """
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = _checkpoint_steps(ckpt_dir)
  if not steps:
    trained = os.path.exists(os.path.join(workdir, 'summary.json'))
    why = (
      'the run finished but saved no checkpoint (checkpoint.every=0 saves only on SIGTERM)'
      if trained
      else 'there is no run there'
    )
    raise NotExportableError(
      f'cannot export {workdir}: no checkpoint in {ckpt_dir} ({why}). Train with '
      f'checkpoint.every > 0 (e.g. --config.checkpoint.every=<num_steps>): the trainer then '
      f'saves the final network at the last step.'
    )
  model, variables, meta = checkpoint.load(workdir)
  num_steps = int(meta['config']['num_steps'])
  if meta['step'] < num_steps:
    raise NotExportableError(
      f'cannot export {workdir}: the run is not finished (its latest checkpoint is step '
      f'{meta["step"]} of num_steps={num_steps}). Run the trainer again with the same config '
      f'and workdir to finish it (it resumes from that checkpoint), then export.'
    )
  return model, variables, meta


def _checkpoint_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def dense_model(model: nn.Module, meta: Mapping[str, Any]) -> nn.Module:
  """The run's model at its dense (initial) widths, built from the saved config."""
  kwargs = {k: v for k, v in meta['config']['model'].items() if k != 'name'}
  dense = models.build(meta['config']['model']['name'], int(meta['model']['num_classes']), **kwargs)
  if set(dense.widths) != set(model.widths):
    raise ValueError(
      f'the config builds groups {sorted(dense.widths)}, the checkpoint has {sorted(model.widths)}.'
    )
  return dense


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


def _check(name: str, got, want, tolerance: float) -> float:
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


def _dir_bytes(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _collections(variables: PyTree) -> dict:
  return {k: v for k, v in variables.items() if k in ('params', 'batch_stats') and v}


def save_variables(directory: str, variables: PyTree) -> None:
  """``params`` / ``batch_stats`` with orbax ``StandardCheckpointer`` into ``directory`` (new)."""
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.abspath(directory), jax.tree.map(np.asarray, _collections(variables)))
  ckptr.wait_until_finished()
  ckptr.close()


def export_run(
  workdir: str,
  out: str,
  *,
  fold_bn: bool = False,
  platforms: Sequence[str] | None = DEFAULT_PLATFORMS,
  check_batch: int = 8,
  overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the final network of the finished run in ``workdir`` to ``out``; returns its spec.

  Before writing, the inference function is exported, deserialized and run on
  ``check_batch`` random inputs against the Flax model (unfolded); the largest
  logit difference is recorded in ``architecture.json['check']`` and an error
  raised above :data:`VERIFY_TOLERANCE` (relative to max(1, |logits|)).

  Args:
    workdir: a run's workdir (``train_and_evaluate``) with a final checkpoint.
    out: the export directory (created; must not hold an export unless ``overwrite``).
    fold_bn: fold each BatchNorm that directly follows a Conv/Dense into it
      (the inference function only; ``variables/`` keeps the trained values).
    platforms: ``jax.export`` lowering platforms (None: this machine's).
    check_batch: number of random check inputs.
    overwrite: replace an existing export in ``out``.
  """
  model, variables, meta = load_run(workdir)
  input_shape = [int(d) for d in meta['model']['input_shape']]
  if any(os.path.exists(os.path.join(out, n)) for n in (ARCHITECTURE, VARIABLES, INFERENCE)):
    if not overwrite:
      raise FileExistsError(
        f'{out} already holds an export; choose another --out or pass --overwrite.'
      )
    for name in (ARCHITECTURE, INFERENCE):
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, VARIABLES), ignore_errors=True)
  os.makedirs(out, exist_ok=True)
  dtype = str(jax.tree.leaves(variables['params'])[0].dtype)
  report = None
  infer_vars = variables
  if fold_bn:
    infer_vars, report = fold_batch_norm(model, variables, input_shape)
  exported = export_inference(
    inference_fn(model, infer_vars, folded=fold_bn), input_shape, dtype=dtype, platforms=platforms
  )
  blob = exported.serialize()

  x = np.random.default_rng(0).normal(size=(check_batch, *input_shape)).astype(dtype)
  want = jax.jit(inference_fn(model, variables))(x)
  diff = _check(
    'the exported function', jax.export.deserialize(blob).call(x), want, VERIFY_TOLERANCE
  )

  with open(os.path.join(out, INFERENCE), 'wb') as f:
    f.write(blob)
  save_variables(os.path.join(out, VARIABLES), variables)
  dense = dense_model(model, meta)
  summary = _read_json(os.path.join(workdir, 'summary.json')) or {}
  data = meta['config'].get('data', {})
  architecture = {
    'format': FORMAT,
    'model': meta['config']['model']['name'],
    'kwargs': {k: v for k, v in meta['config']['model'].items() if k != 'name'},
    'widths': {k: int(v) for k, v in model.widths.items()},
    'dense_widths': {k: int(v) for k, v in dense.widths.items()},
    'input_shape': input_shape,
    'num_classes': int(meta['model']['num_classes']),
    'dtype': dtype,
    'input': (
      'images [b, H, W, C] preprocessed as the run\'s data pipeline does (demp.data: '
      'scaled to [0, 1], then standardized per channel when data.normalize)'
    ),
    'data': {k: data.get(k) for k in ('source', 'name', 'image_size', 'normalize')},
    'params': metrics.num_params(variables['params']),
    'dense_params': metrics.num_params(
      jax.eval_shape(
        lambda: dense.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
      )['params']
    ),
    'run': {
      'step': int(meta['step']),
      'method': meta['config'].get('method'),
      'test_accuracy': summary.get('test_accuracy'),
    },
    'variables': {
      'path': VARIABLES,
      'format': 'orbax StandardCheckpointer',
      'collections': sorted(_collections(variables)),
    },
    'inference': {
      'path': INFERENCE,
      'format': 'jax.export serialized (StableHLO)',
      'platforms': list(exported.platforms),
      'batch_dim': 'b (symbolic)',
      'fold_bn': bool(fold_bn),
      'calling_convention_version': exported.calling_convention_version,
    },
    'fold_bn': report,
    'check': {
      'inputs': f'{check_batch} standard-normal images (seed 0)',
      'max_abs_diff_vs_flax': diff,
    },
    'jax_version': jax.__version__,
  }
  with open(os.path.join(out, ARCHITECTURE), 'w') as f:
    json.dump(architecture, f, indent=2)
  return architecture


def _read_json(path: str) -> dict | None:
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
  architecture = _read_json(os.path.join(directory, ARCHITECTURE))
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


class Variant(NamedTuple):
  name: str
  model: nn.Module
  variables: PyTree
  folded: bool = False


def _random_variables(model: nn.Module, input_shape: Sequence[int], seed: int = 0) -> dict:
  from demp import benchmark  # pylint: disable=g-import-not-at-top

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
      blob = export_inference(
        inference_fn(v.model, v.variables, folded=v.folded), input_shape, platforms=None
      ).serialize()
      path = os.path.join(tmp, v.name)
      save_variables(path, v.variables)
      prepared.append(
        {
          'variant': v,
          'exported': jax.export.deserialize(blob),
          'inference_bytes': len(blob),
          'variables_bytes': _dir_bytes(path),
          'params': metrics.num_params(v.variables['params']),
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
          'flops': metrics.compiled_flops(compiled),
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
  model, variables, meta = load_run(workdir)
  input_shape = [int(d) for d in meta['model']['input_shape']]
  dense = dense_model(model, meta)
  variants = [
    Variant('dense', dense, _random_variables(dense, input_shape, seed)),
    Variant('pruned', model, variables),
  ]
  if fold_bn:
    variants.append(
      Variant(
        'pruned+fold_bn', model, fold_batch_norm(model, variables, input_shape)[0], folded=True
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
  from demp import benchmark as bench, surgery  # pylint: disable=g-import-not-at-top

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
        'pruned+fold_bn', model, fold_batch_norm(model, variables, input_shape)[0], folded=True
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
    'neuron_sparsity': metrics.neuron_sparsity(model.widths, dense.widths),
    'input_shape': list(input_shape),
    'rounds': rounds,
    'devices': [str(d) for d in jax.devices()],
    'jax_version': jax.__version__,
    **extra,
  }


__all__ = [
  'ARCHITECTURE',
  'BENCHMARK',
  'ExportCheckError',
  'Exported',
  'FORMAT',
  'INFERENCE',
  'NotExportableError',
  'VARIABLES',
  'Variant',
  'apply_folded',
  'benchmark',
  'benchmark_random',
  'benchmark_run',
  'build_model',
  'dense_model',
  'export_inference',
  'export_run',
  'fold_batch_norm',
  'format_benchmark_table',
  'inference_fn',
  'load_exported',
  'load_inference',
  'load_run',
  'trace_normalizations',
]
