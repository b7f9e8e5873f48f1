"""The one timing helper: warm-up, interleaved rounds, median."""

import pytest

from demp import benchmark


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
