"""NEq: φ, Δφ, velocity and freezing on scripted outputs; frozen units bit-identical; end to end."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from baselines import config as config_lib  # noqa: E402
from baselines import freeze, neq  # noqa: E402
from configs import quickstart  # noqa: E402
from demp.trainer import train  # noqa: E402
from demp.models import build  # noqa: E402
from demp.trainer import config as trainer_config  # noqa: E402
from demp.trainer import optim, steps  # noqa: E402


def test_cosine_and_phi_on_scripted_outputs():
  # [examples=2, positions=3, units=5]
  prev = np.zeros((2, 3, 5), np.float32)
  cur = np.zeros((2, 3, 5), np.float32)
  prev[:, :, 0] = cur[:, :, 0] = [[1, 2, 3], [0, 1, 0]]  # unchanged: 1
  prev[:, :, 1], cur[:, :, 1] = [[1, 1, 0], [2, 0, 0]], [[-1, -1, 0], [-2, 0, 0]]  # flipped: -1
  # unit 2: zero at both times: 1 (NEq's convention)
  prev[:, :, 3] = [[1, 0, 0], [1, 0, 0]]  # one zero vector: 0
  prev[:, :, 4], cur[:, :, 4] = [[1, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 3, 0]]  # 1 then 0: mean 0.5
  np.testing.assert_allclose(neq.phi(prev, cur), [1.0, -1.0, 1.0, 0.0, 0.5], atol=1e-6)
  # One output per example (a dense unit): the mean over examples of the per-example
  # cosine of two scalars (1 same sign, -1 opposite, 1 both zero, 0 one zero).
  a = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0], [3.0, 0.0, 2.0]], np.float32)[:, None, :]
  b = np.array([[2.0, 0.0, 1.0], [4.0, 1.0, 1.0], [6.0, 0.0, 2.0]], np.float32)[:, None, :]
  # unit 0: (1,2) (2,4) (3,6) -> 1, 1, 1; unit 1: (1,0) (0,1) (0,0) -> 0, 0, 1;
  # unit 2: (1,1) (-1,1) (2,2) -> 1, -1, 1. (The cosine across examples would give 1, 0, 2/3.)
  np.testing.assert_allclose(neq.phi(a, b), [1.0, 1 / 3, 1 / 3], atol=1e-6)


def test_velocity_recursion():
  phis = [0.9, 0.95, 0.96, 0.9605]
  v, got = 0.0, []
  for prev, now in zip(phis, phis[1:]):
    v = float(neq.velocity(np.array(prev), np.array(now), np.array(v), 0.5))
    got.append(v)
  # Δφ = .05, .01, .0005;  v = .05, .01 - .025, .0005 + .0075
  np.testing.assert_allclose(got, [0.05, -0.015, 0.008], atol=1e-12)


def _tiny_run(method, **baselines):
  c = quickstart.get_config(f'method={method}')
  c.model.widths = [4, 3]
  c.num_steps, c.batch_size, c.progress_bar = 40, 16, False
  c.prune.num_examples = 32
  c.baselines = config_lib.default_config()
  c.baselines.update(dict(steps_per_epoch=8, **baselines))
  run, _ = train.init_run(c)
  return run


def _rotating(angles_u, scale_u=1.0):
  """Outputs [2 examples, 2 positions, units]: unit u's vector at angle angles_u[u]."""
  angles_u = np.asarray(angles_u, np.float32)
  v = np.stack([np.cos(angles_u), np.sin(angles_u)]) * scale_u  # [2 positions, units]
  return jnp.asarray(np.broadcast_to(v, (2,) + v.shape))


