"""ssl_data.py: the labeled / validation / unlabeled views, the extra split and unlabeled subsets."""

import numpy as np
import pytest

from cmix_jax.data import fake_data
from tests import helpers

FAKE = dict(num_train=40, num_test=12, image_shape=(6, 6, 3), num_classes=4, seed=3)


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
