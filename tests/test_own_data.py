"""own_data.py: npz and folder sources store once, load into identical batches, bad data refused."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cmix_jax.data import own_data
from cmix_jax.data import pipeline
from cmix_jax.data import specs
from cmix_jax.data import tfds_store
from tests import helpers

CLASSES = ('cat', 'dog', 'eel')


def _arrays(seed=0):
  """3 classes x 4 train (sorted by class), 2 test per class, 3 unlabeled; 5x7 RGB."""
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.integers(0, 256, (n, 5, 7, 3), dtype=np.uint8)
  return {
    'x_train': draw(12),
    'y_train': np.repeat(np.arange(3), 4),
    'x_test': draw(6),
    'y_test': np.repeat(np.arange(3), 2),
    'x_unlabeled': draw(3),
  }


def _write_folder(root, arrays):
  for split in ('train', 'test'):
    for i, (x, y) in enumerate(zip(arrays[f'x_{split}'], arrays[f'y_{split}'])):
      os.makedirs(root / split / CLASSES[y], exist_ok=True)
      Image.fromarray(x).save(root / split / CLASSES[y] / f'img_{i:03d}.png')
  os.makedirs(root / 'unlabeled')
  for i, x in enumerate(arrays['x_unlabeled']):
    Image.fromarray(x).save(root / 'unlabeled' / f'u_{i:03d}.png')


def _batches(data, steps=3):
  it = pipeline.TrainIterator(data, global_batch=6, uratio=2, seed=4, local_devices=2)
  return [next(it) for _ in range(steps)]


def test_npz_and_folder_round_trip_into_identical_batches(tmp_path):
  arrays = _arrays()
  np.savez(tmp_path / 'My Set.npz', **arrays)
  _write_folder(tmp_path / 'my_set_folder', arrays)
  data_dir = str(tmp_path / 'tfds')
  from_npz = helpers.load_ssl_data(f'npz:{tmp_path / "My Set.npz"}', data_dir, 6, seed=1)
  from_folder = helpers.load_ssl_data(f'folder:{tmp_path / "my_set_folder"}', data_dir, 6, seed=1)
  for data in (from_npz, from_folder):
    assert data.num_classes == 3 and data.spec.image_shape == (5, 7, 3)
    assert data.num_unlabeled == 15
    np.testing.assert_array_equal(data.train_images.get(np.arange(12)), arrays['x_train'])
    np.testing.assert_array_equal(data.test_labels, arrays['y_test'])
    np.testing.assert_array_equal(data.unlabeled_labels[12:], [-1, -1, -1])
    mean = arrays['x_train'].reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(data.spec.mean, mean, rtol=1e-12)
  assert from_npz.spec.extra_unlabeled_split == 'unlabeled'
  for a, b in zip(_batches(from_npz), _batches(from_folder)):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  names = sorted(os.listdir(data_dir))
  assert len(names) == 2 and all(n.startswith(('own_my_set_', 'own_my_set_folder_')) for n in names)
  stats = own_data.read_stats(data_dir, from_folder.spec.tfds_name)
  assert stats['class_names'] == list(CLASSES) and stats['counts'] == {
    'train': 12,
    'test': 6,
    'unlabeled': 3,
  }


def test_same_source_is_stored_once_and_a_changed_source_gets_a_new_store(tmp_path):
  arrays = _arrays()
  path = str(tmp_path / 'd.npz')
  np.savez(path, **{k: v for k, v in arrays.items() if k != 'x_unlabeled'})
  data_dir = str(tmp_path / 'tfds')
  name = own_data.store_npz(path, data_dir)
  info = os.path.join(tfds_store.stored_dir(data_dir, name), 'dataset_info.json')
  before = os.stat(info).st_mtime_ns
  assert own_data.store_npz(path, data_dir) == name
  assert os.stat(info).st_mtime_ns == before
  spec = own_data.spec_from_store('npz:d', data_dir, name)
  assert spec.extra_unlabeled_split is None and spec.num_classes == 3
  arrays['x_train'][0, 0, 0, 0] ^= 1
  np.savez(path, **{k: v for k, v in arrays.items() if k != 'x_unlabeled'})
  assert own_data.store_npz(path, data_dir) != name
  with pytest.raises(ValueError, match='stored from a different source'):
    own_data.store_npz(path, data_dir, name=name)


def _npz_case(tmp_path, **changes):
  arrays = _arrays()
  for key, value in changes.items():
    if value is None:
      del arrays[key]
    else:
      arrays[key] = value
  path = tmp_path / 'bad.npz'
  np.savez(path, **arrays)
  return str(path)


NPZ_CASES = [
  (dict(y_train=np.repeat(np.arange(3), 4)[:11]), '12 train images but 11 labels'),
  (dict(y_test=np.array([0, 1, 2, 3, 0, 1])), r'test labels 0..3 fall outside 0..2'),
  (dict(y_train=np.repeat([0, 2, 3], 4)), 'class 1 has no train examples'),
  (dict(x_test=np.zeros((6, 5, 6, 3), np.uint8)), 'mixed image sizes'),
  (dict(x_train=np.zeros((12, 5, 7, 3), np.float32)), 'must be uint8'),
  (dict(x_train=np.zeros((12, 5, 7, 4), np.uint8)), 'C = 1 .grayscale. or 3'),
  (dict(y_test=None), r"missing arrays \['y_test'\]"),
]


@pytest.mark.parametrize('changes,message', NPZ_CASES)
def test_bad_npz_is_refused_before_writing(changes, message, tmp_path):
  path = _npz_case(tmp_path, **changes)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(ValueError, match=message):
    helpers.load_ssl_data(f'npz:{path}', str(data_dir), 3, seed=0)
  assert not data_dir.exists() or not os.listdir(data_dir)


def test_missing_npz_and_folder_give_data_not_found(tmp_path):
  with pytest.raises(specs.DataNotFoundError, match='npz file .* not found'):
    own_data.store_npz(str(tmp_path / 'none.npz'), str(tmp_path))
  with pytest.raises(specs.DataNotFoundError, match='image folder .* not found'):
    own_data.store_folder(str(tmp_path / 'none'), str(tmp_path))


def _folder(tmp_path):
  root = tmp_path / 'imgs'
  _write_folder(root, _arrays())
  return root


def test_bad_folders_are_refused_before_writing(tmp_path):
  data_dir = tmp_path / 'tfds'

  def refused(root, message):
    with pytest.raises(ValueError, match=message):
      own_data.store_folder(str(root), str(data_dir))
    assert not data_dir.exists() or not os.listdir(data_dir)

  root = _folder(tmp_path)
  os.makedirs(root / 'train' / 'fox')
  refused(root, 'fox holds no .png/.jpg images .an empty class')
  os.rmdir(root / 'train' / 'fox')
  Image.fromarray(np.zeros((5, 8, 3), np.uint8)).save(root / 'test' / 'dog' / 'wide.png')
  refused(root, 'mixed image sizes')
  os.remove(root / 'test' / 'dog' / 'wide.png')
  Image.fromarray(np.zeros((5, 7, 4), np.uint8)).save(root / 'unlabeled' / 'alpha.png')
  refused(root, 'mode RGBA is not 8-bit grayscale or RGB')
  os.remove(root / 'unlabeled' / 'alpha.png')
  os.makedirs(root / 'test' / 'yak')
  refused(root, 'yak is not a train class')
  os.rmdir(root / 'test' / 'yak')
  assert own_data.store_folder(str(root), str(data_dir)).startswith('own_imgs_')  # now fine


def test_too_few_examples_per_class_for_num_labels(tmp_path):
  path = _npz_case(tmp_path, y_train=np.array([0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]))
  with pytest.raises(ValueError, match='class 0 has only 2 examples.*3 are needed.*lower'):
    helpers.load_ssl_data(f'npz:{path}', str(tmp_path / 'tfds'), 9, seed=0)


def test_grayscale_npz_gets_a_channel_axis(tmp_path):
  rng = np.random.default_rng(5)
  x = rng.integers(0, 256, (6, 3, 3), dtype=np.uint8)
  np.savez(
    tmp_path / 'g.npz', x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=np.array([0, 1])
  )
  data = helpers.load_ssl_data(f'npz:{tmp_path / "g.npz"}', str(tmp_path / 'tfds'), 2, seed=0)
  assert data.spec.image_shape == (3, 3, 1)
  np.testing.assert_array_equal(data.train_images.get(np.arange(6))[..., 0], x)
  with open(
    os.path.join(
      tfds_store.stored_dir(str(tmp_path / 'tfds'), data.spec.tfds_name), own_data.STATS_FILE
    )
  ) as f:
    stats = json.load(f)
  np.testing.assert_allclose(stats['std'], [x.std() / 255], rtol=1e-9)


def test_worked_example_writes_the_same_digits_as_npz_and_folder(tmp_path):
  """The README's worked example: its npz and its folder read back as the same arrays."""
  from experiments import own_data_example as example

  arrays = example.digits_arrays()
  assert arrays['x_train'].shape == (1497, 8, 8, 1) and arrays['x_test'].shape == (300, 8, 8, 1)
  assert np.bincount(arrays['y_test']).tolist() == [30] * 10
  assert np.all(np.diff(arrays['y_train']) >= 0)  # class-sorted, the order a folder reads in
  from_npz, names_npz = own_data.read_npz(example.write_npz(arrays, str(tmp_path / 'd.npz')))
  from_folder, names_folder = own_data.read_folder(
    example.write_folder(arrays, str(tmp_path / 'd'))
  )
  assert names_npz == names_folder == tuple(f'digit_{c}' for c in range(10))
  for split in ('train', 'test'):
    np.testing.assert_array_equal(from_npz[split][0], from_folder[split][0])
    np.testing.assert_array_equal(from_npz[split][1], from_folder[split][1])
