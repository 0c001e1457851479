"""Bring your own data: a .npz file or an image folder, validated, stored once as TFDS.

`catalog.open_dataset('npz:PATH', ...)` / `('folder:PATH', ...)` store the source on first use as
`own_<name>_<fingerprint>` under data_dir (ArrayRecord, splits train/test[/unlabeled]) with a
stats.json beside it holding num_classes, image shape, class names and the train split's
per-channel mean/std, so nothing about the data is hard-coded. Sources and data_dir may be
local or gs:// paths.
"""

import hashlib
import io
import os
import re

import numpy as np

from cmix_jax import storage
from cmix_jax.data import specs
from cmix_jax.data import tfds_store

STATS_FILE = 'stats.json'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
_MODES = {'L': 'L', '1': 'L', 'RGB': 'RGB', 'P': 'RGB'}  # PIL mode -> stored mode


def sanitize_name(text: str) -> str:
  """A TFDS-safe name: lowercase letters, digits and single underscores, starting with a letter."""
  name = re.sub(r'[^a-z0-9]+', '_', text.lower()).strip('_')
  return name if name[:1].isalpha() else f'd_{name}'


def _check_tfds_name(name: str) -> str:
  if not re.fullmatch(r'[a-z][a-z0-9_]*', name):
    raise ValueError(
      f'data set name {name!r} must be lowercase letters, digits and '
      'underscores, starting with a letter.'
    )
  return name


# ----------------------------------------------------------------------------- validation


def _as_images(x: np.ndarray, key: str, source: str) -> np.ndarray:
  """uint8 [N, H, W] or [N, H, W, C] (C in 1, 3) -> [N, H, W, C]; errors name the fix."""
  if x.dtype != np.uint8:
    raise ValueError(
      f'{source}: {key} has dtype {x.dtype}; images must be uint8 in 0..255 '
      '(convert with np.clip(x * 255, 0, 255).astype(np.uint8) if in 0..1).'
    )
  if x.ndim == 3:
    x = x[..., None]
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(
      f'{source}: {key} has shape {x.shape}; use [N, H, W] or [N, H, W, C] '
      'with C = 1 (grayscale) or 3 (RGB).'
    )
  return x


def validate_splits(parts: dict, source: str, class_names=None) -> tuple[int, tuple]:
  """Checks {split: (images [N,H,W,C] uint8, labels)} and returns (num_classes, image_shape).

  Train labels must cover 0..C-1 with no empty class; test labels must lie in 0..C-1;
  unlabeled labels may be -1 (unknown); every split must have the train image shape.
  """
  train_x, train_y = parts['train']
  if len(train_x) == 0:
    raise ValueError(f'{source}: the train split is empty.')
  shape = tuple(train_x.shape[1:])
  for split, (x, y) in parts.items():
    if tuple(x.shape[1:]) != shape:
      raise ValueError(
        f'{source}: {split} images are {tuple(x.shape[1:])} but train images '
        f'are {shape}: mixed image sizes; resize every image to one size.'
      )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(
        f'{source}: {split} labels must be a 1-D integer array, got {y.dtype} {y.shape}.'
      )
    if len(y) != len(x):
      raise ValueError(
        f'{source}: {len(x)} {split} images but {len(y)} labels; give one label per image.'
      )
  if train_y.min() < 0:
    raise ValueError(f'{source}: train label {train_y.min()} is negative; labels are 0..C-1.')
  num_classes = int(train_y.max()) + 1
  if class_names is not None and len(class_names) != num_classes:
    num_classes = len(class_names)
  counts = np.bincount(train_y, minlength=num_classes)
  if len(counts) > num_classes:
    raise ValueError(
      f'{source}: train labels go up to {train_y.max()} but there are '
      f'{num_classes} class names; labels must be in 0..{num_classes - 1}.'
    )
  empty = np.nonzero(counts == 0)[0]
  if len(empty):
    raise ValueError(
      f'{source}: class {int(empty[0])} has no train examples (an empty class); '
      f'labels must be 0..C-1 with every class present, C = {num_classes}.'
    )
  for split, (_, y) in parts.items():
    low = -1 if split == 'unlabeled' else 0
    if len(y) and (y.min() < low or y.max() >= num_classes):
      raise ValueError(
        f'{source}: {split} labels {y.min()}..{y.max()} fall outside '
        f'0..{num_classes - 1} (the classes seen in train).'
      )
  return num_classes, shape


