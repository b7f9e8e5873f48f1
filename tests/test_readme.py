"""The README's snippet and the library guide's snippets run as written."""

import pathlib
import re

import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python_blocks(name: str) -> list[str]:
  return re.findall(r'```python\n(.*?)```', (ROOT / name).read_text(), flags=re.S)


def _run(block: str, name: str, namespace: dict) -> None:
  exec(compile(block, name, 'exec'), namespace)  # pylint: disable=exec-used


def test_the_readme_snippet_trains_and_prunes_a_plain_module():
  (block,) = _python_blocks('README.md')
  namespace = {}
  _run(block, 'README-snippet', namespace)
  assert np.isfinite(float(namespace['loss']))
  # The optimizer state carries the noise key, the penalty count and Adam's moments.
  assert int(namespace['opt_state'].count) == 3
  model, alive = namespace['model'], namespace['alive']
  (group,) = [g for g in alive]
  assert model.widths[group] == max(1, int(alive[group].sum()))
  assert namespace['variables']['params']['Dense_1']['kernel'].shape == (model.widths[group], 10)
  adam = namespace['opt_state'].inner_state[1][0]  # live noise > (penalty, adam)
  assert adam.mu['Dense_0']['kernel'].shape == (20, model.widths[group])


def test_the_library_guide_snippets_run_and_prune():
  blocks = _python_blocks('docs/library.md')
  assert len(blocks) == 4
  namespace = {}
  _run(blocks[0], 'library-snippet-1', namespace)
  assert np.isfinite(float(namespace['loss']))
  assert int(namespace['opt_state'].count) == 3
  _run(blocks[1], 'library-snippet-2', namespace)
  model, alive = namespace['model'], namespace['alive']
  assert model.widths['hidden'] == max(1, int(alive['hidden'].sum()))
  assert namespace['variables']['params']['fc2']['kernel'].shape == (model.widths['hidden'], 10)
  # The unstructured wrapper: 90 % of the first layer's kernel masked, and zero there once updated.
  _run(blocks[2], 'library-snippet-3', namespace)
  mask = np.asarray(namespace['sparse_state'].masks['Dense_0']['kernel'])
  assert mask.size - mask.sum() == round(0.9 * mask.size)
  assert namespace['sparse_state'].masks['Dense_1']['kernel'] is None  # the last layer stays dense
  new_params = optax.apply_updates(namespace['params'], namespace['updates'])
  kernel = np.asarray(new_params['Dense_0']['kernel'])
  assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0)
  # A method registered from outside the trainer, with DemP's prune event as its hook.
  _run(blocks[3], 'library-snippet-4', namespace)
  method = namespace['methods'].get('demp_every_100')
  assert [method.when(None, s) for s in (0, 99, 100, 200)] == [False, False, True, True]
