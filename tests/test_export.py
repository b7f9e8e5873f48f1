"""Export of a finished run: the jax.export artifact reproduces the run's final eval logits in a
fresh process without demp or flax, BN folding, load_exported, the benchmark, and the errors."""

import json
import os
import re
import sys
import textwrap

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # pylint: disable=g-import-not-at-top
import numpy as np
import pytest
from absl import flags
from jax.experimental.compilation_cache import compilation_cache

from tools import benchmark
from demp.trainer import checkpoint, methods, train
from demp import data, export
from demp.trainer import export as run_export
from tools import export_benchmark
from demp.trainer import config as config_lib
from tests import _util

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE = (16, 16, 3)
MODELS = {
  'convnet': {'name': 'convnet', 'widths': [8, 16], 'head': 'flatten'},
  'resnet18': {'name': 'resnet18', 'width_multiplier': 1 / 16, 'prune_stream': True},
  'vit': {
    'name': 'vit',
    'hidden_dim': 16,
    'depth': 2,
    'num_heads': 2,
    'mlp_dim': 32,
    'patch_size': 8,
  },
}
EXPORTS = [('convnet', True), ('resnet18', False), ('resnet18', True), ('vit', False)]
METHOD = 'demp_forced_prune'


def _forced_prune(run, step):
  """DemP's surgery on a random half of every group (the death check would need many steps)."""
  run.prune(benchmark.random_keeps(run.model, 0.5, seed=step), reason='test')


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent XLA cache for this module (the unfinished run repeats a run's compiles)."""
  options = {
    'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('xla_cache')),
    'jax_persistent_cache_min_compile_time_secs': 0,
    'jax_persistent_cache_min_entry_size_bytes': -1,
  }
  saved = {k: getattr(jax.config, k) for k in options}
  for k, v in options.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()
  yield
  for k, v in saved.items():
    jax.config.update(k, v)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module', autouse=True)
def forced_method():
  """DemP's optimizer (penalty + live noise) with a hook that always removes units."""
  methods.register(
    METHOD,
    methods.Method(
      optimizer=methods.get('demp').optimizer, hook=_forced_prune, when=methods.prune_steps
    ),
  )
  yield
  del methods._REGISTRY[METHOD]  # pylint: disable=protected-access


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  rng = np.random.default_rng(0)
  path = str(tmp_path_factory.mktemp('npz') / 'tiny.npz')
  np.savez(
    path,
    train_images=rng.integers(0, 256, (48, *IMAGE), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 48),
    test_images=rng.integers(0, 256, (24, *IMAGE), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 24),
  )
  return path


def tiny_config(model: str, npz: str):
  """2 steps, half of every group's units removed at the end; the final checkpoint is step 2."""
  c = config_lib.base_config()
  c.method = METHOD
  c.model = dict(MODELS[model])
  c.data.source, c.data.name, c.data.path = 'npz', 'cifar10', npz
  c.batch_size = 16
  c.num_steps = 2
  c.prune.every = 2
  c.prune.num_examples = 16
  c.prune.batch_size = 16
  c.log_every = 2
  c.eval_batch_size = 24
  c.progress_bar = False
  c.checkpoint.every = 2
  return c


@pytest.fixture(scope='module')
def runs(tiny_npz, tmp_path_factory):
  """Each model trained; its final eval logits computed from the final checkpoint."""
  out = {}
  for name in MODELS:
    config = tiny_config(name, tiny_npz)
    workdir = str(tmp_path_factory.mktemp(f'run_{name}'))
    summary = train.train_and_evaluate(config, workdir)
    assert sum(summary['widths'].values()) < sum(summary['dense_widths'].values())
    model, variables, meta = checkpoint.load(workdir)
    assert meta['step'] == 2 and dict(model.widths) == summary['widths']
    (batch,) = list(data.eval_batches(config.data, 'test', 24))
    logits = np.asarray(
      jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, batch['image'])
    )
    # These are the logits the trainer's final evaluation scored.
    accuracy = float(np.mean(logits.argmax(-1) == batch['label']))
    assert accuracy == pytest.approx(summary['test_accuracy'], abs=1e-7)
    out[name] = {
      'workdir': workdir,
      'config': config,
      'summary': summary,
      'model': model,
      'variables': variables,
      'images': np.asarray(batch['image']),
      'labels': np.asarray(batch['label']),
      'logits': logits,
    }
  return out


