"""Checkpoint and resume: bit-identical continuation across prune events, SIGTERM, kill -9,
corrupt and mismatched checkpoints, NaN stops, config rejection, the data position."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import quickstart
from demp.trainer import checkpoint, parallel, train
from demp import data
from demp.trainer import config as config_lib
from tests import _util

jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """DemP on an MLP over digits: 60 steps, τ = 20; units die and are removed at 20, 40 and 60."""
  c = quickstart.get_config()
  c.num_steps = 60
  c.batch_size = 32
  c.model.widths = [32, 32]
  c.prune.every = 20
  c.prune.num_examples = 64
  c.prune.batch_size = 32
  c.log_every = 10
  c.eval_batch_size = 120
  c.progress_bar = False
  c.demp.peak_lambda = 0.5
  c.optimizer.learning_rate = 0.05
  c.checkpoint.every = 20
  return _util.set_keys(c, overrides)


def _losses(workdir):
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [(r['step'], r['loss']) for r in records if 'loss' in r]


def _assert_same_final_params(workdir, reference):
  _, variables, meta = checkpoint.load(workdir)
  ref_variables, ref_meta = reference['variables'], reference['meta']
  assert meta['step'] == ref_meta['step'] == 60
  assert meta['model']['widths'] == ref_meta['model']['widths']
  leaves = jax.tree.leaves_with_path(variables)
  ref_leaves = jax.tree.leaves_with_path(ref_variables)
  assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
  for (path, x), (_, y) in zip(leaves, ref_leaves):  # bit-identical on CPU
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


CACHE_OPTIONS = {
  'jax_persistent_cache_min_compile_time_secs': 0,
  'jax_persistent_cache_min_entry_size_bytes': -1,
}


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent XLA cache shared by this module's runs and child processes.

  Only saves time: an executable compiled from the same program is the same,
  so a resumed run computes exactly what a fresh compile would (the reference
  run compiles everything fresh). Restored afterwards.
  """
  path = str(tmp_path_factory.mktemp('xla_cache'))
  saved = {k: getattr(jax.config, k) for k in ('jax_compilation_cache_dir', *CACHE_OPTIONS)}
  for k, v in {'jax_compilation_cache_dir': path, **CACHE_OPTIONS}.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The uninterrupted run."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  _, variables, meta = checkpoint.load(workdir)
  events = [(e['step'], e['widths']) for e in summary['events']]
  # The test is only meaningful if units are removed before and after the interruptions.
  assert [s for s, w in events if sum(w.values()) < 64] == [20, 40, 60], events
  return {
    'workdir': workdir,
    'summary': summary,
    'variables': variables,
    'meta': meta,
    'losses': _losses(workdir),
  }


def test_resume_is_bit_identical_across_prune_events(reference, tmp_path):
  """Stopped at 10 (before the first prune event) and at 30 (after it), resumed each time."""
  workdir = str(tmp_path)
  out = train.train_and_evaluate(tiny_config(), workdir, stop_after=10)
  assert out['preempted'] and out['step'] == 10 and sum(out['widths'].values()) == 64
  out = train.train_and_evaluate(tiny_config(), workdir, stop_after=30)
  assert out['step'] == 30
  assert out['widths'] == reference['summary']['events'][0]['widths']  # pruned at 20
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary['resumed_at'] == [10, 30]
  _assert_same_final_params(workdir, reference)
  ref = reference['summary']
  assert summary['widths'] == ref['widths']
  assert [e['widths'] for e in summary['events']] == [e['widths'] for e in ref['events']]
  assert summary['test_accuracy'] == ref['test_accuracy']
  assert summary['test_loss'] == ref['test_loss']
  assert _losses(workdir) == reference['losses']  # the log windows were saved too
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'), keep=3)
  assert mngr.all_steps() == [30, 40, 60]  # keep-last-3: 10 and 20 were deleted


@pytest.fixture
def children():
  """Child processes started by a test; killed if the test ends before they do."""
  started = []
  yield started
  for child in started:
    if child.poll() is None:
      child.kill()
      child.wait()


