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

from collections.abc import Callable, Iterator, Mapping
import functools
import os
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

if TYPE_CHECKING:
  import tensorflow as tf

Batch = dict[str, np.ndarray]
AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TensorFlow here.

NPZ_KEYS = ('train_images', 'train_labels', 'test_images', 'test_labels')

# Per-channel mean and std of images in [0, 1], by TFDS name ('normalize').
CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
  'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
  'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
  'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
  'mnist': ((0.1307,), (0.3081,)),
}

# Files a manual-download TFDS dataset needs in `<data_dir>/downloads/manual/`.
MANUAL_FILES: dict[str, tuple[str, ...]] = {
  'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}

# ImageNet recipe at 224 px: train resizes the shorter side to [256, 480],
# eval to 256; both scale with image_size / 224.
IMAGENET_TRAIN_SHORTER = (256, 480)
IMAGENET_EVAL_SHORTER = 256
IMAGENET_REFERENCE_SIZE = 224

DIGITS_NUM_EXAMPLES = 1797
DIGITS_TRAIN_FRACTION = 0.8


@functools.cache
def _tf():
  """Imports TensorFlow once, hidden from all GPUs and TPUs."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # Already initialized / unknown kind.
      pass
  return tf


def _tfds():
  """Imports tensorflow_datasets (after hiding accelerators from TF)."""
  _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


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
# Sources: config -> raw unbatched examples.


class DatasetInfo(NamedTuple):
  """What the model and trainer need to know about a dataset."""

  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) after preprocessing.
  num_train: int
  num_test: int


class RawSplit(NamedTuple):
  """One split of a source before preprocessing."""

  examples: tf.data.Dataset  # Unbatched {'image': raw, 'label': int}.
  decode: Callable[[tf.Tensor], tf.Tensor]  # raw -> float32 [H, W, C] in [0, 1].


class Source(NamedTuple):
  """What a source hands the shared pipeline."""

  num_classes: int
  native_shape: tuple[int | None, int | None, int]  # None: varies per image.
  num_examples: dict[str, int]  # 'train' / 'test'.
  mean_std: tuple[np.ndarray, np.ndarray] | None  # Per channel, [0, 1] units.
  # (split 'train'|'test', shard_index, num_shards, file_seed, cache) -> RawSplit.
  load: Callable[[str, int, int, int | None, bool], RawSplit]


def _to_float01(image: tf.Tensor) -> tf.Tensor:
  """uint8 in [0, 255] -> float32 in [0, 1]; floats are taken as in [0, 1]."""
  tf = _tf()
  if image.dtype == tf.uint8:
    return tf.cast(image, tf.float32) / 255.0
  return tf.cast(image, tf.float32)


def _array_source(
  arrays: dict[str, np.ndarray], num_classes: int, normalize: bool, holdout: int = 0
) -> Source:
  """A source over in-memory arrays (the 'npz' and 'digits' sources)."""
  images_nhwc = arrays['train_images']
  num_train = len(images_nhwc) - holdout
  if num_train <= 0:
    raise ValueError(
      f'data.holdout={holdout} leaves no training examples '
      f'(the train split has {len(images_nhwc)}).'
    )
  parts = {
    'train': ('train', slice(0, num_train)),
    'test': ('test', slice(None)),
    'holdout': ('train', slice(num_train, None)),
  }
  mean_std = None
  if normalize:
    scale = 255.0 if images_nhwc.dtype == np.uint8 else 1.0
    pixels = images_nhwc.reshape(-1, images_nhwc.shape[-1]).astype(np.float64)
    mean_c = pixels.mean(axis=0) / scale
    std_c = np.maximum(pixels.std(axis=0) / scale, 1e-6)
    mean_std = (mean_c.astype(np.float32), std_c.astype(np.float32))

  def load(split, shard_index, num_shards, file_seed, cache) -> RawSplit:
    del file_seed, cache  # Arrays are in memory and in order.
    name, part = parts[split]
    images = arrays[f'{name}_images'][part][shard_index::num_shards]
    labels = arrays[f'{name}_labels'][part][shard_index::num_shards]
    if len(images) == 0:
      raise ValueError(
        f'Shard {shard_index} of {num_shards} of the {split!r} split is empty '
        f'({len(arrays[f"{split}_images"])} examples).'
      )
    examples = _tf().data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels.astype(np.int32)}
    )
    return RawSplit(examples, _to_float01)

  return Source(
    num_classes=num_classes,
    native_shape=tuple(images_nhwc.shape[1:]),
    num_examples={
      'train': num_train,
      'test': len(arrays['test_images']),
      **({'holdout': holdout} if holdout else {}),
    },
    mean_std=mean_std,
    load=load,
  )


@functools.cache
def _digits_arrays() -> dict[str, np.ndarray]:
  """sklearn digits in [0, 1], [N, 8, 8, 1], split 80/20 by a seed-0 permutation."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(images))
  num_train = int(DIGITS_TRAIN_FRACTION * len(images))
  train, test = order[:num_train], order[num_train:]
  return {
    'train_images': images[train],
    'train_labels': labels[train],
    'test_images': images[test],
    'test_labels': labels[test],
  }


def _digits_source(cfg: ml_collections.ConfigDict) -> Source:
  """scikit-learn's bundled 8x8 digits: 1797 images, 10 classes."""
  return _array_source(_digits_arrays(), 10, cfg.normalize, cfg.holdout)


NPZ_LAYOUT = (
  'a valid file is an .npz archive (np.savez) of four plain numeric arrays: train_images '
  '[N, H, W, C] uint8 (or float in [0, 1]), train_labels [N] integers, test_images '
  '[M, H, W, C], test_labels [M] integers'
)


def _bad_npz(path: str, what: str) -> ValueError:
  return ValueError(f'data.path={path!r} {what}; {NPZ_LAYOUT}.')


@functools.lru_cache(maxsize=4)
def _read_npz(path: str, mtime_ns: int) -> dict[str, np.ndarray]:
  """The four arrays of an .npz; refuses empty, truncated, non-npz and pickled files.

  Never loads with ``allow_pickle``: a data file must not run code.
  """
  del mtime_ns  # Part of the cache key only.
  size = os.path.getsize(path)
  if size == 0:
    raise _bad_npz(path, 'is empty (0 bytes)')
  with open(path, 'rb') as f:
    magic = f.read(4)
  if magic != b'PK\x03\x04':  # an .npz is a zip archive
    kind = 'a single .npy array' if magic[:4] == b'\x93NUM' else 'not an .npz (zip) archive'
    raise _bad_npz(path, f'is {kind} (first bytes {magic!r}, {size} bytes)')
  out = {}
  try:
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in NPZ_KEYS if k not in f.files]
      if missing:
        raise _bad_npz(path, f'lacks arrays {missing} (it holds {sorted(f.files)})')
      for k in NPZ_KEYS:
        out[k] = f[k]
  except ValueError as e:
    if 'data.path=' in str(e):
      raise
    if 'pickle' in str(e).lower():  # object arrays need pickle to load
      raise _bad_npz(
        path, 'holds pickled (object-dtype) arrays, which are refused: loading them could run code'
      ) from None
    raise _bad_npz(path, f'cannot be read: {type(e).__name__}: {e}') from None
  except Exception as e:  # pylint: disable=broad-except  (zipfile/EOF/OS errors of a cut file)
    raise _bad_npz(path, f'is truncated or corrupt ({type(e).__name__}: {e})') from None
  for k, a in out.items():
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
      raise _bad_npz(path, f'has {k} of dtype {a.dtype}')
  return out


