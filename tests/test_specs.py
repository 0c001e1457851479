"""specs.py: the stored normalisation constants match the data they describe."""

import os

import numpy as np
import pytest

from cmix_jax.data import idx
from cmix_jax.data import specs

REAL_FASHION = all(
  os.path.exists(os.path.join(specs.FASHION_MNIST_DIR, f))
  for f in (
    'train-images-idx3-ubyte.gz',
    'train-labels-idx1-ubyte.gz',
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
  )
)


@pytest.mark.skipif(not REAL_FASHION, reason='Debian package dataset-fashion-mnist not installed')
def test_real_fashion_mnist_files_sizes_balance_and_normalisation_constants():
  arrays = idx.read_fashion_mnist()
  train_x, train_y = arrays['train']
  assert train_x.shape == (60000, 28, 28, 1) and arrays['test'][0].shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(arrays['test'][1]), [1000] * 10)
  mean, std = specs.channel_stats(train_x)
  spec = specs.SPECS['fashion_mnist_debian']
  np.testing.assert_allclose(mean, spec.mean, atol=1e-6)
  np.testing.assert_allclose(std, spec.std, atol=1e-6)
