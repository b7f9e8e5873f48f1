"""The paper's recipes: the authors' numbers, the docs page, and the sweep / report / plot commands.

The expected numbers below are written out by hand from the authors' launch settings and the
paper (not read from the configs), so a drifting config fails here. The sweep commands run at
smoke scale on ``tfds.testing.mock_data`` with their training in this process and the network
swapped for a two-layer ConvNet: the six recipes' networks take minutes to compile on two CPU
cores and their own smoke runs are tests/test_configs.py's; what this file checks is the
command layer (config arguments, grid keys, the trainer, the report and the figure).
"""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import json  # pylint: disable=g-import-not-at-top
import os
import subprocess
import sys

from absl import flags
from ml_collections import config_flags
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common, recipes, resnet18_cifar10, resnet50_imagenet, vgg16_cifar10
from demp import models, transforms
from tools import sweep
from demp.trainer import train
from demp.trainer import config as config_lib
from demp.trainer import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R18, VGG = 'configs/resnet18_cifar10.py', 'configs/vgg16_cifar10.py'
R50 = 'configs/resnet50_imagenet.py'
MODULES = {R18: resnet18_cifar10, VGG: vgg16_cifar10, R50: resnet50_imagenet}
RECIPES = [(path, opt) for path in MODULES for opt in ('adam', 'sgdm')]

_CIFAR_DEATH_CHECK = {'prune.num_examples': 1536, 'prune.batch_size': 512}  # 3 x 512
_R18 = {
  'batch_size': 128,
  'num_steps': 97_656,
  'optimizer.weight_decay': 5e-4,
  'optimizer.lr_schedule': 'step',
  'optimizer.lr_kwargs.step_size': 30_078,
  'optimizer.lr_kwargs.decay_factor': 0.2,
  'prune.every': 5000,
  **_CIFAR_DEATH_CHECK,
}
_VGG = {
  'batch_size': 256,
  'num_steps': 15_626,
  'optimizer.lr_schedule': 'one_cycle',
  'data.image_size': 64,
  'prune.every': 1000,
  **_CIFAR_DEATH_CHECK,
}
_R50 = {
  'batch_size': 256,
  'num_steps': 500_455,
  'optimizer.learning_rate': 5e-3,
  'optimizer.weight_decay': 1e-4,
  'label_smoothing': 0.1,
  'optimizer.lr_schedule': 'multistep',
  'optimizer.lr_kwargs.boundaries': [150_136, 350_319, 450_410],
  'prune.every': 5000,
  'prune.num_examples': 2048,
  'data.name': 'imagenet2012',
}
_DEMP = {
  'demp.penalty': 'lasso',
  'demp.schedule': 'one_cycle',
  'demp.warmup': 'cosine',
  'demp.noise_std': 5e-5,
  'demp.noise_symmetric': False,
}
EXPECTED = {
  (R18, 'adam'): {
    **_R18,
    **_DEMP,
    'optimizer.name': 'adamw',
    'optimizer.learning_rate': 5e-3,
    'demp.peak_lambda': 0.25,
  },
  (R18, 'sgdm'): {
    **_R18,
    **_DEMP,
    'optimizer.name': 'sgd',
    'optimizer.learning_rate': 0.1,
    'optimizer.momentum': 0.9,
    'demp.peak_lambda': 1e-4,
  },
  (VGG, 'adam'): {
    **_VGG,
    **_DEMP,
    'optimizer.name': 'adamw',
    'optimizer.learning_rate': 5e-3,
    'demp.peak_lambda': 1e-3,
  },
  (VGG, 'sgdm'): {
    **_VGG,
    **_DEMP,
    'optimizer.name': 'sgd',
    'optimizer.learning_rate': 0.1,
    'demp.peak_lambda': 1e-3,
  },
  (R50, 'adam'): {**_R50, **_DEMP, 'optimizer.name': 'adamw', 'demp.peak_lambda': 0.1},
  (R50, 'sgdm'): {**_R50, **_DEMP, 'optimizer.name': 'sgd', 'demp.peak_lambda': 5e-4},
}
GRIDS = {  # the authors' launch-script sweeps (ResNet-18 SGDM: Fig. 8; ResNet-50: ours)
  (R18, 'adam'): (0.175, 0.2, 0.25, 0.275, 0.3, 0.35),
  (R18, 'sgdm'): (1e-5, 5e-5, 1e-4, 5e-4, 1e-3),
  (VGG, 'adam'): (1e-6, 1e-5, 1e-4, 1e-3, 5e-3, 1e-2),
  (VGG, 'sgdm'): (5e-6, 5e-5, 5e-4, 1e-3, 5e-3, 1.25e-2),
  (R50, 'adam'): (0.05, 0.1, 0.175, 0.25, 0.35),
  (R50, 'sgdm'): (5e-5, 1e-4, 5e-4, 1e-3, 5e-3),
}
SPAN_STEPS = {R18: 85_000, VGG: 15_626, R50: 435_597}  # λ_t / σ_t one-cycle length


