"""Each analysis config runs end to end at smoke scale; the pure-SGD-noise method is exact."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import importlib  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from configs.analysis import divisor_at_most, parse  # pylint: disable=wrong-import-position
from tools import analysis  # pylint: disable=wrong-import-position
from demp import models
from demp.trainer import train as train_lib  # pylint: disable=wrong-import-position
from demp.trainer import steps

NUM_TRAIN = 96


@pytest.fixture(name='npz', scope='module')
def fixture_npz(tmp_path_factory):
  """A tiny CIFAR-shaped .npz (16x16 so that four 2x2 max-pools leave one pixel)."""
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('data') / 'tiny.npz')
  np.savez(
    path,
    train_images=rng.integers(0, 256, (NUM_TRAIN, 16, 16, 3), np.uint8),
    train_labels=rng.integers(0, 10, NUM_TRAIN),
    test_images=rng.integers(0, 256, (40, 16, 16, 3), np.uint8),
    test_labels=rng.integers(0, 10, 40),
  )
  return path


def _config(name, arg):
  return importlib.import_module(f'configs.analysis.{name}').get_config(arg)


def _checks(summary):
  return [e for e in summary['events'] if 'live' in e]


@pytest.mark.parametrize('mode', ['sgd', 'sgd_noise', 'gaussian'])
def test_noise_study_smoke(mode, tmp_path):
  config = _config('noise_mlp_digits', f'mode={mode},smoke=True')
  assert config.batch_size == 1 and not config.model.norm
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  checks = _checks(summary)
  assert [e['step'] for e in checks] == [4, 8]
  assert not any(e['removed'] for e in checks)  # counted, never removed
  assert summary['widths'] == {'hidden_0': 16, 'hidden_1': 24}
  assert all(0 <= sum(e['live'].values()) <= 40 for e in checks)


@pytest.mark.parametrize(
  'name,arg',
  [
    ('dead_units', 'act=leaky_relu,bs=8'),
    ('adam_eps', 'eps=1e-4'),
    ('death_check', 'examples=all'),
    ('dynamic_pruning', 'dynamic=True,lam=0.5'),
  ],
)
def test_convnet_analysis_smoke(name, arg, npz, tmp_path):
  config = _config(name, f'{arg},path={npz},smoke=True')
  summary = train_lib.train_and_evaluate(config, str(tmp_path))
  checks = _checks(summary)
  assert [e['step'] for e in checks] == [3, 6]
  if not config.prune.dynamic:  # only the final check may remove
    assert not checks[0]['removed'] and checks[0]['widths'] == summary['dense_widths']
  assert config.prune.at_end  # the final check removes the dead
  assert summary['widths'] == {k: max(v, 1) for k, v in checks[-1]['live'].items()}
  assert 0 < summary['inference_flops_rel'] <= 1 and 0 < summary['train_flops_rel'] <= 1
  if name == 'death_check':
    assert config.prune.num_examples == NUM_TRAIN and config.prune.batch_size == 96
  if name == 'dead_units':
    assert (
      config.demp.peak_lambda,
      config.demp.noise_std,
      config.optimizer.name,
      config.model.activation,
    ) == (0.0, 0.0, 'adam', 'leaky_relu')


def test_config_arguments_fail_loudly():
  with pytest.raises(ValueError, match="unknown config argument 'lamda'"):
    _config('dynamic_pruning', 'lamda=0.1')
  with pytest.raises(ValueError, match="mode='adam'"):
    _config('noise_mlp_digits', 'mode=adam')
  with pytest.raises(ValueError, match='must be a boolean'):
    parse('dynamic=maybe', dynamic=True)
  assert parse('lam=0.5,dynamic=False', lam=0.1, dynamic=True, steps=3) == {
    'lam': 0.5,
    'dynamic': False,
    'steps': 3,
  }
  assert divisor_at_most(5085, 1024) == 1017 and divisor_at_most(1437, 1024) == 479


def test_subtract_full_gradient_is_the_minibatch_noise():
  """One SGD step of ``sgd_noise`` moves params by exactly −η(ĝ − g_full)."""
  config = _config('noise_mlp_digits', 'mode=sgd_noise,smoke=True')
  full_grad = analysis.full_gradient_fn(config)
  model = models.build('mlp', 10, widths=(16, 24), norm=False)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)['params']
  x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 1))
  y = jnp.array([3])

  def loss(p):
    return steps.cross_entropy(model.apply({'params': p}, x, train=True), y).mean()

  g_batch = jax.grad(loss)(params)
  tx = optax.chain(analysis.subtract_full_gradient(full_grad), optax.sgd(0.1))
  updates, _ = jax.jit(tx.update)(g_batch, tx.init(params), params)
  expected = jax.tree.map(lambda g, f: -0.1 * (g - f), g_batch, full_grad(params))
  jax.tree.map(
    lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=1e-7), updates, expected
  )
  # A unit that is dead on every example has zero gradient in both: zero update.
  dead = jax.tree.map(np.array, params)
  dead['dense_0']['kernel'][:, 5] = 0.0
  dead['dense_0']['bias'][5] = -1.0
  g_dead = jax.grad(loss)(dead)
  updates, _ = tx.update(g_dead, tx.init(dead), dead)
  assert float(jnp.abs(updates['dense_0']['kernel'][:, 5]).max()) == 0.0
  assert float(jnp.abs(updates['dense_1']['kernel'][5]).max()) == 0.0
  assert analysis.widths_of(model, params) == {'hidden_0': 16, 'hidden_1': 24}
