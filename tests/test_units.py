"""demp.units and its options: mask liveness, group penalty mask, weighting, coupling, offsets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import quickstart
from demp import deadunits, surgery, transforms, units
from demp.trainer import optim, train
from demp.models import build
from demp.trainer import demp_policy
from demp.trainer import config as config_lib

jax.config.update('jax_numpy_rank_promotion', 'raise')

DEAD = 2  # the unit of hidden_0 made ε-dead
# An offset that makes each activation's output dead by its own criterion, with a scale
# that keeps the unit's input varying over the batch: its pre-activation stays within
# about ±1.5 of the offset (a normalized input times 0.5). gelu(-3.5 ± 1.5) and
# swish(-10 ± 1.5) have |a| < 0.01; leaky_relu(-6 ± 1.5) < 0; relu(-3 ± 1.5) = 0.
# The slopes there (gelu' ~ -1e-2, swish' ~ -4e-4, leaky_relu' = 0.05) are far from
# float32's underflow, so the unit's gradients below are sums of terms that vary
# with the example, not rounding: the same on every IEEE CPU. (With scale 0 the
# unit's output is the same constant on every example, the next layer's BatchNorm
# subtracts it, and its gradients are zero up to rounding: ±1e-9 or exactly 0,
# depending on the CPU's order of summation.)
DEAD_OFFSET = {'gelu': -3.5, 'swish': -10.0, 'leaky_relu': -6.0, 'relu': -3.0}
DEAD_SCALE = 0.5
# A gradient this large is no rounding residue: 100 x the ±1e-9 that an analytically
# zero gradient of this network leaves; the smallest one checked is 7e-7 (swish's).
REAL_GRADIENT = 1e-7


def _dead_mlp(activation):
  model = build('mlp', 3, widths=[5, 4], activation=activation)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)
  params = jax.tree.map(lambda x: x, variables['params'])
  norm = params['norm_0']
  params['norm_0'] = {
    'scale': norm['scale'].at[DEAD].set(DEAD_SCALE),
    'bias': norm['bias'].at[DEAD].set(DEAD_OFFSET[activation]),
  }
  images = jax.random.uniform(jax.random.key(1), (8, 4, 4, 1))
  labels = jnp.arange(8) % 3
  return model, {**variables, 'params': params}, images, labels


def _dead_slices(params):
  """The dead unit's producer slices and consumer in-slice."""
  return [
    params['dense_0']['kernel'][:, DEAD],
    params['norm_0']['scale'][DEAD],
    params['norm_0']['bias'][DEAD],
    params['dense_1']['kernel'][DEAD, :],
  ]


def _live_slices(params):
  live = np.array([u for u in range(5) if u != DEAD])
  return [
    params['dense_0']['kernel'][:, live],
    params['norm_0']['scale'][live],
    params['dense_1']['kernel'][live, :],
  ]


def _train(model, variables, images, labels, tx, state, steps=3):
  batch_stats = variables['batch_stats']

  def loss_fn(params):
    logits, _ = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  params, grads = variables['params'], None
  for _ in range(steps):
    params, state, grads = step(params, state)
  return params, state, grads


@pytest.mark.parametrize('activation', ['gelu', 'leaky_relu', 'swish'])
def test_mask_liveness_gives_no_noise_to_eps_dead_units(activation):
  model, variables, images, labels = _dead_mlp(activation)
  alive, _ = deadunits.dead_unit_stats(
    model, variables, images, criterion=deadunits.criterion_for(activation)
  )
  assert not alive['hidden_0'][DEAD] and alive['hidden_0'].sum() == 4
  params0 = variables['params']

  # lr 0: the only change a step makes is the noise.
  tx = transforms.with_live_noise(optax.sgd(0.0), std=1e-2, liveness='mask')
  state = units.set_live_mask(tx.init(params0), params0, model, alive)
  params, _, grads = _train(model, variables, images, labels, tx, state)
  # The gradient rule cannot see this unit's death: its loss gradient is far from zero on
  # its scale, its producer column and its consumer row. (Not on its offset for leaky_relu:
  # a unit that is linear over the batch shifts by its offset a constant the next
  # BatchNorm subtracts, so that gradient is zero up to rounding.)
  for name, g in (
    ('norm_0/scale', grads['norm_0']['scale'][DEAD]),
    ('dense_0/kernel', grads['dense_0']['kernel'][:, DEAD]),
    ('dense_1/kernel', grads['dense_1']['kernel'][DEAD]),
  ):
    smallest = float(np.min(np.abs(np.asarray(g))))
    assert smallest >= REAL_GRADIENT, (
      f'{activation}: |grad {name}| = {smallest:.3g} < {REAL_GRADIENT}'
    )
  for before, after in zip(_dead_slices(params0), _dead_slices(params)):
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before))
  for before, after in zip(_live_slices(params0), _live_slices(params)):
    assert np.all(np.asarray(after) != np.asarray(before))  # every live entry got noise

  # The gradient rule (the old behaviour for every activation) puts noise on the dead unit.
  tx = transforms.with_live_noise(optax.sgd(0.0), std=1e-2, liveness='gradient')
  params, _, _ = _train(model, variables, images, labels, tx, tx.init(params0))
  assert params['norm_0']['scale'][DEAD] != params0['norm_0']['scale'][DEAD]
  assert np.all(
    np.asarray(params['dense_0']['kernel'][:, DEAD])
    != np.asarray(params0['dense_0']['kernel'][:, DEAD])
  )
  assert np.all(
    np.asarray(params['dense_1']['kernel'][DEAD]) != np.asarray(params0['dense_1']['kernel'][DEAD])
  )