@pytest.mark.parametrize('path,opt', RECIPES)
def test_recipe_numbers(path, opt):
  module = MODULES[path]
  c = module.get_config(f'opt={opt}')
  config_lib.validate_config(c)
  for key, want in EXPECTED[path, opt].items():
    got = common.get(c, key)
    assert (list(got) if key.endswith('boundaries') else got) == pytest.approx(want), key
  for s in module.SETTINGS[opt]:  # the docs' "ours" column is the config
    assert common.get(c, s.key) == s.value, s.key
    assert s.source in common.SOURCES
  assert module.LAMBDA_GRID[opt] == pytest.approx(GRIDS[path, opt])
  assert module.PEAK_LAMBDA[opt] in module.LAMBDA_GRID[opt]

  lam, std = optim.demp_schedules(c)
  span, peak = SPAN_STEPS[path], c.demp.peak_lambda
  warm = int(0.3 * span)
  np.testing.assert_allclose(
    [lam(0), lam(warm), lam(span), lam(c.num_steps)],
    [peak / 25, peak, peak / 25e4, peak / 25e4],
    rtol=1e-5,
  )
  np.testing.assert_allclose([std(warm), std(span)], [5e-5, 5e-5 / 25e4], rtol=1e-5)


def test_resnet18_learning_rate_steps():
  c = resnet18_cifar10.get_config('opt=sgdm')
  lr = optim.learning_rate_schedule(c)
  np.testing.assert_allclose(
    [lr(0), lr(30_077), lr(30_078), lr(60_156), lr(97_655)],
    [0.1, 0.1, 0.02, 0.004, 0.0008],
    rtol=1e-6,
  )


@pytest.mark.parametrize('path,opt', RECIPES)
def test_follow_text_changes_exactly_the_disagreements(path, opt):
  module = MODULES[path]
  code = module.get_config(f'opt={opt}')
  text = module.get_config(f'opt={opt},follow=text')
  config_lib.validate_config(text)
  switched = {s.key for s in module.SETTINGS[opt] if s.follows_text_with_argument}
  assert switched >= {'demp.warmup', 'demp.noise_std'}
  assert (text.demp.warmup, text.demp.noise_std) == ('linear', pytest.approx(np.sqrt(5e-5)))
  assert text.demp.noise_std == transforms.PAPER_TEXT_NOISE_STD
  if path != R50:
    assert text.prune.num_examples == 512
  if path == VGG:
    assert text.prune.every == 5000
  flat_code, flat_text = (_flat(x.to_dict()) for x in (code, text))
  assert {k for k in flat_code if flat_code[k] != flat_text[k]} == switched
  with pytest.raises(ValueError, match='follow'):
    module.get_config(f'opt={opt},follow=paper')


def test_lam_and_opt_arguments():
  assert resnet18_cifar10.get_config('opt=adam,lam=0.3').demp.peak_lambda == 0.3
  assert resnet18_cifar10.get_config('opt=adam,lam=0').demp.peak_lambda == 0.0
  with pytest.raises(ValueError, match='opt'):
    vgg16_cifar10.get_config('opt=rmsprop')


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = v
  return out


def test_docs_page_is_generated_from_the_configs():
  with open(os.path.join(ROOT, 'docs', 'recipes.md')) as f:
    text = f.read()
  assert recipes.render(text) == text, 'run: python -m configs.recipes --write docs/recipes.md'
  assert set(recipes.RECIPES) == set(MODULES)
  for (path, opt), grid in GRIDS.items():
    assert f'demp.peak_lambda={",".join(common.fmt(v) for v in grid)};seed=0,1,2' in text
    assert f'| `{path}:opt={opt}` |' in text
  for row in (
    '| `prune.num_examples` | 3 batches of 512 | 512 examples | code | `follow=text` (512)',
    '| `demp.warmup` | cosine (optax.cosine_onecycle_schedule) | linear warm-up | code |',
    '| `demp.noise_std` | std 5e-5, one-cycle | variance 5e-5 (std 7.07e-3) | code |',
  ):
    assert row in text
  # The measured λ-transfer rule, with the exponent the subset config uses.
  from configs import compare_cifar10_subset

  assert '## λ across run lengths (measured on one recipe)' in text
  assert f'best **a = {compare_cifar10_subset.LAMBDA_EXPONENT}**' in text


@pytest.mark.parametrize('path,opt', RECIPES)
def test_docstring_carries_the_three_commands(path, opt):
  module = MODULES[path]
  for argv in module.commands(opt).values():
    assert common.shell(argv).splitlines()[-1].strip() in module.__doc__
  sweep_argv = module.commands(opt)['sweep']
  assert sweep_argv[:4] == ['python', '-m', 'scripts.sweep', f'--config={path}:opt={opt}']


