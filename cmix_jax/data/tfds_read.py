"""Reads stored TFDS data sets: a split in memory, or random access for sets too big for it.

TFDS is imported only inside the functions that read. data_dir may be local or gs://:
ArrayRecord data sets (ours, or built with --file_format=array_record) are read by
array_record's own GCS reader and decoded with PIL; TFRecord ones (what `tfds build` writes by
default) by tf.data (TF's GCS client).
"""

import concurrent.futures
import io
import os

import numpy as np

from cmix_jax import storage
from cmix_jax.data import image_sources
from cmix_jax.data import specs

_READ_CHUNK = 4096  # examples decoded per chunk when reading a whole split


def open_builder(spec: specs.DatasetSpec, data_dir: str):
  """The prepared TFDS builder of `spec`, or DataNotFoundError saying how to get it."""
  not_found = specs.DataNotFoundError(
    f'data set {spec.name!r} ({spec.tfds_name}) is not stored under data_dir={data_dir!r}: '
    + spec.how_to_get
  )
  if not (storage.as_path(data_dir) / spec.tfds_name).is_dir():
    raise not_found
  import tensorflow_datasets as tfds

  try:
    builder = tfds.builder(
      spec.tfds_name, data_dir=os.fspath(storage.as_path(data_dir)), try_gcs=False
    )
    prepared = builder.is_prepared()
  except Exception:
    prepared = False
  if not prepared:
    raise not_found from None
  return builder


def _file_format(builder) -> str:
  return str(getattr(builder.info.file_format, 'value', builder.info.file_format))


def _split_size(builder, split: str) -> int:
  if split not in builder.info.splits:
    raise specs.DataNotFoundError(
      f'{builder.name} under {builder.data_dir} has no split {split!r} '
      f'(it has {sorted(builder.info.splits)}); rebuild it.'
    )
  return builder.info.splits[split].num_examples


def _skip_decoding_source(builder, split: str):
  import tensorflow_datasets as tfds

  return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def read_split(
  builder, split: str, image_shape: tuple[int, int, int], num_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """A whole split in memory: (uint8 [N, H, W, C], int32 [N]); labels -1 where unknown."""
  num_threads = num_threads or min(8, os.cpu_count() or 1)
  n = _split_size(builder, split)
  images = np.empty((n,) + tuple(image_shape), np.uint8)  # [N, H, W, C]
  labels = np.empty((n,), np.int32)  # [N]
  if _file_format(builder) == 'array_record':
    source = _skip_decoding_source(builder, split)

    def read_chunk(start: int) -> None:  # one task per chunk: per-image tasks cost more
      records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, n))))
      for i, record in enumerate(records):
        images[start + i] = image_sources.decode_image(record['image'], image_shape[2])
      labels[start : start + len(records)] = [r['label'] for r in records]

    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      list(pool.map(read_chunk, range(0, n, _READ_CHUNK)))
  else:  # tfrecord (what `tfds build` writes by default): tf.data decodes in C++
    import tensorflow_datasets as tfds

    start = 0
    for batch in tfds.as_numpy(
      builder.as_dataset(split, batch_size=_READ_CHUNK, shuffle_files=False)
    ):
      count = len(batch['label'])
      images[start : start + count] = batch['image']
      labels[start : start + count] = batch['label']
      start += count
    if start != n:
      raise ValueError(f'{builder.name}/{split}: read {start} examples, info says {n}.')
  return images, labels


def read_labels(builder, split: str) -> np.ndarray:
  """int32 [N] labels of a random-access split without decoding images (cached beside it)."""
  cache = storage.as_path(os.fspath(builder.data_dir)) / f'cmix_labels_{split}.npy'
  if cache.exists():
    return np.load(io.BytesIO(cache.read_bytes()))
  source = _skip_decoding_source(builder, split)
  n = len(source)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, n))))
    labels[start : start + len(records)] = [r['label'] for r in records]
  try:
    buffer = io.BytesIO()
    np.save(buffer, labels)
    storage.write_bytes(cache, buffer.getvalue())
  except Exception:
    pass  # read-only data dir (or bucket): read again next time
  return labels


def open_split(
  builder, spec: specs.DatasetSpec, split: str
) -> tuple[image_sources.ImageSource, np.ndarray]:
  """(ImageSource, int32 labels) of one split: in memory, or random access for big sets."""
  if spec.in_memory:
    images, labels = read_split(builder, split, spec.image_shape)
    return image_sources.ArrayImageSource(images), labels
  if _file_format(builder) != 'array_record':
    raise specs.DataNotFoundError(
      f'{spec.tfds_name} under {builder.data_dir} is stored as {_file_format(builder)}, '
      'which has no random access: rebuild it with `tfds build '
      f'{spec.tfds_name} --file_format=array_record --data_dir=<data_dir>`.'
    )
  _split_size(builder, split)
  source = image_sources.TfdsImageSource(
    _skip_decoding_source(builder, split), spec.image_shape, spec.resize
  )
  return source, read_labels(builder, split)
