"""Baselines that plug into the one trainer: ``METHODS`` merges every module's.

``demp.train.all_methods()`` merges :data:`METHODS` into the trainer's own, so
``config.method`` can name any of them. Structured (``snap``): ``snap``,
``crop_s``, ``early_snap``, ``early_crop_s``; NEq (``neq``): ``neq``,
``neq_stochastic``; unstructured (``sparse``): ``magnitude``, ``saliency``,
``set``, ``rigl``. Settings: ``config.baselines`` (``baselines.config``).
"""

from baselines import neq, snap, sparse

METHODS = {**snap.METHODS, **neq.METHODS, **sparse.METHODS}
