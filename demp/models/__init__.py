"""Models, one file per family. ``MODELS[name](num_classes=..., **kwargs)`` builds one.

Every model takes ``(x_bhwc, *, train)``, returns logits, sows the
post-activations of its units (``demp.deadunits.probe``), and exports
``widths`` (group name -> width) and ``unit_groups()`` for the surgery.
"""

from collections.abc import Callable

import flax.linen as nn

from demp import auto
from demp.models import convnet, mlp, resnet, vgg, vit

MODELS: dict[str, Callable[..., nn.Module]] = {
  'mlp': mlp.make,
  'convnet': convnet.make,
  'resnet18': resnet.make_resnet18,
  'resnet50': resnet.make_resnet50,
  'vgg16': vgg.make,
  'vit': vit.make,
  'auto': auto.make,  # a user's module by import path: model.module='pkg.mod:Class'
}


def build(name: str, num_classes: int, **kwargs) -> nn.Module:
  if name not in MODELS:
    raise ValueError(f'model.name={name!r} is not one of {sorted(MODELS)}.')
  return MODELS[name](num_classes=num_classes, **kwargs)


def from_config(model_config, num_classes: int) -> nn.Module:
  """The model ``config.model`` describes (``name`` plus the factory's keyword arguments).

  The one place a model is built from a config: the trainer, the checkpoint
  loader, the analysis methods, the baselines and the benchmarks call it.
  """
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  return build(model_config['name'], num_classes, **kwargs)