def _run_child(code: str, **popen):
  env = {
    **os.environ,
    'PYTHONPATH': REPO,
    'JAX_PLATFORMS': 'cpu',
    'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
    **{k.upper(): str(v) for k, v in CACHE_OPTIONS.items()},
  }
  prelude = f'import sys; sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
  return subprocess.Popen(
    [sys.executable, '-c', prelude + textwrap.dedent(code)],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    **popen,
  )


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(reference, tmp_path, children):
  """A real SIGTERM (sent at step 25, between prune events) -> checkpoint 25, status 0, resume."""
  workdir = str(tmp_path)
  child = _run_child(f"""
      import os, signal
      from demp.trainer import metrics, train
      from test_checkpoint import tiny_config
      write = metrics.JsonlWriter.write
      def write_then_signal(self, record):
        write(self, record)
        if record.get('step') == 25 and 'loss' in record:
          os.kill(os.getpid(), signal.SIGTERM)
      metrics.JsonlWriter.write = write_then_signal
      out = train.train_and_evaluate(tiny_config(log_every=5), {workdir!r})
      print('RESULT', out.get('preempted'), out.get('step'))
  """)
  children.append(child)
  output, _ = _util.communicate(child, 240, 'the run that is sent SIGTERM')
  assert child.returncode == 0, output[-3000:]
  assert 'RESULT True 25' in output, output[-3000:]
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert records[-1]['event'] == 'preempted' and records[-1]['step'] == 25
  assert checkpoint.manager(os.path.join(workdir, 'checkpoints')).latest_step() == 25
  summary = train.train_and_evaluate(tiny_config(log_every=5), workdir)
  assert summary['resumed_at'] == [25]
  _assert_same_final_params(workdir, reference)


def test_kill9_during_a_save_leaves_the_previous_checkpoint_usable(reference, tmp_path, children):
  """kill -9 while step 20 is being written: step 10 restores and the run ends identically."""
  workdir = str(tmp_path / 'run')
  marker = str(tmp_path / 'saving20')
  child = _run_child(f"""
      import time
      from orbax.checkpoint._src.path import atomicity
      from demp.trainer import train
      from test_checkpoint import tiny_config
      finalize = atomicity.AtomicRenameTemporaryPath.finalize
      async def finalize_slowly(self):
        if self.get_final().name == '20':        # arrays written, not yet committed
          open({marker!r}, 'w').close()
          time.sleep(10**6)  # until the test kills it
        return await finalize(self)
      atomicity.AtomicRenameTemporaryPath.finalize = finalize_slowly
      train.train_and_evaluate(tiny_config(**{{'checkpoint.every': 10}}), {workdir!r})
  """)
  children.append(child)
  _util.wait_until(lambda: os.path.exists(marker), 240, 'the save of step 20', child)
  child.send_signal(signal.SIGKILL)
  _util.communicate(child, 60, 'the child killed -9')
  assert child.returncode == -signal.SIGKILL
  ckpts = os.path.join(workdir, 'checkpoints')
  assert any(name.startswith('20.') and 'tmp' in name for name in os.listdir(ckpts))  # half-written
  mngr = checkpoint.manager(ckpts)  # removes the half-written step
  assert mngr.all_steps() == [10]
  assert checkpoint.read_meta(mngr)['model']['widths'] == {'hidden_0': 32, 'hidden_1': 32}
  # This manager removes the half-written step in a background thread: let it finish, or the
  # trainer's own manager races it on the same folder.
  _util.wait_until(
    lambda: not any('tmp' in name for name in os.listdir(ckpts)), 60, 'the removal of step 20'
  )
  summary = train.train_and_evaluate(tiny_config(**{'checkpoint.every': 10}), workdir)
  assert summary['resumed_at'] == [10]
  _assert_same_final_params(workdir, reference)


def _tree_digest(root):
  digest = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      digest[os.path.relpath(path, root)] = hashlib.sha256(open(path, 'rb').read()).hexdigest()
  return digest


