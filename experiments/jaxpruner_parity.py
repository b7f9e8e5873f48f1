r"""Parity of ``baselines.sparse`` with JaxPruner's unstructured algorithms, quantity by quantity.

JaxPruner needs an old JAX (it calls ``jax.tree_map``), so the two libraries
cannot share a process. The script has two halves that exchange one ``.npz``:

1. ``reference``, run in an environment where ``import jaxpruner`` works (an
   old JAX, e.g. jax/jaxlib 0.4.30, optax 0.2.2, chex 0.1.86, flax 0.8.5): makes
   the fixed inputs from a NumPy seed (a CNN-shaped params dict, three
   gradients), computes JaxPruner's outputs on them and writes
   ``OUT/jaxpruner.npz`` (inputs and outputs). It imports nothing from this
   project::

     <old-jax env>/bin/python experiments/jaxpruner_parity.py reference --out parity

   (``pip install jaxpruner`` there, or put a JaxPruner checkout on ``PYTHONPATH``.)

2. ``compare``, run in the project's environment: computes the same with
   ``baselines.sparse`` from the inputs in the ``.npz``, compares and prints
   the table (``--md`` also writes it)::

     python -m experiments.jaxpruner_parity compare --out parity --md parity/table.md

   ``--ref results/jaxpruner_parity.npz`` (instead of ``--out``) compares
   against the committed reference, which is that file.

``tests/test_jaxpruner_parity.py`` replays ``compare`` on the committed
``results/jaxpruner_parity.npz``, so a change in ``baselines.sparse`` that
breaks a match (or turns a known difference into another) fails a test
without JaxPruner installed.

What is compared (inputs: layers ``conv_0`` 3x3x3x8, ``conv_1`` 3x3x8x16,
``dense_0`` 64x32, ``dense_1`` 32x10, each with a bias):

* per-layer sparsities of ``uniform`` and ``erk``: with every kernel pruned
  (JaxPruner's default filter, ours with ``prune_first_layer`` and
  ``prune_last_layer``), and with the first and last layers held dense (our
  default, JaxPruner through a ``filter_fn``);
* magnitude and saliency masks (one-shot at fixed sparsities, one with many
  tied scores, a second pruning round from already-pruned weights, and an
  extreme sparsity where fewer than one weight would be kept);
* three RigL and three SET mask updates, each from JaxPruner's previous mask
  (so every update is compared on its own): the full masks, the weights kept
  by the drop step, the per-layer counts, our selection at JaxPruner's counts,
  and for SET, whose growth is random, our update on JaxPruner's random
  scores, our own RNG's overlap with JaxPruner's regrown set against chance,
  and whether JaxPruner's random scores can be regenerated in current JAX;
* the random initial masks of SET/RigL (counts, overlap against chance);
* the polynomial schedule (which optimizer calls update the masks, and the
  sparsity each reaches) and RigL's drop fraction along the run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import numpy as np

SEED = 0
LAYERS = (
  ('conv_0', (3, 3, 3, 8)),
  ('conv_1', (3, 3, 8, 16)),
  ('dense_0', (64, 32)),
  ('dense_1', (32, 10)),
)
NAMES = tuple(name for name, _ in LAYERS)
MIDDLE = NAMES[1:-1]  # the layers pruned when the first and last are held dense
ERK_SPARSITIES = (0.5, 0.8, 0.95)
DROP_FRACTIONS = (0.3, 0.2, 0.1)  # RigL/SET updates 0, 1, 2
DST_SPARSITY = 0.8  # SET/RigL: uniform sparsity of the initial masks
SCHEDULE = dict(total=100, freq=10, start=30, end=80, target=0.8, drop=0.3)
NPZ = 'jaxpruner.npz'


# -------------------------------------------------------------------------------------------------
# Inputs (NumPy only: both halves read them from the .npz).


def make_inputs() -> dict[str, np.ndarray]:
  """The fixed params (He-scaled normal kernels, small biases), three gradients, tied params."""
  rng = np.random.default_rng(SEED)
  out = {}
  for name, shape in LAYERS:
    fan_in = math.prod(shape[:-1])
    w = (rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    out[f'in/params/{name}/kernel'] = w
    out[f'in/params/{name}/bias'] = (0.01 * rng.standard_normal(shape[-1:])).astype(np.float32)
    # Rounded to a coarse grid: a few distinct magnitudes, so most scores tie.
    out[f'in/tied/{name}/kernel'] = np.round(w * 4.0) / np.float32(4.0)
    out[f'in/tied/{name}/bias'] = out[f'in/params/{name}/bias']
  for k in range(len(DROP_FRACTIONS)):
    for name, shape in LAYERS:
      out[f'in/grads{k}/{name}/kernel'] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
      out[f'in/grads{k}/{name}/bias'] = (0.1 * rng.standard_normal(shape[-1:])).astype(np.float32)
  return out


def tree(flat: dict[str, np.ndarray], prefix: str) -> dict[str, dict[str, np.ndarray]]:
  """``{layer: {'kernel', 'bias'}}`` from the flat ``prefix/layer/name`` keys, in layer order."""
  return {
    name: {p: np.asarray(flat[f'{prefix}/{name}/{p}']) for p in ('kernel', 'bias')}
    for name in NAMES
  }


def masked(params: dict, masks: dict[str, np.ndarray]) -> dict:
  """``params`` with each kernel multiplied by its mask (what a training step leaves)."""
  return {
    name: {'kernel': params[name]['kernel'] * masks[name], 'bias': params[name]['bias']}
    for name in NAMES
  }


# -------------------------------------------------------------------------------------------------
# Half 1: JaxPruner (old JAX). Only NumPy and jaxpruner are imported.


def reference(out_dir: str) -> str:
  """Runs JaxPruner on the fixed inputs; writes ``out_dir/jaxpruner.npz``."""
  import jax
  import jax.numpy as jnp
  import jaxpruner
  import optax
  from jaxpruner import sparsity_distributions as sd

  res = make_inputs()
  params = tree(res, 'in/params')
  tied = tree(res, 'in/tied')
  grads = [tree(res, f'in/grads{k}') for k in range(len(DROP_FRACTIONS))]

  def save_masks(key, masks):
    for name in NAMES:
      res[f'jp/{key}/{name}'] = np.asarray(masks[name]['kernel']).astype(np.uint8)

  def save_sparsities(key, tree_):
    for name in NAMES:
      s = tree_[name]['kernel']
      res[f'jp/{key}/{name}'] = np.float64(np.nan if s is None else s)

  all_kernels = sd.NOT_DIM_ONE_FILTER_FN

  def middle_only(key, p):
    return p.ndim > 1 and key[0] in MIDDLE

  for s in ERK_SPARSITIES:
    save_sparsities(f'uniform_all_{s}', sd.uniform(params, s, filter_fn=all_kernels))
    save_sparsities(f'uniform_middle_{s}', sd.uniform(params, s, filter_fn=middle_only))
    save_sparsities(f'erk_all_{s}', sd.erk(params, s, filter_fn=all_kernels))
    save_sparsities(f'erk_middle_{s}', sd.erk(params, s, filter_fn=middle_only))

  def one_shot(cls, dist, sparsity, p, g=None):
    updater = cls(sparsity_distribution_fn=functools.partial(dist, sparsity=sparsity))
    return updater.instant_sparsify(p, g)[1]

  save_masks('magnitude_uniform_0.8', one_shot(jaxpruner.MagnitudePruning, sd.uniform, 0.8, params))
  save_masks('magnitude_erk_0.8', one_shot(jaxpruner.MagnitudePruning, sd.erk, 0.8, params))
  save_masks('magnitude_tied_0.7', one_shot(jaxpruner.MagnitudePruning, sd.uniform, 0.7, tied))
  save_masks('magnitude_0.999', one_shot(jaxpruner.MagnitudePruning, sd.uniform, 0.999, params))
  save_masks(
    'saliency_uniform_0.8', one_shot(jaxpruner.SaliencyPruning, sd.uniform, 0.8, params, grads[0])
  )
  # Gradual pruning, second round: JaxPruner scores the weights that the first round zeroed.
  first = one_shot(jaxpruner.MagnitudePruning, sd.uniform, 0.5, params)
  first = {name: np.asarray(first[name]['kernel']) for name in NAMES}
  save_masks('magnitude_round1_0.5', {n: {'kernel': first[n]} for n in NAMES})
  save_masks(
    'magnitude_round2_0.8',
    one_shot(jaxpruner.MagnitudePruning, sd.uniform, 0.8, masked(params, first)),
  )

  # Dynamic sparse training: three updates, each from the previous mask, weights masked.
  dist = functools.partial(sd.uniform, sparsity=DST_SPARSITY)
  for algo, cls in (('rigl', jaxpruner.RigL), ('set', jaxpruner.SET)):
    state = cls(sparsity_distribution_fn=dist).init_state(params)
    state = state._replace(inner_state=())
    save_masks(f'{algo}_init', state.masks)
    for k, d in enumerate(DROP_FRACTIONS):
      updater = cls(sparsity_distribution_fn=dist, drop_fraction_fn=lambda _, d=d: d)
      mask = {n: np.asarray(state.masks[n]['kernel']) for n in NAMES}
      p = masked(params, mask)
      state = state._replace(count=jnp.asarray(k, jnp.int32))
      # The drop step alone, as SET._update_masks computes it (its topk_fn on its scores).
      for name in NAMES:
        m = jnp.asarray(mask[name])
        score = jnp.abs(p[name]['kernel'])
        density = jnp.sum(m) / m.size
        drop_score = jnp.where(m == 0, jnp.min(score) - updater.eps, score)
        kept = updater.topk_fn(drop_score, 1 - density * (1 - d))
        res[f'jp/{algo}_kept{k}/{name}'] = np.asarray(kept).astype(np.uint8)
      if algo == 'set':
        scores = updater._get_grow_scores(state, p, grads[k])  # pylint: disable=protected-access
        for name in NAMES:
          res[f'jp/set_grow_scores{k}/{name}'] = np.asarray(scores[name]['kernel'])
      state = updater.update_state(state, p, grads[k])
      save_masks(f'{algo}_update{k}', state.masks)

  # Schedules, evaluated at JaxPruner's counter (updates done before this one: 0, 1, ...).
  sc = SCHEDULE
  poly = jaxpruner.PolynomialSchedule(
    update_freq=sc['freq'], update_start_step=sc['start'], update_end_step=sc['end']
  )
  counts = np.arange(sc['total'])
  res['jp/schedule_is_update'] = np.array([bool(poly.is_mask_update_iter(c)) for c in counts])
  res['jp/schedule_sparsity'] = np.array(
    [float(poly.get_sparsity_at_step(sc['target'], c)) for c in counts], np.float32
  )
  # create_updater_from_config's drop fraction: cosine from count 0 to update_end_step.
  drop_fn = optax.cosine_decay_schedule(sc['drop'], sc['end'])
  res['jp/drop_fraction'] = np.array([float(drop_fn(c)) for c in counts], np.float32)

  res['meta/versions'] = np.array(
    f'jax {jax.__version__}, optax {optax.__version__}, numpy {np.__version__}'
  )
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, NPZ)
  np.savez_compressed(path, **res)
  return path


# -------------------------------------------------------------------------------------------------
# Half 2: baselines.sparse (current JAX) and the comparison.


def ours(ref: dict[str, np.ndarray], rng: bool = True) -> dict[str, np.ndarray]:
  """``baselines.sparse``'s outputs on the inputs in ``ref`` (JaxPruner's keys, under ``our/``).

  Our functions run jitted on NumPy inputs (one compilation per weight shape),
  the random scores in one jitted function per ``jax_threefry_partitionable``
  setting. ``rng=False`` leaves out what draws random numbers (our SET update
  with our RNG, our initial masks, JaxPruner's scores regenerated): compiling
  ``jax.random`` for 4-D shapes takes most of the CPU time, and those rows
  depend on the RNG rather than on the algorithms.
  """
  import jax
  import jax.numpy as jnp

  from baselines.sparse import distributions
  from baselines.sparse import sparsity_schedules as schedules

  params = tree(ref, 'in/params')
  res: dict[str, np.ndarray] = {}

  def sparsities(distribution, s, held_dense):
    t = distributions.layer_sparsities(
      params,
      distribution,
      s,
      prune_first_layer=not held_dense,
      prune_last_layer=not held_dense,
    )
    return {n: np.float64(np.nan if t[n]['kernel'] is None else t[n]['kernel']) for n in NAMES}

  for s in ERK_SPARSITIES:
    for held, label in ((False, 'all'), (True, 'middle')):
      for dist in ('uniform', 'erk'):
        for name, v in sparsities(dist, s, held).items():
          res[f'our/{dist}_{label}_{s}/{name}'] = np.asarray(v)
        # ERK at JaxPruner's effective target (its budget counts floor(s n) zeros per layer).
        shapes = {n: shape for n, shape in LAYERS if not held or n in MIDDLE}
        n_total = sum(math.prod(shape) for shape in shapes.values())
        zeros = sum(math.floor(s * math.prod(shape)) for shape in shapes.values())
        eff = distributions.erk({f'{n}/kernel': sh for n, sh in shapes.items()}, zeros / n_total)
        for name in NAMES:
          res[f'our/erk_{label}_{s}_effective/{name}'] = np.float64(
            eff.get(f'{name}/kernel', np.nan)
          )

  erk_08 = sparsities('erk', 0.8, False)
  jp_erk_08 = {n: float(ref[f'jp/erk_all_0.8/{n}']) for n in NAMES}
  res.update(_mask_arrays(ref, erk_08, jp_erk_08, rng))

  for partitionable in (True, False) if rng else ():
    with jax.threefry_partitionable(partitionable):
      res.update(jax.jit(functools.partial(_jaxpruner_random_scores, params, partitionable))())

  # Schedules at our step (= JaxPruner's counter + 1: the same optimizer call).
  sc = SCHEDULE
  poly = schedules.PolynomialSchedule(sc['freq'], sc['start'], sc['end'])
  steps = jnp.arange(sc['total']) + 1
  res['our/schedule_is_update'] = np.asarray(poly.is_mask_update_iter(steps))
  res['our/schedule_sparsity'] = np.asarray(poly.get_sparsity_at_step(sc['target'], steps))
  drop_fn = schedules.cosine_drop_fraction(sc['drop'], sc['start'], sc['end'])
  res['our/drop_fraction'] = np.asarray(drop_fn(steps))
  return {k: np.asarray(v) for k, v in res.items()}


def _mask_arrays(ref, erk_08, jp_erk_08, rng: bool) -> dict:
  """Every mask of :func:`ours`: scores in NumPy, our functions jitted (one compilation a shape)."""
  import jax
  import jax.numpy as jnp

  from baselines.sparse import algorithms, updater

  j_prune = jax.jit(algorithms.prune)
  j_drop_and_grow = jax.jit(algorithms.drop_and_grow)
  j_topk = jax.jit(algorithms.topk_mask)
  j_rigl = jax.jit(algorithms.ALGORITHMS['rigl'].update)
  j_set = jax.jit(algorithms.ALGORITHMS['set'].update)
  f32 = np.float32

  params = tree(ref, 'in/params')
  tied = tree(ref, 'in/tied')
  grads = [tree(ref, f'in/grads{k}') for k in range(len(DROP_FRACTIONS))]
  res = {}

  def put(key, per_layer):
    for name in NAMES:
      res[f'our/{key}/{name}'] = per_layer[name]

  def prune(score_fn, s_per_layer, p, mask=None, g=None):
    out = {}
    for name in NAMES:
      w = p[name]['kernel']
      m = np.ones(w.shape, bool) if mask is None else np.asarray(mask[name], bool)
      score = score_fn(w, None if g is None else g[name]['kernel'])
      out[name] = j_prune(m, score, f32(s_per_layer[name]))
    return out

  magnitude = lambda w, g: np.abs(w)  # noqa: E731
  saliency = lambda w, g: np.abs(w * g)  # noqa: E731
  uniform = lambda s: dict.fromkeys(NAMES, s)  # noqa: E731
  put('magnitude_uniform_0.8', prune(magnitude, uniform(0.8), params))
  put('magnitude_erk_0.8', prune(magnitude, erk_08, params))
  put('magnitude_jp_erk_0.8', prune(magnitude, jp_erk_08, params))
  put('magnitude_tied_0.7', prune(magnitude, uniform(0.7), tied))
  put('magnitude_0.999', prune(magnitude, uniform(0.999), params))
  put('saliency_uniform_0.8', prune(saliency, uniform(0.8), params, g=grads[0]))
  # The second round from the first round's mask and zeroed weights (as in training).
  first = {n: np.asarray(ref[f'jp/magnitude_round1_0.5/{n}'], bool) for n in NAMES}
  put('magnitude_round1_0.5', prune(magnitude, uniform(0.5), params))
  put('magnitude_round2_0.8', prune(magnitude, uniform(0.8), masked(params, first), mask=first))

  # Dynamic sparse training: each update from JaxPruner's previous mask, weights masked.
  for algo in ('rigl', 'set'):
    for k, d in enumerate(DROP_FRACTIONS):
      prev_key = f'{algo}_init' if k == 0 else f'{algo}_update{k - 1}'
      full, kept, at_jp_counts, on_jp_random = {}, {}, {}, {}
      for i, name in enumerate(NAMES):
        m = np.asarray(ref[f'jp/{prev_key}/{name}'], bool)
        w = params[name]['kernel'] * m
        g = grads[k][name]['kernel']
        if algo == 'rigl':
          grow = np.abs(g)
          full[name] = j_rigl(m, w, g, f32(DST_SPARSITY), f32(d), None)
        else:
          grow = ref[f'jp/set_grow_scores{k}/{name}']
          if rng:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(1), k), i)
            full[name] = j_set(m, w, g, f32(DST_SPARSITY), f32(d), key)
          on_jp_random[name] = j_drop_and_grow(m, np.abs(w), grow, f32(d))
        n_active = int(m.sum())
        n_drop = int(np.floor(f32(d) * f32(n_active)))  # drop_and_grow's count, in float32
        drop_score = np.where(m, np.abs(w), -np.inf).astype(f32)
        kept[name] = j_topk(drop_score, jnp.int32(n_active - n_drop))
        # Our top-k selection with the count JaxPruner's drop step kept.
        n_keep_jp = int(ref[f'jp/{algo}_kept{k}/{name}'].sum())
        kept_jp_count = np.asarray(j_topk(drop_score, jnp.int32(n_keep_jp)))
        grow_score = np.where(kept_jp_count, -np.inf, grow).astype(f32)
        grown = np.asarray(j_topk(grow_score, jnp.int32(n_active - n_keep_jp)))
        at_jp_counts[name] = kept_jp_count | grown
      if full:
        put(f'{algo}_update{k}', full)
      put(f'{algo}_kept{k}', kept)
      put(f'{algo}_at_jp_counts{k}', at_jp_counts)
      if algo == 'set':
        put(f'set_on_jp_random{k}', on_jp_random)

  if not rng:
    return res
  # Initial masks of dynamic sparse training (random, at the target).
  u = updater.create_updater(
    'rigl',
    sparsity=DST_SPARSITY,
    total_steps=SCHEDULE['total'],
    distribution='uniform',
    prune_first_layer=True,
    prune_last_layer=True,
  )
  targets = jax.tree.map(lambda s: jnp.asarray(s, jnp.float32), u.sparsity_distribution_fn(params))
  init = jax.jit(u.init_masks)(params, targets)
  put('dst_init', {n: init[n]['kernel'] for n in NAMES})
  return res


def _jaxpruner_random_scores(params, partitionable: bool) -> dict:
  """JaxPruner's SET grow scores, regenerated with its key derivation."""
  import jax
  import jax.numpy as jnp

  res = {}
  for k in range(len(DROP_FRACTIONS)):
    key = jax.random.fold_in(jax.random.PRNGKey(8), k)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))
    for name in NAMES:
      res[f'our/rng_partitionable_{partitionable}{k}/{name}'] = jax.random.uniform(
        keys[name]['kernel'], params[name]['kernel'].shape, jnp.float32
      )
  return res


