"""make_prunable: unit groups found in plain Flax models, and pruning them keeps the function.

The models here are written as their authors would (no project code inside):
the project's own ConvNet / ResNet-18 / VGG-16 / ViT a second time, whose
discovered groups must equal the hand-written ones, and models the project
has never seen (Flax-examples ResNet, DenseNet, MobileNet, MLP-Mixer).
"""

import functools
import pathlib
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import demp
from demp import auto
from demp.models import convnet as demp_convnet
from demp.models import resnet as demp_resnet
from demp.models import vgg as demp_vgg
from demp.models import vit as demp_vit

# ----------------------------------------------------------------------------
# The project's models, written again as plain Flax modules.


def _bn(train, name=None):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class PlainConvNet(nn.Module):
  widths: tuple = (4, 6)
  head: str = 'global'

  @nn.compact
  def __call__(self, x, *, train):
    for i, w in enumerate(self.widths):
      x = nn.Conv(w, (3, 3), use_bias=False, name=f'conv_{i}')(x)
      x = nn.relu(_bn(train, f'norm_{i}')(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.mean(axis=(1, 2)) if self.head == 'global' else x.reshape((x.shape[0], -1))
    return nn.Dense(3, name='head')(x)


class PlainVGG(nn.Module):
  cfg: tuple = (2, 2, 'M', 3, 3, 'M', 4, 4, 4, 'M', 5, 5, 5, 'M', 6, 6, 6, 'M')

  @nn.compact
  def __call__(self, x, *, train):
    i = 0
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      x = nn.Conv(v, (3, 3), padding='SAME', use_bias=False, name=f'conv_{i}')(x)
      x = nn.relu(_bn(train, f'norm_{i}')(x))
      i += 1
    return nn.Dense(3, name='head')(x.reshape((x.shape[0], -1)))


class PlainBlock(nn.Module):
  widths: tuple
  strides: int
  projection: bool

  @nn.compact
  def __call__(self, x, *, train):
    inner, out = self.widths
    y = nn.Conv(inner, (3, 3), strides=self.strides, padding='SAME', use_bias=False, name='conv1')(
      x
    )
    y = nn.relu(_bn(train, 'bn1')(y))
    y = nn.Conv(out, (3, 3), padding='SAME', use_bias=False, name='conv2')(y)
    y = _bn(train, 'bn2')(y)
    if self.projection:
      x = nn.Conv(out, (1, 1), strides=self.strides, use_bias=False, name='proj_conv')(x)
      x = _bn(train, 'proj_bn')(x)
    return nn.relu(y + x)


class PlainResNet18(nn.Module):
  base: int = 4

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(self.base, (3, 3), padding='SAME', use_bias=False, name='stem_conv')(x)
    x = nn.relu(_bn(train, 'stem_bn')(x))
    for s in range(4):
      w = self.base * 2**s
      for b in range(2):
        x = PlainBlock(
          (w, w), 2 if (s > 0 and b == 0) else 1, s > 0 and b == 0, name=f'stage{s}_block{b}'
        )(x, train=train)
    return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))


class PlainMlpBlock(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.mlp_dim, name='fc1')(x)
    return nn.Dense(x.shape[-1], name='fc2')(nn.gelu(h))


class PlainEncoderBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(name='norm_attn')(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, deterministic=True, name='attn')(y, y)
    return x + PlainMlpBlock(16, name='mlp')(nn.LayerNorm(name='norm_mlp')(x))


