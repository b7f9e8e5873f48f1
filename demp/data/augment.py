"""Batch augmentations in JAX: RandAugment, mixup and cutmix.

They run after the tf.data pipeline, as one jitted function of
``(key, batch)`` per training batch (on the accelerator, next to the train
step), so they are pure and deterministic given a seed: the key of batch ``i``
is ``fold_in(key(seed), i)``. The ViT recipe (paper appendix I.3, the
TorchVision ViT-B/16 recipe) uses all three::

    batches = wrap_iterator(train_iterator(...), config.batch_augment,
                            num_classes=1000, seed=0)

* :func:`randaugment` (Cubuk et al., 2020; TorchVision's op set and
  magnitudes, ``num_bins = 31``): per example, ``num_ops`` ops drawn uniformly
  with replacement from :data:`OPS`, each at the fixed ``magnitude`` with a
  random sign for the signed ones. Images must be in ``[0, 1]`` (set
  ``data.normalize=False``; solarize, posterize and equalize read pixel
  values).
* :func:`mixup` (Zhang et al., 2018) and :func:`cutmix` (Yun et al., 2019):
  each batch is mixed with itself rolled by one, ``λ ~ Beta(α, α)``; with both
  alphas set, one of the two is picked with probability 1/2 per batch (as
  TorchVision's ``RandomChoice([MixUp, CutMix])``). Labels become
  ``[B, K]`` distributions (rows sum to 1), which ``demp.trainer.steps.cross_entropy``
  accepts.

The config (``config.batch_augment``, all off by default)::

    randaugment_ops = 0        # ops per image; 0 = off (TorchVision recipe: 2)
    randaugment_magnitude = 9  # in 0 .. randaugment_bins - 1
    randaugment_bins = 31
    mixup_alpha = 0.0          # 0 = off (ViT recipe: 0.2)
    cutmix_alpha = 0.0         # 0 = off (ViT recipe: 1.0)
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, Any]


def default_config() -> ml_collections.ConfigDict:
  """``config.batch_augment`` with every field and its default (all off)."""
  return ml_collections.ConfigDict(
    dict(
      randaugment_ops=0,
      randaugment_magnitude=9,
      randaugment_bins=31,
      mixup_alpha=0.0,
      cutmix_alpha=0.0,
    )
  )


def enabled(config: Mapping[str, Any]) -> bool:
  return bool(config['randaugment_ops'] or config['mixup_alpha'] or config['cutmix_alpha'])


def validate(config: Mapping[str, Any], *, normalize: bool) -> None:
  """Raises ValueError naming the ``batch_augment`` key that cannot work."""
  unknown = set(config.keys()) - set(default_config().keys())
  if unknown:
    raise ValueError(
      f'unknown batch_augment keys {sorted(unknown)}; known: {sorted(default_config().keys())}.'
    )
  for key in ('randaugment_ops', 'randaugment_magnitude'):
    v = config[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f'batch_augment.{key}={v!r} must be an int >= 0.')
  bins = config['randaugment_bins']
  if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
    raise ValueError(f'batch_augment.randaugment_bins={bins!r} must be an int >= 2.')
  if config['randaugment_magnitude'] >= bins:
    raise ValueError(
      f'batch_augment.randaugment_magnitude={config["randaugment_magnitude"]!r} '
      f'must be < randaugment_bins={bins}.'
    )
  for key in ('mixup_alpha', 'cutmix_alpha'):
    v = config[key]
    if not isinstance(v, (int, float)) or v < 0:
      raise ValueError(f'batch_augment.{key}={v!r} must be a number >= 0.')
  if config['randaugment_ops'] and normalize:
    raise ValueError(
      'batch_augment.randaugment_ops='
      f'{config["randaugment_ops"]} needs images in [0, 1]: set data.normalize=False.'
    )


# ----------------------------------------------------------------------------
# RandAugment: each op maps (image_hwc in [0, 1], magnitude) -> image_hwc.


def _grayscale_hw1(image_hwc: jax.Array) -> jax.Array:
  if image_hwc.shape[-1] == 1:
    return image_hwc
  weights_11c = jnp.array([[[0.2989, 0.587, 0.114]]], image_hwc.dtype)
  return jnp.sum(image_hwc * weights_11c, axis=-1, keepdims=True)


def _blend(image_hwc: jax.Array, degenerate_hwc: jax.Array, factor: jax.Array) -> jax.Array:
  """PIL ImageEnhance: ``degenerate + factor * (image - degenerate)``, clipped."""
  return jnp.clip(degenerate_hwc + factor * (image_hwc - degenerate_hwc), 0.0, 1.0)


def _affine(
  image_hwc: jax.Array, matrix_22: jax.Array, offset_2: jax.Array, center_2: jax.Array
) -> jax.Array:
  """Nearest-neighbour inverse warp: output (x, y) reads input M (p - c) + c + t; fill 0."""
  h, w, _ = image_hwc.shape
  y_hw, x_hw = jnp.meshgrid(
    jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij'
  )
  dx_hw, dy_hw = x_hw - center_2[0], y_hw - center_2[1]
  sx_hw = matrix_22[0, 0] * dx_hw + matrix_22[0, 1] * dy_hw + center_2[0] + offset_2[0]
  sy_hw = matrix_22[1, 0] * dx_hw + matrix_22[1, 1] * dy_hw + center_2[1] + offset_2[1]
  xi_hw = jnp.round(sx_hw).astype(jnp.int32)
  yi_hw = jnp.round(sy_hw).astype(jnp.int32)
  valid_hw = (xi_hw >= 0) & (xi_hw < w) & (yi_hw >= 0) & (yi_hw < h)
  out_hwc = image_hwc[jnp.clip(yi_hw, 0, h - 1), jnp.clip(xi_hw, 0, w - 1)]
  return jnp.where(valid_hw[..., None], out_hwc, jnp.zeros_like(out_hwc))


def _center(image_hwc):
  h, w, _ = image_hwc.shape
  return jnp.array([(w - 1) / 2, (h - 1) / 2], jnp.float32)


def _identity(image_hwc, m):
  del m
  return image_hwc


def _shear_x(image_hwc, m):  # about the top-left corner, as TorchVision
  return _affine(
    image_hwc, jnp.array([[1.0, 0.0], [0.0, 1.0]]).at[0, 1].set(m), jnp.zeros(2), jnp.zeros(2)
  )


def _shear_y(image_hwc, m):
  return _affine(
    image_hwc, jnp.array([[1.0, 0.0], [0.0, 1.0]]).at[1, 0].set(m), jnp.zeros(2), jnp.zeros(2)
  )


def _translate_x(image_hwc, m):  # m: a fraction of the width
  offset = jnp.round(m * image_hwc.shape[1])
  return _affine(image_hwc, jnp.eye(2), jnp.stack([offset, 0.0]), jnp.zeros(2))


def _translate_y(image_hwc, m):
  offset = jnp.round(m * image_hwc.shape[0])
  return _affine(image_hwc, jnp.eye(2), jnp.stack([0.0, offset]), jnp.zeros(2))


def _rotate(image_hwc, m):  # m in degrees, about the centre
  t = jnp.deg2rad(m)
  c, s = jnp.cos(t), jnp.sin(t)
  return _affine(
    image_hwc, jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])]), jnp.zeros(2), _center(image_hwc)
  )


def _brightness(image_hwc, m):
  return _blend(image_hwc, jnp.zeros_like(image_hwc), 1.0 + m)


def _color(image_hwc, m):
  return _blend(image_hwc, jnp.broadcast_to(_grayscale_hw1(image_hwc), image_hwc.shape), 1.0 + m)


def _contrast(image_hwc, m):
  mean = jnp.mean(_grayscale_hw1(image_hwc))
  return _blend(image_hwc, jnp.full_like(image_hwc, mean), 1.0 + m)


def _sharpness(image_hwc, m):
  """Blend with the 3x3 smoothed image ([[1,1,1],[1,5,1],[1,1,1]] / 13), borders kept."""
  h, w, _ = image_hwc.shape
  kernel_33 = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  smooth_hwc = sum(
    kernel_33[i, j] * image_hwc[i : h - 2 + i, j : w - 2 + j] for i in range(3) for j in range(3)
  )
  degenerate_hwc = image_hwc.at[1 : h - 1, 1 : w - 1].set(smooth_hwc)
  return _blend(image_hwc, degenerate_hwc, 1.0 + m)


def _to_uint8(image_hwc):
  return jnp.clip(jnp.round(image_hwc * 255.0), 0, 255).astype(jnp.int32)


def _posterize(image_hwc, m):  # m: bits kept
  bits = m.astype(jnp.int32)
  shift = 8 - bits
  x = _to_uint8(image_hwc)
  return ((x >> shift) << shift).astype(image_hwc.dtype) / 255.0


def _solarize(image_hwc, m):  # m: threshold in [0, 1]
  return jnp.where(image_hwc >= m, 1.0 - image_hwc, image_hwc)


def _autocontrast(image_hwc, m):
  del m
  lo_11c = jnp.min(image_hwc, axis=(0, 1), keepdims=True)
  hi_11c = jnp.max(image_hwc, axis=(0, 1), keepdims=True)
  flat_11c = hi_11c <= lo_11c
  scale_11c = 1.0 / jnp.where(flat_11c, 1.0, hi_11c - lo_11c)
  lo_11c = jnp.where(flat_11c, 0.0, lo_11c)
  return jnp.clip((image_hwc - lo_11c) * scale_11c, 0.0, 1.0)


def _equalize_channel(x_hw: jax.Array) -> jax.Array:
  """PIL/TorchVision histogram equalization of one uint8-valued channel."""
  hist = jnp.bincount(x_hw.ravel(), length=256)
  last = hist[255 - jnp.argmax(hist[::-1] > 0)]  # count of the top non-empty bin
  step = (jnp.sum(hist) - last) // 255
  safe = jnp.maximum(step, 1)
  lut = (jnp.cumsum(hist) + safe // 2) // safe
  lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
  return jnp.where(step == 0, x_hw, lut[x_hw])


def _equalize(image_hwc, m):
  del m
  x_chw = jnp.moveaxis(_to_uint8(image_hwc), -1, 0)
  return jnp.moveaxis(jax.vmap(_equalize_channel)(x_chw), 0, -1).astype(image_hwc.dtype) / 255.0


def _magnitudes(num_bins: int) -> dict[str, Any]:
  """Per op, the magnitude of each bin (None: the op has none)."""
  lin = lambda hi: [hi * i / (num_bins - 1) for i in range(num_bins)]
  return {
    'identity': None,
    'shear_x': lin(0.3),
    'shear_y': lin(0.3),
    'translate_x': lin(150.0 / 331.0),
    'translate_y': lin(150.0 / 331.0),
    'rotate': lin(30.0),
    'brightness': lin(0.9),
    'color': lin(0.9),
    'contrast': lin(0.9),
    'sharpness': lin(0.9),
    'posterize': [8 - int(round(i / ((num_bins - 1) / 4))) for i in range(num_bins)],
    'solarize': [1.0 - v for v in lin(1.0)],
    'autocontrast': None,
    'equalize': None,
  }


# name -> (op, signed): TorchVision's RandAugment op set.
OPS: dict[str, tuple[Callable[[jax.Array, jax.Array], jax.Array], bool]] = {
  'identity': (_identity, False),
  'shear_x': (_shear_x, True),
  'shear_y': (_shear_y, True),
  'translate_x': (_translate_x, True),
  'translate_y': (_translate_y, True),
  'rotate': (_rotate, True),
  'brightness': (_brightness, True),
  'color': (_color, True),
  'contrast': (_contrast, True),
  'sharpness': (_sharpness, True),
  'posterize': (_posterize, False),
  'solarize': (_solarize, False),
  'autocontrast': (_autocontrast, False),
  'equalize': (_equalize, False),
}


def apply_op(
  name: str, image_hwc: jax.Array, magnitude: int, *, num_bins: int = 31, sign: float = 1.0
) -> jax.Array:
  """One RandAugment op by name at magnitude bin ``magnitude`` (for tests and plots)."""
  op, signed = OPS[name]
  table = _magnitudes(num_bins)[name]
  m = 0.0 if table is None else table[magnitude] * (sign if signed else 1.0)
  return op(image_hwc, jnp.asarray(m, jnp.float32))


def randaugment(
  key: jax.Array, image_hwc: jax.Array, *, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31
) -> jax.Array:
  """RandAugment on one image in ``[0, 1]``: ``num_ops`` random ops at a fixed magnitude."""
  names = list(OPS)
  table = _magnitudes(num_bins)
  values = jnp.array(
    [0.0 if table[n] is None else float(table[n][magnitude]) for n in names], jnp.float32
  )
  signed = jnp.array([OPS[n][1] for n in names])
  branches = [OPS[n][0] for n in names]
  for k in jax.random.split(key, num_ops):
    k_op, k_sign = jax.random.split(k)
    index = jax.random.randint(k_op, (), 0, len(names))
    flip = jnp.where(signed[index] & jax.random.bernoulli(k_sign), -1.0, 1.0)
    image_hwc = jax.lax.switch(index, branches, image_hwc, values[index] * flip)
  return image_hwc


def randaugment_batch(key: jax.Array, images_bhwc: jax.Array, **kwargs) -> jax.Array:
  """:func:`randaugment` on every image, each with its own key."""
  keys = jax.random.split(key, images_bhwc.shape[0])
  return jax.vmap(functools.partial(randaugment, **kwargs))(keys, images_bhwc)


# ----------------------------------------------------------------------------
# Mixup and cutmix: labels [B, K] distributions.


def mixup(
  key: jax.Array, images_bhwc: jax.Array, labels_bk: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """``λ x + (1 - λ) roll(x)`` and the same for labels, ``λ ~ Beta(α, α)``."""
  lam = jax.random.beta(key, alpha, alpha)
  mixed = lambda x: lam * x + (1.0 - lam) * jnp.roll(x, 1, axis=0)
  return mixed(images_bhwc), mixed(labels_bk)


def cutmix(
  key: jax.Array, images_bhwc: jax.Array, labels_bk: jax.Array, alpha: float
) -> tuple[jax.Array, jax.Array]:
  """Pastes a box of ``roll(x)`` covering about ``1 - λ`` of the image; labels by true area."""
  k_lam, k_x, k_y = jax.random.split(key, 3)
  _, h, w, _ = images_bhwc.shape
  lam = jax.random.beta(k_lam, alpha, alpha)
  cx = jax.random.randint(k_x, (), 0, w)
  cy = jax.random.randint(k_y, (), 0, h)
  r = 0.5 * jnp.sqrt(1.0 - lam)
  rw, rh = (r * w).astype(jnp.int32), (r * h).astype(jnp.int32)
  x0, x1 = jnp.clip(cx - rw, 0, w), jnp.clip(cx + rw, 0, w)
  y0, y1 = jnp.clip(cy - rh, 0, h), jnp.clip(cy + rh, 0, h)
  ys_h, xs_w = jnp.arange(h), jnp.arange(w)
  box_hw = ((ys_h >= y0) & (ys_h < y1))[:, None] & ((xs_w >= x0) & (xs_w < x1))[None, :]
  images = jnp.where(box_hw[None, :, :, None], jnp.roll(images_bhwc, 1, axis=0), images_bhwc)
  lam_area = 1.0 - ((x1 - x0) * (y1 - y0)).astype(jnp.float32) / (h * w)
  labels = lam_area * labels_bk + (1.0 - lam_area) * jnp.roll(labels_bk, 1, axis=0)
  return images, labels


def mix(
  key: jax.Array,
  images_bhwc: jax.Array,
  labels_bk: jax.Array,
  *,
  mixup_alpha: float,
  cutmix_alpha: float,
) -> tuple[jax.Array, jax.Array]:
  """Mixup or cutmix (each with probability 1/2 when both alphas are > 0)."""
  if not mixup_alpha and not cutmix_alpha:
    return images_bhwc, labels_bk
  if not cutmix_alpha:
    return mixup(key, images_bhwc, labels_bk, mixup_alpha)
  if not mixup_alpha:
    return cutmix(key, images_bhwc, labels_bk, cutmix_alpha)
  k_choice, k_mix = jax.random.split(key)
  use_cutmix = jax.random.bernoulli(k_choice)
  return jax.lax.cond(
    use_cutmix,
    lambda: cutmix(k_mix, images_bhwc, labels_bk, cutmix_alpha),
    lambda: mixup(k_mix, images_bhwc, labels_bk, mixup_alpha),
  )


# ----------------------------------------------------------------------------
# The batch function and the iterator wrapper.


def augment_batch(
  key: jax.Array,
  batch: Batch,
  *,
  num_classes: int,
  randaugment_ops: int = 0,
  randaugment_magnitude: int = 9,
  randaugment_bins: int = 31,
  mixup_alpha: float = 0.0,
  cutmix_alpha: float = 0.0,
) -> Batch:
  """RandAugment per image, then mixup/cutmix over the batch.

  ``batch['label']`` is int ``[B]``; it becomes float ``[B, K]`` when mixing
  is on and stays int otherwise. Other keys pass through.
  """
  k_ra, k_mix = jax.random.split(key)
  images = jnp.asarray(batch['image'], jnp.float32)
  if randaugment_ops:
    images = randaugment_batch(
      k_ra,
      images,
      num_ops=randaugment_ops,
      magnitude=randaugment_magnitude,
      num_bins=randaugment_bins,
    )
  out = dict(batch, image=images)
  if mixup_alpha or cutmix_alpha:
    labels_bk = jax.nn.one_hot(batch['label'], num_classes, dtype=jnp.float32)
    out['image'], out['label'] = mix(
      k_mix, images, labels_bk, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
    )
  return out


def wrap_iterator(
  batches: Iterator[Batch],
  config: Mapping[str, Any],
  *,
  num_classes: int,
  seed: int,
  start: int = 0,
) -> Iterator[Batch]:
  """Applies :func:`augment_batch` (jitted) to every batch; ``batches`` itself when all off.

  ``start``: index of the first batch in the run (a resumed run's data position),
  so that batch ``i`` of the run always gets the key ``fold_in(key, i)``.
  """
  if not enabled(config):
    return batches
  fn = jax.jit(
    functools.partial(
      augment_batch, num_classes=num_classes, **{k: config[k] for k in default_config().keys()}
    )
  )
  key = jax.random.fold_in(jax.random.key(seed), 0x5EED)

  def gen():
    for i, batch in enumerate(batches, start):
      yield fn(jax.random.fold_in(key, i), batch)

  return gen()


__all__ = [
  'OPS',
  'apply_op',
  'augment_batch',
  'cutmix',
  'default_config',
  'enabled',
  'mix',
  'mixup',
  'randaugment',
  'randaugment_batch',
  'validate',
  'wrap_iterator',
]
