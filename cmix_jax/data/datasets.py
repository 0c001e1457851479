"""Data sets on the host: specs, TFDS storage/reading, and the SSL view (labeled/unlabeled/test).

TFDS and TensorFlow are imported only inside the functions that touch TFDS, so fake data and
the pipeline tests run without them.

data_dir may be local or gs://. A data set we store into a bucket is built in a local temp
folder (ArrayRecord has no GCS writer) and uploaded, dataset_info.json last, so a half upload
never looks complete. ArrayRecord data sets in a bucket are read by array_record's own GCS
reader; TFRecord ones by tf.data (TF's GCS client).
"""

import concurrent.futures
import contextlib
import dataclasses
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from typing import Any
from collections.abc import Sequence

import numpy as np

from cmix_jax import storage
from cmix_jax.data import idx
from cmix_jax.data import image_sources
from cmix_jax.data import specs
from cmix_jax.data import splits

STORE_VERSION = '1.0.0'  # version of every data set we store ourselves
_READ_CHUNK = 4096  # examples decoded per chunk when reading a whole split
_INCOMPLETE_PREFIX = '.incomplete-'


# ----------------------------------------------------------------------------- TFDS storage


def stored_dir(data_dir: str, tfds_name: str) -> str:
  """Where a data set we store lives (the TFDS version folder; local paths made absolute)."""
  return os.fspath(storage.as_path(data_dir) / tfds_name / STORE_VERSION)


def is_stored(data_dir: str, tfds_name: str, required: Sequence[str] = ()) -> bool:
  """True when a complete store exists: dataset_info.json plus every `required` file."""
  path = storage.as_path(stored_dir(data_dir, tfds_name))
  return all((path / f).exists() for f in ('dataset_info.json', *required))


