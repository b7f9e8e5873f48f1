r"""DemP on ViT-B/16 over ImageNet: the paper's Table 3 recipe (§4.3, appendix G.2, I.3).

    python -m scripts.train --config configs/vit_b16_imagenet.py:act=gelu \
        --workdir /tmp/demp_vit_b16 --config.data.data_dir=/path/to/tensorflow_datasets

The recipe (TorchVision's ViT-B/16 training, as Lasby et al. 2024 and the
paper): 150 epochs, AdamW (β = 0.9, 0.999, weight decay 0.3), learning rate
warmed up linearly over 16 epochs to 0.003 then cosine to 0, label smoothing
0.11, gradient clipping at global norm 1.0, batches of 256 accumulated 16
times (effective batch 4096, ``optimizer.accumulate_steps``: every schedule
counts optimizer updates), RandAugment (2 ops, magnitude 9), mixup 0.2 or
cutmix 1.0 per batch (``demp.data.augment``), random crop + flip at 224 px. DemP
with λ = 0 and noise only, on the MLP hidden units of every block (attention
and the residual width are not pruned); GELU units die by ε-inactivity
(|a| < 0.01 on every example and token of 2048 training images), ReLU units
(``act=relu``, the "DemP + ReLU" row) by exact zeros. A block's pruning starts
once its live count has not risen for ``patience`` checks (the last block's
units die early and revive, Fig. 17); ``start=mlp_11:20000`` fixes a block's
start step instead (micro-steps).

Differences from the paper, stated: images stay in [0, 1] (no mean/std
normalization: RandAugment reads pixel values, and the ViT's patch embedding
absorbs the scale); the crop is ``data.augment='imagenet'`` (random shorter
side in [256, 480] then a 224 crop), not TorchVision's RandomResizedCrop; the
warm-up starts at 0, not 9.9e-5.

Not runnable on this project's CPU machine: it needs ImageNet in TFDS
(``imagenet2012``, manual download) and accelerators (about 2.8e9 FLOPs per
image per step). ``smoke=True`` shrinks the model and steps to check the
wiring on the real data.

Arguments: ``method`` (dense | demp), ``act`` (gelu | relu), ``noise`` (peak
noise std; the authors' 5e-5), ``patience``, ``every`` (death checks, in optimizer updates),
``start`` (``group:step;group:step``), ``smoke``.
"""

from configs.analysis import parse
from demp.trainer.config import base_config

TRAIN_IMAGES = 1_281_167
EPOCHS = 150
WARMUP_EPOCHS = 16
MICRO_BATCH = 256
ACCUMULATE = 16  # effective batch 4096


def get_config(arg: str | None = None):
  a = parse(
    arg, method='demp', act='gelu', noise=5e-5, patience=3, every=1000, start='', smoke=False
  )
  c = base_config()
  c.method = a['method']
  c.model.name = 'vit'
  c.model.variant = 'B/16'
  c.model.activation = a['act']

  c.data.source = 'tfds'
  c.data.name = 'imagenet2012'
  c.data.train_split = 'train'
  c.data.test_split = 'validation'
  c.data.image_size = 224
  c.data.augment = 'imagenet'
  c.data.normalize = False  # RandAugment works on [0, 1] pixels
  c.batch_augment.randaugment_ops = 2
  c.batch_augment.randaugment_magnitude = 9
  c.batch_augment.mixup_alpha = 0.2
  c.batch_augment.cutmix_alpha = 1.0

  effective = MICRO_BATCH * ACCUMULATE
  updates = round(EPOCHS * TRAIN_IMAGES / effective)  # 46 917
  c.batch_size = MICRO_BATCH
  c.num_steps = updates * ACCUMULATE
  c.label_smoothing = 0.11
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.lr_schedule = 'cosine'
  c.optimizer.lr_kwargs.warmup_steps = round(WARMUP_EPOCHS * TRAIN_IMAGES / effective)  # 5005
  c.optimizer.weight_decay = 0.3
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.accumulate_steps = ACCUMULATE

  c.demp.peak_lambda = 0.0  # noise only (Table 3)
  # The MLP units' own norm scales: they have none, so λ > 0 would penalise nothing (the
  # LayerNorms belong to no prunable unit); give a regex to penalise something else.
  c.demp.penalty_mask = 'groups'
  c.demp.noise_std = a['noise']
  c.prune.every = a['every'] * ACCUMULATE
  c.prune.num_examples = 2048
  c.prune.batch_size = 256
  c.prune.eps = 0.01
  c.prune.revival_patience = a['patience']
  for item in filter(None, a['start'].split(';')):
    group, step = item.split(':')
    c.prune.start_steps[group] = int(step)

  c.log_every = 100
  c.eval_every = 10 * round(TRAIN_IMAGES / MICRO_BATCH)  # every 10 epochs
  c.eval_batch_size = 1024
  if a['smoke']:
    c.model.variant = 'Ti/16'
    c.model.depth = 2
    c.batch_size = 8
    c.optimizer.accumulate_steps = 2
    c.num_steps = 8
    c.optimizer.lr_kwargs.warmup_steps = 1
    c.prune.every = 4
    c.prune.num_examples = 16
    c.prune.batch_size = 16
    c.log_every = 2
    c.eval_every = 0
    c.eval_batch_size = 64
  return c
