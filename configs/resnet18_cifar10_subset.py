r"""A width-0.25 ResNet-18 on the local CIFAR-10 subset: real images, about 15 minutes on 2 CPU cores.

    python -m scripts.train --config configs/resnet18_cifar10_subset.py \
        --config.data.path=data/cifar10_subset.npz --workdir /tmp/r18_subset_demp
    python -m scripts.train --config configs/resnet18_cifar10_subset.py:method=dense \
        --config.data.path=data/cifar10_subset.npz --workdir /tmp/r18_subset_dense
    python -m scripts.train --config configs/resnet18_cifar10_subset.py:stream=False \
        --config.data.path=data/cifar10_subset.npz --workdir /tmp/r18_subset_nostream
    python -m scripts.train --config configs/resnet18_cifar10_subset.py:stream=site \
        --config.data.path=data/cifar10_subset.npz --workdir /tmp/r18_subset_site

The ResNet-18/CIFAR-10 recipe (``resnet18_cifar10.py``) scaled down to the
5,085-image subset: CIFAR stem, widths 16-32-64-128 (``width_multiplier``
0.25), batch 128, 1200 steps (30 epochs), Adam at 0.005 divided by 5 at the
same fractions of the run as the recipe (every 77/250 of it), weight decay
5e-4, crop + flip. DemP: a short run needs a larger peak λ than the paper's
(2e-2; METHOD_NOTES: 1e-2 ... 5e-2 for a few thousand steps), noise peak
std 5e-5, τ = num_steps / 4 = 300, death check on 512 training images. ``data.path``
has no default: pass it by flag (``python -m scripts.make_cifar10_subset`` builds it from the public CIFAR-10 release).

Arguments: method=demp|dense|<a baseline>, opt=adam|sgdm, lam=<peak λ>,
act=relu|leaky_relu|swish|gelu, stream=stage|off|site (``model.prune_stream``: one
coupled group per stage's stream, the streams kept, or one group per post-addition
activation as in the authors' code; True = stage, False = off), steps=<num_steps>,
path=<the .npz> (same as ``--config.data.path``), target / kind (the
baselines' ``target_sparsity`` / ``target_kind``), steer=True (DemP too steers
its λ to target / kind with the reacting recipe: 48 death checks a run (τ = steps // 48)), fallback (the early
variants' fallback epoch; 0 = half the run), smoke=True.
"""

import ml_collections

from baselines import config as baselines_config
from configs import common
from configs.analysis import parse
from demp.models import resnet
from demp.trainer.config import base_config

LEARNING_RATE = {'adam': 5e-3, 'sgdm': 0.1}
ARGS = dict(
  method='demp',
  opt='adam',
  lam=2e-2,
  act='relu',
  stream='stage',
  steps=1200,
  path='',
  target=0.5,
  kind='units',
  steer=False,
  fallback=0,
  smoke=False,
)


def stream_mode(value: str) -> str:
  """The ``stream=`` argument as a ``model.prune_stream`` value, or an error naming the choices."""
  try:
    return resnet.stream_mode(value)
  except ValueError:
    raise ValueError(
      f'config argument stream={value!r} is not one of {list(resnet.STREAM_MODES)} '
      f"(True means 'stage', False means 'off')."
    ) from None


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  a = parse(arg, **ARGS)
  c = base_config()
  c.method = a['method']
  c.model.name = 'resnet18'
  c.model.stem = 'cifar'
  c.model.width_multiplier = 0.25
  c.model.activation = a['act']
  c.model.prune_stream = stream_mode(a['stream'])

  c.data.source = 'npz'
  c.data.name = 'cifar10'
  c.data.path = a['path'] or None  # or by flag: --config.data.path=...
  c.data.augment = 'crop_flip'
  c.data.normalize = True

  c.batch_size = 128
  c.num_steps = a['steps']
  c.optimizer.name = common.optimizer_name(a['opt'])
  c.optimizer.learning_rate = LEARNING_RATE[a['opt']]
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.lr_schedule = 'step'
  c.optimizer.lr_kwargs = ml_collections.ConfigDict(
    {'step_size': max(1, round(77 / 250 * c.num_steps)), 'decay_factor': 0.2}
  )

  c.demp.penalty = 'lasso'
  c.demp.peak_lambda = a['lam']
  c.demp.noise_std = 5e-5  # peak std (authors' code); paper text: 7.07e-3
  c.prune.every = max(1, c.num_steps // 4)
  c.prune.num_examples = 512
  c.prune.batch_size = 128
  c.eval_batch_size = 339  # the 1,017 test images in 3 batches, no padding
  c.log_every = 50

  if a['steer']:  # DemP too aims at target / kind (the reacting recipe: docs/target.md)
    c.demp.target_sparsity, c.demp.target_kind = float(a['target']), a['kind']

  b = baselines_config.default_config()  # read only when method is a baseline
  common.aim_baselines(b, a['target'], a['kind'], a['method'])
  b.fallback_epoch = a['fallback']
  c.baselines = b

  if a['smoke']:
    common.shrink_for_smoke(c)
    c.model.width_multiplier = 1 / 16
    c.optimizer.lr_kwargs.step_size = 2
  return c