class PlainViT(nn.Module):
  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(8, (4, 4), strides=(4, 4), padding='VALID', name='embedding')(x)
    b, h, w, d = x.shape
    x = x.reshape((b, h * w, d))
    cls = self.param('cls', nn.initializers.zeros, (1, 1, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
    x = x + self.param('pos_embedding', nn.initializers.normal(0.02), (1, h * w + 1, d))
    for i in range(2):
      x = PlainEncoderBlock(name=f'block_{i}')(x)
    return nn.Dense(3, name='head')(nn.LayerNorm(name='norm')(x)[:, 0])


def _canonical(groups, widths):
  """Groups as comparable sets: (width, producer slices, consumer slices)."""
  out = set()
  for g in groups:
    key = lambda s: (s.path, s.axis % 4 if s.axis < 0 else s.axis, s.offset, s.block)
    out.add((widths[g.name], frozenset(map(key, g.producers)), frozenset(map(key, g.consumers))))
  return out


def _discovered(plain, x):
  pmodel = demp.make_prunable(plain, x, train=False)
  return _canonical(pmodel.unit_groups(), pmodel.widths), pmodel


@pytest.mark.parametrize('head', ['global', 'flatten'])
def test_convnet_groups_equal_the_hand_written_ones(head):
  x = jnp.zeros((1, 8, 8, 3))
  ours = demp_convnet.make(3, widths=(4, 6), head=head)
  got, pmodel = _discovered(PlainConvNet((4, 6), head), x)
  assert got == _canonical(ours.unit_groups(), ours.widths)
  assert dict(pmodel.widths) == {'conv_0': 4, 'conv_1': 6}
  assert pmodel.plan.refused[0].reason == 'its units reach the model output'


def test_resnet18_groups_equal_the_hand_written_ones_streams_included():
  x = jnp.zeros((1, 8, 8, 3))
  ours = demp_resnet.make_resnet18(3, width_multiplier=1 / 16)
  got, pmodel = _discovered(PlainResNet18(4), x)
  want = _canonical(ours.unit_groups(), ours.widths)
  assert len(want) == 12 and got == want  # 8 block-internal + 4 coupled streams
  stream0 = next(g for g in pmodel.unit_groups() if g.name == 'stem_conv')
  assert stream0.sites == (
    ('stage0_block0', 'conv1', 'demp_in0'),  # every consumer's input
    ('stage0_block1', 'conv1', 'demp_in0'),
    ('stage1_block0', 'conv1', 'demp_in0'),
    ('stage1_block0', 'proj_conv', 'demp_in0'),
  )


def test_vgg16_groups_equal_the_hand_written_ones():
  x = jnp.zeros((1, 32, 32, 3))
  cfg = PlainVGG.cfg
  ours = demp_vgg.make(3, widths=[v for v in cfg if v != 'M'])
  got, _ = _discovered(PlainVGG(), x)
  assert got == _canonical(ours.unit_groups(), ours.widths)


def test_vit_mlp_groups_equal_the_hand_written_ones_and_the_rest_is_refused():
  x = jnp.zeros((1, 8, 8, 3))
  ours = demp_vit.make(3, hidden_dim=8, depth=2, num_heads=2, mlp_dim=16, patch_size=4)
  got, pmodel = _discovered(PlainViT(), x)
  assert got == _canonical(ours.unit_groups(), ours.widths)
  refused = {r.name: r.reason for r in pmodel.plan.refused}
  assert set(refused) == {'embedding', 'block_0/mlp/fc2', 'block_1/mlp/fc2', 'head'}
  assert 'concatenated' in refused['embedding']  # with the class token


# ----------------------------------------------------------------------------
# Models the project has never seen, as their authors write them.


class ResNetBlock(nn.Module):
  """The Flax examples' ImageNet ResNet block."""

  filters: int
  conv: type
  norm: type
  act: callable
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.act(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return self.act(residual + y)


class FlaxExamplesResNet(nn.Module):
  num_classes: int = 3
  num_filters: int = 4

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5
    )
    x = conv(self.num_filters, (3, 3), name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    for i, n in enumerate((1, 1)):
      for j in range(n):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = ResNetBlock(self.num_filters * 2**i, conv, norm, nn.relu, strides)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class DenseLayer(nn.Module):
  growth: int

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.growth, (3, 3), use_bias=False)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train)(y))


class DenseNet(nn.Module):
  """Dense connectivity: every layer reads the concatenation of all before it."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    feats = [nn.relu(nn.BatchNorm(use_running_average=not train)(x))]
    for _ in range(2):
      feats.append(DenseLayer(3)(jnp.concatenate(feats, axis=-1), train))
    x = jnp.concatenate(feats, axis=-1)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))  # pre-activation transition
    x = nn.Conv(5, (1, 1))(x)
    x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class InvertedResidual(nn.Module):
  """MobileNetV2: expand 1x1 -> depthwise 3x3 -> linear 1x1 projection, residual."""

  expand: int

  @nn.compact
  def __call__(self, x, train):
    c = x.shape[-1]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train)
    y = nn.relu6(norm()(nn.Conv(self.expand, (1, 1), use_bias=False)(x)))
    y = nn.Conv(self.expand, (3, 3), feature_group_count=self.expand, use_bias=False)(y)
    y = nn.relu6(norm()(y))
    y = norm()(nn.Conv(c, (1, 1), use_bias=False)(y))
    return x + y


class MobileNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu6(
      nn.BatchNorm(use_running_average=not train)(
        nn.Conv(4, (3, 3), strides=(2, 2), use_bias=False)(x)
      )
    )
    x = InvertedResidual(8)(x, train)
    x = nn.relu6(nn.BatchNorm(use_running_average=not train)(nn.Conv(6, (1, 1), use_bias=False)(x)))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


class MixerMlp(nn.Module):
  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    y = nn.gelu(nn.Dense(self.mlp_dim)(x))
    return nn.Dense(x.shape[-1])(y)


class Mixer(nn.Module):
  """MLP-Mixer (Tolstikhin et al.): token mixing across patches, channel mixing per patch."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(6, (2, 2), strides=(2, 2), name='stem')(x)
    x = x.reshape((x.shape[0], -1, x.shape[-1]))
    for _ in range(2):
      y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
      x = x + jnp.swapaxes(MixerMlp(5)(y), 1, 2)
      x = x + MixerMlp(7)(nn.LayerNorm()(x))
    return nn.Dense(3, kernel_init=nn.initializers.normal(0.5))(nn.LayerNorm()(x).mean(axis=1))


