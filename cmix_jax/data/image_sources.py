"""Image sources: random access to a data set's uint8 images, in memory or decoded on demand.

Every split the trainer reads is an ImageSource: a numpy array, a view of one (a subset, or
splits one after the other) without copying, or an ArrayRecord TFDS split decoded per batch.
"""

import concurrent.futures
import io
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class ImageSource(Protocol):
  """Random access to uint8 images: in memory (numpy) or decoded on demand (ImageNet)."""

  image_shape: tuple[int, int, int]

  def __len__(self) -> int: ...

  def get(self, indices: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, C] images at `indices` (int array, any order, repeats allowed)."""
    ...


class ArrayImageSource:
  """An in-memory uint8 [N, H, W, C] array as an ImageSource."""

  def __init__(self, images: np.ndarray):
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(
        f'ArrayImageSource needs uint8 [N, H, W, C] images, got {images.dtype} {images.shape}.'
      )
    self.images = images
    self.image_shape = tuple(images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def get(self, indices: np.ndarray) -> np.ndarray:
    return self.images[np.asarray(indices, np.int64)]  # [n, H, W, C]


class SubsetImageSource:
  """The images of `base` at `positions` (no copy): position j reads base[positions[j]]."""

  def __init__(self, base: ImageSource, positions: np.ndarray):
    self.base = base
    self.positions = np.asarray(positions, np.int64)
    self.image_shape = tuple(base.image_shape)

  def __len__(self) -> int:
    return len(self.positions)

  def get(self, indices: np.ndarray) -> np.ndarray:
    return self.base.get(self.positions[np.asarray(indices, np.int64)])


class ConcatImageSource:
  """Sources one after the other (no copy): the train part, then an extra unlabeled split."""

  def __init__(self, sources: Sequence[ImageSource]):
    shapes = {tuple(s.image_shape) for s in sources}
    if len(shapes) != 1:
      raise ValueError(f'cannot concatenate image sources of different shapes {shapes}.')
    self.sources = list(sources)
    self.image_shape = shapes.pop()
    self.offsets = np.cumsum([0] + [len(s) for s in sources])  # [S + 1]

  def __len__(self) -> int:
    return int(self.offsets[-1])

  def get(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    out = np.empty((len(indices),) + self.image_shape, np.uint8)  # [n, H, W, C]
    which = np.searchsorted(self.offsets, indices, side='right') - 1  # [n]
    for s, source in enumerate(self.sources):
      rows = np.nonzero(which == s)[0]
      if len(rows):
        out[rows] = source.get(indices[rows] - self.offsets[s])
    return out


def resize_shorter_center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes so the shorter side fits `size`, then center-crops to exactly `size` (H, W)."""
  from PIL import Image

  height, width = image.shape[:2]
  out_h, out_w = size
  scale = max(out_h / height, out_w / width)
  new_h, new_w = max(out_h, round(height * scale)), max(out_w, round(width * scale))
  squeeze = image.ndim == 3 and image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  if (new_h, new_w) != (height, width):
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
  top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
  out = np.asarray(pil.crop((left, top, left + out_w, top + out_h)))
  return out[..., None] if squeeze else out


def decode_image(data: bytes, channels: int) -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H, W, channels] (grayscale or RGB)."""
  from PIL import Image

  mode = 'L' if channels == 1 else 'RGB'
  with Image.open(io.BytesIO(data)) as pil:
    image = np.asarray(pil if pil.mode == mode else pil.convert(mode), np.uint8)
  return image[..., None] if image.ndim == 2 else image


class TfdsImageSource:
  """Random access to an ArrayRecord TFDS split, decoding (and resizing) per request."""

  def __init__(
    self, data_source, image_shape: tuple[int, int, int], resize: bool, num_threads: int = 8
  ):
    self.data_source = data_source  # TFDS data source opened with SkipDecoding for images
    self.image_shape = tuple(image_shape)
    self.resize = resize
    self.num_threads = num_threads
    self._pool = None

  def __len__(self) -> int:
    return len(self.data_source)

  def _decode(self, data: bytes) -> np.ndarray:
    image = decode_image(data, self.image_shape[2])
    if self.resize:
      image = resize_shorter_center_crop(image, self.image_shape[:2])
    if image.shape != self.image_shape:
      raise ValueError(
        f'stored image of shape {image.shape} where {self.image_shape} was '
        'expected: the data set holds images of mixed sizes.'
      )
    return image

  def get(self, indices: np.ndarray) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    records = self.data_source.__getitems__(indices.tolist())
    out = np.empty((len(indices),) + self.image_shape, np.uint8)  # [n, H, W, C]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads)
    for i, image in enumerate(self._pool.map(self._decode, [r['image'] for r in records])):
      out[i] = image
    return out
