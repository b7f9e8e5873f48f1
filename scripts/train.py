r"""Trains one run: ``python -m scripts.train --config configs/quickstart.py --workdir DIR``.

Override any config key on the command line, e.g. ``--config.num_steps=200``
or ``--config.data.path=../shared/data/cifar10_subset.npz``; a config argument
follows a colon: ``--config configs/convnet_cifar10.py:smoke=True``.
"""

from absl import app, flags
from ml_collections import config_flags

from demp import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to a config file.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, summaries and checkpoints.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
