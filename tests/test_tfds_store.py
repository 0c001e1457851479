"""tfds_store.py: a data set is stored once, interrupted stores are rebuilt, stale temp dirs go."""

import os
import socket
import subprocess
import sys

import numpy as np

from cmix_jax.data import idx
from cmix_jax.data import specs
from cmix_jax.data import tfds_store
from tests import helpers


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_fashion_mnist_stored_on_first_use_read_back_and_interrupted_store_rebuilt(
  tmp_path, monkeypatch
):
  counts = {'train': 30, 'test': 20}
  arrays = helpers.write_fashion_like(tmp_path / 'src', counts)
  monkeypatch.setattr(specs, 'FASHION_MNIST_DIR', str(tmp_path / 'src'))
  monkeypatch.setattr(idx, 'FASHION_MNIST_COUNTS', counts)
  data_dir = str(tmp_path / 'tfds')
  # Leftovers of an interrupted attempt: a partial target and a dead process's temp dir.
  partial = os.path.join(data_dir, 'fashion_mnist_debian', '1.0.0')
  os.makedirs(partial)
  open(os.path.join(partial, 'half-written.array_record'), 'w').close()
  stale = os.path.join(
    data_dir, f'.incomplete-fashion_mnist_debian.{socket.gethostname()}.{_dead_pid()}.abcd'
  )
  os.makedirs(stale)
  assert not tfds_store.is_stored(data_dir, 'fashion_mnist_debian')

  data = helpers.load_ssl_data('fashion_mnist_debian', data_dir, num_labels=10, seed=0)
  assert tfds_store.is_stored(data_dir, 'fashion_mnist_debian')
  assert sorted(os.listdir(data_dir)) == ['fashion_mnist_debian']  # stale temp dir removed
  assert not os.path.exists(os.path.join(partial, 'half-written.array_record'))
  assert data.spec.image_shape == (28, 28, 1) and data.num_classes == 10
  np.testing.assert_array_equal(data.train_images.get(np.arange(30))[..., 0], arrays['train'][0])
  np.testing.assert_array_equal(data.train_labels, arrays['train'][1])
  np.testing.assert_array_equal(data.test_images.get(np.arange(20))[..., 0], arrays['test'][0])
  np.testing.assert_array_equal(data.test_labels, arrays['test'][1])
  assert data.train_labels.dtype == np.int32 and data.num_unlabeled == 30
  info = os.path.join(partial, 'dataset_info.json')
  before = os.stat(info).st_mtime_ns
  again = helpers.load_ssl_data('fashion_mnist_debian', data_dir, num_labels=10, seed=0)
  assert os.stat(info).st_mtime_ns == before  # stored once
  np.testing.assert_array_equal(again.labeled_idx, data.labeled_idx)
