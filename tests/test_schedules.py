"""Tests for demp.schedules: values by hand, under jit, and argument checks."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

from demp.schedules import SCHEDULES, make_schedule, one_cycle  # noqa: E402


def _values(schedule, steps):
  """The schedule at each step, evaluated under jit with a traced step."""
  fn = jax.jit(jax.vmap(schedule))
  return np.asarray(fn(jnp.asarray(steps, jnp.int32)))


def _at(schedule, step):
  """One value under jit, the step traced."""
  return float(jax.jit(schedule)(jnp.asarray(step, jnp.int32)))


# one_cycle -------------------------------------------------------------------


@pytest.mark.parametrize(
  "total_steps, peak, pct_start, div_factor, final_div_factor",
  [
    (100, 2.5, 0.3, 25.0, 1e4),
    (37, 5e-3, 0.25, 10.0, 100.0),
    (900, 5e-5, 0.3, 25.0, 1e4),
    (7, 1.0, 0.5, 4.0, 2.0),
  ],
)
def test_one_cycle_cosine_equals_optax(total_steps, peak, pct_start, div_factor, final_div_factor):
  ours = one_cycle(peak, total_steps, pct_start, div_factor, final_div_factor)
  ref = optax.cosine_onecycle_schedule(total_steps, peak, pct_start, div_factor, final_div_factor)
  steps = np.arange(total_steps + 11)
  np.testing.assert_array_equal(_values(ours, steps), _values(ref, steps))
  # Eager, with Python ints, at a few steps too.
  for s in (0, total_steps // 3, total_steps, total_steps + 10):
    assert float(ours(s)) == float(ref(s))


def test_one_cycle_cosine_by_hand():
  # T=100, warm-up int(0.3*100)=30 steps from 1/25=0.04 to 1.
  sched = one_cycle(1.0, 100)
  # Cosine warm-up at step 10: 1 + (0.04 - 1)/2 * (cos(pi/3) + 1) = 0.28.
  np.testing.assert_allclose(_at(sched, 10), 0.28, rtol=1e-6)
  np.testing.assert_allclose(_at(sched, 0), 0.04, rtol=1e-6)
  np.testing.assert_allclose(_at(sched, 30), 1.0, rtol=1e-6)


def test_one_cycle_linear_by_hand():
  sched = one_cycle(1.0, 100, warmup="linear")
  final = 1.0 / (25.0 * 1e4)
  expected = {
    0: 0.04,  # peak / div_factor
    10: 0.04 + 0.96 * 10 / 30,  # linear, 1/3 of the way: 0.36
    15: 0.52,  # half way
    30: 1.0,  # peak at pct_start * T
    65: final + (1.0 - final) / 2,  # half way down the cosine
    100: final,  # end of the span
    101: final,  # held after the span
    250: final,
  }
  for step, value in expected.items():
    np.testing.assert_allclose(_at(sched, step), value, rtol=1e-6, err_msg=f"step {step}")
  # The decay segment is the same as with the cosine warm-up.
  steps = np.arange(30, 120)
  np.testing.assert_array_equal(_values(sched, steps), _values(one_cycle(1.0, 100), steps))


def test_one_cycle_span_shorter_than_run():
  # The span ends at 0.9*T and holds its final value afterwards.
  sched = one_cycle(5e-3, 90, warmup="linear")
  values = _values(sched, np.arange(90, 100))
  np.testing.assert_allclose(values, 5e-3 / 25 / 1e4, rtol=1e-6)


def test_one_cycle_traced_step_in_a_loop():
  sched = one_cycle(2.0, 20, warmup="linear")

  def body(step, acc):
    return acc + sched(step)

  total = jax.jit(lambda: jax.lax.fori_loop(0, 20, body, 0.0))()
  expected = sum(float(sched(s)) for s in range(20))
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)


@pytest.mark.parametrize("warmup", ["cosine", "linear"])
def test_one_cycle_zero_peak_is_zero(warmup):
  values = _values(one_cycle(0.0, 50, warmup=warmup), np.arange(60))
  np.testing.assert_array_equal(values, np.zeros(60))


@pytest.mark.parametrize(
  "kwargs, name",
  [
    (dict(total_steps=0), "total_steps"),
    (dict(total_steps=-3), "total_steps"),
    (dict(total_steps=10.5), "total_steps"),
    (dict(pct_start=0.0), "pct_start"),
    (dict(pct_start=1.0), "pct_start"),
    (dict(pct_start=1.5), "pct_start"),
    (dict(warmup="exponential"), "warmup"),
    (dict(peak_value=-1.0), "peak_value"),
    (dict(div_factor=0.0), "div_factor"),
    (dict(final_div_factor=-1.0), "final_div_factor"),
  ],
)
def test_one_cycle_bad_args_raise(kwargs, name):
  args = dict(peak_value=1.0, total_steps=100) | kwargs
  with pytest.raises(ValueError, match=name) as info:
    one_cycle(**args)
  assert repr(kwargs[name]) in str(info.value)


# make_schedule ---------------------------------------------------------------


@pytest.mark.parametrize(
  "kind, kwargs, expected",
  [
    ("constant", dict(value=0.3), {0: 0.3, 7: 0.3, 10_000: 0.3}),
    (
      "step",
      dict(init_value=1.0, step_size=10, decay_factor=0.2),
      {0: 1.0, 9: 1.0, 10: 0.2, 19: 0.2, 25: 0.04},
    ),
    (
      "multistep",
      dict(init_value=1.0, boundaries=[3, 7], factor=0.1),
      {0: 1.0, 2: 1.0, 3: 0.1, 6: 0.1, 7: 0.01, 100: 0.01},
    ),
    (
      "cosine",
      dict(init_value=2.0, decay_steps=10),
      {0: 2.0, 5: 1.0, 10: 0.0, 20: 0.0},
    ),
    (
      "cosine",
      dict(init_value=2.0, decay_steps=10, warmup_steps=2),
      {0: 0.0, 1: 1.0, 2: 2.0, 6: 1.0, 10: 0.0, 15: 0.0},
    ),
    (
      "one_cycle",
      dict(peak_value=1.0, total_steps=100, warmup="linear"),
      {0: 0.04, 15: 0.52, 30: 1.0, 100: 4e-6},
    ),
  ],
)
def test_make_schedule_values(kind, kwargs, expected):
  sched = make_schedule(kind, **kwargs)
  for step, value in expected.items():
    np.testing.assert_allclose(
      _at(sched, step), value, rtol=1e-5, atol=1e-7, err_msg=f"{kind} at step {step}"
    )


def test_make_schedule_registry_names():
  assert set(SCHEDULES) == {"constant", "one_cycle", "step", "multistep", "cosine"}


def test_make_schedule_unknown_kind_raises_with_names():
  with pytest.raises(ValueError, match="kind") as info:
    make_schedule("exp_decay", init_value=1.0)
  message = str(info.value)
  assert "'exp_decay'" in message
  for name in SCHEDULES:
    assert name in message


@pytest.mark.parametrize(
  "kind, kwargs, name",
  [
    ("step", dict(init_value=1.0, step_size=0, decay_factor=0.2), "step_size"),
    ("step", dict(init_value=1.0, step_size=5, decay_factor=0.0), "decay_factor"),
    ("multistep", dict(init_value=1.0, boundaries=[7, 3], factor=0.1), "boundaries"),
    ("multistep", dict(init_value=1.0, boundaries=[3, 7], factor=-0.1), "factor"),
    ("cosine", dict(init_value=1.0, decay_steps=0), "decay_steps"),
    ("cosine", dict(init_value=1.0, decay_steps=10, warmup_steps=10), "warmup_steps"),
  ],
)
def test_make_schedule_bad_args_raise(kind, kwargs, name):
  with pytest.raises(ValueError, match=name):
    make_schedule(kind, **kwargs)