def _npz_source(cfg: ml_collections.ConfigDict) -> Source:
  """Arrays from `cfg.path`: uint8 (or float in [0, 1]) [N, H, W, C] + labels."""
  path = cfg.path
  if path is None:
    raise ValueError(
      "data.path=None; source='npz' needs data.path set to an .npz file with "
      f'keys {list(NPZ_KEYS)}.'
    )
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'data.path={cfg.path!r} does not exist (resolved: {os.path.abspath(path)}); {NPZ_LAYOUT}.'
    )
  arrays = _read_npz(os.path.abspath(path), os.stat(path).st_mtime_ns)
  for split in ('train', 'test'):
    images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
    if images.ndim != 4:
      raise ValueError(
        f'data.path={cfg.path!r}: {split}_images has shape {images.shape}; expected [N, H, W, C].'
      )
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(
        f'data.path={cfg.path!r}: {split}_labels has shape {labels.shape} and '
        f'dtype {labels.dtype}; expected integers of shape ({len(images)},).'
      )
  if arrays['train_images'].shape[1:] != arrays['test_images'].shape[1:]:
    raise ValueError(
      f'data.path={cfg.path!r}: train images {arrays["train_images"].shape[1:]} '
      f'and test images {arrays["test_images"].shape[1:]} differ in shape.'
    )
  all_labels = np.concatenate([arrays['train_labels'], arrays['test_labels']])
  num_classes = 10 if cfg.name == 'cifar10' else int(all_labels.max()) + 1
  if all_labels.min() < 0 or all_labels.max() >= num_classes:
    raise ValueError(
      f'data.path={cfg.path!r}: labels span [{all_labels.min()}, '
      f'{all_labels.max()}], outside [0, {num_classes}) (data.name={cfg.name!r}).'
    )
  return _array_source(arrays, num_classes, cfg.normalize, cfg.holdout)


