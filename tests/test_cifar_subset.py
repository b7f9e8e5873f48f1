"""The CIFAR-10 subset is rebuilt from a (fake) binary release: order, layout, labels."""

import io
import os
import tarfile

import numpy as np
import pytest

from tools import cifar_subset


def _fake_release(path, n=5):
  """Six batch files of ``n`` records; image i of batch b is filled with 10*b + i."""
  with tarfile.open(path, 'w:gz') as tar:
    for b, name in enumerate([f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']):
      records = []
      for i in range(n):
        chw = np.zeros((3, 32, 32), np.uint8)
        chw[0], chw[1], chw[2] = 10 * b + i, 100 + i, 200 + b  # R, G, B planes
        records.append(bytes([(b + i) % 10]) + chw.tobytes())
      raw = b''.join(records)
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(raw)
      tar.addfile(info, io.BytesIO(raw))


def test_subset_takes_the_first_images_of_every_batch_in_file_order(tmp_path):
  archive, out = str(tmp_path / 'cifar.tar.gz'), str(tmp_path / 'sub' / 'subset.npz')
  _fake_release(archive)
  shapes = cifar_subset.make_cifar10_subset(archive, out, per_batch=3)
  assert shapes == {
    'train_images': (15, 32, 32, 3),
    'train_labels': (15,),
    'test_images': (3, 32, 32, 3),
    'test_labels': (3,),
  }
  with np.load(out, allow_pickle=False) as f:
    images, labels = f['train_images'], f['train_labels']
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    # Batch b, image i: R = 10b + i, G = 100 + i, B = 200 + b (HWC after the CHW -> HWC transpose).
    for b in range(5):
      for i in range(3):
        np.testing.assert_array_equal(images[3 * b + i, 5, 7], [10 * b + i, 100 + i, 200 + b])
        assert labels[3 * b + i] == (b + i) % 10
    np.testing.assert_array_equal(f['test_images'][2, 0, 0], [52, 102, 205])


def test_a_wrong_archive_says_what_it_expects(tmp_path):
  archive = str(tmp_path / 'other.tar.gz')
  with tarfile.open(archive, 'w:gz') as tar:
    info = tarfile.TarInfo('readme.txt')
    tar.addfile(info, io.BytesIO(b''))
  with pytest.raises(ValueError, match='binary release') as e:
    cifar_subset.make_cifar10_subset(archive, os.path.join(tmp_path, 'x.npz'))
  assert 'data_batch_1.bin' in str(e.value)
