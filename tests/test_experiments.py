"""The fidelity sweep program: stages expand to ≥ 3 seeds, baselines follow DemP's sparsities."""

import json
import os

from demp import sweep
from experiments import fidelity


def _rows(specs):
  rows = {}
  for spec in specs:
    overrides = dict(spec.overrides)
    rows.setdefault(tuple(sorted((k, v) for k, v in overrides.items() if k != 'seed')), []).append(
      overrides['seed']
    )
  return rows


ABLATIONS = ('convnet_adam_ablations', 'convnet_adam_length')  # two seeds per row


def test_every_row_has_three_seeds_and_seed_zero_comes_first():
  for name, stage in fidelity.STAGES.items():
    if stage.after or not stage.seed_major:
      continue
    specs = sweep.expand(stage.expand())
    rows = _rows(specs)
    seeds = ['0', '1'] if name in ABLATIONS else ['0', '1', '2']
    assert all(sorted(s) == seeds for s in rows.values()), name
    first = [dict(s.overrides)['seed'] for s in specs[: len(rows)]]
    assert first == ['0'] * len(rows), name


def test_ablations_change_one_thing_with_two_seeds_each_row_at_a_time():
  specs = sweep.expand(fidelity.STAGES['convnet_adam_ablations'].expand())
  rows = _rows(specs)
  assert len(rows) == 17 and all(s == ['0', '1'] for s in rows.values())
  seeds = [dict(s.overrides)['seed'] for s in specs]
  assert seeds == ['0', '1'] * 17  # a row's seeds run back to back
  changes = []
  for spec in specs:  # DemP plus one change (λ aside); the last row combines two
    changed = [k for k in dict(spec.overrides) if k not in ('arg.method', 'arg.lam', 'seed')]
    assert dict(spec.overrides)['arg.method'] == 'demp', spec.name
    changes.append(len(changed))
  assert changes == [1] * 32 + [2, 2]


def test_baseline_stage_waits_for_demp_then_uses_its_sparsities(tmp_path):
  results = str(tmp_path)
  demp_runs = [
    s
    for s in sweep.expand(fidelity.STAGES['resnet18'].expand())
    if dict(s.overrides)['arg.method'] == 'demp'
  ]
  echoed = []
  fidelity.run(
    ['resnet18_baselines'], 'x.npz', results, str(tmp_path / 'w'), dry_run=True, echo=echoed.append
  )
  assert echoed == [
    f'resnet18_baselines: skipped until every DemP run of resnet18 is in {results}.'
  ]
  sparsity = {'0.01': (0.31, 0.33, 0.29), '0.02': (0.52, 0.55, 0.49), '0.05': (0.86, 0.88, 0.9)}
  for spec in demp_runs:
    o = dict(spec.overrides)
    run_dir = os.path.join(results, 'resnet18', spec.name)
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, 'summary.json'), 'w') as f:
      json.dump({'weight_sparsity': sparsity[o['arg.lam']][int(o['seed'])]}, f)
  assert fidelity.demp_sparsities(results, 'resnet18') == [0.3, 0.5, 0.9]
  echoed.clear()
  fidelity.run(
    ['resnet18_baselines'], 'x.npz', results, str(tmp_path / 'w'), dry_run=True, echo=echoed.append
  )
  assert echoed[0] == 'resnet18_baselines: targets 0.3,0.5,0.9 (DemP weight sparsities of resnet18)'
  assert echoed[1].startswith('18 runs, 0 done, 18 to run')
  assert 'arg.target-0.3_seed-0' in echoed[2] and 'path=x.npz' in echoed[2]
  assert any('early_crop_s_arg.target-0.9_seed-2' in line for line in echoed)


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
