"""Tests for baselines.sparse: distributions, algorithms vs NumPy, updater invariants, trainer runs."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import math  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from baselines import sparse  # noqa: E402
from baselines.sparse import distributions, updater  # noqa: E402
from baselines.sparse import sparsity_schedules as schedules  # noqa: E402
from baselines.sparse import theoretical_flops as flops  # noqa: E402
from demp import models  # noqa: E402
from demp.trainer import train
from demp.trainer import config as config_lib

# A small network, in call order: first, a (conv), b (conv), norm, c (dense), last.
SHAPES = {
  'first': (3, 3, 3, 16),
  'a': (3, 3, 16, 32),
  'b': (3, 3, 32, 64),
  'c': (64, 128),
  'last': (128, 10),
}


def _params(seed=0, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in shapes.items():
    params[name] = {
      'kernel': jnp.asarray(rng.normal(size=shape), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=shape[-1:]), jnp.float32),
    }
    if name == 'b':
      params['norm'] = {'scale': jnp.ones(shape[-1:]), 'bias': jnp.zeros(shape[-1:])}
  return params


def _random_like(params, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)


def _np_topk(score, k):
  order = np.argsort(-score.reshape(-1), kind='stable')
  mask = np.zeros(score.size, bool)
  mask[order[:k]] = True
  return mask.reshape(score.shape)


def _updater(algorithm, sparsity=0.6, distribution='uniform', schedule=None, drop=0.3, **kw):
  dist = lambda p: distributions.layer_sparsities(p, distribution, sparsity, **kw)  # noqa: E731
  return updater.SparseUpdater(
    algorithm=algorithm,
    scheduler=schedule or schedules.PeriodicSchedule(1, 1, 1000),
    sparsity_distribution_fn=dist,
    drop_fraction_fn=(lambda t: jnp.float32(drop)) if algorithm in ('set', 'rigl') else None,
  )


# ----------------------------------------------------------------------------
# Distributions.


def test_uniform_masks_reach_sparsity_per_layer_and_skip_first_last_norm_bias():
  params = _params()
  u = _updater('set', sparsity=0.7)
  state = u.wrap_optax(optax.sgd(0.1)).init(params)
  got = updater.mask_sparsities(state.masks)
  assert sorted(got) == ['a/kernel', 'b/kernel', 'c/kernel']
  for path, s in got.items():
    n = math.prod(SHAPES[path.split('/')[0]])
    assert int(np.sum(state.masks[path.split('/')[0]]['kernel'])) == round(0.3 * n)
    assert abs(s - 0.7) <= 0.5 / n
  for name in ('first', 'last', 'norm'):
    assert all(m is None for m in state.masks[name].values())


def test_erk_matches_closed_form_and_masks_reach_it():
  s = 0.8
  pruned = {k: SHAPES[k] for k in ('a', 'b', 'c')}
  got = distributions.erk(pruned, s)
  n_total = sum(math.prod(v) for v in pruned.values())
  eps = (1 - s) * n_total / sum(sum(v) for v in pruned.values())
  for k, shape in pruned.items():
    assert got[k] == pytest.approx(1 - eps * sum(shape) / math.prod(shape), abs=1e-12)
  # Same numbers through the updater's masks (first/last held dense).
  state = (
    _updater('rigl', sparsity=s, distribution='erk').wrap_optax(optax.sgd(0.1)).init(_params())
  )
  for k, shape in pruned.items():
    n = math.prod(shape)
    assert int(np.sum(state.masks[k]['kernel'])) == round((1 - got[k]) * n)
  active = sum(int(np.sum(state.masks[k]['kernel'])) for k in pruned)
  assert abs(active - (1 - s) * n_total) <= len(pruned)


def test_erk_redistributes_a_saturated_layer():
  s = 0.8
  shapes = {'a': (3, 3, 16, 32), 'b': (3, 3, 32, 64), 'tiny': (4, 4)}  # tiny: ε·8/16 > 1
  got = distributions.erk(shapes, s)
  assert got['tiny'] == 0.0
  n_total = sum(math.prod(v) for v in shapes.values())
  nonzeros = sum((1 - got[k]) * math.prod(v) for k, v in shapes.items())
  assert nonzeros == pytest.approx((1 - s) * n_total)
  eps = ((1 - s) * n_total - 16) / (sum(shapes['a']) + sum(shapes['b']))
  for k in ('a', 'b'):
    assert got[k] == pytest.approx(1 - eps * sum(shapes[k]) / math.prod(shapes[k]))


def test_custom_map_overrides_and_unknown_distribution_raises():
  params = _params()
  got = distributions.layer_sparsities(
    params, 'uniform', 0.5, custom_sparsity={r'^first/': 0.25, r'^b/': 0.0}
  )
  assert got['first']['kernel'] == 0.25 and got['a']['kernel'] == 0.5
  assert got['b']['kernel'] is None and got['last']['kernel'] is None
  assert got['norm']['scale'] is None and got['a']['bias'] is None
  with pytest.raises(ValueError, match='distribution'):
    distributions.layer_sparsities(params, 'random', 0.5)
  with pytest.raises(ValueError, match='sparsity'):
    distributions.layer_sparsities(params, 'erk', 1.0)


# ----------------------------------------------------------------------------
# Algorithms against NumPy.


@pytest.mark.parametrize('algorithm', ['magnitude', 'saliency'])
def test_pruning_masks_equal_numpy_reference(algorithm):
  rng = np.random.default_rng(1)
  shapes = {'x': (5, 7), 'y': (3, 3, 2, 4), 'z': (6, 6)}
  w = {k: {'kernel': rng.normal(size=v).astype(np.float32)} for k, v in shapes.items()}
  g = {k: {'kernel': rng.normal(size=v).astype(np.float32)} for k, v in shapes.items()}
  masks = {k: {'kernel': rng.random(v) > 0.3} for k, v in shapes.items()}
  u = _updater(algorithm, sparsity=0.6, prune_first_layer=True, prune_last_layer=True)
  targets = jax.tree.map(jnp.float32, u.sparsity_distribution_fn(w))
  new = jax.jit(u.update_masks)(masks, w, g, targets, jnp.int32(5))
  for k, shape in shapes.items():
    score = (
      np.abs(w[k]['kernel'])
      if algorithm == 'magnitude'
      else np.abs(w[k]['kernel'] * g[k]['kernel'])
    )
    score = np.where(masks[k]['kernel'], score, -np.inf)
    expected = _np_topk(score, round(0.4 * math.prod(shape)))
    np.testing.assert_array_equal(np.asarray(new[k]['kernel']), expected)


def test_one_shot_magnitude_through_updater_zeroes_exactly_the_reference():
  params = _params(2)
  u = _updater('magnitude', sparsity=0.75, schedule=schedules.OneShotSchedule(2))
  tx = u.wrap_optax(optax.sgd(0.0))  # updates are -0: the candidate weights are the weights
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda p, s: tx.update(grads, s, p))
  p = params
  for _ in range(2):
    updates, state = step(p, state)
    p = optax.apply_updates(p, updates)
  for k in ('a', 'b', 'c'):
    w = np.asarray(params[k]['kernel'])
    keep = _np_topk(np.abs(w), round(0.25 * w.size))
    np.testing.assert_array_equal(np.asarray(state.masks[k]['kernel']), keep)
    np.testing.assert_array_equal(np.asarray(p[k]['kernel']), np.where(keep, w, 0.0))
  np.testing.assert_array_equal(
    np.asarray(p['first']['kernel']), np.asarray(params['first']['kernel'])
  )


# ----------------------------------------------------------------------------
# Dynamic sparse training.


def test_rigl_regrows_exactly_the_top_gradient_positions():
  params = _params(3)
  u = _updater('rigl', sparsity=0.7, drop=0.3)
  tx = u.wrap_optax(optax.sgd(0.0))
  state = tx.init(params)
  grads = _random_like(params, 7)
  _, new_state = jax.jit(tx.update)(grads, state, params)
  for k in ('a', 'b', 'c'):
    m0 = np.asarray(state.masks[k]['kernel'])
    w, g = np.asarray(params[k]['kernel']), np.asarray(grads[k]['kernel'])
    n_active = int(m0.sum())
    n_drop = int(np.floor(np.float32(0.3) * np.float32(n_active)))
    kept = _np_topk(np.where(m0, np.abs(w), -np.inf), n_active - n_drop)
    grown = _np_topk(np.where(kept, -np.inf, np.abs(g)), n_drop)
    new = np.asarray(new_state.masks[k]['kernel'])
    np.testing.assert_array_equal(new, kept | grown)
    assert n_drop > 0 and (new & ~m0).sum() > 0
    # Every newly active position outranks, by |g|, every position left inactive.
    assert np.abs(g)[new & ~m0].min() >= np.abs(g)[~new].max()


@pytest.mark.parametrize('algorithm', ['set', 'rigl'])
def test_dst_keeps_sparsity_zeroes_regrown_weights_and_moments_without_recompiling(algorithm):
  params = _params(4)
  u = _updater(
    algorithm,
    sparsity=0.8,
    distribution='erk',
    schedule=schedules.PeriodicSchedule(2, 2, 100),
    drop=0.3,
  )
  tx = u.wrap_optax(optax.adam(1e-2))
  state = tx.init(params)
  counts = {k: int(np.sum(state.masks[k]['kernel'])) for k in ('a', 'b', 'c')}
  traces = []

  @jax.jit
  def step(p, s, g):
    traces.append(1)
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  p = params
  for i in range(1, 7):
    old = jax.tree.map(np.asarray, state.masks)
    p, state = step(p, state, _random_like(p, i))
    adam = state.inner_state[0]
    grown_total = 0
    for k in ('a', 'b', 'c'):
      new = np.asarray(state.masks[k]['kernel'])
      assert int(new.sum()) == counts[k]
      w = np.asarray(p[k]['kernel'])
      assert np.all(w[~new] == 0.0)
      grown = new & ~old[k]['kernel']
      grown_total += int(grown.sum())
      assert np.all(w[grown] == 0.0)
      assert np.all(np.asarray(adam.mu[k]['kernel'])[grown] == 0.0)
      assert np.all(np.asarray(adam.nu[k]['kernel'])[grown] == 0.0)
    assert (grown_total > 0) == (i % 2 == 0)
  # Mask-update and plain steps share one trace: the schedule is a traced lax.cond.
  assert len(traces) == 1 and int(state.count) == 6


# ----------------------------------------------------------------------------
# Schedules and FLOPs.


def test_schedules():
  def update_steps(schedule, total):
    steps = np.arange(1, total + 1)
    return steps[np.asarray(schedule.is_mask_update_iter(steps))].tolist()

  poly = schedules.default_schedule('polynomial', 1000, update_freq=150)  # window 300..800
  assert (poly.update_start_step, poly.update_end_step) == (300, 800)
  assert update_steps(poly, 1000) == [300, 450, 600, 750, 800]
  np.testing.assert_allclose(
    poly.get_sparsity_at_step(0.9, jnp.array([100, 300, 550, 800, 999])),
    [0.0, 0.0, 0.9 * (1 - 0.5**3), 0.9, 0.9],
    rtol=1e-6,
  )
  per = schedules.default_schedule('periodic', 10_000)  # the DemP authors' defaults
  assert update_steps(per, 10_000) == list(range(3000, 8001, 500))
  assert update_steps(schedules.default_schedule('one_shot', 1000), 1000) == [300]
  drop = schedules.cosine_drop_fraction(0.3, 300, 800)
  np.testing.assert_allclose(drop(jnp.array([300, 550, 800])), [0.3, 0.15, 0.0], atol=1e-7)
  with pytest.raises(ValueError, match='schedule'):
    schedules.default_schedule('cubic', 1000)


def test_flops_from_layer_shapes():
  model = models.build('convnet', 10)
  records = flops.layer_records(model, (32, 32, 3))
  assert flops.layer_order(records) == ['conv_0', 'conv_1', 'conv_2', 'conv_3', 'head']
  dense = {r.path: r.forward_flops for r in records}
  assert dense['conv_1'] == 2 * 3 * 3 * 32 * 64 * 16 * 16
  assert dense['head'] == 2 * 256 * 10
  sp = {'conv_1': 0.5, 'conv_2': 0.75, 'conv_3': 0.9}
  report = flops.flops_report(records, sp, 'set', schedules.PeriodicSchedule(10, 10, 50), 100)
  expected = sum(dense[k] * (1 - sp.get(k, 0.0)) for k in dense) / sum(dense.values())
  assert report['inference_flops_rel'] == pytest.approx(expected)
  assert report['training_flops_rel'] == pytest.approx(expected)
  rigl = flops.flops_report(records, sp, 'rigl', schedules.PeriodicSchedule(10, 10, 50), 100)
  assert rigl['training_flops_rel'] == pytest.approx(expected + 5 * (1 - expected) / 300)
  mag = flops.flops_report(records, sp, 'magnitude', schedules.OneShotSchedule(50), 100)
  assert mag['training_flops_rel'] == pytest.approx((50 + 50 * expected) / 100)


# ----------------------------------------------------------------------------
# The trainer.


def test_config_errors_name_the_key():
  c = config_lib.base_config()
  c.baselines = {'distribution': 'gaussian'}
  with pytest.raises(ValueError, match='baselines.distribution'):
    sparse.resolve(c)
  c.baselines = {'target_sparsity': 1.5}
  with pytest.raises(ValueError, match='baselines.target_sparsity'):
    sparse.resolve(c)
  c.baselines = {'custom_sparsity': 'conv_1=0.5;head'}
  with pytest.raises(ValueError, match='baselines.custom_sparsity'):
    sparse.resolve(c)
  c.baselines = {'custom_sparsity': '^conv_0/=0.3;head=0.5', 'update_every': 7}
  r = sparse.resolve(c)
  assert dict(r.custom_sparsity) == {'^conv_0/': 0.3, 'head': 0.5} and r.update_every == 7
  c.baselines = {'custom_sparsity': {'conv_[12]/kernel': 0.5}}
  assert dict(sparse.resolve(c).custom_sparsity) == {'conv_[12]/kernel': 0.5}


@pytest.mark.parametrize('method', ['magnitude', 'saliency', 'set', 'rigl'])
def test_end_to_end_on_digits(method, tmp_path):
  c = config_lib.base_config()
  c.method = method
  c.model.name = 'mlp'
  c.model.widths = [64, 64]
  c.data.source = 'digits'
  c.batch_size = 32
  c.num_steps = 30
  c.optimizer.learning_rate = 3e-3
  c.log_every = 30
  c.progress_bar = False
  c.baselines = {
    'target_sparsity': 0.5,
    'update_every': 5,
    'start_fraction': 0.2,
    'end_fraction': 0.8,
  }
  summary = train.train_and_evaluate(c, str(tmp_path))
  # Only dense_1 (64 x 64) is pruned: the first and last layers are held dense.
  expected = 0.5 * 64 * 64 / summary['dense_params']
  assert summary['weight_sparsity'] == pytest.approx(expected, abs=3 / summary['dense_params'])
  assert summary['test_accuracy'] > 0.3
  assert summary['neuron_sparsity'] == 0.0
