"""The in-memory fast path: the training split on the device, batches made inside jit.

The tf.data pipeline (:mod:`demp.data`) decodes, augments and batches on the
host and copies every batch to the device: a fixed cost per step that does not
shrink when pruning makes the network smaller. When the whole training split
fits in device memory (CIFAR-10: 154 MB of uint8), this module keeps it there
and makes each batch with a pure function of the step, so the batch is made
inside the jitted train step and ``k`` steps run per dispatch::

    images, labels, mean, std = load_train_split(config.data)
    data = put_on_device(images, labels, mean=mean, std=std)
    aug = make_augment_config(config.data, config.batch_augment)
    multi_step = jax.jit(
        functools.partial(scan_steps, train_step, k=8, seed=config.seed,
                          batch_size=config.batch_size, augment_config=aug),
        donate_argnums=0,
    )
    state, metrics = multi_step(state, data, step)  # metrics['loss']: [8]

Determinism contract: batch ``step`` is a pure function of ``(data, seed,
step, batch_size, augment_config)``. The examples are the positions
``[step * B, (step + 1) * B)`` of an endless stream made of one permutation of
the split per epoch (no example is dropped; a batch may span two epochs, as
the tf.data path's ``repeat().batch(B, drop_remainder=True)``), so resuming at
step ``k`` gives bit-identical batches to an uninterrupted run. Keys:

* order of epoch ``e``: ``fold_in(fold_in(key(seed), ORDER_STREAM), e)``;
* crop offsets and flips of step ``s``: ``fold_in(fold_in(key(seed), AUGMENT_STREAM), s)``;
* RandAugment / mixup / cutmix of step ``s`` (``config.batch_augment``):
  ``fold_in(fold_in(key(seed), 0x5EED), s)``, the key :func:`demp.data.augment.wrap_iterator`
  gives batch ``s``, so those ops draw exactly as on the tf.data path.

The augmentation draws from the same distribution as the tf.data path
(``data.augment='crop_flip'``: pad ``max(1, H // 8)`` pixels, reflect or zeros,
crop offsets uniform in ``[0, 2 * pad]`` per axis, horizontal flip with
probability 1/2), not the same numbers: TensorFlow's and JAX's generators
differ. Normalization is bit-identical to the tf.data path's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from demp.data import augment as augment_lib
from demp.data import pipeline

Batch = dict[str, jax.Array]
State = Any
Metrics = Any
TrainStep = Callable[[State, Batch], tuple[State, Metrics]]

ORDER_STREAM = 0
"""``fold_in`` tag of the key stream that orders the examples (one permutation per epoch)."""
AUGMENT_STREAM = 1
"""``fold_in`` tag of the key stream of crop offsets and flips (one key per step)."""
BATCH_AUGMENT_STREAM = 0x5EED
"""``fold_in`` tag of RandAugment / mixup / cutmix: :func:`demp.data.augment.wrap_iterator`'s."""

DEFAULT_FRACTION = 0.25
"""Share of device memory the training split may take (params, activations need the rest)."""


class DeviceData(NamedTuple):
  """The training split on the device (a pytree: pass it to jitted functions as an argument).

  Attributes:
    images: ``[N, H, W, C]``, uint8 in ``[0, 255]`` or float32 in ``[0, 1]``:
      the source's dtype, before the float conversion and normalization.
    labels: ``[N]`` int32.
    mean: ``[C]`` float32 per-channel mean in ``[0, 1]`` units, or None (no normalization).
    std: ``[C]`` float32 per-channel std, or None.
    lut: uint8 images only: float32 ``[256, C]``, the normalized value of each byte
      per channel, computed on the host in float32 exactly as the tf.data path
      computes it (``(v / 255 - mean) / std``). Normalizing is then one gather:
      no arithmetic a compiler could rewrite (XLA turns ``x / 255`` into
      ``x * (1 / 255)``, which differs in the last bit).
  """

  images: jax.Array
  labels: jax.Array
  mean: jax.Array | None = None
  std: jax.Array | None = None
  lut: jax.Array | None = None


