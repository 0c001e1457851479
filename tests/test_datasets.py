"""datasets.py: IDX reader, TFDS storing/reading, missing-data errors, sources, SSL view."""

import dataclasses
import gzip
import os
import socket
import struct
import subprocess
import sys

import numpy as np
import pytest

from cmix_jax.data import fake_data
from cmix_jax.data import idx
from cmix_jax.data import image_sources
from cmix_jax.data import specs
from cmix_jax.data import tfds_read
from cmix_jax.data import tfds_store
from tests import helpers

REAL_FASHION = all(
  os.path.exists(os.path.join(specs.FASHION_MNIST_DIR, f))
  for f in (
    'train-images-idx3-ubyte.gz',
    'train-labels-idx1-ubyte.gz',
    't10k-images-idx3-ubyte.gz',
    't10k-labels-idx1-ubyte.gz',
  )
)


def _idx_bytes(array: np.ndarray, code: int) -> bytes:
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(array.dtype.newbyteorder('>')).tobytes()


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


def _write_fashion_like(directory, counts, seed=0):
  """Small Fashion-MNIST-style IDX files (Debian names); returns the arrays written."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for split, prefix in (('train', 'train'), ('test', 't10k')):
    n = counts[split]
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    with open(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), 'wb') as f:
      f.write(gzip.compress(_idx_bytes(images, 0x08)))
    with open(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), 'wb') as f:
      f.write(gzip.compress(_idx_bytes(labels, 0x08)))
    arrays[split] = (images, labels)
  return arrays


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_fashion_mnist_stored_on_first_use_read_back_and_interrupted_store_rebuilt(
  tmp_path, monkeypatch
):
  counts = {'train': 30, 'test': 20}
  arrays = _write_fashion_like(tmp_path / 'src', counts)
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


def test_fashion_mnist_wrong_counts_and_missing_files(tmp_path, monkeypatch):
  _write_fashion_like(tmp_path / 'src', {'train': 12, 'test': 10})
  with pytest.raises(ValueError, match='expected 60000 uint8 28x28 images'):
    idx.read_fashion_mnist(str(tmp_path / 'src'))
  monkeypatch.setattr(specs, 'FASHION_MNIST_DIR', str(tmp_path / 'nowhere'))
  with pytest.raises(specs.DataNotFoundError, match='apt-get install dataset-fashion-mnist'):
    helpers.load_ssl_data('fashion_mnist_debian', str(tmp_path / 'tfds'), 40, 0)


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


@pytest.mark.parametrize('name', ['cifar10', 'svhn_cropped', 'imagenet2012'])
def test_missing_data_set_gives_one_clear_error(name, tmp_path):
  data_dir = str(tmp_path / 'empty')
  with pytest.raises(specs.DataNotFoundError, match=f'tfds build {name} --data_dir') as info:
    helpers.load_ssl_data(name, data_dir, 40, 0)
  assert info.value.__context__ is None and info.value.__cause__ is None  # no TFDS traceback
  # A version folder without dataset_info.json (an unfinished copy) goes through TFDS.
  os.makedirs(os.path.join(data_dir, name, '9.9.9'))
  with pytest.raises(specs.DataNotFoundError, match=f'tfds build {name}') as info:
    helpers.load_ssl_data(name, data_dir, 40, 0)
  assert info.value.__context__ is None and info.value.__cause__ is None


def test_unknown_name_is_refused():
  with pytest.raises(ValueError, match='unknown data set .mnist_typo.*npz:PATH'):
    helpers.load_ssl_data('mnist_typo', '', 40, 0)


def test_random_access_source_decodes_resizes_and_caches_labels(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (7, 6, 10, 3), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2, 0])
  data_dir = str(tmp_path)
  tfds_store.store_arrays('wide_images', data_dir, {'train': (images, labels)}, num_classes=3)
  spec = specs.DatasetSpec(
    name='wide',
    tfds_name='wide_images',
    num_classes=3,
    image_shape=(4, 4, 3),
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
    in_memory=False,
    resize=True,
  )
  builder = tfds_read.open_builder(spec, data_dir)
  source, got_labels = tfds_read.open_split(builder, spec, 'train')
  assert isinstance(source, image_sources.TfdsImageSource) and len(source) == 7
  np.testing.assert_array_equal(got_labels, labels)
  assert os.path.exists(
    os.path.join(tfds_store.stored_dir(data_dir, 'wide_images'), 'cmix_labels_train.npy')
  )
  got = source.get(np.array([5, 0, 5]))
  assert got.shape == (3, 4, 4, 3) and got.dtype == np.uint8
  for row, i in enumerate([5, 0, 5]):
    np.testing.assert_array_equal(
      got[row], image_sources.resize_shorter_center_crop(images[i], (4, 4))
    )


def test_tfrecord_store_reads_in_memory_and_refuses_random_access(tmp_path):
  import tensorflow_datasets as tfds

  images = np.random.default_rng(2).integers(0, 256, (9, 5, 5, 3), dtype=np.uint8)
  features = tfds.features.FeaturesDict(
    {
      'image': tfds.features.Image(shape=(5, 5, 3)),
      'label': tfds.features.ClassLabel(num_classes=3),
    }
  )
  tfds.dataset_builders.store_as_tfds_dataset(
    name='tfrecord_images',
    version='1.0.0',
    features=features,
    split_datasets={'train': [(i, {'image': images[i], 'label': i % 3}) for i in range(9)]},
    data_dir=str(tmp_path),
    file_format='tfrecord',
    disable_shuffling=True,
  )
  spec = specs.DatasetSpec(
    name='t',
    tfds_name='tfrecord_images',
    num_classes=3,
    image_shape=(5, 5, 3),
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
  )
  builder = tfds_read.open_builder(spec, str(tmp_path))
  x, y = tfds_read.read_split(builder, 'train', (5, 5, 3))
  np.testing.assert_array_equal(x, images)
  np.testing.assert_array_equal(y, np.arange(9) % 3)
  with pytest.raises(specs.DataNotFoundError, match='--file_format=array_record'):
    tfds_read.open_split(builder, dataclasses.replace(spec, in_memory=False), 'train')


def test_resize_shorter_side_and_center_crop_by_hand():
  image = np.tile(np.arange(8, dtype=np.uint8), (4, 1))[..., None]  # [4, 8, 1], value = column
  # Shorter side already 4: no resize, keep the middle columns 2..5.
  np.testing.assert_array_equal(
    image_sources.resize_shorter_center_crop(image, (4, 4)), image[:, 2:6]
  )
  flat = np.full((2, 4, 3), 77, np.uint8)
  out = image_sources.resize_shorter_center_crop(flat, (4, 4))  # upscale x2 to 4x8, crop 4x4
  assert out.shape == (4, 4, 3) and np.all(out == 77)


def test_subset_and_concat_sources_map_indices():
  a = image_sources.ArrayImageSource(np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1))
  b = image_sources.ArrayImageSource(np.arange(100, 103, dtype=np.uint8).reshape(3, 1, 1, 1))
  sub = image_sources.SubsetImageSource(a, np.array([4, 1, 3]))
  cat = image_sources.ConcatImageSource([sub, b])
  assert len(sub) == 3 and len(cat) == 6
  np.testing.assert_array_equal(cat.get(np.array([5, 0, 3, 1, 5])).ravel(), [102, 4, 100, 1, 102])
  with pytest.raises(ValueError, match='uint8'):
    image_sources.ArrayImageSource(np.zeros((2, 3, 3, 1), np.float32))


FAKE = dict(num_train=40, num_test=12, image_shape=(6, 6, 3), num_classes=4, seed=3)


def test_fake_data_is_deterministic_and_balanced():
  a, b = fake_data.make_fake(**FAKE), fake_data.make_fake(**FAKE)
  np.testing.assert_array_equal(a['train'][0], b['train'][0])
  np.testing.assert_array_equal(np.bincount(a['train'][1]), [10] * 4)
  assert not np.array_equal(a['train'][0], fake_data.make_fake(**dict(FAKE, seed=4))['train'][0])


def test_ssl_view_unlabeled_excludes_validation_and_optionally_labeled():
  data = helpers.load_ssl_data('fake', '', 8, seed=0, val_size=4, fake_kwargs=FAKE)
  assert data.num_labeled == 8 and len(data.val_idx) == 4 and data.num_classes == 4
  assert data.spec.image_shape == (6, 6, 3)
  assert len(np.intersect1d(data.val_idx, data.labeled_idx)) == 0
  np.testing.assert_array_equal(data.unlabeled_train_idx, np.setdiff1d(np.arange(40), data.val_idx))
  assert data.num_unlabeled == 36
  assert np.all(np.isin(data.labeled_idx, data.unlabeled_train_idx))  # include_lb_to_ulb
  j = np.array([0, 35, 7])
  np.testing.assert_array_equal(
    data.unlabeled_images.get(j), data.train_images.get(data.unlabeled_train_idx[j])
  )
  np.testing.assert_array_equal(data.unlabeled_labels, data.train_labels[data.unlabeled_train_idx])
  np.testing.assert_array_equal(data.labeled_images(), data.train_images.get(data.labeled_idx))
  np.testing.assert_array_equal(np.bincount(data.labeled_labels), [2] * 4)
  strict = helpers.load_ssl_data(
    'fake', '', 8, seed=0, val_size=4, include_lb_to_ulb=False, fake_kwargs=FAKE
  )
  assert strict.num_unlabeled == 28
  assert not np.any(np.isin(strict.labeled_idx, strict.unlabeled_train_idx))


def test_extra_unlabeled_split_is_appended_with_unknown_labels():
  data = helpers.load_ssl_data('fake', '', 8, seed=0, fake_kwargs=dict(FAKE, num_unlabeled=5))
  assert data.num_unlabeled == 45
  np.testing.assert_array_equal(data.unlabeled_labels[40:], [-1] * 5)
  np.testing.assert_array_equal(data.unlabeled_labels[:40], data.train_labels)
  extra = fake_data.make_fake(**dict(FAKE, num_unlabeled=5))['unlabeled'][0]
  np.testing.assert_array_equal(data.unlabeled_images.get(np.arange(40, 45)), extra)


def test_unlabeled_subset_is_class_balanced_seeded_keeps_labeled_and_maps_images():
  fake = dict(FAKE, num_train=80)
  data = helpers.load_ssl_data(
    'fake', '', 8, seed=0, val_size=4, fake_kwargs=fake, unlabeled_size=20
  )
  assert data.num_unlabeled == 20 and len(data.unlabeled_train_idx) == 20
  np.testing.assert_array_equal(np.bincount(data.unlabeled_labels, minlength=4), [5] * 4)
  assert np.all(np.isin(data.labeled_idx, data.unlabeled_train_idx))  # include_lb_to_ulb
  assert not np.any(np.isin(data.val_idx, data.unlabeled_train_idx))
  assert np.all(np.diff(data.unlabeled_train_idx) > 0)  # train order kept
  np.testing.assert_array_equal(
    data.unlabeled_images.get(np.arange(20)), data.train_images.get(data.unlabeled_train_idx)
  )
  np.testing.assert_array_equal(data.unlabeled_labels, data.train_labels[data.unlabeled_train_idx])
  again = helpers.load_ssl_data(
    'fake', '', 8, seed=0, val_size=4, fake_kwargs=fake, unlabeled_size=20
  )
  np.testing.assert_array_equal(again.unlabeled_train_idx, data.unlabeled_train_idx)
  other = helpers.load_ssl_data(
    'fake', '', 8, seed=1, val_size=4, fake_kwargs=fake, unlabeled_size=20
  )
  assert not np.array_equal(other.unlabeled_train_idx, data.unlabeled_train_idx)
  whole = helpers.load_ssl_data('fake', '', 8, seed=0, val_size=4, fake_kwargs=fake)
  np.testing.assert_array_equal(whole.labeled_idx, data.labeled_idx)  # labeled draw unchanged
  assert whole.unlabeled_subset is None and whole.unlabeled_record() is None
  strict = helpers.load_ssl_data(
    'fake', '', 8, seed=0, val_size=4, fake_kwargs=fake, include_lb_to_ulb=False, unlabeled_size=18
  )
  np.testing.assert_array_equal(np.sort(np.bincount(strict.unlabeled_labels)), [4, 4, 5, 5])
  assert not np.any(np.isin(strict.labeled_idx, strict.unlabeled_train_idx))


@pytest.mark.parametrize(
  'size,fake,message',
  [
    (4, FAKE, 'between the 8 labeled'),  # fewer than the labeled samples it keeps
    (1000, FAKE, 'between the 8 labeled'),
    (20, dict(FAKE, num_unlabeled=5), 'without a label'),
    (-2, FAKE, 'whole number'),
    (2.5, FAKE, 'whole number'),
  ],
)
def test_unlabeled_subset_errors_name_the_field(size, fake, message):
  with pytest.raises(ValueError, match=message) as info:
    helpers.load_ssl_data('fake', '', 8, seed=0, fake_kwargs=fake, unlabeled_size=size)
  assert 'unlabeled_size' in str(info.value)