def _set(tree, path, leaf, units, value):
  node = tree
  for k in path:
    node = node[k]
  node[leaf] = np.array(node[leaf])
  node[leaf][..., np.asarray(units)] = value


def _kill_bn(variables, path, units, bias=-1.0):
  _set(variables['params'], path, 'scale', units, 0.0)
  _set(variables['params'], path, 'bias', units, bias)


def _init(plain, x, **kwargs):
  """Random variables as host arrays, from the shapes alone (compiling an init is slow).

  Kernels ~ N(0, 1/fan_in); norm scales and running variances ~ exp(0.2 N); offsets
  and running means ~ 0.1 N: eval mode is a non-trivial function.
  """
  shapes = jax.eval_shape(lambda: plain.init(jax.random.key(0), x[:1], **kwargs))
  rng = np.random.default_rng(0)

  def fn(path, s):
    name, n = path[-1].key, rng.standard_normal(s.shape).astype(np.float32)
    if name == 'kernel':
      return n / np.sqrt(np.prod(s.shape[:-1]))
    if name in ('scale', 'var'):
      return np.exp(0.2 * n)
    return 0.1 * n

  return jax.tree.map_with_path(fn, flax.core.unfreeze(shapes))


def _eval(model, variables, x, **kwargs):
  return jax.jit(lambda v: model.apply(v, x, train=False, **kwargs))(variables)


def _resnet_kill(v):
  _kill_bn(v, ('ResNetBlock_0', 'BatchNorm_0'), [1])  # internal, block 0
  _kill_bn(v, ('ResNetBlock_1', 'BatchNorm_0'), [0, 5])  # internal, block 1
  _kill_bn(v, ('ResNetBlock_1', 'BatchNorm_1'), [2])  # stage-1 stream:
  _kill_bn(v, ('ResNetBlock_1', 'norm_proj'), [2])  # both producers
  _kill_bn(v, ('bn_init',), [3])  # stage-0 stream:
  _kill_bn(v, ('ResNetBlock_0', 'BatchNorm_1'), [3])  # stem + block 0
  return {
    'ResNetBlock_0/Conv_0': [1],
    'ResNetBlock_1/Conv_0': [0, 5],
    'ResNetBlock_1/Conv_1': [2],
    'conv_init': [3],
  }


def _densenet_kill(v):
  _kill_bn(v, ('BatchNorm_0',), [2], bias=-1.0)  # stem unit 2: concatenated at offset 0
  _set(v['params'], ('BatchNorm_1',), 'bias', [2], 0.0)  # transition BN: zero in -> zero out
  _set(v['batch_stats'], ('BatchNorm_1',), 'mean', [2], 0.0)
  _kill_bn(v, ('DenseLayer_0', 'BatchNorm_0'), [1])  # layer 0 unit 1: offset 4
  _set(v['params'], ('BatchNorm_1',), 'bias', [4 + 1], 0.0)
  _set(v['batch_stats'], ('BatchNorm_1',), 'mean', [4 + 1], 0.0)
  _kill_bn(v, ('BatchNorm_1',), [4 + 3 + 0])  # layer 1 unit 0: dead after the transition BN
  return {'Conv_0': [2], 'DenseLayer_0/Conv_0': [1], 'DenseLayer_1/Conv_0': [0]}