class AugmentConfig(NamedTuple):
  """What :func:`batch_at` does to a batch: static, hashable; see :func:`make_augment_config`.

  ``crop_pad`` 0 = no crop; the ``batch_augment`` fields are
  :func:`demp.data.augment.default_config`'s, ``num_classes`` is needed when mixing.
  """

  crop_pad: int = 0
  pad_mode: str = 'reflect'
  flip: bool = False
  randaugment_ops: int = 0
  randaugment_magnitude: int = 9
  randaugment_bins: int = 31
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  num_classes: int = 0


# ----------------------------------------------------------------------------
# Host side: when the path applies, loading, placing.


def split_nbytes(num_examples: int, image_shape: tuple[int, ...], dtype: Any = np.uint8) -> int:
  """Bytes :class:`DeviceData` takes for ``num_examples`` images of ``image_shape`` (+ labels)."""
  return int(num_examples) * (
    int(np.prod(image_shape)) * np.dtype(dtype).itemsize + np.dtype(np.int32).itemsize
  )


def device_memory_limit(device: jax.Device | None = None) -> int | None:
  """Device memory in bytes (``memory_stats()["bytes_limit"]``); host RAM on CPU; else None."""
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and stats.get('bytes_limit'):
    return int(stats['bytes_limit'])
  if device.platform == 'cpu':
    try:
      return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
      return None
  return None


def fits_in_memory(
  nbytes: int, limit: int | None = None, *, fraction: float = DEFAULT_FRACTION
) -> bool:
  """Whether a split of ``nbytes`` may live on the device: ``nbytes <= fraction * limit``.

  ``limit`` None: :func:`device_memory_limit` of the first local device (False if unknown).
  """
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'fraction={fraction!r}; allowed: 0 < fraction <= 1.')
  if limit is None:
    limit = device_memory_limit()
    if limit is None:
      return False
  return int(nbytes) <= fraction * int(limit)


