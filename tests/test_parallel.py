"""Data parallelism: 4 forced host devices vs 1, and two processes (multi-host) on one machine.

Every run happens in a child process (this file run as a script), with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before JAX starts, so
the pytest worker's own JAX keeps its single device.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from demp.trainer import config as config_lib

from tests import _util

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400  # load-scaled (tests/_util.py)


def tiny_config(comparable: bool = False):
  """DemP on an MLP over digits: 60 steps, τ = 20, units removed at 20, 40 and 60.

  ``comparable``: SGD and no noise, for comparing device counts. Adam and the
  live-noise mask ``g != 0`` both turn rounding-level gradient differences into
  update-sized ones: weights of a BatchNorm'd layer that read a constant input
  (digits has always-blank pixels) have an analytically zero gradient, which
  comes out as ±1e-9 or exactly 0 depending on the order of the batch sum;
  Adam normalizes it to ±lr and the noise mask switches σ-sized noise on or
  off. With either on, 1- and 4-device runs drift apart by ~1e-3 in loss
  within 10 steps (measured); with both off they agree to ~1e-5 over 60 steps.
  It also prunes synchronously (``prune.switch_after = 0``): a deferred prune
  trains two steps at the old shapes, whose sums round differently on 1 and 4
  devices, and the L1 penalty's sign(γ) turns such 1e-8 differences on a γ near
  0 into lr·λ-sized kicks (measured: 0.047 in one weight after 60 steps, against
  2e-4 synchronously). The 2-host test below runs deferred prunes.
  """
  from configs import quickstart  # pylint: disable=g-import-not-at-top

  c = quickstart.get_config()
  c.num_steps = 60
  c.batch_size = 32
  c.model.widths = [32, 32]
  c.prune.every = 20
  c.data.placement = 'host'  # one stream of batches for every device count
  c.prune.num_examples = 64
  c.prune.batch_size = 32
  c.log_every = 10
  c.eval_batch_size = 120
  c.progress_bar = False
  c.demp.peak_lambda = 0.5
  c.optimizer.learning_rate = 0.05
  c.checkpoint.every = 20
  if comparable:
    c.optimizer.name = 'sgd'
    c.optimizer.learning_rate = 0.1
    c.demp.noise_std = 0.0
    c.prune.switch_after = 0.0
  return c


# ----------------------------------------------------------------------------
# The child process.


def _worker(out: str, workdir: str, multihost: str | None) -> None:
  """Runs the tiny config on every visible device; writes what the tests compare."""
  from demp.trainer import checkpoint, parallel, train  # pylint: disable=g-import-not-at-top

  if multihost:
    port, pid = multihost.split(':')
    parallel.initialize_distributed(f'localhost:{port}', 2, int(pid))
  masks, shardings = [], []
  unit_stats, compile_, switch = train.Run.unit_stats, train.Run.compile, train.Run.switch

  def record_dead_units(run):
    stats = unit_stats(run)
    masks.append({k: np.asarray(v).astype(int).tolist() for k, v in stats['alive'].items()})
    return stats

  def record_shardings(run):
    shardings.append(
      {
        'batch': str(run.compiled.input_shardings[0][1]['image']),
        'state': str(jax.tree.leaves(run.compiled.input_shardings[0][0])[0]),
      }
    )

  def record_compile(run, batch):
    seconds = compile_(run, batch)
    record_shardings(run)
    return seconds

  def record_switch(run):  # a deferred prune's step, compiled in the background
    times = switch(run)
    record_shardings(run)
    return times

  train.Run.unit_stats, train.Run.compile = record_dead_units, record_compile
  train.Run.switch = record_switch
  result = {'devices': jax.device_count(), 'processes': jax.process_count()}
  config = tiny_config(comparable=not multihost)
  bad = tiny_config()
  bad.batch_size = 30
  try:
    config_lib.validate_config(bad)
  except ValueError as e:
    result['bad_batch_error'] = str(e)
  if multihost:  # interrupted and resumed, across hosts
    stopped = train.train_and_evaluate(config, workdir, stop_after=30)
    result['stopped_at'] = stopped['step']
  summary = train.train_and_evaluate(config, workdir)
  result.update(
    masks=masks,
    shardings=shardings,
    widths=summary['widths'],
    events=[e['widths'] for e in summary['events']],
    switch_steps=[c.get('switch_step') for c in summary['prune_costs']],
    test_accuracy=summary['test_accuracy'],
    resumed_at=summary['resumed_at'],
    summary_devices=summary['devices'],
    summary_processes=summary['processes'],
  )
  _, variables, _ = checkpoint.load(workdir)  # every process: orbax synchronizes them
  if jax.process_index() == 0:
    records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
    result['losses'] = [[r['step'], r['loss']] for r in records if 'loss' in r]
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(variables)}
    np.savez(out + '.npz', **flat)
  with open(out, 'w') as f:
    json.dump(result, f)


# ----------------------------------------------------------------------------
# The tests.


def _start(tmp_path, name: str, devices: int, multihost: str | None = None):
  env = {
    **os.environ,
    'PYTHONPATH': REPO,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
  }
  args = [
    sys.executable,
    os.path.abspath(__file__),
    str(tmp_path / f'{name}.json'),
    str(tmp_path / 'run' if multihost else tmp_path / name),
  ]
  if multihost:
    args.append(multihost)
  log = open(tmp_path / f'{name}.log', 'w')
  return subprocess.Popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish(tmp_path, name: str, child) -> dict:
  try:
    rc = _util.wait(child, TIMEOUT_S, f'the child process {name}')
  finally:
    if child.poll() is None:
      child.kill()
      child.wait()
  assert rc == 0, open(tmp_path / f'{name}.log').read()[-4000:]
  return json.load(open(tmp_path / f'{name}.json'))


@pytest.fixture
def children():
  """Child processes started by a test; killed if the test ends before they do."""
  started = []
  yield started
  for child in started:
    if child.poll() is None:
      child.kill()
      child.wait()


def test_four_devices_match_one_device(tmp_path, children):
  """Same losses (rtol 1e-3), death masks and widths (exact), final params (atol 1e-3).

  Only the order of floating-point reductions differs (the batch mean of the
  loss and of BatchNorm's statistics become all-reduces over 4 shards); see
  :func:`tiny_config` for why this comparison trains with SGD and no noise.
  """
  started = {n: _start(tmp_path, n, d) for n, d in (('one', 1), ('four', 4))}
  children.extend(started.values())
  one, four = (_finish(tmp_path, n, started[n]) for n in ('one', 'four'))
  assert (one['devices'], four['devices'], four['summary_devices']) == (1, 4, 4)
  assert "spec=P('data',)" in four['shardings'][0]['batch']  # the batch is split
  assert 'spec=P()' in four['shardings'][0]['state']  # the state replicated
  assert len(four['shardings']) == 3  # dense + after 20, 40
  assert four['bad_batch_error'].startswith('batch_size=30 is not divisible by the device count 4')
  assert 'bad_batch_error' not in one  # 30 is fine on 1 device

  assert four['masks'] == one['masks'] and len(one['masks']) == 3
  assert four['events'] == one['events'] and four['widths'] == one['widths']
  assert sum(four['widths'].values()) < 64  # units were removed
  steps_one, losses_one = zip(*one['losses'])
  steps_four, losses_four = zip(*four['losses'])
  assert steps_four == steps_one == tuple(range(10, 61, 10))
  np.testing.assert_allclose(losses_four, losses_one, rtol=1e-3)
  params_one, params_four = np.load(tmp_path / 'one.json.npz'), np.load(tmp_path / 'four.json.npz')
  assert sorted(params_four.files) == sorted(params_one.files)
  for k in params_one.files:
    np.testing.assert_allclose(params_four[k], params_one[k], atol=1e-3, rtol=0, err_msg=k)
  assert abs(four['test_accuracy'] - one['test_accuracy']) <= 1 / 360  # at most one test image
  print(
    'max |Δloss|/loss',
    np.max(np.abs(np.array(losses_four) / losses_one - 1)),
    'max |Δparam|',
    max(float(np.abs(params_four[k] - params_one[k]).max()) for k in params_one.files),
  )


@pytest.mark.skip(
  reason='known bug, open: two processes that stop at step 30 and resume in the same Python '
  'process hang in their first step after the resume (both in device_get of the step metrics, '
  'the cross-process collective never completing); single-process resumes are tested in '
  'test_checkpoint.py and test_feed.py. See docs/long_runs.md, "Known issue".'
)
def test_two_processes_agree_and_resume(tmp_path, children):
  """Two hosts x 2 devices: per-host data, identical masks on both, checkpoint save/restore."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  children.extend(_start(tmp_path, f'host{i}', 2, f'{port}:{i}') for i in range(2))
  host0, host1 = (_finish(tmp_path, f'host{i}', c) for i, c in enumerate(children))
  for h in (host0, host1):
    assert (h['devices'], h['processes'], h['summary_processes']) == (4, 2, 2)
    assert h['stopped_at'] == 30 and h['resumed_at'] == [30]
  assert host0['masks'] == host1['masks'] and len(host0['masks']) >= 2
  assert host0['widths'] == host1['widths'] and host0['events'] == host1['events']
  # Deferred prunes (τ = 20, switch_after 0.1): both hosts switch at the same steps.
  assert host0['switch_steps'] == host1['switch_steps'] and 22 in host0['switch_steps']
  assert host0['test_accuracy'] == host1['test_accuracy']
  assert "spec=P('data',)" in host0['shardings'][0]['batch']
  assert [s for s, _ in host0['losses']] == list(range(10, 61, 10))  # one metrics writer
  assert 'losses' not in host1


if __name__ == '__main__':
  _worker(*sys.argv[1:3], sys.argv[3] if len(sys.argv) > 3 else None)
