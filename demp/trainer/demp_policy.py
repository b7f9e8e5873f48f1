"""DemP's prune policy: the ``demp`` method's hook, run every τ steps.

One prune event: the death check on the run's fixed examples, the revival gate,
the target's cap (when steering), constant units folded into their consumers
(``prune.remove_constant``), the live-noise mask, then the surgery through
:meth:`demp.trainer.run.Run.prune` (deferred: silenced now, removed once the
smaller step has compiled). :class:`~demp.trainer.run.Run` itself knows
nothing of this policy.
"""

from __future__ import annotations

import time

import numpy as np

from demp import deadunits, folding, surgery, units
from demp.trainer import metrics, optim, parallel, revival, steering
from demp.trainer.run import Run


def prune_dead(run: Run) -> bool:
  """The DemP prune event: death check, keep-masks, surgery.

  Logs the alive units that are constant over the check set (``constant``);
  with ``prune.remove_constant`` removes those of foldable groups too, their
  constant folded into the consumers (:func:`demp.folding.fold_constants`).
  A mask-mode live noise gets this check's verdict (:func:`demp.units.set_live_mask`).
  """
  t0 = time.perf_counter()
  c = run.config.prune
  stats = run.unit_stats()
  alive, activity = stats['alive'], stats['activity']
  check_s = time.perf_counter() - t0
  collapsed = deadunits.check_collapse(alive, step=run.step, on_collapse=c.on_collapse)
  constant = deadunits.constant_units(stats, c.constant_eps)
  groups = run.model.unit_groups()
  opt_state = units.set_live_mask(run.state['opt_state'], run.state['params'], run.model, alive)
  changed = opt_state is not run.state['opt_state']
  run.state = {**run.state, 'opt_state': opt_state}
  removable = alive
  if c.remove_constant:
    able = folding.foldable_groups(groups, run.variables)
    removable = {k: v & ~(constant[k] & able[k]) for k, v in alive.items()}
  keeps = surgery.keep_masks(removable, activity, min_width=c.min_width, multiple_of=c.multiple_of)
  keeps, started = revival.gate(
    keeps,
    run.events,
    run.step,
    deadunits.count(alive),
    patience=c.revival_patience,
    fixed=dict(c.start_steps),
  )
  if not (c.dynamic or (c.at_end and run.step == run.config.num_steps)):
    keeps = {name: np.ones_like(keep) for name, keep in keeps.items()}  # check and log only
  capped = {}
  if optim.enabled(run.config) and run.config.demp.target_cap:
    uncapped = keeps
    keeps, capped['capped'] = steering.cap_keeps(run, keeps, activity)  # never past the target
    run.stats['target_capped'] = capped['capped']  # dead units held back at this check
    if capped['capped'] and run.config.demp.target_revive:  # wake them, function unchanged
      held = {k: np.asarray(keeps[k], bool) & ~np.asarray(uncapped[k], bool) for k in keeps}
      variables, opt_state, capped['revived'] = surgery.revive(
        run.model, run.variables, run.state['opt_state'], held
      )
      run.state = {**run.state, 'params': variables['params'], 'opt_state': opt_state}
      changed = True
  folded = {}
  if c.remove_constant:
    fold = {k: constant[k] & ~np.asarray(keeps[k], bool) for k in constant}
    folded = deadunits.count(fold)
    if any(folded.values()):
      variables = folding.fold_constants(
        run.variables, groups, deadunits.constant_values(stats), fold
      )
      run.state = {
        **run.state,
        'params': variables['params'],
        'batch_stats': variables.get('batch_stats', {}),
      }
      changed = True
  if changed and run.mesh is not None:  # new leaves: onto every device, as the step expects
    run.state = parallel.replicate(run.state, run.mesh)
  dead = metrics.dead_set(alive, run.unit_ids, run.dense_widths)
  overlap, run.dead_set = metrics.overlap_ratio(run.dead_set, dead), dead
  extra = {'folded': folded} if c.remove_constant else {}
  if collapsed:
    extra['collapsed'] = collapsed
  removed = run.prune(
    keeps,
    reason='dead',
    defer=True,
    check_s=check_s,
    live=deadunits.count(alive),
    dead=len(dead),
    dead_overlap=overlap,
    started=started,
    constant=deadunits.count(constant),
    **capped,
    **extra,
  )
  if optim.enabled(run.config):
    steering.after_check(run, capped.get('capped', 0))  # measure the sparsity, set the gain
  return removed
