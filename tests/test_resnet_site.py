"""ResNets pruned per stream site (``model.prune_stream='site'``): one unit group per
post-addition activation, identity shortcuts as selected identities. Exact function
preservation (eval and train mode), the optimizer state, FLOPs and export."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from demp import deadunits, export, flops, models, protocol, surgery
from demp.models import resnet
from demp.trainer.steps import make_train_step
from tests.test_resnet_vgg import _calibrate as _calibrate_all
from tests.test_resnet_vgg import _randomize_bn
from tests.test_resnet_vgg import _init as _init_numpy


def _init(model, x, seed=0):
  """Numpy-filled variables (``tests.test_resnet_vgg._init``), the stream ids as ``init``
  sets them (``1 .. width``: the dense stream's channels)."""

  def ids(path, leaf):
    name = path[-1].key
    return jnp.arange(1, leaf.size + 1, dtype=leaf.dtype) if name.startswith('shortcut_') else leaf

  return jax.tree.map_with_path(ids, _init_numpy(model, x, seed))


def _calibrate(model, variables, x):
  """Running statistics from ``x`` (``tests.test_resnet_vgg._calibrate``); the ids as they were."""
  new = _calibrate_all(model, variables, x)
  keep = lambda path, a, b: a if path[-1].key.startswith('shortcut_') else b
  return {
    **new,
    'batch_stats': jax.tree.map_with_path(keep, variables['batch_stats'], new['batch_stats']),
  }


def _site_kill(variables, bns, channels, offset=-100.0):
  """Channels of the BNs ``bns`` output ``offset``: far below zero, so the block's output
  channel is zero after the ReLU even though the identity shortcut adds its input there."""
  params = flax.core.unfreeze(variables['params'])
  for prefix in bns:
    node = params
    for k in prefix:
      node = node[k]
    node['scale'] = node['scale'].at[np.asarray(channels)].set(0.0)
    node['bias'] = node['bias'].at[np.asarray(channels)].set(offset)
  return {**variables, 'params': params}


def _out_bns(model, s, b):
  """The BNs that produce block ``b`` of stage ``s``'s output (last BN, projection BN)."""
  name = resnet.block_name(s, b)
  bns = [(name, f'bn{len(resnet.INTERNAL_CONVS[model.block]) + 1}')]
  if resnet.has_projection(model.block, s, b):
    bns.append((name, 'proj_bn'))
  return bns


def test_stream_modes_groups_and_widths():
  assert resnet.stream_mode(True) == 'stage' and resnet.stream_mode(False) == 'off'
  assert resnet.stream_mode('Site') == 'site' and resnet.stream_mode('False') == 'off'
  with pytest.raises(ValueError, match=r"model.prune_stream='sites' is not one of"):
    models.build('resnet18', 10, prune_stream='sites')
  r18 = models.build('resnet18', 10, width_multiplier=1 / 16, prune_stream='site')
  assert r18.prune_stream == 'site'
  groups = {g.name: g for g in r18.unit_groups()}
  assert list(groups) == list(r18.widths) and len(groups) == 1 + 8 + 8  # stem, convs, sites
  g = groups['stage1_block0_out']  # a projection block, read by an identity block
  assert g.sites == (('stage1_block0', 'out'),)
  assert {s.path for s in g.producers if s.path[-1] == 'kernel'} == {
    ('stage1_block0', 'conv2', 'kernel'),
    ('stage1_block0', 'proj_conv', 'kernel'),
  }
  assert set(g.consumers) == {
    protocol.Slice(('stage1_block1', 'conv1', 'kernel'), 2),
    protocol.Slice(('stage1_block1', 'shortcut_in'), 0),
  }
  g = groups['stage1_block1_out']  # an identity block, read by the next stage's projection
  assert protocol.Slice(('stage1_block1', 'shortcut_out'), 0) in g.producers
  assert {s.path for s in g.consumers} == {
    ('stage2_block0', 'conv1', 'kernel'),
    ('stage2_block0', 'proj_conv', 'kernel'),
  }
  assert {s.path for s in groups['stem'].consumers} == {
    ('stage0_block0', 'conv1', 'kernel'),
    ('stage0_block0', 'shortcut_in'),
  }
  assert groups['stage3_block1_out'].consumers == (protocol.Slice(('head', 'kernel'), 0),)
  # A stage's stream width given once sets every site of the stage; a site's own wins.
  custom = models.build(
    'resnet18',
    10,
    width_multiplier=1 / 16,
    prune_stream='site',
    widths={
      **{k: w for k, w in r18.widths.items() if not k.startswith('stage2_block0_out')},
      'stage2_stream': 12,
      'stage2_block1_out': 10,
    },
  )
  assert custom.widths['stage2_block0_out'] == 12 and custom.widths['stage2_block1_out'] == 10
  # No trainable weight is added: the dense parameter count is the standard one.
  dense = models.build('resnet18', 10, prune_stream='site')
  shapes = flops.variables_shape(dense, (32, 32, 3))
  assert flops.num_params(shapes['params']) == 11_173_962
  # Dense, the selected identity is the identity: the same function as the stage-coupled model.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  coupled = models.build('resnet18', 10, width_multiplier=1 / 16)
  v_site, v_stage = _init(r18, x), _init(coupled, x)
  assert set(v_site['batch_stats']['stage0_block1']) == {
    'bn1',
    'bn2',
    'shortcut_in',
    'shortcut_out',
  }
  np.testing.assert_array_equal(
    r18.apply(v_site, x, train=False), coupled.apply(v_stage, x, train=False)
  )


def test_selected_identity():
  x = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(1, 2, 3, 4) + 1
  got = resnet.select_channels(x, jnp.array([1.0, 3, 4, 6]), jnp.array([2.0, 3, 4, 5, 6]))
  want = jnp.stack([0 * x[..., 0], x[..., 1], x[..., 2], 0 * x[..., 0], x[..., 3]], -1)
  np.testing.assert_array_equal(got, want)
  # An id of 0 (a silenced unit) connects nothing; the ids need not be sorted.
  got = resnet.select_channels(x, jnp.array([4.0, 0, 2, 1]), jnp.array([1.0, 0, 2, 4]))
  want = jnp.stack([x[..., 3], 0 * x[..., 0], x[..., 2], x[..., 0]], -1)
  np.testing.assert_array_equal(got, want)


def _forced_site_prune(model, x_shape, kills, seed=0):
  """Kills ``(site group, channels)`` at one site each, checks the death check sees exactly
  those, prunes, and compares eval- and train-mode logits. Returns the models and variables."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  variables = _randomize_bn(_init(model, x, seed), seed)
  for group, channels in kills:
    s, b = (int(t[5:]) for t in group.split('_')[:2])
    variables = _site_kill(variables, _out_bns(model, s, b), channels)
  variables = _calibrate(model, variables, x)
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])

  alive, activity = deadunits.dead_unit_stats(model, variables, x, criterion='relu')
  expected = {name: np.ones(w, bool) for name, w in model.widths.items()}
  for group, channels in kills:
    expected[group][np.asarray(channels)] = False
  for name in expected:  # exactly the killed units are dead, at their site only
    np.testing.assert_array_equal(alive[name], expected[name], err_msg=name)

  keeps = surgery.keep_masks(alive, activity)
  new_model, new_vars, new_opt = surgery.prune(
    model, variables, opt_state, keeps, example_input=x[:1]
  )
  for name, w in model.widths.items():
    assert new_model.widths[name] == w - int((~expected[name]).sum()), name
  new_shapes = jax.tree.map(jnp.shape, new_vars['params'])
  assert jax.tree.map(jnp.shape, new_opt[0].mu) == new_shapes
  built = flops.variables_shape(new_model, x_shape[1:])
  assert jax.tree.map(jnp.shape, built) == jax.tree.map(jnp.shape, new_vars)

  x_new = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
  before = model.apply(variables, x_new, train=False)
  after = new_model.apply(new_vars, x_new, train=False)
  scale = max(1.0, float(jnp.max(jnp.abs(before))))
  np.testing.assert_allclose(after, before, atol=1e-5 * scale, rtol=0)
  before_t, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  after_t, _ = new_model.apply(new_vars, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(after_t, before_t, atol=1e-5 * scale, rtol=0)

  # Sensitive: removing one more (live) unit of a killed site changes the logits.
  group = kills[0][0]
  extra = {**keeps, group: keeps[group].copy()}
  extra[group][np.flatnonzero(keeps[group])[0]] = False
  wrong_model, wrong_vars, _ = surgery.prune(model, variables, opt_state, extra)
  wrong = wrong_model.apply(wrong_vars, x_new, train=False)
  assert float(jnp.max(jnp.abs(wrong - before))) > 1e-3 * scale
  return model, variables, new_model, new_vars


def test_resnet18_site_prune_preserves_function():
  model = models.build('resnet18', 10, width_multiplier=0.125, prune_stream='site')  # 8-...-64
  kills = [
    ('stage1_block0_out', [0, 5]),  # projection block; its reader has an identity shortcut
    ('stage0_block0_out', [2]),  # identity shortcut fed by the stem
    ('stage2_block1_out', [3]),  # identity block; read by the next stage's projection
    ('stage3_block1_out', [4, 60]),  # read by the head
  ]
  _, _, small, small_vars = _forced_site_prune(model, (16, 16, 16, 3), kills)
  w = lambda m: [m.widths[f'stage3_block{b}_out'] for b in range(2)]
  assert w(model) == [64, 64] and w(small) == [64, 62]
  # The next block's output keeps channels 0 and 5 of stage 1; its shortcut reads zeros there.
  ids = small_vars['batch_stats']['stage1_block1']
  np.testing.assert_array_equal(ids['shortcut_in'], [i for i in range(1, 17) if i not in (1, 6)])
  np.testing.assert_array_equal(ids['shortcut_out'], np.arange(1, 17))


def test_resnet50_site_prune_preserves_function():
  model = models.build('resnet50', 10, width_multiplier=1 / 16, prune_stream='site')
  kills = [
    ('stage1_block1_out', [3, 30]),  # identity block inside a stage
    ('stage0_block0_out', [9]),  # projection block (bottleneck: also in stage 0)
    ('stage3_block2_out', [7]),  # read by the head
  ]
  _forced_site_prune(model, (4, 32, 32, 3), kills)


def test_site_prune_slices_adam_state_and_training_matches_on_live_units():
  """Adam mu/nu are sliced like the params; the next steps equal the unpruned run's."""
  model = models.build('resnet18', 10, width_multiplier=1 / 16, prune_stream='site')  # 4-...-32
  rng = np.random.default_rng(0)
  batches = [
    {
      'image': jnp.asarray(rng.normal(size=(16, 16, 16, 3)), jnp.float32),
      'label': jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    }
    for _ in range(5)
  ]
  variables = _randomize_bn(_init(model, batches[0]['image']), 0)
  # Dead in train and eval mode alike (BN scale 0): zero gradient, so Adam leaves them.
  for s, b, channels in [(0, 1, [1]), (1, 0, [2, 7]), (2, 1, [5]), (3, 1, [31])]:
    variables = _site_kill(variables, _out_bns(model, s, b), channels)
  tx = optax.adam(3e-3)
  state = {
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
    'opt_state': tx.init(variables['params']),
  }
  step = jax.jit(make_train_step(model, tx))
  for batch in batches[:2]:  # a non-trivial optimizer state to slice
    state, _ = step(state, batch)
  both = lambda st: {'params': st['params'], 'batch_stats': st['batch_stats']}
  alive, activity = deadunits.dead_unit_stats(model, both(state), batches[0]['image'])
  killed = {'stage0_block1_out': [1], 'stage1_block0_out': [2, 7], 'stage2_block1_out': [5]}
  killed['stage3_block1_out'] = [31]
  for name, channels in killed.items():  # dead at that site only, after two steps
    np.testing.assert_array_equal(np.flatnonzero(~alive[name]), channels, err_msg=name)
  keeps = surgery.keep_masks({k: alive[k] for k in killed}, activity)
  groups = protocol.unit_groups(model)
  params0 = state['params']
  on_live = lambda tree: surgery.slice_optimizer_state(tree, params0, groups, keeps)
  pruned, pvars, popt = surgery.prune(model, both(state), state['opt_state'], keeps)
  # mu and nu are the unpruned ones, sliced exactly like the params.
  for moment in ('mu', 'nu'):
    want = on_live(getattr(state['opt_state'][0], moment))
    for a, b in zip(jax.tree.leaves(getattr(popt[0], moment)), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  pstate = {**pvars, 'opt_state': popt}
  pstep = jax.jit(make_train_step(pruned, tx))
  losses, plosses = [], []
  for batch in batches[2:]:
    state, m = step(state, batch)
    pstate, pm = pstep(pstate, batch)
    losses.append(float(m['loss']))
    plosses.append(float(pm['loss']))
  assert losses[0] != losses[-1]  # it trains
  np.testing.assert_allclose(plosses, losses, rtol=2e-5)
  # After the steps the pruned params (and moments) are the unpruned ones on the live units.
  for a, b in zip(jax.tree.leaves(pstate['params']), jax.tree.leaves(on_live(state['params']))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  mu = on_live(state['opt_state'][0].mu)
  for a, b in zip(jax.tree.leaves(pstate['opt_state'][0].mu), jax.tree.leaves(mu)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_site_flops_count_the_shortcut_gather():
  """XLA's count: pruning lowers it; a selected identity costs one op per output element
  per image (the select after the gather) plus a per-call index match."""
  # One identity block, selected vs plain: the per-image difference is exactly H·W·C.
  x_shape, c = (8, 8, 16), 16

  def block_flops(select, batch):
    blk = resnet.Block('basic', (8, c), 1, False, 'relu', select=select)
    x = jax.ShapeDtypeStruct((batch, *x_shape), jnp.float32)
    v = jax.eval_shape(lambda x: blk.init(jax.random.key(0), x, train=False), x)
    return flops.xla_flops(lambda v, x: blk.apply(v, x, train=False), v, x)

  per_image = lambda select: block_flops(select, 3) - block_flops(select, 1)
  assert per_image(True) - per_image(False) == 2 * 8 * 8 * c
  per_call = block_flops(True, 1) - block_flops(False, 1) - 8 * 8 * c  # the id match
  assert 0 < per_call < 64 * c
  # The whole network: the dense site model costs more than the coupled one (the gathers);
  # pruning one site lowers the count.
  site = models.build('resnet18', 10, width_multiplier=1 / 16, prune_stream='site')
  stage = models.build('resnet18', 10, width_multiplier=1 / 16)
  dense = flops.forward_flops(site, (16, 16, 3))
  assert dense > flops.forward_flops(stage, (16, 16, 3))
  pruned = flops.at_widths(site, {**site.widths, 'stage1_block0_out': 5})
  assert flops.forward_flops(pruned, (16, 16, 3)) < dense


def test_site_pruned_model_exports_with_bn_folding():
  model = models.build('resnet18', 10, width_multiplier=1 / 16, prune_stream='site')
  _, variables, small, small_vars = _forced_site_prune(
    model, (8, 16, 16, 3), [('stage1_block0_out', [1]), ('stage2_block0_out', [0, 3])]
  )
  folded, report = export.fold_batch_norm(small, small_vars, (16, 16, 3))
  assert not report['not_folded'] and len(report['folded']) == 1 + 8 * 2 + 3
  assert 'shortcut_in' in folded['batch_stats']['stage2_block1']
  x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 16, 16, 3)), jnp.float32)
  want = model.apply(variables, x, train=False)
  np.testing.assert_allclose(export.apply_folded(small, folded, x), want, atol=1e-4, rtol=1e-4)
  exported = export.export_inference(
    export.inference_fn(small, folded, folded=True), (16, 16, 3), platforms=('cpu',)
  )
  got = jax.export.deserialize(exported.serialize()).call(x)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_silence_and_revive_cut_the_selected_identity():
  """Deferred prunes (silence) and revival zero the ids too: both stay exact."""
  model = models.build('resnet18', 10, width_multiplier=1 / 16, prune_stream='site')
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 16, 16, 3)), jnp.float32)
  variables = _calibrate(model, _randomize_bn(_init(model, x), 1), x)
  tx = optax.adam(1e-3)
  opt_state = tx.init(variables['params'])
  rng = np.random.default_rng(2)
  keeps = {k: rng.random(w) > 0.3 for k, w in model.widths.items()}
  for k in keeps:
    keeps[k][0] = True
  small, small_vars, _ = surgery.prune(model, variables, opt_state, keeps)
  quiet, _ = surgery.silence(model, variables, opt_state, keeps)
  for train in (False, True):
    kw = {'mutable': ['batch_stats']} if train else {}
    a = model.apply(quiet, x, train=train, **kw)
    b = small.apply(small_vars, x, train=train, **kw)
    a, b = (a[0], b[0]) if train else (a, b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # Revival: dead units (norm scale 0, offset far below 0: zero after the addition of the
  # shortcut too) woken; the function is unchanged, the woken site's shortcut path is cut.
  wake = {k: ~v for k, v in keeps.items()}
  params = flax.core.unfreeze(variables['params'])
  for g in protocol.unit_groups(model):
    for s in g.producers:
      if s.path[-1] in ('scale', 'bias'):
        node = params
        for k in s.path[:-1]:
          node = node[k]
        dead_value = 0.0 if s.path[-1] == 'scale' else -100.0
        node[s.path[-1]] = jnp.where(wake[g.name], dead_value, node[s.path[-1]])
  dead = {**variables, 'params': params}
  woke, _, woken = surgery.revive(model, dead, opt_state, wake)
  assert woken and woke['batch_stats']['stage0_block1']['shortcut_in'].min() == 0
  np.testing.assert_allclose(
    model.apply(woke, x, train=False), model.apply(dead, x, train=False), rtol=1e-5, atol=1e-5
  )


def test_subset_config_selects_the_stream_rule():
  from configs import resnet18_cifar10_subset as config  # pylint: disable=g-import-not-at-top

  assert config.get_config().model.prune_stream == 'stage'
  assert config.get_config('stream=site').model.prune_stream == 'site'
  assert config.get_config('stream=False').model.prune_stream == 'off'
  with pytest.raises(ValueError, match=r"config argument stream='sites' is not one of"):
    config.get_config('stream=sites')
  c = config.get_config('stream=site')
  model = models.from_config(c.model, 10)
  assert 'stage3_block1_out' in model.widths and 'stage3_stream' not in model.widths
