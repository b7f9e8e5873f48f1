"""Fault injection: nothing lost, nothing silent.

Each test does the fault for real (a second process on a locked workdir, kill -9
during a save and during a prune event, corrupt checkpoints, bad data files, a
different config in a used workdir, a collapsing layer, models outside the
pruning protocol) and asserts the message AND that no file in the workdir
changed (paths, sizes, mtimes and hashes before and after).
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from configs import quickstart
from demp.trainer import checkpoint, train, workdir
from demp import data, deadunits, surgery
from demp.models import common, mlp, vit
from demp import protocol
from demp.trainer import demp_policy
from demp.trainer import config as config_lib
from tests import _util

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_OPTIONS = {
  'jax_persistent_cache_min_compile_time_secs': 0,
  'jax_persistent_cache_min_entry_size_bytes': -1,
}


def tiny_config(**overrides):
  """DemP on a 16-16 MLP over digits: 8 steps, τ = 4, a checkpoint every 4 steps."""
  c = quickstart.get_config()
  c.num_steps = 8
  c.batch_size = 16
  c.model.widths = (16, 16)
  c.prune.every = 4
  c.prune.num_examples = 32
  c.prune.batch_size = 32
  c.log_every = 2
  c.eval_batch_size = 360
  c.progress_bar = False
  c.demp.peak_lambda = 0.5
  c.demp.schedule = 'constant'  # units die within 4 steps
  c.optimizer.learning_rate = 0.1
  c.checkpoint.every = 4
  c.checkpoint.async_save = False
  return _util.set_keys(c, overrides)


def snapshot(root):
  """``relative path -> (size, mtime_ns, sha256)`` of every file (and ``dir/`` of every folder)."""
  out = {}
  for dirpath, dirs, files in os.walk(root):
    for d in dirs:
      out[os.path.relpath(os.path.join(dirpath, d), root) + '/'] = None
    for name in files:
      path = os.path.join(dirpath, name)
      st = os.stat(path)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = (
          st.st_size,
          st.st_mtime_ns,
          hashlib.sha256(f.read()).hexdigest(),
        )
  return out


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent XLA cache shared by this module's runs and child processes (time only)."""
  path = str(tmp_path_factory.mktemp('xla_cache'))
  saved = {k: getattr(jax.config, k) for k in ('jax_compilation_cache_dir', *CACHE_OPTIONS)}
  for k, v in {'jax_compilation_cache_dir': path, **CACHE_OPTIONS}.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield path
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