def _tfds_missing_message(builder, name: str) -> str:
  """How to get a TFDS dataset that is not prepared in its data_dir."""
  root = builder.data_dir_root
  base = name.split(':')[0]
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    manual_dir = os.path.join(root, 'downloads', 'manual')
    files = MANUAL_FILES.get(base)
    what = (
      ' and '.join(files)
      if files
      else f'the files below ({builder.MANUAL_DOWNLOAD_INSTRUCTIONS.strip()})'
    )
    return (
      f'TFDS dataset {name!r} is not prepared in {root}. It needs a manual '
      f'download: put {what} in {manual_dir}/ then run '
      f'`tfds build {base} --data_dir={root}`.'
    )
  return (
    f'TFDS dataset {name!r} is not prepared in {root}. On a machine with '
    f'internet run `tfds build {base} --data_dir={root}` (or `python -c '
    f'"import tensorflow_datasets as tfds; tfds.load(\'{name}\', '
    f'data_dir=\'{root}\')"`) and copy {root} here, set data.data_dir to '
    'where it is, or use local arrays with data.source=npz.'
  )


def _tfds_source(cfg: ml_collections.ConfigDict) -> Source:
  """A TFDS image-classification dataset with 'image' and 'label' features."""
  tf, tfds = _tf(), _tfds()
  try:
    builder = tfds.builder(cfg.name, data_dir=cfg.data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f'data.name={cfg.name!r} is not a TFDS dataset.') from e
  features = builder.info.features
  if 'image' not in features or 'label' not in features:
    raise ValueError(
      f"data.name={cfg.name!r} has features {list(features)}; need 'image' and 'label'."
    )
  image_feature = features['image']
  native_shape = tuple(image_feature.shape)
  variable = None in native_shape  # e.g. ImageNet: keep encoded, decode late.
  mean_std = None
  if cfg.normalize:
    base = cfg.name.split(':')[0].split('/')[0]
    if base not in CHANNEL_STATS:
      raise ValueError(
        f'data.normalize=True but no channel statistics are known for '
        f'data.name={cfg.name!r}; known: {sorted(CHANNEL_STATS)}. Set '
        'data.normalize=False or add the name to demp.data.CHANNEL_STATS.'
      )
    mean_std = tuple(np.asarray(v, np.float32) for v in CHANNEL_STATS[base])
  splits = {'train': cfg.train_split, 'test': cfg.test_split}
  if cfg.holdout:
    splits.update(
      train=f'{cfg.train_split}[:-{cfg.holdout}]', holdout=f'{cfg.train_split}[-{cfg.holdout}:]'
    )

  def as_dataset(split_arg, file_seed: int | None, decode_now: bool):
    try:
      return builder.as_dataset(
        split=split_arg,
        shuffle_files=file_seed is not None,
        read_config=tfds.ReadConfig(shuffle_seed=file_seed),
        decoders=None if decode_now else {'image': tfds.decode.SkipDecoding()},
      )
    except AssertionError as e:  # TFDS's "could not find data in ...".
      raise FileNotFoundError(_tfds_missing_message(builder, cfg.name)) from e

  def num_examples(split: str) -> int:
    try:
      return builder.info.splits[splits[split]].num_examples
    except KeyError:  # No split metadata: not prepared (raises), or mocked.
      count = int(as_dataset(splits[split], None, True).cardinality())
      if count < 0:
        raise ValueError(f'Cannot count the examples of {cfg.name}:{splits[split]}.')
      return count

  def load(split, shard_index, num_shards, file_seed, cache) -> RawSplit:
    split_arg = splits[split]
    if num_shards > 1:
      split_arg = tfds.even_splits(split_arg, n=num_shards)[shard_index]
    examples = as_dataset(split_arg, file_seed, decode_now=not variable)
    examples = examples.map(
      lambda ex: {'image': ex['image'], 'label': tf.cast(ex['label'], tf.int32)}
    )
    if cache and not variable:
      examples = examples.cache()
    if variable:
      decode = lambda raw: _to_float01(image_feature.decode_example(raw))
    else:
      decode = _to_float01
    return RawSplit(examples, decode)

  return Source(
    num_classes=features['label'].num_classes,
    native_shape=native_shape,
    num_examples={s: num_examples(s) for s in splits},
    mean_std=mean_std,
    load=load,
  )


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], Source]] = {
  'tfds': _tfds_source,
  'npz': _npz_source,
  'digits': _digits_source,
}


