r"""A small BN ConvNet on the local CIFAR-10 subset (the calibration run of METHOD_NOTES).

    python -m scripts.train --config configs/convnet_cifar10.py \
        --config.data.path=data/cifar10_subset.npz --workdir /tmp/convnet_cifar10

Four 3x3 conv layers (32-64-128-256), BN, ReLU, 2x2 max-pool after each,
global average pool -> dense. AdamW (decoupled weight decay 5e-4), learning
rate one-cycle peaking at 5e-3, batch 128, 600 steps. DemP: peak λ 2e-2 (a
short run needs a larger peak than the paper's 250-epoch recipes), noise peak
std 5e-5 (the authors' code), τ = 100, death check on 512 training images. About 3 minutes
on 2 CPU cores. ``data.path`` has no default: pass it by flag (the run stops
with an error naming ``data.path`` otherwise).

Arguments: method=demp|dense|<a baseline>, lam=<peak λ>, smoke=True.
"""

import ml_collections

from configs import common
from configs.analysis import parse
from demp.trainer.config import base_config

ARGS = dict(method='demp', lam=2e-2, smoke=False)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse(arg, **ARGS)
  c = base_config()
  c.method = a['method']
  c.model.name = 'convnet'
  c.model.widths = (32, 64, 128, 256)  # a tuple: --config.model.widths='(16,32,64,128)'
  c.model.pool = True
  c.model.head = 'global'

  c.data.source = 'npz'
  c.data.name = 'cifar10'
  c.data.path = None  # by flag: --config.data.path=...
  c.data.augment = 'none'
  c.data.normalize = True

  c.batch_size = 128
  c.num_steps = 600
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 5e-3
  c.optimizer.weight_decay = 5e-4
  c.optimizer.lr_schedule = 'one_cycle'

  c.demp.penalty = 'lasso'
  c.demp.peak_lambda = a['lam']
  c.demp.noise_std = 5e-5  # peak std (authors' code); paper text: 7.07e-3
  c.prune.every = 100
  c.prune.num_examples = 512
  c.prune.batch_size = 128
  c.log_every = 50

  if a['smoke']:
    common.shrink_for_smoke(c)
    c.model.widths = (4, 8, 8, 16)
  return c
