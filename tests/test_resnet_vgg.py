"""ResNet-18/50 and VGG-16: parameter counts, unit groups through residual streams,
exact function preservation under surgery, and training continuity after pruning."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demp import deadunits, models, surgery
from demp.models import resnet
from demp.trainer.steps import make_train_step


def _num_params(model, hw: int) -> int:
  """Parameter count from shapes only (no real init of big models)."""
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, hw, hw, 3)), train=False)
  )
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(shapes['params'])))


def test_dense_parameter_counts_are_the_standard_ones():
  assert _num_params(models.build('resnet18', 10), 32) == 11_173_962  # CIFAR stem
  assert _num_params(models.build('resnet18', 1000, stem='imagenet'), 64) == 11_689_512
  assert _num_params(models.build('resnet50', 1000), 32) == 25_557_032
  # VGG-16-BN, convs without bias, BN scale+offset, flatten head at 64x64 (2x2x512 -> 10):
  # 14,710,464 conv + 8,448 BN + 20,490 head.
  assert _num_params(models.build('vgg16', 10), 64) == 14_739_402
  assert _num_params(models.build('vgg16', 10, head='global'), 64) == 14_724_042


def test_unit_groups_couple_each_stage_stream():
  r18 = models.build('resnet18', 10, width_multiplier=0.125)
  groups = {g.name: g for g in r18.unit_groups()}
  assert len(groups) == len(r18.widths) == 8 + 4  # 8 block-internal + 4 streams
  s0 = groups['stage0_stream']
  assert s0.sites == (('stem_act',), ('stage0_block0', 'out'), ('stage0_block1', 'out'))
  producer_kernels = {sl.path for sl in s0.producers if sl.path[-1] == 'kernel'}
  assert producer_kernels == {
    ('stem_conv', 'kernel'),
    ('stage0_block0', 'conv2', 'kernel'),
    ('stage0_block1', 'conv2', 'kernel'),
  }
  assert {sl.path for sl in s0.consumers} == {
    ('stage0_block0', 'conv1', 'kernel'),
    ('stage0_block1', 'conv1', 'kernel'),
    ('stage1_block0', 'conv1', 'kernel'),
    ('stage1_block0', 'proj_conv', 'kernel'),
  }
  s3 = groups['stage3_stream']
  assert ('stage3_block0', 'proj_conv', 'kernel') in {sl.path for sl in s3.producers}
  assert {sl.path for sl in s3.consumers} == {
    ('stage3_block1', 'conv1', 'kernel'),
    ('head', 'kernel'),
  }
  no_stream = r18.clone(prune_stream=False)
  assert [g.name for g in no_stream.unit_groups()] == [
    n for n in r18.widths if not n.endswith('_stream')
  ]
  r50 = models.build('resnet50', 1000, width_multiplier=0.0625)
  assert 'stem' in r50.widths and 'stem' in {
    g.name for g in r50.clone(prune_stream=False).unit_groups()
  }
  assert r50.widths['stage3_stream'] == 128 and r50.widths['stage3_block2_conv2'] == 32


@pytest.mark.parametrize('activation', ['relu', 'leaky_relu', 'swish', 'gelu'])
def test_activation_is_selectable(activation):
  model = models.build('resnet18', 10, width_multiplier=1 / 16, activation=activation)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  variables = _init(model, x)
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'])
  a = state['intermediates']['stage1_block0']['out'][0]
  assert (float(a.min()) < 0) == (activation != 'relu')


def test_bad_model_values_fail_loudly():
  with pytest.raises(ValueError, match='model.stem'):
    models.build('resnet18', 10, stem='tiny')
  with pytest.raises(ValueError, match='model.activation'):
    models.build('vgg16', 10, activation='tanh')
  with pytest.raises(ValueError, match='model.width_multiplier'):
    models.build('resnet50', 10, width_multiplier=0)
  with pytest.raises(ValueError, match='unknown groups'):
    models.build('resnet18', 10, widths={**models.build('resnet18', 10).widths, 'stem': 3})


# ----------------------------------------------------------------------------
# Killing units exactly, then pruning them.


def _init(model, x, seed=0):
  """Variables from numpy (LeCun-normal kernels, default BN): the shapes come from
  ``jax.eval_shape``, so no RNG kernel is compiled (slow on a loaded 2-core CPU)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

  def fill(path, s):
    name = path[-1].key
    if name == 'kernel':
      return jnp.asarray(rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape), jnp.float32)
    return jnp.ones(s.shape, s.dtype) if name in ('scale', 'var') else jnp.zeros(s.shape, s.dtype)

  return jax.tree.map_with_path(fill, shapes)


def _randomize_bn(variables, seed):
  """Random BN scales in [0.5, 1.5] and offsets in [0, 0.2] (a standardized channel with
  a positive offset is positive somewhere: no unit dies by accident)."""
  rng = np.random.default_rng(seed)

  def fn(path, x):
    name = path[-1].key
    if name == 'scale':
      return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), jnp.float32)
    if name == 'bias':
      return jnp.asarray(rng.uniform(0.0, 0.2, x.shape), jnp.float32)
    return x

  return {**variables, 'params': jax.tree.map_with_path(fn, variables['params'])}