def _flags(argv):
  """``--key=value`` flags of a command -> {key: [values]}."""
  out = {}
  for a in argv[3:]:
    key, _, value = a[2:].partition('=')
    out.setdefault(key, []).append(value)
  return out


def _train_flags(argv):
  """Parses a ``scripts.train`` command line as scripts.train does (config file + overrides)."""
  assert argv[1:3] == ['-m', 'scripts.train'], argv
  args = ['train', *argv[3:]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file(
    'config', None, 'config', flag_values=fv, lock_config=True, sys_argv=args
  )
  flags.DEFINE_string('workdir', None, 'workdir', flag_values=fv)
  fv(args)
  return fv


@pytest.mark.parametrize('path,opt', RECIPES)
def test_sweep_command_expands_to_the_grid(path, opt, monkeypatch):
  monkeypatch.chdir(ROOT)
  f = _flags(MODULES[path].commands(opt)['sweep'])
  specs = sweep.expand(f['grid'])
  grid = GRIDS[path, opt]
  assert len(specs) == 3 * len(grid) + 3  # λ × seeds, dense × seeds
  seen = set()
  for spec in specs:
    config = _train_flags(sweep.command(spec, f['config'][0], '/w')).config
    config_lib.validate_config(config)
    seen.add(
      (config.method, config.demp.peak_lambda if config.method == 'demp' else None, config.seed)
    )
    assert config.num_steps == EXPECTED[path, opt]['num_steps']
  assert seen == (
    {('demp', lam, s) for lam in grid for s in (0, 1, 2)} | {('dense', None, s) for s in (0, 1, 2)}
  )


def _tiny_convnet(name, num_classes, **kwargs):
  del name, kwargs
  return models.MODELS['convnet'](num_classes=num_classes, widths=(4, 8))


def test_sweeps_report_and_plot_at_smoke_scale(tmp_path, monkeypatch):
  """Every recipe's three commands, its grid cut to 1 λ × 1 seed, at smoke scale.

  The dense runs of the documented sweep are left out here (six more trainings); their grid is
  expanded and its configs validated by ``test_sweep_command_expands_to_the_grid``.
  """
  monkeypatch.chdir(ROOT)
  monkeypatch.setattr(train.models, 'build', _tiny_convnet)

  real_run = subprocess.run

  def run_in_process(cmd, **kwargs):
    if list(cmd[1:3]) != ['-m', 'scripts.train']:  # e.g. platform.uname() while logging
      return real_run(cmd, **kwargs)
    fv = _train_flags(cmd)
    summary = train.train_and_evaluate(fv.config, fv.workdir)
    return subprocess.CompletedProcess(cmd, 0 if summary['steps'] == fv.config.num_steps else 1)

  monkeypatch.setattr(sweep.subprocess, 'run', run_in_process)
  later = []
  with tfds.testing.mock_data(num_examples=32, policy=tfds.testing.MockPolicy.USE_CODE):
    for path, opt in RECIPES:
      module = MODULES[path]
      lam = module.LAMBDA_GRID[opt][0]
      cmds = module.commands(
        opt, lambdas=(lam,), seeds=(0,), smoke=True, dense=False, root=str(tmp_path)
      )
      f = _flags(cmds['sweep'])
      assert f['config'] == [f'{path}:opt={opt},smoke=True']
      results = sweep.run_sweep(f['config'][0], f['grid'], f['workdir'][0], echo=lambda _: None)
      assert results == {f'method-demp_demp.peak_lambda-{common.fmt(lam)}_seed-0': 0}
      with open(
        os.path.join(
          f['workdir'][0], f'method-demp_demp.peak_lambda-{common.fmt(lam)}_seed-0', 'config.json'
        )
      ) as fh:
        run_config = json.load(fh)
      assert run_config['demp']['peak_lambda'] == pytest.approx(lam)
      assert run_config['optimizer']['name'] == EXPECTED[path, opt]['optimizer.name']
      later.append((cmds['report'], cmds['plot']))
  # scripts.report and scripts.plot, each in one process running every recipe's command line.
  for i, script in enumerate(('report', 'plot')):
    argvs = [pair[i] for pair in later]
    code = (
      'import sys, json\nfrom absl import flags\nfrom scripts import ' + script + ' as s\n'
      'for argv in json.loads(sys.argv[1]):\n'
      '  flags.FLAGS.unparse_flags(); flags.FLAGS(argv[2:]); s.main(argv[2:3])\n'
    )
    out = subprocess.run(
      [sys.executable, '-c', code, json.dumps(argvs)],
      cwd=ROOT,
      text=True,
      capture_output=True,
      env={**os.environ, 'PYTHONPATH': ROOT},
      check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
  for report_argv, plot_argv in later:
    table = _flags(report_argv)['out'][0] + '.md'
    with open(table) as fh:
      assert 'DemP' in fh.read()
    assert os.path.getsize(_flags(plot_argv)['out'][0] + '.png') > 1000
