r"""What prune events cost a DemP run: synchronous vs deferred switch, against dense.

    python -m scripts.benchmark_events \
        --config 'configs/compare_cifar10_subset.py:method=demp,steps=1200,width=0.5,lam=0.04' \
        --config.data.path=/path/to/cifar10_subset.npz --workdir /tmp/events --switch_after 0,0.1

Trains the config dense, then with each ``prune.switch_after`` (0 = prune, then
compile; > 0 = silence, compile in the background, switch later; see
docs/prune_events.md), one after the other in this process, and prints one row
per run: wall time (and over dense), the prune events' total stall and its
share of the wall time, the largest and median stall in train steps, the death
checks' time and the background compile time. Finished runs in ``--workdir``
are read, not trained again. The logic is :func:`tools.benchmark.event_overhead_runs`.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from tools import benchmark

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A DemP config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the runs go.')
_SWITCH = flags.DEFINE_list('switch_after', ['0', '0.1'], 'prune.switch_after values.')
_DENSE = flags.DEFINE_bool('dense', True, 'Also train the dense run (the wall-time reference).')
_OUT = flags.DEFINE_string('out', None, 'Optional JSON file for the rows.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  config.progress_bar = False
  rows = benchmark.event_overhead_runs(
    config, _WORKDIR.value, [float(s) for s in _SWITCH.value], dense=_DENSE.value
  )
  print(benchmark.format_overhead_table(rows))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(rows, f, indent=2)


if __name__ == '__main__':
  app.run(main)