class _Bar:
  """Records the progress bar's postfixes."""

  def __init__(self):
    self.postfixes = []

  def update(self, n):
    pass

  def set_postfix(self, **kw):
    self.postfixes.append(kw)

  def close(self):
    pass


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished run (checkpoints at 4 and 8), its progress-bar postfixes recorded."""
  path = str(tmp_path_factory.mktemp('finished'))
  bar = _Bar()
  progress = train._progress
  train._progress = lambda config: bar
  try:
    summary = train.train_and_evaluate(tiny_config(), path)
  finally:
    train._progress = progress
  return {'workdir': path, 'summary': summary, 'bar': bar}


def _copy(src, dst):
  shutil.copytree(src, dst, copy_function=shutil.copy2)
  return dst


# ----------------------------------------------------------------------------
# The workdir: identity, overwrite, the progress bar's last widths.


def test_the_progress_bar_ends_on_the_final_widths(finished):
  summary, bar = finished['summary'], finished['bar']
  assert summary['events'][-1]['step'] == 8
  final = sum(summary['widths'].values())
  assert final < 32  # the last prune removed units
  assert bar.postfixes[-1]['live'] == f'{final}/32'
  assert set(os.listdir(finished['workdir'])) >= {'.lock', 'run.json', 'summary.json'}
  run = json.load(open(os.path.join(finished['workdir'], 'run.json')))
  assert run['fingerprint'] == workdir.fingerprint(tiny_config())
  assert open(os.path.join(finished['workdir'], '.lock')).read() == ''  # released


def test_a_different_config_in_a_used_workdir_is_refused_then_moved_aside(finished, tmp_path):
  path = _copy(finished['workdir'], str(tmp_path / 'run'))
  before = snapshot(path)
  with pytest.raises(
    workdir.WorkdirConflictError,
    match=r'different config.*demp\.peak_lambda: 0\.5 there, 0\.1 now.*'
    r'--overwrite',
  ):
    train.train_and_evaluate(tiny_config(**{'demp.peak_lambda': 0.1}), path)
  assert snapshot(path) == before
  # Bookkeeping keys do not make another run: the same config with log_every changed resumes.
  assert workdir.fingerprint(tiny_config(log_every=1, progress_bar=True)) == workdir.fingerprint(
    tiny_config()
  )
  summary = train.train_and_evaluate(
    tiny_config(**{'demp.peak_lambda': 0.1, 'num_steps': 4}), path, overwrite=True
  )
  assert summary['steps'] == 4
  moved = [d for d in os.listdir(path) if d.startswith('previous-')]
  assert len(moved) == 1
  kept = snapshot(os.path.join(path, moved[0]))  # moved, byte for byte, never deleted
  assert kept == {k: v for k, v in before.items() if k != '.lock'}


def test_a_finished_run_without_checkpoint_is_refused(finished, tmp_path):
  path = _copy(finished['workdir'], str(tmp_path / 'run'))
  shutil.rmtree(os.path.join(path, 'checkpoints'))
  before = snapshot(path)
  with pytest.raises(workdir.WorkdirConflictError, match=r'is complete.*--overwrite'):
    train.train_and_evaluate(tiny_config(), path)
  assert snapshot(path) == before
  # A run that stopped without a checkpoint (no summary): nothing to resume, refused too; a
  # .lock the refused start had to create is removed again.
  os.remove(os.path.join(path, 'summary.json'))
  os.remove(os.path.join(path, '.lock'))
  before = snapshot(path)
  with pytest.raises(
    workdir.WorkdirConflictError, match=r'stopped after step 8 without a checkpoint'
  ):
    train.train_and_evaluate(tiny_config(), path)
  assert snapshot(path) == before


@pytest.mark.parametrize('damage', ['flip_array_bytes', 'garble_meta', 'delete_arrays'])
def test_a_corrupt_checkpoint_changes_nothing(finished, tmp_path, damage):
  """Refused before metrics.jsonl is truncated, TensorBoard opened or run.json written."""
  path = _copy(finished['workdir'], str(tmp_path / 'run'))
  step_dir = os.path.join(path, 'checkpoints', '8')
  if damage == 'flip_array_bytes':
    files = [  # the array data files (under d/), not _sharding / _METADATA, which can be larger
      os.path.join(d, f)
      for d, _, fs in os.walk(os.path.join(step_dir, 'arrays'))
      for f in fs
      if os.path.basename(d) == 'd'
    ]
    # One byte in every 64 of every data file: a file may hold bytes no array refers to (its
    # layout varies run to run), so a flip in one place can miss every array.
    for target in files:
      raw = bytearray(open(target, 'rb').read())
      for i in range(0, len(raw), 64):
        raw[i] ^= 0xFF
      open(target, 'wb').write(bytes(raw))
  elif damage == 'garble_meta':
    for d, _, files in os.walk(os.path.join(step_dir, 'meta')):
      for f in files:
        if f != 'commit_success.txt':
          open(os.path.join(d, f), 'w').write('{"format": 1, "step": 8, "arr')
  else:
    shutil.rmtree(os.path.join(step_dir, 'arrays'))
  before = snapshot(path)
  with pytest.raises(checkpoint.CheckpointCorruptError, match=r'(?s)checkpoints/8.*left untouched'):
    train.train_and_evaluate(tiny_config(), path)
  assert snapshot(path) == before


# ----------------------------------------------------------------------------
# Data files.


def _npz_config(path):
  c = tiny_config(**{'data.source': 'npz', 'data.path': path, 'data.normalize': False})
  return c


def _write_bad(kind, path):
  rng = np.random.default_rng(0)
  good = dict(
    train_images=rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8),
    train_labels=np.arange(8) % 3,
    test_images=np.zeros((4, 4, 4, 1), np.uint8),
    test_labels=np.arange(4) % 3,
  )
  if kind == 'empty':
    open(path, 'wb').close()
  elif kind == 'text':
    open(path, 'w').write('train_images,train_labels\n1,2\n')
  elif kind == 'npy':
    np.save(open(path, 'wb'), good['train_images'])
  elif kind == 'truncated':
    np.savez(path, **good)
    raw = open(path, 'rb').read()
    open(path, 'wb').write(raw[: len(raw) // 2])
  elif kind == 'pickled':
    np.savez(path, **{**good, 'train_labels': np.array([{'x': 1}] * 8, dtype=object)})
  elif kind == 'strings':
    np.savez(path, **{**good, 'train_labels': np.array(['cat'] * 8)})
  elif kind == 'missing_arrays':
    np.savez(path, train_images=good['train_images'])


@pytest.mark.parametrize(
  'kind,message',
  [
    ('empty', r'is empty \(0 bytes\)'),
    ('text', r'is not an \.npz \(zip\) archive'),
    ('npy', r'is a single \.npy array'),
    ('truncated', r'is truncated or corrupt'),
    ('pickled', r'holds pickled \(object-dtype\) arrays, which are refused'),
    ('strings', r'has train_labels of dtype <U3'),
    ('missing_arrays', r"lacks arrays \['train_labels', 'test_images', 'test_labels'\]"),
  ],
)
def test_bad_data_files_are_refused_before_the_workdir_is_touched(
  finished, tmp_path, kind, message
):
  bad = str(tmp_path / f'{kind}.npz')
  _write_bad(kind, bad)
  used = _copy(finished['workdir'], str(tmp_path / 'used'))
  fresh = str(tmp_path / 'fresh')
  before = snapshot(used)
  for path in (used, fresh):
    with pytest.raises(ValueError, match=message) as e:
      train.train_and_evaluate(_npz_config(bad), path)
    assert bad in str(e.value) and 'train_images [N, H, W, C]' in str(e.value)
    assert 'allow_pickle' not in str(e.value)  # never suggested for data
  assert snapshot(used) == before
  assert not os.path.exists(fresh)


def test_a_valid_tiny_npz_loads(tmp_path):
  path = str(tmp_path / 'ok.npz')
  rng = np.random.default_rng(0)
  np.savez(
    path,
    train_images=rng.integers(0, 256, (8, 4, 4, 1), dtype=np.uint8),
    train_labels=np.arange(8) % 3,
    test_images=np.zeros((4, 4, 4, 1), np.uint8),
    test_labels=np.arange(4) % 3,
  )
  info = data.get_info(_npz_config(path).data)
  assert info.image_shape == (4, 4, 1) and info.num_train == 8  # data.name cifar10: 10 classes


# ----------------------------------------------------------------------------
# Processes: the lock, kill -9 during a prune event and during a save.


@pytest.fixture
def children():
  started = []
  yield started
  for child in started:
    if child.poll() is None:
      child.kill()
      child.wait()


def _child(code, *, argv=None):
  env = {
    **os.environ,
    'PYTHONPATH': REPO,
    'JAX_PLATFORMS': 'cpu',
    'JAX_COMPILATION_CACHE_DIR': jax.config.jax_compilation_cache_dir,
    **{k.upper(): str(v) for k, v in CACHE_OPTIONS.items()},
  }
  prelude = f'import sys; sys.path.insert(0, {os.path.join(REPO, "tests")!r})\n'
  cmd = [sys.executable, '-c', prelude + textwrap.dedent(code)] if argv is None else argv
  return subprocess.Popen(
    cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def _wait_for(path, child, what, seconds=240):
  _util.wait_until(lambda: os.path.exists(path), seconds, what, child)


CLI_ARGS = [
  '--config.num_steps=8',
  '--config.batch_size=16',
  "--config.model.widths=(16,16)",
  '--config.prune.every=4',
  '--config.prune.num_examples=32',
  '--config.prune.batch_size=32',
  '--config.log_every=2',
  '--config.eval_batch_size=360',
  '--config.progress_bar=False',
  '--config.demp.peak_lambda=0.5',
  '--config.demp.schedule=constant',
  '--config.optimizer.learning_rate=0.1',
  '--config.checkpoint.every=4',
  '--config.checkpoint.async_save=False',
]


def test_second_process_is_refused_then_kill9_during_a_prune_event_resumes(
  tmp_path, children, caplog
):
  """Process 1 (the CLI) pauses inside the prune event of step 8 (checkpoint 4 written);
  process 2 on the same workdir is refused and changes nothing; process 1 is killed -9;
  the run resumes from step 4, taking over the stale lock, and ends like an unbroken run."""
  path = str(tmp_path / 'run')
  marker = str(tmp_path / 'pruning8')
  first = _child(f"""
      import time
      from absl import app
      from demp.trainer import train
      from scripts import train as cli
      prune = train.Run.prune
      def prune_slowly(self, keeps, *args, **kwargs):
        if self.step == 8:                       # inside the prune event of step 8
          open({marker!r}, 'w').close()
          time.sleep(10**6)  # until the test kills it
        return prune(self, keeps, *args, **kwargs)
      train.Run.prune = prune_slowly
      sys.argv = ['train', '--config', 'configs/quickstart.py', '--workdir', {path!r},
                  *{CLI_ARGS!r}]
      app.run(cli.main)
  """)
  children.append(first)
  _wait_for(marker, first, 'the prune event of step 8')
  assert open(os.path.join(path, '.lock')).read().strip() == str(first.pid)
  before = snapshot(path)
  second = _child(
    None,
    argv=[
      sys.executable,
      '-m',
      'scripts.train',
      '--config',
      'configs/quickstart.py',
      '--workdir',
      path,
      *CLI_ARGS,
    ],
  )
  children.append(second)
  out, _ = _util.communicate(second, 240, 'the second process on the workdir')
  assert second.returncode != 0
  assert f'is in use by another run (process {first.pid} holds' in out, out[-3000:]
  assert snapshot(path) == before

  first.send_signal(signal.SIGKILL)
  _util.communicate(first, 60, 'the first process, killed -9')
  assert first.returncode == -signal.SIGKILL
  assert checkpoint.manager(os.path.join(path, 'checkpoints')).all_steps() == [4]
  with caplog.at_level(logging.WARNING):
    summary = train.train_and_evaluate(tiny_config(), path)
  assert f'taking over the lock left by process {first.pid}, which is gone' in caplog.text
  assert 'resumed from step 4' in caplog.text
  assert summary['resumed_at'] == [4]
  assert [e['step'] for e in summary['events']] == [4, 8]
  records = [json.loads(line) for line in open(os.path.join(path, 'metrics.jsonl'))]
  steps = [r['step'] for r in records if 'loss' in r]
  assert steps == [2, 4, 6, 8]  # records after checkpoint 4 dropped, no duplicates


def test_kill9_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, children, capfd):
  path = str(tmp_path / 'run')
  marker = str(tmp_path / 'saving8')
  child = _child(f"""
      import time
      from orbax.checkpoint._src.path import atomicity
      from demp.trainer import train
      from test_faults import tiny_config
      finalize = atomicity.AtomicRenameTemporaryPath.finalize
      async def finalize_slowly(self):
        if self.get_final().name == '8':         # arrays written, not yet committed
          open({marker!r}, 'w').close()
          time.sleep(10**6)  # until the test kills it
        return await finalize(self)
      atomicity.AtomicRenameTemporaryPath.finalize = finalize_slowly
      train.train_and_evaluate(tiny_config(), {path!r})
  """)
  children.append(child)
  _wait_for(marker, child, 'the save of step 8')
  child.send_signal(signal.SIGKILL)
  _util.communicate(child, 60, 'the child killed -9')
  summary = train.train_and_evaluate(tiny_config(), path)
  assert 'resumed from step 4' in capfd.readouterr().out
  assert summary['resumed_at'] == [4]
  assert checkpoint.manager(os.path.join(path, 'checkpoints')).all_steps() == [4, 8]


# ----------------------------------------------------------------------------
# A collapsing layer.


def _collapsed_run(on_collapse):
  run, _ = train.init_run(tiny_config(**{'prune.on_collapse': on_collapse}))
  params = flax.core.unfreeze(run.state['params'])
  params['norm_1']['scale'] = jnp.zeros_like(params['norm_1']['scale'])  # relu(BN) = relu(-1) = 0
  params['norm_1']['bias'] = -jnp.ones_like(params['norm_1']['bias'])
  run.state = {**run.state, 'params': params}
  run.step = 4
  return run


def test_a_collapsing_layer_warns(caplog):
  run = _collapsed_run('warn')
  with caplog.at_level(logging.WARNING):
    demp_policy.prune_dead(run)
  assert "layer collapse at step 4: every unit of ['hidden_1'] is dead" in caplog.text
  assert run.events[-1]['collapsed'] == ['hidden_1']
  assert run.model.widths['hidden_1'] == 1  # kept at prune.min_width


def test_a_collapsing_layer_stops_when_asked():
  run = _collapsed_run('stop')
  with pytest.raises(deadunits.LayerCollapseError, match=r"step 4: every unit of \['hidden_1'\]"):
    demp_policy.prune_dead(run)
  assert run.model.widths['hidden_1'] == 16 and not run.events  # nothing pruned
  with pytest.raises(ValueError, match=r"prune\.on_collapse='explode' is not one of"):
    config_lib.validate_config(tiny_config(**{'prune.on_collapse': 'explode'}))


# ----------------------------------------------------------------------------
# Library errors.


class NoGroups(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    return nn.Dense(4)(x)


class BiasForgotten(mlp.MLP):
  """An MLP without norm whose groups forget the producer's bias slice."""

  def unit_groups(self):
    return tuple(
      protocol.UnitGroup(
        g.name, g.sites, tuple(s for s in g.producers if s.path[-1] != 'bias'), g.consumers
      )
      for g in super().unit_groups()
    )


