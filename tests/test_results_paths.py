"""The committed run outputs under results/ name no directory of the machine they ran on."""

import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, 'results')

# A machine's directories: anywhere in a text file.
MACHINE_DIRS = ('/work/', '/tmp/', '/root/', '/home/', '/Users/')
# A string value that is an absolute path: a leading '/' or '~/', no whitespace.
ABSOLUTE_PATH = re.compile(r'^(?:/|~/)\S+$')


def _strings(x, key=''):
  if isinstance(x, dict):
    for k, v in x.items():
      yield from _strings(v, k)
  elif isinstance(x, list):
    for v in x:
      yield from _strings(v, key)
  elif isinstance(x, str):
    yield key, x


def _offenders(path: str, text: str) -> list[str]:
  found = [f'{path}: contains {d!r}' for d in MACHINE_DIRS if d in text]
  if not path.endswith(('.json', '.jsonl')) or not ('"/' in text or '"~/' in text):
    return found  # fast path: no string value can start with '/' or '~/'
  docs = (
    [json.loads(text)]
    if path.endswith('.json')
    else [json.loads(line) for line in text.splitlines() if line.strip()]
  )
  for doc in docs:
    for key, value in _strings(doc):
      if ABSOLUTE_PATH.match(value):
        found.append(
          f'{path}: {key}={value!r} is an absolute path; allowed: a file name or a path '
          'relative to the run (tools.sweep.scrub_result)'
        )
  return found


def test_results_name_no_machine_paths():
  offenders, files = [], 0
  for dirpath, _, names in os.walk(RESULTS):
    for name in names:
      if not name.endswith(('.json', '.jsonl', '.md', '.csv')):
        continue
      path = os.path.join(dirpath, name)
      with open(path, encoding='utf-8') as f:
        offenders += _offenders(os.path.relpath(path, ROOT), f.read())
      files += 1
  assert files > 100  # the walk found the committed results
  assert not offenders, f'{len(offenders)} machine paths:\n' + '\n'.join(offenders[:20])


def test_the_check_finds_what_it_looks_for():
  assert _offenders('r/summary.json', '{"compile_cache_dir": "/srv/x/jax_cache"}')
  assert _offenders('r/metrics.jsonl', '{"a": 1}\n{"b": {"path": "~/d.npz"}}\n')
  assert _offenders('r/table.md', '| run | /home/me/run |')
  assert not _offenders('r/config.json', '{"penalty_mask": "(?:^|/)bn/scale$", "path": "d.npz"}')