def read_npz(path: str) -> tuple[dict, tuple | None]:
  """Validated ({split: (uint8 [N,H,W,C], int64 [N])}, class_names) from a .npz file."""
  if not storage.as_path(path).is_file():
    raise specs.DataNotFoundError(
      f'npz file {path!r} not found: give npz:PATH to a .npz with x_train, y_train, x_test, y_test.'
    )
  with np.load(io.BytesIO(storage.as_path(path).read_bytes()), allow_pickle=False) as npz:
    arrays = {k: npz[k] for k in npz.files}
  missing = [k for k in ('x_train', 'y_train', 'x_test', 'y_test') if k not in arrays]
  if missing:
    raise ValueError(
      f'{path}: missing arrays {missing}; the .npz needs x_train, y_train, '
      'x_test, y_test (and optionally x_unlabeled, class_names).'
    )
  parts = {}
  for split, key in (('train', 'train'), ('test', 'test'), ('unlabeled', 'unlabeled')):
    if f'x_{key}' not in arrays:
      continue
    x = _as_images(arrays[f'x_{key}'], f'x_{key}', path)
    y = arrays.get(f'y_{key}', np.full(len(x), -1, np.int64))
    parts[split] = (x, np.asarray(y))
  names = tuple(str(n) for n in arrays['class_names']) if 'class_names' in arrays else None
  validate_splits(parts, path, names)
  return {k: (x, y.astype(np.int64)) for k, (x, y) in parts.items()}, names


def _image_files(directory: str) -> list[str]:
  """Image files under `directory` (recursive), sorted by relative path."""
  if not storage.is_remote(directory):
    found = []
    for root, _, files in os.walk(directory):
      found += [os.path.join(root, f) for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found, key=lambda p: os.path.relpath(p, directory))
  base = storage.as_path(directory)
  found = [
    root / f
    for root, _, files in storage.walk(base)
    for f in files
    if f.lower().endswith(IMAGE_EXTENSIONS)
  ]
  return [os.fspath(p) for p in sorted(found, key=lambda p: os.fspath(p.relative_to(base)))]


def _read_image(path: str) -> np.ndarray:
  from PIL import Image

  with Image.open(io.BytesIO(storage.as_path(path).read_bytes())) as pil:
    if pil.mode not in _MODES:
      raise ValueError(
        f'{path}: image mode {pil.mode} is not 8-bit grayscale or RGB '
        '(e.g. RGBA or 16-bit); convert it to RGB or L.'
      )
    image = np.asarray(pil.convert(_MODES[pil.mode]), np.uint8)
  return image[..., None] if image.ndim == 2 else image


def _stack(files: list[str], path: str) -> np.ndarray:
  images = [_read_image(f) for f in files]
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    first = images[0].shape
    odd = next(f for f, im in zip(files, images) if im.shape != first)
    raise ValueError(
      f'{path}: mixed image sizes ({odd} is {_read_image(odd).shape}, '
      f'{files[0]} is {first}); resize every image to one size.'
    )
  return np.stack(images)


def read_folder(path: str) -> tuple[dict, tuple]:
  """Validated splits from train/<class>/*, test/<class>/*, optional unlabeled/* images."""
  root = storage.as_path(path)
  train_dir, test_dir = os.fspath(root / 'train'), os.fspath(root / 'test')
  if not (root / 'train').is_dir() or not (root / 'test').is_dir():
    raise specs.DataNotFoundError(
      f'{path!r} needs train/<class>/ and test/<class>/ folders of .png/.jpg images.'
    )
  class_names = tuple(sorted(d.name for d in (root / 'train').iterdir() if d.is_dir()))
  if not class_names:
    raise ValueError(f'{train_dir} has no class folders; put images in train/<class>/.')
  files, labels = {'train': [], 'test': []}, {'train': [], 'test': []}
  for split, split_dir in (('train', train_dir), ('test', test_dir)):
    for name in sorted(d.name for d in storage.as_path(split_dir).iterdir()):
      if not (storage.as_path(split_dir) / name).is_dir():
        continue
      if name not in class_names:
        raise ValueError(f'{split_dir}/{name} is not a train class ({", ".join(class_names)}).')
      class_files = _image_files(os.path.join(split_dir, name))
      if split == 'train' and not class_files:
        raise ValueError(f'{split_dir}/{name} holds no .png/.jpg images (an empty class).')
      files[split] += class_files
      labels[split] += [class_names.index(name)] * len(class_files)
  unlabeled_dir = os.fspath(root / 'unlabeled')
  if (root / 'unlabeled').is_dir():
    files['unlabeled'] = _image_files(unlabeled_dir)
    labels['unlabeled'] = [-1] * len(files['unlabeled'])
  if not files['test']:
    raise ValueError(f'{test_dir} holds no images; put test images in test/<class>/.')
  all_files = [f for split in files.values() for f in split]
  images = _stack(all_files, path)  # one stack, so a size mismatch across splits is caught
  parts, start = {}, 0
  for split, split_files in files.items():
    parts[split] = (images[start : start + len(split_files)], np.asarray(labels[split], np.int64))
    start += len(split_files)
  validate_splits(parts, path, class_names)
  return parts, class_names


