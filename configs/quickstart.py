r"""Quickstart: DemP on an MLP over scikit-learn's bundled digits (no download).

    python -m scripts.train --config configs/quickstart.py --workdir /tmp/demp_quickstart

Finishes in well under 3 minutes on 2 CPU cores; the hidden layers shrink
visibly while it trains. ``--config configs/quickstart.py:method=dense`` gives
the dense baseline with the same steps and seed.
"""

from demp.trainer.config import base_config


def get_config(arg: str | None = None):
  args = dict(kv.split('=') for kv in arg.split(',')) if arg else {}
  c = base_config()
  c.method = args.get('method', 'demp')
  c.model.name = 'mlp'
  c.model.widths = (256, 256)  # a tuple: --config.model.widths='(32,64)' overrides it
  c.model.activation = 'relu'
  c.data.source = 'digits'
  c.batch_size = 64
  c.num_steps = 1500
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = 3e-3
  c.demp.peak_lambda = 3e-2
  c.demp.noise_std = 5e-5  # peak std (authors' code); paper text: 7.07e-3
  c.prune.every = 250
  c.prune.num_examples = 512
  c.log_every = 50
  return c
