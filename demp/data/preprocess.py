"""Per-example preprocessing: float32 [H, W, C] in [0, 1] -> float32 [h, w, C].

``TRAIN_PREPROCESS`` (stateless random augmentations, one seed per example)
and ``EVAL_PREPROCESS`` by ``data.augment`` name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import ml_collections

from demp.data.sources import _tf

if TYPE_CHECKING:
  import tensorflow as tf

# ImageNet recipe at 224 px: train resizes the shorter side to [256, 480],
# eval to 256; both scale with image_size / 224.
IMAGENET_TRAIN_SHORTER = (256, 480)
IMAGENET_EVAL_SHORTER = 256
IMAGENET_REFERENCE_SIZE = 224

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
