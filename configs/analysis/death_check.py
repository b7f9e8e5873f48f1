r"""Death check on 512 training examples vs the whole training set (paper F.3, Fig. 12).

    python -m scripts.sweep --config configs/analysis/death_check.py \
        --grid 'arg.examples=512,all;seed=0,1' --workdir /tmp/fig12
    python -m scripts.plot --runs /tmp/fig12 --figure dead --count --out docs/figures/fig12_death_check

DemP on the reduced ConvNet recipe with dynamic pruning off, as in the paper:
the checks only count dead units, so both runs of a seed follow the same
trajectory (the death check does not touch training) and their curves differ
only by the set the check uses. ``examples=all`` checks every training image
(the batch of the check is the largest divisor of the set size <= 1024).
"""

from configs.analysis import convnet_cifar10_subset as base
from configs.analysis import parse

DEFAULTS = {**base.DEFAULTS, 'dynamic': False}


def get_config(arg: str | None = None):
  return base.build(parse(arg, **DEFAULTS))
