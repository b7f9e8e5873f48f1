r"""DemP on a small ViT's MLP blocks over the local CIFAR-10 subset (paper §4.3, reduced).

    python -m scripts.train --config configs/vit_cifar10_subset.py:act=gelu \
        --workdir /tmp/demp_vit_gelu
    python -m scripts.train --config configs/vit_cifar10_subset.py:act=relu \
        --workdir /tmp/demp_vit_relu
    python -m scripts.plot_live_units /tmp/demp_vit_gelu/metrics.jsonl docs/figures/vit_live.png

ViT with 4 pre-norm blocks, width 128, 4 heads, MLP 512, patch 4 on 32x32
(64 patches + a class token); AdamW with a warm-up-then-cosine learning rate,
weight decay, clipping 1.0 and label smoothing, as the ViT-B/16 recipe; λ = 0
and noise only (the paper's ViT setting); the death check (GELU:
ε-inactivity |a| < 0.01 on every example and token; ReLU: exact zero) every
``every`` steps on 512 training images, revival-aware start with patience
``patience`` (0 = plain DemP). ``aug=True`` adds the recipe's RandAugment
(2 ops, magnitude 9) and mixup 0.2 / cutmix 1.0 (images then stay in [0, 1]).
The data is ``data.path`` (no default: pass it by flag; ``python -m scripts.make_cifar10_subset`` builds it from the public CIFAR-10 release). ``smoke=True`` shrinks everything to seconds.

Arguments: ``method`` (dense | demp), ``act`` (gelu | relu), ``noise`` (peak
noise std), ``lr``, ``steps``, ``batch``, ``every`` (τ), ``patience``,
``dim``, ``depth``, ``heads``, ``mlp``, ``aug``, ``accumulate``, ``smoke``.
"""

from configs.analysis import parse
from demp.trainer.config import base_config

DEFAULT_PATH = None  # by flag: --config.data.path=...


def get_config(arg: str | None = None):
  a = parse(
    arg,
    method='demp',
    act='gelu',
    noise=1e-3,
    lr=1e-3,
    steps=600,
    batch=64,
    every=50,
    patience=2,
    dim=128,
    depth=4,
    heads=4,
    mlp=512,
    aug=False,
    accumulate=1,
    smoke=False,
  )
  c = base_config()
  c.method = a['method']
  c.model.name = 'vit'
  c.model.hidden_dim = a['dim']
  c.model.depth = a['depth']
  c.model.num_heads = a['heads']
  c.model.mlp_dim = a['mlp']
  c.model.patch_size = 4
  c.model.activation = a['act']

  c.data.source = 'npz'
  c.data.name = 'cifar10'
  c.data.path = DEFAULT_PATH
  c.data.augment = 'crop_flip'
  c.data.normalize = not a['aug']  # RandAugment reads pixel values in [0, 1]
  if a['aug']:
    c.batch_augment.randaugment_ops = 2
    c.batch_augment.randaugment_magnitude = 9
    c.batch_augment.mixup_alpha = 0.2
    c.batch_augment.cutmix_alpha = 1.0

  c.batch_size = a['batch']
  c.num_steps = a['steps']
  c.label_smoothing = 0.1
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = a['lr']
  c.optimizer.lr_schedule = 'cosine'
  c.optimizer.lr_kwargs.warmup_steps = max(1, a['steps'] // (10 * a['accumulate']))
  c.optimizer.weight_decay = 0.05
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.accumulate_steps = a['accumulate']

  c.demp.peak_lambda = 0.0  # noise only, as the paper's ViT runs
  # The MLP units' own norm scales: they have none, so λ > 0 would penalise nothing (the
  # LayerNorms belong to no prunable unit); give a regex to penalise something else.
  c.demp.penalty_mask = 'groups'
  c.demp.noise_std = a['noise']
  c.prune.every = a['every']
  c.prune.num_examples = 512
  c.prune.batch_size = 128
  c.prune.eps = 0.01
  c.prune.revival_patience = a['patience']

  c.log_every = 25
  c.eval_batch_size = 256
  if a['smoke']:
    c.model.hidden_dim, c.model.depth, c.model.num_heads, c.model.mlp_dim = 32, 2, 2, 64
    c.batch_size = 16
    c.num_steps = 6
    c.optimizer.lr_kwargs.warmup_steps = 1
    c.prune.every = 2
    c.prune.num_examples = 32
    c.prune.batch_size = 32
    c.log_every = 2
    c.eval_batch_size = 64
    c.progress_bar = False
  return c
