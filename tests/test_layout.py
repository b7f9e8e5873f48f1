"""The package's floors: the core (``demp``, ``demp.models``, ``demp.data``) imports no trainer,
tool or plug-in; the trainer imports no tool or plug-in; no module-level import circles."""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP = ('demp', 'baselines', 'tools')
OUTSIDE = ('baselines', 'tools', 'configs', 'scripts', 'experiments')


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module(p): p for top in TOP for p in sorted((ROOT / top).rglob('*.py'))}


def _imports(path: pathlib.Path, known, *, top_level_only: bool) -> set[str]:
  """Project modules ``path`` imports (``from pkg import name``: ``pkg.name`` when a module)."""
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  out = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for a in node.names:
        sub = f'{node.module}.{a.name}'
        out.add(sub if sub in known else node.module)
  return {m for m in out if m in known or m.split('.')[0] in OUTSIDE}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import circle of ``graph`` (module -> modules it imports), or None."""
  state: dict[str, int] = {}  # 1: on the stack, 2: done
  stack: list[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if state.get(n) == 1:
        return stack[stack.index(n) :] + [n]
      if n not in state and (found := visit(n)):
        return found
    stack.pop()
    state[m] = 2
    return None

  for m in sorted(graph):
    if m not in state and (found := visit(m)):
      return found
  return None


def _is_core(module: str) -> bool:
  return module.split('.')[0] == 'demp' and not module.startswith('demp.trainer')


def test_the_cycle_finder_finds_a_cycle():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_no_import_circles():
  known = _modules()
  graph = {m: _imports(p, known, top_level_only=True) - {m} for m, p in known.items()}
  # A package's own __init__ imports its submodules; a submodule's `from pkg import sub` is
  # an edge to the submodule, never to the package (resolved above).
  assert len(graph) > 60
  assert find_cycle(graph) is None


def test_the_core_imports_no_trainer_tool_or_plugin():
  known = _modules()
  core = {m: p for m, p in known.items() if _is_core(m)}
  assert {'demp', 'demp.transforms', 'demp.surgery', 'demp.data.pipeline'} <= set(core)
  offenders = {}
  for m, p in core.items():  # function-local imports included
    bad = sorted(
      i
      for i in _imports(p, known, top_level_only=False)
      if i.startswith('demp.trainer') or i.split('.')[0] in OUTSIDE
    )
    if bad:
      offenders[m] = bad
  assert offenders == {}


def test_the_trainer_imports_no_tool_or_plugin():
  known = _modules()
  offenders = {}
  for m, p in known.items():
    if m.startswith('demp.trainer'):
      bad = sorted(
        i for i in _imports(p, known, top_level_only=False) if i.split('.')[0] in OUTSIDE
      )
      if bad:
        offenders[m] = bad
  assert offenders == {}


def test_import_demp_loads_only_the_core_and_sets_no_environment():
  # JAX itself sets a few variables on import: compared after importing it.
  code = (
    'import os, sys, jax, flax.linen, optax; before = dict(os.environ); import demp; '
    'print(sorted(m for m in sys.modules if m.startswith(("demp.trainer", "tools", "baselines", '
    '"tensorflow", "orbax")))); print(sorted(set(os.environ.items()) ^ set(before.items())))'
  )
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
  )
  assert out.stdout.split('\n')[:2] == ['[]', '[]']