def test_live_mask_values_and_flatten_repeat():
  model = build('convnet', 3, widths=[4, 3], head='flatten', pool=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)['params']
  alive = {'conv_0': np.array([1, 0, 1, 1], bool), 'conv_1': np.array([1, 1, 0], bool)}
  mask = units.live_mask(params, model.unit_groups(), alive)
  k0 = np.asarray(mask['conv_0']['kernel'])  # [3, 3, 1, 4]: producer of conv_0
  assert k0[..., 1].sum() == 0 and k0[..., [0, 2, 3]].all()
  k1 = np.asarray(mask['conv_1']['kernel'])  # [3, 3, 4, 3]: consumes conv_0, produces conv_1
  assert k1.sum() == 9 * 3 * 2  # in-unit 1, out-unit 2 masked: 3 x 2 pairs left
  assert not k1[:, :, 1, :].any() and not k1[:, :, :, 2].any()
  head = np.asarray(mask['head']['kernel'])  # [2*2*3, 3]: flatten, channels innermost
  np.testing.assert_array_equal(head[:, 0], np.tile([True, True, False], 4))
  assert np.asarray(mask['norm_0']['scale']).tolist() == [True, False, True, True]
  assert np.asarray(mask['head']['bias']).all()


def test_surgery_slices_the_live_mask():
  model, variables, images, _ = _dead_mlp('gelu')
  alive, activity = deadunits.dead_unit_stats(model, variables, images, criterion='gelu')
  params = variables['params']
  tx = transforms.demp_optimizer(
    optax.adam(1e-3), penalty_strength=1e-3, noise_std=1e-2, noise_liveness='mask'
  )
  state = units.set_live_mask(tx.init(params), params, model, alive)
  # Remove unit 0 (alive) and keep the dead unit: its mask entries must follow it.
  keeps = {'hidden_0': np.array([0, 1, 1, 1, 1], bool)}
  new_model, new_vars, new_state = surgery.prune(model, variables, state, keeps)
  old, new = units.get_live_mask(state), units.get_live_mask(new_state)
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, new_vars['params'])
  np.testing.assert_array_equal(new['dense_0']['kernel'], old['dense_0']['kernel'][:, 1:])
  np.testing.assert_array_equal(new['dense_1']['kernel'], old['dense_1']['kernel'][1:, :])
  assert np.asarray(new['norm_0']['scale']).tolist() == [True, False, True, True]
  # A later check on the pruned model sets a mask of the new shapes.
  alive2 = {'hidden_0': np.array([1, 1, 0, 1], bool), 'hidden_1': np.ones(4, bool)}
  again = units.get_live_mask(units.set_live_mask(new_state, new_vars['params'], new_model, alive2))
  assert np.asarray(again['norm_0']['scale']).tolist() == [True, True, False, True]


def test_set_live_mask_leaves_gradient_mode_and_plain_states_alone():
  model, variables, _, _ = _dead_mlp('relu')
  params = variables['params']
  alive = {'hidden_0': np.array([1, 1, 0, 1, 1], bool), 'hidden_1': np.ones(4, bool)}
  for tx in (transforms.with_live_noise(optax.sgd(0.1), 1e-2), optax.adam(1e-3)):
    state = tx.init(params)
    assert units.set_live_mask(state, params, model, alive) is state


