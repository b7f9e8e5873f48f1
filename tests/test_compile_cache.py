"""The persistent compilation cache of a run, its counts, and steps compiled once per shape."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from demp.trainer import compile_cache, steps, train
from tests import _util
from demp import deadunits, surgery
from demp.models import build
from configs import quickstart
from tests.test_train import _tiny_config
from demp.trainer import config as config_lib

jax.config.update('jax_numpy_rank_promotion', 'raise')


@pytest.fixture
def npz(tmp_path):
  rng = np.random.default_rng(0)
  path = tmp_path / 'tiny.npz'
  np.savez(
    path,
    train_images=rng.integers(0, 255, (80, 8, 8, 3), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 80),
    test_images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 20),
  )
  return str(path)


def test_a_second_identical_run_compiles_nothing(tmp_path, npz):
  cache = str(tmp_path / 'shared_cache')
  before = jax.config.jax_compilation_cache_dir
  c = _tiny_config(**{'data.source': 'npz', 'data.path': npz, 'compilation_cache': cache})
  first = train.train_and_evaluate(c, str(tmp_path / 'a'))
  second = train.train_and_evaluate(c, str(tmp_path / 'b'))  # fresh workdir, same cache
  assert first['prune_events_effective'] >= 1  # two architectures: two train steps
  # Relative to each run's workdir, which is a sibling of the cache.
  assert (
    first['compile_cache_dir'] == second['compile_cache_dir'] == os.path.join('..', 'shared_cache')
  )
  assert first['compile_cache_misses'] > 0 and first['compiles'] > 0
  assert os.listdir(cache)
  # Train steps (new closures each run), eval step and death checks: all from the cache.
  assert second['compile_cache_misses'] == 0 and second['compiles'] == 0
  assert second['compile_cache_hits'] >= 2
  assert second['widths'] == first['widths']
  assert second['test_loss'] == first['test_loss']  # the cached executables compute the same
  assert jax.config.jax_compilation_cache_dir == before  # the settings found are restored


def test_workdir_cache_and_off(tmp_path, npz):
  c = _tiny_config(**{'data.source': 'npz', 'data.path': npz, 'num_steps': 10, 'prune.every': 10})
  assert c.compilation_cache == 'workdir'  # the default
  summary = train.train_and_evaluate(c, str(tmp_path / 'on'))
  assert summary['compile_cache_dir'] == 'jax_cache'  # relative to the workdir
  assert summary['compile_cache_misses'] > 0 and os.listdir(tmp_path / 'on' / 'jax_cache')
  c.compilation_cache = ''
  summary = train.train_and_evaluate(c, str(tmp_path / 'off'))
  assert summary['compile_cache_dir'] == ''
  assert summary['compile_cache_hits'] == summary['compile_cache_misses'] == 0
  assert summary['compiles'] > 0  # the new train-step closure compiles, uncached
  assert not os.path.exists(tmp_path / 'off' / 'jax_cache')


def test_use_switches_directories_and_restores(tmp_path):
  f = lambda x: jnp.sin(x) * 3.0 + 1.0
  x = jnp.arange(4.0)
  with compile_cache.use(str(tmp_path / 'one'), 'unused') as counts:
    jax.jit(f).lower(x).compile()  # the AOT path of demp.trainer.run.Run.compile
    assert counts.summary()['compile_cache_misses'] == 1
  with compile_cache.use('workdir', str(tmp_path / 'w')) as counts:
    jax.jit(lambda x: f(x)).lower(x).compile()  # a new closure, another directory: compiled
    assert counts.summary() == {
      'compile_cache_dir': 'jax_cache',
      'compile_cache_hits': 0,
      'compile_cache_misses': 1,
      'compiles': 1,
    }
  with compile_cache.use(str(tmp_path / 'one'), 'unused') as counts:
    jax.jit(lambda x: f(x)).lower(x).compile()  # back to the first directory: read
    got = counts.summary()
    assert (got['compile_cache_hits'], got['compile_cache_misses'], got['compiles']) == (1, 0, 0)
  assert compile_cache.summary() == {}


@pytest.mark.parametrize(
  'value, message',
  [
    ('wrokdir', "compilation_cache='wrokdir' is not a path"),
    ('Workdir', "compilation_cache='Workdir' is not a path"),
  ],
)
def test_bad_cache_setting_names_the_key(value, message):
  c = _tiny_config(compilation_cache=value)
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(c)


def test_cache_setting_that_is_a_file_is_refused(tmp_path):
  (tmp_path / 'f').write_text('')
  c = _tiny_config(compilation_cache=str(tmp_path / 'f'))
  with pytest.raises(ValueError, match='is a file, not a directory'):
    config_lib.validate_config(c)
  with pytest.raises(ValueError, match='must be a string'):
    compile_cache.check(None)
  for ok in ('', 'workdir', '~/jax_cache', './jax_cache', str(tmp_path)):
    compile_cache.check(ok)


def _count_compiles(fn):
  with compile_cache.use('', 'unused') as counts:
    jax.block_until_ready(fn())
    return counts.summary()['compiles']


def test_eval_step_and_death_check_compile_once_per_shape():
  model = build('convnet', 10, widths=[6, 8], head='global')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  batch = {
    'image': jax.random.normal(jax.random.key(1), (16, 8, 8, 3)),
    'label': jnp.arange(16) % 10,
    'mask': jnp.ones(16),
  }
  evaluate = lambda m, v: steps.make_eval_step(m)(v, batch)
  assert _count_compiles(lambda: evaluate(model, variables)) >= 1
  again = build('convnet', 10, widths=[6, 8], head='global')  # an equal model, rebuilt
  assert _count_compiles(lambda: evaluate(again, variables)) == 0
  keeps = {'conv_0': np.arange(6) < 4, 'conv_1': np.ones(8, bool)}
  small, small_vars, _ = surgery.prune(model, variables, {}, keeps)
  assert _count_compiles(lambda: evaluate(small, small_vars)) >= 1  # a new shape: compiled
  assert _count_compiles(lambda: evaluate(small, small_vars)) == 0
  check = lambda m, v: deadunits.unit_stats(m, v, batch['image'], batch_size=8)
  assert _count_compiles(lambda: check(model, variables)) >= 1
  assert _count_compiles(lambda: check(again, variables)) == 0


def _quickstart_demp(**overrides):
  """The quickstart's DemP run, short: 60 steps, a check every 20, a λ that kills units."""
  c = quickstart.get_config()
  c.num_steps, c.prune.every, c.log_every = 60, 20, 20
  c.demp.schedule, c.demp.peak_lambda = 'constant', 0.5  # units die from the first check on
  c.optimizer.learning_rate = 0.05
  c.progress_bar, c.compilation_cache, c.checkpoint.every = False, '', 0
  return _util.set_keys(c, overrides)


