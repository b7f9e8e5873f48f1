r"""Adam's ε vs dead units, without DemP (paper appendix E, Fig. 11).

    python -m scripts.sweep --config configs/analysis/adam_eps.py \
        --grid 'arg.eps=1e-10,1e-8,1e-6,1e-4;arg.lr=5e-3,1e-2;seed=0,1' --workdir /tmp/fig11
    python -m scripts.plot --runs /tmp/fig11 --figure final_vs --x optimizer.eps \
        --by optimizer.learning_rate --y neuron_sparsity --logx --out docs/figures/fig11_adam_eps

The ``dead_units`` recipe (Adam, λ = 0, no noise, checks only log, dead units
removed at the end so neuron sparsity = final dead ratio) with ``eps`` and
``lr`` as arguments.
"""

from configs.analysis import convnet_cifar10_subset as base
from configs.analysis import dead_units, parse


def get_config(arg: str | None = None):
  return base.build(parse(arg, **dead_units.DEFAULTS))
