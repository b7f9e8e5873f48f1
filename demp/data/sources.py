"""Sources: a dataset config -> raw, unbatched examples (``{'image', 'label'}``).

  'tfds'    any TFDS image-classification dataset (cifar10, imagenet2012, mnist).
  'npz'     local arrays `train_images` uint8 [N, H, W, C], `train_labels`,
            `test_images`, `test_labels` (e.g. a CIFAR-10 subset).
  'digits'  scikit-learn's bundled 8x8 digits (no download; for smoke runs).

Every source hands the shared pipeline (:mod:`demp.data.pipeline`) a
:class:`Source`. TensorFlow is imported on first use (``_tf()``) and is
hidden from every accelerator, so it never takes GPU/TPU memory from JAX.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import ml_collections
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
