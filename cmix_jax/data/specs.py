"""Data set specs: what the trainer needs to know about each named data set, and how to get it.

Mean/std are per-channel normalisation in 0..1 pixel units; `channel_stats` computes them for
the data sets we store ourselves (Fashion-MNIST, own data, fake).
"""

import dataclasses

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package dataset-fashion-mnist


class DataNotFoundError(ValueError):
  """A data set is not stored under data_dir; the message says how to get it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the trainer needs to know about a data set (normalisation in 0..1 pixel units)."""

  name: str
  tfds_name: str
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C) as fed to the model
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool = True  # random horizontal flip in the weak view (USB flips SVHN too)
  train_split: str = 'train'
  test_split: str = 'test'
  extra_unlabeled_split: str | None = None
  labeled_from_extra: bool = False  # draw labels from train + extra, as USB does for SVHN
  how_to_get: str = ''
  in_memory: bool = True  # False: random-access source decoded per batch (ImageNet)
  resize: bool = False  # resize shorter side to image_shape + center crop on read


def _tfds_build_hint(tfds_name: str, extra: str = '') -> str:
  return (
    f'on a machine with internet run `tfds build {tfds_name} --data_dir=<data_dir>'
    f'{extra}`, then copy <data_dir>/{tfds_name} into your data_dir (or point '
    '--config.data.data_dir at it).'
  )


SPECS: dict[str, DatasetSpec] = {
  # Mean/std: computed once from the 60,000 train images of the Debian IDX files as
  # mean and population std of pixel/255 over all pixels (float64): 0.286041, 0.353024.
  'fashion_mnist_debian': DatasetSpec(
    name='fashion_mnist_debian',
    tfds_name='fashion_mnist_debian',
    num_classes=10,
    image_shape=(28, 28, 1),
    mean=(0.286041,),
    std=(0.353024,),
    how_to_get='install the Debian package: `apt-get install dataset-fashion-mnist` (it '
    f'puts the IDX files in {FASHION_MNIST_DIR}); the first run stores them under '
    'data_dir.',
  ),
  'cifar10': DatasetSpec(
    name='cifar10',
    tfds_name='cifar10',
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    how_to_get=_tfds_build_hint('cifar10'),
  ),
  'cifar100': DatasetSpec(
    name='cifar100',
    tfds_name='cifar100',
    num_classes=100,
    image_shape=(32, 32, 3),
    mean=(129.3 / 255, 124.1 / 255, 112.4 / 255),
    std=(68.2 / 255, 65.4 / 255, 70.4 / 255),
    how_to_get=_tfds_build_hint('cifar100'),
  ),
  'svhn_cropped': DatasetSpec(
    name='svhn_cropped',
    tfds_name='svhn_cropped',
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=(0.4380, 0.4440, 0.4730),
    std=(0.1751, 0.1771, 0.1744),
    extra_unlabeled_split='extra',
    labeled_from_extra=True,
    how_to_get=_tfds_build_hint('svhn_cropped'),
  ),
  'stl10': DatasetSpec(
    name='stl10',
    tfds_name='stl10',
    num_classes=10,
    image_shape=(96, 96, 3),
    mean=(112.4 / 255, 109.1 / 255, 98.6 / 255),
    std=(68.4 / 255, 66.6 / 255, 68.5 / 255),
    extra_unlabeled_split='unlabelled',
    how_to_get=_tfds_build_hint('stl10'),
  ),
  'imagenet2012': DatasetSpec(
    name='imagenet2012',
    tfds_name='imagenet2012',
    num_classes=1000,
    image_shape=(224, 224, 3),
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    test_split='validation',
    in_memory=False,
    resize=True,
    how_to_get='put ILSVRC2012_img_{train,val}.tar in <data_dir>/downloads/manual and '
    + _tfds_build_hint('imagenet2012', ' --file_format=array_record'),
  ),
  # Template only: catalog.open_dataset('fake', '', fake_kwargs) replaces shape/classes.
  'fake': DatasetSpec(
    name='fake',
    tfds_name='',
    num_classes=10,
    image_shape=(32, 32, 3),
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    how_to_get='generated in memory.',
  ),
}


def channel_stats(images: np.ndarray, chunk: int = 8192) -> tuple[tuple, tuple]:
  """Per-channel mean and population std of pixel/255 over uint8 [N, H, W, C] (float64)."""
  channels = images.shape[-1]
  total, total_sq, count = np.zeros(channels), np.zeros(channels), 0
  for start in range(0, len(images), chunk):
    x = images[start : start + chunk].reshape(-1, channels).astype(np.float64) / 255.0
    total += x.sum(0)
    total_sq += (x * x).sum(0)
    count += len(x)
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)