def test_hook_freezes_and_unfreezes_on_scripted_outputs(monkeypatch):
  run = _tiny_run('neq', eps=0.01, mu_eq=0.5)
  # φ_t = cos(angle step t). Units: A constant steps -> Δφ = 0; B settles (steps .5 .3 .1 .1);
  # C is still, then jumps at epoch 4; D outputs zero throughout (φ = 1).
  steps = np.array([[0.5, 0.5, 0.5, 0.5], [0.5, 0.3, 0.1, 0.1], [0.5, 0.5, 0.5, 1.5], [0, 0, 0, 0]])
  angles = np.concatenate([np.zeros((4, 1)), np.cumsum(steps, axis=1)], axis=1)  # [units, times]
  script = []
  for t in range(5):
    hidden_0 = _rotating(angles[:, t], np.array([1, 1, 1, 0], np.float32))
    script.append({'hidden_0': hidden_0, 'hidden_1': _rotating(np.zeros(3))})
  monkeypatch.setattr(neq, 'unit_outputs', lambda model, variables, images: script[run.step // 8])
  expected = {
    16: [True, False, True, True],
    24: [True, True, True, True],
    32: [True, True, False, True],
  }
  for step in (0, 8, 16, 24, 32):
    run.step = step
    neq.neq_hook(run, step)
    if step < 16:  # φ needs two measurements and Δφ two φ's: nothing frozen yet
      assert 'velocity' not in run.memo
      continue
    frozen = run.state['opt_state'].frozen
    kernel = np.asarray(frozen['dense_0']['kernel'])  # [inputs, 4]
    np.testing.assert_array_equal(kernel.all(axis=0), expected[step])
    np.testing.assert_array_equal(kernel.any(axis=0), expected[step])
    np.testing.assert_array_equal(frozen['norm_0']['scale'], expected[step])
    np.testing.assert_array_equal(frozen['norm_0']['bias'], expected[step])
    assert not np.any(frozen['head']['kernel'])  # consumers are not incoming params
    assert np.all(frozen['dense_1']['kernel'])  # hidden_1 is static: all frozen
  # B at epoch 3: Δφ = cos .1 - cos .3 = .0397, v = .0397 - .5·(cos .3 - cos .5) = .00088 < .01.
  v3 = (np.cos(0.1) - np.cos(0.3)) - 0.5 * (np.cos(0.3) - np.cos(0.5))
  assert abs(v3) < 0.01
  assert [e['frozen']['hidden_0'] for e in run.stats['frozen_per_epoch']] == [3, 4, 3]


def test_unit_masks_and_wgrad_flops():
  model = build('convnet', 10, widths=[4, 6], head='global')
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
  )
  params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])
  masks = freeze.unit_masks(
    params, model.unit_groups(), {'conv_1': np.array([0, 1, 0, 0, 0, 1], bool)}
  )
  assert np.asarray(masks['conv_1']['kernel']).sum() == 2 * 3 * 3 * 4
  np.testing.assert_array_equal(np.asarray(masks['conv_1']['kernel'])[0, 0, 0], [0, 1, 0, 0, 0, 1])
  assert not np.any(masks['conv_0']['kernel']) and not np.any(masks['head']['kernel'])
  np.testing.assert_array_equal(masks['norm_1']['scale'], [0, 1, 0, 0, 0, 1])
  flops = neq.wgrad_flops_per_unit(model, params, {'conv_0': 64, 'conv_1': 16}, batch_size=32)
  assert flops == {'conv_0': 2 * 32 * 64 * 3 * 3 * 3, 'conv_1': 2 * 32 * 16 * 3 * 3 * 4}


@pytest.mark.parametrize('name', ['adam', 'adamw', 'sgd'])
def test_frozen_units_are_bit_identical_after_steps(name):
  model = build('mlp', 5, widths=[6, 4], norm=True)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 3, 3, 1)), train=False)
  c = trainer_config.base_config().optimizer
  c.name, c.weight_decay = name, 0.1
  tx = freeze.freeze(optim.OPTIMIZERS[name](1e-2, c))
  state = {
    'params': variables['params'],
    'batch_stats': variables['batch_stats'],
    'opt_state': tx.init(variables['params']),
  }
  step = jax.jit(steps.make_train_step(model, tx))
  batches = [
    {
      'image': jax.random.normal(jax.random.key(i), (8, 3, 3, 1)),
      'label': jax.random.randint(jax.random.key(50 + i), (8,), 0, 5),
    }
    for i in range(5)
  ]
  for batch in batches[:2]:  # optimizer history before the freeze
    state, _ = step(state, batch)
  units = np.array([1, 0, 0, 1, 0, 0], bool)
  frozen = freeze.unit_masks(state['params'], model.unit_groups(), {'hidden_0': units})
  state = {**state, 'opt_state': state['opt_state']._replace(frozen=frozen)}
  before = jax.device_get(state)
  for batch in batches[2:]:  # the same compiled step: masks are data
    state, _ = step(state, batch)
  after = jax.device_get(state)
  assert step._cache_size() == 1

  def tracked(tree, path):
    """The leaves of ``tree`` whose path ends with ``path`` (params, Adam's mu and nu...)."""
    return [
      np.asarray(v)
      for k, v in jax.tree.flatten_with_path(tree)[0]
      if jax.tree_util.keystr(k).endswith(path)
    ]

  for path in ("['dense_0']['kernel']", "['norm_0']['scale']", "['norm_0']['bias']"):
    pairs = list(
      zip(
        tracked(before['params'], path) + tracked(before['opt_state'].inner, path),
        tracked(after['params'], path) + tracked(after['opt_state'].inner, path),
      )
    )
    assert len(pairs) == (2 if name == 'sgd' else 3)  # the param and its moments
    for a, b in pairs:
      mask = np.broadcast_to(units, a.shape)
      np.testing.assert_array_equal(a[mask], b[mask])  # bit-identical
      assert np.all(a[~mask] != b[~mask])  # the others moved
  # Consumers of the frozen units (next layer's input rows) still train.
  assert np.all(
    np.asarray(before['params']['dense_1']['kernel'])[units]
    != np.asarray(after['params']['dense_1']['kernel'])[units]
  )


