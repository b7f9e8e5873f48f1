"""DemP's two gradient transformations: a scheduled penalty and live noise.

* :func:`add_scheduled_penalty` adds the gradient of a scheduled penalty
  ``R(p; λ_t)`` (Lasso by default) on selected leaves, to be chained *before*
  the base optimizer so its preconditioner sees the penalty.
* :func:`with_live_noise` wraps any optimizer and adds Gaussian noise
  ``ξ ~ N(0, σ_t²)`` to its final update, only where the raw loss gradient is
  non-zero, i.e. on parameters of live units. σ_t is a *standard deviation*.
* :func:`demp_optimizer` composes the two around a base optimizer.

Both λ_t and σ_t are read from step counts kept in the optimizer state, so
they are traced values in a jitted step: changing them never recompiles.

Noise magnitude: the paper's text prints 5e-5 as the noise *variance*; the
authors' reference code, which produced the paper's tables, uses 5e-5 as the
*standard deviation* (variance 2.5e-9, 141x smaller in std).
:data:`AUTHORS_NOISE_STD` is the default everywhere in this project;
:data:`PAPER_TEXT_NOISE_STD` (= sqrt(5e-5) ≈ 7.07e-3) is the text's value,
kept for the ablation. Both are standard deviations: every argument and config
key of this project that sets the noise names a std.

References:
  Dufort-Labbé et al., `Maxwell's Demon at Work: Efficient Pruning by
  Leveraging Saturation of Neurons <https://arxiv.org/abs/2403.07688>`_, 2024.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
  'ALL_WEIGHTS',
  'AUTHORS_NOISE_STD',
  'LIVENESS_MODES',
  'NOISE_PRNGS',
  'PENALTY_COUPLINGS',
  'add_decoupled_penalty',
  'LiveNoiseState',
  'NORM_OFFSETS',
  'NORM_SCALES',
  'PAPER_TEXT_NOISE_STD',
  'PENALTY_KINDS',
  'ScheduledPenaltyState',
  'add_scheduled_penalty',
  'demp_optimizer',
  'path_mask',
  'standard_normal',
  'with_live_noise',
]

NORM_SCALES = r'(?i)(?:^|/)(?:[^/]*norm[^/]*|bn[^/]*|[^/]*_bn\d*)/scale$'
"""Regex for the ``scale`` (γ) leaf of every normalization module.

Selects ``scale`` directly under a module whose name contains ``norm``, starts
with ``bn`` or ends in ``_bn``/``_bnN`` (any case; ``subnet`` is no norm): ``'BatchNorm_0/scale'``, ``'bn1/scale'``,
``'ConvNet_0/LayerNorm_3/scale'``, ``'norm/scale'``. Offsets (``bias``) are
never selected. This is DemP's default penalty target.
"""

NORM_OFFSETS = NORM_SCALES.replace('/scale$', '/bias$')
"""Regex for the ``bias`` (β) leaf of every normalization module (as :data:`NORM_SCALES`).

The target of the optional offset penalty (kind ``'positive'``): a unit whose
scale went to 0 under DemP's penalty outputs ReLU(β) for every input, a
constant unless β <= 0; pushing positive offsets down turns such constant
units into dead ones.
"""

ALL_WEIGHTS = r'(?:^|/)(?:kernel|scale)$'
"""Regex for every ``kernel`` and ``scale`` leaf: the "all weights" ablation.

Biases and normalization offsets are never selected.
"""

AUTHORS_NOISE_STD = 5e-5
"""Peak noise standard deviation of the authors' reference code (the default)."""

PAPER_TEXT_NOISE_STD = 5e-5**0.5
"""Peak noise std implied by the paper's text, which prints 5e-5 as a variance."""

MaskOrFn = Union[str, re.Pattern, Any, Callable[[optax.Params], Any]]


