"""Export a finished training run: its final checkpoint -> an export directory.

    python -m scripts.export --workdir RUN --out DIR [--fold_bn]

`export_run` reads the run's final network (``<workdir>/final``, or the last
checkpoint) and
writes it with :mod:`demp.export` (architecture, variables, a self-contained
inference function), after checking the exported function against the Flax
model.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from demp import flops, models
from demp.export import (
  ARCHITECTURE,
  DEFAULT_PLATFORMS,
  FORMAT,
  INFERENCE,
  VARIABLES,
  VERIFY_TOLERANCE,
  check_close,
  export_inference,
  fold_batch_norm,
  inference_fn,
  read_json,
  save_variables,
  saved_collections,
)
from demp.trainer import checkpoint


class NotExportableError(ValueError):
  """The workdir holds no finished run with a checkpoint."""


def load_run(workdir: str) -> tuple[nn.Module, dict, dict]:
  """``(model, variables, meta)`` of the final network of a finished run.

  The run's final save (``<workdir>/final``, written at the end of every run with
  ``checkpoint.final``, the default), else its last checkpoint. Raises
  :class:`NotExportableError` naming ``workdir`` when it has neither, or when the
  latest checkpoint is before ``num_steps``.
  """
  if os.path.exists(os.path.join(workdir, checkpoint.FINAL, 'meta.json')):
    return checkpoint.load_final(workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  steps = _checkpoint_steps(ckpt_dir)
  if not steps:
    trained = os.path.exists(os.path.join(workdir, 'summary.json'))
    why = (
      'the run finished but saved neither its final network nor a checkpoint '
      '(checkpoint.final=False and checkpoint.every=0)'
      if trained
      else 'there is no run there'
    )
    raise NotExportableError(
      f'cannot export {workdir}: no final network in {os.path.join(workdir, checkpoint.FINAL)} '
      f'and no checkpoint in {ckpt_dir} ({why}). Train with checkpoint.final=True (the '
      f'default) or checkpoint.every > 0.'
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
  diff = check_close(
    'the exported function', jax.export.deserialize(blob).call(x), want, VERIFY_TOLERANCE
  )

  with open(os.path.join(out, INFERENCE), 'wb') as f:
    f.write(blob)
  save_variables(os.path.join(out, VARIABLES), variables)
  dense = dense_model(model, meta)
  summary = read_json(os.path.join(workdir, 'summary.json')) or {}
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
    'params': flops.num_params(variables['params']),
    'dense_params': flops.num_params(
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
      'collections': sorted(saved_collections(variables)),
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
