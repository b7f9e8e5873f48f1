"""demp.nnx: plain Flax NNX models pruned exactly, their optimizers sliced, refusals named.

The models are written as the Flax NNX guides write them (layers as
attributes, literal widths, ``nnx.relu``); nothing in them knows about this
project. Units are forced dead (a BatchNorm's scale 0 and offset -1, or a
Linear's kernel column 0 and bias -1: the ReLU reads -1). The expected state
after the surgery is written out by hand, leaf by leaf (``CUTS``).
"""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import demp
from demp import nnx as dnnx

# ----------------------------------------------------------------------------
# Plain NNX models.


class MLP(nnx.Module):
  def __init__(self, *, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 12, rngs=rngs)
    self.out = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.fc1(x))
    x = nnx.relu(self.fc2(x))
    return self.out(x)


class CNN(nnx.Module):
  """Conv-BN-ReLU twice, then an NHWC flatten into the classifier."""

  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(3, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.conv2 = nnx.Conv(6, 8, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(8, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 8, 5, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.reshape((x.shape[0], -1)))


class ResNetBlock(nnx.Module):
  def __init__(self, in_features, out_features, strides=1, *, rngs):
    self.conv1 = nnx.Conv(
      in_features, out_features, (3, 3), strides=strides, use_bias=False, rngs=rngs
    )
    self.bn1 = nnx.BatchNorm(out_features, rngs=rngs)
    self.conv2 = nnx.Conv(out_features, out_features, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(out_features, rngs=rngs)
    if in_features != out_features or strides != 1:
      self.proj = nnx.Conv(
        in_features, out_features, (1, 1), strides=strides, use_bias=False, rngs=rngs
      )
      self.norm_proj = nnx.BatchNorm(out_features, rngs=rngs)
    else:
      self.proj = None

  def __call__(self, x):
    residual = x
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.proj is not None:
      residual = self.norm_proj(self.proj(residual))
    return nnx.relu(residual + y)


class ResNet(nnx.Module):
  def __init__(self, *, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.block1 = ResNetBlock(4, 8, strides=2, rngs=rngs)
    self.block2 = ResNetBlock(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    x = self.block2(self.block1(x))
    return self.head(x.mean(axis=(1, 2)))


class InvertedResidual(nnx.Module):
  """MobileNetV2's block: expand, depthwise, project (linear), residual add."""

  def __init__(self, features, expanded, *, rngs):
    self.expand = nnx.Conv(features, expanded, (1, 1), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(expanded, rngs=rngs)
    self.dw = nnx.Conv(expanded, expanded, (3, 3), feature_group_count=expanded, rngs=rngs)
    self.bn2 = nnx.BatchNorm(expanded, rngs=rngs)
    self.project = nnx.Conv(expanded, features, (1, 1), use_bias=False, rngs=rngs)
    self.bn3 = nnx.BatchNorm(features, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.expand(x)))
    y = nnx.relu(self.bn2(self.dw(y)))
    return x + self.bn3(self.project(y))


class MobileNet(nnx.Module):
  def __init__(self, *, rngs):
    self.stem = nnx.Conv(3, 6, (3, 3), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.block = InvertedResidual(6, 12, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    return self.head(self.block(x).mean(axis=(1, 2)))


class Inception(nnx.Module):
  """Two branches concatenated along the channels."""

  def __init__(self, *, rngs):
    self.conv_a = nnx.Conv(3, 4, (1, 1), rngs=rngs)
    self.bn_a = nnx.BatchNorm(4, rngs=rngs)
    self.conv_b = nnx.Conv(3, 5, (3, 3), rngs=rngs)
    self.bn_b = nnx.BatchNorm(5, rngs=rngs)
    self.conv_c = nnx.Conv(9, 6, (3, 3), rngs=rngs)
    self.bn_c = nnx.BatchNorm(6, rngs=rngs)
    self.head = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    a = nnx.relu(self.bn_a(self.conv_a(x)))
    b = nnx.relu(self.bn_b(self.conv_b(x)))
    y = nnx.relu(self.bn_c(self.conv_c(jnp.concatenate([a, b], axis=-1))))
    return self.head(y.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------
# Units forced dead, and the state expected after their removal.


def kill_bn(bn, units):
  bn.scale[...] = bn.scale[...].at[np.array(units)].set(0.0)
  bn.bias[...] = bn.bias[...].at[np.array(units)].set(-1.0)


def kill_linear(layer, units):
  layer.kernel[...] = layer.kernel[...].at[:, np.array(units)].set(0.0)
  layer.bias[...] = layer.bias[...].at[np.array(units)].set(-1.0)


def _bn_cut(path, units):
  return {f'{path}/{leaf}': [(0, units)] for leaf in ('scale', 'bias', 'mean', 'var')}


def _mlp_kill(m):
  kill_linear(m.fc1, [3, 7])
  kill_linear(m.fc2, [0, 5])


MLP_CUTS = {
  'fc1/kernel': [(1, [3, 7])],
  'fc1/bias': [(0, [3, 7])],
  'fc2/kernel': [(0, [3, 7]), (1, [0, 5])],
  'fc2/bias': [(0, [0, 5])],
  'out/kernel': [(0, [0, 5])],
}


def _cnn_kill(m):
  kill_bn(m.bn1, [1, 4])
  kill_bn(m.bn2, [2, 6])


CNN_CUTS = {
  'conv1/kernel': [(3, [1, 4])],
  'conv1/bias': [(0, [1, 4])],
  **_bn_cut('bn1', [1, 4]),
  'conv2/kernel': [(2, [1, 4]), (3, [2, 6])],
  'conv2/bias': [(0, [2, 6])],
  **_bn_cut('bn2', [2, 6]),
  'head/kernel': [(0, [p * 8 + c for p in range(16) for c in (2, 6)])],  # NHWC: channel innermost
}


def _resnet_kill(m):
  kill_bn(m.bn, [1])
  kill_bn(m.block1.bn1, [2])
  for bn in (m.block1.bn2, m.block1.norm_proj, m.block2.bn2):  # the residual stream
    kill_bn(bn, [5])
  kill_bn(m.block2.bn1, [0])


RESNET_CUTS = {
  'conv/kernel': [(3, [1])],
  **_bn_cut('bn', [1]),
  'block1/conv1/kernel': [(2, [1]), (3, [2])],
  'block1/proj/kernel': [(2, [1]), (3, [5])],
  **_bn_cut('block1/bn1', [2]),
  'block1/conv2/kernel': [(2, [2]), (3, [5])],
  **_bn_cut('block1/bn2', [5]),
  **_bn_cut('block1/norm_proj', [5]),
  'block2/conv1/kernel': [(2, [5]), (3, [0])],
  **_bn_cut('block2/bn1', [0]),
  'block2/conv2/kernel': [(2, [0]), (3, [5])],
  **_bn_cut('block2/bn2', [5]),
  'head/kernel': [(0, [5])],
}


def _mobilenet_kill(m):
  kill_bn(m.block.bn2, [3, 9])  # after the depthwise conv
  kill_bn(m.bn, [2])  # the stream: the stem's unit reads -1 -> 0, and the block adds 0 to it
  m.block.bn3.scale[...] = m.block.bn3.scale[...].at[2].set(0.0)
  m.block.bn3.bias[...] = m.block.bn3.bias[...].at[2].set(0.0)
  # No ReLU after the add: the head's gradient would revive bn3's offset unless it reads 0.
  m.head.kernel[...] = m.head.kernel[...].at[2].set(0.0)


MOBILENET_CUTS = {
  'stem/kernel': [(3, [2])],
  **_bn_cut('bn', [2]),
  'block/expand/kernel': [(2, [2]), (3, [3, 9])],
  **_bn_cut('block/bn1', [3, 9]),
  'block/dw/kernel': [(3, [3, 9])],
  'block/dw/bias': [(0, [3, 9])],
  **_bn_cut('block/bn2', [3, 9]),
  'block/project/kernel': [(2, [3, 9]), (3, [2])],
  **_bn_cut('block/bn3', [2]),
  'head/kernel': [(0, [2])],
}


def _inception_kill(m):
  kill_bn(m.bn_a, [1])
  kill_bn(m.bn_b, [0, 3])


INCEPTION_CUTS = {
  'conv_a/kernel': [(3, [1])],
  'conv_a/bias': [(0, [1])],
  **_bn_cut('bn_a', [1]),
  'conv_b/kernel': [(3, [0, 3])],
  'conv_b/bias': [(0, [0, 3])],
  **_bn_cut('bn_b', [0, 3]),
  'conv_c/kernel': [(2, [1, 4 + 0, 4 + 3])],  # b sits at offset 4 of the concatenation
}

CASES = {
  # name: (class, input shape, kill, cuts, {group: (width, dead units)})
  'mlp': (MLP, (8,), _mlp_kill, MLP_CUTS, {'fc1': (16, [3, 7]), 'fc2': (12, [0, 5])}),
  'cnn': (CNN, (8, 8, 3), _cnn_kill, CNN_CUTS, {'conv1': (6, [1, 4]), 'conv2': (8, [2, 6])}),
  'resnet': (
    ResNet,
    (8, 8, 3),
    _resnet_kill,
    RESNET_CUTS,
    {
      'conv': (4, [1]),
      'block1/conv1': (8, [2]),
      'block1/conv2': (8, [5]),
      'block2/conv1': (8, [0]),
    },
  ),
  'mobilenet': (
    MobileNet,
    (6, 6, 3),
    _mobilenet_kill,
    MOBILENET_CUTS,
    {'stem': (6, [2]), 'block/expand': (12, [3, 9])},
  ),
  'inception': (
    Inception,
    (6, 6, 3),
    _inception_kill,
    INCEPTION_CUTS,
    {'conv_a': (4, [1]), 'conv_b': (5, [0, 3]), 'conv_c': (6, [])},
  ),
}


def _flat(model):
  """``'a/b/leaf' -> array`` of every Param and BatchStat."""
  state = nnx.state(model, (nnx.Param, nnx.BatchStat))
  return {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _expected(flat, cuts):
  out = dict(flat)
  for leaf, axes in cuts.items():
    for axis, units in axes:
      out[leaf] = np.delete(out[leaf], units, axis=axis)
  return out


def _assert_state(model, expected, atol=0.0):
  got = _flat(model)
  assert sorted(got) == sorted(expected)
  for k in got:
    assert got[k].shape == expected[k].shape, k
    np.testing.assert_allclose(got[k], expected[k], atol=atol, rtol=0, err_msg=k)


def _logits(model, x, train):
  m = nnx.clone(model)  # a train-mode call updates BatchNorm statistics: on a copy
  m.train() if train else m.eval()
  return np.asarray(m(x))


def _build(case, seed=0):
  cls, shape, kill, cuts, dead = CASES[case]
  model = cls(rngs=nnx.Rngs(seed))
  x = jax.random.normal(jax.random.key(1), (32, *shape))
  kill(model)
  return dnnx.make_prunable(model, x[:1]), x, cuts, dead


def _masks(dead):
  return {g: ~np.isin(np.arange(w), units) for g, (w, units) in dead.items()}


# ----------------------------------------------------------------------------
# Discovery, death check, surgery.


@pytest.mark.parametrize('case', sorted(CASES))
def test_groups_found_and_dead_units_seen(case):
  model, x, _, dead = _build(case)
  assert dict(dnnx.units_of(model).widths) == {g: w for g, (w, _) in dead.items()}
  alive, activity = dnnx.dead_unit_stats(model, x, batch_size=8)
  assert sorted(alive) == sorted(dead)
  for g, (w, units) in dead.items():
    np.testing.assert_array_equal(alive[g], ~np.isin(np.arange(w), units), err_msg=g)
    assert (activity[g][units] == 0).all() and (activity[g][alive[g]] > 0).all()
  # One batch or four: the same statistics.
  alive1, activity1 = dnnx.dead_unit_stats(model, x, batch_size=32)
  for g in alive:
    np.testing.assert_array_equal(alive1[g], alive[g])
    np.testing.assert_allclose(activity1[g], activity[g], rtol=1e-6)


def test_activity_is_the_max_post_activation():
  model, x, _, _ = _build('mlp')
  _, activity = dnnx.dead_unit_stats(model, x)
  h1 = np.maximum(
    np.asarray(x) @ np.asarray(model.fc1.kernel[...]) + np.asarray(model.fc1.bias[...]), 0
  )
  np.testing.assert_allclose(activity['fc1'], h1.max(axis=0), rtol=1e-6)


@pytest.mark.parametrize('case', sorted(CASES))
def test_prune_keeps_the_function(case):
  model, x, cuts, dead = _build(case)
  before = _flat(model)
  logits = {train: _logits(model, x, train) for train in (False, True)}
  alive, activity = dnnx.dead_unit_stats(model, x)
  small, _ = dnnx.prune(model, None, demp.keep_masks(alive, activity))
  _assert_state(small, _expected(before, cuts))
  for train in (False, True):
    np.testing.assert_allclose(_logits(small, x, train), logits[train], atol=1e-5, rtol=0)
  assert dict(dnnx.units_of(small).widths) == {g: w - len(u) for g, (w, u) in dead.items()}
  _assert_state(model, before)  # the original is untouched
  np.testing.assert_array_equal(_logits(model, x, False), logits[False])


def test_layer_attributes_follow_the_arrays():
  model, x, _, _ = _build('mobilenet')
  small, _ = dnnx.prune(model, None, _masks(CASES['mobilenet'][4]))
  dw, expand, project = small.block.dw, small.block.expand, small.block.project
  assert (dw.in_features, dw.out_features, dw.feature_group_count) == (10, 10, 10)
  assert dw.kernel_shape == dw.kernel.shape == (3, 3, 1, 10)
  assert (expand.in_features, expand.out_features) == (5, 10)
  assert (project.in_features, project.out_features) == (10, 5)
  assert small.block.bn2.num_features == 10 and small.bn.num_features == 5
  assert (small.head.in_features, small.head.out_features) == (5, 3)
  assert nnx.graphdef(small) != nnx.graphdef(model)
  # A pruned model prunes again, exactly.
  kill_bn(small.block.bn2, [0])
  alive, activity = dnnx.dead_unit_stats(small, x)
  np.testing.assert_array_equal(alive['block/expand'], np.arange(10) != 0)
  again, _ = dnnx.prune(small, None, demp.keep_masks(alive, activity))
  assert again.block.dw.feature_group_count == again.block.bn2.num_features == 9
  np.testing.assert_allclose(_logits(again, x, False), _logits(small, x, False), atol=1e-5, rtol=0)


class PerUnitNorm(nnx.Module):
  def __init__(self, norm, *, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.norm = norm(4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=(1, 2)))


@pytest.mark.parametrize(
  'norm',
  [nnx.InstanceNorm, lambda n, rngs: nnx.GroupNorm(n, num_groups=n, rngs=rngs)],
  ids=['instance', 'group_of_one'],
)
def test_per_unit_norms_are_pruned_exactly(norm):
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  model = PerUnitNorm(norm, rngs=nnx.Rngs(0))
  kill_bn(model.norm, [2])
  model = dnnx.make_prunable(model, x[:1])
  alive, activity = dnnx.dead_unit_stats(model, x)
  np.testing.assert_array_equal(alive['conv'], np.arange(4) != 2)
  small, _ = dnnx.prune(model, None, demp.keep_masks(alive, activity))
  assert small.norm.num_features == 3 and small.norm.scale.shape == (3,)
  np.testing.assert_allclose(_logits(small, x, False), _logits(model, x, False), atol=1e-5, rtol=0)


def _optimizers():
  return {
    'adam': optax.adam(1e-2),
    'adamw': optax.adamw(1e-2, weight_decay=0.1),
    'sgd_momentum': optax.sgd(1e-2, momentum=0.9),
  }


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  grads = nnx.grad(loss_fn)(model)
  optimizer.update(model, grads)


@pytest.mark.parametrize(
  'case,opt',
  [
    ('mlp', 'adam'),
    ('mlp', 'adamw'),
    ('mlp', 'sgd_momentum'),
    ('resnet', 'adam'),
    ('resnet', 'adamw'),
    ('resnet', 'sgd_momentum'),
    # A conv bias right before a BatchNorm has a zero gradient in exact arithmetic; Adam
    # scales the float noise it gets to the learning rate, differently at other shapes.
    # Models with such biases are run with momentum SGD.
    ('cnn', 'sgd_momentum'),
    ('mobilenet', 'sgd_momentum'),
    ('inception', 'sgd_momentum'),
  ],
)
def test_pruned_training_follows_the_unpruned_trajectory(case, opt):
  model, x, cuts, dead = _build(case)
  y = jnp.arange(x.shape[0]) % 3
  optimizer = nnx.Optimizer(model, _optimizers()[opt], wrt=nnx.Param)
  model.train()
  for _ in range(2):  # the moments are non-zero before the surgery
    _train_step(model, optimizer, x, y)
  small, small_opt = dnnx.prune(model, optimizer, _masks(dead))
  assert int(small_opt.step[...]) == 2
  at_surgery = _flat(model)
  for _ in range(3):
    _train_step(model, optimizer, x, y)
    _train_step(small, small_opt, x, y)
  after = _flat(model)
  _assert_state(small, _expected(after, cuts), atol=1e-5)
  np.testing.assert_allclose(_logits(small, x, False), _logits(model, x, False), atol=1e-5, rtol=0)
  # Both runs moved: the comparison is not between two frozen models.
  assert max(np.abs(after[k] - at_surgery[k]).max() for k in after) > 1e-3


def test_plain_optax_state_is_sliced():
  model, x, cuts, dead = _build('cnn')
  y = jnp.arange(x.shape[0]) % 3
  tx = optax.sgd(1e-2, momentum=0.9)
  opt_state = tx.init(nnx.state(model, nnx.Param))

  def step(model, opt_state):
    grads = nnx.grad(lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean())(
      model
    )
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return opt_state

  model.train()
  opt_state = step(model, opt_state)
  small, small_state = dnnx.prune(model, opt_state, _masks(dead))
  assert jax.tree.structure(small_state) == jax.tree.structure(opt_state)
  trace = small_state[0].trace
  assert isinstance(trace['head']['kernel'], nnx.Param)  # the wrappers are kept
  assert trace['conv2']['kernel'].shape == (3, 3, 4, 6)
  np.testing.assert_array_equal(
    trace['head']['kernel'][...],
    np.delete(opt_state[0].trace['head']['kernel'][...], CNN_CUTS['head/kernel'][0][1], 0),
  )
  assert np.abs(trace['head']['kernel'][...]).max() > 0
  for _ in range(2):
    opt_state = step(model, opt_state)
    small_state = step(small, small_state)
  _assert_state(small, _expected(_flat(model), cuts), atol=1e-5)


# ----------------------------------------------------------------------------
# Refusals: the message names the layer and why.


class WithNorm(nnx.Module):
  def __init__(self, norm, *, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.norm = norm(16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 12, rngs=rngs)
    self.out = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.norm(self.fc1(x)))
    return self.out(nnx.relu(self.fc2(x)))


class WithAttention(nnx.Module):
  def __init__(self, *, rngs):
    self.embed = nnx.Linear(8, 16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(
      num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs
    )
    self.fc = nnx.Linear(16, 12, rngs=rngs)
    self.out = nnx.Linear(12, 3, rngs=rngs)

  def __call__(self, x):
    x = self.attn(nnx.relu(self.embed(x)))
    return self.out(nnx.relu(self.fc(x)).mean(axis=1))


class WithSort(nnx.Module):
  def __init__(self, *, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jnp.sort(nnx.relu(self.fc1(x)), axis=-1))


def _refusal(model, x, group):
  model = dnnx.make_prunable(model, x)
  assert group not in dnnx.units_of(model).widths
  alive, _ = dnnx.dead_unit_stats(model, x)
  assert group not in alive
  with pytest.raises(ValueError) as e:
    dnnx.prune(model, None, {group: np.arange(16) != 0})
  return str(e.value)


@pytest.mark.parametrize('norm', [nnx.LayerNorm, nnx.RMSNorm])
def test_refuses_a_norm_over_the_units(norm):
  x = jax.random.normal(jax.random.key(1), (4, 8))
  message = _refusal(WithNorm(norm, rngs=nnx.Rngs(0)), x, 'fc1')
  assert "layer 'fc1'" in message and f'{norm.__name__} norm normalizes over the units' in message
  assert 'fc2' in dnnx.units_of(dnnx.make_prunable(WithNorm(norm, rngs=nnx.Rngs(0)), x)).widths


def test_refuses_a_group_norm_over_several_units():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  norm = lambda n, rngs: nnx.GroupNorm(n, num_groups=4, rngs=rngs)
  message = _refusal(WithNorm(norm, rngs=nnx.Rngs(0)), x, 'fc1')
  assert "layer 'fc1'" in message and 'groupnorm norm: normalized together by its groups' in message
  assert 'fc2' in dnnx.units_of(dnnx.make_prunable(WithNorm(norm, rngs=nnx.Rngs(0)), x)).widths


def test_refuses_attention():
  x = jax.random.normal(jax.random.key(1), (4, 5, 8))
  message = _refusal(WithAttention(rngs=nnx.Rngs(0)), x, 'embed')
  assert "layer 'embed'" in message and "MultiHeadAttention 'attn'" in message


def test_refuses_an_unknown_op_on_the_units():
  x = jax.random.normal(jax.random.key(1), (4, 8))
  message = _refusal(WithSort(rngs=nnx.Rngs(0)), x, 'fc1')
  assert "layer 'fc1'" in message and 'flows into sort' in message


def test_refuses_bad_masks():
  model, x, _, _ = _build('resnet')
  with pytest.raises(ValueError, match=r"layer 'block1/proj' is in group 'block1/conv2'"):
    dnnx.prune(model, None, {'block1/proj': np.ones(8, bool)})
  with pytest.raises(ValueError, match=r"'conv' has shape \(3,\), the group has 4 units"):
    dnnx.prune(model, None, {'conv': np.ones(3, bool)})
  with pytest.raises(ValueError, match='has no unit groups'):
    dnnx.dead_unit_stats(MLP(rngs=nnx.Rngs(0)), x)


def test_refuses_a_literal_reshape():
  class Literal(nnx.Module):
    def __init__(self, *, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.bn = nnx.BatchNorm(4, rngs=rngs)
      self.head = nnx.Linear(6 * 6 * 4, 3, rngs=rngs)

    def __call__(self, x):
      return self.head(nnx.relu(self.bn(self.conv(x))).reshape((-1, 6 * 6 * 4)))

  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 3))
  model = dnnx.make_prunable(Literal(rngs=nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match='does not run on the example call'):
    dnnx.prune(model, None, {'conv': np.arange(4) != 0})


# ----------------------------------------------------------------------------
# The snippet of docs/nnx.md runs as written.


def test_docs_snippet_runs():
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'nnx.md').read_text()
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  scope = {}
  exec(compile(code, 'docs/nnx.md', 'exec'), scope)
  initial = dnnx.make_prunable(scope['CNN'](4, rngs=nnx.Rngs(0)), scope['x'][:1])
  assert sum(dnnx.units_of(initial).widths.values()) == 16 + 32 + 32
  assert sum(dnnx.units_of(scope['model']).widths.values()) < 16 + 32 + 32  # units were removed
  assert isinstance(scope['optimizer'], nnx.Optimizer)
  marked = [l for l in code.splitlines() if l.rstrip().endswith('# demp')]
  assert 1 <= len(marked) <= 5