def _key_str(key: Any) -> str:
  """One path entry as a string: a dict key, attribute name or index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: tuple[Any, ...]) -> str:
  return '/'.join(_key_str(k) for k in path)


def path_mask(regex: Union[str, re.Pattern]) -> Callable[[optax.Params], Any]:
  """Returns ``params -> bool pytree``: True where ``regex`` matches the path.

  A leaf's path is its dict keys joined by ``'/'``, e.g.
  ``'ConvNet_0/BatchNorm_1/scale'``; the match is ``re.search``. The mask
  depends only on paths, so it stays valid after the widths change.

  Args:
    regex: a regular expression (string or compiled).

  Returns:
    A function mapping a params pytree to a pytree of Python bools with the
    same structure.

  Raises:
    ValueError: if ``regex`` is not a valid regular expression.

  Examples:
    >>> import jax.numpy as jnp
    >>> from demp.transforms import NORM_SCALES, path_mask
    >>> params = {'Conv_0': {'kernel': jnp.ones(2)},
    ...           'BatchNorm_0': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}
    >>> path_mask(NORM_SCALES)(params)
    {'BatchNorm_0': {'bias': False, 'scale': True}, 'Conv_0': {'kernel': False}}
  """
  try:
    pattern = re.compile(regex)
  except (re.error, TypeError) as e:
    raise ValueError(f'`regex` must be a valid regular expression, got regex={regex!r}: {e}') from e

  def mask_fn(params: optax.Params) -> Any:
    return jax.tree.map_with_path(
      lambda path, _: pattern.search(_path_str(path)) is not None, params
    )

  return mask_fn


def _mask_fn(mask: MaskOrFn) -> Callable[[optax.Params], Any]:
  """Normalizes a regex, a callable or a bool pytree to a callable."""
  if isinstance(mask, (str, re.Pattern)):
    return path_mask(mask)
  if callable(mask):
    return mask
  return lambda params: mask


def _check_nonnegative(name: str, value: optax.ScalarOrSchedule) -> None:
  """Raises unless ``value`` is a schedule or a number >= 0 (not NaN)."""
  if callable(value):
    return
  try:
    ok = float(value) >= 0.0
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f'`{name}` must be a number >= 0 or a schedule, got {name}={value!r}.')


def _value_at(value: optax.ScalarOrSchedule, count: jax.Array) -> Any:
  return value(count) if callable(value) else value


class ScheduledPenaltyState(NamedTuple):
  """State of :func:`add_scheduled_penalty`: the step count for λ_t."""

  count: jax.Array  # shape=(), dtype=jnp.int32


PENALTY_KINDS: dict[str, Callable[[jax.Array], jax.Array]] = {
  'lasso': jnp.sign,  # ∇ λ‖p‖₁ = λ sign(p), with sign(0) = 0.
  'l2': lambda p: p,  # ∇ λ/2 ‖p‖² = λ p.
  'positive': lambda p: (p > 0).astype(p.dtype),  # ∇ λ Σ max(p, 0): only positive entries.
}
"""Penalty kinds: the gradient of ``R(p) / λ`` for each."""


def _multiplier_fn(multipliers: Mapping[str, float] | None) -> Callable[[Any], float]:
  """``path -> multiplier`` (1.0 for paths absent from ``multipliers``)."""
  if multipliers is None:
    return lambda path: None
  bad = {k: v for k, v in multipliers.items() if not float(v) >= 0}
  if bad:
    raise ValueError(f'`multipliers` must be numbers >= 0, got {bad}.')
  table = {str(k): float(v) for k, v in multipliers.items()}
  return lambda path: table.get(_path_str(path), 1.0)


def _penalty_tree(lam, penalty_grad, params, selected, multipliers, like):
  """``λ·m_leaf·∇R(p)/λ`` on selected leaves, None elsewhere (``like``'s dtype)."""

  def term(path, p, m, u):
    if u is None or not m:
      return None
    mult = multipliers(path)
    t = lam * penalty_grad(p) if mult is None else (lam * mult) * penalty_grad(p)
    return t.astype(u.dtype)

  return jax.tree.map_with_path(term, params, selected, like, is_leaf=lambda x: x is None)


def add_scheduled_penalty(
  strength: optax.ScalarOrSchedule,
  kind: str = 'lasso',
  mask: MaskOrFn = NORM_SCALES,
  multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  r"""Adds the gradient of a scheduled penalty to the updates on masked leaves.

  For each selected parameter leaf ``p`` with incoming update ``g``:

  * ``kind='lasso'``: ``R = λ_t ‖p‖₁``, so ``g + λ_t sign(p)`` (``sign(0) =
    0``);
  * ``kind='l2'``: ``R = λ_t / 2 ‖p‖²``, so ``g + λ_t p``.

  Unselected leaves pass through unchanged. Chain this transformation *before*
  the base optimizer, on the raw loss gradients, so that an adaptive
  optimizer's preconditioner sees the penalty (coupled, not decoupled, weight
  decay)::

    optax.chain(add_scheduled_penalty(lam), optax.adam(lr))

  λ_t is ``strength`` evaluated at this transformation's own step count (kept
  in :class:`ScheduledPenaltyState` whether or not ``strength`` is a
  schedule), so inside ``jax.jit`` it is a traced value and a changing λ_t
  never recompiles.

  Args:
    strength: λ, a number >= 0 or an ``optax.Schedule`` of the step.
    kind: ``'lasso'`` or ``'l2'`` (see :data:`PENALTY_KINDS`).
    mask: which leaves to penalise: a regex matched (``re.search``) against
      each leaf's ``'/'``-joined path (see :func:`path_mask`, default
      :data:`NORM_SCALES`, i.e. normalization γ only), a callable mapping
      params to a bool pytree, or a bool pytree. It is evaluated on ``params``
      at every update and must be static (depend only on paths/structure).

  Returns:
    An ``optax.GradientTransformation``; its ``update`` requires ``params``.

  Raises:
    ValueError: on a negative number ``strength``, an unknown ``kind`` or an
      invalid regex ``mask``; at update time, if ``params`` is None.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from demp.transforms import add_scheduled_penalty
    >>> params = {'BatchNorm_0': {'scale': jnp.array([0.5, -2.0, 0.0]),
    ...                           'bias': jnp.array([1.0, 1.0, 1.0])}}
    >>> grads = optax.tree.zeros_like(params)
    >>> penalty = add_scheduled_penalty(0.1)
    >>> updates, _ = penalty.update(grads, penalty.init(params), params)
    >>> updates['BatchNorm_0']['scale'], updates['BatchNorm_0']['bias']
    (Array([ 0.1, -0.1,  0. ], dtype=float32), Array([0., 0., 0.], dtype=float32))

  References:
    Dufort-Labbé et al., `Maxwell's Demon at Work: Efficient Pruning by
    Leveraging Saturation of Neurons <https://arxiv.org/abs/2403.07688>`_,
    2024 (the Lasso(γ) regularizer with a one-cycle λ_t).
  """
  _check_nonnegative('strength', strength)
  if kind not in PENALTY_KINDS:
    raise ValueError(f'Unknown penalty `kind`={kind!r}; allowed: {sorted(PENALTY_KINDS)}.')
  penalty_grad = PENALTY_KINDS[kind]
  mask_fn = _mask_fn(mask)
  mult_fn = _multiplier_fn(multipliers)

  def init_fn(params: optax.Params) -> ScheduledPenaltyState:
    del params
    return ScheduledPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(
    updates: optax.Updates,
    state: ScheduledPenaltyState,
    params: optax.Params | None = None,
  ) -> tuple[optax.Updates, ScheduledPenaltyState]:
    if params is None:
      raise ValueError(
        'add_scheduled_penalty needs `params` in update(updates, state, '
        'params) to compute the penalty gradient; got params=None.'
      )
    lam = _value_at(strength, state.count)
    terms = _penalty_tree(lam, penalty_grad, params, mask_fn(params), mult_fn, updates)
    updates = jax.tree.map(
      lambda g, t: g if t is None else g + t, updates, terms, is_leaf=lambda x: x is None
    )
    return updates, ScheduledPenaltyState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


PENALTY_COUPLINGS = ('coupled', 'decoupled')
"""Where the penalty enters: before the base optimizer (coupled, the paper's) or
after it, on the update, scaled by the learning rate (decoupled, like AdamW's decay)."""


def add_decoupled_penalty(
  strength: optax.ScalarOrSchedule,
  learning_rate: optax.ScalarOrSchedule,
  kind: str = 'lasso',
  mask: MaskOrFn = NORM_SCALES,
  multipliers: Mapping[str, float] | None = None,
) -> optax.GradientTransformation:
  r"""Subtracts ``η_t·λ_t·∇R(p)/λ`` from the updates: the penalty, decoupled.

  Chain it *after* the base optimizer, whose output is an update (already
  multiplied by ``-η_t``)::

    optax.chain(optax.adam(lr), add_decoupled_penalty(lam, lr))

  so that, for Lasso, a selected leaf moves by ``u - η_t·λ_t·sign(p)`` (``u`` is
  the base optimizer's update): AdamW's decoupled decay with ``sign(p)`` in
  place of ``p`` (``kind='l2'`` gives exactly AdamW's ``-η_t·λ_t·p``). Unlike
  the coupled penalty (:func:`add_scheduled_penalty` before Adam, whose
  preconditioner normalizes it, so every penalised scale shrinks at about
  ``η_t`` per step whatever λ is), this step is proportional to λ_t: the same
  λ means a different strength in the two couplings.

  λ_t and η_t are both evaluated at this transformation's own step count, i.e.
  the count of optimizer updates, like the base optimizer's schedule.

  Args:
    strength: λ, a number >= 0 or a schedule.
    learning_rate: η, a number >= 0 or a schedule (the base optimizer's).
    kind: a key of :data:`PENALTY_KINDS`.
    mask: which leaves (see :func:`add_scheduled_penalty`).
    multipliers: per-leaf weights (see :func:`add_scheduled_penalty`).

  Returns:
    An ``optax.GradientTransformation`` with state
    :class:`ScheduledPenaltyState`; its ``update`` requires ``params``.

  Raises:
    ValueError: as :func:`add_scheduled_penalty`, and on a negative number
      ``learning_rate``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from demp.transforms import add_decoupled_penalty
    >>> params = {'norm': {'scale': jnp.array([0.5, -2.0])}}
    >>> tx = add_decoupled_penalty(0.1, learning_rate=0.5)
    >>> updates, _ = tx.update(optax.tree.zeros_like(params), tx.init(params), params)
    >>> updates['norm']['scale']
    Array([-0.05,  0.05], dtype=float32)
  """
  _check_nonnegative('strength', strength)
  _check_nonnegative('learning_rate', learning_rate)
  if kind not in PENALTY_KINDS:
    raise ValueError(f'Unknown penalty `kind`={kind!r}; allowed: {sorted(PENALTY_KINDS)}.')
  penalty_grad = PENALTY_KINDS[kind]
  mask_fn = _mask_fn(mask)
  mult_fn = _multiplier_fn(multipliers)

  def init_fn(params: optax.Params) -> ScheduledPenaltyState:
    del params
    return ScheduledPenaltyState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
        'add_decoupled_penalty needs `params` in update(updates, state, params); got params=None.'
      )
    step_lam = _value_at(learning_rate, state.count) * _value_at(strength, state.count)
    terms = _penalty_tree(step_lam, penalty_grad, params, mask_fn(params), mult_fn, updates)
    updates = jax.tree.map(
      lambda u, t: u if t is None else u - t, updates, terms, is_leaf=lambda x: x is None
    )
    return updates, ScheduledPenaltyState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


NOISE_PRNGS = ('threefry2x32', 'rbg', 'unsafe_rbg')
"""PRNG implementations of the noise key (``jax.random.key(seed, impl=...)``).

``'threefry2x32'`` (the default) draws its bits with both 32-bit words of every
Threefry hash (see :func:`standard_normal`); ``'rbg'`` / ``'unsafe_rbg'`` use
XLA's ``RngBitGenerator``, fast on TPUs and GPUs but about 5x slower than
Threefry on a CPU (``python -m scripts.benchmark --optimizers``).
"""


def _random_bits(key: jax.Array, n: int) -> jax.Array:
  """``n`` uniform uint32 words of ``key``; a Threefry key spends one hash per two words.

  JAX's default (partitionable) Threefry layout hashes once per 32-bit word and
  XORs the hash's two output words together; the original layout
  (``jax_threefry_partitionable=False``) keeps both words, so half the hashes
  give the same number of bits. The noise of a replicated param tree is never
  sharded, so nothing needs the partitionable layout here.
  """
  if str(jax.random.key_impl(key)) == 'threefry2x32':
    with jax.threefry_partitionable(False):
      return jax.random.bits(key, (n,), jnp.uint32)
  return jax.random.bits(key, (n,), jnp.uint32)


def _bits_to_normal(bits: jax.Array) -> jax.Array:
  """``jax.random.normal``'s float32 transform of uint32 bits: ``√2·erfinv(u)``, u in (-1, 1)."""
  lo = np.nextafter(np.float32(-1.0), np.float32(0.0))
  one = np.array(1.0, np.float32).view(np.uint32)
  floats = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - 1.0
  u = jax.lax.max(lo, floats * (np.float32(1.0) - lo) + lo)
  return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def standard_normal(key: jax.Array, n: int) -> jax.Array:
  """The flat ``[n]`` float32 N(0, 1) draw of the live noise (one draw per step).

  Exactly ``jax.random.normal(key, (n,))`` computed with
  ``jax_threefry_partitionable=False`` for a Threefry key (the original bit
  layout: half the hashes of the default one), and ``jax.random.normal(key,
  (n,))`` for any other key implementation.
  """
  return _bits_to_normal(_random_bits(key, n))


def _normal_like(key: jax.Array, tree: optax.Updates) -> optax.Updates:
  """Standard normal noise shaped like ``tree``: :func:`standard_normal` split per leaf.

  One random-bits computation for the whole tree instead of one per leaf: the
  compile time of a step with many leaves (a ViT, a ResNet) drops several-fold
  (threefry is unrolled per call), and every prune event recompiles the step.
  The bits are split before the normal transform, which XLA then fuses into
  each leaf's noisy update (fused over the whole flat draw, next to a
  concatenation, a CPU compiles it several times slower).
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [leaf.size for leaf in leaves]
  bits = _random_bits(key, max(1, sum(sizes)))
  offsets = np.cumsum([0] + sizes)
  return treedef.unflatten(
    [
      _bits_to_normal(bits[a:b]).reshape(leaf.shape)
      for a, b, leaf in zip(offsets[:-1], offsets[1:], leaves)
    ]
  )


class LiveNoiseState(NamedTuple):
  """State of :func:`with_live_noise`.

  ``live_mask`` is None with ``liveness='gradient'``; with ``liveness='mask'``
  it is a param-shaped bool tree (True = noise may reach this entry), all True
  at init, set by the trainer after every death check
  (:func:`demp.units.set_live_mask`). Being param-shaped and keyed by param
  paths, the surgery slices it like Adam's moments.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32: the step, for σ_t and keys.
  key: jax.Array  # Typed PRNG key, constant; step keys are fold_in(key, count).
  inner_state: optax.OptState
  live_mask: Any = None


def _nonzero(g: jax.Array) -> jax.Array:
  """``g != 0``, with subnormal values counted as zero on every backend.

  XLA on CPU flushes subnormals to zero (and reads them as zero); a backend that
  keeps them would otherwise call a gradient of 1e-40 live. NaN counts as live.
  """
  return ~(jnp.abs(g) < jnp.finfo(g.dtype).tiny)


LIVENESS_MODES = ('gradient', 'mask')
"""How :func:`with_live_noise` reads liveness: from the raw gradient (``!= 0``,
exact for ReLU) or from a mask in its state (the last death check's verdict)."""


def with_live_noise(
  inner: optax.GradientTransformation,
  std: optax.ScalarOrSchedule,
  seed: int = 0,
  symmetric: bool = False,
  liveness: str = 'gradient',
  key_impl: str = 'threefry2x32',
) -> optax.GradientTransformationExtraArgs:
  r"""Adds Gaussian noise to ``inner``'s update, only on live parameters.

  Algorithm 1 of the DemP paper: ``w ← w − η(∇L + ∇R) + ξ``, with
  ``ξ ~ N(0, σ_t²)`` on the parameters of live units only. The incoming
  ``updates`` must be the raw loss gradient ``∇L``. The liveness mask is
  ``∇L != 0`` elementwise, read *before* ``inner`` runs, so a penalty or
  weight decay added inside ``inner`` never makes a dead unit look alive (a
  dead unit's loss gradient is exactly zero). Then ``inner`` computes its
  update and ξ is added to it where the mask is True; elsewhere the update is
  ``inner``'s, bit for bit. The noise is not scaled by the learning rate.

  ``std`` is the standard deviation σ of the noise, not its variance. The
  authors' reference code uses a peak std of 5e-5 (:data:`AUTHORS_NOISE_STD`);
  the paper's text prints 5e-5 as a variance, i.e. a std of 7.07e-3
  (:data:`PAPER_TEXT_NOISE_STD`), larger than a whole Adam step at lr 5e-3.

  The noise for step ``t`` is one flat draw :func:`standard_normal` from
  ``fold_in(key, t)``, split over the leaves in tree order, with ``key =
  jax.random.key(seed, impl=key_impl)`` kept constant in the state: runs are
  reproducible (the same seed and key implementation give the same noise on
  the same backend) and resume identically from a checkpointed state. The
  noise has each update leaf's dtype.

  Liveness. ``liveness='gradient'`` (above) is exact for ReLU: a unit dead on
  every example has an exactly zero loss gradient on all its weights. A
  gradient smaller in magnitude than the dtype's smallest normal number
  (float32: 1.18e-38) counts as zero, so a gradient that underflows is dead on
  every CPU and backend, whether or not it flushes subnormals. A gradient that
  is zero only analytically, as a sum that cancels (a unit's constant output
  into a BatchNorm that subtracts its batch mean), comes out as rounding noise
  or as exactly 0 depending on the order of summation; the gradient rule then
  depends on the machine, the mask rule does not. For GELU,
  Swish or Leaky ReLU the gradient of an ε-dead unit is tiny but not zero, so
  the gradient rule would put noise everywhere (symmetric noise). With
  ``liveness='mask'`` the mask is instead :attr:`LiveNoiseState.live_mask`, a
  param-shaped bool tree kept in the state: all True at init, and set from the
  death check's verdict by :func:`demp.units.set_live_mask` (the producer slices
  and the consumer input slices of every unit the check called dead are
  False). It is data, not structure: setting it never recompiles.

  Wrap the whole optimizer, gradient accumulation included (e.g. put
  ``optax.MultiSteps`` outside or accumulate before calling this), so that
  noise is added once per parameter update.

  Args:
    inner: the optimizer (any ``optax.GradientTransformation``) to wrap.
    std: σ, the noise's standard deviation: a number >= 0 or an
      ``optax.Schedule`` of the step.
    seed: seed of the noise key.
    symmetric: if True, add noise to every parameter, live or not (the
      symmetric-noise ablation).
    liveness: ``'gradient'`` (``∇L != 0``, for ReLU) or ``'mask'`` (the mask in
      the state, for every other activation); see :data:`LIVENESS_MODES`.
    key_impl: the PRNG implementation of the noise key, a member of
      :data:`NOISE_PRNGS`: ``'threefry2x32'`` (the default, the fastest on a
      CPU) or ``'rbg'`` / ``'unsafe_rbg'`` (XLA's generator, for accelerators).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`LiveNoiseState`; extra keyword arguments are forwarded to
    ``inner``.

  Raises:
    ValueError: on a negative (or NaN) number ``std``, an unknown
      ``liveness`` or an unknown ``key_impl``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from demp.transforms import with_live_noise
    >>> opt = with_live_noise(optax.sgd(0.1), std=1e-2)
    >>> params = {'kernel': jnp.ones((2, 2))}
    >>> grads = {'kernel': jnp.array([[1.0, 1.0], [0.0, 0.0]])}  # Row 1 dead.
    >>> updates, state = opt.update(grads, opt.init(params), params)
    >>> bool(jnp.all(updates['kernel'][1] == 0))  # No noise on the dead row.
    True
    >>> bool(jnp.all(updates['kernel'][0] != -0.1))  # Noise on the live row.
    True

  References:
    Dufort-Labbé et al., `Maxwell's Demon at Work: Efficient Pruning by
    Leveraging Saturation of Neurons <https://arxiv.org/abs/2403.07688>`_,
    2024 (asymmetric noise, Algorithm 1).
  """
  _check_nonnegative('std', std)
  if liveness not in LIVENESS_MODES:
    raise ValueError(f'`liveness`={liveness!r} is not one of {list(LIVENESS_MODES)}.')
  if key_impl not in NOISE_PRNGS:
    raise ValueError(f'`key_impl`={key_impl!r} is not one of {list(NOISE_PRNGS)}.')
  inner = optax.with_extra_args_support(inner)

  def init_fn(params: optax.Params) -> LiveNoiseState:
    live_mask = None
    if liveness == 'mask':
      live_mask = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)
    return LiveNoiseState(
      count=jnp.zeros([], jnp.int32),
      key=jax.random.key(seed, impl=key_impl),
      inner_state=inner.init(params),
      live_mask=live_mask,
    )

  def update_fn(
    updates: optax.Updates,
    state: LiveNoiseState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, LiveNoiseState]:
    if liveness == 'mask':
      if state.live_mask is None:
        raise ValueError("with_live_noise(liveness='mask') got a state without live_mask.")
      live = state.live_mask
    else:
      live = jax.tree.map(_nonzero, updates)  # Before any penalty.
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    sigma = _value_at(std, state.count)
    noise = _normal_like(jax.random.fold_in(state.key, state.count), updates)

    def add(u, n, m):
      noisy = u + (sigma * n).astype(u.dtype)
      return noisy if symmetric else jnp.where(m, noisy, u)

    updates = jax.tree.map(add, updates, noise, live)
    new_state = LiveNoiseState(
      count=optax.safe_increment(state.count),
      key=state.key,
      inner_state=inner_state,
      live_mask=state.live_mask,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def demp_optimizer(
  base: optax.GradientTransformation,
  *,
  penalty_strength: optax.ScalarOrSchedule | None = None,
  penalty_kind: str = 'lasso',
  penalty_mask: MaskOrFn = NORM_SCALES,
  noise_std: optax.ScalarOrSchedule | None = None,
  noise_seed: int = 0,
  symmetric_noise: bool = False,
  noise_liveness: str = 'gradient',
  penalty_coupling: str = 'coupled',
  penalty_multipliers: Mapping[str, float] | None = None,
  learning_rate: optax.ScalarOrSchedule | None = None,
  noise_prng: str = 'threefry2x32',
) -> optax.GradientTransformation:
  r"""DemP around a base optimizer: penalty before it, live noise after it.

  Returns ``with_live_noise(optax.chain(add_scheduled_penalty(...), base),
  ...)``; the penalty is left out when ``penalty_strength`` is None and the
  noise wrapper when ``noise_std`` is None (both None returns ``base``).
  Feed it the raw loss gradients.

  Args:
    base: the base optimizer, e.g. ``optax.adam(lr)`` (any constant weight
      decay of the recipe belongs in it).
    penalty_strength: λ (number or schedule), see
      :func:`add_scheduled_penalty`; None for no penalty.
    penalty_kind: ``'lasso'`` or ``'l2'``.
    penalty_mask: which leaves are penalised; default normalization γ.
    noise_std: σ (number or schedule; a standard deviation, not a
      variance; the authors' peak is :data:`AUTHORS_NOISE_STD` = 5e-5), see
      :func:`with_live_noise`; None for no noise.
    noise_seed: seed of the noise key.
    symmetric_noise: noise on every parameter (ablation) instead of live ones.
    noise_liveness: ``'gradient'`` or ``'mask'`` (see :func:`with_live_noise`).
    penalty_coupling: ``'coupled'`` (the default, the paper's: the penalty's
      gradient is added before ``base``) or ``'decoupled'``
      (:func:`add_decoupled_penalty` after ``base``: the update gets
      ``-η_t·λ_t·∇R/λ``; needs ``learning_rate``).
    penalty_multipliers: per-leaf weights of the penalty (path -> number),
      see :func:`add_scheduled_penalty`; None = 1 everywhere.
    learning_rate: η (number or schedule) of ``base``, for the decoupled
      penalty only.
    noise_prng: the noise key's PRNG implementation (``key_impl`` of
      :func:`with_live_noise`, a member of :data:`NOISE_PRNGS`).

  Returns:
    An ``optax.GradientTransformation``.

  Raises:
    ValueError: on an unknown ``penalty_coupling``, or a decoupled penalty
      without ``learning_rate``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from demp.schedules import one_cycle
    >>> from demp.transforms import demp_optimizer
    >>> total_steps = 1000
    >>> opt = demp_optimizer(
    ...     optax.adam(1e-3),
    ...     penalty_strength=one_cycle(5e-3, total_steps),
    ...     noise_std=one_cycle(5e-5, total_steps),
    ... )
    >>> params = {'Conv_0': {'kernel': jnp.ones((3, 3, 1, 4))},
    ...           'BatchNorm_0': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)}}
    >>> state = opt.init(params)
    >>> grads = optax.tree.ones_like(params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(state.count)
    1

  References:
    Dufort-Labbé et al., `Maxwell's Demon at Work: Efficient Pruning by
    Leveraging Saturation of Neurons <https://arxiv.org/abs/2403.07688>`_,
    2024.
  """
  if penalty_coupling not in PENALTY_COUPLINGS:
    raise ValueError(
      f'`penalty_coupling`={penalty_coupling!r} is not one of {list(PENALTY_COUPLINGS)}.'
    )
  opt = base
  if penalty_strength is not None and penalty_coupling == 'coupled':
    opt = optax.chain(
      add_scheduled_penalty(penalty_strength, penalty_kind, penalty_mask, penalty_multipliers),
      opt,
    )
  elif penalty_strength is not None:
    if learning_rate is None:
      raise ValueError(
        "penalty_coupling='decoupled' needs `learning_rate` (the base "
        'optimizer\'s η, a number or schedule); got None.'
      )
    opt = optax.chain(
      opt,
      add_decoupled_penalty(
        penalty_strength, learning_rate, penalty_kind, penalty_mask, penalty_multipliers
      ),
    )
  if noise_std is not None:
    opt = with_live_noise(
      opt, noise_std, noise_seed, symmetric_noise, noise_liveness, key_impl=noise_prng
    )
  return opt
