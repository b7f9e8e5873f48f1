r"""DemP on a small BN ConvNet over the local CIFAR-10 subset: the reduced reproduction.

    python -m scripts.train --config configs/analysis/convnet_cifar10_subset.py:lam=0.03 \
        --workdir /tmp/demp_convnet

ConvNet 32-64-128-256 (3x3 conv -> BN -> ReLU -> 2x2 max-pool) -> global pool
-> dense; AdamW lr 5e-3 one-cycle, weight decay 5e-4, batch 128, 600 steps,
crop+flip, death check on 512 training images every τ = 100 steps and at the
end. About 3 minutes on 2 idle CPU cores. The data is the ``path`` argument
(no default; ``python -m scripts.make_cifar10_subset`` builds it from the public CIFAR-10 release;
``--config.data.path`` also works, except with ``examples=all``, which reads
the training-set size from ``path`` when the config is built);
``data=tfds`` reads the full CIFAR-10 through TFDS instead (full scale: add
``steps=19550`` = 50 epochs of 50 000 at batch 128, ``every=1000``).

Arguments: ``method`` (dense | demp | a baseline), ``lam`` (peak λ), ``noise``
(peak noise std: 5e-5 the authors' code, 7.07e-3 the paper text's variance 5e-5), ``symmetric``, ``schedule`` (one_cycle | constant),
``warmup`` (cosine | linear), ``steps``, ``every`` (τ), ``examples`` (death
check: a number, or ``all`` = the whole training set), ``dynamic`` (remove
dead units at every check, or only at the end), ``lr``, ``bs``, ``eps`` (Adam
ε), ``opt`` (adamw | adam | sgd), ``act`` (relu | leaky_relu | swish | gelu),
``width`` (multiplier of the widths), ``data`` (npz | tfds), ``path`` (the .npz), ``smoke``.
"""

from configs.analysis import divisor_at_most, parse
from demp import data as data_lib
from demp.trainer.config import base_config

DEFAULTS = dict(
  method='demp',
  lam=3e-2,
  noise=5e-5,
  symmetric=False,
  schedule='one_cycle',
  warmup='cosine',
  steps=600,
  every=100,
  examples='512',
  dynamic=True,
  lr=5e-3,
  bs=128,
  eps=1e-8,
  opt='adamw',
  wd=5e-4,
  act='relu',
  width=1.0,
  data='npz',
  path='',
  smoke=False,
)


def build(args: dict):
  """The config for parsed arguments (other analysis configs start from it)."""
  c = base_config()
  c.method = args['method']
  c.model.name = 'convnet'
  c.model.widths = [max(1, int(round(w * args['width']))) for w in (32, 64, 128, 256)]
  c.model.activation = args['act']
  c.model.pool = True
  c.model.head = 'global'
  if args['data'] == 'npz':
    c.data.source = 'npz'
    c.data.path = args['path'] or None
  elif args['data'] == 'tfds':
    c.data.source = 'tfds'
  else:
    raise ValueError(f"config argument data={args['data']!r} is not one of ['npz', 'tfds'].")
  c.data.name = 'cifar10'
  c.data.augment = 'crop_flip'
  c.data.normalize = True
  c.batch_size = args['bs']
  c.num_steps = args['steps']
  c.optimizer.name = args['opt']
  c.optimizer.learning_rate = args['lr']
  c.optimizer.lr_schedule = 'one_cycle'
  c.optimizer.weight_decay = args['wd']
  c.optimizer.eps = args['eps']
  c.demp.peak_lambda = args['lam']
  c.demp.noise_std = args['noise']
  c.demp.noise_symmetric = args['symmetric']
  c.demp.schedule = args['schedule']
  c.demp.warmup = args['warmup']
  c.prune.every = args['every']
  c.prune.dynamic = args['dynamic']
  c.prune.batch_size = 128
  if args['examples'] == 'all':
    # Resolved here from the data: the death check's batch must divide the set.
    c.prune.num_examples = data_lib.get_info(c.data).num_train
    c.prune.batch_size = divisor_at_most(c.prune.num_examples, 1024)
  else:
    c.prune.num_examples = int(args['examples'])
  c.log_every = 50
  c.eval_batch_size = 256
  if args['smoke']:
    c.model.widths = [4, 8, 8, 8]
    c.batch_size = 16
    c.num_steps = 6
    c.prune.every = 3
    c.prune.num_examples = (
      min(c.prune.num_examples, 32) if args['examples'] != 'all' else c.prune.num_examples
    )
    c.prune.batch_size = min(c.prune.batch_size, c.prune.num_examples)
    c.log_every = 3
    c.eval_batch_size = 64
    c.progress_bar = False
  return c


def get_config(arg: str | None = None):
  return build(parse(arg, **DEFAULTS))
