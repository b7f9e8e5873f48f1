"""Tests for demp.transforms: exact numbers under jit, masks, noise statistics."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from demp.schedules import one_cycle  # noqa: E402
from demp.transforms import (  # noqa: E402
  ALL_WEIGHTS,
  NOISE_PRNGS,
  NORM_SCALES,
  LiveNoiseState,
  ScheduledPenaltyState,
  add_scheduled_penalty,
  demp_optimizer,
  path_mask,
  standard_normal,
  with_live_noise,
)


def _params():
  return {
    "ConvNet_0": {
      "BatchNorm_1": {
        "scale": jnp.array([0.5, -2.0, 0.0]),
        "bias": jnp.array([0.3, -0.3, 0.0]),
      },
      "Conv_0": {
        "kernel": jnp.array([[1.0, -1.0, 0.0], [0.0, 2.0, -3.0]]),
        "bias": jnp.array([1.0, -1.0, 0.0]),
      },
    }
  }


def _grads():
  return {
    "ConvNet_0": {
      "BatchNorm_1": {
        "scale": jnp.array([0.1, 0.2, 0.3]),
        "bias": jnp.array([-0.1, 0.0, 0.1]),
      },
      "Conv_0": {
        "kernel": jnp.array([[0.5, 0.5, 0.5], [-0.5, -0.5, -0.5]]),
        "bias": jnp.array([0.2, 0.0, -0.2]),
      },
    }
  }


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _tree_from_paths(paths):
  tree = {}
  for path in paths:
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = jnp.zeros(2)
  return tree


def _selected(mask_fn, paths):
  tree = _tree_from_paths(paths)
  flags = mask_fn(tree)
  return {
    path: flags_at
    for path, flags_at in zip(
      ("/".join(str(k.key) for k in p) for p, _ in jax.tree.leaves_with_path(tree)),
      jax.tree.leaves(flags),
    )
  }


# add_scheduled_penalty ---------------------------------------------------------


@pytest.mark.parametrize(
  "kind, expected_scale",
  [
    # g + 0.1 * sign(p), sign(0) = 0.
    ("lasso", [0.1 + 0.1, 0.2 - 0.1, 0.3 + 0.0]),
    # g + 0.1 * p.
    ("l2", [0.1 + 0.05, 0.2 - 0.2, 0.3 + 0.0]),
  ],
)
def test_penalty_values_under_jit(kind, expected_scale):
  params, grads = _params(), _grads()
  tx = add_scheduled_penalty(0.1, kind)
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  np.testing.assert_allclose(
    updates["ConvNet_0"]["BatchNorm_1"]["scale"], expected_scale, rtol=1e-6
  )
  # Every other leaf is untouched, bit for bit.
  for module, leaf in [("BatchNorm_1", "bias"), ("Conv_0", "kernel"), ("Conv_0", "bias")]:
    np.testing.assert_array_equal(
      updates["ConvNet_0"][module][leaf], grads["ConvNet_0"][module][leaf]
    )
  assert isinstance(new_state, ScheduledPenaltyState)
  assert int(new_state.count) == 1


def test_penalty_all_weights_mask():
  params, grads = _params(), _grads()
  tx = add_scheduled_penalty(0.1, "lasso", mask=ALL_WEIGHTS)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(
    updates["ConvNet_0"]["Conv_0"]["kernel"],
    [[0.6, 0.4, 0.5], [-0.5, -0.4, -0.6]],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    updates["ConvNet_0"]["BatchNorm_1"]["scale"], [0.2, 0.1, 0.3], rtol=1e-6
  )
  for module in ("BatchNorm_1", "Conv_0"):
    np.testing.assert_array_equal(
      updates["ConvNet_0"][module]["bias"], grads["ConvNet_0"][module]["bias"]
    )


def test_penalty_mask_as_callable_and_bool_tree():
  params, grads = _params(), _grads()
  bool_tree = jax.tree.map(lambda _: False, params)
  bool_tree["ConvNet_0"]["Conv_0"]["bias"] = True
  for mask in (bool_tree, lambda p: bool_tree):
    tx = add_scheduled_penalty(1.0, "l2", mask=mask)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["ConvNet_0"]["Conv_0"]["bias"], [1.2, -1.0, -0.2], rtol=1e-6)
    np.testing.assert_array_equal(
      updates["ConvNet_0"]["BatchNorm_1"]["scale"], grads["ConvNet_0"]["BatchNorm_1"]["scale"]
    )


def test_penalty_schedule_read_from_own_count():
  params = _params()
  grads = optax.tree.zeros_like(params)
  tx = add_scheduled_penalty(lambda count: 0.1 * (count + 1), "lasso")
  state = tx.init(params)
  update = jax.jit(tx.update)
  sign = np.array([1.0, -1.0, 0.0])
  for step in range(3):
    updates, state = update(grads, state, params)
    np.testing.assert_allclose(
      updates["ConvNet_0"]["BatchNorm_1"]["scale"], 0.1 * (step + 1) * sign, rtol=1e-6
    )
  assert int(state.count) == 3


def test_penalty_chained_before_adam_is_seen_by_adam():
  lam, lr = 0.05, 1e-2
  tx = optax.chain(add_scheduled_penalty(lam), optax.adam(lr))
  adam = optax.adam(lr)
  params = ref_params = plain_params = _params()
  state, ref_state = tx.init(params), adam.init(params)
  plain_state = adam.init(params)
  grads = _grads()
  for _ in range(3):
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    # By hand: adam on g + λ sign(p) for the BN scale, g elsewhere.
    penalised = jax.tree.map(lambda g: g, grads)
    scale = ref_params["ConvNet_0"]["BatchNorm_1"]["scale"]
    penalised["ConvNet_0"]["BatchNorm_1"]["scale"] = grads["ConvNet_0"]["BatchNorm_1"][
      "scale"
    ] + lam * jnp.sign(scale)
    ref_updates, ref_state = adam.update(penalised, ref_state, ref_params)
    ref_params = optax.apply_updates(ref_params, ref_updates)
    plain_updates, plain_state = adam.update(grads, plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, plain_updates)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # And that differs from plain Adam on g: the penalty changed Adam's steps.
  got = params["ConvNet_0"]["BatchNorm_1"]["scale"]
  plain = plain_params["ConvNet_0"]["BatchNorm_1"]["scale"]
  assert not np.allclose(got, plain, rtol=0, atol=1e-6)


def test_norm_scales_and_all_weights_select_expected_leaves():
  paths = {
    # path: (NORM_SCALES, ALL_WEIGHTS)
    "ConvNet_0/BatchNorm_1/scale": (True, True),
    "ConvNet_0/BatchNorm_1/bias": (False, False),
    "ConvNet_0/Conv_0/kernel": (False, True),
    "ConvNet_0/Conv_0/bias": (False, False),
    "bn1/scale": (True, True),
    "bn1/bias": (False, False),
    "layer1_0/downsample_bn/scale": (True, True),
    "Encoder/encoderblock_3/LayerNorm_3/scale": (True, True),
    "Encoder/encoderblock_3/LayerNorm_3/bias": (False, False),
    "norm/scale": (True, True),
    "GroupNorm_0/scale": (True, True),
    "Dense_0/kernel": (False, True),
    "Dense_0/bias": (False, False),
    "head/kernel": (False, True),
    "layerscale_0/scale": (False, True),
    "pos_embedding": (False, False),
  }
  norm = _selected(path_mask(NORM_SCALES), paths)
  weights = _selected(path_mask(ALL_WEIGHTS), paths)
  for path, (want_norm, want_weight) in paths.items():
    assert norm[path] is want_norm, path
    assert weights[path] is want_weight, path


def test_path_mask_custom_regex():
  paths = ["Conv_0/kernel", "Conv_1/kernel", "Conv_0/bias", "Dense_0/kernel"]
  got = _selected(path_mask(r"^Conv_\d+/kernel$"), paths)
  assert got == {
    "Conv_0/kernel": True,
    "Conv_1/kernel": True,
    "Conv_0/bias": False,
    "Dense_0/kernel": False,
  }


@pytest.mark.parametrize(
  "kwargs, words",
  [
    (dict(strength=-0.1), ["strength", "-0.1"]),
    (dict(strength=float("nan")), ["strength", "nan"]),
    (dict(strength=0.1, kind="l1"), ["kind", "'l1'", "lasso", "l2"]),
    (dict(strength=0.1, mask="(unclosed"), ["regex", "(unclosed"]),
  ],
)
def test_penalty_bad_args_raise(kwargs, words):
  with pytest.raises(ValueError) as info:
    add_scheduled_penalty(**kwargs)
  for word in words:
    assert word in str(info.value)


def test_penalty_needs_params():
  tx = add_scheduled_penalty(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(_grads(), tx.init(_params()), None)


# with_live_noise -----------------------------------------------------------


def _dead_params_and_grads():
  """A dense layer whose input rows 1 and 3 and output unit 1 are dead."""
  params = {"Dense_0": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}}
  kernel_grad = np.full((4, 3), 0.5, np.float32)
  kernel_grad[[1, 3], :] = 0.0  # Dead inputs: zero gradient on their rows.
  kernel_grad[:, 1] = 0.0  # Dead output unit.
  grads = {"Dense_0": {"kernel": jnp.asarray(kernel_grad), "bias": jnp.array([0.5, 0.0, -0.2])}}
  return params, grads


def _inner():
  # A penalty on every leaf inside the inner optimizer: it makes dead units'
  # inner updates non-zero, which must not make them look alive.
  return optax.chain(
    add_scheduled_penalty(0.5, "l2", mask=lambda p: jax.tree.map(lambda _: True, p)),
    optax.sgd(0.1),
  )


def test_live_noise_is_exactly_zero_on_dead_entries():
  params, grads = _dead_params_and_grads()
  inner = _inner()
  tx = with_live_noise(inner, std=0.1, seed=3)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = inner.update(grads, inner.init(params), params)
  assert isinstance(state, LiveNoiseState)
  for name in ("kernel", "bias"):
    got = np.asarray(updates["Dense_0"][name])
    want = np.asarray(ref["Dense_0"][name])
    dead = np.asarray(grads["Dense_0"][name]) == 0
    assert dead.any() and (~dead).any()
    assert np.all(want[dead] != 0)  # The penalty acts on dead entries...
    np.testing.assert_array_equal(got[dead], want[dead])  # ...noise does not.
    assert np.all(got[~dead] != want[~dead])


def test_gradient_liveness_counts_an_underflowed_gradient_as_dead():
  """0 and subnormal gradients are dead, the smallest normal one is live: on every CPU."""
  tiny = np.finfo(np.float32).tiny  # 1.18e-38, the smallest normal float32
  g = np.array([0.0, -0.0, 1e-40, -1e-45, tiny, -tiny, 1e-3], np.float32)
  assert np.sum((g != 0) & (np.abs(g) < tiny)) == 2  # numpy keeps the two subnormals
  live = [False, False, False, False, True, True, True]
  tx = with_live_noise(optax.sgd(0.0), std=1.0, seed=0)
  params = {"w": jnp.zeros(7)}
  for update in (tx.update, jax.jit(tx.update)):
    updates, _ = update({"w": jnp.asarray(g)}, tx.init(params), params)
    got = np.asarray(updates["w"]) != 0  # sgd(0) moves nothing: only the noise
    assert got.tolist() == live, (g.tolist(), got.tolist(), live)


def test_symmetric_noise_reaches_dead_entries():
  params, grads = _dead_params_and_grads()
  inner = _inner()
  tx = with_live_noise(inner, std=0.1, seed=3, symmetric=True)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  ref, _ = inner.update(grads, inner.init(params), params)
  for name in ("kernel", "bias"):
    assert np.all(np.asarray(updates["Dense_0"][name]) != np.asarray(ref["Dense_0"][name]))


def test_noise_std_follows_schedule():
  std = one_cycle(7e-3, total_steps=10, warmup="linear")
  params = {"w": jnp.zeros((400, 500))}  # 200k entries.
  grads = {"w": jnp.ones((400, 500))}  # All live.
  tx = with_live_noise(optax.sgd(0.0), std, seed=0)
  update = jax.jit(tx.update)
  state = tx.init(params)
  measured = {}
  for step in range(8):
    updates, state = update(grads, state, params)
    if step in (0, 3, 7):
      noise = np.asarray(updates["w"], np.float64)  # sgd(0) gives 0 updates.
      measured[step] = (noise.mean(), noise.var())
  expected = {s: float(std(s)) ** 2 for s in measured}  # σ_t² from the std schedule
  assert len(set(expected.values())) == 3  # Three different variances.
  for step, (mean, var) in measured.items():
    np.testing.assert_allclose(var, expected[step], rtol=0.03, err_msg=f"step {step}")
    assert abs(mean) < 5 * np.sqrt(expected[step] / 200_000)


def test_noise_is_not_scaled_by_learning_rate():
  params = {"w": jnp.zeros((64, 64))}
  # Zero gradients with symmetric noise: inner updates are exactly zero, so
  # the update is the noise itself, whatever the learning rate.
  zeros = optax.tree.zeros_like(params)
  out = {}
  for lr in (1e-3, 1.0):
    tx = with_live_noise(optax.sgd(lr), 0.1, seed=5, symmetric=True)
    out[lr], _ = tx.update(zeros, tx.init(params), params)
  np.testing.assert_array_equal(out[1e-3]["w"], out[1.0]["w"])
  np.testing.assert_allclose(np.std(out[1.0]["w"]), 0.1, rtol=0.05)
  # Live (tiny) gradients: update - inner update is the same noise.
  grads = {"w": jnp.full((64, 64), 1e-6)}
  noise = {}
  for lr in (1e-3, 1.0):
    inner = optax.sgd(lr)
    tx = with_live_noise(inner, 0.1, seed=5)
    updates, _ = tx.update(grads, tx.init(params), params)
    ref, _ = inner.update(grads, inner.init(params), params)
    noise[lr] = np.asarray(updates["w"]) - np.asarray(ref["w"])
  np.testing.assert_allclose(noise[1e-3], noise[1.0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(noise[1.0], out[1.0]["w"], rtol=0, atol=1e-6)


def test_noise_rng_contract_deterministic_and_varied():
  params = {"a": jnp.zeros((8, 8)), "b": jnp.zeros(16)}
  grads = optax.tree.ones_like(params)

  def run(seed, steps=3):
    tx = with_live_noise(optax.sgd(0.0), 2.0, seed=seed)
    state, out = tx.init(params), []
    for _ in range(steps):
      updates, state = tx.update(grads, state, params)
      out.append(updates)
    return out

  first, again, other = run(0), run(0), run(1)
  for x, y in zip(first, again):
    _assert_trees_equal(x, y)
  for x, y in zip(first, other):
    assert not np.any(np.asarray(x["a"]) == np.asarray(y["a"]))
  assert not np.any(np.asarray(first[0]["a"]) == np.asarray(first[1]["a"]))
  assert not np.any(np.asarray(first[0]["a"]) == np.asarray(first[0]["b"][:8]))
  # The documented contract: step t draws one flat N(0, 1) vector from
  # fold_in(key(seed), t) -- jax.random.normal in JAX's original (non-partitionable)
  # Threefry layout -- split over the leaves in tree order, scaled by σ = std = 2.
  step_key = jax.random.fold_in(jax.random.key(0), 2)
  sizes = [x.size for x in jax.tree.leaves(params)]
  with jax.threefry_partitionable(False):
    flat = jax.random.normal(step_key, (sum(sizes),), jnp.float32)
  expected = {
    "a": flat[: sizes[0]].reshape(params["a"].shape),
    "b": flat[sizes[0] :].reshape(params["b"].shape),
  }
  for leaf in ("a", "b"):
    np.testing.assert_allclose(first[2][leaf], 2.0 * expected[leaf], rtol=1e-6)


def test_noise_dtype_follows_updates():
  params = {"w": jnp.zeros(8, jnp.bfloat16)}
  grads = {"w": jnp.ones(8, jnp.bfloat16)}
  tx = with_live_noise(optax.sgd(0.1), 0.1)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16
  assert np.all(np.asarray(updates["w"], np.float32) != -0.1)


@pytest.mark.parametrize("std", [-1e-5, float("nan")])
def test_live_noise_bad_std_raises(std):
  with pytest.raises(ValueError, match="std") as info:
    with_live_noise(optax.sgd(0.1), std)
  assert repr(std) in str(info.value)


# jit: one trace for a changing λ_t, lr_t and σ_t² ----------------------------


def test_no_recompilation_with_schedules():
  total = 5
  opt = with_live_noise(
    optax.chain(add_scheduled_penalty(one_cycle(5e-3, total)), optax.adam(one_cycle(1e-3, total))),
    one_cycle(5e-5, total),
  )
  params, grads = _params(), _grads()
  state = opt.init(params)
  traces = 0

  @jax.jit
  def train_step(params, state):
    nonlocal traces
    traces += 1
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(total):
    params, state = train_step(params, state)
  assert traces == 1
  assert int(state.count) == total
  assert int(state.inner_state[0].count) == total


# demp_optimizer --------------------------------------------------------------


def _run(opt, steps=2):
  """Eager updates (jit is covered above; eager keeps compilations shared)."""
  params, grads = _params(), _grads()
  state = opt.init(params)
  out = []
  for _ in range(steps):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out, state


def test_demp_optimizer_without_parts_is_base():
  base = optax.adam(1e-3)
  assert demp_optimizer(base) is base


@pytest.mark.parametrize("with_penalty", [False, True])
@pytest.mark.parametrize("with_noise", [False, True])
def test_demp_optimizer_equals_manual_composition(with_penalty, with_noise):
  lam = one_cycle(5e-3, 10)
  var = one_cycle(5e-5, 10)
  base = optax.adam(1e-2)
  manual = base
  if with_penalty:
    manual = optax.chain(add_scheduled_penalty(lam, "l2", ALL_WEIGHTS), manual)
  if with_noise:
    manual = with_live_noise(manual, var, seed=7, symmetric=True)
  opt = demp_optimizer(
    base,
    penalty_strength=lam if with_penalty else None,
    penalty_kind="l2",
    penalty_mask=ALL_WEIGHTS,
    noise_std=var if with_noise else None,
    noise_seed=7,
    symmetric_noise=True,
  )
  got, got_state = _run(opt)
  want, want_state = _run(manual)
  for x, y in zip(got, want):
    _assert_trees_equal(x, y)
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  if with_noise:
    assert isinstance(got_state, LiveNoiseState)
  # Each part has an effect: compare with the plain base optimizer.
  plain, _ = _run(base)
  differs = not np.array_equal(
    np.asarray(got[-1]["ConvNet_0"]["Conv_0"]["kernel"]),
    np.asarray(plain[-1]["ConvNet_0"]["Conv_0"]["kernel"]),
  )
  assert differs == (with_penalty or with_noise)


def test_demp_optimizer_passes_seed_and_defaults():
  var = 1e-2
  a, _ = _run(
    demp_optimizer(optax.sgd(0.1), penalty_strength=0.1, noise_std=var, noise_seed=0), steps=1
  )
  b, _ = _run(
    demp_optimizer(optax.sgd(0.1), penalty_strength=0.1, noise_std=var, noise_seed=1), steps=1
  )
  assert not np.array_equal(
    np.asarray(a[0]["ConvNet_0"]["Conv_0"]["kernel"]),
    np.asarray(b[0]["ConvNet_0"]["Conv_0"]["kernel"]),
  )
  # Default: asymmetric noise, so the zero-gradient BN bias entry (index 1)
  # gets no noise, and the default mask penalises the BN scale only.
  manual = with_live_noise(
    optax.chain(add_scheduled_penalty(0.1, "lasso", NORM_SCALES), optax.sgd(0.1)), var, seed=0
  )
  m, _ = _run(manual, steps=1)
  for x, y in zip(a, m):
    _assert_trees_equal(x, y)
  np.testing.assert_array_equal(a[0]["ConvNet_0"]["BatchNorm_1"]["bias"][1], 0.0)


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("impl", ["threefry2x32", "rbg", "unsafe_rbg"])
def test_standard_normal_is_jax_normal(n, impl):
  """The flat draw: jax.random.normal, in the original Threefry layout for a Threefry key."""
  key = jax.random.fold_in(jax.random.key(3, impl=impl), 5)
  got = jax.jit(standard_normal, static_argnums=1)(key, n)
  if impl == "threefry2x32":
    with jax.threefry_partitionable(False):
      want = jax.random.normal(key, (n,), jnp.float32)
  else:
    want = jax.random.normal(key, (n,), jnp.float32)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert got.dtype == jnp.float32


@pytest.mark.parametrize("impl", NOISE_PRNGS)
def test_noise_key_impl_is_reproducible_live_only_and_normal(impl):
  params, grads = _dead_params_and_grads()
  inner = optax.sgd(0.0)  # zero inner updates: the update is the noise itself

  def run(seed):
    tx = with_live_noise(inner, std=0.1, seed=seed, key_impl=impl)
    state = tx.init(params)
    assert str(jax.random.key_impl(state.key)) == impl
    update = jax.jit(tx.update)
    out = []
    for _ in range(2):
      updates, state = update(grads, state, params)
      out.append(updates)
    return out

  first, again, other = run(4), run(4), run(5)
  for x, y in zip(first, again):
    _assert_trees_equal(x, y)  # same seed and impl: the same noise
  kernel = [np.asarray(u["Dense_0"]["kernel"]) for u in first]
  dead = np.asarray(grads["Dense_0"]["kernel"]) == 0
  for k in kernel:
    assert np.all(k[dead] == 0) and np.all(k[~dead] != 0)  # live entries only
  assert not np.any(kernel[0][~dead] == kernel[1][~dead])  # a new draw every step
  assert not np.any(np.asarray(other[0]["Dense_0"]["kernel"])[~dead] == kernel[0][~dead])
  # The noise of step t is σ·standard_normal(fold_in(key(seed, impl), t)) on live entries.
  step_key = jax.random.fold_in(jax.random.key(4, impl=impl), 1)
  flat = np.asarray(standard_normal(step_key, 3 + 12))  # leaves in tree order: bias, kernel
  np.testing.assert_allclose(kernel[1][~dead], 0.1 * flat[3:].reshape(4, 3)[~dead], rtol=1e-6)
  big = {"w": jnp.zeros((300, 400))}
  tx = with_live_noise(inner, std=0.5, seed=0, key_impl=impl)
  noise = np.asarray(jax.jit(tx.update)(optax.tree.ones_like(big), tx.init(big), big)[0]["w"])
  assert abs(noise.mean()) < 5 * 0.5 / np.sqrt(noise.size)
  np.testing.assert_allclose(noise.std(), 0.5, rtol=0.01)


def test_noise_with_zero_std_is_exactly_the_inner_update():
  params, grads = _dead_params_and_grads()
  inner = _inner()
  std = lambda count: jnp.where(count < 1, 0.0, 0.1)  # σ_0 = 0, then 0.1
  tx = with_live_noise(inner, std=std, seed=3)
  update = jax.jit(tx.update)
  state = tx.init(params)
  updates, state = update(grads, state, params)
  ref, ref_state = inner.update(grads, inner.init(params), params)
  _assert_trees_equal(updates, ref)  # σ_t = 0: bit for bit the update without noise
  updates, _ = update(grads, state, params)
  ref, _ = inner.update(grads, ref_state, params)
  live = np.asarray(grads["Dense_0"]["kernel"]) != 0
  got = np.asarray(updates["Dense_0"]["kernel"])
  assert np.all(got[live] != np.asarray(ref["Dense_0"]["kernel"])[live])  # σ_1 > 0: noise


def test_unknown_key_impl_names_the_argument():
  with pytest.raises(ValueError, match="`key_impl`='philox' is not one of"):
    with_live_noise(optax.sgd(0.1), 0.1, key_impl="philox")
