"""Tests for demp.data.ondevice: batch order, augmentation distribution, exact normalization, scan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from demp import data
from demp.data import augment, ondevice

jax.config.update('jax_numpy_rank_promotion', 'raise')

ALPHA = 1e-4  # p-value threshold: fixed seeds make the tests deterministic; this is the margin.
SAMPLES = 2000


def _npz(path, images, labels):
  np.savez(
    path, train_images=images, train_labels=labels, test_images=images[:4], test_labels=labels[:4]
  )
  return str(path)


def _cfg(path, **overrides):
  cfg = data.default_data_config()
  cfg.update(dict(dict(source='npz', path=path, name='synthetic'), **overrides))
  return cfg


def _on_device(cfg):
  images, labels, mean, std = ondevice.load_train_split(cfg)
  return ondevice.put_on_device(images, labels, mean=mean, std=std)


# ----------------------------------------------------------------------------
# Batch order.


@pytest.mark.parametrize('batch_size', [8, 10])  # 50 % 8 != 0: batches span epochs
def test_every_example_once_per_epoch(batch_size):
  n, epochs = 50, 4
  steps = -(-epochs * n // batch_size)
  fn = jax.jit(ondevice.example_indices, static_argnums=(2, 3))
  stream = np.concatenate([np.asarray(fn(s, 3, batch_size, n)) for s in range(steps)])
  assert stream.dtype == np.int32 and len(stream) == steps * batch_size
  windows = stream[: epochs * n].reshape(epochs, n)
  for e in range(epochs):
    np.testing.assert_array_equal(np.sort(windows[e]), np.arange(n))
  assert len({w.tobytes() for w in windows}) == epochs  # a fresh permutation each epoch
  # Eager and jitted agree; batch_at's labels are those examples' labels.
  np.testing.assert_array_equal(
    ondevice.example_indices(7, 3, batch_size, n), fn(7, 3, batch_size, n)
  )
  d = ondevice.put_on_device(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n) + 100)
  np.testing.assert_array_equal(
    ondevice.batch_at(d, 7, 3, batch_size)['label'], np.asarray(fn(7, 3, batch_size, n)) + 100
  )


def test_same_seed_and_step_bit_identical_other_seed_differs():
  rng = np.random.default_rng(0)
  d = ondevice.put_on_device(
    rng.integers(0, 256, (40, 8, 8, 3), np.uint8),
    np.arange(40),
    mean=[0.5, 0.4, 0.3],
    std=[0.2, 0.25, 0.3],
  )
  aug = ondevice.AugmentConfig(crop_pad=1, pad_mode='reflect', flip=True)
  fn = jax.jit(functools.partial(ondevice.batch_at, batch_size=16, augment_config=aug))
  a, b = fn(d, 5, 1), fn(d, 5, 1)
  assert a['image'].dtype == jnp.float32 and a['image'].shape == (16, 8, 8, 3)
  np.testing.assert_array_equal(a['image'], b['image'])
  np.testing.assert_array_equal(a['label'], b['label'])
  eager = ondevice.batch_at(d, 5, 1, 16, augment_config=aug)
  np.testing.assert_array_equal(a['image'], eager['image'])  # traced seed/step == Python ints
  other = fn(d, 5, 2)
  assert not np.array_equal(a['label'], other['label'])
  # Same examples, other seed: the augmentation differs too.
  same_order = ondevice.put_on_device(np.asarray(d.images)[:16], np.arange(16))
  x = ondevice.batch_at(same_order, 0, 1, 16, augment_config=aug)
  y = ondevice.batch_at(same_order, 0, 2, 16, augment_config=aug)
  order_x, order_y = np.argsort(x['label']), np.argsort(y['label'])
  assert not np.array_equal(np.asarray(x['image'])[order_x], np.asarray(y['image'])[order_y])


# ----------------------------------------------------------------------------
# The augmentation: mechanics exact, distribution equal to the tf.data path's.


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_crop_flip_mechanics_match_tf_ops(pad_mode):
  tf = data.sources._tf()  # pylint: disable=protected-access
  image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), np.uint8)
  pad = 1
  cases = [(oy, ox, f) for oy in range(3) for ox in range(3) for f in (False, True)]
  offsets = np.array([[oy, ox] for oy, ox, _ in cases], np.int32)
  flips = np.array([f for _, _, f in cases])
  images = jnp.asarray(image[None])
  got = ondevice.gather_crop_flip(
    images, jnp.zeros(len(cases), jnp.int32), offsets, flips, pad=pad, pad_mode=pad_mode
  )
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=pad_mode.upper())
  for i, (oy, ox, f) in enumerate(cases):
    want = tf.slice(padded, [oy, ox, 0], [8, 8, 3])
    want = tf.image.flip_left_right(want) if f else want
    np.testing.assert_array_equal(got[i], want.numpy(), err_msg=str((oy, ox, f)))


def _coordinate_images(n, size=32):
  """n copies of an image whose channel 0 is row + 1, channel 1 is col + 1 (0 = zero padding)."""
  rows, cols = np.meshgrid(np.arange(size) + 1, np.arange(size) + 1, indexing='ij')
  image = np.stack([rows, cols, np.full_like(rows, 7)], -1).astype(np.uint8)
  return np.broadcast_to(image, (n, size, size, 3)).copy()


def _offsets_and_flips(images01, pad):
  """(oy, ox, flip) of each augmented coordinate image, read at its centre pixel."""
  v = np.round(np.asarray(images01) * 255.0).astype(np.int64)
  h, w = v.shape[1:3]
  cy, cx = h // 2, w // 2
  flip = v[:, cy, cx + 1, 1] < v[:, cy, cx, 1]
  oy = v[:, cy, cx, 0] - 1 - cy + pad
  ox = np.where(flip, v[:, cy, cx, 1] - 1 - (w - 1 - cx), v[:, cy, cx, 1] - 1 - cx) + pad
  return oy, ox, flip


def _joint_p(sample_a, sample_b, cells):
  """Two-sample chi-square p-value on the joint (oy, ox, flip) histogram."""
  counts = []
  for oy, ox, flip in (sample_a, sample_b):
    cell = (oy * cells + ox) * 2 + flip.astype(np.int64)
    counts.append(np.bincount(cell, minlength=cells * cells * 2))
  table = np.stack(counts)
  table = table[:, table.sum(0) > 0]
  return stats.chi2_contingency(table).pvalue


def _uniform_p(offsets, cells):
  return stats.chisquare(np.bincount(offsets, minlength=cells)).pvalue


@pytest.mark.parametrize('pad_mode', ['reflect', 'constant'])
def test_crop_flip_distribution_matches_tf_data(tmp_path, pad_mode):
  images = _coordinate_images(SAMPLES)
  cfg = _cfg(
    _npz(tmp_path / 'coords.npz', images, np.zeros(SAMPLES, np.int64)),
    augment='crop_flip',
    normalize=False,
    pad_mode=pad_mode,
  )
  pad, cells = 4, 9  # 32 px: pad 32 // 8, offsets 0 .. 8 per axis
  tf_batch = next(data.train_iterator(cfg, batch_size=SAMPLES, seed=0))
  aug = ondevice.make_augment_config(cfg)
  assert aug == ondevice.AugmentConfig(crop_pad=pad, pad_mode=pad_mode, flip=True, num_classes=1)
  dev_batch = jax.jit(functools.partial(ondevice.batch_at, batch_size=SAMPLES, augment_config=aug))(
    _on_device(cfg), 0, 0
  )
  assert dev_batch['image'].dtype == tf_batch['image'].dtype == np.float32
  tf_sample = _offsets_and_flips(tf_batch['image'], pad)
  dev_sample = _offsets_and_flips(dev_batch['image'], pad)
  for oy, ox, flip in (tf_sample, dev_sample):
    assert set(oy) == set(ox) == set(range(cells))  # the exact range, both axes
    assert _uniform_p(oy, cells) > ALPHA and _uniform_p(ox, cells) > ALPHA
    assert stats.binomtest(int(flip.sum()), len(flip), 0.5).pvalue > ALPHA
  p_same = _joint_p(tf_sample, dev_sample, cells)
  assert p_same > ALPHA, p_same
  # The same test rejects plausible bugs (negative controls at a fixed seed).
  rng = np.random.default_rng(0)
  uniform = lambda hi: rng.integers(0, hi, SAMPLES)
  coin = rng.random(SAMPLES) < 0.5
  oy9 = uniform(cells)
  wrong = {
    'pad 3 (offsets 0..6)': (uniform(7), uniform(7), coin),
    'inclusive maxval (offsets 0..9)': (uniform(10), uniform(10), coin),
    'no flip (or a double flip)': (oy9, uniform(cells), np.zeros(SAMPLES, bool)),
    'one offset for both axes': (oy9, oy9, coin),
  }
  for name, sample in wrong.items():
    sample = tuple(np.clip(x, 0, cells - 1) if x.dtype != bool else x for x in sample)
    assert _joint_p(tf_sample, sample, cells) < ALPHA, name


# ----------------------------------------------------------------------------
# Normalization: bit-identical to the tf.data path.


@pytest.mark.parametrize('dtype', [np.uint8, np.float32])
def test_normalized_batch_equals_tf_data_exactly(tmp_path, dtype):
  n = 64
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (n, 16, 16, 3), np.uint8)
  if dtype == np.float32:
    images = (rng.random((n, 16, 16, 3)) * rng.random((1, 1, 1, 3))).astype(np.float32)
  cfg = _cfg(_npz(tmp_path / 'x.npz', images, np.arange(n)), augment='none', normalize=True)
  tf_batch = next(data.train_iterator(cfg, batch_size=n, seed=0))
  d = _on_device(cfg)
  assert d.images.dtype == (jnp.uint8 if dtype == np.uint8 else jnp.float32)
  aug = ondevice.make_augment_config(cfg)
  assert aug == ondevice.AugmentConfig(crop_pad=0, flip=False, num_classes=n)
  dev_batch = jax.jit(functools.partial(ondevice.batch_at, batch_size=n, augment_config=aug))(
    d, 0, 0
  )
  assert dev_batch['image'].dtype == tf_batch['image'].dtype == np.float32
  assert dev_batch['label'].dtype == tf_batch['label'].dtype == np.int32
  tf_images = tf_batch['image'][np.argsort(tf_batch['label'])]
  dev_images = np.asarray(dev_batch['image'])[np.argsort(dev_batch['label'])]
  assert np.abs(tf_images - dev_images).max() == 0.0
  assert np.abs(tf_images).max() > 1.0  # really normalized


def test_batch_augment_equals_wrap_iterator(tmp_path):
  """Mixup and cutmix draw with wrap_iterator's key for batch `step`: the same numbers."""
  n = 24
  images = np.random.default_rng(3).integers(0, 256, (n, 8, 8, 3), np.uint8)
  cfg = _cfg(_npz(tmp_path / 'x.npz', images, np.arange(n) % 10), name='cifar10')
  batch_cfg = dict(augment.default_config(), mixup_alpha=0.2, cutmix_alpha=1.0)
  aug = ondevice.make_augment_config(cfg, batch_cfg)
  d = _on_device(cfg)
  plain_fn = jax.jit(functools.partial(ondevice.batch_at, batch_size=8))
  mixed_fn = jax.jit(functools.partial(ondevice.batch_at, batch_size=8, augment_config=aug))
  for step in (0, 3):
    plain = plain_fn(d, step, 5)
    want = next(augment.wrap_iterator(iter([plain]), batch_cfg, num_classes=10, seed=5, start=step))
    got = mixed_fn(d, step, 5)
    assert got['label'].shape == (8, 10)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])


