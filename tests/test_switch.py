"""Deferred prune events: silenced units equal removed ones, the switch is exact and resumable,
and every event's stall is measured (issue 15)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demp.trainer import checkpoint, train
from demp import deadunits, models, surgery
from demp.trainer import config as config_lib
from tests.test_checkpoint import tiny_config  # DemP on an MLP over digits, τ = 20
from demp.trainer import steering
from demp import folding
from demp import protocol

jax.config.update('jax_numpy_rank_promotion', 'raise')

# (model kwargs, input shape): a flatten consumer, and residual streams shared by blocks.
MODELS = {
  'convnet_flatten': (dict(name='convnet', widths=[8, 6], head='flatten'), (4, 8, 8, 3)),
  'resnet18': (dict(name='resnet18', width_multiplier=1 / 16), (4, 16, 16, 3)),
}


def _random_keeps(model, seed: int) -> dict[str, np.ndarray]:
  """Removes about a third of every group's units, live ones included."""
  rng = np.random.default_rng(seed)
  keeps = {}
  for name, width in model.widths.items():
    keep = rng.random(width) > 1 / 3
    keep[rng.integers(width)] = True
    keeps[name] = keep
  return keeps


def _nonzero_state(model, x):
  """Variables with non-trivial BN statistics, and an Adam state after two steps."""
  variables = model.init(jax.random.key(0), x, train=False)
  variables = jax.tree.map(
    lambda v: v + 0.05 * jnp.cos(jnp.arange(v.size)).reshape(v.shape), variables
  )
  tx = optax.adam(1e-2)
  opt_state = tx.init(variables['params'])

  def loss(p):
    return jnp.sum(model.apply({**variables, 'params': p}, x, train=False) ** 2)

  params = variables['params']
  for _ in range(2):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  return {**variables, 'params': params}, tx, opt_state


@pytest.mark.parametrize('which', sorted(MODELS))
def test_silenced_units_compute_what_removed_units_compute(which):
  kwargs, shape = MODELS[which]
  kwargs = dict(kwargs)
  model = models.build(kwargs.pop('name'), 10, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  variables, tx, opt_state = _nonzero_state(model, x)
  keeps = _random_keeps(model, seed=3)
  small, small_vars, small_opt = surgery.prune(model, variables, opt_state, keeps)
  quiet_vars, quiet_opt = surgery.silence(model, variables, opt_state, keeps)
  assert surgery.silences_exactly(model)
  # The same function, in eval and in train mode (batch statistics).
  for train_mode in (False, True):
    kw = {'mutable': ['batch_stats']} if train_mode else {}
    big = model.apply(quiet_vars, x, train=train_mode, **kw)
    cut = small.apply(small_vars, x, train=train_mode, **kw)
    big, cut = (big[0], cut[0]) if train_mode else (big, cut)
    np.testing.assert_allclose(big, cut, rtol=1e-5, atol=1e-5)
  # Slicing the silenced state gives the pruned state: the kept entries are untouched...
  _, resliced_vars, resliced_opt = surgery.prune(model, quiet_vars, quiet_opt, keeps)
  for a, b in zip(jax.tree.leaves(resliced_vars), jax.tree.leaves(small_vars)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(resliced_opt), jax.tree.leaves(small_opt)):
    np.testing.assert_array_equal(a, b)
  # ... and the removed ones are zero in params and moments, so a step leaves them at zero.
  removed = sum(np.size(p) for p in jax.tree.leaves(variables['params'])) - sum(
    np.size(p) for p in jax.tree.leaves(small_vars['params'])
  )
  zeros = sum(int(np.sum(np.asarray(p) == 0)) for p in jax.tree.leaves(quiet_vars['params']))
  assert zeros >= removed > 0

  def loss(p):
    return jnp.sum(model.apply({**quiet_vars, 'params': p}, x, train=False) ** 2)

  @jax.jit
  def step(params, opt_state):
    updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params, _ = step(quiet_vars['params'], quiet_opt)
  after = sum(int(np.sum(np.asarray(p) == 0)) for p in jax.tree.leaves(params))
  assert after >= removed
  # The shapes after the surgery, computed from shapes alone.
  shapes = surgery.pruned_shapes(
    model,
    {
      'params': variables['params'],
      'batch_stats': variables['batch_stats'],
      'opt_state': opt_state,
    },
    keeps,
  )
  real = {
    'params': small_vars['params'],
    'batch_stats': small_vars['batch_stats'],
    'opt_state': small_opt,
  }
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, real)


