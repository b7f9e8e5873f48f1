"""FLOP counting: XLA's cost analysis against hand counts, before and after pruning."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import flax.linen as nn  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import optax  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from demp import flops, models, surgery  # pylint: disable=wrong-import-position
from demp.trainer import accounting
from demp.trainer import steps


def _layer_flops(layer, x_shape):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  return flops.xla_flops(layer.apply, variables, x)


@pytest.mark.parametrize('bias', [False, True])
def test_dense_layer_is_two_macs(bias):
  got = _layer_flops(nn.Dense(100, use_bias=bias), (8, 64))
  assert got == flops.dense_flops(8, 64, 100, bias=bias)
  assert got == 2 * 8 * 64 * 100 + (8 * 100 if bias else 0)


@pytest.mark.parametrize(
  'size,stride,padding',
  [
    (8, 1, 'SAME'),
    (9, 1, 'SAME'),
    (8, 2, 'SAME'),
    (9, 2, 'SAME'),
    (8, 1, 'VALID'),
    (9, 2, 'VALID'),
    (8, 1, ((2, 0), (1, 1))),
  ],
)
def test_conv_layer_matches_hand_count(size, stride, padding):
  layer = nn.Conv(16, (3, 3), strides=stride, padding=padding, use_bias=False)
  got = _layer_flops(layer, (2, size, size, 3))
  assert got == flops.conv_flops(
    2, (size, size), (3, 3), 3, 16, strides=(stride, stride), padding=padding
  )


def test_xla_counts_two_macs_but_skips_the_padding():
  """VALID: exactly 2·MACs. SAME 3x3 on 8x8: each axis has 2+3·6+2 = 22 valid taps, not 24."""
  valid = _layer_flops(nn.Conv(16, (3, 3), padding='VALID', use_bias=False), (2, 8, 8, 3))
  assert valid == 2 * (2 * 6 * 6 * 16) * (3 * 3 * 3)
  same = _layer_flops(nn.Conv(16, (3, 3), padding='SAME', use_bias=False), (2, 8, 8, 3))
  assert same == 2 * 2 * 3 * 16 * 22 * 22
  assert same < 2 * (2 * 8 * 8 * 16) * (3 * 3 * 3)


def _mlp_hand_count(batch, d_in, widths, num_classes):
  dims = [d_in, *widths, num_classes]
  matmul = sum(flops.dense_flops(batch, a, b, bias=True) for a, b in zip(dims[:-1], dims[1:]))
  return matmul + batch * sum(widths)  # + one ReLU per hidden unit


def _convnet_hand_count(batch, hw, c_in, widths, num_classes):
  chans = [c_in, *widths]
  conv = sum(
    flops.conv_flops(batch, (hw, hw), (3, 3), a, b, bias=True)
    for a, b in zip(chans[:-1], chans[1:])
  )
  relu = batch * hw * hw * sum(widths)
  pool = batch * hw * hw * widths[-1]  # global mean: sum + scale
  return conv + relu + pool + flops.dense_flops(batch, widths[-1], num_classes, bias=True)


def _prune(model, image_shape, keeps):
  variables = jax.jit(model.init, static_argnames='train')(
    jax.random.key(0), jnp.zeros((1,) + image_shape), train=False
  )
  params = variables['params']
  opt_state = optax.adam(1e-3).init(params)
  pruned, _, _ = surgery.prune(model, variables, opt_state, keeps)
  return pruned


def test_mlp_forward_equals_hand_count_and_shrinks_exactly():
  model = models.build('mlp', 10, widths=(32, 16), norm=False)
  assert flops.forward_flops(model, (8, 8, 1), 4) == _mlp_hand_count(4, 64, (32, 16), 10) == 22184
  keeps = {'hidden_0': np.arange(32) % 3 != 0, 'hidden_1': np.arange(16) < 9}  # 21 and 9 kept
  pruned = _prune(model, (8, 8, 1), keeps)
  assert dict(pruned.widths) == {'hidden_0': 21, 'hidden_1': 9}
  assert flops.forward_flops(pruned, (8, 8, 1), 4) == _mlp_hand_count(4, 64, (21, 9), 10)
  out = flops.inference_flops(pruned, {'hidden_0': 32, 'hidden_1': 16}, (8, 8, 1))
  assert out['inference_flops'] == _mlp_hand_count(1, 64, (21, 9), 10)
  assert out['inference_flops_dense'] == _mlp_hand_count(1, 64, (32, 16), 10)
  assert out['inference_flops_rel'] == pytest.approx(
    _mlp_hand_count(1, 64, (21, 9), 10) / _mlp_hand_count(1, 64, (32, 16), 10), rel=1e-12
  )


def test_convnet_forward_equals_hand_count_and_shrinks_exactly():
  model = models.build('convnet', 10, widths=(8, 16), norm=False, pool=False)
  assert flops.forward_flops(model, (8, 8, 3), 2) == _convnet_hand_count(2, 8, 3, (8, 16), 10)
  keeps = {'conv_0': np.arange(8) < 5, 'conv_1': np.arange(16) % 2 == 0}
  pruned = _prune(model, (8, 8, 3), keeps)
  assert flops.forward_flops(pruned, (8, 8, 3), 2) == _convnet_hand_count(2, 8, 3, (5, 8), 10)


def test_run_flops_compiles_the_dense_step_when_the_run_never_ran_dense():
  """A method that prunes before step 1: the dense step is compiled from shapes."""
  dense = models.build('mlp', 10, widths=(32, 16), norm=False)
  small = dense.clone(widths=dense.widths.copy({'hidden_0': 8}))
  tx = optax.sgd(0.1)
  dense_step = accounting.train_step_flops(steps.make_train_step, dense, tx, (8, 8, 1), 4)
  small_step = accounting.train_step_flops(steps.make_train_step, small, tx, (8, 8, 1), 4)
  assert small_step < dense_step
  segments = [{'widths': dict(small.widths), 'flops': small_step, 'steps': 10, 'seconds': 1.0}]
  out = accounting.run_flops(
    model=small,
    tx=tx,
    dense_widths=dict(dense.widths),
    image_shape=(8, 8, 1),
    batch_size=4,
    num_steps=10,
    segments=segments,
    train_flops=10 * small_step,
    make_step=steps.make_train_step,
  )
  assert out['train_flops_dense'] == 10 * dense_step
  assert out['train_flops_rel'] == pytest.approx(small_step / dense_step, rel=1e-12)
  # The matmuls of the backward pass are 2x those of the forward: the step is ~3x the forward.
  fwd = _mlp_hand_count(4, 64, (32, 16), 10)
  assert 2.5 * fwd < dense_step < 4 * fwd