def test_trainer_picks_liveness_per_activation():
  c = quickstart.get_config()
  assert c.demp.noise_liveness == 'auto'
  for act, expected in (('relu', None), ('gelu', 'mask'), ('leaky_relu', 'mask')):
    c.model.activation = act
    c.model.widths = [6, 5]
    tx = optim.demp_wrap(c, optim.base_optimizer(c))
    state = tx.init(
      build('mlp', 10, widths=[6, 5]).init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)[
        'params'
      ]
    )
    mask = units.get_live_mask(state)
    assert (mask is None) if expected is None else all(np.all(x) for x in jax.tree.leaves(mask))
  c.model.activation = 'gelu'
  c.demp.noise_liveness = 'gradient'
  tx = optim.demp_wrap(c, optim.base_optimizer(c))
  assert units.get_live_mask(tx.init({'w': jnp.ones(2)})) is None
  c.demp.noise_liveness = 'never'
  with pytest.raises(ValueError, match='demp.noise_liveness'):
    config_lib.validate_config(c)


def test_trainer_sets_the_mask_at_every_check(tmp_path):
  c = quickstart.get_config()
  c.model.widths = [16, 8]
  c.model.activation = 'gelu'
  c.num_steps, c.batch_size, c.prune.every, c.log_every = 12, 16, 6, 6
  c.prune.num_examples, c.prune.batch_size, c.eval_batch_size = 32, 32, 64
  c.progress_bar = False
  c.demp.peak_lambda = 0.5
  c.demp.noise_std = 1e-3
  run, it = train.init_run(c)
  # Make unit 3 of hidden_0 ε-dead, then run the trainer's prune event by hand (dynamic off).
  c.prune.dynamic = False
  p = run.state['params']
  p['norm_0'] = {
    'scale': p['norm_0']['scale'].at[3].set(0.0),
    'bias': p['norm_0']['bias'].at[3].set(-6.0),
  }
  run.state = {**run.state, 'params': p}
  run.step = 6
  demp_policy.prune_dead(run)
  mask = units.get_live_mask(run.state['opt_state'])
  assert not np.asarray(mask['dense_0']['kernel'])[:, 3].any()
  assert not np.asarray(mask['dense_1']['kernel'])[3].any()
  assert np.asarray(mask['dense_0']['kernel'])[:, [0, 1, 2, 4]].all()
  assert run.events[-1]['constant'] == {'hidden_0': 0, 'hidden_1': 0}


# ----------------------------------------------------------------------------
# The penalty: group mask, weighting, coupling.


def test_group_scales_mask_selects_only_the_groups_own_scales():
  vit = build('vit', 10, hidden_dim=16, depth=2, num_heads=2, mlp_dim=8, patch_size=4)
  params = jax.eval_shape(
    lambda: vit.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  )['params']
  regex = jax.tree.leaves(transforms.path_mask(transforms.NORM_SCALES)(params))
  assert sum(regex) == 5  # 2 LayerNorms per block + the final one: no unit's
  assert not any(jax.tree.leaves(units.group_scales_mask(vit)(params)))  # MLP groups: no scale
  conv = build('convnet', 10, widths=[4, 6])
  params = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)['params']
  got = units.group_scales_mask(conv)(params)
  assert got['norm_0']['scale'] and got['norm_1']['scale']
  assert sum(jax.tree.leaves(got)) == 2
  # The regex default is unchanged for the CNNs (same leaves, bit-identical runs).
  assert got == transforms.path_mask(transforms.NORM_SCALES)(params)


def test_vit_configs_use_the_group_mask():
  from configs import vit_b16_imagenet, vit_cifar10_subset  # pylint: disable=g-import-not-at-top

  for cfg in (vit_cifar10_subset.get_config(), vit_b16_imagenet.get_config()):
    assert cfg.demp.penalty_mask == 'groups'
  assert config_lib.base_config().demp.penalty_mask == transforms.NORM_SCALES