def put_on_device(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  mean: np.ndarray | None = None,
  std: np.ndarray | None = None,
  device: jax.Device | None = None,
) -> DeviceData:
  """:class:`DeviceData` from host arrays (uint8 or float in ``[0, 1]`` images, int labels).

  ``mean`` / ``std``: per channel, ``[0, 1]`` units (``None`` for both: no normalization).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim != 4:
    raise ValueError(f'images have shape {images.shape}; expected [N, H, W, C].')
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(
      f'labels have shape {labels.shape} and dtype {labels.dtype}; expected integers of '
      f'shape ({len(images)},).'
    )
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f'images have dtype {images.dtype}; expected uint8 or float in [0, 1].')
    images = images.astype(np.float32)
  if (mean is None) != (std is None):
    raise ValueError('mean and std: give both or neither.')
  stats = None
  if mean is not None:
    c = images.shape[-1]
    stats = tuple(np.asarray(v, np.float32).reshape(-1) for v in (mean, std))
    if any(v.shape != (c,) for v in stats):
      raise ValueError(f'mean / std have shapes {[v.shape for v in stats]}; expected ({c},).')
  lut = None
  if images.dtype == np.uint8:
    lut = np.broadcast_to(
      np.arange(256, dtype=np.float32)[:, None] / np.float32(255.0), (256, images.shape[-1])
    )
    if stats is not None:
      lut = (lut - stats[0][None]) / stats[1][None]
    lut = np.ascontiguousarray(lut, np.float32)
  device = device or jax.local_devices()[0]
  put = lambda x: None if x is None else jax.device_put(x, device)
  return DeviceData(
    images=put(images),
    labels=put(labels.astype(np.int32)),
    mean=put(None if stats is None else stats[0]),
    std=put(None if stats is None else stats[1]),
    lut=put(lut),
  )


def load_train_split(
  data_cfg: Mapping[str, Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
  """``(images, labels, mean, std)`` of the training split exactly as the tf.data path reads it.

  The raw (undecoded) examples of the config's source in source order, holdout
  excluded, and the source's normalization constants (None when
  ``normalize=False``). Single host: the whole split, unsharded. Raises
  ValueError for variable-size images (e.g. ImageNet: no fixed-shape array).
  """
  cfg, source, info = pipeline.open_source(data_cfg)
  if None in source.native_shape[:2]:
    raise ValueError(
      f'data.name={cfg.name!r} has variable-size images; the on-device path needs a '
      'fixed-shape split.'
    )
  raw = source.load('train', 0, 1, None, False)
  batch = next(raw.examples.batch(info.num_train).as_numpy_iterator())
  images, labels = batch['image'], batch['label']
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'train images have dtype {images.dtype}; expected uint8 or float.')
  mean, std = source.mean_std if source.mean_std is not None else (None, None)
  return images, labels, mean, std


def make_augment_config(
  data_cfg: Mapping[str, Any], batch_augment: Mapping[str, Any] | None = None
) -> AugmentConfig:
  """The :class:`AugmentConfig` equal in distribution to the tf.data path of ``data_cfg``.

  Supported: ``data.augment`` 'none' and 'crop_flip' (either ``pad_mode``) at
  the native image size, and every ``batch_augment`` op. Raises ValueError
  naming the setting the on-device path does not implement.
  """
  from demp import data as data_lib  # pylint: disable=g-import-not-at-top

  cfg = data_lib.default_data_config()
  cfg.update(dict(data_cfg))
  if cfg.augment not in ('none', 'crop_flip'):
    raise ValueError(
      f'data.augment={cfg.augment!r} is not implemented on the device; '
      "supported: 'none', 'crop_flip' (use the tf.data path)."
    )
  if cfg.image_size is not None:
    raise ValueError(
      f'data.image_size={cfg.image_size!r}: resizing is not implemented on the device; '
      'set data.image_size=None (native size) or use the tf.data path.'
    )
  info = data_lib.get_info(data_cfg)  # validates the config and opens the source
  h, _, _ = info.image_shape
  batch = dict(augment_lib.default_config())
  batch.update(dict(batch_augment or {}))
  augment_lib.validate(batch, normalize=cfg.normalize)
  crop = cfg.augment == 'crop_flip'
  return AugmentConfig(
    crop_pad=max(1, h // 8) if crop else 0,
    pad_mode=cfg.pad_mode,
    flip=crop,
    num_classes=info.num_classes,
    **batch,
  )


# ----------------------------------------------------------------------------
# Device side: pure, jittable.


def epoch_permutations(
  seed: jax.Array | int, first_epoch: jax.Array | int, num_epochs: int, num_examples: int
) -> jax.Array:
  """int32 ``[num_epochs, num_examples]``: the order of epochs ``first_epoch ..``.

  Epoch ``e`` is ``jax.random.permutation(fold_in(fold_in(key(seed), ORDER_STREAM), e), N)``.
  """
  order_key = jax.random.fold_in(jax.random.key(seed), ORDER_STREAM)
  epochs = jnp.asarray(first_epoch, jnp.int32) + jnp.arange(num_epochs, dtype=jnp.int32)
  perm = lambda e: jax.random.permutation(jax.random.fold_in(order_key, e), num_examples)
  return jax.vmap(perm)(epochs).astype(jnp.int32)


def _epochs_spanned(num_positions: int, batch_size: int, num_examples: int) -> int:
  """Most epochs ``num_positions`` consecutive stream positions from a batch start can touch."""
  if not 0 < batch_size <= num_examples:
    raise ValueError(f'batch_size={batch_size}; allowed: 1 .. num_examples={num_examples}.')
  if num_positions == batch_size and num_examples % batch_size == 0:
    return 1  # a batch never spans two epochs
  return (num_positions - 1) // num_examples + 2


def _first_epoch(step: jax.Array, batch_size: int, num_examples: int) -> jax.Array:
  return (step * batch_size) // num_examples


def _indices_from(
  perms: jax.Array, first_epoch: jax.Array, step: jax.Array, batch_size: int
) -> jax.Array:
  """The examples of batch ``step`` given the permutations of epochs ``first_epoch ..``."""
  n = perms.shape[1]
  positions_b = step * batch_size + jnp.arange(batch_size, dtype=jnp.int32)
  return perms[positions_b // n - first_epoch, positions_b % n]


def example_indices(
  step: jax.Array | int, seed: jax.Array | int, batch_size: int, num_examples: int
) -> jax.Array:
  """int32 ``[batch_size]``: the examples of batch ``step`` (positions ``step*B ..``) of the stream.

  The stream is one permutation of ``range(num_examples)`` per epoch
  (:func:`epoch_permutations`). Positions are int32: ``step * batch_size`` must
  stay below 2**31.
  """
  step = jnp.asarray(step, jnp.int32)
  first = _first_epoch(step, batch_size, num_examples)
  spanned = _epochs_spanned(batch_size, batch_size, num_examples)
  perms = epoch_permutations(seed, first, spanned, num_examples)
  return _indices_from(perms, first, step, batch_size)


def _source_index(s: jax.Array, size: int, pad_mode: str) -> tuple[jax.Array, jax.Array | None]:
  """Index into the unpadded axis of padded-minus-pad index ``s``; and validity (zeros mode)."""
  if pad_mode == 'reflect':  # tf.pad REFLECT / np 'reflect': the edge is not repeated
    s = jnp.abs(s)
    return (size - 1) - jnp.abs((size - 1) - s), None
  if pad_mode == 'constant':
    valid = (s >= 0) & (s < size)
    return jnp.clip(s, 0, size - 1), valid
  raise ValueError(f"pad_mode={pad_mode!r}; allowed: 'reflect', 'constant'.")


def gather_crop_flip(
  images: jax.Array,
  indices_b: jax.Array,
  offsets_b2: jax.Array | None,
  flips_b: jax.Array | None,
  *,
  pad: int,
  pad_mode: str,
) -> jax.Array:
  """``images[indices]``, each padded by ``pad``, cropped at ``offsets`` and flipped: one gather.

  Equal to tf.data's ``pad -> crop(offset) -> flip`` per example: output pixel
  ``(i, j)`` reads padded ``(oy + i, ox + (W - 1 - j if flip else j))``.
  ``offsets_b2`` None: no crop; ``flips_b`` None: no flip. Same dtype as ``images``.
  """
  _, h, w, _ = images.shape
  b = indices_b.shape[0]
  rows_bh = jnp.broadcast_to(jnp.arange(h), (b, h))
  cols_bw = jnp.broadcast_to(jnp.arange(w), (b, w))
  if flips_b is not None:
    cols_bw = jnp.where(flips_b[:, None], (w - 1) - cols_bw, cols_bw)
  if offsets_b2 is None:
    return images[indices_b[:, None, None], rows_bh[:, :, None], cols_bw[:, None, :]]
  rows_bh, valid_rows = _source_index(rows_bh + offsets_b2[:, :1] - pad, h, pad_mode)
  cols_bw, valid_cols = _source_index(cols_bw + offsets_b2[:, 1:] - pad, w, pad_mode)
  out = images[indices_b[:, None, None], rows_bh[:, :, None], cols_bw[:, None, :]]
  if valid_rows is not None:
    valid_bhw1 = (valid_rows[:, :, None] & valid_cols[:, None, :])[..., None]
    out = jnp.where(valid_bhw1, out, jnp.zeros((), out.dtype))
  return out


def normalize(images: jax.Array, data: DeviceData) -> jax.Array:
  """float32 images bit-identical to the tf.data path's: ``(x / 255 - mean) / std``.

  uint8: a gather from ``data.lut``. Float: ``(x - mean) / std`` with ``std``
  behind an optimization barrier, so XLA cannot turn the division by a
  constant (a closed-over ``data``) into a multiplication.
  """
  if images.dtype == jnp.uint8:
    c = images.shape[-1]
    channel = jnp.arange(c, dtype=jnp.int32).reshape((1,) * (images.ndim - 1) + (c,))
    return jnp.take(data.lut.T.reshape(-1), images.astype(jnp.int32) + 256 * channel)
  x = images.astype(jnp.float32)
  if data.mean is not None:
    shape = (1,) * (x.ndim - 1) + (-1,)
    std = jax.lax.optimization_barrier(data.std)
    x = (x - data.mean.reshape(shape)) / std.reshape(shape)
  return x


def batch_at(
  data: DeviceData,
  step: jax.Array | int,
  seed: jax.Array | int,
  batch_size: int,
  *,
  augment_config: AugmentConfig = AugmentConfig(),
) -> Batch:
  """Batch ``step`` of the training stream: ``{'image': float32 [B, H, W, C], 'label': int32 [B]}``.

  Pure and jittable (``step`` and ``seed`` may be traced; ``batch_size`` and
  ``augment_config`` are static): the examples of :func:`example_indices`, crop
  and flip drawn with ``fold_in(fold_in(key(seed), AUGMENT_STREAM), step)``,
  normalized, then ``batch_augment``'s ops with the key
  :func:`demp.data.augment.wrap_iterator` gives batch ``step``. With mixup or cutmix
  on, ``'label'`` is float32 ``[B, K]``.
  """
  indices_b = example_indices(step, seed, batch_size, data.labels.shape[0])
  return _batch_of(data, indices_b, step, seed, augment_config)


def _batch_of(
  data: DeviceData,
  indices_b: jax.Array,
  step: jax.Array | int,
  seed: jax.Array | int,
  cfg: AugmentConfig,
) -> Batch:
  """Batch ``step`` made of the examples ``indices_b``: crop, flip, normalize, batch_augment."""
  batch_size = indices_b.shape[0]
  step = jnp.asarray(step, jnp.int32)
  offsets_b2 = flips_b = None
  if cfg.crop_pad or cfg.flip:
    k_crop, k_flip = jax.random.split(
      jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), AUGMENT_STREAM), step)
    )
    if cfg.crop_pad:
      offsets_b2 = jax.random.randint(k_crop, (batch_size, 2), 0, 2 * cfg.crop_pad + 1)
    if cfg.flip:
      flips_b = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
  images = gather_crop_flip(
    data.images, indices_b, offsets_b2, flips_b, pad=cfg.crop_pad, pad_mode=cfg.pad_mode
  )
  batch = {'image': normalize(images, data), 'label': data.labels[indices_b]}
  if cfg.randaugment_ops or cfg.mixup_alpha or cfg.cutmix_alpha:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), BATCH_AUGMENT_STREAM), step)
    batch = augment_lib.augment_batch(
      key,
      batch,
      num_classes=cfg.num_classes,
      randaugment_ops=cfg.randaugment_ops,
      randaugment_magnitude=cfg.randaugment_magnitude,
      randaugment_bins=cfg.randaugment_bins,
      mixup_alpha=cfg.mixup_alpha,
      cutmix_alpha=cfg.cutmix_alpha,
    )
  return batch


def scan_steps(
  train_step: TrainStep,
  state: State,
  data: DeviceData,
  start: jax.Array | int,
  k: int,
  *,
  seed: jax.Array | int,
  batch_size: int,
  augment_config: AugmentConfig = AugmentConfig(),
) -> tuple[State, Metrics]:
  """Steps ``start .. start + k - 1`` in one ``lax.scan``: ``(final state, metrics stacked [k])``.

  ``train_step(state, batch) -> (state, metrics)`` is pure (no host calls),
  returns a state of the same structure, shapes and dtypes, and metrics a
  pytree of arrays; ``batch`` is :func:`batch_at`'s dict. Jit the whole call
  with ``train_step``, ``k``, ``batch_size`` and ``augment_config`` static (e.g.
  bound by ``functools.partial``) and ``donate_argnums`` on the state.
  """
  if k < 1:
    raise ValueError(f'k={k!r}; allowed: an int >= 1.')
  n = data.labels.shape[0]
  start = jnp.asarray(start, jnp.int32)
  first = _first_epoch(start, batch_size, n)
  # The permutations of every epoch the k batches touch, drawn once per dispatch.
  perms = epoch_permutations(seed, first, _epochs_spanned(k * batch_size, batch_size, n), n)

  def body(state, step):
    indices_b = _indices_from(perms, first, step, batch_size)
    return train_step(state, _batch_of(data, indices_b, step, seed, augment_config))

  return jax.lax.scan(body, state, start + jnp.arange(k, dtype=jnp.int32))


__all__ = [
  'AUGMENT_STREAM',
  'AugmentConfig',
  'BATCH_AUGMENT_STREAM',
  'DeviceData',
  'ORDER_STREAM',
  'batch_at',
  'device_memory_limit',
  'epoch_permutations',
  'example_indices',
  'fits_in_memory',
  'gather_crop_flip',
  'load_train_split',
  'make_augment_config',
  'normalize',
  'put_on_device',
  'scan_steps',
  'split_nbytes',
]
