"""Mask updates of the four unstructured algorithms: magnitude, saliency, SET, RigL.

Every function here is a pure ``jnp`` function of one weight's mask, values,
gradient and a (possibly traced) sparsity or drop fraction, so it runs inside
``lax.cond`` in the jitted step.

* **Pruning** (``magnitude``: score ``|w|``; ``saliency``: ``|w g|``): keep the
  ``round((1 - s) n)`` highest-scoring weights among those still active
  (pruned weights stay pruned). Masks start dense; the schedule raises ``s``.
* **Drop and grow** (``set``: grow at random; ``rigl``: grow where ``|g|`` is
  largest): drop the ``floor(d n_active)`` active weights of smallest ``|w|``,
  then grow as many among the weights not kept (so the count of active weights
  never changes). Masks start at the target sparsity, drawn at random.

Ties are broken by the flat index (lower first), so the masks are exactly
reproducible with ``numpy.argsort(-score, kind='stable')``.

References:
  Han et al., `Learning both Weights and Connections for Efficient Neural
  Networks <https://arxiv.org/abs/1506.02626>`_, 2015 (magnitude).

  Molchanov et al., `Pruning Convolutional Neural Networks for Resource
  Efficient Inference <https://arxiv.org/abs/1611.06440>`_, 2017 (|w g|).

  Mocanu et al., 2018 (SET); Evci et al., 2020 (RigL).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def topk_mask(score: jax.Array, k: jax.Array | int) -> jax.Array:
  """A bool mask (shape of ``score``) with exactly ``k`` entries: the ``k`` largest scores.

  ``k`` may be traced. Ties go to the lower flat index.
  """
  flat = score.reshape(-1)
  order = jnp.argsort(-flat, stable=True)
  ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.size, dtype=jnp.int32))
  return (ranks < k).reshape(score.shape)


def num_to_keep(size: int, sparsity: jax.Array | float) -> jax.Array:
  """``round((1 - sparsity) * size)`` as an int32."""
  return jnp.round((1.0 - jnp.asarray(sparsity, jnp.float32)) * size).astype(jnp.int32)


def _active_only(mask: jax.Array, score: jax.Array) -> jax.Array:
  return jnp.where(mask, score, -jnp.inf)


def prune(mask: jax.Array, score: jax.Array, sparsity: jax.Array | float) -> jax.Array:
  """Keeps the ``round((1 - sparsity) n)`` active weights of highest score."""
  return topk_mask(_active_only(mask, score), num_to_keep(mask.size, sparsity))


def drop_and_grow(
  mask: jax.Array, drop_score: jax.Array, grow_score: jax.Array, drop_fraction: jax.Array | float
) -> jax.Array:
  """Drops ``floor(drop_fraction n_active)`` active weights of lowest ``drop_score``,
  then grows as many of highest ``grow_score`` among the weights not kept.
  """
  n_active = jnp.sum(mask, dtype=jnp.int32)
  n_drop = jnp.floor(jnp.asarray(drop_fraction, jnp.float32) * n_active).astype(jnp.int32)
  kept = topk_mask(_active_only(mask, drop_score), n_active - n_drop)
  grown = topk_mask(jnp.where(kept, -jnp.inf, grow_score), n_drop)
  return kept | grown


def random_mask(key: jax.Array, shape: tuple[int, ...], sparsity: float) -> jax.Array:
  """Exactly ``round((1 - sparsity) n)`` active weights, uniformly at random."""
  n = 1
  for d in shape:
    n *= d
  return topk_mask(jax.random.uniform(key, shape), num_to_keep(n, sparsity))


class Algorithm(NamedTuple):
  """One algorithm: how a weight's mask is recomputed.

  ``update(mask, w, g, sparsity, drop_fraction, key) -> mask``; ``sparse_init``:
  whether masks start at the target sparsity (dynamic sparse training) or dense.
  ``uses_drop_fraction``: whether it reads ``drop_fraction`` (SET, RigL).
  """

  update: Callable[..., jax.Array]
  sparse_init: bool
  uses_drop_fraction: bool


def _magnitude(mask, w, g, sparsity, drop_fraction, key):
  del g, drop_fraction, key
  return prune(mask, jnp.abs(w), sparsity)


def _saliency(mask, w, g, sparsity, drop_fraction, key):
  del drop_fraction, key
  return prune(mask, jnp.abs(w * g), sparsity)


def _set(mask, w, g, sparsity, drop_fraction, key):
  del g, sparsity
  return drop_and_grow(mask, jnp.abs(w), jax.random.uniform(key, w.shape), drop_fraction)


def _rigl(mask, w, g, sparsity, drop_fraction, key):
  del sparsity, key
  return drop_and_grow(mask, jnp.abs(w), jnp.abs(g), drop_fraction)


ALGORITHMS: dict[str, Algorithm] = {
  'magnitude': Algorithm(_magnitude, sparse_init=False, uses_drop_fraction=False),
  'saliency': Algorithm(_saliency, sparse_init=False, uses_drop_fraction=False),
  'set': Algorithm(_set, sparse_init=True, uses_drop_fraction=True),
  'rigl': Algorithm(_rigl, sparse_init=True, uses_drop_fraction=True),
}