def test_unit_costs_and_multipliers_by_hand():
  # MLP on 4x4x1 inputs (16 features), widths [5, 4], BN, 3 classes.
  model = build('mlp', 3, widths=[5, 4])
  params = model.init(jax.random.key(0), jnp.zeros((1, 4, 4, 1)), train=False)['params']
  costs = units.unit_costs(model, params, 'params')
  # hidden_0: dense_0 column (16) + scale + bias (2) + dense_1 row (4) = 22.
  # hidden_1: dense_1 column (5) + scale + bias (2) + head row (3) = 10.
  assert costs == {'hidden_0': 22.0, 'hidden_1': 10.0}
  mults = units.penalty_multipliers(model, params, 'params')
  assert mults == pytest.approx({'norm_0/scale': 22 / 16, 'norm_1/scale': 10 / 16})
  # FLOPs: a ConvNet 8x8 input, widths [2, 3], 2x2 pool, global head, 4 classes.
  conv = build('convnet', 4, widths=[2, 3], head='global')
  cparams = conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)['params']
  flops = units.unit_costs(conv, cparams, 'flops', (8, 8, 1))
  # conv_0: kernel 9 x 64 positions + (scale + bias) x 64 + conv_1 in-slice 27 x 16 positions.
  # conv_1: kernel 18 x 16 + 2 x 16 + head row 4 x 1.
  assert flops == {'conv_0': 9 * 64 + 2 * 64 + 27 * 16, 'conv_1': 18 * 16 + 2 * 16 + 4}
  assert units.penalty_multipliers(conv, cparams, 'none') is None


def test_weighted_penalty_under_jit():
  params = {
    'norm_0': {'scale': jnp.array([0.5, -2.0])},
    'norm_1': {'scale': jnp.array([1.0])},
    'dense': {'kernel': jnp.ones((2, 2))},
  }
  tx = transforms.add_scheduled_penalty(0.1, multipliers={'norm_0/scale': 1.5, 'norm_1/scale': 0.5})
  updates, _ = jax.jit(tx.update)(optax.tree.zeros_like(params), tx.init(params), params)
  np.testing.assert_allclose(updates['norm_0']['scale'], [0.15, -0.15], rtol=1e-6)
  np.testing.assert_allclose(updates['norm_1']['scale'], [0.05], rtol=1e-6)
  np.testing.assert_array_equal(updates['dense']['kernel'], np.zeros((2, 2)))
  with pytest.raises(ValueError, match='multipliers'):
    transforms.add_scheduled_penalty(0.1, multipliers={'norm_0/scale': -1.0})


def test_decoupled_penalty_by_hand_under_jit():
  # SGD lr schedule 0.5, 0.25 (steps 0, 1); λ schedule 0.1, 0.2. Updates after SGD:
  # u = -η_t g, then - η_t λ_t sign(γ).
  lr = lambda t: 0.5 / (1.0 + t)
  lam = lambda t: 0.1 * (1.0 + t)
  params = {'norm': {'scale': jnp.array([0.5, -2.0, 0.0]), 'bias': jnp.array([1.0, 1.0, 1.0])}}
  grads = {'norm': {'scale': jnp.array([1.0, 1.0, 1.0]), 'bias': jnp.array([1.0, 1.0, 1.0])}}
  tx = transforms.demp_optimizer(
    optax.sgd(lr), penalty_strength=lam, penalty_coupling='decoupled', learning_rate=lr
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  u, state = update(grads, state, params)
  np.testing.assert_allclose(u['norm']['scale'], [-0.5 - 0.05, -0.5 + 0.05, -0.5], rtol=1e-6)
  np.testing.assert_allclose(u['norm']['bias'], [-0.5] * 3, rtol=1e-6)
  u, state = update(grads, state, params)
  np.testing.assert_allclose(u['norm']['scale'], [-0.25 - 0.05, -0.25 + 0.05, -0.25], rtol=1e-6)
  # Coupled (the default) with Adam: the penalty is normalized away on a zero loss gradient.
  tx = transforms.demp_optimizer(optax.adam(0.5), penalty_strength=0.1)
  u, _ = jax.jit(tx.update)(optax.tree.zeros_like(params), tx.init(params), params)
  np.testing.assert_allclose(u['norm']['scale'], [-0.5, 0.5, 0.0], rtol=1e-5)
  with pytest.raises(ValueError, match='learning_rate'):
    transforms.demp_optimizer(optax.sgd(0.1), penalty_strength=0.1, penalty_coupling='decoupled')
  with pytest.raises(ValueError, match='penalty_coupling'):
    transforms.demp_optimizer(optax.sgd(0.1), penalty_strength=0.1, penalty_coupling='both')


def test_trainer_wires_coupling_and_weighting():
  c = quickstart.get_config()
  c.model.widths = [6, 5]
  c.demp.noise_std = 0.0
  c.demp.penalty_coupling = 'decoupled'
  c.demp.penalty_weighting = 'params'
  tx = optim.demp_wrap(c, optim.base_optimizer(c))
  model = build('mlp', 10, widths=[6, 5])
  params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), train=False)['params']
  zeros = optax.tree.zeros_like(params)
  u, _ = tx.update(zeros, tx.init(params), params)
  lr0 = float(optim.learning_rate_schedule(c)(0))
  lam0 = float(optim.demp_schedules(c)[0](0))
  # hidden_0: 64 + 2 + 5 = 71 per unit; hidden_1: 6 + 2 + 10 = 18; mean 44.5.
  scale0 = np.asarray(params['norm_0']['scale'])  # ones at init: sign 1
  np.testing.assert_allclose(
    u['norm_0']['scale'], -lr0 * lam0 * 71 / 44.5 * np.sign(scale0), rtol=1e-5
  )
  np.testing.assert_allclose(u['norm_1']['scale'], -lr0 * lam0 * 18 / 44.5, rtol=1e-5)
  c.demp.penalty_weighting = 'bytes'
  with pytest.raises(ValueError, match='demp.penalty_weighting'):
    config_lib.validate_config(c)