def _flip_bytes_of_largest_array_file(step_dir):
  files = [  # the array data files (under d/), not _sharding / _METADATA, which can be larger
    os.path.join(d, f)
    for d, _, fs in os.walk(os.path.join(step_dir, 'arrays'))
    for f in fs
    if os.path.basename(d) == 'd'
  ]
  path = max(files, key=os.path.getsize)
  raw = bytearray(open(path, 'rb').read())
  for i in range(len(raw) // 2, len(raw) // 2 + 16):
    raw[i] ^= 0xFF
  open(path, 'wb').write(bytes(raw))


def _garble_meta(step_dir):
  for d, _, files in os.walk(os.path.join(step_dir, 'meta')):
    for f in files:
      if f != 'commit_success.txt':
        open(os.path.join(d, f), 'w').write('{"format": 1, "step": 60, "arr')


@pytest.mark.parametrize('damage', ['flip_array_bytes', 'garble_meta', 'delete_arrays'])
def test_corrupt_checkpoint_raises_and_is_left_untouched(reference, tmp_path, damage):
  workdir = str(tmp_path)
  shutil.copytree(
    os.path.join(reference['workdir'], 'checkpoints'), os.path.join(workdir, 'checkpoints')
  )
  step_dir = os.path.join(workdir, 'checkpoints', '60')
  {
    'flip_array_bytes': _flip_bytes_of_largest_array_file,
    'garble_meta': _garble_meta,
    'delete_arrays': lambda d: shutil.rmtree(os.path.join(d, 'arrays')),
  }[damage](step_dir)
  before = _tree_digest(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(
    checkpoint.CheckpointCorruptError, match=r'(?s)checkpoints/60.*left untouched'
  ):
    train.train_and_evaluate(tiny_config(), workdir)
  assert _tree_digest(os.path.join(workdir, 'checkpoints')) == before  # nothing replaced


def test_mismatched_config_or_code_is_rejected(reference, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(
    os.path.join(reference['workdir'], 'checkpoints'), os.path.join(workdir, 'checkpoints')
  )
  before = _tree_digest(workdir)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'demp\.peak_lambda.*0\.5.*0\.1'):
    train.train_and_evaluate(tiny_config(**{'demp.peak_lambda': 0.1}), workdir)
  # Keys that do not change the run may differ.
  checkpoint.check_config(reference['meta'], tiny_config(log_every=7, **{'checkpoint.keep': 5}), '')
  # A checkpoint whose arrays do not fit what this code builds (here: another optimizer).
  run, _ = train.init_run(tiny_config(method='dense'))
  mngr = checkpoint.manager(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'does not fit.*opt_state'):
    checkpoint.restore(mngr, checkpoint.read_meta(mngr), run)
  assert _tree_digest(workdir) == before


def test_a_finished_run_resumes_to_the_same_summary(reference, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(
    os.path.join(reference['workdir'], 'checkpoints'), os.path.join(workdir, 'checkpoints')
  )
  summary = train.train_and_evaluate(tiny_config(), workdir)
  ref = reference['summary']
  assert summary['resumed_at'] == [60]
  for key in ('test_accuracy', 'test_loss', 'widths', 'final_params', 'prune_events'):
    assert summary[key] == ref[key], key
  assert summary['segments'] == ref['segments']  # the time segments travel in the checkpoint


def test_reseed_data_resume_starts_a_fresh_stream():
  exact = train.init_run(tiny_config(), start_batch=7)[1]
  reseeded = train.init_run(tiny_config(**{'checkpoint.data_resume': 'reseed'}), start_batch=7)[1]
  consumed = train.init_run(tiny_config())[1]
  for _ in range(7):
    next(consumed)
  expected = next(consumed)
  assert np.array_equal(next(exact)['image'], expected['image'])
  assert not np.array_equal(next(reseeded)['image'], expected['image'])


def test_nan_stops_with_the_step_and_the_last_good_checkpoint(tmp_path):
  """The learning rate jumps ×1e30 at step 12: loss NaN/Inf right after; checkpoint 10 is the last."""
  c = tiny_config(
    **{
      'method': 'dense',
      'optimizer.lr_schedule': 'multistep',
      'checkpoint.every': 5,
      'log_every': 1,
    }
  )
  c.optimizer.lr_kwargs = {'boundaries': [12], 'factor': 1e30}
  with pytest.raises(
    FloatingPointError, match=r'at step 1[2-4]\b.*last good checkpoint is step 10'
  ):
    train.train_and_evaluate(c, str(tmp_path))
  mngr = checkpoint.manager(os.path.join(str(tmp_path), 'checkpoints'))
  assert mngr.latest_step() == 10


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('prune.every', 61, r'prune\.every=61 \(τ\) is larger than num_steps=60'),
    ('colour', 'red', r"unknown config keys \['colour'\]"),
    ('prune.evry', 5, r"unknown config keys \['prune\.evry'\]"),
    ('checkpoint.every', -1, r'checkpoint\.every=-1'),
    ('checkpoint.keep', 0, r'checkpoint\.keep=0'),
    ('checkpoint.data_resume', 'rewind', r"checkpoint\.data_resume='rewind'"),
  ],
)
def test_bad_configs_are_rejected_before_any_compute(key, value, message):
  c = tiny_config()
  c.unlock()
  node = c
  *path, last = key.split('.')
  for p in path:
    node = node[p]
  node[last] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c)


