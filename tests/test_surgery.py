"""Surgery and the death check: pruning dead units keeps the network's function exactly."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demp import deadunits, surgery, transforms
from demp.models import build
from demp import protocol

jax.config.update('jax_numpy_rank_promotion', 'raise')


def _kill(variables, norm: str, units, *, bias: float = -3.0):
  """Makes units exactly dead: BN scale 0 and a negative offset -> ReLU outputs 0."""
  params = jax.tree.map(lambda x: x, variables['params'])
  scale, offset = params[norm]['scale'], params[norm]['bias']
  units = np.asarray(units)
  params[norm] = {'scale': scale.at[units].set(0.0), 'bias': offset.at[units].set(bias)}
  return {**variables, 'params': params}


def _randomize_bn(variables, key):
  """Random BN statistics and affine params so that eval mode is a non-trivial function."""

  def fn(path, x):
    name = path[-1].key
    # crc32, not hash(): Python salts str hashes per process, and the test must be the same test
    # in every process (a unit dead on the probe by chance could be alive on other inputs).
    key_leaf = jax.random.fold_in(key, zlib.crc32(jax.tree_util.keystr(path).encode()) % (2**31))
    if name in ('mean', 'bias'):
      return x + 0.1 * jax.random.normal(key_leaf, x.shape)
    if name in ('var', 'scale') and x.ndim == 1:
      return x * jnp.exp(0.2 * jax.random.normal(key_leaf, x.shape))
    return x

  return jax.tree.map_with_path(fn, variables)


MODELS = {
  'mlp': (
    dict(name='mlp', widths=[16, 12, 8]),
    (2, 8, 8, 1),
    {'norm_0': [1, 5], 'norm_1': [0, 3, 11], 'norm_2': [7]},
  ),
  'convnet_global': (
    dict(name='convnet', widths=[8, 12, 6], head='global'),
    (2, 16, 16, 3),
    {'norm_0': [2], 'norm_1': [0, 4, 5], 'norm_2': [1, 2]},
  ),
  # conv -> flatten -> dense: the dense kernel's rows are (position, channel) pairs.
  'convnet_flatten': (
    dict(name='convnet', widths=[8, 6], head='flatten'),
    (2, 16, 16, 3),
    {'norm_0': [3, 7], 'norm_1': [0, 5]},
  ),
}


@pytest.mark.parametrize('which', sorted(MODELS))
def test_pruning_dead_units_preserves_logits(which):
  kwargs, shape, kills = MODELS[which]
  kwargs = dict(kwargs)
  model = build(kwargs.pop('name'), 10, **kwargs)
  key = jax.random.key(0)
  variables = model.init(key, jnp.zeros(shape), train=False)
  variables = _randomize_bn(variables, jax.random.key(1))
  for norm, units in kills.items():
    variables = _kill(variables, norm, units)

  probe_x = jax.random.normal(jax.random.key(2), (64,) + shape[1:])
  alive, activity = deadunits.dead_unit_stats(model, variables, probe_x, batch_size=16)
  for norm, units in kills.items():
    group = norm.replace('norm', 'hidden' if which == 'mlp' else 'conv')
    assert not np.any(alive[group][np.asarray(units)])  # the killed units are found dead
  num_dead = sum(int(np.sum(~a)) for a in alive.values())
  assert num_dead >= sum(map(len, kills.values()))

  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])
  keeps = surgery.keep_masks(alive, activity)
  small, small_vars, small_opt = surgery.prune(model, variables, opt_state, keeps)
  assert sum(small.widths.values()) == sum(model.widths.values()) - num_dead

  # Exact on the inputs the death check saw (a unit dead there by chance, not killed, may be
  # alive on other inputs); the killed units are dead everywhere, so on fresh inputs too when
  # they are the only dead ones.
  inputs = [probe_x]
  if num_dead == sum(map(len, kills.values())):
    inputs.append(jax.random.normal(jax.random.key(3), (32,) + shape[1:]))
  for x in inputs:
    logits = model.apply(variables, x, train=False)
    small_logits = small.apply(small_vars, x, train=False)
    assert small_logits.shape == logits.shape
    np.testing.assert_allclose(small_logits, logits, rtol=1e-5, atol=1e-5)
  # The optimizer state was sliced to the new shapes.
  assert jax.tree.map(jnp.shape, small_opt[0].mu) == jax.tree.map(jnp.shape, small_vars['params'])


def test_flatten_consumer_keeps_the_right_rows():
  """Unit c of the last conv feeds rows p*C + c of the dense kernel, for every position p."""
  model = build('convnet', 3, widths=[4], head='flatten', pool=False)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2, 2, 1)), train=False)
  kernel = jnp.arange(16 * 3, dtype=jnp.float32).reshape(16, 3)
  variables['params']['head']['kernel'] = kernel
  keep = np.array([True, False, True, False])
  _, small_vars, _ = surgery.prune(model, variables, {}, {'conv_0': keep})
  rows = [p * 4 + c for p in range(4) for c in (0, 2)]
  np.testing.assert_array_equal(small_vars['params']['head']['kernel'], kernel[np.array(rows)])


def test_optimizer_state_slicing_covers_every_param_shaped_leaf():
  model = build('mlp', 4, widths=[6, 5])
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3)), train=False)
  params = variables['params']
  tx = transforms.demp_optimizer(
    optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9)),
    penalty_strength=1e-3,
    noise_std=1e-2,
  )
  opt_state = tx.init(params)
  # Fill every param-shaped leaf with values that identify their position.
  opt_state = jax.tree.map(
    lambda x: (
      jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
      if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)
      else x
    ),
    opt_state,
  )
  keeps = {'hidden_0': np.array([1, 0, 1, 1, 0, 1], bool)}
  _, new_vars, new_state = surgery.prune(model, variables, opt_state, keeps)
  momentum = optax.tree.get(new_state, 'trace')
  assert jax.tree.map(jnp.shape, momentum) == jax.tree.map(jnp.shape, new_vars['params'])
  old = optax.tree.get(opt_state, 'trace')
  np.testing.assert_array_equal(
    momentum['dense_0']['kernel'], old['dense_0']['kernel'][:, keeps['hidden_0']]
  )
  np.testing.assert_array_equal(
    momentum['dense_1']['kernel'], old['dense_1']['kernel'][keeps['hidden_0'], :]
  )
  np.testing.assert_array_equal(
    momentum['norm_0']['scale'], old['norm_0']['scale'][keeps['hidden_0']]
  )
  # Non-param leaves (counts, the noise key) are untouched.
  assert int(new_state.count) == int(opt_state.count)


def test_keep_masks_min_width_and_rounding():
  alive = {'a': np.array([0, 1, 0, 0, 1, 0, 0, 0], bool), 'b': np.zeros(4, bool)}
  activity = {
    'a': np.array([0.5, 1, 0.9, 0.1, 1, 0.0, 0.3, 0.2]),
    'b': np.array([0.1, 0.4, 0.2, 0.3]),
  }
  keeps = surgery.keep_masks(alive, activity, min_width=2, multiple_of=4)
  # 'a': 2 alive, rounded up to 4 with the two most active dead units (0.9 at 2, 0.5 at 0).
  np.testing.assert_array_equal(keeps['a'], [1, 1, 1, 0, 1, 0, 0, 0])
  # 'b': nothing alive -> min_width 2 rounded up to 4 = everything.
  np.testing.assert_array_equal(keeps['b'], [1, 1, 1, 1])
  keeps = surgery.keep_masks(alive, activity, min_width=1)
  np.testing.assert_array_equal(keeps['b'], [0, 1, 0, 0])  # never zero units: the most active stays
  with pytest.raises(ValueError, match='min_width'):
    surgery.keep_masks(alive, activity, min_width=0)


def test_unknown_group_and_wrong_mask_size_raise():
  model = build('mlp', 4, widths=[6])
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3)), train=False)
  with pytest.raises(ValueError, match='unknown unit groups'):
    surgery.slice_variables(variables, model.unit_groups(), {'nope': np.ones(3, bool)})
  with pytest.raises(ValueError, match='hidden_0'):
    surgery.prune(model, variables, {}, {'hidden_0': np.ones(5, bool)})


@pytest.mark.parametrize(
  'criterion,values,expected_alive',
  [
    ('relu', [0.0, 0.0, 1e-7], [False, True]),
    ('leaky_relu', [-0.1, 0.0, -1e-3], [False, False]),
    ('leaky_relu', [-0.1, 0.2, -1e-3], [False, True]),
    ('gelu', [0.009, -0.009, 0.011], [False, True]),
    ('swish', [0.0, 0.0, -0.02], [False, True]),
  ],
)
def test_criteria(criterion, values, expected_alive):
  # Two units: unit 0 always at 0 (or slightly negative for leaky), unit 1 takes `values`.
  a_bu = jnp.stack(
    [jnp.array([0.0, 0.0, -1e-3 if criterion == 'leaky_relu' else 0.0]), jnp.array(values)], axis=-1
  )
  group = protocol.UnitGroup('g', sites=(('g',),), producers=(), consumers=())
  alive, activity = deadunits.site_stats({'g': (a_bu,)}, [group], criterion, 0.01)
  np.testing.assert_array_equal(alive['g'], expected_alive)
  np.testing.assert_allclose(activity['g'][1], np.max(np.abs(values)), rtol=1e-6)


def test_death_check_ands_across_batches():
  """A unit active on a single example of the last batch is alive."""
  model = build('mlp', 3, widths=[4], norm=False)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 2)), train=False)
  params = variables['params']
  # Unit j fires iff x[j % 2] > threshold_j: make unit 3 fire only on one example.
  params['dense_0'] = {
    'kernel': jnp.array([[1.0, 1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]),
    'bias': jnp.array([0.0, -10.0, 0.0, -99.5]),
  }
  x = jnp.zeros((64, 2)).at[:, 0].set(jnp.linspace(-1, 1, 64)).at[63, 0].set(100.0)
  alive, _ = deadunits.dead_unit_stats(model, {'params': params}, x, batch_size=16)
  np.testing.assert_array_equal(alive['hidden_0'], [True, True, True, True])
  alive, _ = deadunits.dead_unit_stats(model, {'params': params}, x[:48], batch_size=16)
  np.testing.assert_array_equal(alive['hidden_0'], [True, False, True, False])
  with pytest.raises(ValueError, match='multiple of the batch size'):
    deadunits.dead_unit_stats(model, {'params': params}, x[:40], batch_size=16)
