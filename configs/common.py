"""Pieces shared by the recipe configs (not a config itself: it has no ``get_config``).

Config arguments are parsed by :func:`configs.analysis.parse` (typed like their defaults).
"""

from __future__ import annotations

import shlex
import textwrap
from collections.abc import Sequence
from typing import Any, NamedTuple

import ml_collections

from baselines import config as baselines_config

OPTIMIZERS = {'adam': 'adam', 'sgdm': 'sgd'}  # the `opt` argument -> optimizer.name


def optimizer_name(opt: str) -> str:
  if opt not in OPTIMIZERS:
    raise ValueError(f'config argument opt={opt!r} is not one of {sorted(OPTIMIZERS)}.')
  return OPTIMIZERS[opt]


def aim_baselines(b: ml_collections.ConfigDict, target: float, kind: str, method: str) -> None:
  """The baselines' ``target_sparsity`` / ``target_kind`` from the config arguments.

  A FLOPs target is DemP's alone (``demp.target``): with ``kind='flops'`` the baselines keep
  their default kind (read only when ``method`` is one of them, which then raises).
  """
  b.target_sparsity = target
  if kind in baselines_config.TARGET_KINDS:
    b.target_kind = kind
  elif method not in ('dense', 'demp'):
    raise ValueError(
      f'config argument kind={kind!r} is not a target the baseline {method!r} takes: '
      f'one of {list(baselines_config.TARGET_KINDS)}.'
    )


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """A few steps on tiny batches, every prune-event code path included (seconds; CI)."""
  c.batch_size = 8
  c.num_steps = 4
  c.prune.every = 2
  c.prune.num_examples = 16
  c.prune.batch_size = 8
  c.eval_every = 0
  c.eval_batch_size = 16
  c.log_every = 2
  c.progress_bar = False


# ----------------------------------------------------------------------------
# The paper's recipes: settings with their sources, the sweeps that redraw the paper's curves.
# One dict per recipe feeds its config, its docstring, docs/recipes.md and tests/test_recipes.py.

LAUNCH, TEXT, OURS = 'launch script', 'paper text', 'ours'
SOURCES = (LAUNCH, TEXT, OURS)
FOLLOW = ('code', 'text')  # the `follow` argument: the authors' code (default) or the paper's text
SEEDS = (0, 1, 2)  # the paper's curves average three seeds
_SAME = object()


class Setting(NamedTuple):
  """One setting of a recipe: the config key, our default, and where it comes from.

  ``authors`` / ``text`` say what the authors' launch script / the paper's text
  state ('' = not stated). Where the two disagree, either ``text_value`` is the
  text's value (the code's is the default; ``follow=text`` applies the text's)
  or ``other`` names the argument that gives the side we do not default to.
  """

  key: str
  value: Any
  source: str
  authors: str = ''
  text: str = ''
  text_value: Any = _SAME
  other: str = ''

  @property
  def follows_text_with_argument(self) -> bool:
    """Whether ``follow=text`` changes this setting (to ``text_value``)."""
    return self.text_value is not _SAME

  @property
  def disagrees(self) -> bool:
    return self.follows_text_with_argument or bool(self.other)

  def the_other(self) -> str:
    """How to get the side of a disagreement that is not the default."""
    if self.text_value is not _SAME:
      return f'`follow=text` ({fmt(self.text_value)})'
    return self.other


