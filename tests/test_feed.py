"""Where the trainer's batches come from: the device path picked automatically, forced either
way by data.placement, k steps per dispatch landing on every event, and an exact resume."""

import json
import os

import numpy as np
import pytest

from demp.trainer import feed, methods, train
from tests.test_checkpoint import tiny_config


def test_k_divides_every_step_the_loop_stops_at():
  c = tiny_config()  # 60 steps, logs every 10, checks every 20, saves every 20
  when = methods.get('demp').when
  assert feed.event_steps(c, when) == [10, 20, 30, 40, 50, 60]
  assert feed.steps_per_dispatch(c, when, backend='gpu') == 10
  assert feed.steps_per_dispatch(c, when, backend='cpu') == 1  # a loop costs more than dispatch
  c.log_every = 15  # events at 15, 20, 30, 40, 45, 60: gcd 5
  assert feed.steps_per_dispatch(c, when, backend='gpu') == 5
  assert feed.steps_per_dispatch(c, when, extra=(7,), backend='gpu') == 1  # a stop_after at 7
  c.log_every, c.num_steps, c.checkpoint.every, c.prune.every = 100, 1200, 0, 100
  assert feed.steps_per_dispatch(c, when, backend='gpu') == feed.MAX_STEPS_PER_DISPATCH
  c.steps_per_dispatch = 25
  assert feed.steps_per_dispatch(c, when) == 25
  c.steps_per_dispatch = 30
  with pytest.raises(ValueError, match=r'steps_per_dispatch=30 does not divide .* gcd is 100'):
    feed.steps_per_dispatch(c, when)


def test_placement_auto_takes_the_device_and_a_key_forces_either_path(tmp_path):
  runs = {}
  for placement in ('auto', 'host'):
    c = tiny_config(**{'data.placement': placement, 'checkpoint.every': 0})
    runs[placement] = train.train_and_evaluate(c, str(tmp_path / placement))
  assert runs['auto']['data_placement'] == 'device' and runs['auto']['steps_per_dispatch'] == 1
  assert runs['host']['data_placement'] == 'host' and runs['host']['steps_per_dispatch'] == 1
  # Both train the same recipe: units die and go at the same checks on both paths.
  for s in runs.values():
    assert s['prune_events'] == 3 and s['test_accuracy'] > 0.5
  # A split the device cannot take is refused by name when forced, and falls back when auto.
  c = tiny_config(**{'data.placement': 'device', 'data.augment': 'imagenet', 'data.image_size': 8})
  with pytest.raises(ValueError, match=r"data.placement='device' but .*imagenet"):
    train.init_run(c)
  c.data.placement = 'auto'
  _, fed = train.resolve_run(c, device_feed=True)
  assert not fed.on_device


@pytest.mark.parametrize('k', [1, 10])
def test_the_device_path_resumes_bit_identically(tmp_path, k):
  """Batch s is a function of (seed, s): a run stopped at step 30 and resumed ends with the
  parameters of the uninterrupted run, prune events included (one or k steps per dispatch)."""
  config = lambda: tiny_config(steps_per_dispatch=k)  # noqa: E731
  full = train.train_and_evaluate(config(), str(tmp_path / 'full'))
  assert full['data_placement'] == 'device' and full['steps_per_dispatch'] == k
  first = train.train_and_evaluate(config(), str(tmp_path / 'resumed'), stop_after=30)
  assert first['preempted'] and first['step'] == 30
  resumed = train.train_and_evaluate(config(), str(tmp_path / 'resumed'))
  assert resumed['widths'] == full['widths'] and resumed['resumed_at'] == [30]
  assert resumed['test_accuracy'] == full['test_accuracy']

  def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    return {r['step']: r['loss'] for r in rows if 'loss' in r}

  assert losses(tmp_path / 'resumed') == losses(tmp_path / 'full')
  a = np.load(_final(tmp_path / 'full'), allow_pickle=True)
  b = np.load(_final(tmp_path / 'resumed'), allow_pickle=True)
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _final(workdir) -> str:
  """The final network's arrays, flattened into an .npz beside the workdir (for comparison)."""
  from demp.trainer import checkpoint  # pylint: disable=g-import-not-at-top

  _, variables, _ = checkpoint.load_final(str(workdir))
  flat = {}
  for col, tree in variables.items():
    for path, leaf in _leaves(tree, col):
      flat[path] = np.asarray(leaf)
  out = str(workdir) + '_final.npz'
  np.savez(out, **flat)
  return out


def _leaves(tree, prefix):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaves(v, f'{prefix}/{k}')
  else:
    yield prefix, tree