# --------------------------------------------------------------------------
# Preprocessing: float32 [H, W, C] in [0, 1] -> float32 [h, w, C].


def _resize_square(image: tf.Tensor, size: int | None) -> tf.Tensor:
  if size is None:
    return image
  return _tf().image.resize(image, [size, size], antialias=True)


def _resize_shorter_side(image: tf.Tensor, shorter: tf.Tensor) -> tf.Tensor:
  """Resizes so that min(H, W) == shorter, keeping the aspect ratio."""
  tf = _tf()
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = tf.cast(shorter, tf.float32) / tf.reduce_min(hw)
  new_hw = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), shorter)
  return tf.image.resize(image, new_hw, antialias=True)


def _scaled(pixels: int, image_size: int) -> int:
  return int(round(pixels * image_size / IMAGENET_REFERENCE_SIZE))


def _eval_plain(image: tf.Tensor, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Native size, or a square resize to image_size."""
  return _resize_square(image, cfg.image_size)


def _eval_imagenet(image: tf.Tensor, cfg: ml_collections.ConfigDict) -> tf.Tensor:
  """Shorter side to 256 * image_size/224, then a central image_size crop."""
  tf = _tf()
  size = cfg.image_size
  image = _resize_shorter_side(image, _scaled(IMAGENET_EVAL_SHORTER, size))
  image = tf.image.resize_with_crop_or_pad(image, size, size)
  return tf.ensure_shape(image, [size, size, image.shape[-1]])


def _train_none(image, seed, cfg):
  del seed
  return _eval_plain(image, cfg)


def _train_crop_flip(image, seed, cfg):
  """Resize (if image_size), pad H/8 px, random crop back, random h-flip."""
  tf = _tf()
  image = _eval_plain(image, cfg)
  h, w, c = image.shape
  pad = max(1, h // 8)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode=cfg.pad_mode.upper())
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = tf.image.stateless_random_crop(padded, [h, w, c], seed=crop_seed)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


def _train_imagenet(image, seed, cfg):
  """Shorter side random in [256, 480] * image_size/224, random crop, h-flip."""
  tf = _tf()
  size = cfg.image_size
  c = image.shape[-1]
  size_seed, crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  low, high = (_scaled(p, size) for p in IMAGENET_TRAIN_SHORTER)
  shorter = tf.random.stateless_uniform([], size_seed, minval=low, maxval=high + 1, dtype=tf.int32)
  image = _resize_shorter_side(image, shorter)
  image = tf.image.stateless_random_crop(image, [size, size, c], seed=crop_seed)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_seed)


# augment name -> (image, seed [2], cfg) -> image; and its eval counterpart.
TRAIN_PREPROCESS: dict[str, Callable[..., tf.Tensor]] = {
  'none': _train_none,
  'crop_flip': _train_crop_flip,
  'imagenet': _train_imagenet,
}
EVAL_PREPROCESS: dict[str, Callable[..., tf.Tensor]] = {
  'none': _eval_plain,
  'crop_flip': _eval_plain,
  'imagenet': _eval_imagenet,
}


# --------------------------------------------------------------------------
# The shared pipeline.


def _open(cfg: Mapping[str, Any]) -> tuple[ml_collections.ConfigDict, Source, DatasetInfo]:
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
  return _open(cfg)[2]


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
  cfg, source, _ = _open(cfg)

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
  cfg, source, _ = _open(cfg)
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
  cfg, source, _ = _open(cfg)
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


# ----------------------------------------------------------------------------
# The reduced-scale CIFAR-10 subset, rebuilt from the public release.

CIFAR10_BINARY_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
"""The public CIFAR-10 binary release (Krizhevsky, 2009); no pickle involved."""

_CIFAR_RECORD = 1 + 32 * 32 * 3  # a label byte, then 3072 pixel bytes (R, G, B planes)


def _cifar_binary_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Images [N, 32, 32, 3] uint8 (HWC) and labels [N] of one ``data_batch_*.bin``."""
  if len(raw) % _CIFAR_RECORD:
    raise ValueError(
      f'{name}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte '
      'CIFAR-10 records; is this the binary release?'
    )
  records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
  images_nchw = records[:, 1:].reshape(-1, 3, 32, 32)
  return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1)), records[:, 0].astype(np.int64)


