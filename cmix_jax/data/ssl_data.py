"""The SSL view of a data set: labeled, validation, unlabeled and test sets drawn from a seed.

`make_ssl_data` turns the RawData that `catalog.open_dataset` returns into SSLData; the draws
themselves are in `splits`. Views index the raw image sources and copy no images.
"""

import dataclasses

import numpy as np

from cmix_jax.data import image_sources
from cmix_jax.data import specs
from cmix_jax.data import splits


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