def _calibrate(model, variables, x):
  """Running stats = the statistics of ``x``: eval mode then sees standardized channels
  (with positive offsets, none is dead by accident), and every sliced statistic is
  channel-specific, so slicing a wrong channel would show."""
  _, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
  # One train-mode pass moves the running stats 10 % (momentum 0.9) towards the batch's.
  stats = jax.tree.map(
    lambda new, old: (new - 0.9 * old) / 0.1, updated['batch_stats'], variables['batch_stats']
  )
  return {**variables, 'batch_stats': stats}


def _kill(variables, bn_prefixes, channels):
  """Makes ``channels`` of every BN in ``bn_prefixes`` output -1: zero after ReLU."""
  params = flax.core.unfreeze(variables['params'])
  for prefix in bn_prefixes:
    node = params
    for k in prefix:
      node = node[k]
    node['scale'] = node['scale'].at[np.asarray(channels)].set(0.0)
    node['bias'] = node['bias'].at[np.asarray(channels)].set(-1.0)
  return {**variables, 'params': params}


def _check_prune_preserves_function(model, x_shape, kills, survivors, seed=0):
  """kills: (group, bn paths, channels) made exactly dead; survivors: (group, bn paths,
  channels) killed at some but not all producers of a stream (must stay alive)."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  variables = _randomize_bn(_init(model, x, seed), seed)
  for _, bns, channels in kills + survivors:
    variables = _kill(variables, bns, channels)
  variables = _calibrate(model, variables, x)
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])

  alive, activity = deadunits.dead_unit_stats(model, variables, x, criterion='relu')
  expected = {name: np.ones(w, bool) for name, w in model.widths.items()}
  for group, _, channels in kills:
    expected[group][np.asarray(channels)] = False
  assert set(alive) == set(expected)
  for name in expected:  # exactly the killed units are dead, nothing else
    np.testing.assert_array_equal(alive[name], expected[name], err_msg=name)

  keeps = surgery.keep_masks(alive, activity)
  new_model, new_vars, new_opt = surgery.prune(model, variables, opt_state, keeps)
  assert type(new_model) is type(model)
  for group, _, channels in kills:
    assert new_model.widths[group] == model.widths[group] - len(channels)
  # Optimizer state follows the params' new shapes leaf by leaf.
  new_shapes = jax.tree.map(jnp.shape, new_vars['params'])
  assert jax.tree.map(jnp.shape, new_opt[0].mu) == new_shapes
  assert jax.tree.map(jnp.shape, _init(new_model, x[:1])['params']) == new_shapes

  x_new = jnp.asarray(rng.normal(size=x_shape), jnp.float32)  # fresh inputs
  before = model.apply(variables, x_new, train=False)
  after = new_model.apply(new_vars, x_new, train=False)
  scale = float(jnp.max(jnp.abs(before)))
  np.testing.assert_allclose(after, before, atol=1e-5 * scale, rtol=0)

  # The comparison is sensitive: removing one more (live) stream/last unit changes logits.
  group = kills[-1][0]
  extra = dict(keeps)
  extra[group] = keeps[group].copy()
  extra[group][np.flatnonzero(keeps[group])[0]] = False
  wrong_model, wrong_vars, _ = surgery.prune(model, variables, opt_state, extra)
  wrong = wrong_model.apply(wrong_vars, x_new, train=False)
  assert float(jnp.max(jnp.abs(wrong - before))) > 1e-3 * scale


def _stream_bns(model, stage, with_stem=False):
  """Every BN producing stage ``stage``'s stream."""
  last = f'bn{len(resnet.INTERNAL_CONVS[model.block]) + 1}'
  bns = [(resnet.block_name(stage, b), last) for b in range(model.stage_sizes[stage])]
  if resnet.has_projection(model.block, stage, 0):
    bns.append((resnet.block_name(stage, 0), 'proj_bn'))
  if with_stem:
    bns.append(('stem_bn',))
  return bns


def test_resnet18_cifar_prune_preserves_function():
  model = models.build('resnet18', 10, stem='cifar', width_multiplier=0.125)  # 8-16-32-64
  kills = [
    ('stage0_block1_conv1', [('stage0_block1', 'bn1')], [1, 3]),
    ('stage2_block0_conv1', [('stage2_block0', 'bn1')], [0]),
    # Identity shortcut in stage 0: the stem carries the stream too.
    ('stage0_stream', _stream_bns(model, 0, with_stem=True), [2]),
    ('stage1_stream', _stream_bns(model, 1), [0, 7]),
    ('stage3_stream', _stream_bns(model, 3), [4]),
  ]
  survivors = [
    # Dead in the stem only: the blocks' outputs still carry it.
    ('stage0_stream', [('stem_bn',)], [5]),
    # Dead in every block's last BN, but the projection shortcut keeps it alive.
    ('stage2_stream', _stream_bns(model, 2)[:-1], [3]),
  ]
  _check_prune_preserves_function(model, (16, 16, 16, 3), kills, survivors)


