"""catalog.py: a name that is no data set is refused with the names that are."""

import pytest

from cmix_jax.data import catalog


def test_unknown_name_is_refused():
  with pytest.raises(ValueError, match='unknown data set .mnist_typo.*npz:PATH'):
    catalog.open_dataset('mnist_typo', '')
