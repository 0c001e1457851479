"""Stores data sets we build ourselves (Fashion-MNIST, own data) as ArrayRecord TFDS data sets.

data_dir may be local or gs://. A data set we store into a bucket is built in a local temp
folder (ArrayRecord has no GCS writer) and uploaded, dataset_info.json last, so a half upload
never looks complete. TFDS is imported only inside the functions that write.
"""

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmix_jax import storage
from cmix_jax.data import idx
from cmix_jax.data import specs

STORE_VERSION = '1.0.0'  # version of every data set we store ourselves
_INCOMPLETE_PREFIX = '.incomplete-'


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
