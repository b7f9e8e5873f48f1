"""Tests for demp.data: the digits, npz and (mocked) tfds sources and the shared pipeline."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from demp import data

NUM_TRAIN, NUM_TEST, SIZE = 40, 12, 32


def _cfg(**overrides):
  cfg = data.default_data_config()
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _as_uint8(images):
  return np.round(np.asarray(images) * 255.0).astype(np.uint8)


def _index_of(images_uint8, reference):
  """Row index in `reference` of each image (exact match), or -1."""
  lookup = {img.tobytes(): i for i, img in enumerate(reference)}
  return np.array([lookup.get(img.tobytes(), -1) for img in images_uint8])


@pytest.fixture
def npz(tmp_path):
  """A tiny npz: 40 train / 12 test random uint8 32x32x3 images, labels 0..9."""
  rng = np.random.default_rng(0)
  arrays = dict(
    train_images=rng.integers(0, 256, (NUM_TRAIN, SIZE, SIZE, 3), dtype=np.uint8),
    train_labels=rng.integers(0, 10, NUM_TRAIN).astype(np.int64),
    test_images=rng.integers(0, 256, (NUM_TEST, SIZE, SIZE, 3), dtype=np.uint8),
    test_labels=rng.integers(0, 10, NUM_TEST).astype(np.int64),
  )
  path = tmp_path / 'tiny.npz'
  np.savez(path, **arrays)
  return str(path), arrays


def _npz_cfg(path, **overrides):
  """npz config giving raw pixels / 255 unless overridden."""
  return _cfg(**{'source': 'npz', 'path': path, 'augment': 'none', 'normalize': False, **overrides})


def _write_npz(tmp_path, train_images, name='x.npz'):
  path = tmp_path / name
  n = len(train_images)
  np.savez(
    path,
    train_images=train_images,
    train_labels=np.arange(n) % 10,
    test_images=train_images,
    test_labels=np.arange(n) % 10,
  )
  return str(path)


# ---------------------------------------------------------------- digits


def test_digits_info_and_batches():
  cfg = _cfg(source='digits', normalize=False)
  info = data.get_info(cfg)
  assert info == data.DatasetInfo(10, (8, 8, 1), 1437, 360)
  assert info.num_train + info.num_test == 1797

  batch = next(data.train_iterator(cfg, 64, seed=0, shard_index=0, num_shards=1))
  assert batch['image'].shape == (64, 8, 8, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (64,)
  assert batch['label'].dtype == np.int32
  assert batch['image'].min() >= 0.0 and batch['image'].max() <= 1.0
  assert batch['image'].max() > 0.9  # Values 0..16 scaled by 1/16.
  assert batch['label'].min() >= 0 and batch['label'].max() <= 9
  assert len(np.unique(batch['label'])) > 5


def test_digits_deterministic_given_seed():
  cfg = _cfg(source='digits', augment='crop_flip')

  def first(seed):
    return _take(data.train_iterator(cfg, 32, seed, shard_index=0, num_shards=1), 3)

  a, b, c = first(0), first(0), first(1)
  default_shard = next(data.train_iterator(cfg, 32, 0))  # Process 0 of 1.
  np.testing.assert_array_equal(a[0]['image'], default_shard['image'])
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  assert not np.array_equal(a[0]['label'], c[0]['label'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_digits_normalize_uses_train_statistics():
  cfg = _cfg(source='digits', normalize=True)
  everything = data.fixed_examples(cfg, 1437)  # The whole training split.
  assert abs(float(everything['image'].mean())) < 1e-4
  assert abs(float(everything['image'].std()) - 1.0) < 1e-4


# ---------------------------------------------------------------- npz


def test_npz_train_shapes(npz):
  path, arrays = npz
  cfg = _npz_cfg(path)
  assert data.get_info(cfg) == data.DatasetInfo(10, (32, 32, 3), NUM_TRAIN, NUM_TEST)
  batch = next(data.train_iterator(cfg, 8, seed=0, shard_index=0, num_shards=1))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['label'].dtype == np.int32
  rows = _index_of(_as_uint8(batch['image']), arrays['train_images'])
  assert (rows >= 0).all()  # Every image is a training image, unchanged...
  np.testing.assert_array_equal(batch['label'], arrays['train_labels'][rows])


def test_npz_num_classes_from_labels_unless_cifar10(tmp_path):
  images = np.zeros((7, 4, 4, 3), np.uint8)  # Labels 0..6.
  path = _write_npz(tmp_path, images)
  assert data.get_info(_npz_cfg(path, name='custom')).num_classes == 7
  assert data.get_info(_npz_cfg(path, name='cifar10')).num_classes == 10


def test_npz_reshuffles_each_epoch(npz):
  path, arrays = npz
  it = data.train_iterator(_npz_cfg(path), NUM_TRAIN, 3, shard_index=0, num_shards=1)
  epoch1, epoch2 = (_index_of(_as_uint8(b['image']), arrays['train_images']) for b in _take(it, 2))
  np.testing.assert_array_equal(np.sort(epoch1), np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(np.sort(epoch2), np.arange(NUM_TRAIN))
  assert not np.array_equal(epoch1, epoch2)
  assert not np.array_equal(epoch1, np.arange(NUM_TRAIN))


def test_npz_eval_covers_test_once_with_mask(npz):
  path, arrays = npz
  batches = list(data.eval_batches(_npz_cfg(path), 'test', 5))
  assert len(batches) == 3
  for b in batches:
    assert b['image'].shape == (5, 32, 32, 3)
    assert b['mask'].dtype == np.float32 and b['mask'].shape == (5,)
  np.testing.assert_array_equal(batches[-1]['mask'], [1, 1, 0, 0, 0])
  assert sum(b['mask'].sum() for b in batches) == NUM_TEST
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  np.testing.assert_array_equal(_as_uint8(images[:NUM_TEST]), arrays['test_images'])
  np.testing.assert_array_equal(labels[:NUM_TEST], arrays['test_labels'])
  assert (images[NUM_TEST:] == 0).all() and (labels[NUM_TEST:] == 0).all()


def test_npz_fixed_examples_deterministic(npz):
  path, arrays = npz
  cfg = _npz_cfg(path, augment='crop_flip')  # Augmentation must not apply.
  a = data.fixed_examples(cfg, 16, seed=0)
  b = data.fixed_examples(cfg, 16, seed=0)
  c = data.fixed_examples(cfg, 16, seed=1)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  assert a['image'].shape == (16, 32, 32, 3)
  rows_a = _index_of(_as_uint8(a['image']), arrays['train_images'])
  rows_c = _index_of(_as_uint8(c['image']), arrays['train_images'])
  assert (rows_a >= 0).all() and len(set(rows_a)) == 16
  np.testing.assert_array_equal(a['label'], arrays['train_labels'][rows_a])
  assert not np.array_equal(rows_a, rows_c)
  with pytest.raises(ValueError, match='num=41'):
    data.fixed_examples(cfg, NUM_TRAIN + 1)


def test_npz_missing_path(tmp_path):
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='data.path') as e:
    data.get_info(_npz_cfg(missing))
  assert missing in str(e.value)
  assert 'train_images [N, H, W, C]' in str(e.value)  # what a valid file holds
  with pytest.raises(ValueError, match='data.path=None'):
    data.get_info(_npz_cfg(None))


def test_npz_missing_keys(tmp_path):
  path = tmp_path / 'partial.npz'
  np.savez(path, train_images=np.zeros((2, 4, 4, 3), np.uint8), train_labels=[0, 1])
  with pytest.raises(ValueError, match='test_images') as e:
    data.get_info(_npz_cfg(str(path)))
  assert "'test_labels'" in str(e.value) and 'data.path' in str(e.value)


def test_shards_are_disjoint_and_cover_one_epoch(npz):
  path, arrays = npz
  cfg = _npz_cfg(path)
  per_shard = NUM_TRAIN // 2
  seen = []
  for shard in (0, 1):
    it = data.train_iterator(cfg, 4, 0, shard_index=shard, num_shards=2)
    images = np.concatenate([b['image'] for b in _take(it, per_shard // 4)])
    seen.append(set(_index_of(_as_uint8(images), arrays['train_images'])))
  assert len(seen[0]) == len(seen[1]) == per_shard
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(NUM_TRAIN))


# ---------------------------------------------------------------- augmentation


def _structured_image(size=SIZE):
  """Channel 0 encodes the row, channel 1 the column: every pixel is unique."""
  y, x = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  return np.stack([y * 8, x * 8, np.full_like(y, 100)], -1).astype(np.uint8)


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_crop_flip_is_shifted_mirrored_copy(tmp_path, pad_mode):
  image = _structured_image()
  path = _write_npz(tmp_path, image[None])
  cfg = _npz_cfg(path, augment='crop_flip', pad_mode=pad_mode)
  batch = next(data.train_iterator(cfg, 32, 0, shard_index=0, num_shards=1))
  padded = np.pad(image, [(4, 4), (4, 4), (0, 0)], mode=pad_mode)
  candidates = {
    (dy, dx, flip): (
      padded[dy : dy + SIZE, dx : dx + SIZE, :][:, ::-1]
      if flip
      else padded[dy : dy + SIZE, dx : dx + SIZE, :]
    )
    for dy in range(9)
    for dx in range(9)
    for flip in (False, True)
  }
  found = []
  for out in _as_uint8(batch['image']):
    matches = [k for k, c in candidates.items() if np.array_equal(out, c)]
    assert matches, 'augmented image is not a crop (+ flip) of the padded original'
    found.append(matches[0])
  assert {flip for _, _, flip in found} == {False, True}
  assert len({(dy, dx) for dy, dx, _ in found}) > 5


def test_image_size_resizes(npz):
  path, arrays = npz
  cfg = _npz_cfg(path, augment='crop_flip', image_size=64)
  assert data.get_info(cfg).image_shape == (64, 64, 3)
  batch = next(data.train_iterator(cfg, 4, 0, shard_index=0, num_shards=1))
  assert batch['image'].shape == (4, 64, 64, 3)
  first = next(data.eval_batches(cfg, 'test', 4))
  assert first['image'].shape == (4, 64, 64, 3)
  # Upsampling keeps each image's mean colour.
  np.testing.assert_allclose(
    first['image'].mean(axis=(1, 2)),
    arrays['test_images'][:4].mean(axis=(1, 2)) / 255.0,
    atol=2e-3,
  )


def test_imagenet_preprocessing_on_non_square_images(tmp_path):
  h, w, size = 48, 40, 24  # Shorter side: eval 27 (=256*24/224), train 27..51.
  ramp = np.broadcast_to(np.linspace(0, 255, w), (h, w))  # Brightness grows with x.
  image = np.repeat(ramp[..., None], 3, -1).round().astype(np.uint8)
  path = _write_npz(tmp_path, np.stack([image] * 2))
  cfg = _npz_cfg(path, augment='imagenet', image_size=size)
  assert data.get_info(cfg).image_shape == (size, size, 3)

  evaluated = data.fixed_examples(cfg, 1)['image'][0]
  assert evaluated.shape == (size, size, 3)
  row = evaluated[size // 2, :, 0]
  assert np.all(np.diff(row) > 0)  # Not flipped, no black padding.
  assert np.abs(evaluated - evaluated[:1]).max() < 1e-5  # Rows are equal.
  # The shorter side 40 becomes 27, so resized column j samples the ramp at
  # x = (j + 0.5) * 40/27 - 0.5, value x / 39; the central crop keeps columns
  # 1..24 (offset (27 - 24) // 2 = 1).
  value = lambda j: ((j + 0.5) * w / 27 - 0.5) / (w - 1)
  np.testing.assert_allclose(row, value(np.arange(1, 25)), atol=2e-3)

  batch = next(data.train_iterator(cfg, 32, 0, shard_index=0, num_shards=1))
  assert batch['image'].shape == (32, size, size, 3)
  steps = np.diff(batch['image'][:, size // 2, :, 0], axis=1)
  increasing = (steps > 0).all(axis=1)
  decreasing = (steps < 0).all(axis=1)
  assert (increasing | decreasing).all()  # A crop of the ramp, maybe mirrored.
  assert increasing.any() and decreasing.any()
  spans = np.abs(batch['image'][:, 0, -1, 0] - batch['image'][:, 0, 0, 0])
  assert spans.max() - spans.min() > 0.1  # Random scale: zooms differ.


# ---------------------------------------------------------------- tfds


def test_tfds_cifar10_with_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  cfg = _cfg(source='tfds', name='cifar10', augment='crop_flip', normalize=True)
  with tfds.testing.mock_data(num_examples=20, policy=tfds.testing.MockPolicy.USE_CODE):
    assert data.get_info(cfg) == data.DatasetInfo(10, (32, 32, 3), 20, 20)
    batch = next(data.train_iterator(cfg, 8, 0, shard_index=0, num_shards=1))
    batches = list(data.eval_batches(cfg, 'test', 8))
  assert batch['image'].shape == (8, 32, 32, 3)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert batch['label'].min() >= 0 and batch['label'].max() <= 9
  assert abs(float(batch['image'].mean())) < 1.0  # Normalized, not [0, 255].
  assert len(batches) == 3 and sum(b['mask'].sum() for b in batches) == 20


def test_tfds_not_prepared_says_how_to_get_it(tmp_path):
  cfg = _cfg(source='tfds', name='cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='tfds build cifar10') as e:
    data.get_info(cfg)
  assert str(tmp_path) in str(e.value) and 'data.source=npz' in str(e.value)

  cfg = _cfg(
    source='tfds', name='imagenet2012', data_dir=str(tmp_path), image_size=224, augment='imagenet'
  )
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar') as e:
    data.get_info(cfg)
  assert os.path.join(str(tmp_path), 'downloads', 'manual') in str(e.value)
  assert 'ILSVRC2012_img_val.tar' in str(e.value)
  assert 'tfds build imagenet2012' in str(e.value)


# ---------------------------------------------------------------- config


def test_bad_config_values_raise_naming_the_key():
  with pytest.raises(ValueError, match=r"data\.source='csv'.*'digits', 'npz', 'tfds'"):
    data.get_info(_cfg(source='csv'))
  with pytest.raises(ValueError, match=r"data\.augment='mixup'.*'crop_flip'"):
    data.get_info(_cfg(augment='mixup'))
  with pytest.raises(ValueError, match=r'data\.image_size=None.*imagenet'):
    data.get_info(_cfg(augment='imagenet'))
  with pytest.raises(ValueError, match=r"Unknown data config keys \['imgsize'\]"):
    data.get_info({'imgsize': 3})
  with pytest.raises(ValueError, match='data.image_size'):
    data.get_info({'image_size': 'big'})
  with pytest.raises(ValueError, match='batch_size=0'):
    data.train_iterator(_cfg(), 0, 0)
  with pytest.raises(ValueError, match='shard_index=2'):
    data.train_iterator(_cfg(), 8, 0, shard_index=2, num_shards=2)
  with pytest.raises(ValueError, match="split='validation'"):
    data.eval_batches(_cfg(), 'validation', 8)


def test_importing_demp_data_does_not_import_tensorflow():
  code = 'import sys, demp.data; assert \'tensorflow\' not in sys.modules, \'TF imported eagerly\''
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, 'PYTHONPATH': repo}
  subprocess.run([sys.executable, '-c', code], check=True, env=env, cwd=repo)


def test_holdout_is_carved_out_of_training(npz):
  path, arrays = npz
  cfg = _npz_cfg(path, holdout=8)
  assert data.get_info(cfg).num_train == NUM_TRAIN - 8
  held = data.fixed_examples(cfg, 8, split='holdout')
  rows = _index_of(_as_uint8(held['image']), arrays['train_images'])
  assert sorted(rows.tolist()) == list(range(NUM_TRAIN - 8, NUM_TRAIN))  # the last 8
  seen = set()
  for batch in _take(data.train_iterator(cfg, 8, seed=0, shard_index=0, num_shards=1), 12):
    seen |= set(_index_of(_as_uint8(batch['image']), arrays['train_images']).tolist())
  assert seen == set(range(NUM_TRAIN - 8))  # 3 epochs: every other example, none held out
  death = data.fixed_examples(cfg, NUM_TRAIN - 8)  # the death check's pool excludes them too
  assert set(_index_of(_as_uint8(death['image']), arrays['train_images']).tolist()) == seen
  with pytest.raises(ValueError, match='data.holdout'):
    data.fixed_examples(_npz_cfg(path), 4, split='holdout')
  with pytest.raises(ValueError, match='data.holdout'):
    data.get_info(_npz_cfg(path, holdout=-1))
  with pytest.raises(ValueError, match='data.holdout'):
    data.get_info(_npz_cfg(path, holdout=NUM_TRAIN))
