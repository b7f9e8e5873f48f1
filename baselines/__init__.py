"""Baselines that plug into the one trainer; importing this package registers their methods.

Each module registers its methods in :mod:`demp.trainer.methods` when imported, and its
keys of ``config.baselines`` in :mod:`demp.trainer.config` (so an unknown key is an
error), so ``config.method`` can name any of them once ``baselines`` is imported
(``scripts/train.py`` does). Structured (``snap``): ``snap``, ``crop_s``,
``early_snap``, ``early_crop_s``; NEq (``neq``): ``neq``, ``neq_stochastic``;
unstructured (``sparse``): ``magnitude``, ``saliency``, ``set``, ``rigl``.
Settings: ``config.baselines`` (``baselines.config``, ``baselines.sparse.methods``).
"""

from baselines import neq, snap, sparse

__all__ = ['neq', 'snap', 'sparse']
