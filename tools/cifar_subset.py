"""The reduced-scale CIFAR-10 subset, rebuilt from the public release.

python -m scripts.make_cifar10_subset --archive cifar-10-binary.tar.gz --out cifar10_subset.npz
"""

from __future__ import annotations

import os

import numpy as np

CIFAR10_BINARY_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
"""The public CIFAR-10 binary release (Krizhevsky, 2009); no pickle involved."""

_CIFAR_RECORD = 1 + 32 * 32 * 3  # a label byte, then 3072 pixel bytes (R, G, B planes)


def _cifar_binary_batch(raw: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
  """Images [N, 32, 32, 3] uint8 (HWC) and labels [N] of one ``data_batch_*.bin``."""
  if len(raw) % _CIFAR_RECORD:
    raise ValueError(
      f'{name}: {len(raw)} bytes is not a whole number of {_CIFAR_RECORD}-byte '
      'CIFAR-10 records; is this the binary release?'
    )
  records = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
  images_nchw = records[:, 1:].reshape(-1, 3, 32, 32)
  return np.ascontiguousarray(images_nchw.transpose(0, 2, 3, 1)), records[:, 0].astype(np.int64)


def make_cifar10_subset(archive: str, out: str, per_batch: int = 1017) -> dict[str, tuple]:
  """Writes the reduced CIFAR-10 subset used by the ``*_cifar10_subset`` configs.

  Train: the first ``per_batch`` images of each of the five training batches
  (``data_batch_1..5``), in file order; test: the first ``per_batch`` images of
  ``test_batch``. With the default 1017 this is 5,085 training and 1,017 test
  images, the file the reduced-scale results were measured on.

  Args:
    archive: the public ``cifar-10-binary.tar.gz`` (:data:`CIFAR10_BINARY_URL`).
    out: the ``.npz`` to write (``train_images``, ``train_labels``,
      ``test_images``, ``test_labels``; see :data:`demp.data.NPZ_LAYOUT`).
    per_batch: images taken from the start of every batch file.

  Returns:
    ``{array name: shape}`` of what was written.
  """
  import tarfile  # pylint: disable=g-import-not-at-top

  if per_batch < 1:
    raise ValueError(f'per_batch={per_batch!r} must be >= 1.')
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  found = {}
  with tarfile.open(archive, 'r:gz') as tar:
    for member in tar.getmembers():
      base = os.path.basename(member.name)
      if base in names and member.isfile():
        found[base] = tar.extractfile(member).read()
  missing = [n for n in names if n not in found]
  if missing:
    raise ValueError(
      f'{archive!r} lacks {missing}: expected the CIFAR-10 binary release ({CIFAR10_BINARY_URL}).'
    )
  batches = {n: _cifar_binary_batch(found[n], n) for n in names}
  for n, (images, _) in batches.items():
    if len(images) < per_batch:
      raise ValueError(f'{n} holds {len(images)} images, fewer than per_batch={per_batch}.')
  train = [batches[n] for n in names[:5]]
  arrays = {
    'train_images': np.concatenate([x[:per_batch] for x, _ in train]),
    'train_labels': np.concatenate([y[:per_batch] for _, y in train]),
    'test_images': batches['test_batch.bin'][0][:per_batch],
    'test_labels': batches['test_batch.bin'][1][:per_batch],
  }
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  np.savez(out, **arrays)
  return {k: v.shape for k, v in arrays.items()}
