"""Pieces shared by the recipe configs (not a config itself: it has no ``get_config``).

Config arguments are parsed by :func:`configs.analysis.parse` (typed like their defaults).
"""

from __future__ import annotations

import ml_collections

OPTIMIZERS = {'adam': 'adam', 'sgdm': 'sgd'}   # the `opt` argument -> optimizer.name


def optimizer_name(opt: str) -> str:
  if opt not in OPTIMIZERS:
    raise ValueError(f'config argument opt={opt!r} is not one of {sorted(OPTIMIZERS)}.')
  return OPTIMIZERS[opt]


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """A few steps on tiny batches, every prune-event code path included (seconds; CI)."""
  c.batch_size = 8
  c.num_steps = 4
  c.prune.every = 2
  c.prune.num_examples = 16
  c.prune.batch_size = 8
  c.eval_every = 0
  c.eval_batch_size = 16
  c.log_every = 2
  c.progress_bar = False
