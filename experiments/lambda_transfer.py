r"""How DemP's useful λ moves with the run length: a measured transfer rule.

    python -m experiments.lambda_transfer --runs 'results/fidelity/convnet_adam/*demp*' \
        --runs 'results/fidelity/convnet_adam_length/*'

Reads finished DemP runs (``summary.json`` + ``config.json``: peak λ, steps,
final weight sparsity) of one recipe at several run lengths ``T`` and finds the
exponent ``a`` for which the weight sparsity is one function of ``λ·T^a``:
for each ``a`` on a grid, the sparsity is fitted as a logistic in
``log(λ·T^a)`` and the residual is measured; the best ``a`` is the rule
``λ(T) = λ(T0) · (T0 / T)^a`` (same sparsity at another length). ``a = 1``
would mean the integrated penalty sets the sparsity; ``a = 0``, the peak λ alone.

The rule holds within one recipe family (model, data, optimizer, lr schedule
shape, τ, noise); it says nothing across families.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import app, flags

EXPONENTS = np.round(np.arange(0.0, 1.501, 0.05), 2)


def load_points(
  patterns: Sequence[str], min_accuracy: float = 0.2
) -> list[tuple[float, int, float]]:
  """``(peak λ, steps, weight sparsity)`` of every finished DemP run matched by ``patterns``.

  Collapsed runs (test accuracy below ``min_accuracy``, e.g. chance) are left
  out: a network that lost a whole layer's signal keeps its constant units and
  prunes *less* than its λ predicts (docs/results.md, constant units).
  """
  points = []
  for pattern in patterns:
    for run in sorted(glob.glob(pattern)):
      summary, config = (os.path.join(run, f) for f in ('summary.json', 'config.json'))
      if not (os.path.exists(summary) and os.path.exists(config)):
        continue
      with open(config) as f:
        c = json.load(f)
      if c.get('method') != 'demp':
        continue
      with open(summary) as f:
        s = json.load(f)
      if s['test_accuracy'] >= min_accuracy:
        points.append((float(c['demp']['peak_lambda']), int(c['num_steps']), s['weight_sparsity']))
  return points


def _logistic_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
  """``(rms, k, m)`` of the best ``y = 1 / (1 + exp(-k (log x - m)))`` (grid over k, m)."""
  lx = np.log(x)
  best = (np.inf, 0.0, 0.0)
  for k in np.linspace(0.2, 8.0, 40):
    for m in np.linspace(lx.min() - 1.0, lx.max() + 1.0, 60):
      r = y - 1.0 / (1.0 + np.exp(-k * (lx - m)))
      best = min(best, (float(np.sqrt(np.mean(r**2))), float(k), float(m)))
  return best


def _kept(points, max_sparsity: float):
  pts = [(lam, t, s) for lam, t, s in points if s <= max_sparsity]
  if len({t for _, t, _ in pts}) < 2:
    raise ValueError(
      f'fit_exponent needs runs at 2 or more lengths; got {sorted({t for _, t, _ in pts})}.'
    )
  return (np.asarray(v, np.float64) for v in zip(*pts))


def fit_exponent(points, exponents=EXPONENTS, max_sparsity: float = 0.95) -> dict:
  """The exponent ``a`` making sparsity one logistic function of ``λ·T^a``.

  Runs whose sparsity exceeds ``max_sparsity`` are left out (a collapsed run
  prunes less than its λ predicts: see the constant units in docs/results.md).

  Returns:
    ``{'exponent': a, 'residual': rms, 'residuals': {a: rms}, 'points': n,
    'k': slope, 'm': log-midpoint}`` (the logistic at the best ``a``).
  """
  lam, steps, y = _kept(points, max_sparsity)
  fits = {float(a): _logistic_fit(lam * steps**a, y) for a in exponents}
  a = min(fits, key=lambda e: fits[e][0])
  rms, k, m = fits[a]
  return {
    'exponent': a,
    'residual': rms,
    'residuals': {e: f[0] for e, f in fits.items()},
    'points': len(y),
    'k': k,
    'm': m,
  }


def lambda_for(target: float, steps: int, fit: dict) -> float:
  """The peak λ the fitted curve predicts for weight sparsity ``target`` at ``steps``.

  Inverts ``target = 1 / (1 + exp(-k (log(λ·T^a) - m)))``: the feed-forward
  answer to "which λ gives 70 % of the weights removed in 1200 steps", read off
  the recipe's own sweep (one run instead of a λ search).
  """
  if not 0 < target < 1:
    raise ValueError(f'target={target!r} must be in (0, 1).')
  x = np.exp(fit['m'] + np.log(target / (1 - target)) / fit['k'])
  return float(x / steps ** fit['exponent'])


def _define_flags() -> None:
  flags.DEFINE_multi_string('runs', None, 'Glob(s) of run directories (summary.json, config.json).')
  flags.DEFINE_float('max_sparsity', 0.95, 'Leave out runs pruned beyond this.')
  flags.DEFINE_float('min_accuracy', 0.2, 'Leave out collapsed runs (test accuracy below this).')
  flags.DEFINE_float('target_sparsity', None, 'Also print the λ the fit predicts for this.')
  flags.DEFINE_integer('steps', 1200, 'The run length for --target_sparsity.')
  flags.mark_flags_as_required(['runs'])


def main(argv):
  del argv
  points = load_points(flags.FLAGS.runs, flags.FLAGS.min_accuracy)
  print('| peak λ | steps | weight sparsity |\n|---|---|---|')
  for lam, t, s in sorted(points, key=lambda p: (p[1], p[0])):
    print(f'| {lam:g} | {t} | {s:.3f} |')
  fit = fit_exponent(points, max_sparsity=flags.FLAGS.max_sparsity)
  print(
    f"\nbest exponent a = {fit['exponent']:.2f} (rms {fit['residual']:.3f}, {fit['points']} runs);"
  )
  print(
    'rms at a = '
    + ', '.join(
      f'{a:g}: {r:.3f}' for a, r in fit['residuals'].items() if a in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
  )
  print(f"rule: λ(T) = λ(T0) · (T0 / T)^{fit['exponent']:.2f}")
  f = flags.FLAGS
  if f.target_sparsity is not None:
    lam = lambda_for(f.target_sparsity, f.steps, fit)
    print(f'λ for {f.target_sparsity:g} of the weights in {f.steps} steps: {lam:.4g}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