@pytest.fixture(scope='module')
def exports(runs, tmp_path_factory):
  out = {}
  for name, fold in EXPORTS:
    directory = str(tmp_path_factory.mktemp(f'export_{name}_{int(fold)}'))
    platforms = export.DEFAULT_PLATFORMS if (name, fold) == ('resnet18', False) else ('cpu',)
    arch = run_export.export_run(
      runs[name]['workdir'], directory, fold_bn=fold, platforms=platforms
    )
    out[name, fold] = {'dir': directory, 'arch': arch}
  return out


CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    jobs = json.loads(sys.argv[1])
    for job in jobs:
      with open(job['artifact'], 'rb') as f:
        infer = jax.export.deserialize(bytearray(f.read()))
      np.save(job['out'], np.asarray(infer.call(np.load(job['images']))))
    assert 'demp' not in sys.modules and 'flax' not in sys.modules, sorted(sys.modules)
    print('OK', len(jobs))
""")


def test_exported_function_reproduces_final_eval_logits_in_a_fresh_process(runs, exports, tmp_path):
  jobs = []
  for (name, fold), e in exports.items():
    images = str(tmp_path / f'{name}_images.npy')
    np.save(images, runs[name]['images'])
    jobs.append(
      {
        'artifact': os.path.join(e['dir'], export.INFERENCE),
        'images': images,
        'out': str(tmp_path / f'{name}_{int(fold)}_logits.npy'),
      }
    )
  proc = _util.run(
    [sys.executable, '-c', CHILD, json.dumps(jobs)],
    cwd=str(tmp_path),
    capture_output=True,
    text=True,
    seconds=600,
    env={**os.environ, 'PYTHONPATH': ''},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'OK {len(jobs)}' in proc.stdout
  for ((name, fold), _), job in zip(exports.items(), jobs):
    got, want = np.load(job['out']), runs[name]['logits']
    assert got.shape == want.shape == (24, 10)
    assert np.max(np.abs(got - want)) <= (1e-4 if fold else 1e-5), (name, fold)
    accuracy = float(np.mean(got.argmax(-1) == runs[name]['labels']))
    assert accuracy == pytest.approx(runs[name]['summary']['test_accuracy'], abs=1e-7)


def test_architecture_json(runs, exports):
  for (name, fold), e in exports.items():
    with open(os.path.join(e['dir'], export.ARCHITECTURE)) as f:
      arch = json.load(f)
    summary = runs[name]['summary']
    assert arch['model'] == name and arch['kwargs'] == {
      k: v for k, v in MODELS[name].items() if k != 'name'
    }
    assert arch['widths'] == summary['widths'] and arch['dense_widths'] == summary['dense_widths']
    assert arch['input_shape'] == list(IMAGE) and arch['num_classes'] == 10
    assert arch['dtype'] == 'float32'
    assert arch['params'] == summary['final_params']
    assert arch['dense_params'] == summary['dense_params']
    assert arch['run']['step'] == 2
    assert arch['inference']['platforms'] == (
      ['cpu', 'cuda'] if (name, fold) == ('resnet18', False) else ['cpu']
    )
    assert arch['check']['max_abs_diff_vs_flax'] <= 1e-5
    assert set(os.listdir(e['dir'])) == {export.ARCHITECTURE, export.VARIABLES, export.INFERENCE}


def test_fold_report(exports):
  convnet = exports['convnet', True]['arch']['fold_bn']
  assert convnet == {'folded': [['conv_0', 'norm_0'], ['conv_1', 'norm_1']], 'not_folded': []}
  resnet = exports['resnet18', True]['arch']['fold_bn']
  # Stem, 2 per block x 8 blocks, 3 projection shortcuts: every BN follows a conv.
  assert len(resnet['folded']) == 20 and resnet['not_folded'] == []
  assert ['stage1_block0/proj_conv', 'stage1_block0/proj_bn'] in resnet['folded']
  assert exports['resnet18', False]['arch']['fold_bn'] is None


def test_fold_reports_layer_norms_of_the_vit(runs):
  r = runs['vit']
  _, report = export.fold_batch_norm(r['model'], r['variables'], IMAGE)
  assert report['folded'] == []
  assert [e['layer'] for e in report['not_folded']] == [
    'block_0/norm_attn',
    'block_0/norm_mlp',
    'block_1/norm_attn',
    'block_1/norm_mlp',
    'norm',
  ]
  assert all(e['kind'] == 'LayerNorm' for e in report['not_folded'])


class _Mixed(nn.Module):
  """conv -> BN (foldable); BN after a residual add; BN after a pool; dense -> BN (foldable)."""

  @nn.compact
  def __call__(self, x, *, train):
    y = nn.Conv(4, (3, 3), use_bias=True, name='conv')(x)
    y = nn.BatchNorm(use_running_average=not train, name='bn_conv')(y)
    z = nn.BatchNorm(use_running_average=not train, name='bn_add')(y + x.mean(-1, keepdims=True))
    z = nn.avg_pool(z, (2, 2), strides=(2, 2))
    z = nn.BatchNorm(use_running_average=not train, name='bn_pool')(z)
    h = nn.Dense(5, name='dense')(z.reshape((z.shape[0], -1)))
    return nn.BatchNorm(use_running_average=not train, name='bn_dense')(h)


def test_fold_batch_norm_exact_where_it_applies_and_says_where_not():
  model = _Mixed()
  x = np.random.default_rng(0).normal(size=(3, 4, 4, 2)).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  rng = np.random.default_rng(1)
  variables = jax.tree.map(lambda a: a + rng.uniform(0.2, 1.0, a.shape).astype(a.dtype), variables)
  folded, report = export.fold_batch_norm(model, variables, x.shape[1:])
  assert report['folded'] == [['conv', 'bn_conv'], ['dense', 'bn_dense']]
  assert [(e['layer'], e['reason']) for e in report['not_folded']] == [
    ('bn_add', 'its input is not the output of a Conv or Dense layer'),
    ('bn_pool', 'its input is not the output of a Conv or Dense layer'),
  ]
  assert set(folded['params']['bn_conv']) == {'bias'} and 'bn_conv' not in folded['batch_stats']
  assert set(folded['batch_stats']) == {'bn_add', 'bn_pool'}
  # w' = w·γ/sqrt(var+eps); the conv's own bias moves into b'.
  p, s = jax.tree.map(np.asarray, (variables['params'], variables['batch_stats']))
  scale = p['bn_conv']['scale'] / np.sqrt(s['bn_conv']['var'] + 1e-5)
  np.testing.assert_allclose(
    folded['params']['conv']['kernel'], p['conv']['kernel'] * scale, rtol=1e-6
  )
  np.testing.assert_allclose(
    folded['params']['bn_conv']['bias'],
    (p['conv']['bias'] - s['bn_conv']['mean']) * scale + p['bn_conv']['bias'],
    rtol=1e-6,
  )
  want = model.apply(variables, x, train=False)
  got = jax.jit(export.inference_fn(model, folded, folded=True))(x)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_load_exported_roundtrip(runs, exports):
  for name in MODELS:
    r = runs[name]
    loaded = export.load_exported(exports[name, name == 'convnet']['dir'])
    assert type(loaded.model) is type(r['model']) and loaded.model == r['model']
    flat = lambda tree: {
      jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree.leaves_with_path(tree)
    }
    got, want = flat(loaded.variables), flat(r['variables'])
    assert sorted(got) == sorted(want) and len(got) > 0, name
    for k, a in got.items():
      assert a.dtype == want[k].dtype and np.array_equal(a, want[k]), (name, k)
    apply = jax.jit(lambda v, x, m=loaded.model: m.apply(v, x, train=False))
    np.testing.assert_array_equal(np.asarray(apply(loaded.variables, r['images'])), r['logits'])
    # Variables closed over as constants compile a little differently: equal to rounding.
    np.testing.assert_allclose(loaded.apply(r['images']), r['logits'], atol=1e-5, rtol=0)


def test_load_exported_via_the_package(exports):
  import demp  # pylint: disable=g-import-not-at-top

  loaded = demp.load_exported(exports['convnet', True]['dir'])
  assert loaded.architecture['fold_bn']['folded'][0] == ['conv_0', 'norm_0']


def test_not_exportable(runs, tiny_npz, tmp_path):
  empty = str(tmp_path / 'empty')
  os.makedirs(empty)
  with pytest.raises(
    run_export.NotExportableError, match=re.escape(f'cannot export {empty}: no final network')
  ):
    run_export.export_run(empty, str(tmp_path / 'out'))
  no_ckpt = str(tmp_path / 'no_ckpt')
  os.makedirs(no_ckpt)
  with open(os.path.join(no_ckpt, 'summary.json'), 'w') as f:
    json.dump(runs['convnet']['summary']['widths'], f)
  with pytest.raises(
    run_export.NotExportableError, match=r'saved neither its final network nor a checkpoint'
  ):
    run_export.export_run(no_ckpt, str(tmp_path / 'out'))
  unfinished = str(tmp_path / 'unfinished')
  c = tiny_config('convnet', tiny_npz)
  c.checkpoint.final = False  # a preempted run has no final network anyway
  out = train.train_and_evaluate(c, unfinished, stop_after=1)
  assert not os.path.exists(os.path.join(unfinished, checkpoint.FINAL))
  assert out['preempted'] and out['step'] == 1
  with pytest.raises(
    run_export.NotExportableError,
    match=re.escape(f'cannot export {unfinished}: the run is not finished')
    + '.*step 1 of num_steps=2',
  ):
    run_export.export_run(unfinished, str(tmp_path / 'out'))
  assert not os.path.exists(tmp_path / 'out')


def test_existing_export_is_not_overwritten(runs, exports):
  with pytest.raises(FileExistsError, match='already holds an export'):
    run_export.export_run(runs['vit']['workdir'], exports['vit', False]['dir'])


def test_benchmark_run_and_script(runs, exports, tmp_path):
  from scripts import export as script  # pylint: disable=g-import-not-at-top

  workdir = runs['convnet']['workdir']
  out = str(tmp_path / 'script_export')
  flags.FLAGS(
    [
      'export',
      f'--workdir={workdir}',
      f'--out={out}',
      '--fold_bn',
      '--benchmark',
      '--batch_sizes=1,4',
      '--rounds=2',
      '--round_s=0.01',
      '--platforms=cpu',
    ]
  )
  try:
    script.main(['export'])
  finally:
    flags.FLAGS.unparse_flags()
  with open(os.path.join(out, export.ARCHITECTURE)) as f:
    assert json.load(f)['inference']['platforms'] == ['cpu']
  with open(os.path.join(workdir, export_benchmark.BENCHMARK)) as f:
    result = json.load(f)
  rows = result['rows']
  assert [(r['variant'], r['batch']) for r in rows] == [
    (v, b) for b in (1, 4) for v in ('dense', 'pruned', 'pruned+fold_bn')
  ]
  summary = runs['convnet']['summary']
  for r in rows:
    dense = r['variant'] == 'dense'
    want = {
      'dense': summary['dense_params'],
      'pruned': summary['final_params'],
      # Folding leaves no BN scale: one per channel of each conv.
      'pruned+fold_bn': summary['final_params'] - sum(summary['widths'].values()),
    }
    assert r['params'] == want[r['variant']]
    assert (r['flop_ratio'] == 1.0) if dense else (0 < r['flop_ratio'] < 0.7)
    assert r['latency_s'] > 0 and len(r['round_latencies_s']) == 2
    assert r['throughput_per_s'] == pytest.approx(r['batch'] / r['latency_s'])
    assert r['inference_bytes'] > 0 and r['variables_bytes'] > 0
  folded = [r for r in rows if r['variant'] == 'pruned+fold_bn']
  pruned = [r for r in rows if r['variant'] == 'pruned']
  assert all(f['flops'] < p['flops'] for f, p in zip(folded, pruned))  # no BN arithmetic left


def test_the_quickstart_exports_with_no_extra_flag(tmp_path):
  """A finished run keeps its final network (checkpoint.every=0 as in the quickstart):
  scripts.export writes it, and a fresh process reloads it with the same logits."""
  from configs import quickstart  # pylint: disable=g-import-not-at-top

  c = quickstart.get_config()
  c.num_steps, c.prune.every, c.progress_bar = 30, 10, False
  assert c.checkpoint.every == 0 and c.checkpoint.final
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'export')
  summary = train.train_and_evaluate(c, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '30'))
  model, variables, meta = run_export.load_run(workdir)
  assert dict(model.widths) == summary['widths'] and meta['step'] == 30
  images = data.fixed_examples(c.data, 16, seed=1)['image']
  want = np.asarray(model.apply(variables, images, train=False))
  _util.run(
    [sys.executable, '-m', 'scripts.export', f'--workdir={workdir}', f'--out={out}'],
    seconds=300,
    what='scripts.export',
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  )
  np.save(tmp_path / 'images.npy', images)
  code = textwrap.dedent(f"""
    import numpy as np, demp
    loaded = demp.load_exported({out!r})
    np.save({str(tmp_path / 'got.npy')!r}, np.asarray(loaded.apply(np.load({str(tmp_path / 'images.npy')!r}))))
  """)
  _util.run(
    [sys.executable, '-c', code],
    seconds=300,
    what='the reload',
    cwd=ROOT,
    check=True,
    capture_output=True,
    text=True,
  )
  np.testing.assert_allclose(np.load(tmp_path / 'got.npy'), want, atol=1e-5, rtol=0)
