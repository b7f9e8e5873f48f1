"""The accelerator check: CPU refusal, the tiny --allow_cpu run end to end, budget, pieces."""

import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tools import accelerator_check as check
from tools import benchmark
from demp import models
from demp.trainer import steps
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Accelerator images may have no TensorFlow: the end-to-end run proves the check needs none.
_WITHOUT_TF = (
  "import runpy, sys; sys.modules['tensorflow'] = None; "
  "sys.modules['tensorflow_datasets'] = None; "
  "runpy.run_module('scripts.accelerator_check', run_name='__main__')"
)


def _script(*args, seconds=300, without_tf=False):
  """``python -m scripts.accelerator_check ARGS`` on CPU (a subprocess: its flags are its own)."""
  cmd = ['-c', _WITHOUT_TF] if without_tf else ['-m', 'scripts.accelerator_check']
  return _util.run(
    [sys.executable, *cmd, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    seconds=seconds,
    env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )


def test_refuses_cpu_without_allow_cpu(tmp_path):
  proc = _script(f'--out={tmp_path}', seconds=120)
  assert proc.returncode == 1
  assert 'JAX sees only CPU devices' in proc.stderr and '--allow_cpu' in proc.stderr
  assert not os.listdir(tmp_path)  # nothing written that could pass for a result
  with pytest.raises(check.NoAcceleratorError, match='only CPU devices'):
    check.run_check(check.tiny_plan(), str(tmp_path))


def test_allow_cpu_end_to_end_tiny(tmp_path):
  """The CLI's --allow_cpu path: every part done, every field present, the tables render."""
  proc = _script(
    '--allow_cpu',
    f'--out={tmp_path}',
    '--models=mlp=8',
    '--sparsities=0.5',
    '--real_model=mlp',
    without_tf=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = tmp_path / 'cpu-tiny'
  results = json.loads((folder / check.JSON_NAME).read_text())
  assert results['platform'] == 'cpu' and results['tiny'] is True and results['complete'] is True
  assert set(results) >= {
    'schema_version',
    'device',
    'plan',
    'budget_s',
    'bf16_cast',
    'steps',
    'events',
    'real_run',
    'parts',
    'notes',
    'spent_s',
  }
  assert set(results['device']) >= {'device_kind', 'jax', 'jaxlib', 'xla_flags', 'platform_version'}
  assert [p['name'] for p in results['parts']] == [
    'steps/mlp/float32',
    'steps/mlp/bfloat16',
    'event/mlp',
    'real_run',
  ]
  assert all(p['status'] == 'done' and p['seconds'] > 0 for p in results['parts'])
  assert results['plan']['batch_size'] == 4 and results['plan']['rounds'] == 2

  steps = results['steps']
  assert [(r['dtype'], r['sparsity']) for r in steps] == [
    ('float32', 0.0),
    ('float32', 0.5),
    ('bfloat16', 0.0),
    ('bfloat16', 0.5),
  ]
  for r in steps:
    assert r['step_s'] > 0 and r['compile_s'] > 0 and len(r['round_times_s']) == 2
  # MLP 192 -> 256 -> 256 -> 10 with BN: half of each hidden layer removed.
  assert steps[0]['params'] == 192 * 256 + 256 * 256 + 256 * 10 + 10 + 2 * 2 * 256
  assert steps[1]['params'] == 192 * 128 + 128 * 128 + 128 * 10 + 10 + 2 * 2 * 128
  assert steps[1]['flop_ratio'] < 0.5 and steps[3]['flop_ratio'] < 0.5
  assert steps[0]['time_ratio'] == 1.0 and steps[2]['flop_ratio'] == 1.0

  f32, bf16 = results['events']
  assert (f32['dtype'], f32['derived'], bf16['dtype'], bf16['derived']) == (
    'float32',
    False,
    'bfloat16',
    True,
  )
  assert f32['pruned_step_s'] == steps[1]['step_s']
  assert f32['event_over_1000_steps'] == pytest.approx(f32['event_s'] / (1000 * steps[1]['step_s']))
  assert bf16['event_s'] == pytest.approx(
    f32['check_compile_s'] + f32['surgery_s'] + steps[3]['compile_s']
  )

  real = results['real_run']
  assert real['dense']['method'] == 'dense' and real['demp']['method'] == 'demp'
  for r in (real['dense'], real['demp']):
    assert r['steps'] == 4 and 0 <= r['test_accuracy'] <= 1 and r['wall_s'] > 0
    assert r['wall_s'] >= r['compile_s'] + r['event_s'] - 1e-6
  dense_widths = {'hidden_0': 256, 'hidden_1': 256}
  assert real['dense']['widths'] == real['dense']['dense_widths'] == dense_widths
  assert real['demp']['prune_events'] == 2 and real['dense']['prune_events'] == 0
  assert real['wall_ratio'] == pytest.approx(real['demp']['wall_s'] / real['dense']['wall_s'])

  md = (folder / check.MD_NAME).read_text()
  assert md.startswith('# Accelerator check: cpu (cpu, TINY DRY RUN: not a measurement)')
  for title in ('## Train step', '## Prune event', '## Short real run', '## Parts and budget'):
    assert title in md
  table_rows = [l for l in md.splitlines() if l.startswith('| mlp |')]
  assert len(table_rows) == 4 + 2  # step rows + event rows
  assert all(l.count('|') == 10 for l in table_rows[:4])  # 9 columns
  assert re.search(r'\| demp \| [\d.]+ \|', md) and '| real_run | done |' in md
  assert 'TINY DRY RUN' in proc.stdout and 'wrote ' in proc.stdout


def test_budget_skips_parts_with_a_note(tmp_path):
  """A zero budget skips every part (nothing compiled) and says why; the report still renders."""
  results = check.run_check(
    check.tiny_plan(models=(('mlp', 8),)),
    str(tmp_path),
    budget_s=0.0,
    allow_cpu=True,
    real_configs=None,
    real_note='no --data_path given',
  )
  assert [(p['name'], p['status']) for p in results['parts']] == [
    ('steps/mlp/float32', 'skipped'),
    ('steps/mlp/bfloat16', 'skipped'),
    ('event/mlp', 'skipped'),
    ('real_run', 'skipped'),
  ]
  assert all(p['note'].startswith('budget:') for p in results['parts'][:3])
  assert results['parts'][3]['note'] == 'no --data_path given'
  assert results['real_run'] == {'skipped': 'no --data_path given'} and not results['complete']
  saved = json.loads(open(results['files']['json']).read())
  assert saved['steps'] == [] and saved['parts'][0]['status'] == 'skipped'
  md = open(results['files']['md']).read()
  assert '(not measured: see Parts)' in md and 'Skipped: no --data_path given.' in md


def test_budget_and_estimates():
  now = [0.0]
  budget = check.Budget(10.0, clock=lambda: now[0])
  now[0] = 4.0
  assert budget.allows(6.0) and not budget.allows(6.5)
  parts = [
    {'name': 'steps/resnet18/float32', 'status': 'done', 'seconds': 30.0, 'mean_compile_s': 5.0},
    {'name': 'steps/vgg16/float32', 'status': 'done', 'seconds': 50.0, 'mean_compile_s': 8.0},
  ]
  assert check._estimate('steps/resnet18/bfloat16', parts) == 30.0
  assert check._estimate('steps/convnet/float32', parts) == 40.0
  assert check._estimate('event/vgg16', parts) == 16.0
  assert check._estimate('event/convnet', parts) == 16.0  # not measured: the slowest
  assert check._estimate('real_run', parts) == 48.0
  assert check._estimate('steps/x/float32', []) == 0.0


def test_device_slug():
  slug = check.device_slug
  assert slug({'platform': 'gpu', 'device_kind': 'NVIDIA H200'}, False) == 'nvidia-h200'
  assert slug({'platform': 'tpu', 'device_kind': 'TPU v5 lite'}, False) == 'tpu-v5-lite'
  assert check.device_slug({'platform': 'cpu', 'device_kind': 'cpu'}, True) == 'cpu-tiny'


def test_compute_dtype_runs_convs_in_bf16_and_keeps_state_f32():
  """Lowered (not compiled): every conv, forward and backward, is bf16; the state stays f32."""
  model = models.build('convnet', 10, widths=[4])
  tx = benchmark.method_optimizer()
  batch = benchmark._batch(4, 8, 10)
  state = benchmark._state(model, tx, batch['image'][:1], 0)
  step = steps.make_train_step(benchmark.with_compute_dtype(model, 'bfloat16'), tx)
  convs = re.findall(r'stablehlo.convolution.*', jax.jit(step).lower(state, batch).as_text())
  assert len(convs) >= 2 and all('xbf16>) -> tensor<' in c and 'f32' not in c for c in convs)
  new_state, out = jax.eval_shape(step, state, batch)
  assert jax.tree.map(lambda a: a.dtype, new_state) == jax.tree.map(lambda a: a.dtype, state)
  assert out['loss'].dtype == jnp.float32
  assert benchmark.with_compute_dtype(model, 'float32') is model
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    benchmark.with_compute_dtype(model, 'float16')


def test_crop_flip_and_normalizer():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  out = check.crop_flip(images, np.random.default_rng(1))
  assert out.shape == images.shape and out.dtype == np.uint8
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')  # pad = 8 // 8
  for i in range(6):  # each output is some 8x8 window of the padded image, maybe flipped
    windows = [padded[i, y : y + 8, x : x + 8] for y in range(3) for x in range(3)]
    assert any(np.array_equal(out[i], w) or np.array_equal(out[i], w[:, ::-1]) for w in windows)
  norm = check.Normalizer(images)
  z = norm(images)
  np.testing.assert_allclose(z.reshape(-1, 3).mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.reshape(-1, 3).std(0), 1, atol=1e-4)


def test_plan_validation():
  with pytest.raises(ValueError, match="'nope' is not one of"):
    check.Plan(models=(('nope', 32),))
  with pytest.raises(ValueError, match=r'Plan.sparsities: 1.0'):
    check.Plan(sparsities=(1.0,))
  with pytest.raises(ValueError, match="Plan.dtypes: 'float16'"):
    check.Plan(dtypes=('float16',))
  assert check.tiny_plan().model_kwargs['resnet18'] == {'width_multiplier': 1 / 16}
