"""Deferred prune events: silenced units equal removed ones, the switch is exact and resumable,
and every event's stall is measured."""

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
from demp.trainer import steering
from demp import folding
from demp import protocol
from tests.test_checkpoint import _losses, tiny_config  # DemP on an MLP over digits, τ = 20

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
  """Noise off: synchronous (switch_after=0) and deferred by 5 steps (0.25 × τ).

  The deferred run records, at each switch, the model and the train state just
  before it (old widths, the removed units silenced) and just after it.
  """
  out = {}
  switches = []
  switch = train.Run.switch

  def recording_switch(run):
    before = (run.model, jax.device_get(run.state), run.pending['keeps'])
    times = switch(run)
    switches.append((*before, run.model, jax.device_get(run.state)))
    return times

  for name, after in (('sync', 0.0), ('deferred', 0.25)):
    workdir = str(tmp_path_factory.mktemp(name))
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(train.Run, 'switch', recording_switch)
      summary = train.train_and_evaluate(
        tiny_config(**{'prune.switch_after': after, 'demp.noise_std': 0.0}), workdir
      )
    out[name] = {'workdir': workdir, 'summary': summary}
  out['switches'] = switches
  return out


def test_the_deferred_switch_is_exact(runs):
  """At each switch the silenced units go and nothing else changes.

  Exact by construction on any CPU: the state after the switch is the state
  before it with the units not kept sliced out (compared bit for bit with an
  independent numpy slice of the MLP's leaves), and the network computes the
  same function across the switch. That last comparison is one forward pass at
  two shapes, so it agrees to float32 rounding (a sum over <= 64 terms), not to
  the bit: XLA may block a sum differently at another width.
  """
  switches = runs['switches']
  assert len(switches) == 2  # the deferred run's removals decided at 20 and 40
  assert all(sum(int(np.sum(k)) for k in keeps.values()) < 64 for _, _, keeps, _, _ in switches)
  images = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))  # digits' shape
  for model, before, keeps, new_model, after in switches:
    k0, k1 = (np.asarray(keeps[g], bool) for g in ('hidden_0', 'hidden_1'))
    assert dict(new_model.widths) == {'hidden_0': int(k0.sum()), 'hidden_1': int(k1.sum())}
    p, q = before['params'], after['params']
    want = {
      ('dense_0', 'kernel'): p['dense_0']['kernel'][:, k0],
      ('norm_0', 'scale'): p['norm_0']['scale'][k0],
      ('norm_0', 'bias'): p['norm_0']['bias'][k0],
      ('dense_1', 'kernel'): p['dense_1']['kernel'][k0][:, k1],
      ('norm_1', 'scale'): p['norm_1']['scale'][k1],
      ('norm_1', 'bias'): p['norm_1']['bias'][k1],
      ('head', 'kernel'): p['head']['kernel'][k1],
      ('head', 'bias'): p['head']['bias'],
    }
    assert sorted(want) == sorted((m, leaf) for m in q for leaf in q[m])
    for (m, leaf), w in want.items():
      np.testing.assert_array_equal(q[m][leaf], w, err_msg=f'{m}/{leaf}')
    for g, keep in (('norm_0', k0), ('norm_1', k1)):
      for stat in ('mean', 'var'):
        np.testing.assert_array_equal(
          after['batch_stats'][g][stat], before['batch_stats'][g][stat][keep], err_msg=f'{g}/{stat}'
        )
    # The silenced units were exactly zero on their producer slices before the switch.
    assert not np.any(p['norm_0']['scale'][~k0]) and not np.any(p['dense_1']['kernel'][~k0])
    # The optimizer state: the same slicing (surgery.prune's, checked leaf by leaf above).
    _, _, sliced_opt = surgery.prune(model, before, before['opt_state'], keeps)
    for a, b in zip(jax.tree.leaves(after['opt_state']), jax.tree.leaves(sliced_opt)):
      np.testing.assert_array_equal(a, b)
    old = model.apply({'params': p, 'batch_stats': before['batch_stats']}, images, train=False)
    new = new_model.apply({'params': q, 'batch_stats': after['batch_stats']}, images, train=False)
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)


# How far the synchronous and the deferred run may end apart. Both are the same
# program, bit for bit, up to the first decision (step 20). From then on one
# trains at the new widths and the other, for 5 steps, at the old ones with the
# removed units silenced: the same function, but XLA may block its sums
# differently at another width, so the two differ by float32 rounding (on some
# CPUs not at all). The Lasso's sign(γ) turns such a 1e-8 difference on a γ at
# 0 into opposite updates of about lr = 0.05 each (Adam normalizes them), and
# that difference then spreads through training: measured 0.068 at most over
# all parameters after 60 steps on one x86 CPU, 0 on another. The bound is 5 lr,
# far below what removing the wrong units would do (O(1) differences in the
# norm scales, whose live values are near 1).
SYNC_VS_DEFERRED_ATOL = 5 * 0.05


def test_deferred_and_synchronous_runs_agree(runs):
  """Same events, widths and switch steps (exact); same losses up to the first decision (exact);
  final parameters within :data:`SYNC_VS_DEFERRED_ATOL`."""
  sync, deferred = runs['sync']['summary'], runs['deferred']['summary']
  events = [(e['step'], e['removed'], e['widths']) for e in sync['events']]
  assert [(e['step'], e['removed'], e['widths']) for e in deferred['events']] == events
  assert [s for s, removed, _ in events if removed] == [20, 40]  # units were removed
  # Removed 5 steps after the decision; a check that removes nothing has nothing to switch.
  switches = [(c['step'], c.get('switch_step')) for c in deferred['prune_costs']]
  assert switches == [(20, 25), (40, 45), (60, None)]
  assert [c['background'] for c in deferred['prune_costs']] == [True, True, False]
  assert not any(c['background'] for c in sync['prune_costs'])
  # The same program up to the first decision: the same bits.
  losses = {n: dict(_losses(runs[n]['workdir'])) for n in ('sync', 'deferred')}
  assert sorted(losses['sync']) == sorted(losses['deferred']) == [10, 20, 30, 40, 50, 60]
  assert [losses['deferred'][s] for s in (10, 20)] == [losses['sync'][s] for s in (10, 20)]
  # The same network at the end, within the bound.
  v_sync, m_sync = _final(runs['sync']['workdir'])
  v_def, m_def = _final(runs['deferred']['workdir'])
  assert m_sync['model']['widths'] == m_def['model']['widths']
  flat_sync = {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(v_sync)}
  flat_def = {jax.tree_util.keystr(k): v for k, v in jax.tree.leaves_with_path(v_def)}
  assert sorted(flat_sync) == sorted(flat_def)
  for path, a in flat_sync.items():
    np.testing.assert_allclose(flat_def[path], a, rtol=0, atol=SYNC_VS_DEFERRED_ATOL, err_msg=path)


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