def _remove_stale_incomplete(data_dir: str, tfds_name: str) -> None:
  """Removes temp dirs of interrupted stores by dead processes of this host."""
  prefix = f'{_INCOMPLETE_PREFIX}{tfds_name}.{socket.gethostname()}.'
  for entry in os.listdir(data_dir):
    if not entry.startswith(prefix):
      continue
    try:
      os.kill(int(entry[len(prefix) :].split('.')[0]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(data_dir, entry), ignore_errors=True)
    except (PermissionError, ValueError):
      pass  # alive under another user, or not our naming


def store_arrays(
  tfds_name: str,
  data_dir: str,
  split_arrays: dict[str, tuple[np.ndarray, np.ndarray]],
  num_classes: int,
  class_names: Sequence[str] | None = None,
  extra_json: dict[str, Any] | None = None,
) -> str:
  """Stores uint8 [N, H, W, C] images + int labels per split as an ArrayRecord TFDS data set.

  Written into a temp data dir and renamed into place (or, for a bucket, uploaded with
  dataset_info.json last), so an interrupted store never looks complete; an incomplete
  leftover is rebuilt. `extra_json` files go beside dataset_info.json. Returns the version
  folder. A complete existing store is kept as is.
  """
  import tensorflow_datasets as tfds

  extra_json = extra_json or {}
  final = stored_dir(data_dir, tfds_name)
  if is_stored(data_dir, tfds_name, list(extra_json)):
    return final
  if storage.is_remote(data_dir):
    with tempfile.TemporaryDirectory(prefix=f'{_INCOMPLETE_PREFIX}{tfds_name}.') as local:
      _upload_store(
        store_arrays(tfds_name, local, split_arrays, num_classes, class_names, extra_json), final
      )
    logging.info('Uploaded %s to %s', tfds_name, final)
    return final
  data_dir = os.fspath(storage.as_path(data_dir))
  os.makedirs(data_dir, exist_ok=True)
  _remove_stale_incomplete(data_dir, tfds_name)
  shape = tuple(next(iter(split_arrays.values()))[0].shape[1:])
  label = (
    tfds.features.ClassLabel(names=list(class_names))
    if class_names
    else tfds.features.ClassLabel(num_classes=num_classes)
  )
  features = tfds.features.FeaturesDict({'image': tfds.features.Image(shape=shape), 'label': label})
  split_datasets = {
    split: [(i, {'image': images[i], 'label': int(labels[i])}) for i in range(len(images))]
    for split, (images, labels) in split_arrays.items()
  }
  tmp_root = os.path.join(
    data_dir,
    f'{_INCOMPLETE_PREFIX}{tfds_name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}',
  )
  try:
    tfds.display_progress_bar(False)  # the run's console shows its own plan and bar
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # TFDS prints a banner
      tfds.dataset_builders.store_as_tfds_dataset(
        name=tfds_name,
        version=STORE_VERSION,
        features=features,
        split_datasets=split_datasets,
        data_dir=tmp_root,
        file_format='array_record',
        disable_shuffling=True,
      )
    logging.info('TFDS: %s', printed.getvalue().strip())
    tmp_version = os.path.join(tmp_root, tfds_name, STORE_VERSION)
    for filename, content in extra_json.items():
      with open(os.path.join(tmp_version, filename), 'w') as f:
        json.dump(content, f, indent=2, sort_keys=True)
    target = os.path.join(data_dir, tfds_name)
    if os.path.exists(target) and not is_stored(data_dir, tfds_name, list(extra_json)):
      shutil.rmtree(target)  # left by an interrupted or foreign attempt
    try:
      os.rename(os.path.join(tmp_root, tfds_name), target)
    except OSError:
      if not is_stored(data_dir, tfds_name, list(extra_json)):  # else: stored concurrently
        raise
  finally:
    shutil.rmtree(tmp_root, ignore_errors=True)
  logging.info(
    'Stored %s (%s) in %s',
    tfds_name,
    ', '.join(f'{k}: {len(v[1])}' for k, v in split_arrays.items()),
    final,
  )
  return final


def _upload_store(local_dir: str, remote_dir: str) -> None:
  """Copies a stored version folder into a bucket, dataset_info.json (completeness) last."""
  names = sorted(os.listdir(local_dir), key=lambda name: (name == 'dataset_info.json', name))
  for name in names:
    storage.copy_file(os.path.join(local_dir, name), storage.as_path(remote_dir) / name)


def store_fashion_mnist(
  data_dir: str,
  source_dir: str = specs.FASHION_MNIST_DIR,
  expected_counts: dict[str, int] | None = None,
) -> str:
  """Stores the Debian Fashion-MNIST IDX files once as `fashion_mnist_debian` under data_dir."""
  name = specs.SPECS['fashion_mnist_debian'].tfds_name
  if is_stored(data_dir, name):
    return stored_dir(data_dir, name)
  return store_arrays(
    name, data_dir, idx.read_fashion_mnist(source_dir, expected_counts), num_classes=10
  )


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


# ----------------------------------------------------------------------------- fake data


def make_fake(
  num_train: int = 256,
  num_test: int = 64,
  image_shape=(32, 32, 3),
  num_classes: int = 10,
  num_unlabeled: int = 0,
  seed: int = 0,
) -> dict:
  """Deterministic small data: class prototype + noise, labels exactly balanced (i % C)."""
  rng = np.random.default_rng(seed)
  shape = tuple(int(s) for s in image_shape)
  prototypes = rng.uniform(40, 215, (num_classes,) + shape)  # [C, H, W, C_img]

  def draw(n: int, labelled: bool):
    labels = rng.permutation(np.arange(n) % num_classes).astype(np.int32)  # [n]
    noise = rng.normal(0, 30, (n,) + shape)
    images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)  # [n, H, W, C]
    return images, labels if labelled else np.full((n,), -1, np.int32)

  out = {'train': draw(num_train, True), 'test': draw(num_test, True)}
  if num_unlabeled:
    out['unlabeled'] = draw(num_unlabeled, False)
  return out


# ----------------------------------------------------------------------------- SSL view


@dataclasses.dataclass
class SSLData:
  """Labeled / unlabeled / test views of one data set, with stable indices.

  Labeled example i is train example `labeled_idx[i]`; unlabeled example j is position j of
  `unlabeled_images` (train minus validation, then the extra unlabeled split).
  """

  spec: specs.DatasetSpec
  train_images: image_sources.ImageSource
  train_labels: np.ndarray  # int32 [N_train]
  labeled_idx: np.ndarray  # int64 [N_lb], positions in train
  val_idx: np.ndarray  # int64 [N_val], positions in train
  unlabeled_images: image_sources.ImageSource
  unlabeled_labels: np.ndarray  # int32 [N_ulb], hidden labels; -1 where unknown
  unlabeled_train_idx: np.ndarray  # int64, train position of unlabeled j < len(this)
  test_images: image_sources.ImageSource
  test_labels: np.ndarray  # int32 [N_test]
  # int64 [N_ulb]: positions of the kept unlabeled samples in the whole unlabeled set (train
  # minus validation, then extra) when data.unlabeled_size draws a subset; None = all of it.
  unlabeled_subset: np.ndarray | None = None

  def unlabeled_record(self) -> dict | None:
    """What split.json records of an unlabeled subset (None when the whole set is used)."""
    if self.unlabeled_subset is None:
      return None
    return {
      'size': self.num_unlabeled,
      'per_class': np.bincount(self.unlabeled_labels, minlength=self.num_classes).tolist(),
      'train_idx': self.unlabeled_train_idx,  # train positions of the train part
      'pool_idx': self.unlabeled_subset,
    }

  @property
  def num_labeled(self) -> int:
    return len(self.labeled_idx)

  @property
  def num_unlabeled(self) -> int:
    return len(self.unlabeled_images)

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def labeled_labels(self) -> np.ndarray:
    return self.train_labels[self.labeled_idx]  # int32 [N_lb]

  def labeled_images(self) -> np.ndarray:
    """uint8 [N_lb, H, W, C]: the labeled images, in labeled-index order."""
    return self.train_images.get(self.labeled_idx)


