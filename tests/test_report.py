"""Reports, figures and sweeps from a fixture of result files; dead-set overlap tracking."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import io  # pylint: disable=wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import os  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from demp.trainer import metrics  # pylint: disable=wrong-import-position
from tools import plots, report, sweep
from demp.trainer import train as train_lib  # pylint: disable=wrong-import-position
from demp.trainer import demp_policy
from demp.trainer import config as config_lib

DENSE_WIDTHS = {'conv_0': 4, 'conv_1': 6}


def _events(lives):
  return [
    {
      'event': 'prune',
      'step': 100 * (i + 1),
      'removed': False,
      'live': live,
      'dead_overlap': None if i == 0 else 1.0,
    }
    for i, live in enumerate(lives)
  ]


def _write(
  root, name, method, seed, acc, ns, ws, wall, train_rel, inf_rel, lam=5e-3, extra=None, lives=()
):
  path = os.path.join(root, name)
  os.makedirs(path)
  config = {
    'method': method,
    'seed': seed,
    'demp': {'peak_lambda': lam},
    'model': {'widths': [4, 6]},
    'progress_bar': False,
    **(extra or {}),
  }
  summary = {
    'method': method,
    'test_accuracy': acc,
    'neuron_sparsity': ns,
    'weight_sparsity': ws,
    'wall_time_s': wall,
    'train_flops': 1e12 * train_rel,
    'train_flops_rel': train_rel,
    'inference_flops': 2e6 * inf_rel,
    'inference_flops_rel': inf_rel,
    'dense_widths': DENSE_WIDTHS,
    'events': _events(lives),
  }
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(path, 'summary.json'), 'w') as f:
    json.dump(summary, f)


@pytest.fixture(name='runs_dir')
def fixture_runs_dir(tmp_path):
  root = str(tmp_path / 'runs')
  _write(root, 'dense_0', 'dense', 0, 0.50, 0.0, 0.0, 100.0, 1.0, 1.0)
  _write(root, 'dense_1', 'dense', 1, 0.52, 0.0, 0.0, 110.0, 1.0, 1.0)
  _write(
    root,
    'demp_a0',
    'demp',
    0,
    0.55,
    0.10,
    0.30,
    94.5,
    0.8,
    0.7,
    lam=0.01,
    lives=[{'conv_0': 4, 'conv_1': 6}, {'conv_0': 3, 'conv_1': 5}],
  )
  _write(
    root,
    'demp_a1',
    'demp',
    1,
    0.53,
    0.12,
    0.32,
    94.5,
    0.8,
    0.7,
    lam=0.01,
    lives=[{'conv_0': 4, 'conv_1': 4}, {'conv_0': 2, 'conv_1': 4}],
  )
  _write(
    root,
    'demp_b0',
    'demp',
    0,
    0.40,
    0.50,
    0.79,
    63.0,
    0.5,
    0.3,
    lam=0.1,
    lives=[{'conv_0': 2, 'conv_1': 3}, {'conv_0': 1, 'conv_1': 2}],
  )
  _write(
    root,
    'demp_b1',
    'demp',
    1,
    0.44,
    0.52,
    0.81,
    63.0,
    0.5,
    0.3,
    lam=0.1,
    lives=[{'conv_0': 2, 'conv_1': 3}, {'conv_0': 1, 'conv_1': 2}],
  )
  _write(
    root,
    'snap_0',
    'snap',
    0,
    0.30,
    0.45,
    0.82,
    52.5,
    0.4,
    0.3,
    extra={'baselines': {'sparsity': 0.8}},
  )
  return root


EXPECTED_TABLE = """\
| Method | Target WS | Test accuracy | Neuron sparsity | Weight sparsity | Training time | Training FLOPs | Inference FLOPs | Seeds |
|---|---|---|---|---|---|---|---|---|
| Dense | - | 51.00% ± 1.41 | - | - | 1.00× | 1.00× (1.00e+12) | 1.00× (2.00e+06) | 2 |
| SNAP | 30% | 30.00% | 45.0% | 82.0% | 0.50× | 0.40× | 0.30× | 1 |
| SNAP | 80% | 30.00% | 45.0% | 82.0% | 0.50× | 0.40× | 0.30× | 1 |
| DemP (peak_lambda=0.01) | 30% | 54.00% ± 1.41 | 11.0% | 31.0% | 0.90× | 0.80× | 0.70× | 2 |
| DemP (peak_lambda=0.1) | 80% | 42.00% ± 2.83 | 51.0% | 80.0% | 0.60× | 0.50× | 0.30× | 2 |
"""


def test_table_from_fixture(runs_dir):
  rows = report.table_rows(report.load_runs(runs_dir), targets=[0.3, 0.8])
  assert report.to_markdown(rows) == EXPECTED_TABLE


def test_csv_and_files(runs_dir, tmp_path):
  out = str(tmp_path / 'out' / 'table')
  markdown = report.write_report(runs_dir, out, [0.8])
  with open(out + '.md') as f:
    assert f.read() == markdown
  with open(out + '.csv') as f:
    lines = f.read().splitlines()
  assert lines[0].split(',')[:6] == [
    'method',
    'label',
    'target',
    'seeds',
    'accuracy',
    'accuracy_std',
  ]
  demp = lines[-1].split(',')
  assert demp[:4] == ['demp', 'DemP (peak_lambda=0.1)', '0.8', '2']
  np.testing.assert_allclose(
    [float(v) for v in demp[4:11]], [0.42, 0.0282843, 0.51, 0.80, 0.6, 0.5, 0.3], rtol=1e-5
  )


def test_all_groups_and_closest(runs_dir):
  runs = report.load_runs(runs_dir)
  rows = report.table_rows(runs, all_groups=True)
  assert [r.label for r in rows] == [
    'Dense',
    'SNAP',
    'DemP (peak_lambda=0.01)',
    'DemP (peak_lambda=0.1)',
  ]
  demp = [g for g in report.group_runs(runs) if g.method == 'demp']
  # Mean weight sparsities 0.31 and 0.80: the midpoint is 0.555.
  assert report.closest(demp, 0.55).label == 'DemP (peak_lambda=0.01)'
  assert report.closest(demp, 0.56).label == 'DemP (peak_lambda=0.1)'
  with pytest.raises(ValueError, match='target weight sparsity'):
    report.table_rows(runs, targets=[80])


def test_curves_and_figures(runs_dir, tmp_path):
  runs = report.load_runs(runs_dir)
  run = next(r for r in runs if r.path.endswith('demp_a0'))
  steps, ratio, count = plots.dead_curve(run)
  np.testing.assert_array_equal(steps, [100, 200])
  np.testing.assert_array_equal(count, [0, 2])
  np.testing.assert_allclose(ratio, [0.0, 0.2])
  assert plots.final_dead_ratio(run) == pytest.approx(0.2)
  group = next(g for g in report.group_runs(runs) if g.label == 'DemP (peak_lambda=0.01)')
  steps, mean, std = plots._group_curves(group, lambda r: plots.dead_curve(r)[::2])
  np.testing.assert_allclose(mean, [1.0, 3.0])  # seed 0: 0, 2; seed 1: 2, 4 dead
  np.testing.assert_allclose(std, [np.std([0, 2], ddof=1), np.std([2, 4], ddof=1)])
  out = str(tmp_path / 'fig')
  plots.tradeoff(runs, out + '/tradeoff')
  plots.dead_over_steps(plots.select(runs, {'method': 'demp'}), out + '/dead')
  plots.live_per_group(runs, out + '/live')
  plots.final_vs(
    plots.select(runs, {'method': 'demp'}), out + '/final', x='demp.peak_lambda', logx=True
  )
  plots.overlap_over_steps(plots.select(runs, {'method': 'demp'}), out + '/overlap')
  for name in ('tradeoff', 'dead', 'live', 'final', 'overlap'):
    for ext in ('png', 'pdf'):
      assert os.path.getsize(f'{out}/{name}.{ext}') > 1000


def test_select_alternatives_exclusions_and_multi_key_series(runs_dir, tmp_path):
  runs = report.load_runs(runs_dir)
  names = lambda rs: sorted(os.path.basename(r.path) for r in rs)  # noqa: E731
  assert names(plots.select(runs, {'method': 'snap|dense'})) == ['dense_0', 'dense_1', 'snap_0']
  kept = plots.select(runs, {'method': 'demp|snap'}, {'demp.peak_lambda': '0.1'})
  assert names(kept) == ['demp_a0', 'demp_a1', 'snap_0']  # snap's λ is not 0.1: kept
  with pytest.raises(KeyError, match='no_such_key'):
    plots.select(runs, {'no_such_key': '1'})
  assert names(plots.select(runs, {'method': 'snap'}, {'no_such_key': '1'})) == ['snap_0']
  with pytest.raises(ValueError, match='no run matches'):
    plots.select(runs, {'method': 'demp'}, {'demp.peak_lambda': '0.01|0.1'})
  keys = [('demp', '0.01'), ('demp', '0.1'), ('snap', '0.01')]
  assert plots._series_labels(keys, ['method', 'demp.peak_lambda']) == {
    ('demp', '0.01'): 'DemP (peak_lambda=0.01)',
    ('demp', '0.1'): 'DemP (peak_lambda=0.1)',
    ('snap', '0.01'): 'SNAP',  # one series of its own: no key shown
  }
  assert plots._series_labels([('0.1',)], ['demp.peak_lambda']) == {
    ('0.1',): 'demp.peak_lambda=0.1'
  }
  flags = [
    ('demp', 'coupled', 'False'),
    ('demp', 'coupled', 'True'),
    ('demp', 'decoupled', 'False'),
  ]
  by = ['method', 'demp.penalty_coupling', 'prune.remove_constant']
  assert list(
    plots._series_labels(flags, by).values()
  ) == [  # True: the key's name; False: left out
    'DemP (penalty_coupling=coupled)',
    'DemP (penalty_coupling=coupled, remove_constant)',
    'DemP (penalty_coupling=decoupled)',
  ]
  fig = plots.tradeoff(runs, str(tmp_path / 'multi'), color_by='method,demp.peak_lambda')
  legend = sorted(t.get_text() for t in fig.axes[-1].get_legend().get_texts())
  assert legend == ['DemP (peak_lambda=0.01)', 'DemP (peak_lambda=0.1)', 'SNAP', 'dense (2 runs)']
  # A derived key: DemP steered to a target is a series of its own, labelled by the flag.
  runs[0].config['demp.target_sparsity'] = 0.7
  assert plots.value(runs[0], 'steered') is True
  steered = sorted({(r.method, plots.value(r, 'steered')) for r in runs})
  assert steered[:2] == [('demp', False), ('demp', True)] and runs[0].method == 'demp'
  fig = plots.tradeoff(runs, str(tmp_path / 'steered'), color_by='method,steered')
  legend = sorted(t.get_text() for t in fig.axes[-1].get_legend().get_texts())
  assert legend == ['DemP', 'DemP (steered)', 'SNAP', 'dense (2 runs)']
  del runs[0].config['demp.target_sparsity']
  assert plots.value(runs[0], 'steered') is False
  for run in runs:  # labels over 32 characters: the legend goes below the axes, off the data
    run.config['demp.peak_lambda_of_a_rather_long_name'] = run.config['demp.peak_lambda']
  fig = plots.tradeoff(
    runs, str(tmp_path / 'long'), color_by='method,demp.peak_lambda_of_a_rather_long_name'
  )
  assert fig.axes[-1].get_legend() is None and len(fig.legends) == 1
  assert len(fig.legends[0].get_texts()) == 4


def test_sweep_grid_names_and_resume(tmp_path):
  specs = sweep.expand(
    [
      'method=demp;demp.peak_lambda=1e-3,5e-3;seed=0,1',
      'method=dense;seed=0,1',
      'method=dense;seed=1',
    ]
  )
  assert [s.name for s in specs] == [
    'method-demp_demp.peak_lambda-1e-3_seed-0',
    'method-demp_demp.peak_lambda-1e-3_seed-1',
    'method-demp_demp.peak_lambda-5e-3_seed-0',
    'method-demp_demp.peak_lambda-5e-3_seed-1',
    'method-dense_seed-0',
    'method-dense_seed-1',
  ]
  spec = sweep.expand(['arg.mode=gaussian;demp.noise_symmetric=True'])[0]
  cmd = sweep.command(spec, 'configs/x.py:smoke=True', '/w', python='py')
  assert cmd == [
    'py',
    '-m',
    'scripts.train',
    '--config=configs/x.py:smoke=True,mode=gaussian',
    '--workdir=/w/arg.mode-gaussian_demp.noise_symmetric-True',
    '--config.progress_bar=False',
    '--config.demp.noise_symmetric=True',
  ]
  workdir = str(tmp_path / 'sweep')
  os.makedirs(os.path.join(workdir, specs[0].name))
  with open(os.path.join(workdir, specs[0].name, 'summary.json'), 'w') as f:
    f.write('{}')
  echoed = []
  sweep.run_sweep(
    'c.py',
    ['method=demp;demp.peak_lambda=1e-3,5e-3;seed=0,1'],
    workdir,
    dry_run=True,
    echo=echoed.append,
  )
  assert echoed[0].startswith('4 runs, 1 done, 3 to run')
  assert len(echoed) == 4 and not any(specs[0].name + ' ' in line for line in echoed[1:])
  with pytest.raises(ValueError, match='appears twice'):
    sweep.parse_grid('seed=0;seed=1')


def test_dead_set_and_overlap():
  alive = {'a': np.array([True, False, True]), 'b': np.array([False])}
  ids = {'a': np.array([0, 2, 3])}  # unit 1 of 'a' was removed before
  dead = metrics.dead_set(alive, ids, {'a': 4, 'b': 1})
  assert dead == {('a', 1), ('a', 2), ('b', 0)}
  assert metrics.overlap_ratio({('a', 1), ('a', 5)}, dead) == 0.5
  assert metrics.overlap_ratio(frozenset(), dead) is None


def _mlp_run(tmp_path, **prune):
  config = config_lib.base_config()
  config.model.widths = [6, 4]
  config.num_steps = 10
  config.prune.every = 5
  config.prune.num_examples = 32
  config.prune.update(prune)
  run, _ = train_lib.init_run(config)
  return run


def _set_dead(run, units):
  """Constant BN outputs: ``hidden_0`` units in ``units`` give ReLU(0) = 0 (dead), all others 5."""
  params = jax.tree.map(np.array, run.state['params'])
  for norm, dead in (('norm_0', units), ('norm_1', [])):
    params[norm]['scale'][:] = 0.0
    params[norm]['bias'][:] = 5.0
    params[norm]['bias'][dead] = 0.0
  run.state = {**run.state, 'params': params}


def test_run_tracks_dead_sets_by_dense_index_through_surgery(tmp_path):
  run = _mlp_run(tmp_path)
  _set_dead(run, [1, 3])
  assert demp_policy.prune_dead(run)
  np.testing.assert_array_equal(run.unit_ids['hidden_0'], [0, 2, 4, 5])
  assert run.events[-1]['dead'] == 2 and run.events[-1]['dead_overlap'] is None
  _set_dead(run, [3])  # now at position 3: dense unit 5
  demp_policy.prune_dead(run)
  np.testing.assert_array_equal(run.unit_ids['hidden_0'], [0, 2, 4])
  assert run.dead_set == {('hidden_0', 1), ('hidden_0', 3), ('hidden_0', 5)}
  assert run.events[-1]['dead_overlap'] == 1.0  # {1,3} ⊂ {1,3,5}


def test_check_only_logs_and_measures_revival(tmp_path):
  run = _mlp_run(tmp_path, dynamic=False)
  _set_dead(run, [1, 3])
  assert not demp_policy.prune_dead(run)  # checked, logged, nothing removed
  assert dict(run.model.widths) == {'hidden_0': 6, 'hidden_1': 4}
  assert run.events[-1]['live'] == {'hidden_0': 4, 'hidden_1': 4}
  _set_dead(run, [1, 4])  # unit 3 revives, 4 dies
  demp_policy.prune_dead(run)
  assert run.dead_set == {('hidden_0', 1), ('hidden_0', 4)}
  assert run.events[-1]['dead_overlap'] == 0.5  # |{1,3} ∩ {1,4}| / 2
  run.step = run.config.num_steps  # the final check removes (prune.at_end)
  assert demp_policy.prune_dead(run)
  assert dict(run.model.widths) == {'hidden_0': 4, 'hidden_1': 4}


def test_sweep_results_dir_collects_and_skips(tmp_path):
  """Finished runs are copied (summary last) and count as done on a fresh workdir."""
  workdir, kept = str(tmp_path / 'scratch'), str(tmp_path / 'kept')
  specs = sweep.expand(['method=dense;seed=0,1,2'])
  for spec, finished in zip(specs, (True, False, True)):
    run_dir = os.path.join(workdir, spec.name)
    os.makedirs(os.path.join(run_dir, 'checkpoints'))
    for name in ('metrics.jsonl', 'config.json', 'train.log') + (
      ('summary.json',) if finished else ()
    ):
      with open(os.path.join(run_dir, name), 'w') as f:
        f.write(f'{spec.name} {name}')
  assert sweep.collect(workdir, kept) == [specs[0].name, specs[2].name]
  assert sorted(os.listdir(kept)) == [specs[0].name, specs[2].name]
  assert sorted(os.listdir(os.path.join(kept, specs[0].name))) == sorted(sweep.RESULT_FILES)
  with open(os.path.join(kept, specs[2].name, 'metrics.jsonl')) as f:
    assert f.read() == f'{specs[2].name} metrics.jsonl'
  assert sweep.collect(workdir, kept) == []  # unchanged: nothing copied again
  echoed = []
  sweep.run_sweep(
    'c.py',
    ['method=dense;seed=0,1,2'],
    str(tmp_path / 'fresh'),
    dry_run=True,
    echo=echoed.append,
    results_dir=kept,
  )
  assert echoed[0].startswith('3 runs, 2 done, 1 to run')
  assert specs[1].name in echoed[1] and len(echoed) == 2


def test_collected_runs_name_no_machine_paths(tmp_path):
  """collect_run: data paths -> file name, paths inside the run -> relative, others -> last part."""
  name = 'method-demp_seed-0'
  run_dir = tmp_path / 'machine' / 'sweeps' / name
  run_dir.mkdir(parents=True)
  config = {
    'data': {'path': '/srv/data/cifar10_subset.npz', 'data_dir': '', 'source': 'npz'},
    'demp': {'penalty_mask': '(?:^|/)bn/scale$'},  # a regex with '/', not a path
    'workdir_note': 'written by hand: /srv is not a path here',
  }
  (run_dir / 'config.json').write_text(json.dumps(config, indent=2))
  records = [
    {'step': 5, 'loss': 1.5},
    {'step': 10, 'event': 'preempted', 'checkpoint': f'{run_dir}/checkpoints/10'},
    {'step': 20, 'summary': {'compile_cache_dir': '/srv/shared/jax_cache', 'steps': 20}},
  ]
  (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
  (run_dir / 'summary.json').write_text(
    json.dumps({'compile_cache_dir': str(run_dir / 'jax_cache'), 'test_accuracy': 0.5})
  )
  assert sweep.collect_run(str(run_dir), str(tmp_path / 'kept'))
  kept = tmp_path / 'kept' / name
  got = json.loads((kept / 'config.json').read_text())
  assert got == {**config, 'data': {**config['data'], 'path': 'cifar10_subset.npz'}}
  assert (kept / 'config.json').read_text() == json.dumps(got, indent=2)  # formatting kept
  lines = [json.loads(line) for line in (kept / 'metrics.jsonl').read_text().splitlines()]
  assert lines[0] == records[0]
  assert lines[1]['checkpoint'] == os.path.join('checkpoints', '10')
  assert lines[2]['summary'] == {'compile_cache_dir': 'jax_cache', 'steps': 20}
  assert json.loads((kept / 'summary.json').read_text()) == {
    'compile_cache_dir': 'jax_cache',
    'test_accuracy': 0.5,
  }
  assert str(tmp_path) not in ''.join(p.read_text() for p in kept.iterdir())
  # collect compares the scrubbed summary: a run already kept is not copied again.
  assert sweep.collect(str(run_dir.parent), str(tmp_path / 'kept')) == []
  assert sweep.scrub_path('~/data/x.npz', 'path', name) == 'x.npz'
  assert sweep.scrub_path('/srv/a b', 'note', name) == '/srv/a b'  # whitespace: not a path
  assert sweep.scrub_path('../data/x.npz', 'path', name) == 'x.npz'
  assert sweep.scrub_path(f'/x/{name}', 'dir', name) == '.'


def test_a_run_that_exits_cleanly_without_a_summary_is_reported_stopped(tmp_path, monkeypatch):
  """A preempted trainer exits 0 but writes no summary: the sweep says so, keeps nothing."""
  finish = "import sys, os; os.makedirs(sys.argv[1], exist_ok=True); open(sys.argv[1] + '/s', 'w')"

  def fake_command(spec, config, workdir, python=sys.executable):
    run_dir = os.path.join(workdir, spec.name)
    name = 'summary.json' if spec.name.endswith('seed-0') else 'no_summary'
    return [python, '-c', finish.replace("'/s'", repr('/' + name)), run_dir]

  monkeypatch.setattr(sweep, 'command', fake_command)
  echoed, kept = [], str(tmp_path / 'kept')
  results = sweep.run_sweep(
    'c.py', ['method=dense;seed=0,1'], str(tmp_path / 'w'), echo=echoed.append, results_dir=kept
  )
  assert results == {'method-dense_seed-0': 0, 'method-dense_seed-1': sweep.STOPPED}
  assert any('method-dense_seed-1: stopped before the end (preempted' in e for e in echoed)
  assert os.listdir(kept) == ['method-dense_seed-0']
  err = io.StringIO()
  assert sweep.exit_status(results, err) == sweep.STOPPED
  assert (
    err.getvalue()
    == "1 runs stopped before the end (run again to resume): ['method-dense_seed-1']\n"
  )
  assert sweep.exit_status({**results, 'x': 1}, io.StringIO()) == 1
  assert sweep.exit_status({'x': 0}, io.StringIO()) == 0


def test_a_key_newer_than_a_run_takes_its_default_when_grouping(tmp_path):
  """Seeds run by older code (no demp.penalty_coupling yet) group with newer runs at the default."""
  root = str(tmp_path)
  _write(root, 's0', 'demp', 0, 0.60, 0.2, 0.5, 10.0, 0.8, 0.6)
  _write(
    root,
    's1',
    'demp',
    1,
    0.64,
    0.2,
    0.5,
    10.0,
    0.8,
    0.6,
    extra={'demp': {'peak_lambda': 5e-3, 'penalty_coupling': 'coupled'}},
  )
  _write(
    root,
    's2',
    'demp',
    2,
    0.50,
    0.2,
    0.5,
    10.0,
    0.8,
    0.6,
    extra={'demp': {'peak_lambda': 5e-3, 'penalty_coupling': 'decoupled'}},
  )
  groups = report.group_runs(report.load_runs(root))
  assert [len(g.runs) for g in groups] == [2, 1]  # s0 + s1 (coupled, the default), then s2
  assert groups[0].mean('test_accuracy') == pytest.approx(0.62)


def test_a_run_another_process_holds_is_left_untouched(tmp_path):
  # A second sweep over the same workdir must not move a live run's metrics aside.
  from demp.trainer import workdir as workdir_lib

  spec = sweep.expand(['method=dense;seed=0'])[0]
  run_dir = tmp_path / spec.name
  run_dir.mkdir()
  (run_dir / 'metrics.jsonl').write_text('{"step": 10}\n')
  fd, _ = workdir_lib.acquire(str(run_dir))  # the live run's lock
  try:
    name, rc, _ = sweep._run_one(spec, 'configs/x.py', str(tmp_path), str(tmp_path))
  finally:
    os.close(fd)
  assert (name, rc) == (spec.name, sweep.BUSY)
  assert sorted(p.name for p in run_dir.iterdir()) == ['.lock', 'metrics.jsonl']
  assert (run_dir / 'metrics.jsonl').read_text() == '{"step": 10}\n'
  err = io.StringIO()
  assert sweep.exit_status({spec.name: sweep.BUSY}, err=err) == sweep.STOPPED  # not failed
  assert 'another process is training them' in err.getvalue()
