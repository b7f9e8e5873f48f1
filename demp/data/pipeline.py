"""Input pipelines: three sources behind one tf.data pipeline.

A *source* turns the dataset config into raw, unbatched examples
(`{'image', 'label'}`); everything after that -- sharding, shuffling,
augmentation, normalization, batching, padding -- is written once below and
shared by all sources:

  'tfds'    any TFDS image-classification dataset (cifar10, imagenet2012, mnist).
  'npz'     local arrays `train_images` uint8 [N, H, W, C], `train_labels`,
            `test_images`, `test_labels` (e.g. a CIFAR-10 subset).
  'digits'  scikit-learn's bundled 8x8 digits (no download; for smoke runs).

Public API (the trainer calls exactly these):

  default_data_config() -> ConfigDict
  get_info(cfg) -> DatasetInfo
  train_iterator(cfg, batch_size, seed, *, shard_index=None, num_shards=None)
  eval_batches(cfg, split, batch_size)
  fixed_examples(cfg, num, seed=0, split='train')

Example:

  >>> cfg = default_data_config()            # source='digits'
  >>> get_info(cfg).image_shape
  (8, 8, 1)
  >>> batch = next(train_iterator(cfg, batch_size=32, seed=0))
  >>> batch['image'].shape, batch['label'].dtype
  ((32, 8, 8, 1), dtype('int32'))

Images are float32 [B, H, W, C]: in [0, 1], or standardized per channel when
`normalize` is set. Determinism: shuffling uses a seeded `shuffle` that
reshuffles each epoch, augmentations are stateless with a per-example seed
derived from `(seed, shard_index, position in the stream)`, and the pipeline
runs with `deterministic = True`, so the same seed gives the same batches.

TensorFlow is imported on first use (importing this module does not import
it) and is hidden from every accelerator, so it never takes GPU/TPU memory
from JAX.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

if TYPE_CHECKING:
  import tensorflow as tf

Batch = dict[str, np.ndarray]
AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow here.
PLACEMENTS = ('auto', 'device', 'host')  # data.placement (demp.trainer.feed)

from demp.data.preprocess import EVAL_PREPROCESS, TRAIN_PREPROCESS
from demp.data.sources import SOURCES, DatasetInfo, RawSplit, Source, _tf

# --------------------------------------------------------------------------
# Config.


def default_data_config() -> ml_collections.ConfigDict:
  """The dataset config (`config.data`) with every field and its default.

  Fields:
    source: 'tfds' | 'npz' | 'digits' (see SOURCES).
    name: TFDS name ('cifar10', 'imagenet2012', 'mnist'); for 'npz', 'cifar10'
      fixes num_classes to 10.
    data_dir: TFDS data_dir; None = TFDS default (~/tensorflow_datasets).
    path: the .npz file for source='npz'.
    image_size: None keeps the native size; an int resizes to a square.
    augment: 'none' | 'crop_flip' (pad H/8 px -- 4 px at 32 -- random crop,
      horizontal flip) | 'imagenet' (random shorter side in
      [256, 480] * image_size/224, random crop, flip; needs image_size).
    normalize: standardize per channel (TFDS: CHANNEL_STATS by name; npz and
      digits: statistics of the training arrays).
    train_split, test_split: TFDS split strings (ImageNet: 'validation').
    pad_mode: 'reflect' | 'constant' (zeros) padding for 'crop_flip'.
    shuffle_buffer: max examples in the shuffle buffer (arrays: min with N).
    cache: keep decoded fixed-shape TFDS training splits in memory
      (variable-size images, e.g. ImageNet, stay encoded and are never cached).
    placement: where the trainer makes training batches: 'device' (the split on
      the device, batches gathered and augmented inside the jitted step:
      demp.trainer.feed), 'host' (this tf.data pipeline), 'auto' (the device
      when the split fits and its augmentation can run there).
    holdout: training examples set apart (the last `holdout` of the train
      split, in source order): never in the training stream, the death check
      or `num_train`; read them with split='holdout' (NEq's measurement slice).
      0 = none.
  """
  return ml_collections.ConfigDict(
    dict(
      source='digits',
      name='cifar10',
      data_dir=config_dict.placeholder(str),
      path=config_dict.placeholder(str),
      image_size=config_dict.placeholder(int),
      augment='none',
      normalize=True,
      train_split='train',
      test_split='test',
      pad_mode='reflect',
      shuffle_buffer=50_000,
      cache=True,
      holdout=0,
      placement='auto',
    )
  )


def _choice(key: str, value: Any, allowed: Mapping[str, Any] | tuple[str, ...]):
  if value not in allowed:
    raise ValueError(f'data.{key}={value!r} is not allowed; choose one of {sorted(allowed)}.')


def _resolve(cfg: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Defaults overridden by `cfg`, validated; raises ValueError naming the key."""
  merged = default_data_config()
  unknown = sorted(set(cfg.keys()) - set(merged.keys()))
  if unknown:
    raise ValueError(f'Unknown data config keys {unknown}; allowed: {sorted(merged.keys())}.')
  for key in cfg.keys():
    try:
      merged[key] = cfg[key]
    except TypeError as e:
      raise ValueError(f'data.{key}={cfg[key]!r} has the wrong type: {e}') from e
  _choice('source', merged.source, SOURCES)
  _choice('augment', merged.augment, TRAIN_PREPROCESS)
  _choice('pad_mode', merged.pad_mode, ('reflect', 'constant'))
  _choice('placement', merged.placement, PLACEMENTS)
  size = merged.image_size
  if size is not None and (isinstance(size, bool) or size <= 0):
    raise ValueError(f'data.image_size={size!r}; allowed: None or an int > 0.')
  if merged.augment == 'imagenet' and size is None:
    raise ValueError("data.image_size=None; augment='imagenet' needs an int (e.g. 224).")
  if isinstance(merged.holdout, bool) or merged.holdout < 0:
    raise ValueError(f'data.holdout={merged.holdout!r}; allowed: an int >= 0.')
  if merged.holdout and merged.source == 'tfds' and '[' in merged.train_split:
    raise ValueError(
      f'data.holdout={merged.holdout} needs an unsliced data.train_split, got '
      f'{merged.train_split!r}.'
    )
  if merged.shuffle_buffer <= 0:
    raise ValueError(f'data.shuffle_buffer={merged.shuffle_buffer!r}; allowed: > 0.')
  merged.lock()
  return merged


def _positive(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f'{name}={value!r}; allowed: an int > 0.')


# --------------------------------------------------------------------------
# The shared pipeline.


def open_source(cfg: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, Source, DatasetInfo]:
  """Validates the config and opens its source; fails before any compute."""
  cfg = _resolve(cfg)
  source = SOURCES[cfg.source](cfg)
  h, w, c = source.native_shape
  if cfg.image_size is not None:
    h = w = cfg.image_size
  elif h is None or w is None:
    raise ValueError(
      f'data.image_size=None but {cfg.name!r} images vary in size; set '
      'data.image_size to an int (e.g. 224).'
    )
  info = DatasetInfo(
    num_classes=int(source.num_classes),
    image_shape=(int(h), int(w), int(c)),
    num_train=int(source.num_examples['train']),
    num_test=int(source.num_examples['test']),
  )
  return cfg, source, info


def _check_split(split: str) -> None:
  if split not in ('train', 'test', 'holdout'):
    raise ValueError(f"split={split!r}; allowed: ['train', 'test', 'holdout'].")


def _finish(raw: tf.Tensor, decode, transform, source: Source) -> tf.Tensor:
  """decode -> transform -> normalize (all per example)."""
  tf = _tf()
  image = transform(decode(raw))
  if source.mean_std is not None:
    mean_c, std_c = source.mean_std
    image = (image - tf.constant(mean_c)) / tf.constant(std_c)
  return tf.cast(image, tf.float32)


def _options():
  options = _tf().data.Options()
  options.deterministic = True
  return options


def _eval_dataset(cfg, source: Source, raw: RawSplit) -> tf.data.Dataset:
  """Unbatched examples with eval preprocessing, in the order of `raw`."""
  transform = functools.partial(EVAL_PREPROCESS[cfg.augment], cfg=cfg)
  return raw.examples.map(
    lambda ex: {
      'image': _finish(ex['image'], raw.decode, transform, source),
      'label': ex['label'],
    },
    num_parallel_calls=AUTOTUNE,
  ).with_options(_options())


def get_info(cfg: Mapping[str, Any]) -> DatasetInfo:
  """Classes, preprocessed image shape (H, W, C) and split sizes."""
  return open_source(cfg)[2]


def train_iterator(
  cfg: Mapping[str, Any],
  batch_size: int,
  seed: int,
  *,
  shard_index: int | None = None,
  num_shards: int | None = None,
  start_batch: int = 0,
) -> Iterator[Batch]:
  """Infinite shuffled, augmented training batches for this host.

  Args:
    cfg: the dataset config (`config.data`).
    batch_size: examples per batch on this host (per-host batch).
    seed: shuffling, file order and augmentation all derive from it.
    shard_index: this host's shard; default `jax.process_index()`.
    num_shards: number of disjoint shards; default `jax.process_count()`.
    start_batch: batches to skip (a resumed run's position): the stream goes on
      exactly as if they had been consumed; the skipped examples are read but
      never decoded or augmented.

  Returns:
    An iterator of `{'image': float32 [B, H, W, C], 'label': int32 [B]}`,
    reshuffled each epoch, remainder dropped (batches cross epoch boundaries),
    prefetched.
  """
  tf = _tf()
  _positive('batch_size', batch_size)
  shard_index = jax.process_index() if shard_index is None else shard_index
  num_shards = jax.process_count() if num_shards is None else num_shards
  _positive('num_shards', num_shards)
  if not 0 <= shard_index < num_shards:
    raise ValueError(f'shard_index={shard_index}; allowed: 0..{num_shards - 1}.')
  cfg, source, _ = open_source(cfg)

  raw = source.load('train', shard_index, num_shards, seed, cfg.cache)
  shard_size = -(-source.num_examples['train'] // num_shards)
  buffer = min(cfg.shuffle_buffer, shard_size)
  examples = raw.examples.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
  examples = examples.repeat().enumerate()
  if start_batch:
    if start_batch < 0:
      raise ValueError(f'start_batch={start_batch!r}; allowed: an int >= 0.')
    examples = examples.skip(start_batch * batch_size)
  base_seed = tf.constant([seed, shard_index], tf.int64)
  augment = TRAIN_PREPROCESS[cfg.augment]

  def preprocess(position, ex):
    example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
    transform = lambda image: augment(image, example_seed, cfg)
    return {
      'image': _finish(ex['image'], raw.decode, transform, source),
      'label': ex['label'],
    }

  batches = (
    examples.map(preprocess, num_parallel_calls=AUTOTUNE)
    .batch(batch_size, drop_remainder=True)
    .prefetch(AUTOTUNE)
    .with_options(_options())
  )
  return batches.as_numpy_iterator()


def _padded(batches: Iterator[Batch], batch_size: int) -> Iterator[Batch]:
  """Pads the last batch to batch_size and adds 'mask' (1 real, 0 padding)."""
  for batch in batches:
    n = len(batch['label'])
    mask = np.zeros(batch_size, np.float32)
    mask[:n] = 1.0
    if n < batch_size:
      batch = {
        k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
        for k, v in batch.items()
      }
    yield {**batch, 'mask': mask}


def eval_batches(cfg: Mapping[str, Any], split: str, batch_size: int) -> Iterator[Batch]:
  """One in-order pass over `split` ('train' | 'test') without augmentation.

  Every batch has `batch_size` rows and a 'mask' float32 [B]: the last batch is
  padded with zero images and label 0, marked by mask 0, so shapes stay static.
  Not sharded: every host that calls it sees the whole split.
  """
  _check_split(split)
  _positive('batch_size', batch_size)
  cfg, source, _ = open_source(cfg)
  raw = source.load(split, 0, 1, None, False)
  batches = _eval_dataset(cfg, source, raw).batch(batch_size).prefetch(AUTOTUNE)
  return _padded(batches.as_numpy_iterator(), batch_size)


def fixed_examples(cfg: Mapping[str, Any], num: int, seed: int = 0, split: str = 'train') -> Batch:
  """`num` examples of `split` chosen by `seed`, with eval preprocessing.

  Deterministic: the same (cfg, num, seed, split) gives the same arrays. Used by
  the dead-unit check. Returns `{'image': [num, H, W, C], 'label': [num]}`.
  """
  _check_split(split)
  _positive('num', num)
  cfg, source, _ = open_source(cfg)
  if split not in source.num_examples:
    raise ValueError(f"split={split!r} needs data.holdout > 0 (got data.holdout={cfg.holdout}).")
  available = source.num_examples[split]
  if num > available:
    raise ValueError(f'num={num} but the {split!r} split has {available} examples.')
  raw = source.load(split, 0, 1, None, False)
  buffer = min(cfg.shuffle_buffer, available)
  raw = raw._replace(
    examples=raw.examples.shuffle(buffer, seed=seed, reshuffle_each_iteration=False).take(num)
  )
  return next(_eval_dataset(cfg, source, raw).batch(num).as_numpy_iterator())