class WrongConsumerAxis(mlp.MLP):
  def unit_groups(self):
    return tuple(
      protocol.UnitGroup(g.name, g.sites, g.producers, (protocol.Slice(g.consumers[0].path, -1),))
      for g in super().unit_groups()
    )


class LayerNormMLP(nn.Module):
  """Dense -> LayerNorm -> relu -> head: the units feed a normalization over the unit axis."""

  widths: flax.core.FrozenDict
  slice_norm: bool = True
  activation: str = 'relu'

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Dense(self.widths['h'], name='dense')(x.reshape((x.shape[0], -1)))
    x = deadunits.probe(self, 'h', nn.relu(nn.LayerNorm(name='ln')(x)))
    return nn.Dense(3, name='head')(x)

  def unit_groups(self):
    norm = (
      (protocol.Slice(('ln', 'scale'), 0), protocol.Slice(('ln', 'bias'), 0))
      if self.slice_norm
      else ()
    )
    return (
      protocol.UnitGroup(
        'h',
        (('h',),),
        protocol.param_slices('dense', bias=True) + norm,
        protocol.param_slices('head', in_axis=0),
      ),
    )


def _variables(model, x):
  return model.init(jax.random.key(0), x, train=False)


def _keep_half(model):
  return {name: np.arange(w) % 2 == 0 for name, w in model.widths.items()}