def _set(c: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *path, last = dotted.split('.')
  for k in path:
    c = c[k]
  c[last] = value


def get(c: ml_collections.ConfigDict, dotted: str) -> Any:
  for k in dotted.split('.'):
    c = c[k]
  return c


def apply_settings(
  c: ml_collections.ConfigDict, settings: Sequence[Setting], follow: str = 'code'
) -> None:
  """Writes each setting's value (its ``text_value`` under ``follow='text'``) into ``c``."""
  if follow not in FOLLOW:
    raise ValueError(f'config argument follow={follow!r} is not one of {FOLLOW}.')
  for s in settings:
    if s.source not in SOURCES:
      raise ValueError(f'setting {s.key}: source={s.source!r} is not one of {SOURCES}.')
    value = s.text_value if follow == 'text' and s.text_value is not _SAME else s.value
    _set(c, s.key, value)


def fmt(value: Any) -> str:
  """A setting's value as the docs print it (floats with 6 significant digits)."""
  if isinstance(value, float):
    if value == 0 or 1e-2 <= abs(value) < 1e6:
      return f'{value:.6g}'
    mantissa, exponent = f'{value:.5e}'.split('e')
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"  # 1e-4, 7.07107e-3
  if isinstance(value, (list, tuple)):
    return '(' + ', '.join(fmt(v) for v in value) + ')'
  return str(value)


def settings_table(settings: Sequence[Setting]) -> str:
  """The Markdown table of a recipe: ours vs the authors' launch script vs the paper's text."""
  lines = [
    '| config key | ours (default) | source of ours | authors\' launch script | paper text |',
    '| --- | --- | --- | --- | --- |',
  ]
  for s in settings:
    lines.append(
      f'| `{s.key}` | {fmt(s.value)} | {s.source} | {s.authors or "—"} | {s.text or "—"} |'
    )
  return '\n'.join(lines)


def disagreements(settings: Sequence[Setting]) -> list[Setting]:
  return [s for s in settings if s.disagrees]


# The three commands per recipe. Runs go under runs/<recipe>, tables and figures under
# results/<recipe> and docs/figures/<recipe> (paths relative to the repository root).


def sweep_argv(
  config: str,
  opt: str,
  lambdas: Sequence[float],
  seeds: Sequence[int] = SEEDS,
  *,
  workdir: str,
  dense: bool = True,
  smoke: bool = False,
) -> list[str]:
  """``scripts.sweep``: DemP over the λ grid × seeds, plus dense runs at the same seeds."""
  seed_list = ','.join(str(s) for s in seeds)
  arg = f'opt={opt}' + (',smoke=True' if smoke else '')
  lams = ','.join(fmt(v) for v in lambdas)
  argv = [
    'python',
    '-m',
    'scripts.sweep',
    f'--config={config}:{arg}',
    f'--grid=method=demp;demp.peak_lambda={lams};seed={seed_list}',
  ]
  if dense:
    argv.append(f'--grid=method=dense;seed={seed_list}')
  return argv + [f'--workdir={workdir}']


def report_argv(workdir: str, out: str, targets: Sequence[float] = ()) -> list[str]:
  """``scripts.report``: the closest settings to ``targets`` (Table 1/2), else one row per λ."""
  argv = ['python', '-m', 'scripts.report', f'--runs={workdir}', f'--out={out}']
  if targets:
    return argv + ['--target_weight_sparsity=' + ','.join(fmt(t) for t in targets)]
  return argv + ['--all_groups']


def plot_argv(workdir: str, out: str, title: str) -> list[str]:
  """``scripts.plot``: test accuracy vs neuron and weight sparsity (the paper's Fig. 3 panels)."""
  return [
    'python',
    '-m',
    'scripts.plot',
    f'--runs={workdir}',
    '--figure=tradeoff',
    f'--out={out}',
    f'--title={title}',
  ]


def shell(argv: Sequence[str]) -> str:
  """One command line, ``python -m scripts.x`` then one flag per line (copy-paste ready)."""
  return ' \\\n    '.join([' '.join(argv[:3])] + [shlex.quote(a) for a in argv[3:]])


def recipe_commands(
  config: str,
  name: str,
  opt: str,
  lambdas: Sequence[float],
  *,
  title: str,
  targets: Sequence[float] = (),
  seeds: Sequence[int] = SEEDS,
  smoke: bool = False,
  dense: bool = True,
  root: str = '',
) -> dict[str, list[str]]:
  """The sweep / report / plot commands of recipe ``name`` (``<config stem>_<opt>``).

  ``root`` prefixes the output paths (default: relative to the repository root).
  """
  join = lambda *p: '/'.join(x.rstrip('/') for x in (root, *p) if x)  # noqa: E731
  runs = join('runs', name)
  return {
    'sweep': sweep_argv(config, opt, lambdas, seeds, workdir=runs, dense=dense, smoke=smoke),
    'report': report_argv(runs, join('results', name), targets),
    'plot': plot_argv(runs, join('docs', 'figures', name), title),
  }


def recipe_doc(
  settings: dict[str, Sequence[Setting]], commands: dict[str, dict[str, list[str]]]
) -> str:
  """The part of a recipe config's docstring generated from its dicts (settings, commands)."""
  out = []
  for opt, rows in settings.items():
    out.append(f'\nSettings with opt={opt} (source: {LAUNCH} | {TEXT} | {OURS}):\n')
    width = max(len(s.key) for s in rows)
    for s in rows:
      text = f'; follow=text: {fmt(s.text_value)}' if s.text_value is not _SAME else ''
      out.append(f'  {s.key:<{width}}  {fmt(s.value):<12} {s.source}{text}')
    out.append(f'\nThe paper\'s curve with opt={opt}, three commands:\n')
    for argv in commands[opt].values():
      out.append(textwrap.indent(shell(argv), '    ') + '\n')
  return '\n'.join(out)