def _mobilenet_kill(v):
  _kill_bn(v, ('InvertedResidual_0', 'BatchNorm_1'), [0, 6])  # after the depthwise conv
  _kill_bn(v, ('BatchNorm_0',), [1])  # stream unit 1: stem ...
  _kill_bn(v, ('InvertedResidual_0', 'BatchNorm_2'), [1], bias=0.0)  # ... + linear projection
  _set(v['params'], ('InvertedResidual_0', 'Conv_2'), 'kernel', [1], 0.0)  # (no activation:
  # a zero input keeps its scale's gradient at zero in training too)
  return {'InvertedResidual_0/Conv_0': [0, 6], 'Conv_0': [1]}


def _mixer_kill(v):
  for blk, units in (('MixerMlp_0', [1]), ('MixerMlp_3', [0, 4])):
    _set(v['params'], (blk, 'Dense_0'), 'kernel', units, 0.0)
    _set(v['params'], (blk, 'Dense_0'), 'bias', units, -10.0)  # gelu(-10) ~ -8e-23
  return {'MixerMlp_0/Dense_0': [1], 'MixerMlp_3/Dense_0': [0, 4]}


AUTHOR_MODELS = {
  'flax_examples_resnet': (FlaxExamplesResNet, _resnet_kill, 'relu', 4),
  'densenet': (DenseNet, _densenet_kill, 'relu', 4),
  'mobilenet': (MobileNet, _mobilenet_kill, 'relu', 3),
  'mlp_mixer': (Mixer, _mixer_kill, 'gelu', 4),
}


@pytest.mark.parametrize('which', sorted(AUTHOR_MODELS))
def test_pruning_a_never_seen_model_keeps_logits_and_training(which):
  cls, kill, criterion, n_groups = AUTHOR_MODELS[which]
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  y = jnp.arange(16) % 3
  plain = cls()
  pmodel = demp.make_prunable(plain, x[:1], train=False)
  assert len(pmodel.plan.groups) == n_groups, demp.describe_groups(pmodel)
  shapes = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x[:1], train=False))
  assert shapes(pmodel) == shapes(plain)  # same variables
  v = _init(plain, x)
  killed = kill(v)
  logits = _eval(plain, v, x)
  np.testing.assert_array_equal(_eval(pmodel, v, x), logits)  # same function

  alive, activity = demp.dead_unit_stats(pmodel, v, x, criterion=criterion)
  for group, units in killed.items():  # every killed unit is found dead
    assert not alive[group][units].any(), (group, alive[group])
  # Every dead unit goes (those killed, and any dead at this random init): same eval logits.
  small, sv, _ = demp.prune(pmodel, v, {}, demp.keep_masks(alive, activity))
  assert sum(small.widths.values()) <= sum(pmodel.widths.values()) - sum(map(len, killed.values()))
  np.testing.assert_allclose(_eval(small, sv, x), logits, atol=1e-5, rtol=0)

  # The killed units are dead in train mode too (scale 0): training follows the same path.
  keeps = {g: np.ones(w, bool) for g, w in pmodel.widths.items()}
  for group, units in killed.items():
    keeps[group][units] = False
  tx = optax.adam(1e-2, eps=1e-5)  # eps: float-noise gradients (1e-8) stay noise
  opt = tx.init(v['params'])
  small, sv, sopt = demp.prune(pmodel, v, opt, keeps)

  def step(model):
    @jax.jit
    def fn(params, state, opt_state):
      def loss_fn(p):
        out, upd = model.apply({'params': p, **state}, x, train=True, mutable=['batch_stats'])
        return optax.softmax_cross_entropy_with_integer_labels(out, y).mean(), upd

      (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), {**state, **upd}, opt_state, loss

    return fn

  runs = []
  for model, var, o in ((pmodel, v, opt), (small, sv, sopt)):
    params, state = var['params'], {k: s for k, s in var.items() if k != 'params'}
    fn, losses = step(model), []
    for _ in range(3):
      params, state, o, loss = fn(params, state, o)
      losses.append(float(loss))
    runs.append((losses, _eval(model, {'params': params, **state}, x)))
  np.testing.assert_allclose(runs[1][0], runs[0][0], rtol=1e-5)
  np.testing.assert_allclose(runs[1][1], runs[0][1], atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------
# Refused patterns: reported by name, left at full width, the function kept.


class Unsupported(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.LayerNorm(name='ln')(nn.Conv(4, (3, 3), name='ln_conv')(x)))
    x = nn.Conv(5, (3, 3), name='gain_conv')(x)
    x = nn.relu(x * self.param('gain', nn.initializers.ones, (5,)).reshape(1, 1, 1, 5))
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train, name='nchw_bn')(
        nn.Conv(6, (3, 3), name='nchw_conv')(x)
      )
    )
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape((x.shape[0], -1))  # channels outermost
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train, name='fc_bn')(nn.Dense(7, name='fc')(x))
    )
    return nn.Dense(3, name='head')(x)


