r"""Dynamic pruning on vs off (paper F.2, Fig. 7).

    python -m scripts.sweep --config configs/analysis/dynamic_pruning.py \
        --grid 'arg.dynamic=True,False;arg.lam=1e-2,3e-2,1e-1;seed=0,1' --workdir /tmp/fig7
    python -m scripts.plot --runs /tmp/fig7 --figure tradeoff --by prune.dynamic \
        --out docs/figures/fig7_dynamic

DemP on the reduced ConvNet recipe. ``dynamic=True`` removes dead units at
every check (every τ steps); ``dynamic=False`` only counts them during
training and removes the dead ones once, at the end, so both arms report the
sparsity of the network they end with.
"""

from configs.analysis import convnet_cifar10_subset as base
from configs.analysis import parse


def get_config(arg: str | None = None):
  return base.build(parse(arg, **base.DEFAULTS))
