r"""Rebuilds the reduced CIFAR-10 subset (.npz) from the public binary release.

    curl -O https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz
    python -m scripts.make_cifar10_subset --archive cifar-10-binary.tar.gz \
        --out data/cifar10_subset.npz

Then pass it to a reduced-scale config: ``--config.data.path=data/cifar10_subset.npz``
(or the config argument ``path=``). See :func:`demp.cifar_subset.make_cifar10_subset`.
"""

from absl import app, flags

from tools import cifar_subset

_ARCHIVE = flags.DEFINE_string('archive', None, 'The public cifar-10-binary.tar.gz.')
_OUT = flags.DEFINE_string('out', None, 'The .npz to write.')
_PER_BATCH = flags.DEFINE_integer('per_batch', 1017, 'Images from the start of every batch file.')
flags.mark_flags_as_required(['archive', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  shapes = cifar_subset.make_cifar10_subset(_ARCHIVE.value, _OUT.value, _PER_BATCH.value)
  print(f'wrote {_OUT.value}: ' + ', '.join(f'{k} {v}' for k, v in shapes.items()))


if __name__ == '__main__':
  app.run(main)
