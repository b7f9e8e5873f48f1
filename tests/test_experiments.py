"""The fidelity sweep program: stages expand to ≥ 3 seeds, baselines follow DemP's sparsities."""

import ast
import functools
import importlib
import json
import os

import numpy as np
import pytest

from demp.trainer import config as config_lib
from tools import sweep
from experiments import fidelity


def _rows(specs):
  rows = {}
  for spec in specs:
    overrides = dict(spec.overrides)
    rows.setdefault(tuple(sorted((k, v) for k, v in overrides.items() if k != 'seed')), []).append(
      overrides['seed']
    )
  return rows


ABLATIONS = ('convnet_adam_ablations', 'convnet_adam_length', 'resnet18_ablations')  # 2 seeds
SCREENS = ('convnet_length_screen',)  # 1 seed: which recipe the 3-seed study runs


def test_every_row_has_three_seeds_and_seed_zero_comes_first():
  for name, stage in fidelity.STAGES.items():
    if stage.after or not stage.seed_major:
      continue
    specs = sweep.expand(stage.expand())
    rows = _rows(specs)
    seeds = ['0'] if name in SCREENS else ['0', '1'] if name in ABLATIONS else ['0', '1', '2']
    assert all(sorted(s) == seeds for s in rows.values()), name
    first = [dict(s.overrides)['seed'] for s in specs[: len(rows)]]
    assert first == ['0'] * len(rows), name


def test_resnet18_ablations_change_one_thing_at_the_steered_targets():
  specs = sweep.expand(fidelity.STAGES['resnet18_ablations'].expand())
  reference = {  # the steered runs of resnet18_target at the same target and seed
    tuple(sorted(dict(s.overrides).items()))
    for s in sweep.expand(fidelity.STAGES['resnet18_target'].expand())
  }
  changed = set()
  for spec in specs:
    o = dict(spec.overrides)
    extra = [k for k in o if not k.startswith('arg.') and k != 'seed']
    assert len(extra) == 1, spec.name
    changed.add(extra[0])
    o.pop(extra[0])
    assert tuple(sorted(o.items())) in reference, spec.name
  assert changed == {'demp.peak_lambda', 'demp.penalty_weighting', 'prune.remove_constant'}
  assert [dict(s.overrides)['arg.target'] for s in specs[:2]] == ['0.9', '0.7']  # 90 % first


def test_ablations_change_one_thing_with_two_seeds_each_row_at_a_time():
  specs = sweep.expand(fidelity.STAGES['convnet_adam_ablations'].expand())
  rows = _rows(specs)
  assert len(rows) == 18 and all(s == ['0', '1'] for s in rows.values())
  seeds = [dict(s.overrides)['seed'] for s in specs]
  assert seeds == ['0', '1'] * 18  # a row's seeds run back to back
  changes = []
  for spec in specs:  # DemP plus one change (λ aside); the last row combines two
    changed = [k for k in dict(spec.overrides) if k not in ('arg.method', 'arg.lam', 'seed')]
    assert dict(spec.overrides)['arg.method'] == 'demp', spec.name
    changes.append(len(changed))
  assert changes == [1] * 34 + [2, 2]


