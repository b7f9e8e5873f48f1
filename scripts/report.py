r"""Turns a directory of runs into the paper's Table 1/2 format (Markdown and CSV).

    python -m scripts.report --runs /tmp/sweep --target_weight_sparsity 0.8,0.9 \
        --out results/table

For each method, the setting (averaged over seeds) whose weight sparsity is
closest to each target; ``--all_groups`` lists every setting. See
``tools/report.py``.
"""

from absl import app, flags

from tools import report

_RUNS = flags.DEFINE_list('runs', None, 'Directories holding runs (searched recursively).')
_TARGETS = flags.DEFINE_list('target_weight_sparsity', ['0.8'], 'Target weight sparsities (0..1).')
_OUT = flags.DEFINE_string('out', None, 'Write OUT.md and OUT.csv (default: print only).')
_ALL = flags.DEFINE_bool('all_groups', False, 'One row per setting instead of the closest ones.')
flags.mark_flags_as_required(['runs'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  targets = [float(t) for t in _TARGETS.value]
  if _OUT.value:
    markdown = report.write_report(_RUNS.value, _OUT.value, targets, all_groups=_ALL.value)
  else:
    rows = report.table_rows(report.load_runs(_RUNS.value), targets, all_groups=_ALL.value)
    markdown = report.to_markdown(rows)
  print(markdown)


if __name__ == '__main__':
  app.run(main)