def test_make_augment_config_refuses_what_it_does_not_implement(tmp_path):
  path = _npz(tmp_path / 'x.npz', np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
  with pytest.raises(ValueError, match="augment='imagenet'"):
    ondevice.make_augment_config(_cfg(path, augment='imagenet', image_size=8))
  with pytest.raises(ValueError, match='image_size=16'):
    ondevice.make_augment_config(_cfg(path, augment='crop_flip', image_size=16))


def test_fits_in_memory():
  nbytes = ondevice.split_nbytes(5085, (32, 32, 3))
  assert nbytes == 5085 * (32 * 32 * 3 + 4)
  assert ondevice.fits_in_memory(nbytes, 4 * nbytes)
  assert not ondevice.fits_in_memory(nbytes + 1, 4 * nbytes)
  assert ondevice.fits_in_memory(nbytes, nbytes, fraction=1.0)
  with pytest.raises(ValueError, match='fraction'):
    ondevice.fits_in_memory(1, 10, fraction=0.0)


# ----------------------------------------------------------------------------
# scan_steps: k steps per dispatch, exactly the separate steps.


def _linear_problem():
  rng = np.random.default_rng(4)
  d = ondevice.put_on_device(
    rng.integers(0, 256, (20, 8, 8, 3), np.uint8),
    rng.integers(0, 5, 20),
    mean=[0.5, 0.5, 0.5],
    std=[0.25, 0.25, 0.25],
  )
  aug = ondevice.AugmentConfig(crop_pad=1, pad_mode='constant', flip=True)
  tx = optax.adam(1e-2)
  params = {'w': jnp.asarray(rng.normal(size=(192, 5)), jnp.float32) * 0.01, 'b': jnp.zeros(5)}
  state = {'params': params, 'opt_state': tx.init(params)}

  def train_step(state, batch):
    def loss_fn(p):
      logits = batch['image'].reshape(batch['image'].shape[0], -1) @ p['w'] + p['b'][None]
      return optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'opt_state': opt_state}, {
      'loss': loss
    }

  return d, aug, state, train_step