X = jnp.ones((2, 4, 4, 1))


def test_a_model_without_unit_groups_is_told_the_protocol():
  model = NoGroups()
  variables = _variables(model, X)
  for call in (
    lambda: surgery.prune(model, variables, {}, {}),
    lambda: deadunits.dead_unit_stats(model, variables, X),
  ):
    with pytest.raises(
      TypeError,
      match=r'NoGroups cannot be pruned: it lacks unit_groups\(\) and '
      r'widths.*docs/reliability\.md',
    ):
      call()


def test_a_forgotten_bias_slice_is_named_when_prune_is_called():
  model = BiasForgotten(widths=common.frozen_widths(['hidden_0'], [6]), num_classes=3, norm=False)
  variables = _variables(model, X)
  with pytest.raises(
    ValueError,
    match=r"group 'hidden_0' \(width 6\) misses the params leaf "
    r"'dense_0/bias' \(shape \(6,\)\).*producer 'dense_0/kernel'",
  ):
    surgery.prune(model, variables, {}, _keep_half(model))


def test_a_wrong_consumer_axis_names_the_leaf_and_the_group():
  model = WrongConsumerAxis(
    widths=common.frozen_widths(['hidden_0'], [6]), num_classes=4, norm=False
  )
  variables = _variables(model, X)
  with pytest.raises(
    ValueError,
    match=r"unit group 'hidden_0' \(width 6\): its consumer slice of "
    r"params leaf 'head/kernel' \(shape \(6, 4\)\) uses axis -1",
  ):
    surgery.prune(model, variables, {}, _keep_half(model))


