"""The one timing helper: warm-up, interleaved rounds, median."""

import pytest

from tools import benchmark


def test_interleaved_times_warms_up_then_interleaves_rounds(monkeypatch):
  clock = iter(range(1000))
  monkeypatch.setattr(benchmark.time, 'perf_counter', lambda: float(next(clock)))
  order = []
  fns = {'a': lambda: order.append('a'), 'b': lambda: order.append('b')}
  times = benchmark.interleaved_times(fns, rounds=3, steps_per_round=2, warmup=2)
  # Warm-up: 2 calls each, first a then b; then 3 rounds of (2 x a, 2 x b).
  assert order == ['a', 'a', 'b', 'b'] + ['a', 'a', 'b', 'b'] * 3
  # The fake clock ticks once per perf_counter call: t1 - t0 = 1 for 2 calls -> 0.5 s each.
  assert times == {'a': [0.5, 0.5, 0.5], 'b': [0.5, 0.5, 0.5]}
  assert benchmark.median_times({'a': [3.0, 1.0, 2.0], 'b': [5.0, 4.0]}) == {'a': 2.0, 'b': 4.5}


def test_random_keeps_remove_the_asked_fraction():
  class Model:
    widths = {'g': 8}

    def unit_groups(self):
      return [type('G', (), {'name': 'g'})()]

  keeps = benchmark.random_keeps(Model(), 0.25)
  assert keeps['g'].sum() == 6
  with pytest.raises(ValueError, match='sparsity=1.0'):
    benchmark.random_keeps(Model(), 1.0)


def test_event_overhead_rows_read_finished_runs_and_compare_to_dense(tmp_path):
  import json

  import ml_collections

  def summary(wall, costs):
    stalls = [c['stall_s'] for c in costs]
    return {
      'wall_time_s': wall,
      'test_accuracy': 0.5,
      'weight_sparsity': 0.25,
      'compile_time_s': 3.0,
      'prune_costs': costs,
      'prune_overhead_s': sum(stalls),
      'prune_overhead_share': sum(stalls) / wall,
      'prune_stall_max_s': max(stalls, default=0.0),
      'prune_stall_max_steps': max((c['stall_steps'] for c in costs), default=0.0),
      'prune_compile_background_s': sum(c['compile_s'] for c in costs if c['background']),
    }

  cost = dict(removed=True, check_s=0.5, compile_s=2.0)
  runs = {
    'dense': summary(100.0, []),
    'demp_switch_after-0': summary(
      120.0, [dict(cost, stall_s=3.0, stall_steps=30.0, background=False)] * 2
    ),
    'demp_switch_after-0.1': summary(
      110.0, [dict(cost, stall_s=1.0, stall_steps=10.0, background=True)] * 2
    ),
  }
  for name, s in runs.items():
    (tmp_path / name).mkdir()
    (tmp_path / name / 'summary.json').write_text(json.dumps(s))
  config = ml_collections.ConfigDict({'method': 'demp', 'prune': {'switch_after': 0.1}})
  rows = benchmark.event_overhead_runs(config, str(tmp_path), (0.0, 0.1), echo=lambda _: None)
  assert [r['variant'] for r in rows] == ['dense', 'demp switch_after=0', 'demp switch_after=0.1']
  assert [r['wall_vs_dense'] for r in rows] == pytest.approx([1.0, 1.2, 1.1])
  assert [r['overhead_share'] for r in rows] == pytest.approx([0.0, 6 / 120, 2 / 110])
  assert [r['compile_background_s'] for r in rows] == [0.0, 0.0, 4.0]
  assert [r['stall_median_steps'] for r in rows] == [0.0, 30.0, 10.0]
  table = benchmark.format_overhead_table(rows)
  assert '| demp switch_after=0.1 | 110.0 | 1.100 | 2 (2) | 2.00 | 1.82% |' in table