def test_scan_steps_equals_separate_steps_and_resumes():
  d, aug, state0, train_step = _linear_problem()
  seed, batch_size = 7, 6  # 20 % 6 != 0: the 4 steps span two epochs
  one = jax.jit(
    lambda s, step: train_step(s, ondevice.batch_at(d, step, seed, batch_size, augment_config=aug))
  )
  state, losses = state0, []
  for step in range(4):
    state, metrics = one(state, step)
    losses.append(metrics['loss'])
  multi = functools.partial(
    ondevice.scan_steps, train_step, seed=seed, batch_size=batch_size, augment_config=aug
  )
  scan4 = jax.jit(functools.partial(multi, k=4))
  scan2 = jax.jit(functools.partial(multi, k=2))
  final4, metrics4 = scan4(state0, d, 0)
  assert metrics4['loss'].shape == (4,)
  jax.tree.map(np.testing.assert_array_equal, final4, state)
  np.testing.assert_array_equal(metrics4['loss'], np.stack(losses))
  # Resume: 2 steps, then 2 more from step 2, equals 4 from step 0.
  half, _ = scan2(state0, d, 0)
  resumed, metrics_r = scan2(half, d, 2)
  jax.tree.map(np.testing.assert_array_equal, resumed, final4)
  np.testing.assert_array_equal(metrics_r['loss'], metrics4['loss'][2:])
  assert not np.array_equal(final4['params']['w'], state0['params']['w'])


