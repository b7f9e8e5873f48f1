"""Structured baselines: gate scores in closed form, schedules, triggers, selection, end to end."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from baselines import config as config_lib  # noqa: E402
from baselines import gates, snap  # noqa: E402
from configs import quickstart  # noqa: E402
from demp import surgery  # noqa: E402
from demp.trainer import train
from demp.models import build  # noqa: E402

# ----------------------------------------------------------------------------
# Scores against closed forms on x -> relu(x W1 + b1) ⊙ c -> W2 + b2 -> CE.


def _random_variables(model, image_shape, seed=0):
  """Variables of ``model`` drawn with NumPy (no init compile: tests stay fast)."""
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1,) + image_shape), train=False)
  )
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), shapes)
  if 'batch_stats' in variables:  # positive running variances
    variables['batch_stats'] = jax.tree.map(jnp.abs, variables['batch_stats'])
  return variables


def _two_layer():
  model = build('mlp', 3, widths=[5], norm=False)
  variables = _random_variables(model, (2, 2, 1))
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.normal(size=(2, 4, 2, 2, 1)), jnp.float32)  # 2 batches of 4
  labels = jnp.asarray(rng.integers(0, 3, (2, 4)), jnp.int32)
  return model, variables, images, labels


def _numpy(variables, images, labels):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  w1, b1 = p['dense_0']['kernel'], p['dense_0']['bias']
  w2, b2 = p['head']['kernel'], p['head']['bias']
  x = np.asarray(images, np.float64).reshape(images.shape[0], images.shape[1], -1)
  y = np.eye(3)[np.asarray(labels)]
  return w1, b1, w2, b2, x, y


def _forward(w1, b1, w2, b2, x_d):
  pre = x_d @ w1 + b1
  h = np.maximum(pre, 0.0)
  z = h @ w2 + b2
  prob = np.exp(z - z.max())
  return pre, h, prob / prob.sum()


def _snap_closed_form(variables, images, labels):
  """∂L/∂c_j = mean_n h_nj (W2 (p_n - y_n))_j, summed over batches."""
  w1, b1, w2, b2, x, y = _numpy(variables, images, labels)
  total = np.zeros(5)
  for xb, yb in zip(x, y):
    for xn, yn in zip(xb, yb):
      _, h, prob = _forward(w1, b1, w2, b2, xn)
      total += h * (w2 @ (prob - yn)) / len(xb)
  return np.abs(total)


def _crop_s_closed_form(variables, images, labels):
  """∂/∂c_j of F = gᵀ∇_θL, written out with the softmax Jacobian (see the comments)."""
  w1, b1, w2, b2, x, y = _numpy(variables, images, labels)
  # g = Σ_b ∇_θ L_b.
  gw1, gb1, gw2, gb2 = np.zeros_like(w1), np.zeros_like(b1), np.zeros_like(w2), np.zeros_like(b2)
  for xb, yb in zip(x, y):
    for xn, yn in zip(xb, yb):
      pre, h, prob = _forward(w1, b1, w2, b2, xn)
      e = prob - yn
      dpre = (pre > 0) * (w2 @ e)
      gw2 += np.outer(h, e) / len(xb)
      gb2 += e / len(xb)
      gw1 += np.outer(xn, dpre) / len(xb)
      gb1 += dpre / len(xb)
  gb1[:], gb2[:] = 0.0, 0.0  # θ = the kernels (CroP's weights) only
  # F_n(c) = aᵀ gW2 e + gb2ᵀ e + rᵀ δpre with a = c ⊙ h, δpre = m ⊙ c ⊙ W2 e, r = gW1ᵀ x + gb1.
  total = np.zeros(5)
  for xb, yb in zip(x, y):
    for xn, yn in zip(xb, yb):
      pre, h, prob = _forward(w1, b1, w2, b2, xn)
      e, m = prob - yn, (pre > 0).astype(np.float64)
      jac = np.diag(prob) - np.outer(prob, prob)  # ∂p/∂z
      r = xn @ gw1 + gb1
      for j in range(5):
        u = h[j] * w2[j]  # ∂z/∂c_j
        de = jac @ u  # ∂e/∂c_j
        d = h[j] * (gw2[j] @ e) + h @ gw2 @ de  # ∂(aᵀ gW2 e)
        d += gb2 @ de  # ∂(gb2ᵀ e)
        d += r[j] * m[j] * (w2[j] @ e) + np.sum(r * m * (w2 @ de))  # ∂(rᵀ δpre)
        total[j] += d / len(xb)
  return np.abs(total)


def test_snap_scores_match_closed_form():
  model, variables, images, labels = _two_layer()
  got = gates.snap_scores(model, variables, images, labels)['hidden_0']
  want = _snap_closed_form(variables, images, labels)
  assert np.count_nonzero(want > 1e-3) >= 3  # not a trivial all-dead layer
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_crop_s_scores_match_closed_form():
  model, variables, images, labels = _two_layer()
  got = gates.crop_s_scores(model, variables, images, labels)['hidden_0']
  want = _crop_s_closed_form(variables, images, labels)
  assert np.count_nonzero(want > 1e-3) >= 3
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert not np.allclose(got, gates.snap_scores(model, variables, images, labels)['hidden_0'])


@pytest.mark.parametrize('kind', ['snap', 'crop_s'])
def test_zero_gates_score_exactly_the_pruned_network(kind):
  model = build('mlp', 4, widths=[6, 5], norm=True)
  variables = _random_variables(model, (3, 3, 1))
  images = jax.random.normal(jax.random.key(2), (2, 8, 3, 3, 1))
  labels = jax.random.randint(jax.random.key(3), (2, 8), 0, 4)
  keeps = {
    'hidden_0': np.array([1, 0, 1, 1, 0, 1], bool),
    'hidden_1': np.array([0, 1, 1, 1, 1], bool),
  }
  at = {k: v.astype(np.float32) for k, v in keeps.items()}
  masked = gates.SCORES[kind](model, variables, images, labels, at)
  small, small_vars, _ = surgery.prune(model, variables, {}, keeps)
  pruned = gates.SCORES[kind](small, small_vars, images, labels)
  for name, keep in keeps.items():
    np.testing.assert_allclose(masked[name][keep], pruned[name], rtol=1e-4, atol=1e-7)


def test_gates_leave_init_and_training_untouched():
  model = build('mlp', 3, widths=[4, 6], norm=True)
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  assert set(shapes) == {'params', 'batch_stats'}  # no 'gates' collection leaks
  variables = _random_variables(model, (2, 2, 1))
  apply = jax.jit(lambda v: model.apply(v, x, train=False))
  tree = lambda c0, c1: gates.gate_tree(model.unit_groups(), {'hidden_0': c0, 'hidden_1': c1})
  np.testing.assert_array_equal(
    apply({**variables, 'gates': tree(jnp.ones(4), jnp.ones(6))}), apply(variables)
  )
  off = apply({**variables, 'gates': tree(jnp.ones(4), jnp.zeros(6))})  # logits = head bias only
  np.testing.assert_allclose(off, np.broadcast_to(variables['params']['head']['bias'], (2, 3)))


# ----------------------------------------------------------------------------
# Schedule, trigger, selection.


def test_iterative_targets():
  np.testing.assert_allclose(
    snap.iterative_targets(0.8), [0.5, 0.65, 0.725, 0.7625, 0.78125, 0.790625, 0.8]
  )
  # ρ < 0.5 would prune 50 % first and then want units back: capped, one effective round.
  np.testing.assert_allclose(snap.iterative_targets(0.3), [0.3] * 7)


def _first_trigger(distances, rho):
  for t in range(1, len(distances) + 1):
    if snap.early_trigger(distances[:t], rho):
      return t
  return None


def test_early_trigger_on_scripted_trajectory():
  d = [0.0, 0.5, 0.8, 0.9, 0.96, 0.98]
  # τ = d₂·min(1 - ρ - 0.1, 0.99) = 0.5·0.4 = 0.2: |0.8-0.5| = 0.3 no; |0.9-0.8| = 0.1 < 0.2 at epoch 4.
  assert _first_trigger(d, 0.5) == 4
  # ρ = 0.8: τ = 0.5·0.1 = 0.05: 0.1 no, 0.06 no, |0.98-0.96| = 0.02 at epoch 6.
  assert _first_trigger(d, 0.8) == 6
  # ρ = 0.1: τ = 0.5·0.8 = 0.4; epoch 3 already (0.3 < 0.4), never epoch 2.
  assert _first_trigger(d, 0.1) == 3
  assert _first_trigger([0.0, 0.5, 0.51], 0.95) is None  # τ < 0: only the fallback


def test_select_keeps_global_ranking_keeps_one_per_group():
  scores = {'a': np.array([0.1, 5.0, 0.3]), 'b': np.array([0.05, 0.02])}
  keeps = snap.select_keeps(
    scores, target=0.6, kind='units', params={}, groups=(), dense_units=5, dense_params=0
  )
  # keep 2 of 5; b's best (0.05) is protected though 0.1 and 0.3 score higher.
  np.testing.assert_array_equal(keeps['a'], [False, True, False])
  np.testing.assert_array_equal(keeps['b'], [True, False])
  keeps = snap.select_keeps(
    scores, target=0.99, kind='units', params={}, groups=(), dense_units=5, dense_params=0
  )
  assert [int(k.sum()) for k in keeps.values()] == [1, 1]


def test_param_count_and_weight_targets_match_the_surgery():
  model = build('convnet', 10, widths=[6, 8, 4], head='flatten')
  variables = _random_variables(model, (8, 8, 3))
  params, groups = variables['params'], model.unit_groups()
  dense = sum(np.size(x) for x in jax.tree.leaves(params))
  keeps = {'conv_0': np.arange(6) < 4, 'conv_1': np.arange(8) % 2 == 0, 'conv_2': np.arange(4) < 3}
  _, small, _ = surgery.prune(model, variables, {}, keeps)
  assert snap.param_count(params, groups, keeps) == sum(
    np.size(x) for x in jax.tree.leaves(small['params'])
  )
  assert snap.param_count(params, groups, {}) == dense
  rng = np.random.default_rng(0)
  scores = {k: rng.random(w) for k, w in model.widths.items()}
  for target in (0.3, 0.6, 0.9):
    keeps = snap.select_keeps(
      scores,
      target=target,
      kind='weights',
      params=params,
      groups=groups,
      dense_units=18,
      dense_params=dense,
    )
    left = snap.param_count(params, groups, keeps)
    assert left <= (1 - target) * dense or all(k.sum() == 1 for k in keeps.values())
    # One unit fewer removed would be over budget: the smallest removal that fits.
    order = snap.removal_order(scores)
    removed = sum(int((~k).sum()) for k in keeps.values())
    if removed:
      assert (
        snap.param_count(params, groups, snap._keeps(model.widths, order, removed - 1))
        > (1 - target) * dense
      )


def test_bad_baselines_config_names_the_key():
  c = quickstart.get_config('method=snap')
  c.baselines = config_lib.default_config()
  c.baselines.target_sparsity = 1.5
  with pytest.raises(ValueError, match='baselines.target_sparsity'):
    config_lib.resolve(c)
  c.baselines.target_sparsity, c.baselines.target_kind = 0.5, 'flops'
  with pytest.raises(ValueError, match='baselines.target_kind'):
    config_lib.resolve(c)
  c.method, c.baselines.target_kind, c.num_steps = 'early_snap', 'units', 100
  with pytest.raises(ValueError, match='baselines.fallback_epoch'):  # epoch 100 is never reached
    train.init_run(c)


# ----------------------------------------------------------------------------
# End to end through the trainer (tfds mock data, a tiny ConvNet).


def _tiny(method, **baselines):
  c = quickstart.get_config(f'method={method}')
  c.data.source, c.data.name = 'tfds', 'cifar10'
  c.model = train.ml_collections.ConfigDict(
    {'name': 'convnet', 'widths': [8, 16], 'head': 'global'}
  )
  c.num_steps, c.batch_size, c.log_every, c.progress_bar = 24, 16, 8, False
  c.prune.num_examples, c.prune.batch_size, c.eval_batch_size = 32, 32, 32
  c.baselines = config_lib.default_config()
  c.baselines.update(
    dict(score_batches=2, steps_per_epoch=4, fallback_epoch=4, target_sparsity=0.5, **baselines)
  )
  return c


@pytest.mark.parametrize('method', ['snap', 'crop_s'])
def test_iterative_methods_prune_at_step_zero_to_the_target(method, tmp_path):
  with tfds.testing.mock_data(num_examples=96):
    summary = train.train_and_evaluate(_tiny(method), str(tmp_path))
  assert [e['step'] for e in summary['events']] == [0]
  assert sum(summary['widths'].values()) == 12  # half of 24 units
  assert len(summary['method_stats']['rounds']) == 7
  assert len(summary['segments']) == 1  # compiled once, already pruned
  assert summary['weight_sparsity'] > 0.4


@pytest.mark.parametrize('method', ['early_snap', 'early_crop_s'])
def test_early_methods_prune_once_on_the_weight_trigger_or_fallback(method, tmp_path):
  with tfds.testing.mock_data(num_examples=96):
    summary = train.train_and_evaluate(_tiny(method, target_kind='weights'), str(tmp_path))
  stats = summary['method_stats']
  assert [e['step'] for e in summary['events']] == [stats['prune_step']]
  assert stats['prune_step'] == 4 * stats['prune_epoch'] and 3 <= stats['prune_epoch'] <= 4
  assert len(stats['distances']) == stats['prune_epoch'] and stats['distances'][0] == 0.0
  assert stats['trigger'] == (
    'distance' if snap.early_trigger(stats['distances'], 0.5) else 'fallback'
  )
  assert summary['weight_sparsity'] == pytest.approx(0.5, abs=0.06)  # the weights target
  assert len(summary['segments']) == 2
