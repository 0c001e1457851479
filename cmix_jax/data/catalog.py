"""The data sets a config can name, opened by `open_dataset`: TFDS, own npz/folder data, fake.

`open_dataset` is the one entry point the run uses (then `ssl_data.make_ssl_data` draws the
labeled/validation/unlabeled split from the seed); `tfds_store` and `tfds_read` hold the TFDS
side, `own_data` the npz/folder side, `fake_data` the fake one.
"""

import dataclasses

import numpy as np

from cmix_jax.data import fake_data
from cmix_jax.data import image_sources
from cmix_jax.data import own_data
from cmix_jax.data import specs
from cmix_jax.data import ssl_data
from cmix_jax.data import tfds_read
from cmix_jax.data import tfds_store


def open_dataset(name: str, data_dir: str, fake_kwargs: dict | None = None) -> ssl_data.RawData:
  """Opens `name` (a SPECS key, 'npz:PATH', 'folder:PATH' or 'fake'), storing ours on first use."""
  if name == 'fake':
    kwargs = dict(fake_kwargs or {})
    arrays = fake_data.make_fake(**kwargs)
    mean, std = specs.channel_stats(arrays['train'][0])
    spec = dataclasses.replace(
      specs.SPECS['fake'],
      num_classes=int(kwargs.get('num_classes', 10)),
      image_shape=tuple(arrays['train'][0].shape[1:]),
      mean=mean,
      std=std,
      extra_unlabeled_split='unlabeled' if 'unlabeled' in arrays else None,
    )
    parts = {k: (image_sources.ArrayImageSource(x), y) for k, (x, y) in arrays.items()}
  else:
    if name.startswith(('npz:', 'folder:')):
      spec = own_data.resolve(name, data_dir)
    elif name in specs.SPECS:
      spec = specs.SPECS[name]
    else:
      raise ValueError(
        f'unknown data set {name!r}: use one of '
        f'{", ".join(sorted(specs.SPECS))}, npz:PATH or folder:PATH.'
      )
    if spec.name == 'fashion_mnist_debian' and not tfds_store.is_stored(data_dir, spec.tfds_name):
      tfds_store.store_fashion_mnist(data_dir, specs.FASHION_MNIST_DIR)
    builder = tfds_read.open_builder(spec, data_dir)
    parts = {
      'train': tfds_read.open_split(builder, spec, spec.train_split),
      'test': tfds_read.open_split(builder, spec, spec.test_split),
    }
    if spec.extra_unlabeled_split:
      parts['unlabeled'] = tfds_read.open_split(builder, spec, spec.extra_unlabeled_split)
  if tuple(parts['train'][0].image_shape) != tuple(spec.image_shape):
    raise ValueError(
      f'{name}: stored images are {parts["train"][0].image_shape}, spec says '
      f'{spec.image_shape}; rebuild the stored data set.'
    )
  extra_images, extra_labels = parts.get('unlabeled', (None, None))
  as_int32 = lambda y: None if y is None else np.asarray(y).astype(np.int32)
  return ssl_data.RawData(
    spec=spec,
    train_images=parts['train'][0],
    train_labels=as_int32(parts['train'][1]),
    test_images=parts['test'][0],
    test_labels=as_int32(parts['test'][1]),
    extra_images=extra_images,
    extra_labels=as_int32(extra_labels),
  )