def test_a_slice_of_a_missing_leaf_is_named():
  class Typo(mlp.MLP):
    def unit_groups(self):
      g = super().unit_groups()[0]
      return (
        protocol.UnitGroup(g.name, g.sites, g.producers, (protocol.Slice(('haed', 'kernel'), 0),)),
      )

  model = Typo(widths=common.frozen_widths(['hidden_0'], [6]), num_classes=3, norm=False)
  with pytest.raises(
    ValueError,
    match=r"consumer slice names the leaf 'haed/kernel', which is in "
    r"no collection",
  ):
    surgery.prune(model, _variables(model, X), {}, _keep_half(model))


def test_units_behind_a_layernorm_are_refused_or_flagged(caplog):
  model = LayerNormMLP(widths=flax.core.FrozenDict(h=6))
  variables = _variables(model, X)
  keeps = _keep_half(model)
  for example in (X, None):  # traced, or by the params' look without input
    with pytest.raises(
      protocol.InexactPruneError,
      match=r"pruning \['h'\] is inexact: h: its "
      r"slices include (LayerNorm )?'ln'",
    ):
      surgery.prune(model, variables, {}, keeps, example_input=example)
  with caplog.at_level(logging.WARNING):
    pruned, new_variables, _ = surgery.prune(
      model, variables, {}, keeps, example_input=X, allow_inexact=True
    )
  assert 'is inexact' in caplog.text and pruned.widths['h'] == 3
  # The function does change: the LayerNorm's statistics included the removed units.
  full = model.apply(variables, X, train=False)
  cut = pruned.apply(new_variables, X, train=False)
  assert np.max(np.abs(full - cut)) > 1e-4
  # The LayerNorm left out of the group: the pruned shapes do not fit, named before any apply.
  model = LayerNormMLP(widths=flax.core.FrozenDict(h=6), slice_norm=False)
  with pytest.raises(
    ValueError,
    match=r"params leaf 'ln/(scale|bias)' has shape \(6,\) but the "
    r"model at the new widths expects \(3,\): unit group \['h'\]",
  ):
    surgery.prune(model, variables, {}, keeps, example_input=X)


