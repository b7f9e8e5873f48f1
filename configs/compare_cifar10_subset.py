r"""Dense, DemP and every structured baseline and NEq on the CIFAR-10 subset: one recipe.

    PYTHONPATH=. python -m scripts.compare --workdir /tmp/compare          # the whole table
    PYTHONPATH=. python -m scripts.train --config configs/compare_cifar10_subset.py:method=snap \
        --workdir /tmp/snap                                                # one row

The recipe of ``configs/analysis/convnet_cifar10_subset.py`` (ConvNet
32-64-128-256, AdamW 5e-3 one-cycle, weight decay 5e-4, batch 128, crop+flip,
600 steps, ``data.path`` = the ``path`` argument, no default), for every
method with the same steps and seed, plus ``config.baselines``.

Arguments: ``method``, ``steps``, ``seed``, ``lam`` (DemP's peak λ), ``width``
(multiplier of the ConvNet's widths), ``target``
and ``kind`` (the baselines' ``target_sparsity`` / ``target_kind``;
``scripts.compare`` sets them to DemP's weight sparsity), ``steer`` (True: DemP too
steers its λ to ``target`` / ``kind`` with ``demp.target_sparsity`` /
``demp.target_kind``, so every method aims at the same sparsity; a target brings the
reacting recipe: 48 death checks a run (τ = steps // 48) unless ``every`` is given;
see docs/target.md),
``fallback`` (the
early variants' fallback epoch; 0 = half the run), ``eps`` / ``mu`` (NEq),
``p`` (``neq_stochastic``'s frozen fraction), ``opt`` (adamw | sgd) / ``lr`` /
``every`` (τ) as in the analysis config, ``path`` (the .npz), ``constant``
(True: DemP also removes units constant over the check set, their constant
folded into the consumer: ``prune.remove_constant``; the short-run candidate
recipe is ``method=demp,steps=1200,width=0.5,lam=0.04,constant=True``, see
docs/results.md), ``offset`` (κ of ``demp.offset_penalty``: positive BN offsets
penalised at κ·λ_t, turning constant units into dead ones; beyond the paper), ``scale_lam`` (True: ``lam`` is the peak λ of a 1200-step run, and
the run uses ``lam · (1200 / steps)^0.35``: the measured λ-transfer rule of this recipe,
see ``LAMBDA_EXPONENT``), ``smoke``. The
unstructured baselines (``magnitude``, ``rigl``, ...) read ``target`` over their
pruned weights and update their masks every ``steps // 24`` steps.
"""

from baselines import config as baselines_config
from baselines import sparse
from configs import common
from configs.analysis import convnet_cifar10_subset, parse

DEFAULTS = dict(
  method='dense',
  steps=600,
  seed=0,
  lam=3e-2,
  width=1.0,
  target=0.5,
  kind='units',
  steer=False,
  fallback=0,
  eps=1e-3,
  mu=0.5,
  p=0.2,
  opt='adamw',
  lr=5e-3,
  every=0,  # τ; 0 = 100, or steps // 48 with steer=True (the reacting recipe's)
  path='',
  constant=False,
  offset=0.0,
  scale_lam=False,
  smoke=False,
)

REFERENCE_STEPS = 1200
LAMBDA_EXPONENT = 0.35
"""The measured λ-transfer exponent of this recipe (ConvNet width 0.5, AdamW 5e-3
one-cycle, coupled Lasso on the BN scales, τ = 100, noise std 5e-5): the weight
sparsity is closest to one function of ``λ·T^a`` over 600, 1200 and 2400 steps at
``a = 0.35`` (``python -m experiments.lambda_transfer``, docs/recipes.md "λ across run
lengths"). A power law is a rough fit: most of the shift is between 600 and 1200 steps,
little between 1200 and 2400. ``a = 0`` (no transfer) and ``a = 1`` (the integrated
penalty) fit worse.
"""


def lambda_for_steps(lam: float, steps: int, reference: int = REFERENCE_STEPS) -> float:
  """The peak λ at ``steps`` that prunes like ``lam`` at ``reference`` steps: ``lam·(ref/steps)^a``."""
  return lam * (reference / steps) ** LAMBDA_EXPONENT


def get_config(arg: str | None = None):
  args = parse(arg, **DEFAULTS)
  if args['scale_lam']:
    args['lam'] = lambda_for_steps(args['lam'], args['steps'])
  c = convnet_cifar10_subset.build(
    parse(
      f"method={args['method']},steps={args['steps']},lam={args['lam']},width={args['width']},"
      f"opt={args['opt']},lr={args['lr']},every={args['every'] or 100},smoke={args['smoke']}",
      **convnet_cifar10_subset.DEFAULTS,
    )
  )
  c.seed = args['seed']
  if args['steer']:  # DemP aims at the baselines' target too (the reacting recipe by default)
    c.demp.target_sparsity, c.demp.target_kind = float(args['target']), args['kind']
    c.demp.target_every = args['every']  # an explicit τ wins over the recipe's (0: the recipe's)
  c.data.path = args['path'] or None
  c.prune.remove_constant = bool(args['constant'])  # also remove constant units (folded)
  c.demp.offset_penalty = float(args['offset'])  # κ on positive BN offsets (beyond the paper)
  b = baselines_config.default_config()
  # The unstructured baselines' keys too; their masks change every steps/24 steps (the
  # DemP authors' 500 is for ~100k-step runs): 12 mask updates in the 0.3T..0.8T window.
  for key, value in sparse.default_config().items():
    if key not in b:
      b[key] = value
  b.update_every = max(1, args['steps'] // 24)
  common.aim_baselines(b, args['target'], args['kind'], args['method'])
  b.eps = args['eps']
  b.mu_eq = args['mu']
  b.stochastic_fraction = args['p']
  if args['smoke']:
    b.score_batches = 2
    b.score_batch_size = 16
    b.steps_per_epoch = 2
    b.holdout_fraction = 0.004
  b.fallback_epoch = args['fallback']
  c.baselines = b
  if args['method'] == 'neq':  # NEq's measurement slice, held out from training (1 %)
    c.data.holdout = 16 if args['smoke'] else 51
  return c