def test_batch_not_divisible_by_device_count_is_rejected():
  with pytest.raises(ValueError, match=r'batch_size=30 is not divisible by the device count 4'):
    parallel.check_batch_size('batch_size', 30, num_devices=4)
  parallel.check_batch_size('batch_size', 32, num_devices=4)


@pytest.mark.parametrize('augment', ['none', 'crop_flip'])
def test_data_position_skip_equals_consuming(augment):
  cfg = data.default_data_config()
  cfg.augment = augment
  it = data.train_iterator(cfg, 32, seed=3)
  consumed = [next(it) for _ in range(60)]  # 1920 examples: crosses an epoch (1437)
  resumed = data.train_iterator(cfg, 32, seed=3, start_batch=41)
  for expected in consumed[41:]:
    got = next(resumed)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)


def test_host_state_round_trips():
  state = {
    'events': [{'step': 20, 'live': {'a': 3}, 'overlap': None, 'x': float('nan')}],
    'memo': {
      'w1': np.arange(6.0).reshape(2, 3),
      (1, 'k'): np.int32(7),
      'key': jax.random.key(5),
      'seen': {('conv_0', 3), ('conv_1', 0)},
    },
    'dead_set': frozenset({('hidden_0', 1), ('hidden_1', 4)}),
    'unit_ids': {'hidden_0': np.array([0, 2, 5])},
  }
  arrays = {}
  encoded = {k: checkpoint._encode(v, arrays, k) for k, v in state.items()}
  decoded = {k: checkpoint._decode(json.loads(json.dumps(v)), arrays) for k, v in encoded.items()}
  assert decoded['dead_set'] == state['dead_set'] and isinstance(decoded['dead_set'], frozenset)
  assert decoded['memo']['seen'] == state['memo']['seen']
  assert np.array_equal(decoded['memo']['w1'], state['memo']['w1'])
  assert decoded['memo'][(1, 'k')] == 7 and decoded['memo'][(1, 'k')].dtype == np.int32
  assert np.array_equal(
    jax.random.key_data(decoded['memo']['key']), jax.random.key_data(state['memo']['key'])
  )
  assert np.array_equal(decoded['unit_ids']['hidden_0'], [0, 2, 5])
  assert decoded['events'][0]['live'] == {'a': 3} and np.isnan(decoded['events'][0]['x'])
  with pytest.raises(TypeError, match=r'run\.memo\.fn'):
    checkpoint._encode({'fn': len}, {}, 'run.memo')


def test_keys_added_since_the_checkpoint_take_their_defaults(tmp_path):
  """A run written before a config key existed resumes when the key is at its default."""
  from demp.trainer import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  saved = checkpoint.config_json(config)
  del saved['prune']['switch_after']  # as written by code older than the key
  del saved['demp']['noise_prng']
  checkpoint.check_config({'config': saved}, config, 'ckpt')  # no error: both at defaults
  (tmp_path / 'run.json').write_text(json.dumps({'config': saved}))
  (tmp_path / 'metrics.jsonl').write_text('{"step": 10, "loss": 1.0}\n')
  os.makedirs(tmp_path / 'checkpoints' / '10')
  assert workdir_lib.check(str(tmp_path), config) is None  # resumes
  config.prune.switch_after = 0.5  # set by the user: another run
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'prune.switch_after: checkpoint'):
    checkpoint.check_config({'config': saved}, config, 'ckpt')
  problem = workdir_lib.check(str(tmp_path), config)
  assert '1 key differs: prune.switch_after' in problem and 'noise_prng' not in problem
