r"""One prepared check of what only an accelerator can measure (see docs/accelerator.md).

    python -m scripts.accelerator_check --data_path=cifar10_subset.npz --out=/tmp/acc

On the first device JAX sees, within ``--budget_s`` (default 420 s; parts that
would overrun it are skipped with a note): the train-step time of ResNet-18
(CIFAR stem, 32x32) and VGG-16 (64x64) at batch 128, dense and with 25/50/75 %
of the units removed, next to XLA's FLOP ratio, in float32 and bfloat16, with
compile times; one prune event against τ = 1000 / 5000 steps; a short DemP run
against a dense run on the CIFAR-10 subset (ResNet-18 x0.5, ``--real_steps``).
Writes ``<out>/<device>/accelerator_check.{json,md}``. Exits 1 with a message on
a CPU-only JAX unless ``--allow_cpu``, which runs the tiny dry run (widths
x1/16, batch 4, a 4-step real run on a generated .npz when no ``--data_path``)
marked ``"platform": "cpu", "tiny": true``. Exits 1 too when a part failed.
The logic lives in :mod:`tools.accelerator_check`.
"""

import os
import sys
import tempfile

import ml_collections
from absl import app, flags

from configs import resnet18_cifar10_subset
from tools import accelerator_check as check

_OUT = flags.DEFINE_string('out', None, 'Results folder; files go to <out>/<device>/.')
_DATA = flags.DEFINE_string(
  'data_path',
  None,
  'The CIFAR-10 subset .npz of the real run '
  '(none: the real run is skipped; with --allow_cpu a tiny one is made).',
)
_BUDGET = flags.DEFINE_float('budget_s', 420.0, 'Global time budget, checked before every part.')
_ALLOW_CPU = flags.DEFINE_bool(
  'allow_cpu', False, 'On CPU, run the tiny dry run instead of refusing.'
)
_MODELS = flags.DEFINE_list(
  'models', ['resnet18=32', 'vgg16=64'], 'Step-time models as registry name=square image size.'
)
_SPARSITIES = flags.DEFINE_list(
  'sparsities', ['0.25', '0.5', '0.75'], 'Fractions of units removed.'
)
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'], 'Compute dtypes of the step.')
_ROUNDS = flags.DEFINE_integer('rounds', None, 'Interleaved rounds (default: 7; tiny 2).')
_STEPS = flags.DEFINE_integer('steps_per_round', None, 'Steps per round (default: 20; tiny 1).')
_REAL_STEPS = flags.DEFINE_integer('real_steps', 400, 'Steps of each real run (tiny: 4).')
_REAL_EVERY = flags.DEFINE_integer('real_every', 200, 'τ of the real DemP run (tiny: 2).')
_REAL_LAMBDA = flags.DEFINE_float(
  'real_lambda', 5e-2, 'Peak λ of the real DemP run (a short run needs a large one).'
)
_REAL_WIDTH = flags.DEFINE_float('real_width', 0.5, 'ResNet-18 width multiplier of the real run.')
_REAL_MODEL = flags.DEFINE_string(
  'real_model',
  'resnet18',
  'Model of the real run: resnet18 (the '
  'CIFAR-10 subset recipe) or another registry name at its '
  'default kwargs (tests use mlp).',
)
flags.mark_flags_as_required(['out'])


def real_configs(
  data_path: str,
  *,
  tiny: bool,
  steps: int,
  every: int,
  lam: float,
  width: float,
  model: str = 'resnet18',
) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(DemP, dense) configs of the real run: configs/resnet18_cifar10_subset.py, overridden."""
  c = resnet18_cifar10_subset.get_config(f'steps={steps},lam={lam},smoke={tiny}')
  if not tiny:
    c.model.width_multiplier = width
    c.prune.every = every
  if model != 'resnet18':
    c.model = ml_collections.ConfigDict({'name': model})
  c.data.path = data_path
  c.progress_bar = False
  dense = c.copy_and_resolve_references()
  dense.method = 'dense'
  return c, dense


def _pairs(items):
  out = []
  for item in items:
    name, sep, value = item.partition('=')
    if not sep:
      raise app.UsageError(f'--models: expected name=size, got {item!r}.')
    out.append((name, int(value)))
  return tuple(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    info = check.require_accelerator(_ALLOW_CPU.value)
  except check.NoAcceleratorError as e:
    sys.exit(f'accelerator_check: {e}')
  tiny = info['platform'] == 'cpu'
  overrides = {
    'models': _pairs(_MODELS.value),
    'dtypes': tuple(_DTYPES.value),
    'sparsities': tuple(float(s) for s in _SPARSITIES.value),
  }
  if _ROUNDS.value is not None:
    overrides['rounds'] = _ROUNDS.value
  if _STEPS.value is not None:
    overrides['steps_per_round'] = _STEPS.value
  plan = (check.tiny_plan if tiny else check.full_plan)(**overrides)
  with tempfile.TemporaryDirectory() as tmp:
    data_path, note = _DATA.value, ''
    if data_path is None and tiny:
      data_path = check.write_tiny_npz(os.path.join(tmp, 'tiny.npz'))
    elif data_path is None:
      note = 'no --data_path given (the CIFAR-10 subset .npz): real run not measured'
    configs = (
      None
      if data_path is None
      else real_configs(
        data_path,
        tiny=tiny,
        steps=_REAL_STEPS.value,
        every=_REAL_EVERY.value,
        lam=_REAL_LAMBDA.value,
        width=_REAL_WIDTH.value,
        model=_REAL_MODEL.value,
      )
    )
    results = check.run_check(
      plan,
      _OUT.value,
      budget_s=_BUDGET.value,
      allow_cpu=_ALLOW_CPU.value,
      real_configs=configs,
      real_note=note,
    )
  with open(results['files']['md']) as f:
    print(f.read())
  print(f"wrote {results['files']['json']} and {results['files']['md']}")
  failed = [p['name'] for p in results['parts'] if p['status'] == 'failed']
  if failed:
    sys.exit(f'accelerator_check: parts failed: {failed} (errors in the JSON).')


if __name__ == '__main__':
  app.run(main)
