"""The README's library snippets run as written."""

import pathlib
import re

import numpy as np
import optax

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _python_blocks():
  return re.findall(r'```python\n(.*?)```', README.read_text(), flags=re.S)


def test_readme_snippets_run_and_prune():
  blocks = _python_blocks()
  assert len(blocks) == 3
  namespace = {}
  exec(compile(blocks[0], 'README-snippet-1', 'exec'), namespace)  # pylint: disable=exec-used
  assert np.isfinite(float(namespace['loss']))
  # The optimizer state carries the noise key, the penalty count and Adam's moments.
  assert int(namespace['opt_state'].count) == 3
  exec(compile(blocks[1], 'README-snippet-2', 'exec'), namespace)  # pylint: disable=exec-used
  model, alive = namespace['model'], namespace['alive']
  assert model.widths['hidden'] == max(1, int(alive['hidden'].sum()))
  assert namespace['variables']['params']['fc2']['kernel'].shape == (model.widths['hidden'], 10)
  # The unstructured wrapper: 90 % of the first layer's kernel masked, and zero there once updated.
  exec(compile(blocks[2], 'README-snippet-3', 'exec'), namespace)  # pylint: disable=exec-used
  mask = np.asarray(namespace['sparse_state'].masks['Dense_0']['kernel'])
  assert mask.size - mask.sum() == round(0.9 * mask.size)
  assert namespace['sparse_state'].masks['Dense_1']['kernel'] is None  # the last layer stays dense
  new_params = optax.apply_updates(namespace['params'], namespace['updates'])
  kernel = np.asarray(new_params['Dense_0']['kernel'])
  assert np.all(kernel[~mask] == 0) and np.all(kernel[mask] != 0)