def test_the_vit_mlp_units_still_prune_exactly():
  """fc1 -> GELU/ReLU -> fc2: no LayerNorm over the hidden units; the LayerNorms are elsewhere."""
  model = vit.make(10, hidden_dim=16, depth=1, num_heads=2, mlp_dim=12, patch_size=4)
  x = jnp.ones((2, 8, 8, 3))
  variables = _variables(model, x)
  tx = optax.adam(1e-3)
  pruned, new_variables, _ = surgery.prune(
    model, variables, tx.init(variables['params']), _keep_half(model), example_input=x
  )
  assert dict(pruned.widths) == {'mlp_0': 6}
  assert pruned.apply(new_variables, x, train=False).shape == (2, 10)


# ----------------------------------------------------------------------------
# Widths from the command line.


def test_widths_from_a_string_or_a_tuple_flag():
  assert common.parse_widths('32,64,128') == [32, 64, 128]
  assert common.parse_widths('(32, 64)') == [32, 64]
  assert common.parse_widths('hidden_0=8,hidden_1=4') == {'hidden_0': 8, 'hidden_1': 4}
  assert dict(mlp.make(10, widths='8,4').widths) == {'hidden_0': 8, 'hidden_1': 4}
  with pytest.raises(ValueError, match=r"model\.widths='8,x'"):
    mlp.make(10, widths='8,x')
  out = _util.run(
    [
      sys.executable,
      '-c',
      textwrap.dedent('''
      from absl import app
      from ml_collections import config_flags
      config = config_flags.DEFINE_config_file('config', lock_config=True)
      app.run(lambda argv: print('WIDTHS', tuple(config.value.model.widths)))
  '''),
      '--config',
      'configs/quickstart.py',
      '--config.model.widths=(32,8)',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    seconds=120,
    env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert 'WIDTHS (32, 8)' in out.stdout, out.stderr[-2000:]
