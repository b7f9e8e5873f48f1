"""DemP: Demon Pruning in JAX.

What a user imports::

    import demp
    tx = demp.demp_optimizer(optax.adam(1e-3),
                             penalty_strength=demp.one_cycle(5e-3, total_steps),
                             noise_std=demp.one_cycle(5e-5, total_steps))
    alive, activity = demp.dead_unit_stats(model, variables, images)
    model, variables, opt_state = demp.prune(model, variables, opt_state,
                                             demp.keep_masks(alive, activity))
"""

from demp.auto import Prunable, describe_groups, make_prunable
from demp.deadunits import CRITERIA, constant_unit_stats, dead_unit_stats, probe, unit_stats
from demp.protocol import Slice, UnitGroup, param_slices
from demp.schedules import SCHEDULES, make_schedule, one_cycle
from demp.surgery import keep_masks, prune, slice_optimizer_state, slice_variables
from demp.transforms import (
  ALL_WEIGHTS,
  AUTHORS_NOISE_STD,
  NORM_SCALES,
  PAPER_TEXT_NOISE_STD,
  LiveNoiseState,
  ScheduledPenaltyState,
  add_decoupled_penalty,
  add_scheduled_penalty,
  demp_optimizer,
  path_mask,
  with_live_noise,
)
from demp.units import group_scales_mask, penalty_multipliers, set_live_mask
from demp import nnx  # Flax NNX models: demp.nnx.make_prunable, dead_unit_stats, prune

__version__ = "0.1.0"


def load_exported(directory: str):
  """The Flax module and variables of an export directory (``demp.export.load_exported``)."""
  from demp import export  # pylint: disable=g-import-not-at-top  (orbax: imported on use)

  return export.load_exported(directory)


__all__ = [
  'nnx',
  'ALL_WEIGHTS',
  'AUTHORS_NOISE_STD',
  'CRITERIA',
  'LiveNoiseState',
  'NORM_SCALES',
  'SCHEDULES',
  'ScheduledPenaltyState',
  'Prunable',
  'Slice',
  'UnitGroup',
  'add_scheduled_penalty',
  'dead_unit_stats',
  'demp_optimizer',
  'describe_groups',
  'keep_masks',
  'make_prunable',
  'make_schedule',
  'one_cycle',
  'PAPER_TEXT_NOISE_STD',
  'param_slices',
  'path_mask',
  'probe',
  'prune',
  'slice_optimizer_state',
  'slice_variables',
  'with_live_noise',
  'add_decoupled_penalty',
  'constant_unit_stats',
  'group_scales_mask',
  'penalty_multipliers',
  'set_live_mask',
  'unit_stats',
]