def make_cifar10_subset(archive: str, out: str, per_batch: int = 1017) -> dict[str, tuple]:
  """Writes the reduced CIFAR-10 subset used by the ``*_cifar10_subset`` configs.

  Train: the first ``per_batch`` images of each of the five training batches
  (``data_batch_1..5``), in file order; test: the first ``per_batch`` images of
  ``test_batch``. With the default 1017 this is 5,085 training and 1,017 test
  images, the file the reduced-scale results were measured on.

  Args:
    archive: the public ``cifar-10-binary.tar.gz`` (:data:`CIFAR10_BINARY_URL`).
    out: the ``.npz`` to write (``train_images``, ``train_labels``,
      ``test_images``, ``test_labels``; see :data:`NPZ_LAYOUT`).
    per_batch: images taken from the start of every batch file.

  Returns:
    ``{array name: shape}`` of what was written.
  """
  import tarfile  # pylint: disable=g-import-not-at-top

  if per_batch < 1:
    raise ValueError(f'per_batch={per_batch!r} must be >= 1.')
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  found = {}
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar.getmembers():
      base = os.path.basename(member.name)
      if base in names and member.isfile():
        found[base] = tar.extractfile(member).read()
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(
      f'{archive!r} lacks {missing}: expected the CIFAR-10 binary release ({CIFAR10_BINARY_URL}).'
    )
  batches = {n: _cifar_binary_batch(found[n], n) for n in names}
  for n, (images, _) in batches.items():
    if len(images) < per_batch:
      raise ValueError(f'{n} holds {len(images)} images, fewer than per_batch={per_batch}.')
  train = [batches[n] for n in names[:5]]
  arrays = {
    'train_images': np.concatenate([x[:per_batch] for x, _ in train]),
    'train_labels': np.concatenate([y[:per_batch] for _, y in train]),
    'test_images': batches['test_batch.bin'][0][:per_batch],
    'test_labels': batches['test_batch.bin'][1][:per_batch],
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  return {k: v.shape for k, v in arrays.items()}
