"""image_sources.py: resize and crop by hand, subset and concatenated sources map indices."""

import numpy as np
import pytest

from cmix_jax.data import image_sources


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