def test_unsupported_patterns_are_reported_and_left_unpruned():
  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 3))
  plain = Unsupported()
  pmodel = demp.make_prunable(plain, x[:1])
  report = demp.describe_groups(pmodel)
  refused = {r.name: r.reason for r in pmodel.plan.refused}
  assert dict(pmodel.widths) == {'fc': 7}
  assert 'layernorm ln normalizes over the units' in refused['ln_conv']
  assert 'per-unit value' in refused['gain_conv']
  assert 'units not innermost' in refused['nchw_conv']
  for name, reason in refused.items():
    assert f'{name}  width' in report and reason in report
  v = _init(plain, x)
  _kill_bn(v, ('nchw_bn',), [0, 1, 2])  # dead, but the reshape mixes units: it stays
  _kill_bn(v, ('fc_bn',), [2, 3])
  alive, activity = demp.dead_unit_stats(pmodel, v, x)
  small, sv, _ = demp.prune(pmodel, v, {}, demp.keep_masks(alive, activity))
  assert small.widths['fc'] <= 5  # the two killed units (and any dead at random init)
  assert sv['params']['nchw_conv']['kernel'].shape[-1] == 6
  np.testing.assert_allclose(_eval(small, sv, x), _eval(plain, v, x), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------
# The user-facing snippet of docs/auto.md runs as written.


def test_docs_snippet_runs():
  text = (pathlib.Path(__file__).parent.parent / 'docs' / 'auto.md').read_text()
  code = re.search(r'```python\n(.*?)```', text, re.S).group(1)
  scope = {}
  exec(compile(code, 'docs/auto.md', 'exec'), scope)
  assert scope['model'].widths['Dense_0'] < 64  # units were removed
  marked = [l for l in code.splitlines() if l.rstrip().endswith('# demp')]
  assert 1 <= len(marked) <= 5


def test_registry_builds_a_user_module_by_import_path():
  from demp import models

  model = models.build(
    'auto',
    3,
    module=f'{__name__}:FlaxExamplesResNet',
    input_shape=(8, 8, 3),
    kwargs={'num_filters': 4},
  )
  assert isinstance(model, auto.Prunable) and model.num_classes == 3
  assert model.widths['conv_init'] == 4
  again = models.build(
    'auto',
    3,
    module=f'{__name__}:FlaxExamplesResNet',
    input_shape=(8, 8, 3),
    kwargs={'num_filters': 4},
  ).clone(widths={**model.widths, 'conv_init': 2})
  v = jax.eval_shape(lambda: again.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False))
  assert v['params']['conv_init']['kernel'].shape == (3, 3, 3, 2)
  assert hash(again) != hash(model) and again != model
  with pytest.raises(ValueError, match='model.module'):
    models.build('auto', 3, module='no_colon')


class TinyNet(nn.Module):
  """A user's model for the trainer: flatten -> [Dense -> BN -> ReLU] x 2 -> Dense."""

  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool):
    x = x.reshape((x.shape[0], -1))
    for width in (32, 16):
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Dense(width)(x)))
    return nn.Dense(self.num_classes)(x)


def test_trainer_runs_a_user_module_by_import_path(tmp_path):
  import ml_collections
  from configs import quickstart
  from demp.trainer import train

  rng = np.random.default_rng(0)
  path = tmp_path / 'tiny.npz'
  np.savez(
    path,
    train_images=rng.integers(0, 255, (80, 8, 8, 3), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 80),
    test_images=rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 20),
  )
  c = quickstart.get_config()
  c.model = ml_collections.ConfigDict(
    {'name': 'auto', 'module': f'{__name__}:TinyNet', 'input_shape': (8, 8, 3)}
  )
  c.data.source, c.data.path = 'npz', str(path)
  c.num_steps, c.batch_size, c.log_every, c.eval_batch_size = 30, 16, 10, 64
  c.prune.every, c.prune.num_examples, c.prune.batch_size = 10, 64, 32
  c.progress_bar = False
  c.demp.peak_lambda, c.optimizer.learning_rate = 0.5, 0.05  # units die within 30 steps
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['prune_events_effective'] >= 1
  assert sum(summary['widths'].values()) < 32 + 16
  assert set(summary['widths']) == {'Dense_0', 'Dense_1'}