def test_the_death_check_compiled_ahead_gives_the_same_verdict():
  model = models.build('convnet', 10, widths=[8, 6], head='flatten')
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  variables, _, _ = _nonzero_state(model, x)
  specs = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), (variables, x))
  compiled = deadunits.compile_unit_stats(model, *specs, criterion='eps', batch_size=4)
  alive = []
  for eps in (0.01, 1e3):  # eps is an argument of the compiled pass, not baked in
    want = deadunits.unit_stats(model, variables, x, eps=eps, criterion='eps', batch_size=4)
    got = deadunits.unit_stats(
      model, variables, x, eps=eps, criterion='eps', batch_size=4, compiled=compiled
    )
    assert jax.tree.map(np.array_equal, got, want) == jax.tree.map(lambda _: True, want)
    alive.append(sum(int(np.sum(a)) for a in want['alive'].values()))
  assert alive[0] > alive[1]  # a larger eps finds more units dead


def _final(workdir):
  _, variables, meta = checkpoint.load(workdir)
  return variables, meta


def _records(workdir, event):
  lines = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r for r in lines if r.get('event') == event]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Noise off: synchronous (switch_after=0) and deferred by 5 steps (0.25 × τ)."""
  out = {}
  for name, after in (('sync', 0.0), ('deferred', 0.25)):
    workdir = str(tmp_path_factory.mktemp(name))
    summary = train.train_and_evaluate(
      tiny_config(**{'prune.switch_after': after, 'demp.noise_std': 0.0}), workdir
    )
    out[name] = {'workdir': workdir, 'summary': summary}
  return out


def test_the_deferred_switch_is_exact(runs):
  sync, deferred = runs['sync']['summary'], runs['deferred']['summary']
  events = [(e['step'], e['removed'], e['widths']) for e in sync['events']]
  assert [(e['step'], e['removed'], e['widths']) for e in deferred['events']] == events
  assert [s for s, removed, _ in events if removed] == [20, 40]  # units were removed
  # Removed 5 steps after the decision; a check that removes nothing has nothing to switch.
  switches = [(c['step'], c.get('switch_step')) for c in deferred['prune_costs']]
  assert switches == [(20, 25), (40, 45), (60, None)]
  assert [c['background'] for c in deferred['prune_costs']] == [True, True, False]
  assert not any(c['background'] for c in sync['prune_costs'])
  # The same network at the end (other shapes in between: float rounding only).
  v_sync, m_sync = _final(runs['sync']['workdir'])
  v_def, m_def = _final(runs['deferred']['workdir'])
  assert m_sync['model']['widths'] == m_def['model']['widths']
  for a, b in zip(jax.tree.leaves(v_sync), jax.tree.leaves(v_def)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert abs(sync['test_accuracy'] - deferred['test_accuracy']) <= 1 / 120  # one eval example


def test_every_event_reports_its_stall(runs):
  for name in ('sync', 'deferred'):
    summary, workdir = runs[name]['summary'], runs[name]['workdir']
    costs = summary['prune_costs']
    assert [c['step'] for c in costs] == [20, 40, 60]
    assert _records(workdir, 'prune_cost') == json.loads(json.dumps(costs))
    for c in costs:
      assert c['stall_s'] >= c['decision_s'] >= c['check_s'] > 0
      assert c['step_s'] > 0 and c['stall_steps'] == pytest.approx(c['stall_s'] / c['step_s'])
    total = sum(c['stall_s'] for c in costs)
    assert summary['prune_overhead_s'] == pytest.approx(total)
    assert summary['prune_overhead_share'] == pytest.approx(total / summary['wall_time_s'])
    assert 0 < summary['prune_overhead_share'] < 1
  # A synchronous event's stall includes compiling the new step; a deferred one's does not.
  sync_first = runs['sync']['summary']['prune_costs'][0]  # removed units
  deferred_first = runs['deferred']['summary']['prune_costs'][0]
  assert sync_first['stall_s'] == pytest.approx(sync_first['decision_s'] + sync_first['compile_s'])
  assert deferred_first['stall_s'] == pytest.approx(
    deferred_first['decision_s'] + deferred_first['switch_s']
  )
  assert deferred_first['switch_s'] >= deferred_first['wait_s'] >= 0


def test_resume_between_decision_and_switch_is_bit_identical(runs, tmp_path):
  config = tiny_config(**{'prune.switch_after': 0.25, 'demp.noise_std': 0.0})
  workdir = str(tmp_path)
  out = train.train_and_evaluate(config, workdir, stop_after=22)  # decided at 20, switch at 25
  assert out['preempted'] and sum(out['widths'].values()) == 64  # still the old widths
  model, variables, _ = checkpoint.load(workdir)  # loading applies the pending removal
  pruned = runs['deferred']['summary']['events'][0]['widths']
  assert dict(model.widths) == pruned and sum(pruned.values()) < 64
  assert variables['params']['dense_0']['kernel'].shape[-1] == pruned['hidden_0']
  summary = train.train_and_evaluate(config, workdir)
  assert summary['resumed_at'] == [22]
  ref = runs['deferred']['summary']
  assert [c.get('switch_step') for c in summary['prune_costs']] == [25, 45, None]
  v_ref, m_ref = _final(runs['deferred']['workdir'])
  v_res, m_res = _final(workdir)
  assert m_res['model']['widths'] == m_ref['model']['widths']
  for a, b in zip(jax.tree.leaves(v_res), jax.tree.leaves(v_ref)):
    np.testing.assert_array_equal(a, b)
  assert summary['test_accuracy'] == ref['test_accuracy']


@pytest.mark.parametrize('value', [-0.1, 1.0, 2.5])
def test_switch_after_must_be_a_fraction(value):
  c = tiny_config(**{'prune.switch_after': value})
  with pytest.raises(ValueError, match=r'prune.switch_after=.*\[0, 1\)'):
    config_lib.validate_config(c)


def test_the_target_controller_measures_a_pending_prune_as_done(tmp_path):
  """Before its switch a deferred prune already counts: units, weights and FLOPs as after it."""

  config = tiny_config(**{'prune.switch_after': 0.25})
  run, train_iter = train.init_run(config)
  run.compile(next(train_iter))
  run.step = 20
  keeps = {name: np.arange(w) % 3 != 0 for name, w in run.model.widths.items()}
  assert run.prune(keeps, defer=True) and run.pending['switch_step'] == 25
  assert sum(run.model.widths.values()) == 64  # not switched yet
  before = {kind: steering.measure(run, kind) for kind in steering.MEASURES}
  run.switch()
  after = {kind: steering.measure(run, kind) for kind in steering.MEASURES}
  assert sum(run.model.widths.values()) == 42
  assert before == pytest.approx(after, abs=1e-6) and after['units'] == pytest.approx(22 / 64)


@pytest.mark.parametrize('which', sorted(MODELS))
def test_revived_units_leave_the_function_unchanged_and_learn(which):
  kwargs, shape = MODELS[which]
  kwargs = dict(kwargs)
  model = models.build(kwargs.pop('name'), 10, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  variables, tx, opt_state = _nonzero_state(model, x)
  wake = {k: ~v for k, v in _random_keeps(model, seed=5).items()}

  # Dead units: their norms' scale and offset at 0 (the penalty's end point); consumers as they are.
  def norm_slices(g):
    modules = {s.path[:-1] for s in g.producers if s.path[-1] == 'scale'}
    return tuple(
      s for s in g.producers if s.path[:-1] in modules and s.path[-1] in ('scale', 'bias')
    )

  norms = [
    dataclasses.replace(g, producers=norm_slices(g), consumers=())
    for g in protocol.unit_groups(model)
  ]
  dead = surgery.slice_variables(
    variables, norms, {k: ~v for k, v in wake.items()}, op=surgery._zero
  )  # pylint: disable=protected-access
  variables = {**variables, 'params': dead['params']}
  woke_vars, woke_opt, woken = surgery.revive(model, variables, opt_state, wake)
  assert woken == {k: int(v.sum()) for k, v in wake.items() if v.any()}
  for train_mode in (False, True):
    kw = {'mutable': ['batch_stats']} if train_mode else {}
    before = model.apply(variables, x, train=train_mode, **kw)
    after = model.apply(woke_vars, x, train=train_mode, **kw)
    before, after = (before[0], after[0]) if train_mode else (before, after)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  params = woke_vars['params']
  for g in protocol.unit_groups(model):
    mask = wake[g.name]
    for s in g.producers:
      leaf = np.asarray(folding._leaf(params, s.path))  # pylint: disable=protected-access
      old = np.asarray(folding._leaf(variables['params'], s.path))  # pylint: disable=protected-access
      if s not in norm_slices(g):
        continue
      want = 1.0 if s.path[-1] == 'scale' else 0.0
      np.testing.assert_array_equal(leaf[mask], want)  # the norm at a fresh norm's values
      np.testing.assert_array_equal(leaf[~mask], old[~mask])  # the others untouched
  # The moments of the touched entries are zero; the changed params differ only there.
  changed = sum(
    int(np.sum(np.asarray(a) != np.asarray(b)))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(variables['params']))
  )
  moments_zeroed = sum(
    int(np.sum((np.asarray(a) == 0) & (np.asarray(b) != 0)))
    for a, b in zip(jax.tree.leaves(woke_opt), jax.tree.leaves(opt_state))
  )
  assert changed > 0 and moments_zeroed > 0

  # One step: the consumers of the woken units get a gradient (they are active again).
  def loss(p):
    return jnp.sum(model.apply({**woke_vars, 'params': p}, x, train=False) ** 2)

  grads = jax.grad(loss)(params)
  g = next(g for g in protocol.unit_groups(model) if wake[g.name].any())
  s = g.consumers[0]
  grad = np.moveaxis(np.asarray(folding._leaf(grads, s.path)), s.axis, 0)  # pylint: disable=protected-access
  width = model.widths[g.name]
  woken_rows = grad.reshape(-1, width, *grad.shape[1:])[:, wake[g.name]]
  assert np.abs(woken_rows).max() > 0