def test_baseline_stage_waits_for_demp_then_uses_its_sparsities(tmp_path):
  results = str(tmp_path)
  demp_runs = [
    s
    for s in sweep.expand(fidelity.STAGES['convnet_sgdm'].expand())
    if dict(s.overrides)['arg.method'] == 'demp'
  ]
  echoed = []

  def dry_run(**kwargs):
    echoed.clear()
    fidelity.run(
      ['convnet_sgdm_baselines'],
      'x.npz',
      results,
      str(tmp_path / 'w'),
      dry_run=True,
      echo=echoed.append,
      **kwargs,
    )

  dry_run()
  assert echoed == [
    f'convnet_sgdm_baselines: skipped until every DemP run of convnet_sgdm is in {results}.'
  ]
  lams = sorted({dict(s.overrides)['arg.lam'] for s in demp_runs}, key=float)
  assert len(lams) == 4
  sparsity = dict(
    zip(lams, [(0.31, 0.33, 0.29), (0.52, 0.55, 0.49), (0.7, 0.69, 0.71), (0.86, 0.88, 0.9)])
  )

  def write_demp_runs(seeds):
    for spec in demp_runs:
      o = dict(spec.overrides)
      if int(o['seed']) in seeds:
        run_dir = os.path.join(results, 'convnet_sgdm', spec.name)
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
          json.dump({'weight_sparsity': sparsity[o['arg.lam']][int(o['seed'])]}, f)

  write_demp_runs({0})
  # Seed 0 alone: its baselines may start on seed 0's sparsities (--seeds=0) ...
  assert fidelity.demp_sparsities(results, 'convnet_sgdm', seeds=(0,)) == [0.3, 0.5, 0.7, 0.85]
  dry_run(seeds=(0,))
  assert echoed[0] == (
    'convnet_sgdm_baselines: targets 0.3,0.5,0.7,0.85 (DemP weight sparsities of convnet_sgdm)'
  )
  assert echoed[1].startswith('4 runs, 0 done, 4 to run')
  # ... but all seeds wait for every seed.
  assert fidelity.demp_sparsities(results, 'convnet_sgdm') is None
  write_demp_runs({1, 2})
  assert fidelity.demp_sparsities(results, 'convnet_sgdm') == [0.3, 0.5, 0.7, 0.9]
  dry_run()
  assert echoed[0] == (
    'convnet_sgdm_baselines: targets 0.3,0.5,0.7,0.9 (DemP weight sparsities of convnet_sgdm)'
  )
  assert echoed[1].startswith('12 runs, 0 done, 12 to run')
  assert 'early_crop_s_arg.target-0.3_seed-0' in echoed[2] and 'path=x.npz' in echoed[2]
  assert any('early_crop_s_arg.target-0.9_seed-2' in line for line in echoed)
  # Once seed 0's baselines have run (at 0.85), every later seed follows their targets.
  for t in (0.3, 0.5, 0.7, 0.85):
    run_dir = os.path.join(
      results, 'convnet_sgdm_baselines', f'arg.method-early_crop_s_arg.target-{t}_seed-0'
    )
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, 'config.json'), 'w') as f:
      json.dump({'baselines': {'target_sparsity': t}}, f)
  assert fidelity.kept_targets(results, 'convnet_sgdm_baselines') == [0.3, 0.5, 0.7, 0.85]
  dry_run()
  assert echoed[0] == (
    f'convnet_sgdm_baselines: targets 0.3,0.5,0.7,0.85 (those of its runs already in {results})'
  )
  assert any('early_crop_s_arg.target-0.85_seed-2' in line for line in echoed)
  assert not any('target-0.9_' in line for line in echoed)


def test_seeds_flag_runs_only_those_seeds_cheapest_length_runs_first(tmp_path):
  echoed = []
  fidelity.run(
    ['convnet_adam_length'],
    'x.npz',
    str(tmp_path),
    str(tmp_path / 'w'),
    seeds=(0,),
    dry_run=True,
    echo=echoed.append,
  )
  assert echoed[0].startswith('4 runs, 0 done, 4 to run')
  names = [line for line in echoed[1:] if 'seed-' in line]
  assert all('seed-0' in n for n in names) and len(names) == 4
  assert ['steps-600' in n for n in names] == [True, True, False, False]