def test_the_live_mask_round_trips_through_a_checkpoint(tmp_path):
  """The live mask is optimizer state: saved and restored with the run, bit for bit."""
  from demp.trainer import checkpoint  # pylint: disable=g-import-not-at-top

  c = quickstart.get_config()
  c.model.widths, c.model.activation = [16, 8], 'gelu'
  c.prune.num_examples, c.prune.batch_size, c.progress_bar = 32, 32, False
  c.prune.dynamic = False
  run, _ = train.init_run(c)
  p = run.state['params']
  p['norm_0'] = {
    'scale': p['norm_0']['scale'].at[3].set(0.0),
    'bias': p['norm_0']['bias'].at[3].set(-6.0),
  }
  run.state = {**run.state, 'params': p}
  run.step = 6
  demp_policy.prune_dead(run)
  saved = units.get_live_mask(run.state['opt_state'])
  assert not np.asarray(saved['dense_0']['kernel'])[:, 3].any()
  with checkpoint.closing(checkpoint.manager(str(tmp_path), async_save=False)) as mngr:
    checkpoint.save(mngr, run, batches=6, progress={})
    mngr.wait_until_finished()
    fresh, _ = train.init_run(c)
    checkpoint.restore(mngr, checkpoint.read_meta(mngr), fresh)
  got = units.get_live_mask(fresh.state['opt_state'])
  for x, y in zip(jax.tree.leaves(saved), jax.tree.leaves(got)):
    assert y.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_offset_penalty_pushes_only_positive_norm_offsets_under_jit():
  """demp.offset_penalty = κ: κ·λ_t on every positive normalization offset, nothing elsewhere
  (hand-computed, constant λ, no noise, an identity base so the update is the gradient)."""
  c = quickstart.get_config()
  c.demp.schedule, c.demp.peak_lambda, c.demp.noise_std, c.demp.offset_penalty = (
    'constant',
    0.1,
    0.0,
    2.0,
  )
  params = {
    'norm_0': {'scale': jnp.array([0.5, -2.0, 0.0]), 'bias': jnp.array([0.5, -0.3, 0.0])},
    'dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)},
  }
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25), params)
  tx = optim.demp_wrap(c, optax.identity())
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['norm_0']['bias'], [0.25 + 0.2, 0.25, 0.25], rtol=1e-6)
  np.testing.assert_allclose(updates['norm_0']['scale'], [0.25 + 0.1, 0.25 - 0.1, 0.25], rtol=1e-6)
  np.testing.assert_array_equal(updates['dense_0']['bias'], grads['dense_0']['bias'])
  c.demp.offset_penalty = 0.0
  updates, _ = jax.jit(optim.demp_wrap(c, optax.identity()).update)(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates['norm_0']['bias'], grads['norm_0']['bias'])


@pytest.mark.parametrize(
  'overrides, match',
  [
    ({'demp.offset_penalty': -1.0}, r'demp.offset_penalty=-1.0 must be a number >= 0'),
    (
      {'demp.offset_penalty': 1.0, 'demp.target_sparsity': 0.5},
      r'demp.offset_penalty=1.0 with demp.target_sparsity=0.5',
    ),
  ],
)
def test_the_offset_penalty_refuses_bad_values(overrides, match):
  c = quickstart.get_config()
  for key, value in overrides.items():
    section, name = key.split('.')
    c[section][name] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate_config(c)
