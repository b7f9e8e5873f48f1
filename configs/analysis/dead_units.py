r"""Dead units vs learning rate, batch size, activation and width, without DemP (Figs. 1, 10).

    python -m scripts.sweep --config configs/analysis/dead_units.py \
        --grid 'arg.act=relu,leaky_relu,swish;arg.lr=1e-3,5e-3;seed=0,1' --workdir /tmp/fig1
    python -m scripts.sweep --config configs/analysis/dead_units.py \
        --grid 'arg.bs=32,64,128,256;seed=0,1' --workdir /tmp/fig10_bs

The reduced ConvNet recipe of ``convnet_cifar10_subset.py`` with plain Adam
(coupled), λ = 0 and no noise: units die on their own. Every τ steps the death
check counts them without removing any (``prune.dynamic=False``); the final
check removes the dead ones so the summary's neuron sparsity is the final dead
ratio. ε-inactivity (|a| < 0.01) for swish/gelu, a non-positive
pre-activation for Leaky ReLU. The number of steps stays fixed when the batch
size changes, as in the paper. Arguments: those of ``convnet_cifar10_subset``.
"""

from configs.analysis import convnet_cifar10_subset as base
from configs.analysis import parse

DEFAULTS = {**base.DEFAULTS, 'lam': 0.0, 'noise': 0.0, 'dynamic': False, 'opt': 'adam', 'wd': 0.0}


def get_config(arg: str | None = None):
  return base.build(parse(arg, **DEFAULTS))