def _masks(d: dict, prefix: str) -> dict[str, np.ndarray]:
  return {n: np.asarray(d[f'{prefix}/{n}']).astype(bool) for n in NAMES}


def _mask_row(quantity, jp, our, layers=NAMES, note=''):
  diff = sum(int((jp[n] != our[n]).sum()) for n in layers)
  counts = ', '.join(
    f'{n} {int(jp[n].sum())}' + ('' if jp[n].sum() == our[n].sum() else f'/{int(our[n].sum())}')
    for n in layers
  )
  return dict(
    quantity=quantity,
    max_abs_diff='',
    differing=f'{diff} / {sum(jp[n].size for n in layers)}',
    exact='yes' if diff == 0 else 'no',
    detail=f'active: {counts}' + (f'; {note}' if note else ''),
  )


def _value_row(quantity, jp, our, atol=0.0, note=''):
  """Values compared with ``None`` (not pruned: NaN here) read as sparsity 0."""
  jp = np.nan_to_num(np.asarray(jp, np.float64))
  our = np.nan_to_num(np.asarray(our, np.float64))
  err = float(np.max(np.abs(jp - our)))
  exact = bool(np.array_equal(jp, our))
  return dict(
    quantity=quantity,
    max_abs_diff=f'{err:.3g}',
    differing=f'{int(np.sum(jp != our))} / {jp.size}',
    exact='yes' if exact else (f'no (within {atol:g})' if atol and err <= atol else 'no'),
    detail=note,
  )


