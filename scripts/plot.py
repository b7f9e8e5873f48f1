r"""Draws one of the paper's figures from a directory of runs (PNG and PDF).

    python -m scripts.plot --runs /tmp/sweep --figure tradeoff --out docs/figures/fig3
    python -m scripts.plot --runs /tmp/sweep --figure dead --where method=demp --out docs/figures/fig1
    python -m scripts.plot --runs /tmp/sweep --figure final_vs --x demp.peak_lambda \
        --by demp.noise_std --y dead_ratio --logx --out docs/figures/fig2

``--where`` keeps runs matching every KEY=VALUE, ``--exclude`` drops runs matching any
(``a|b`` matches either value). Figures (``tools/plots.py``): tradeoff (accuracy vs
neuron / weight sparsity, coloured by ``--by``, default the method; several keys,
comma-separated, give a line per combination), dead (dead-unit ratio over steps;
``--count`` for counts, ``--logy``), live (live units per layer over steps), final_vs (a
final quantity ``--y`` against ``--x``, a line per ``--by``), overlap (dead-set
overlap between checks), target (target vs reached sparsity and the gain over steps,
for runs with ``demp.target_sparsity > 0``).
"""

from absl import app, flags

from tools import plots, report

_RUNS = flags.DEFINE_list('runs', None, 'Directories holding runs (searched recursively).')
_FIGURE = flags.DEFINE_enum('figure', 'tradeoff', sorted(plots.FIGURES), 'Which figure.')
_OUT = flags.DEFINE_string('out', None, 'Output path without extension (.png and .pdf).')
_WHERE = flags.DEFINE_list('where', [], 'Keep runs with KEY=VALUE (config keys), e.g. method=demp.')
_EXCLUDE = flags.DEFINE_list(
  'exclude', [], 'Drop runs with any one KEY=VALUE, e.g. demp.penalty=l2 (a|b: either value).'
)
_BY = flags.DEFINE_string(
  'by',
  None,
  'tradeoff: colour key(s), comma-separated (default method; `steered` splits DemP steered '
  'to a target from fixed λ); final_vs: line key.',
)
_X = flags.DEFINE_string('x', None, 'final_vs: the config key on the x axis.')
_Y = flags.DEFINE_string('y', 'dead_ratio', f'final_vs: one of {sorted(plots.FINAL_METRICS)}.')
_LOGX = flags.DEFINE_bool('logx', False, 'final_vs: logarithmic x axis.')
_COUNT = flags.DEFINE_bool('count', False, 'dead: dead-unit counts instead of ratios.')
_LOGY = flags.DEFINE_bool('logy', False, 'dead: symmetric-log y axis.')
_TITLE = flags.DEFINE_string('title', '', 'Figure title.')
flags.mark_flags_as_required(['runs', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  runs = report.load_runs(_RUNS.value)
  if _WHERE.value or _EXCLUDE.value:
    runs = plots.select(
      runs,
      dict(kv.split('=', 1) for kv in _WHERE.value),
      dict(kv.split('=', 1) for kv in _EXCLUDE.value),
    )
  kind, kw = _FIGURE.value, {'title': _TITLE.value}
  if kind == 'tradeoff':
    kw['color_by'] = _BY.value or 'method'
  elif kind == 'dead':
    kw.update(count=_COUNT.value, logy=_LOGY.value)
  elif kind == 'final_vs':
    if not _X.value:
      raise app.UsageError('--figure final_vs needs --x.')
    kw.update(x=_X.value, y=_Y.value, by=_BY.value, logx=_LOGX.value)
  plots.FIGURES[kind](runs, _OUT.value, **kw)
  print(f'wrote {_OUT.value}.png and {_OUT.value}.pdf')


if __name__ == '__main__':
  app.run(main)