def test_resnet50_prune_preserves_function():
  model = models.build('resnet50', 10, width_multiplier=1 / 16)  # streams 16-32-64-128
  kills = [
    ('stem', [('stem_bn',)], [1]),
    ('stage0_block1_conv2', [('stage0_block1', 'bn2')], [2]),
    ('stage1_block0_conv1', [('stage1_block0', 'bn1')], [0]),
    ('stage0_stream', _stream_bns(model, 0), [9]),
    ('stage1_stream', _stream_bns(model, 1), [3, 5]),
    ('stage3_stream', _stream_bns(model, 3), [7]),
  ]
  survivors = [('stage2_stream', _stream_bns(model, 2)[1:], [4])]  # alive via block 0
  _check_prune_preserves_function(model, (8, 32, 32, 3), kills, survivors)


def test_vgg16_prune_preserves_function():
  model = models.build('vgg16', 10, width_multiplier=1 / 16)  # 4 ... 32
  kills = [
    ('conv_1', [('norm_1',)], [0]),
    ('conv_7', [('norm_7',)], [3, 4]),
    ('conv_12', [('norm_12',)], [1, 5]),  # flatten head: 2x2 positions tiled
  ]
  _check_prune_preserves_function(model, (8, 64, 64, 3), kills, [])


# ----------------------------------------------------------------------------
# Training continuity.


def test_resnet18_training_continues_identically_after_pruning():
  """K Adam steps of the pruned model give the unpruned model's losses (noise off)."""
  model = models.build('resnet18', 10, width_multiplier=1 / 16)  # 4-8-16-32
  rng = np.random.default_rng(0)
  batches = [
    {
      'image': jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
      'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    for _ in range(5)
  ]
  variables = _init(model, batches[0]['image'])
  # BN scale 0, offset -1: the channel is -1 before the ReLU in train *and* eval mode, so
  # its loss gradient is exactly zero and Adam leaves it where it is.
  for bns, channels in [
    ([('stage0_block0', 'bn1')], [1]),
    ([('stage2_block1', 'bn1')], [3, 6]),
    (_stream_bns(model, 0, with_stem=True), [0]),
    (_stream_bns(model, 2), [2, 9]),
    (_stream_bns(model, 3), [31]),
  ]:
    variables = _kill(variables, bns, channels)
  tx = optax.adam(3e-3)
  state = {
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
    'opt_state': tx.init(variables['params']),
  }
  # Two steps first, so the optimizer state being sliced is not trivial.
  step = jax.jit(make_train_step(model, tx))
  for batch in batches[:2]:
    state, _ = step(state, batch)
  alive, activity = deadunits.dead_unit_stats(
    model, {'params': state['params'], 'batch_stats': state['batch_stats']}, batches[0]['image']
  )
  assert sum(int((~a).sum()) for a in alive.values()) == 1 + 2 + 1 + 2 + 1
  pruned, variables, opt_state = surgery.prune(
    model,
    {'params': state['params'], 'batch_stats': state['batch_stats']},
    state['opt_state'],
    surgery.keep_masks(alive, activity),
  )
  pruned_state = {**variables, 'opt_state': opt_state}
  pruned_step = jax.jit(make_train_step(pruned, tx))
  losses, pruned_losses = [], []
  for batch in batches[2:]:
    state, m = step(state, batch)
    pruned_state, pm = pruned_step(pruned_state, batch)
    losses.append(float(m['loss']))
    pruned_losses.append(float(pm['loss']))
  assert losses[0] != losses[-1]  # it trains
  np.testing.assert_allclose(pruned_losses, losses, rtol=2e-5)
  x = batches[0]['image']
  np.testing.assert_allclose(
    pruned.apply({k: pruned_state[k] for k in ('params', 'batch_stats')}, x, train=False),
    model.apply({k: state[k] for k in ('params', 'batch_stats')}, x, train=False),
    atol=1e-4,
    rtol=1e-4,
  )


def test_benchmark_random_keeps_remove_the_fraction_of_every_group():
  from tools import benchmark  # pylint: disable=g-import-not-at-top

  model = models.build('resnet18', 10, width_multiplier=0.25)
  keeps = benchmark.random_keeps(model, 0.75, seed=0)
  assert set(keeps) == set(model.widths)
  for name, keep in keeps.items():
    assert keep.sum() == model.widths[name] - round(0.75 * model.widths[name]), name
  assert not all(
    np.array_equal(keeps[n], benchmark.random_keeps(model, 0.75, seed=1)[n]) for n in keeps
  )
  with pytest.raises(ValueError, match='sparsity'):
    benchmark.random_keeps(model, 1.0)
