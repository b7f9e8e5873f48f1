"""The trainer: ``train_and_evaluate(config, workdir)`` and what it needs.

Read it top to bottom in :mod:`demp.trainer.train`. Beside it: the run's host
state (:mod:`~demp.trainer.run`), the jitted steps (:mod:`~demp.trainer.steps`),
the method registry that plug-ins import into (:mod:`~demp.trainer.methods`)
with DemP's prune policy (:mod:`~demp.trainer.demp_policy`), steering to a
target (:mod:`~demp.trainer.steering`), optimizer wiring
(:mod:`~demp.trainer.optim`), the config schema (:mod:`~demp.trainer.config`),
checkpoints, the workdir, multi-host data parallelism, the compilation cache
and logging. The core library (:mod:`demp`) never imports from here.
"""
