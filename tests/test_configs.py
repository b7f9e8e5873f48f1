"""Every config file builds and validates; the recipe configs' smoke versions train end to end
(on ``tfds.testing.mock_data`` or a tiny generated .npz)."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import glob  # pylint: disable=g-import-not-at-top
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from demp import data, models
from demp.trainer import train
from demp.trainer import config as config_lib
from demp.trainer import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path: str):
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config_files() -> list[str]:
  """Every file under configs/ that defines ``get_config`` (helpers like common.py do not)."""
  paths = sorted(glob.glob(os.path.join(ROOT, 'configs', '**', '*.py'), recursive=True))
  out = []
  for p in paths:
    with open(p) as f:
      if 'def get_config(' in f.read():
        out.append(os.path.relpath(p, ROOT))
  return out


CONFIGS = _config_files()
# The recipes of the paper's CNNs (and the subset runs): their smoke versions run here.
SMOKE = [
  'configs/resnet18_cifar10.py',
  'configs/resnet50_imagenet.py',
  'configs/vgg16_cifar10.py',
  'configs/resnet18_cifar10_subset.py',
  'configs/convnet_cifar10.py',
]


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  """64 train / 24 test random 32x32x3 uint8 images, labels 0..9 (CIFAR-like)."""
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('npz') / 'tiny.npz')
  np.savez(
    path,
    train_images=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 64),
    test_images=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 24),
  )
  return path


def _local_data(config, npz_path):
  """Points npz sources at the tiny file; returns a context for tfds sources."""
  if config.data.source == 'npz':
    config.data.path = npz_path
  return tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE)


def test_every_config_file_is_found():
  assert set(SMOKE) <= set(CONFIGS)
  assert 'configs/common.py' not in CONFIGS


@pytest.mark.parametrize('path', CONFIGS)
def test_config_builds_and_validates(path, tiny_npz):
  for arg in (None, 'smoke=True'):
    try:
      config = _load(os.path.join(ROOT, path)).get_config(arg)
    except ValueError:
      if arg is None:
        raise
      continue  # a config without a smoke argument
    config_lib.validate_config(config)
    with _local_data(config, tiny_npz):
      info = data.get_info(config.data)
    kwargs = {k: v for k, v in config.model.items() if k != 'name'}
    model = models.build(config.model.name, info.num_classes, **kwargs)
    shapes = jax.eval_shape(
      lambda: model.init(  # pylint: disable=cell-var-from-loop
        jax.random.key(0), jnp.zeros((1,) + tuple(info.image_shape)), train=False
      )
    )
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['params'])) > 0


def test_recipe_numbers():
  """The paper's appendix I and the authors' launch settings, as the configs hold them.

  Every full-scale recipe number, with its source, is in tests/test_recipes.py.
  """
  r18 = _load(os.path.join(ROOT, 'configs/resnet18_cifar10.py'))
  c = r18.get_config('opt=sgdm')
  assert (c.batch_size, c.num_steps, c.optimizer.name, c.optimizer.learning_rate) == (
    128,
    97_656,
    'sgd',
    0.1,
  )  # 250 epochs as the authors count them
  assert (
    c.optimizer.lr_schedule,
    c.optimizer.lr_kwargs.step_size,
    c.optimizer.lr_kwargs.decay_factor,
  ) == ('step', 30_078, 0.2)  # 77 x 50,000 / 128
  assert (
    c.optimizer.weight_decay,
    c.data.augment,
    c.prune.every,
    c.prune.num_examples,
    c.demp.noise_std,
  ) == (5e-4, 'crop_flip', 5000, 1536, 5e-5)  # death check: 3 x 512
  c_adam = r18.get_config('opt=adam')
  assert (c_adam.optimizer.name, c_adam.optimizer.learning_rate) == ('adamw', 5e-3)
  lr = optim.learning_rate_schedule(c)
  np.testing.assert_allclose(
    [lr(0), lr(30_077), lr(30_078), lr(60_156)], [0.1, 0.1, 0.02, 0.004], rtol=1e-6
  )

  c = _load(os.path.join(ROOT, 'configs/resnet50_imagenet.py')).get_config('opt=adam')
  assert (
    c.batch_size,
    c.num_steps,
    c.optimizer.learning_rate,
    c.label_smoothing,
    c.optimizer.weight_decay,
    c.prune.num_examples,
  ) == (256, 500_455, 5e-3, 0.1, 1e-4, 2048)
  assert list(c.optimizer.lr_kwargs.boundaries) == [150_136, 350_319, 450_410]  # epochs 30/70/90
  assert (c.data.name, c.data.augment, c.data.image_size, c.data.test_split) == (
    'imagenet2012',
    'imagenet',
    224,
    'validation',
  )

  c = _load(os.path.join(ROOT, 'configs/vgg16_cifar10.py')).get_config('opt=sgdm')
  assert (
    c.batch_size,
    c.num_steps,
    c.optimizer.lr_schedule,
    c.optimizer.learning_rate,
    c.data.image_size,
    c.prune.every,
  ) == (256, 15_626, 'one_cycle', 0.1, 64, 1000)

  c = _load(os.path.join(ROOT, 'configs/convnet_cifar10.py')).get_config()
  assert (
    list(c.model.widths),
    c.optimizer.name,
    c.num_steps,
    c.demp.peak_lambda,
    c.prune.every,
  ) == ([32, 64, 128, 256], 'adamw', 600, 2e-2, 100)


@pytest.mark.parametrize(
  'path', ['configs/convnet_cifar10.py', 'configs/resnet18_cifar10_subset.py']
)
def test_npz_configs_need_a_path(path):
  config = _load(os.path.join(ROOT, path)).get_config()
  assert config.data.path is None
  with pytest.raises(ValueError, match='data.path'):
    data.get_info(config.data)


def test_bad_config_argument_fails_loudly():
  r18 = _load(os.path.join(ROOT, 'configs/resnet18_cifar10.py'))
  with pytest.raises(ValueError, match='opt'):
    r18.get_config('opt=rmsprop')
  with pytest.raises(ValueError, match='optimizer'):
    r18.get_config('optimizer=adam')


@pytest.mark.parametrize('path', SMOKE)
def test_smoke_runs_end_to_end(path, tiny_npz, tmp_path):
  config = _load(os.path.join(ROOT, path)).get_config('smoke=True')
  assert config.method == 'demp' and config.demp.noise_std > 0 and config.demp.peak_lambda > 0
  with _local_data(config, tiny_npz):
    summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary['steps'] == config.num_steps
  assert summary['prune_events'] == config.num_steps // config.prune.every
  assert 0.0 <= summary['test_accuracy'] <= 1.0 and np.isfinite(summary['test_loss'])
  assert os.path.exists(tmp_path / 'summary.json')


# The peak noise std of every recipe: the authors' code (5e-5), except where stated.
NOISE_STD_EXCEPTIONS = {
  'configs/vit_cifar10_subset.py': 1e-3,  # a 600-step ViT: noise is its only push
  'configs/analysis/dead_units.py': 0.0,  # units die on their own: no noise, λ = 0
  'configs/analysis/adam_eps.py': 0.0,
  'configs/analysis/noise_mlp_digits.py': 0.0,  # default mode 'sgd': no Gaussian noise
}


@pytest.mark.parametrize('path', CONFIGS)
def test_recipe_noise_is_a_std_of_the_authors_magnitude(path):
  """``demp.noise_std`` is a standard deviation; every recipe defaults to the authors' 5e-5."""
  config = _load(os.path.join(ROOT, path)).get_config()
  assert 'noise_variance' not in config.demp
  want = NOISE_STD_EXCEPTIONS.get(path, 5e-5)
  assert config.demp.noise_std == pytest.approx(want, rel=1e-12), path
  if config.demp.noise_std:  # the std schedule peaks at exactly that value
    _, std_t = optim.demp_schedules(config)
    n = optim.num_updates(config)
    grid = np.unique(np.linspace(0, n, 401).astype(int))
    peak = max(float(std_t(int(s))) for s in grid) if callable(std_t) else std_t
    assert peak == pytest.approx(want, rel=1e-2)