# ----------------------------------------------------------------------------- storing


def _fingerprint_file(path: str) -> str:
  digest = hashlib.sha256()
  with storage.as_path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _fingerprint_folder(path: str) -> str:
  """Hash of every file's relative path, size and mtime (no content read)."""
  digest = hashlib.sha256()
  if storage.is_remote(path):
    base = storage.as_path(path)
    for file in sorted(root / f for root, _, files in storage.walk(base) for f in files):
      stat = file.stat()
      digest.update(f'{os.fspath(file.relative_to(base))}\0{stat.length}\0{stat.mtime}\n'.encode())
    return digest.hexdigest()
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for f in sorted(files):
      full = os.path.join(root, f)
      stat = os.stat(full)
      digest.update(f'{os.path.relpath(full, path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _stored_name(path: str, fingerprint: str, name: str | None) -> str:
  if name is not None:
    return _check_tfds_name(name)
  stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
  return f'own_{sanitize_name(stem)}_{fingerprint[:8]}'


def read_stats(data_dir: str, tfds_name: str) -> dict:
  return storage.read_json(storage.as_path(tfds_store.stored_dir(data_dir, tfds_name)) / STATS_FILE)


def _store(kind: str, path: str, data_dir: str, name: str | None, fingerprint: str, reader) -> str:
  """Stores once: an existing store of the same fingerprint is reused; returns the TFDS name."""
  tfds_name = _stored_name(path, fingerprint, name)
  if tfds_store.is_stored(data_dir, tfds_name, [STATS_FILE]):
    stored = read_stats(data_dir, tfds_name)
    if stored.get('fingerprint') != fingerprint:
      raise ValueError(
        f'{tfds_name} under {data_dir} was stored from a different source '
        f'({stored.get("source")}); pass another name or delete '
        f'{storage.as_path(data_dir) / tfds_name}.'
      )
    return tfds_name
  parts, class_names = reader(path)
  num_classes, shape = validate_splits(parts, path, class_names)
  mean, std = specs.channel_stats(parts['train'][0])
  stats = {
    'kind': kind,
    'source': os.fspath(storage.as_path(path)),
    'fingerprint': fingerprint,
    'num_classes': num_classes,
    'image_shape': list(shape),
    'class_names': list(class_names) if class_names else None,
    'mean': list(mean),
    'std': list(std),
    'stats_from': 'train split, pixel/255',
    'counts': {split: int(len(y)) for split, (_, y) in parts.items()},
  }
  tfds_store.store_arrays(
    tfds_name, data_dir, parts, num_classes, class_names, extra_json={STATS_FILE: stats}
  )
  return tfds_name


def store_npz(path: str, data_dir: str, name: str | None = None) -> str:
  """Validates and stores a .npz (x_train, y_train, x_test, y_test[, x_unlabeled]) once."""
  if not storage.as_path(path).is_file():
    read_npz(path)  # raises the not-found message
  return _store('npz', path, data_dir, name, _fingerprint_file(path), read_npz)


def store_folder(path: str, data_dir: str, name: str | None = None) -> str:
  """Validates and stores train/<class>/, test/<class>/[, unlabeled/] images once."""
  if not storage.as_path(path).is_dir():
    raise specs.DataNotFoundError(
      f'image folder {path!r} not found: give folder:PATH to '
      'a folder with train/<class>/ and test/<class>/.'
    )
  return _store('folder', path, data_dir, name, _fingerprint_folder(path), read_folder)


def spec_from_store(display_name: str, data_dir: str, tfds_name: str) -> specs.DatasetSpec:
  """The DatasetSpec of a stored own data set, read from its stats.json."""
  stats = read_stats(data_dir, tfds_name)
  return specs.DatasetSpec(
    name=display_name,
    tfds_name=tfds_name,
    num_classes=int(stats['num_classes']),
    image_shape=tuple(stats['image_shape']),
    mean=tuple(stats['mean']),
    std=tuple(stats['std']),
    extra_unlabeled_split='unlabeled' if stats['counts'].get('unlabeled') else None,
    how_to_get=f'it is stored from {stats["source"]} on first use; keep that source.',
  )


def resolve(name: str, data_dir: str) -> specs.DatasetSpec:
  """'npz:PATH' / 'folder:PATH' -> spec of the stored copy (storing it on first use)."""
  kind, _, path = name.partition(':')
  path = os.fspath(storage.as_path(path))  # `~` expanded; gs:// kept
  if kind == 'npz':
    tfds_name = store_npz(path, data_dir)
  elif kind == 'folder':
    tfds_name = store_folder(path, data_dir)
  else:
    raise ValueError(f'unknown own-data kind {kind!r}: use npz:PATH or folder:PATH.')
  return spec_from_store(name, data_dir, tfds_name)