def compare(ref: dict[str, np.ndarray], our: dict[str, np.ndarray]) -> list[dict[str, str]]:
  """Rows of the parity table: quantity, max abs diff, differing entries, exact, detail."""
  rows = []

  def per_layer(prefix, d, key):
    return np.array([d[f'{prefix}/{key}/{n}'] for n in NAMES], np.float64)

  def fmt(v):
    return ', '.join('None' if np.isnan(x) else f'{x:.6f}' for x in v)

  for held, label in ((False, 'all'), (True, 'middle')):
    for dist, ss in (('uniform', (0.8,)), ('erk', ERK_SPARSITIES)):
      for s in ss:
        key = f'{dist}_{label}_{s}'
        jp, ours_ = per_layer('jp', ref, key), per_layer('our', our, key)
        where = 'every kernel pruned' if not held else 'first and last layers dense'
        note = f'JaxPruner: {fmt(jp)}; ours: {fmt(ours_)}'
        if dist == 'erk':
          eff = per_layer('our', our, f'{key}_effective')
          gap = float(np.max(np.abs(np.nan_to_num(jp) - np.nan_to_num(eff))))
          note += f"; ours at JaxPruner's effective target: max abs diff {gap:.2g}"
        rows.append(_value_row(f'{dist} sparsities, s={s}, {where}', jp, ours_, note=note))

  for key, what in (
    ('magnitude_uniform_0.8', 'magnitude mask, uniform 0.8'),
    ('magnitude_erk_0.8', "magnitude mask, ERK 0.8 (each library's ERK)"),
    ('magnitude_erk_0.8', "magnitude mask, ERK 0.8 (JaxPruner's ERK sparsities for both)"),
    ('magnitude_tied_0.7', 'magnitude mask, uniform 0.7, many tied abs(w)'),
    ('magnitude_round1_0.5', 'magnitude mask, round 1 (0.5)'),
    ('magnitude_round2_0.8', 'magnitude mask, round 2 (0.5 -> 0.8)'),
    ('magnitude_0.999', 'magnitude mask, uniform 0.999 (< 1 weight kept)'),
    ('saliency_uniform_0.8', 'saliency mask abs(w g), uniform 0.8'),
  ):
    our_key = 'magnitude_jp_erk_0.8' if 'for both' in what else key
    rows.append(_mask_row(what, _masks(ref, f'jp/{key}'), _masks(our, f'our/{our_key}')))

  rng = f'our/dst_init/{NAMES[0]}' in our  # ours(ref, rng=False) leaves the random rows out
  if rng:
    init = _masks(ref, 'jp/rigl_init')
    ours_init = _masks(our, 'our/dst_init')
    overlap = sum(int((init[n] & ours_init[n]).sum()) for n in NAMES)
    chance = sum(init[n].sum() * ours_init[n].sum() / init[n].size for n in NAMES)
    rows.append(
      _mask_row(
        'SET/RigL initial random mask, uniform 0.8',
        init,
        ours_init,
        note=f'different RNG; overlap {overlap} active weights, chance {chance:.1f}',
      )
    )

  for algo in ('rigl', 'set'):
    name = algo.upper() if algo == 'set' else 'RigL'
    for k, d in enumerate(DROP_FRACTIONS):
      jp_full = _masks(ref, f'jp/{algo}_update{k}')
      prev = _masks(ref, f'jp/{algo}_init' if k == 0 else f'jp/{algo}_update{k - 1}')
      jp_kept = _masks(ref, f'jp/{algo}_kept{k}')
      our_kept = _masks(our, f'our/{algo}_kept{k}')
      dropped = ', '.join(
        f'{n} {int(prev[n].sum() - jp_kept[n].sum())}/{int(prev[n].sum() - our_kept[n].sum())}'
        for n in NAMES
      )
      rows.append(
        _mask_row(
          f'{name} update {k} (d={d}): weights kept by the drop step',
          jp_kept,
          our_kept,
          note=f'dropped JaxPruner/ours: {dropped}',
        )
      )
      rows.append(
        _mask_row(
          f"{name} update {k}: our selection at JaxPruner's counts",
          jp_full,
          _masks(our, f'our/{algo}_at_jp_counts{k}'),
        )
      )
      if algo == 'set':
        rows.append(
          _mask_row(
            f"SET update {k}: ours on JaxPruner's random scores",
            jp_full,
            _masks(our, f'our/set_on_jp_random{k}'),
          )
        )
        if not rng:
          continue
        our_full = _masks(our, f'our/set_update{k}')
        grown_jp = {n: jp_full[n] & ~jp_kept[n] for n in NAMES}
        grown_our = {n: our_full[n] & ~our_kept[n] for n in NAMES}
        both = sum(int((grown_jp[n] & grown_our[n]).sum()) for n in NAMES)
        chance = sum(grown_jp[n].sum() * grown_our[n].sum() / (~jp_kept[n]).sum() for n in NAMES)
        rows.append(
          _mask_row(
            f'SET update {k}: ours with our RNG',
            jp_full,
            our_full,
            note=(
              f'regrown {sum(int(grown_jp[n].sum()) for n in NAMES)}/'
              f'{sum(int(grown_our[n].sum()) for n in NAMES)}, in both {both}, chance {chance:.1f}'
            ),
          )
        )
      else:
        rows.append(
          _mask_row(f'RigL update {k}: full mask', jp_full, _masks(our, f'our/rigl_update{k}'))
        )

  for partitionable in (True, False) if rng else ():
    jp = np.concatenate(
      [ref[f'jp/set_grow_scores{k}/{n}'].ravel() for k in range(3) for n in NAMES]
    )
    regen = np.concatenate(
      [
        our[f'our/rng_partitionable_{partitionable}{k}/{n}'].ravel()
        for k in range(3)
        for n in NAMES
      ]
    )
    rows.append(
      _value_row(
        f"SET random scores regenerated in current JAX, threefry_partitionable={partitionable}",
        jp,
        regen,
        note="JaxPruner's keys (fold_in(PRNGKey(8), count), split over all leaves)",
      )
    )

  jp_upd, our_upd = ref['jp/schedule_is_update'], our['our/schedule_is_update']
  calls = lambda u: ', '.join(str(c + 1) for c in np.flatnonzero(u))  # noqa: E731
  rows.append(
    dict(
      quantity='polynomial schedule: calls that update the masks',
      max_abs_diff='',
      differing=f'{int((jp_upd != our_upd).sum())} / {jp_upd.size}',
      exact='yes' if np.array_equal(jp_upd, our_upd) else 'no',
      detail=f'JaxPruner: {calls(jp_upd)}; ours: {calls(our_upd)}',
    )
  )
  rows.append(
    _value_row(
      'polynomial schedule: sparsity at each call',
      ref['jp/schedule_sparsity'],
      our['our/schedule_sparsity'],
      atol=1e-6,
    )
  )
  at = lambda s, u: ', '.join(f'{x:.4f}' for x in s[u])  # noqa: E731
  rows.append(
    _value_row(
      'polynomial schedule: sparsity reached at the updates',
      ref['jp/schedule_sparsity'][jp_upd],
      our['our/schedule_sparsity'][our_upd],
      atol=1e-6,
      note=(
        f'JaxPruner: {at(ref["jp/schedule_sparsity"], jp_upd)}; '
        f'ours: {at(our["our/schedule_sparsity"], our_upd)}'
      ),
    )
  )
  rows.append(
    _value_row(
      'drop fraction at each call (JaxPruner: create_updater_from_config)',
      ref['jp/drop_fraction'],
      our['our/drop_fraction'],
      atol=1e-6,
      note=(
        f'at the mask updates, JaxPruner: {at(ref["jp/drop_fraction"], jp_upd)}; '
        f'ours: {at(our["our/drop_fraction"], our_upd)}'
      ),
    )
  )
  return rows


