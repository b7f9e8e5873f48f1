"""The trainer: training continuity after pruning, end-to-end runs, config errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from configs import quickstart
from demp import transforms
from demp.trainer import optim, train
from demp import surgery
from demp.models import build
from demp.trainer import steps

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.mark.parametrize('base', ['adam', 'sgdm'])
def test_training_continues_identically_after_pruning(base):
  """K steps after pruning dead units = K steps of the unpruned model (noise off)."""
  model = build('convnet', 10, widths=[6, 8], head='global')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  params = variables['params']
  dead = {'norm_0': np.array([1, 4]), 'norm_1': np.array([0, 2, 7])}
  for norm, units in dead.items():  # BN scale 0, offset < 0: exactly dead, zero gradients
    params[norm] = {
      'scale': params[norm]['scale'].at[units].set(0.0),
      'bias': params[norm]['bias'].at[units].set(-2.0),
    }
  base_tx = {
    'adam': optax.chain(optax.add_decayed_weights(5e-4), optax.adam(1e-2)),
    'sgdm': optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9)),
  }[base]
  tx = optax.chain(transforms.add_scheduled_penalty(1e-3), base_tx)
  state = {'params': params, 'batch_stats': variables['batch_stats'], 'opt_state': tx.init(params)}

  batches = [
    {
      'image': jax.random.normal(jax.random.key(i), (16, 8, 8, 3)),
      'label': jax.random.randint(jax.random.key(100 + i), (16,), 0, 10),
    }
    for i in range(8)
  ]
  step = jax.jit(steps.make_train_step(model, tx))
  for batch in batches[:3]:  # some history in the optimizer state before the surgery
    state, _ = step(state, batch)

  keeps = {'conv_0': np.ones(6, bool), 'conv_1': np.ones(8, bool)}
  keeps['conv_0'][dead['norm_0']] = False
  keeps['conv_1'][dead['norm_1']] = False
  small, small_vars, small_opt = surgery.prune(
    model,
    {'params': state['params'], 'batch_stats': state['batch_stats']},
    state['opt_state'],
    keeps,
  )
  small_state = {
    'params': small_vars['params'],
    'batch_stats': small_vars['batch_stats'],
    'opt_state': small_opt,
  }
  small_step = jax.jit(steps.make_train_step(small, tx))
  losses, small_losses = [], []
  for batch in batches[3:]:
    state, m = step(state, batch)
    small_state, sm = small_step(small_state, batch)
    losses.append(float(m['loss']))
    small_losses.append(float(sm['loss']))
  assert len(set(np.round(losses, 4))) > 1  # training moves
  np.testing.assert_allclose(small_losses, losses, rtol=2e-5)


def _tiny_config(**overrides):
  c = quickstart.get_config()
  c.num_steps = 30
  c.batch_size = 16
  c.model.widths = [32, 16]
  c.prune.every = 10
  c.prune.num_examples = 64
  c.prune.batch_size = 32
  c.log_every = 10
  c.eval_batch_size = 64
  c.progress_bar = False
  c.demp.peak_lambda = 0.5  # a large λ so that units die within 30 steps
  c.optimizer.learning_rate = 0.05
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _check_run_dir(workdir, summary, expect_events):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records if 'loss' in r] == [10, 20, 30]
  events = [r for r in records if r.get('event') == 'prune']
  assert [e['step'] for e in events] == expect_events
  assert summary['prune_events'] == len(expect_events)
  assert 0.0 <= summary['test_accuracy'] <= 1.0
  assert os.path.exists(os.path.join(workdir, 'summary.json'))


def test_end_to_end_on_tfds_mock_data(tmp_path):
  c = _tiny_config(**{'data.source': 'tfds', 'data.name': 'cifar10', 'model.name': 'convnet'})
  c.model = train.ml_collections.ConfigDict(
    {'name': 'convnet', 'widths': [8, 16], 'head': 'global'}
  )
  with tfds.testing.mock_data(num_examples=96):
    summary = train.train_and_evaluate(c, str(tmp_path))
  _check_run_dir(str(tmp_path), summary, [10, 20, 30])
  assert summary['prune_events_effective'] >= 1  # units died and were removed
  assert summary['neuron_sparsity'] > 0
  assert sum(summary['widths'].values()) < 24


def test_end_to_end_on_npz(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'tiny.npz'
  np.savez(
    path,
    train_images=rng.integers(0, 255, (80, 8, 8, 3), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 80),
    test_images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 20),
  )
  c = _tiny_config(**{'data.source': 'npz', 'data.path': str(path)})
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  _check_run_dir(str(tmp_path / 'run'), summary, [10, 20, 30])
  assert summary['prune_events_effective'] >= 1
  assert summary['weight_sparsity'] > 0
  # DemP logs the λ and noise std its optimizer applied, read from its schedules.
  lam_t, std_t = optim.demp_schedules(c)
  logged = _train_records(tmp_path / 'run')
  assert [r['lambda'] for r in logged] == pytest.approx([float(lam_t(s)) for s in (10, 20, 30)])
  assert [r['noise_std'] for r in logged] == pytest.approx([float(std_t(s)) for s in (10, 20, 30)])
  assert logged[0]['lambda'] > 0
  # The dense method never prunes, and logs no penalty or noise: its optimizer has neither.
  c = _tiny_config(**{'data.source': 'npz', 'data.path': str(path), 'method': 'dense'})
  summary = train.train_and_evaluate(c, str(tmp_path / 'dense'))
  assert summary['neuron_sparsity'] == 0.0 and summary['prune_events'] == 0
  logged = _train_records(tmp_path / 'dense')
  assert len(logged) == 3 and all('learning_rate' in r for r in logged)
  assert not [r for r in logged if 'lambda' in r or 'noise_std' in r]


def _train_records(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in records if 'loss' in r]


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('demp.peak_lambda', -1e-3, 'demp.peak_lambda'),
    ('prune.every', 0, 'prune.every'),
    ('prune.every', -5, 'prune.every'),
    ('model.name', 'resnet1000', 'model.name'),
    ('data.source', 'hdf5', 'data.source'),
    ('method', 'magic', 'method'),
    ('optimizer.name', 'lion9', 'optimizer.name'),
  ],
)
def test_bad_config_values_name_the_key(key, value, message):
  c = _tiny_config(**{key: value})
  with pytest.raises(ValueError, match=message):
    train.init_run(c)


def test_missing_npz_path_says_how_to_get_it(tmp_path):
  c = _tiny_config(**{'data.source': 'npz', 'data.path': str(tmp_path / 'nope.npz')})
  with pytest.raises(FileNotFoundError, match='data.path'):
    train.init_run(c)


def test_unknown_tfds_dataset_raises(tmp_path):
  c = _tiny_config(
    **{'data.source': 'tfds', 'data.name': 'not_a_dataset_xyz', 'data.data_dir': str(tmp_path)}
  )
  with pytest.raises(Exception, match='not_a_dataset_xyz'):
    train.init_run(c)


def test_nan_stops_with_the_step(tmp_path):
  c = _tiny_config(**{'optimizer.learning_rate': 1e30, 'method': 'dense'})
  with pytest.raises(FloatingPointError, match=r'at step \d+'):
    train.train_and_evaluate(c, str(tmp_path))