def test_scan_steps_batches_equal_batch_at_across_epochs():
  """The permutations drawn once per dispatch give batch_at's batches, over several epochs."""
  rng = np.random.default_rng(5)
  d = ondevice.put_on_device(rng.integers(0, 256, (14, 6, 6, 1), np.uint8), np.arange(14))
  aug = ondevice.AugmentConfig(crop_pad=1, pad_mode='reflect', flip=True)
  seed, batch_size, start, k = 9, 4, 3, 9  # positions 12 .. 47: epochs 0 .. 3
  scanned = jax.jit(
    functools.partial(
      ondevice.scan_steps,
      lambda state, batch: (state, batch),
      k=k,
      seed=seed,
      batch_size=batch_size,
      augment_config=aug,
    )
  )
  _, batches = scanned(jnp.zeros(()), d, start)
  one = jax.jit(functools.partial(ondevice.batch_at, batch_size=batch_size, augment_config=aug))
  for i in range(k):
    want = one(d, start + i, seed)
    np.testing.assert_array_equal(batches['label'][i], want['label'])
    np.testing.assert_array_equal(batches['image'][i], want['image'])
  labels = np.asarray(batches['label']).reshape(-1)  # stream positions 12 .. 47
  for e in (1, 2):
    np.testing.assert_array_equal(np.sort(labels[e * 14 - 12 : (e + 1) * 14 - 12]), np.arange(14))
