"""Class-balanced labeled and validation splits, drawn from a seed, and their audit file.

Order of draws (ssl_data.make_ssl_data): validation first, from the whole train split, with
`np.random.default_rng([seed, VAL_STREAM])`; then the labeled set from the remaining examples
with `np.random.default_rng(seed)`. With val_size = 0 the labeled set is therefore the same as
without a validation slice. Last, when data.unlabeled_size asks for it, the unlabeled subset
with `np.random.default_rng([seed, ULB_STREAM])` (labeled and validation draws unchanged). numpy's Generator streams do not depend on the host, so every
process and machine draws the same indices.
"""

import numpy as np

from cmix_jax import storage

VAL_STREAM = 1  # second seed word of the validation draw (labeled uses the plain seed)
ULB_STREAM = 2  # second seed word of the unlabeled-subset draw
SPLIT_FILE = 'split.json'


def _check_labels(labels: np.ndarray, num_classes: int) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f'labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f'labels must be in 0..{num_classes - 1}, found '
      f'{labels.min()}..{labels.max()}: check num_classes.'
    )
  return labels


def _draw_per_class(
  rng: np.random.Generator,
  labels: np.ndarray,
  counts: np.ndarray,
  exclude: np.ndarray | None,
  what: str,
) -> np.ndarray:
  """`counts[c]` indices of each class c (in class order), avoiding `exclude`; sorted int64."""
  available = np.ones(len(labels), bool)
  if exclude is not None and len(exclude):
    available[np.asarray(exclude, np.int64)] = False
  chosen = []
  for c, k in enumerate(counts):
    candidates = np.nonzero((labels == c) & available)[0]  # int64, sorted
    if len(candidates) < k:
      fix = 'data.unlabeled_size' if what == 'unlabeled' else 'data.num_labels (or data.val_size)'
      raise ValueError(
        f'class {c} has only {len(candidates)} examples available for the '
        f'{what} set but {k} are needed: lower --config.{fix}.'
      )
    chosen.append(candidates[rng.choice(len(candidates), size=int(k), replace=False)])
  return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def labeled_split(
  labels: np.ndarray,
  num_labels: int,
  num_classes: int,
  seed: int,
  exclude: np.ndarray | None = None,
) -> np.ndarray:
  """Sorted int64 train positions: num_labels // num_classes of each class, not in `exclude`."""
  labels = _check_labels(labels, num_classes)
  if num_labels <= 0 or num_labels % num_classes:
    raise ValueError(
      f'num_labels={num_labels} must be a positive multiple of the '
      f'{num_classes} classes (class-balanced draw): set '
      '--config.data.num_labels accordingly.'
    )
  available = len(labels) - (0 if exclude is None else len(exclude))
  if num_labels > available:
    raise ValueError(
      f'num_labels={num_labels} exceeds the {available} training examples '
      'available: lower --config.data.num_labels.'
    )
  counts = np.full(num_classes, num_labels // num_classes)
  return _draw_per_class(np.random.default_rng(seed), labels, counts, exclude, 'labeled')


def validation_split(labels: np.ndarray, val_size: int, num_classes: int, seed: int) -> np.ndarray:
  """Sorted int64 train positions: val_size // C per class, the remainder to random classes."""
  labels = _check_labels(labels, num_classes)
  if val_size < 0:
    raise ValueError(f'val_size={val_size} must be >= 0 (--config.data.val_size).')
  if val_size == 0:
    return np.zeros(0, np.int64)
  if val_size > len(labels):
    raise ValueError(
      f'val_size={val_size} exceeds the {len(labels)} training examples: '
      'lower --config.data.val_size.'
    )
  rng = np.random.default_rng([seed, VAL_STREAM])
  counts = np.full(num_classes, val_size // num_classes)
  counts[rng.choice(num_classes, size=val_size % num_classes, replace=False)] += 1
  return _draw_per_class(rng, labels, counts, None, 'validation')


def unlabeled_subset(
  labels: np.ndarray, size: int, num_classes: int, seed: int, keep: np.ndarray | None = None
) -> np.ndarray:
  """Sorted int64 positions of a class-balanced subset of `size` pool samples (hidden labels).

  size // C per class, the remainder to random classes; the positions in `keep` (labeled
  samples, with include_lb_to_ulb) are always in it and count towards their class.
  """
  labels = _check_labels(labels, num_classes)
  keep = np.zeros(0, np.int64) if keep is None else np.unique(np.asarray(keep, np.int64))
  if size < len(keep) or size > len(labels):
    raise ValueError(
      f'data.unlabeled_size={size} must lie between the {len(keep)} labeled '
      f'samples it keeps and the {len(labels)} unlabeled samples (0 = all): '
      'set --config.data.unlabeled_size accordingly.'
    )
  rng = np.random.default_rng([seed, ULB_STREAM])
  counts = np.full(num_classes, size // num_classes)
  counts[rng.choice(num_classes, size=size % num_classes, replace=False)] += 1
  kept_per_class = np.bincount(labels[keep], minlength=num_classes)
  if np.any(kept_per_class > counts):
    raise ValueError(
      f'data.unlabeled_size={size} gives {counts.min()} samples per class, '
      f'fewer than the {kept_per_class.max()} labeled ones a class keeps: '
      'raise --config.data.unlabeled_size.'
    )
  drawn = _draw_per_class(rng, labels, counts - kept_per_class, keep, 'unlabeled')
  return np.sort(np.concatenate([keep, drawn])).astype(np.int64)


def save_split(
  workdir: str,
  labeled_idx: np.ndarray,
  val_idx: np.ndarray,
  train_labels: np.ndarray,
  seed: int,
  dataset: str,
  unlabeled: dict | None = None,
) -> str:
  """Writes workdir/split.json (indices, per-class counts, seed, data set) for audits; returns
  its path. Local or gs:// (written whole, never half).

  `unlabeled` (when a subset of the unlabeled set is used, `SSLData.unlabeled_record()`)
  adds its size, per-class counts of the hidden labels and its indices.
  """
  train_labels = np.asarray(train_labels)
  num_classes = int(train_labels.max()) + 1 if len(train_labels) else 0

  def per_class(idx):
    return np.bincount(train_labels[np.asarray(idx, np.int64)], minlength=num_classes).tolist()

  record = {
    'dataset': dataset,
    'seed': int(seed),
    'num_train': int(len(train_labels)),
    'num_labeled': int(len(labeled_idx)),
    'num_val': int(len(val_idx)),
    'labeled_per_class': per_class(labeled_idx),
    'val_per_class': per_class(val_idx),
    'labeled_idx': np.asarray(labeled_idx).tolist(),
    'val_idx': np.asarray(val_idx).tolist(),
  }
  if unlabeled is not None:
    record['unlabeled'] = {
      k: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for k, v in unlabeled.items()
    }
  return str(storage.write_json(storage.as_path(workdir) / SPLIT_FILE, record))


def load_split(workdir: str) -> dict:
  """Reads workdir/split.json (local or gs://); index lists come back as int64 arrays."""
  record = storage.read_json(storage.as_path(workdir) / SPLIT_FILE)
  for key in ('labeled_idx', 'val_idx'):
    record[key] = np.asarray(record[key], np.int64)
  return record
