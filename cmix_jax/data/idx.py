"""IDX files (the MNIST format) and the Debian Fashion-MNIST files read from them.

The Debian package dataset-fashion-mnist ships the four gzipped IDX files; `read_fashion_mnist`
checks their sizes and labels so a broken install fails here, not mid-training.
"""

import gzip
import struct

import numpy as np

from cmix_jax import storage
from cmix_jax.data import specs

FASHION_MNIST_COUNTS = {'train': 60_000, 'test': 10_000}

_IDX_DTYPES = {
  0x08: np.uint8,
  0x09: np.int8,
  0x0B: np.dtype('>i2'),
  0x0C: np.dtype('>i4'),
  0x0D: np.dtype('>f4'),
  0x0E: np.dtype('>f8'),
}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped or not): magic 0,0,dtype,ndim; big-endian uint32 dims; data."""
  raw = storage.as_path(path).read_bytes()
  if raw[:2] == b'\x1f\x8b':
    raw = gzip.decompress(raw)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
    raise ValueError(f'{path} is not an IDX file (bad magic number {raw[:4].hex()}).')
  dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
  dims = struct.unpack(f'>{ndim}I', raw[4 : 4 + 4 * ndim])
  expected = 4 + 4 * ndim + int(np.prod(dims)) * dtype.itemsize
  if len(raw) != expected:
    raise ValueError(
      f'{path}: header says dims {dims} ({expected} bytes) but the file has '
      f'{len(raw)} bytes; the file is truncated or corrupt, reinstall it.'
    )
  data = np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)
  return data.astype(dtype.newbyteorder('='))  # native byte order, writable copy


def read_fashion_mnist(
  source_dir: str = specs.FASHION_MNIST_DIR, expected_counts: dict[str, int] | None = None
) -> dict:
  """{'train'|'test': (uint8 [N, 28, 28, 1], int64 [N])} from the IDX files, sizes checked."""
  expected_counts = FASHION_MNIST_COUNTS if expected_counts is None else expected_counts
  out = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    paths = [
      storage.as_path(source_dir) / f'{prefix}-{kind}-ubyte.gz'
      for kind in ('images-idx3', 'labels-idx1')
    ]
    missing = [p for p in paths if not p.exists()]
    if missing:
      raise specs.DataNotFoundError(
        f'Fashion-MNIST file {missing[0]} is missing: '
        + specs.SPECS['fashion_mnist_debian'].how_to_get
      )
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    n = expected_counts[split]
    if images.shape != (n, 28, 28) or images.dtype != np.uint8 or labels.shape != (n,):
      raise ValueError(
        f'Fashion-MNIST {split}: expected {n} uint8 28x28 images and {n} '
        f'labels, got images {images.dtype} {images.shape} and labels '
        f'{labels.shape}; reinstall dataset-fashion-mnist.'
      )
    if labels.min() < 0 or labels.max() > 9:
      raise ValueError(f'Fashion-MNIST {split}: labels outside 0..9; reinstall the package.')
    out[split] = (images[..., None], labels.astype(np.int64))
  return out
