r"""Plots live units per unit group over training steps from a run's metrics.jsonl.

    python -m scripts.plot_live_units /tmp/demp_vit_gelu/metrics.jsonl docs/figures/vit_live.png

Every death check logs ``live`` (group -> live units) with its prune event;
a circle marks the check where a group's pruning started (revival-aware DemP).
"""

from absl import app

from demp.trainer import metrics, revival


def main(argv):
  if len(argv) not in (3, 4):
    raise app.UsageError('usage: plot_live_units METRICS.jsonl OUT.png [TITLE]')
  revival.plot_live_units(
    metrics.read_jsonl(argv[1]), argv[2], title=argv[3] if len(argv) == 4 else ''
  )
  print(f'wrote {argv[2]}')


if __name__ == '__main__':
  app.run(main)
