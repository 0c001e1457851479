"""idx.py: the IDX reader and the Debian Fashion-MNIST files, sizes and errors checked."""

import gzip

import numpy as np
import pytest

from cmix_jax.data import idx
from cmix_jax.data import specs
from tests import helpers


def test_read_idx_hand_written_files(tmp_path):
  # uint8 [2, 2, 3]: magic 00 00 08 03, dims 2 2 3 as big-endian uint32, then bytes 0..11.
  raw = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3]) + bytes(range(12))
  (tmp_path / 'a-idx3-ubyte').write_bytes(raw)
  (tmp_path / 'a-idx3-ubyte.gz').write_bytes(gzip.compress(raw))
  for name in ('a-idx3-ubyte', 'a-idx3-ubyte.gz'):
    x = idx.read_idx(str(tmp_path / name))
    assert x.dtype == np.uint8 and x.shape == (2, 2, 3)
    assert x[1, 0, 2] == 8 and x[0, 1, 0] == 3
  # int32 [3], big-endian: 1, 256, -2.
  raw = bytes([0, 0, 0x0C, 1, 0, 0, 0, 3]) + b'\x00\x00\x00\x01\x00\x00\x01\x00\xff\xff\xff\xfe'
  (tmp_path / 'b').write_bytes(raw)
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / 'b')), [1, 256, -2])


def test_read_idx_refuses_bad_magic_and_truncation(tmp_path):
  (tmp_path / 'bad').write_bytes(bytes([1, 0, 8, 1, 0, 0, 0, 1, 5]))
  with pytest.raises(ValueError, match='not an IDX file'):
    idx.read_idx(str(tmp_path / 'bad'))
  (tmp_path / 'short').write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 5, 6]))
  with pytest.raises(ValueError, match='truncated'):
    idx.read_idx(str(tmp_path / 'short'))


def test_fashion_mnist_wrong_counts_and_missing_files(tmp_path, monkeypatch):
  helpers.write_fashion_like(tmp_path / 'src', {'train': 12, 'test': 10})
  with pytest.raises(ValueError, match='expected 60000 uint8 28x28 images'):
    idx.read_fashion_mnist(str(tmp_path / 'src'))
  monkeypatch.setattr(specs, 'FASHION_MNIST_DIR', str(tmp_path / 'nowhere'))
  with pytest.raises(specs.DataNotFoundError, match='apt-get install dataset-fashion-mnist'):
    helpers.load_ssl_data('fashion_mnist_debian', str(tmp_path / 'tfds'), 40, 0)
