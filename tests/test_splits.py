"""splits.py: class balance, determinism, disjoint validation, errors, split.json audit file."""

import json

import numpy as np
import pytest

from cmix_jax.data import splits
from tests import helpers


def _labels(num_classes=4, per_class=25, seed=0):
  return np.random.default_rng(seed).permutation(np.arange(num_classes * per_class) % num_classes)


def test_labeled_split_is_class_balanced_sorted_and_unique():
  labels = _labels()
  idx = splits.labeled_split(labels, 12, 4, seed=0)
  assert idx.dtype == np.int64 and len(idx) == 12
  assert np.all(np.diff(idx) > 0)  # sorted, no repeats
  np.testing.assert_array_equal(np.bincount(labels[idx], minlength=4), [3, 3, 3, 3])


def test_labeled_split_same_seed_same_indices_different_seed_different():
  labels = _labels()
  a = splits.labeled_split(labels, 12, 4, seed=3)
  np.testing.assert_array_equal(a, splits.labeled_split(labels.copy(), 12, 4, seed=3))
  assert not np.array_equal(a, splits.labeled_split(labels, 12, 4, seed=4))


def test_labeled_split_can_take_a_whole_class():
  labels = np.array([0, 1, 1, 0, 1, 0])
  np.testing.assert_array_equal(splits.labeled_split(labels, 6, 2, seed=0), np.arange(6))


def test_validation_is_disjoint_deterministic_and_labeled_unchanged_without_it():
  labels = _labels()
  val = splits.validation_split(labels, 10, 4, seed=1)
  lb = splits.labeled_split(labels, 40, 4, seed=1, exclude=val)
  assert len(val) == 10 and len(np.intersect1d(val, lb)) == 0
  # 10 over 4 classes: two classes get 3, two get 2.
  np.testing.assert_array_equal(np.sort(np.bincount(labels[val], minlength=4)), [2, 2, 3, 3])
  np.testing.assert_array_equal(val, splits.validation_split(labels, 10, 4, seed=1))
  np.testing.assert_array_equal(lb, splits.labeled_split(labels, 40, 4, seed=1, exclude=val))
  empty = splits.validation_split(labels, 0, 4, seed=1)
  assert empty.dtype == np.int64 and len(empty) == 0
  np.testing.assert_array_equal(
    splits.labeled_split(labels, 40, 4, seed=1, exclude=empty),
    splits.labeled_split(labels, 40, 4, seed=1),
  )


@pytest.mark.parametrize(
  'num_labels,exclude,message',
  [
    (10, None, 'not divisible|multiple of the 4 classes'),
    (0, None, 'positive multiple'),
    (104, None, 'exceeds the 100 training examples'),
    (96, np.arange(20), 'exceeds the 80'),
  ],
)
def test_labeled_split_errors_name_the_fix(num_labels, exclude, message):
  with pytest.raises(ValueError, match=message) as info:
    splits.labeled_split(_labels(), num_labels, 4, seed=0, exclude=exclude)
  assert 'num_labels' in str(info.value)


def test_too_few_in_one_class_names_the_class():
  labels = np.array([0] * 10 + [1] * 2 + [2] * 10)
  with pytest.raises(ValueError, match='class 1 has only 2 examples.*lower --config.data'):
    splits.labeled_split(labels, 9, 3, seed=0)


def test_labels_outside_range_are_refused():
  with pytest.raises(ValueError, match='labels must be in 0..2'):
    splits.labeled_split(np.array([0, 1, 3]), 3, 3, seed=0)


def test_save_and_load_split_round_trip(tmp_path):
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
  path = splits.save_split(str(tmp_path), np.array([0, 4, 8]), np.array([3]), labels, 7, 'fake')
  with open(path) as f:
    raw = json.load(f)
  assert raw['labeled_per_class'] == [1, 1, 1] and raw['val_per_class'] == [1, 0, 0]
  assert raw['num_train'] == 9 and raw['num_labeled'] == 3 and raw['num_val'] == 1
  loaded = splits.load_split(str(tmp_path))
  assert loaded['seed'] == 7 and loaded['dataset'] == 'fake'
  np.testing.assert_array_equal(loaded['labeled_idx'], [0, 4, 8])
  assert loaded['labeled_idx'].dtype == np.int64
  np.testing.assert_array_equal(loaded['val_idx'], [3])


def test_unlabeled_subset_keeps_given_positions_and_balances_classes_by_hand():
  labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
  subset = splits.unlabeled_subset(labels, 6, 3, seed=5, keep=np.array([0, 1, 4]))
  assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
  assert {0, 1, 4} <= set(subset.tolist())
  np.testing.assert_array_equal(np.bincount(labels[subset], minlength=3), [2, 2, 2])
  assert set(subset[labels[subset] == 0].tolist()) == {0, 1}  # class 0 is full with its kept two
  np.testing.assert_array_equal(
    subset, splits.unlabeled_subset(labels, 6, 3, 5, np.array([0, 1, 4]))
  )
  with pytest.raises(ValueError, match='fewer than the 3 labeled'):
    splits.unlabeled_subset(labels, 6, 3, seed=5, keep=np.array([0, 1, 2]))


def test_split_file_records_the_unlabeled_subset(tmp_path):
  data = helpers.load_ssl_data(
    'fake',
    '',
    8,
    seed=2,
    fake_kwargs=dict(num_train=40, num_test=4, image_shape=(4, 4, 1), num_classes=4, seed=0),
    unlabeled_size=16,
  )
  splits.save_split(
    str(tmp_path),
    data.labeled_idx,
    data.val_idx,
    data.train_labels,
    2,
    'fake',
    unlabeled=data.unlabeled_record(),
  )
  record = splits.load_split(str(tmp_path))
  assert record['unlabeled']['size'] == 16
  assert record['unlabeled']['per_class'] == [4, 4, 4, 4]
  assert record['unlabeled']['train_idx'] == data.unlabeled_train_idx.tolist()
  assert record['unlabeled']['pool_idx'] == data.unlabeled_subset.tolist()
  splits.save_split(str(tmp_path), data.labeled_idx, data.val_idx, data.train_labels, 2, 'fake')
  assert 'unlabeled' not in splits.load_split(str(tmp_path))
