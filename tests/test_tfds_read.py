"""tfds_read.py: missing-data errors, random access with resize and label cache, TFRecord reads."""

import dataclasses
import os

import numpy as np
import pytest

from cmix_jax.data import image_sources
from cmix_jax.data import specs
from cmix_jax.data import tfds_read
from cmix_jax.data import tfds_store
from tests import helpers


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