def test_compiles_per_architecture_within_budget(tmp_path):
  """Per architecture: a train step, its finiteness check, a death check, one silencing.

  Everything a prune event runs is compiled for an architecture once, in the
  background; the switch slices on the host and compiles nothing.
  """
  summary = train.train_and_evaluate(_quickstart_demp(), str(tmp_path / 'run'))
  assert summary['prune_events_effective'] >= 2  # three architectures at least
  with open(tmp_path / 'run' / 'summary.json') as f:
    written = json.load(f)
  by_function, by_arch = written['compiles_by_function'], written['compiles_by_architecture']
  assert sum(by_function.values()) == written['compiles']  # every compile is attributed
  widths = [a['widths'] for a in by_arch]
  assert len(widths) == len({tuple(sorted(w.items())) for w in widths})  # one record each
  assert widths[0] == written['dense_widths'] and widths[-1] == written['widths']
  for arch in by_arch:
    assert arch['count'] <= 4, arch
    assert arch['count'] == sum(arch['functions'].values())
    assert arch['functions'].get('silence', 0) <= 1, arch  # one program, any keep-masks
    assert (
      arch['functions'].get('train_step', 0) <= 1 and arch['functions'].get('eval_step', 0) <= 1
    )
  assert by_function['silence'] <= len(by_arch)
  assert by_function['switch'] == 0  # sliced with NumPy
  assert by_function['other'] == 0, written['compiles_other']


def test_known_activations_map_zero_to_zero_as_tabulated():
  from demp.models import common

  for name, fn in common.ACTIVATIONS.items():
    assert surgery.ZERO_AT_ZERO[name] == (float(fn(jnp.zeros(()))) == 0.0), name


def test_silence_compiles_once_for_any_keep_masks():
  model = build('convnet', 10, widths=[6, 8], head='global')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  opt_state = {'mu': variables['params']}
  compiled = surgery.compile_silence(model, variables, opt_state)
  for seed in range(3):
    keeps = {'conv_0': np.random.default_rng(seed).random(6) < 0.5}
    want = surgery.silence(model, variables, opt_state, keeps)
    with compile_cache.use('', 'unused') as counts:
      got = surgery.silence(model, variables, opt_state, keeps, compiled=compiled)
      assert counts.summary()['compiles'] == 0
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), got, want))
