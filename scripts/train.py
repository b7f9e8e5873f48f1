r"""Trains one run: ``python -m scripts.train --config configs/quickstart.py --workdir DIR``.

Override any config key on the command line, e.g. ``--config.num_steps=200``
or ``--config.data.path=data/cifar10_subset.npz``; a config argument
follows a colon: ``--config configs/convnet_cifar10.py:smoke=True``. Widths
are tuples: ``--config.model.widths='(32,64)'`` (or ``--config.model.widths=32
--config.model.widths=64``).

The same command with the same workdir resumes from the latest checkpoint
(``--config.checkpoint.every=1000`` saves every 1000 steps; SIGTERM always
saves, then exits with status 0). A workdir belongs to one run: it is locked
while the run lives, and a different config (or a finished run) there is
refused unless ``--overwrite``, which moves the old results aside into
``<workdir>/previous-<timestamp>/``. The batch is split over every visible device.
On several hosts, run the same command on each with ``--multihost`` (TPU pod
slices, SLURM and Open MPI are detected; elsewhere add ``--coordinator_address``,
``--num_processes`` and ``--process_id``); the workdir must be on a file system
every host sees.

Methods: ``dense``, ``demp``, the analysis methods (:mod:`tools.analysis`) and
the baselines (``baselines``), registered when this script imports them.
Run it from the repository root (the configs are files under ``configs/``).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

import baselines  # noqa: F401  (registers the baselines' methods and config keys)
from tools import analysis  # noqa: F401  (registers the analysis methods: sgd_noise)
from demp.trainer import parallel, train

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for metrics, summaries and checkpoints.')
_OVERWRITE = flags.DEFINE_bool(
  'overwrite',
  False,
  'Start afresh in a workdir holding another run '
  "(or a finished one): its results are moved into "
  "<workdir>/previous-<timestamp>/, never deleted.",
)
_MULTIHOST = flags.DEFINE_bool(
  'multihost', False, 'Start multi-host JAX (jax.distributed.initialize) before anything else.'
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0 (--multihost on clusters JAX does not detect).',
)
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes (--multihost).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])


def _given(name: str) -> bool:
  """Whether ``--<name>`` was given on the command line (not only set by the config file)."""
  return any(a == f'--{name}' or a.startswith(f'--{name}=') for a in sys.argv[1:])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:  # orbax and XLA log every save at INFO
    logging.set_verbosity(logging.WARNING)
  if _MULTIHOST.value:
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(f is not None for f in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)):
    raise app.UsageError('--coordinator_address/--num_processes/--process_id need --multihost.')
  config = _CONFIG.value
  if _given('config.prune.every') and config.demp.target_sparsity and not config.demp.target_every:
    config.demp.target_every = config.prune.every  # the user's τ wins over a target's recipe
  result = train.train_and_evaluate(config, _WORKDIR.value, overwrite=_OVERWRITE.value)
  if result.get('preempted'):
    logging.warning(
      'Preempted at step %d; run the same command to resume from %s.',
      result['step'],
      result['checkpoint'],
    )


if __name__ == '__main__':
  app.run(main)