def test_replay_multiple_of_rounds_the_kept_widths_up():
  dense = {'a': 16, 'b': 32}
  events = [
    # kept with m = 1 | with m = 8
    {'event': 'prune', 'live': {'a': 16, 'b': 30}},  # (16, 30) | (16, 32)
    {'event': 'target'},
    {'event': 'prune', 'live': {'a': 9, 'b': 29}},  # (9, 29) | (16, 32)
    {'event': 'prune', 'live': {'a': 7, 'b': 17}},  # (7, 17) | (8, 24)
    {'event': 'prune', 'live': {'a': 0, 'b': 17}},  # (1, 17): min_width 1 | (8, 24)
  ]
  exact = benchmark.replay_multiple_of(events, dense, 1)
  assert exact == {'widths': {'a': 1, 'b': 17}, 'architectures': 5}
  by8 = benchmark.replay_multiple_of(events, dense, 8)
  assert by8 == {'widths': {'a': 8, 'b': 24}, 'architectures': 2}  # (16, 32), then (8, 24)


def test_optimizer_times_compares_optimizers_side_by_side():
  config = benchmark.config_lib.base_config()
  variants = {'adam': None, 'demp': benchmark.OPTIMIZER_VARIANTS['demp'](config)}
  r = benchmark.optimizer_times(
    'mlp',
    variants=variants,
    image_hw=4,
    batch_size=4,
    rounds=2,
    steps_per_round=1,
    update_rounds=2,
    model_kwargs={'widths': [8]},
  )
  assert r['step_ratio']['adam'] == r['update_ratio']['adam'] == (1.0, 1.0, 1.0)
  assert len(r['round_times_s']['demp']) == 2 and len(r['update_round_times_s']['demp']) == 2
  assert r['update_s']['demp'] > 0 and r['step_s']['demp'] > 0
  table = benchmark.format_optimizer_table(r)
  assert table.count('\n') == 3 and '| demp |' in table


def test_fit_line_reproduces_a_line():
  a, b = benchmark.fit_line([1.0, 3.0, 7.0], [2.5, 6.5, 14.5])  # y = 2x + 0.5
  assert (a, b) == pytest.approx((2.0, 0.5), rel=1e-12)
  with pytest.raises(ValueError, match='two distinct'):
    benchmark.fit_line([1.0, 1.0], [2.0, 3.0])


def test_step_breakdown_table_and_fit_on_a_tiny_mlp():
  """Two widths of the quickstart's MLP and a pruned copy, a few steps: structure, no timings."""
  from configs import quickstart

  def config_fn(width):
    c = quickstart.get_config()
    c.model.widths = (int(32 * width), int(16 * width))
    c.batch_size, c.num_steps, c.prune.every = 16, 10, 10
    c.prune.num_examples, c.prune.batch_size = 32, 32
    return c

  result = benchmark.step_breakdown(
    config_fn, [0.5, 1.0], sparsity=0.5, rounds=2, steps_per_round=1, warmup=1
  )
  rows = result['rows']
  assert [r['name'] for r in rows] == ['width 0.5', 'width 1', 'width 1 pruned 0.5']
  assert [r['widths'] for r in rows] == [
    {'hidden_0': 16, 'hidden_1': 8},
    {'hidden_0': 32, 'hidden_1': 16},
    {'hidden_0': 16, 'hidden_1': 8},
  ]
  for r in rows:
    assert all(r[p] >= 0 for p in benchmark.BREAKDOWN_PARTS)
    assert all(len(r['round_times_s'][p]) == 2 for p in benchmark.BREAKDOWN_PARTS)
    assert r['step_s'] == r['dispatch_s'] + r['compute_s']
    assert r['total_s'] == pytest.approx(sum(r[p] for p in benchmark.BREAKDOWN_PARTS))
  assert rows[0]['flops'] < rows[1]['flops'] and rows[2]['flops'] < rows[1]['flops']
  # A line through two widths passes through both: the fit reproduces its inputs.
  for r in rows[:2]:
    assert r['fit_s'] == pytest.approx(r['step_s'], rel=1e-9, abs=1e-12)
  fit = result['fit']
  assert fit['b_fraction'] == pytest.approx(fit['b_s'] / rows[1]['step_s'])
  table = benchmark.format_breakdown_table(result)
  assert table.count('\n| width') == 3 and 'of the widest dense step' in table
