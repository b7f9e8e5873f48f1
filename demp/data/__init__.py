"""Input data: sources, the tf.data pipeline and batch-level augmentations.

What the trainer calls::

    from demp import data
    info = data.get_info(config.data)              # classes, image shape, split sizes
    batches = data.train_iterator(config.data, batch_size=128, seed=0)
    for batch in data.eval_batches(config.data, 'test', 500): ...
    examples = data.fixed_examples(config.data, 1000, seed=0)   # the death check's images

Modules: :mod:`demp.data.sources` (tfds / npz / digits -> raw examples),
:mod:`demp.data.preprocess` (per-example augmentation and resizing),
:mod:`demp.data.pipeline` (the shared tf.data pipeline), :mod:`demp.data.augment`
(batch-level augmentations: mixup, cutmix, ...).
"""

from demp.data.pipeline import (
  default_data_config,
  eval_batches,
  fixed_examples,
  get_info,
  train_iterator,
)
from demp.data.sources import CHANNEL_STATS, NPZ_KEYS, NPZ_LAYOUT, SOURCES, DatasetInfo

__all__ = [
  'CHANNEL_STATS',
  'DatasetInfo',
  'NPZ_KEYS',
  'NPZ_LAYOUT',
  'SOURCES',
  'default_data_config',
  'eval_batches',
  'fixed_examples',
  'get_info',
  'train_iterator',
]