@dataclasses.dataclass
class RawData:
  """A data set's splits before any labeled/validation draw (labels int32, -1 = unknown)."""

  spec: specs.DatasetSpec
  train_images: image_sources.ImageSource
  train_labels: np.ndarray  # int32 [N_train]
  test_images: image_sources.ImageSource
  test_labels: np.ndarray  # int32 [N_test]
  extra_images: image_sources.ImageSource | None = (
    None  # extra unlabeled split (SVHN extra, STL-10 ...)
  )
  extra_labels: np.ndarray | None = None  # int32 [N_extra]


def merge_extra_into_train(raw: RawData) -> RawData:
  """Train followed by the extra split as one labeled pool (SVHN: 73,257 + 531,131 images)."""
  return dataclasses.replace(
    raw,
    train_images=image_sources.ConcatImageSource([raw.train_images, raw.extra_images]),
    train_labels=np.concatenate([raw.train_labels, raw.extra_labels]).astype(np.int32),
    extra_images=None,
    extra_labels=None,
  )


def make_ssl_data(
  raw: RawData,
  num_labels: int,
  seed: int,
  val_size: int = 0,
  include_lb_to_ulb: bool = True,
  unlabeled_size: int = 0,
) -> SSLData:
  """Draws the class-balanced validation, then labeled split from `seed`; builds the views.

  The unlabeled set is the train split minus validation (minus labeled unless
  include_lb_to_ulb), in train order, followed by the extra unlabeled split. A spec with
  labeled_from_extra first makes train + extra the train split (USB's SVHN). With
  unlabeled_size > 0 only a class-balanced, seeded subset of it is kept (order preserved;
  the labeled samples stay in it when include_lb_to_ulb).
  """
  if raw.spec.labeled_from_extra and raw.extra_images is not None:
    raw = merge_extra_into_train(raw)
  num_classes, train_labels = raw.spec.num_classes, raw.train_labels
  val_idx = splits.validation_split(train_labels, val_size, num_classes, seed)
  labeled_idx = splits.labeled_split(train_labels, num_labels, num_classes, seed, exclude=val_idx)
  drop = val_idx if include_lb_to_ulb else np.concatenate([val_idx, labeled_idx])
  keep = np.setdiff1d(np.arange(len(train_labels)), drop)  # int64, sorted
  unlabeled = (
    raw.train_images
    if len(keep) == len(train_labels)
    else image_sources.SubsetImageSource(raw.train_images, keep)
  )
  unlabeled_labels = train_labels[keep]
  if raw.extra_images is not None:
    unlabeled = image_sources.ConcatImageSource([unlabeled, raw.extra_images])
    unlabeled_labels = np.concatenate([unlabeled_labels, raw.extra_labels])
  subset = None
  if int(unlabeled_size) != unlabeled_size or unlabeled_size < -1:
    raise ValueError(
      f'data.unlabeled_size={unlabeled_size!r} must be a whole number of '
      'unlabeled samples, or 0 / -1 for all: fix --config.data.unlabeled_size.'
    )
  if unlabeled_size > 0:
    if np.any(unlabeled_labels < 0):
      raise ValueError(
        f'data.unlabeled_size={unlabeled_size} draws a class-balanced subset, '
        f'but {raw.spec.name}\'s unlabeled set has samples without a label: '
        'set --config.data.unlabeled_size=0 (all) for this data set.'
      )
    in_pool = np.searchsorted(keep, labeled_idx) if include_lb_to_ulb else None  # [N_lb]
    subset = splits.unlabeled_subset(
      unlabeled_labels, unlabeled_size, num_classes, seed, keep=in_pool
    )  # int64 [unlabeled_size], sorted
    unlabeled = image_sources.SubsetImageSource(unlabeled, subset)
    unlabeled_labels = unlabeled_labels[subset]
    keep = keep[subset[subset < len(keep)]]
  return SSLData(
    spec=raw.spec,
    train_images=raw.train_images,
    train_labels=train_labels,
    labeled_idx=labeled_idx,
    val_idx=val_idx,
    unlabeled_images=unlabeled,
    unlabeled_labels=unlabeled_labels.astype(np.int32),
    unlabeled_train_idx=keep,
    test_images=raw.test_images,
    test_labels=raw.test_labels,
    unlabeled_subset=subset,
  )
