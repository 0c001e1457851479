"""fake_data.py: fake data is deterministic per seed and class-balanced."""

import numpy as np

from cmix_jax.data import fake_data

FAKE = dict(num_train=40, num_test=12, image_shape=(6, 6, 3), num_classes=4, seed=3)


def test_fake_data_is_deterministic_and_balanced():
  a, b = fake_data.make_fake(**FAKE), fake_data.make_fake(**FAKE)
  np.testing.assert_array_equal(a['train'][0], b['train'][0])
  np.testing.assert_array_equal(np.bincount(a['train'][1]), [10] * 4)
  assert not np.array_equal(a['train'][0], fake_data.make_fake(**dict(FAKE, seed=4))['train'][0])