@pytest.mark.parametrize('method', ['neq', 'neq_stochastic'])
def test_end_to_end(method, tmp_path):
  c = quickstart.get_config(f'method={method}')
  c.data.source, c.data.name = 'tfds', 'cifar10'
  c.model = train.ml_collections.ConfigDict(
    {'name': 'convnet', 'widths': [8, 16], 'head': 'global'}
  )
  c.num_steps, c.batch_size, c.log_every, c.progress_bar = 24, 16, 8, False
  c.prune.num_examples, c.prune.batch_size, c.eval_batch_size = 32, 32, 32
  c.baselines = config_lib.default_config()
  c.baselines.update(
    dict(steps_per_epoch=4, holdout_fraction=0.1, eps=0.05, stochastic_fraction=0.25)
  )
  with tfds.testing.mock_data(num_examples=96):
    summary = train.train_and_evaluate(c, str(tmp_path))
  stats = summary['method_stats']
  assert summary['widths'] == {'conv_0': 8, 'conv_1': 16} and summary['weight_sparsity'] == 0.0
  per_epoch = stats['frozen_per_epoch']
  first = 8 if method == 'neq' else 4
  assert [e['step'] for e in per_epoch] == list(range(first, 25, 4))
  if method == 'neq_stochastic':
    assert all(e['frozen'] == {'conv_0': 2, 'conv_1': 4} for e in per_epoch)
  saved = {'conv_0': 2 * 16 * 1024 * 27, 'conv_1': 2 * 16 * 256 * 72}  # 2·B·P·K per unit
  want = sum(
    sum(saved[k] * n for k, n in e['frozen'].items()) * min(4, 24 - e['step']) for e in per_epoch
  )
  assert stats['wgrad_flops_saved_per_step_mean'] == pytest.approx(want / 24)
  assert stats['bprop_flops_per_step'] > 0
  assert stats['bprop_flops_saved_frac'] == pytest.approx(want / 24 / stats['bprop_flops_per_step'])
  if method == 'neq_stochastic':
    assert stats['bprop_flops_saved_frac'] > 0


def test_with_frozen_finds_the_masks_inside_gradient_accumulation():
  params = {'dense': {'kernel': jnp.ones((2, 3))}}
  tx = optax.MultiSteps(
    freeze.freeze(optax.adam(1e-3)), every_k_schedule=2
  ).gradient_transformation()
  masks = {'dense': {'kernel': jnp.array([[True, False, False]] * 2)}}
  state = freeze.with_frozen(tx.init(params), masks)
  np.testing.assert_array_equal(
    state.inner_opt_state.frozen['dense']['kernel'], masks['dense']['kernel']
  )
  with pytest.raises(ValueError, match='FreezeState'):
    freeze.with_frozen(optax.adam(1e-3).init(params), masks)


def test_measurement_slice_is_held_out(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 8, 8, 1), dtype=np.uint8)
  path = tmp_path / 'tiny.npz'
  np.savez(
    path,
    train_images=images,
    train_labels=np.arange(40) % 10,
    test_images=images[:10],
    test_labels=np.arange(10),
  )
  c = quickstart.get_config('method=neq')
  c.data.update(dict(source='npz', path=str(path), normalize=False, holdout=6))
  got = np.round(np.asarray(neq.measurement_images(c, 0.01)) * 255).astype(np.uint8)
  assert sorted(images[34:].tobytes()[i * 64 : (i + 1) * 64] for i in range(6)) == sorted(
    got[i].tobytes() for i in range(6)
  )  # exactly the 6 held-out examples
  c.data.holdout = 0  # fallback: training examples
  assert len(neq.measurement_images(c, 0.1)) == 4
