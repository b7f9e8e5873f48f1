"""The config schema: every section refuses unknown keys (naming the closest), every value is
checked before compute, and ``demp`` never imports ``baselines``."""

import ast
import pathlib
import subprocess
import sys

import pytest

import baselines  # noqa: F401  (registers the baselines' methods and config.baselines keys)
from baselines import config as baselines_config
from baselines.sparse import methods as sparse_methods
from configs import quickstart
from demp.trainer import config as config_lib
from demp.trainer import methods, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _config(**overrides):
  c = quickstart.get_config()
  c.num_steps = 20
  c.batch_size = 16
  c.model.widths = [8, 8]
  c.prune.every = 10
  c.progress_bar = False
  c.unlock()
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      if p not in node:
        node[p] = {}
      node = node[p]
    node[last] = v
  return c


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
  return out


def test_demp_never_imports_baselines():
  files = sorted((ROOT / 'demp').rglob('*.py'))
  assert len(files) > 20
  offenders = {
    str(f.relative_to(ROOT)): sorted(m for m in _imports(f) if m.split('.')[0] == 'baselines')
    for f in files
  }
  assert {f: m for f, m in offenders.items() if m} == {}
  # And at run time: importing the trainer and everything it uses loads no baselines module.
  code = (
    'import sys, demp, demp.trainer.train, demp.trainer.checkpoint, tools.benchmark, tools.analysis; '
    'print(sorted(m for m in sys.modules if m.split(".")[0] == "baselines"))'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == '[]'


def test_registry_names_and_lookup():
  assert {
    'dense',
    'demp',
    'snap',
    'crop_s',
    'early_snap',
    'early_crop_s',
    'neq',
    'neq_stochastic',
    'magnitude',
    'saliency',
    'set',
    'rigl',
  } <= set(methods.names())
  assert methods.get('demp').when is methods.prune_steps
  with pytest.raises(ValueError, match=r"method='rigel' .*did you mean 'rigl'"):
    methods.get('rigel')
  with pytest.raises(ValueError, match="already registered by baselines.snap"):
    methods.register('snap', methods.Method(optimizer=lambda config, base: base))


@pytest.mark.parametrize(
  'key,message',
  [
    ('colour', r"unknown config keys \['colour'\]"),
    ('methd', r"unknown config keys \['methd'\] \(methd: did you mean method\?\)"),
    ('data.sorce', r"\['data\.sorce'\] \(data\.sorce: did you mean data\.source\?\)"),
    ('optimizer.learnig_rate', r'optimizer\.learnig_rate: did you mean optimizer\.learning_rate'),
    ('demp.peak_lamda', r'demp\.peak_lamda: did you mean demp\.peak_lambda'),
    (
      'prune.evry',
      r"unknown config keys \['prune\.evry'\] \(prune\.evry: did you mean "
      r"prune\.every\?\)",
    ),
    (
      'batch_augment.mixup_alhpa',
      r'batch_augment\.mixup_alhpa: did you mean '
      r'batch_augment\.mixup_alpha',
    ),
    ('checkpoint.evry', r'checkpoint\.evry: did you mean checkpoint\.every'),
    (
      'baselines.target_sparsty',
      r'baselines\.target_sparsty: did you mean '
      r'baselines\.target_sparsity',
    ),
    ('baselines.update_evry', r'baselines\.update_evry: did you mean baselines\.update_every'),
    (
      'optimizer.lr_kwargs.decay_step',
      r'optimizer\.lr_kwargs\.decay_step: did you mean '
      r'optimizer\.lr_kwargs\.decay_steps',
    ),
  ],
)
def test_unknown_keys_of_every_section_name_the_closest(key, message):
  overrides = {key: 1}
  if key.startswith('optimizer.lr_kwargs'):
    overrides['optimizer.lr_schedule'] = 'cosine'
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(_config(**overrides))


def test_model_kwarg_typo_names_the_config_key():
  with pytest.raises(
    ValueError,
    match=r"model\.widht=.*takes no argument 'widht' \(did you mean "
    r"'widths'\?\)",
  ):
    config_lib.validate_config(_config(**{'model.widht': [8]}))


@pytest.mark.parametrize('resolve', [baselines_config.resolve, sparse_methods.resolve])
def test_both_baselines_resolvers_refuse_a_typo(resolve):
  c = _config(**{'baselines.target_sparsty': 0.9})
  with pytest.raises(
    ValueError,
    match=r'baselines\.target_sparsty: did you mean '
    r'baselines\.target_sparsity',
  ):
    resolve(c)
  # The other resolver's keys are valid in the shared section.
  assert (
    resolve(
      _config(
        **{'baselines.target_sparsity': 0.9, 'baselines.mu_eq': 0.4, 'baselines.drop_fraction': 0.1}
      )
    ).target_sparsity
    == 0.9
  )


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('optimizer.learning_rate', float('nan'), r'optimizer\.learning_rate=nan must be a finite'),
    ('optimizer.learning_rate', float('inf'), r'optimizer\.learning_rate=inf'),
    ('demp.noise_std', float('nan'), r'demp\.noise_std=nan'),
    ('demp.peak_lambda', -1.0, r'demp\.peak_lambda=-1\.0'),
    ('model.widths', [0, 256], r'model\.widths=\[0, 256\]: width 0 is 0'),
    ('model.widths', [8, -3], r'width 1 is -3'),
    ('prune.every', 0, r'prune\.every=0'),
    ('prune.every', 21, r'prune\.every=21 \(τ\) is larger than num_steps=20'),
    ('baselines.target_sparsity', 1.5, r'baselines\.target_sparsity=1\.5'),
    ('baselines.target_sparsity', -0.1, r'baselines\.target_sparsity=-0\.1'),
    ('baselines.end_fraction', 2.0, r'baselines\.start_fraction=.*end_fraction=2\.0'),
    ('label_smoothing', 1.0, r'label_smoothing=1\.0 must be in \[0, 1\)'),
    ('method', 'dmp', r"method='dmp' is not one of .*did you mean 'demp'"),
  ],
)
def test_bad_values_are_refused_before_any_compute(key, value, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate_config(_config(**{key: value}))


def test_lr_schedule_values_are_checked():
  c = _config(
    **{
      'optimizer.lr_schedule': 'step',
      'optimizer.lr_kwargs.step_size': 10,
      'optimizer.lr_kwargs.decay_factor': float('nan'),
    }
  )
  with pytest.raises(ValueError, match=r'optimizer\.lr_kwargs\.decay_factor=nan must be finite'):
    config_lib.validate_config(c)
  c = _config(**{'optimizer.lr_schedule': 'cosine', 'optimizer.lr_kwargs.decay_steps': 0})
  with pytest.raises(ValueError, match=r"optimizer\.lr_schedule='cosine'"):
    config_lib.validate_config(c)


def test_batch_larger_than_the_training_set_is_refused_before_reading_data():
  with pytest.raises(ValueError, match=r'batch_size=100000 is larger than the training set'):
    train.init_run(_config(batch_size=100_000, **{'prune.batch_size': 16}))


def test_a_section_nobody_registered_is_unknown():
  c = _config()
  c.unlock()
  c.extras = {'a': 1}
  with pytest.raises(ValueError, match=r"unknown config keys \['extras'\]"):
    config_lib.validate_config(c)


def test_validate_config_runs_once_per_run(monkeypatch, tmp_path):
  calls = []
  validate = config_lib.validate_config
  monkeypatch.setattr(config_lib, 'validate_config', lambda c: calls.append(1) or validate(c))

  class Stop(Exception):
    pass

  def stop(*args, **kwargs):
    raise Stop

  monkeypatch.setattr(train, 'resolve_run', stop)  # everything after the checks
  with pytest.raises(Stop):
    train.train_and_evaluate(_config(), str(tmp_path))
  assert calls == [1]