def test_lambda_transfer_finds_the_exponent_and_skips_collapsed_runs(tmp_path):
  from configs import compare_cifar10_subset
  from experiments import lambda_transfer

  # Sparsity = logistic(log(λ·T^0.5)): the fit must find 0.5, not 0 or 1.
  points = []
  for steps in (600, 1200, 2400):
    for lam in (0.01, 0.02, 0.04, 0.08):
      x = np.log(lam * steps**0.5)
      points.append((lam, steps, float(1 / (1 + np.exp(-2.0 * (x - np.log(1.3)))))))
  fit = lambda_transfer.fit_exponent(points)
  assert fit['exponent'] == 0.5 and fit['residual'] < 0.01
  # Inverted, the curve gives back the λ that produced a sparsity (grid-fit accuracy).
  lam = lambda_transfer.lambda_for(points[5][2], 1200, fit)
  assert lam == pytest.approx(points[5][0], rel=0.1)
  with pytest.raises(ValueError, match='must be in'):
    lambda_transfer.lambda_for(1.0, 1200, fit)
  assert fit['residuals'][0.0] > 0.05 and fit['residuals'][1.0] > 0.05
  with pytest.raises(ValueError, match='2 or more lengths'):
    lambda_transfer.fit_exponent([p for p in points if p[1] == 600])
  for name, (lam, steps, sparsity, acc) in {
    'a': (0.04, 600, 0.4, 0.6),
    'b': (0.16, 1200, 0.6, 0.09),  # collapsed: left out
    'c': (0.0, 1200, 0.0, 0.7),  # dense: not DemP
  }.items():
    os.makedirs(tmp_path / name)
    method = 'demp' if lam else 'dense'
    with open(tmp_path / name / 'config.json', 'w') as f:
      json.dump({'method': method, 'num_steps': steps, 'demp': {'peak_lambda': lam}}, f)
    with open(tmp_path / name / 'summary.json', 'w') as f:
      json.dump({'weight_sparsity': sparsity, 'test_accuracy': acc}, f)
  assert lambda_transfer.load_points([str(tmp_path / '*')]) == [(0.04, 600, 0.4)]
  # The reduced config applies the rule on request: λ·(1200 / steps)^a.
  c = compare_cifar10_subset.get_config('method=demp,steps=2400,lam=0.04,scale_lam=True')
  assert compare_cifar10_subset.LAMBDA_EXPONENT == 0.35
  assert c.demp.peak_lambda == pytest.approx(0.04 * 0.5**0.35)
  c = compare_cifar10_subset.get_config('method=demp,steps=2400,lam=0.04')
  assert c.demp.peak_lambda == pytest.approx(0.04)


def test_resnet18_baselines_at_targets_match_the_steered_runs():
  def targets(stage, method):
    return {
      (o.get('arg.target'), o['seed'])
      for o in (dict(s.overrides) for s in sweep.expand(fidelity.STAGES[stage].expand()))
      if o['arg.method'] == method and o.get('arg.kind', 'weights') == 'weights'
    }

  steered = targets('resnet18_target', 'demp')
  assert steered == {(t, s) for t in ('0.5', '0.7', '0.9') for s in ('0', '1', '2')}
  for method in ('early_crop_s', 'early_snap'):
    assert targets('resnet18_target_baselines', method) == steered, method


@pytest.mark.parametrize('stage', sorted(fidelity.STAGES))
def test_every_run_of_every_stage_builds_a_valid_config(stage):
  # A config error should fail here, not two seconds into a sweep's run.
  spec_stage = fidelity.STAGES[stage]
  stage_config = spec_stage.config.format(path='/data/cifar10_subset.npz', steps=1200)
  specs = sweep.expand(spec_stage.expand(targets='0.5,0.7'))
  assert specs
  for spec in specs:
    path, _, arg = sweep.config_flag(spec, stage_config).partition(':')  # as the sweep passes it
    config = importlib.import_module(path.removesuffix('.py').replace('/', '.')).get_config(arg)
    for key, value in spec.config_overrides().items():  # as --config.KEY=VALUE sets them
      *parents, leaf = key.split('.')
      node = functools.reduce(getattr, parents, config)
      try:
        node[leaf] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        node[leaf] = value
    config_lib.validate_config(config)
