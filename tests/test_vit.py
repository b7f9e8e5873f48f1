"""ViT with DemP on its MLP blocks: model, surgery, revival gating, augmentations, recipe."""

import jax

jax.config.update('jax_numpy_rank_promotion', 'raise')

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from demp.data import augment  # noqa: E402
from demp import deadunits, surgery
from demp.trainer import revival, train
from demp.models import vit  # noqa: E402
from demp.trainer import config as config_lib
from demp.trainer import optim
from demp.trainer import steps


def _tiny(activation='relu', widths=None):
  return vit.make(
    10,
    hidden_dim=16,
    depth=2,
    num_heads=2,
    mlp_dim=12,
    patch_size=4,
    activation=activation,
    widths=widths,
  )


def _random_params(model, x, seed=0):
  """Parameters with the model's shapes, drawn by numpy (no init compile: keeps the test fast)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), jnp.float32), shapes
  )


def _params_count(model, size):
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))


# ----------------------------------------------------------------------------
# Model.


def test_vit_b16_parameter_count_is_the_standard_figure():
  # 86,567,656 = torchvision / timm vit_b_16 with 1000 classes at 224 px.
  assert _params_count(vit.make(1000, 'B/16'), 224) == 86_567_656
  assert _params_count(vit.make(1000, 'S/16'), 224) == 22_050_664
  assert _params_count(vit.make(1000, 'Ti/16'), 224) == 5_717_416


def test_variants_groups_and_shapes():
  model = vit.make(1000, 'B/16')
  assert dict(model.widths) == {f'mlp_{i}': 3072 for i in range(12)}
  assert (model.patch_size, model.hidden_dim, model.num_heads) == (16, 768, 12)
  group = model.unit_groups()[11]
  assert group.name == 'mlp_11' and group.sites == (('block_11', 'mlp', 'act'),)
  model = _tiny()
  x = jnp.zeros((3, 32, 32, 3))
  logits, state = jax.eval_shape(
    lambda: model.init_with_output(
      jax.random.key(0), x, train=False, mutable=['params', 'intermediates']
    )
  )
  assert logits.shape == (3, 10)
  assert state['intermediates']['block_1']['mlp']['act'][0].shape == (3, 65, 12)  # 64 patches + cls
  assert state['params']['block_1']['mlp']['fc2']['kernel'].shape == (12, 16)
  with pytest.raises(ValueError, match='variant'):
    vit.make(10, 'X/16')
  with pytest.raises(ValueError, match='activation'):
    vit.make(10, 'Ti/16', activation='tanh')
  with pytest.raises(ValueError, match='num_heads'):
    vit.make(10, hidden_dim=16, depth=1, num_heads=3, mlp_dim=8, patch_size=4)


def _kill(params, block, units, bias):
  """fc1 columns of ``units`` set to 0 and their bias to ``bias``: constant pre-activation."""
  params = jax.tree.map(lambda x: x, params)
  fc1 = dict(params[f'block_{block}']['mlp']['fc1'])
  fc1['kernel'] = fc1['kernel'].at[:, units].set(0.0)
  fc1['bias'] = fc1['bias'].at[np.asarray(units)].set(bias)
  params[f'block_{block}'] = {
    **params[f'block_{block}'],
    'mlp': {**params[f'block_{block}']['mlp'], 'fc1': fc1},
  }
  return params


def test_pruning_dead_relu_units_preserves_logits_and_slices_optimizer_state():
  model = _tiny('relu')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 32, 32, 3)), jnp.float32)
  params = _random_params(model, x)
  dead = {0: [1, 5, 6], 1: [0, 11]}
  for block, units in dead.items():
    params = _kill(params, block, units, bias=-1.0)
  tx = optax.MultiSteps(optax.adamw(1e-3), every_k_schedule=2).gradient_transformation()
  opt_state = tx.init(params)
  variables = {'params': params}

  alive, activity = deadunits.dead_unit_stats(model, variables, x, criterion='relu')
  assert {k: sorted(np.flatnonzero(~v).tolist()) for k, v in alive.items()} == {
    'mlp_0': [1, 5, 6],
    'mlp_1': [0, 11],
  }
  keeps = surgery.keep_masks(alive, activity)
  pruned, new_vars, new_opt = surgery.prune(model, variables, opt_state, keeps)

  assert dict(pruned.widths) == {'mlp_0': 9, 'mlp_1': 10}
  before = model.apply(variables, x, train=False)
  after = pruned.apply(new_vars, x, train=False)
  np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-6)
  # Every param-shaped optimizer leaf (Adam's mu and nu, MultiSteps' accumulator) is sliced
  # like its parameter, and nothing else changes shape.
  p_shapes = {
    jax.tree_util.keystr(kp): x.shape for kp, x in jax.tree.flatten_with_path(new_vars['params'])[0]
  }
  assert p_shapes["['block_0']['mlp']['fc1']['kernel']"] == (16, 9)
  assert p_shapes["['block_1']['mlp']['fc2']['kernel']"] == (10, 16)
  matched = 0
  for kp, leaf in jax.tree.flatten_with_path(new_opt)[0]:
    key = jax.tree_util.keystr(kp)
    hits = [p for p in p_shapes if key.endswith(p)]
    if hits and np.ndim(leaf):
      assert leaf.shape == p_shapes[hits[0]], key
      matched += 1
  assert matched == 3 * len(p_shapes)


def test_gelu_units_die_by_epsilon_inactivity():
  model = _tiny('gelu')
  x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 32, 32, 3)), jnp.float32)
  params = _random_params(model, x)
  params = _kill(params, 1, [2, 3], bias=-6.0)  # |gelu(-6)| ~ 6e-9 < eps on every token
  params = _kill(params, 0, [4], bias=0.5)  # gelu(0.5) = 0.35: constant, yet alive
  alive, _ = deadunits.dead_unit_stats(
    model, {'params': params}, x, criterion=deadunits.criterion_for(model.activation), eps=0.01
  )
  assert deadunits.count(alive) == {'mlp_0': 12, 'mlp_1': 10}
  assert not alive['mlp_1'][2] and not alive['mlp_1'][3] and alive['mlp_0'][4]


# ----------------------------------------------------------------------------
# Revival detection.


def test_stopped_rising_on_scripted_sequences():
  revive = [512, 90, 120, 200, 300, 380, 400, 400, 398, 390]  # dies, revives, then plateaus
  assert revival.stopped_rising(revive, 2) == 8
  assert revival.stopped_rising(revive, 3) == 9
  assert revival.stopped_rising(revive, 4) is None
  assert revival.stopped_rising(revive[:8], 2) is None  # not yet: one flat change
  assert revival.stopped_rising(revive, 0) == 0  # plain DemP
  assert revival.stopped_rising([100, 80, 60, 50], 2) == 2  # ordinary death: starts too
  assert revival.stopped_rising([], 1) is None
  with pytest.raises(ValueError, match='patience'):
    revival.stopped_rising(revive, -1)


def test_start_steps_gate_and_history_from_events():
  steps = [100, 200, 300, 400, 500]
  histories = {
    'mlp_0': list(zip(steps, [50, 40, 40, 39, 30])),  # never rises
    'mlp_1': list(zip(steps, [10, 20, 35, 35, 34])),
  }  # revives, then flat
  assert revival.start_steps(histories, patience=2) == {'mlp_0': 300, 'mlp_1': 500}
  assert revival.start_steps(histories, patience=2, fixed={'mlp_1': 250}) == {
    'mlp_0': 300,
    'mlp_1': 300,
  }  # the first check at or after step 250
  assert revival.start_steps(histories, patience=3, fixed={'mlp_0': 600}) == {
    'mlp_0': None,
    'mlp_1': None,
  }
  with pytest.raises(ValueError, match='start_steps'):
    revival.start_steps(histories, patience=1, fixed={'mlp_7': 5})

  events = [
    {'event': 'prune', 'step': s, 'live': {'mlp_0': a, 'mlp_1': b}}
    for s, a, b in zip(steps[:4], [50, 40, 40, 39], [10, 20, 35, 35])
  ]
  events.append({'event': 'prune', 'step': 450, 'reason': 'other'})  # no live counts: ignored
  assert revival.live_history(events) == {k: v[:4] for k, v in histories.items()}
  keeps = {'mlp_0': np.array([True, False, True]), 'mlp_1': np.array([False, True, True])}
  gated, started = revival.gate(keeps, events, 500, {'mlp_0': 30, 'mlp_1': 36}, patience=2)
  assert started == {'mlp_0': 300, 'mlp_1': None}  # 35 -> 36 rose again
  np.testing.assert_array_equal(gated['mlp_0'], keeps['mlp_0'])
  np.testing.assert_array_equal(gated['mlp_1'], [True, True, True])
  same, _ = revival.gate(keeps, events, 500, {'mlp_0': 30, 'mlp_1': 36}, patience=0)
  assert all(np.array_equal(same[k], keeps[k]) for k in keeps)


def test_plot_live_units_writes_a_png(tmp_path):
  events = [
    {
      'event': 'prune',
      'step': s,
      'live': {'mlp_0': 10 - s // 100, 'mlp_1': 3 + s // 100},
      'started': {'mlp_0': 200, 'mlp_1': None},
    }
    for s in (100, 200, 300)
  ]
  path = tmp_path / 'live.png'
  revival.plot_live_units([{'step': 1, 'loss': 1.0}] + events, str(path))
  assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  with pytest.raises(ValueError, match='nothing to plot'):
    revival.plot_live_units([{'step': 1}], str(path))


# ----------------------------------------------------------------------------
# Augmentations.


def _batch(n=6, size=16, k=5):
  images = jnp.asarray(np.random.default_rng(3).uniform(size=(n, size, size, 3)), jnp.float32)
  return {'image': images, 'label': jnp.arange(n) % k}


def test_augment_batch_is_deterministic_and_labels_are_distributions():
  fn = jax.jit(
    lambda key, b: augment.augment_batch(
      key,
      b,
      num_classes=5,
      randaugment_ops=1,
      randaugment_magnitude=9,
      mixup_alpha=0.2,
      cutmix_alpha=1.0,
    )
  )
  batch = _batch()
  key = lambda seed: jax.random.key(seed, impl='rbg')  # compiles faster on CPU than threefry
  a, b, c = fn(key(0), batch), fn(key(0), batch), fn(key(1), batch)
  np.testing.assert_array_equal(np.asarray(a['image']), np.asarray(b['image']))
  np.testing.assert_array_equal(np.asarray(a['label']), np.asarray(b['label']))
  assert not np.array_equal(np.asarray(a['image']), np.asarray(c['image']))
  for out in (a, c):
    labels = np.asarray(out['label'])
    assert labels.shape == (6, 5) and labels.min() >= 0
    np.testing.assert_allclose(labels.sum(-1), 1.0, atol=1e-6)
    assert 0.0 <= float(out['image'].min()) and float(out['image'].max()) <= 1.0


@pytest.mark.parametrize('kind', ['mixup', 'cutmix'])
def test_mix_labels_match_the_mixed_pixels(kind):
  n, size = 4, 8
  images = jnp.broadcast_to(
    jnp.arange(n, dtype=jnp.float32)[:, None, None, None], (n, size, size, 1)
  )
  labels = jax.nn.one_hot(jnp.arange(n), n)
  fn = getattr(augment, kind)
  for seed in range(5):
    mixed, soft = jax.jit(fn, static_argnums=3)(
      jax.random.key(seed, impl='rbg'), images, labels, 1.0
    )
    soft = np.asarray(soft)
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    for i in range(n):
      # Each example's mean pixel equals the label-weighted mean of the source values.
      np.testing.assert_allclose(float(mixed[i].mean()), float(soft[i] @ np.arange(n)), atol=1e-5)


def _equalize_reference(x):
  x8 = np.clip(np.round(x * 255), 0, 255).astype(int)
  out = np.empty_like(x8)
  for c in range(x8.shape[-1]):
    ch = x8[..., c]
    hist = np.bincount(ch.ravel(), minlength=256)
    step = (hist.sum() - hist[hist > 0][-1]) // 255
    lut = np.concatenate([[0], ((np.cumsum(hist) + step // 2) // max(step, 1))[:-1]]).clip(0, 255)
    out[..., c] = ch if step == 0 else lut[ch]
  return out / 255.0


def test_randaugment_ops_numbers():
  x = np.random.default_rng(5).uniform(size=(16, 16, 3)).astype(np.float32) ** 2
  np.testing.assert_allclose(
    augment.apply_op('solarize', jnp.asarray(x), 9), np.where(x >= 0.7, 1 - x, x), atol=1e-6
  )
  x8 = np.round(x * 255).astype(int)
  np.testing.assert_allclose(
    augment.apply_op('posterize', jnp.asarray(x), 30),  # 4 bits
    (x8 & 0xF0) / 255.0,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    augment.apply_op('equalize', jnp.asarray(x), 0), _equalize_reference(x), atol=1e-6
  )
  shifted = np.asarray(augment.apply_op('translate_x', jnp.asarray(x), 30))  # 150/331 * 16 -> 7 px
  np.testing.assert_allclose(shifted[:, :9], x[:, 7:], atol=0)
  assert np.all(shifted[:, 9:] == 0)
  np.testing.assert_allclose(augment.apply_op('brightness', jnp.asarray(x), 0), x, atol=1e-6)


def test_augment_config_validation():
  cfg = augment.default_config()
  augment.validate(cfg, normalize=True)  # all off is fine
  cfg.randaugment_ops = 2
  with pytest.raises(ValueError, match='normalize'):
    augment.validate(cfg, normalize=True)
  cfg.randaugment_magnitude = 31
  with pytest.raises(ValueError, match='randaugment_magnitude'):
    augment.validate(cfg, normalize=False)


def test_cross_entropy_accepts_distributions():
  logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 4)), jnp.float32)
  labels = jnp.array([0, 3, 1, 2, 2])
  hard = steps.cross_entropy(logits, labels, 0.11)
  soft = steps.cross_entropy(logits, jax.nn.one_hot(labels, 4), 0.11)
  np.testing.assert_allclose(np.asarray(soft), np.asarray(hard), rtol=1e-6)


# ----------------------------------------------------------------------------
# Recipes and the trainer.


def test_imagenet_recipe_and_accumulation():
  from configs import vit_b16_imagenet  # pylint: disable=g-import-not-at-top

  c = vit_b16_imagenet.get_config()
  assert c.batch_size * c.optimizer.accumulate_steps == 4096
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
    'adamw',
    3e-3,
    0.3,
  )
  assert (c.label_smoothing, c.optimizer.grad_clip_norm, c.demp.peak_lambda) == (0.11, 1.0, 0.0)
  assert (c.batch_augment.mixup_alpha, c.batch_augment.cutmix_alpha) == (0.2, 1.0)
  updates = optim.num_updates(c)
  lr = optim.learning_rate_schedule(c)
  warmup = c.optimizer.lr_kwargs.warmup_steps
  assert updates == c.num_steps // 16 and warmup == round(16 * 1_281_167 / 4096)
  np.testing.assert_allclose(float(lr(warmup)), 3e-3, rtol=1e-6)
  assert float(lr(updates)) == 0.0
  # MultiSteps wraps the whole method: params move once per accumulate_steps micro-steps.
  c.optimizer.accumulate_steps = 3
  tx = optim.accumulate(c, optax.sgd(1.0))
  params = {'w': jnp.zeros(2)}
  state = tx.init(params)
  for g in (1.0, 2.0):
    updates_, state = tx.update({'w': jnp.full(2, g)}, state, params)
    assert float(jnp.abs(updates_['w']).max()) == 0.0
  updates_, state = tx.update({'w': jnp.full(2, 6.0)}, state, params)
  np.testing.assert_allclose(np.asarray(updates_['w']), -3.0)  # mean gradient, one step


def test_config_validation_of_new_keys():
  from configs import vit_cifar10_subset  # pylint: disable=g-import-not-at-top

  c = vit_cifar10_subset.get_config('smoke=True')
  config_lib.validate_config(c)
  for key, value, match in (
    ('optimizer.accumulate_steps', 0, 'accumulate_steps'),
    ('prune.revival_patience', -1, 'revival_patience'),
  ):
    bad = vit_cifar10_subset.get_config('smoke=True')
    section, name = key.split('.')
    bad[section][name] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate_config(bad)
  bad = vit_cifar10_subset.get_config('smoke=True')
  bad.batch_augment.randaugment_ops = 2
  with pytest.raises(ValueError, match='normalize'):
    config_lib.validate_config(bad)


def test_small_config_runs_end_to_end(tmp_path):
  from configs import vit_cifar10_subset  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  path = tmp_path / 'tiny.npz'
  np.savez(
    path,
    train_images=rng.integers(0, 256, (64, 32, 32, 3), np.uint8),
    train_labels=rng.integers(0, 10, 64),
    test_images=rng.integers(0, 256, (32, 32, 32, 3), np.uint8),
    test_labels=rng.integers(0, 10, 32),
  )
  c = vit_cifar10_subset.get_config('smoke=True,act=relu,patience=1,noise=0')
  c.data.path = str(path)
  c.data.shuffle_buffer = 64
  c.prune.start_steps.mlp_1 = 5
  summary = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert summary['steps'] == 6 and np.isfinite(summary['test_loss'])
  checks = [e for e in summary['events'] if e['reason'] == 'dead']
  assert [e['step'] for e in checks] == [2, 4, 6]
  assert set(checks[0]['live']) == {'mlp_0', 'mlp_1'}
  # Patience 1 needs two checks; mlp_1 waits for its fixed step 5 (the first check at or after).
  assert checks[0]['started'] == {'mlp_0': None, 'mlp_1': None}
  assert [e['started']['mlp_1'] for e in checks] == [None, None, 6]
