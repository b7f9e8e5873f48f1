r"""Noise study (paper appendix D.1, Fig. 9): how noise kills units in an MLP.

    python -m scripts.sweep --config configs/analysis/noise_mlp_digits.py \
        --grid 'arg.mode=sgd,sgd_noise;arg.lr=0.01,0.05,0.1;seed=0,1,2' \
        --grid 'arg.mode=gaussian;arg.variance=1e-4,1e-3;arg.symmetric=False,True;seed=0,1,2' \
        --workdir /tmp/noise_study

An MLP with hidden widths 100 and 300, no batch norm, on scikit-learn's
digits (a stand-in for the paper's 10 000-image MNIST subset), batch size 1,
plain SGD. The dead units are counted every ``every`` steps on 512 training
images and never removed (``prune.dynamic=False``, no removal at the end):
units can revive. Modes (``mode``):

* ``sgd``: standard SGD (Fig. 9 right);
* ``sgd_noise``: only the noise of the minibatch gradient, ``ĝ − g_full``
  (Fig. 9 left; ``tools.analysis``);
* ``gaussian``: only Gaussian noise of variance ``variance`` on every step,
  asymmetric (live units only) or ``symmetric=True`` (Fig. 9 centre).

Full scale (the paper's 30 000 steps): ``steps=30000,every=500``.
"""

from configs.analysis import parse
from demp.trainer.config import base_config
from tools import analysis  # noqa: F401  (registers method sgd_noise)

MODES = ('sgd', 'sgd_noise', 'gaussian')
DEFAULTS = dict(
  mode='sgd',
  lr=0.05,
  variance=1e-3,
  symmetric=False,
  steps=5000,
  every=250,
  bs=1,
  examples=512,
  smoke=False,
)


def get_config(arg: str | None = None):
  args = parse(arg, **DEFAULTS)
  if args['mode'] not in MODES:
    raise ValueError(f"config argument mode={args['mode']!r} is not one of {list(MODES)}.")
  c = base_config()
  c.method = 'sgd_noise' if args['mode'] == 'sgd_noise' else 'demp'
  c.model.name = 'mlp'
  c.model.widths = [100, 300]
  c.model.norm = False
  c.model.activation = 'relu'
  c.data.source = 'digits'
  c.batch_size = args['bs']
  c.num_steps = args['steps']
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.0
  c.optimizer.learning_rate = 0.0 if args['mode'] == 'gaussian' else args['lr']
  c.optimizer.lr_schedule = 'constant'
  c.demp.peak_lambda = 0.0
  c.demp.schedule = 'constant'
  c.demp.noise_std = (
    args['variance'] ** 0.5 if args['mode'] == 'gaussian' else 0.0
  )  # the std of that variance
  c.demp.noise_symmetric = args['symmetric']
  c.prune.every = args['every']
  c.prune.dynamic = False
  c.prune.at_end = False
  c.prune.num_examples = args['examples']
  c.log_every = min(250, args['steps'])
  if args['smoke']:
    c.model.widths = [16, 24]
    c.num_steps = 8
    c.prune.every = 4
    c.prune.num_examples = 64
    c.log_every = 4
    c.progress_bar = False
  return c