def markdown(rows: list[dict[str, str]], versions: str = '') -> str:
  """The rows as a markdown table."""
  lines = []
  if versions:
    lines.append(f'JaxPruner side: {versions}.\n')
  lines.append('| quantity | max abs diff | differing entries | exact | detail |')
  lines.append('|---|---|---|---|---|')
  for r in rows:
    lines.append(
      f'| {r["quantity"]} | {r["max_abs_diff"]} | {r["differing"]} | {r["exact"]} | {r["detail"]} |'
    )
  return '\n'.join(lines) + '\n'


def load(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('half', choices=('reference', 'compare'))
  parser.add_argument('--out', default='', help=f'folder of {NPZ} (written, or read by compare)')
  parser.add_argument('--ref', default='', help=f'compare: read this .npz instead of OUT/{NPZ}')
  parser.add_argument('--md', default='', help='compare: also write the table here')
  args = parser.parse_args(argv)
  if not (args.out or (args.half == 'compare' and args.ref)):
    parser.error('--out is needed (or --ref for compare)')
  if args.half == 'reference':
    print(f'wrote {reference(args.out)}')
    return 0
  ref = load(args.ref or os.path.join(args.out, NPZ))
  table = markdown(compare(ref, ours(ref)), str(ref.get('meta/versions', '')))
  print(table)
  if args.md:
    with open(args.md, 'w') as f:
      f.write(table)
  return 0


if __name__ == '__main__':
  sys.exit(main())
