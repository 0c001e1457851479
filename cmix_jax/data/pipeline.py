"""Host batches: deterministic per-step index streams, per-process/per-device shares, prefetch,
and `train_batches`, a run's prefetched device-placed train batches.

A training batch depends only on (seed, stream, step), so a resumed run sees exactly the
batches an uninterrupted one would, on any number of processes.
"""

import functools
import queue
import threading
from typing import Any
from collections.abc import Callable, Iterator

import jax
import numpy as np

from cmix_jax import parallel
from cmix_jax.data import image_sources
from cmix_jax.data import ssl_data

LABELED_STREAM = 0
UNLABELED_STREAM = 1


def epoch_permutation(num_items: int, seed: int, stream_id: int, epoch: int) -> np.ndarray:
  """int64 [num_items]: the order of `epoch` in stream `stream_id`."""
  return np.random.default_rng([seed, stream_id, epoch]).permutation(num_items)


def batch_indices(
  num_items: int,
  global_batch: int,
  step: int,
  seed: int,
  stream_id: int,
  permutation: Callable[[int], np.ndarray] | None = None,
) -> np.ndarray:
  """int64 [global_batch]: rows step*B .. (step+1)*B-1 of the concatenated epoch permutations.

  Each index appears once per epoch; a batch may straddle epochs (and, when
  global_batch > num_items, hold an index more than once). `permutation(epoch)` may supply
  cached permutations; it must equal epoch_permutation(num_items, seed, stream_id, epoch).
  """
  if num_items <= 0 or global_batch <= 0 or step < 0:
    raise ValueError(
      f'batch_indices needs num_items > 0, global_batch > 0 and step >= 0, got '
      f'{num_items}, {global_batch}, {step}.'
    )
  if permutation is None:
    permutation = lambda e: epoch_permutation(num_items, seed, stream_id, e)
  positions = step * global_batch + np.arange(global_batch, dtype=np.int64)  # [B]
  epochs = positions // num_items  # [B]
  out = np.empty(global_batch, np.int64)
  for epoch in np.unique(epochs):
    rows = epochs == epoch
    out[rows] = permutation(int(epoch))[positions[rows] % num_items]
  return out


class _PermutationCache:
  """Keeps the last few epoch permutations of one stream (a batch touches one or two)."""

  def __init__(self, num_items: int, seed: int, stream_id: int, size: int = 4):
    self.num_items, self.seed, self.stream_id, self.size = num_items, seed, stream_id, size
    self.cache: dict[int, np.ndarray] = {}

  def __call__(self, epoch: int) -> np.ndarray:
    if epoch not in self.cache:
      if len(self.cache) >= self.size:
        self.cache.pop(min(self.cache))
      self.cache[epoch] = epoch_permutation(self.num_items, self.seed, self.stream_id, epoch)
    return self.cache[epoch]


def _check_layout(
  global_batch: int, local_devices: int, process_index: int, process_count: int, what: str
) -> int:
  """Per-process share of a global batch; errors name the fix."""
  if local_devices < 1 or process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
      f'bad layout: local_devices={local_devices}, process_index='
      f'{process_index}, process_count={process_count}.'
    )
  devices = local_devices * process_count
  if global_batch <= 0 or global_batch % devices:
    raise ValueError(
      f'{what}={global_batch} is not divisible by {process_count} processes x '
      f'{local_devices} local devices = {devices}: use a multiple of {devices}.'
    )
  return global_batch // process_count


def _per_device(x: np.ndarray, local_devices: int) -> np.ndarray:
  return x.reshape((local_devices, -1) + x.shape[1:])  # [L, b, ...]


class TrainIterator:
  """Infinite iterator of this process's training batches, shaped [local_devices, b, ...].

  Keys: x_lb uint8 [L,b,H,W,C], y_lb / idx_lb int32 [L,b] (idx_lb = position in the labeled
  set), and unless uratio == 0: x_ulb uint8 [L,u,H,W,C], idx_ulb / y_ulb int32 [L,u]
  (y_ulb = hidden labels, -1 where unknown). `.step` is the next step produced.
  """

  def __init__(
    self,
    data: ssl_data.SSLData,
    *,
    global_batch: int,
    uratio: int,
    seed: int,
    start_step: int = 0,
    local_devices: int,
    process_index: int = 0,
    process_count: int = 1,
  ):
    _check_layout(global_batch, local_devices, process_index, process_count, 'global_batch')
    if uratio < 0 or int(uratio) != uratio:
      raise ValueError(f'uratio={uratio} must be a non-negative integer.')
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0.')
    if data.num_labeled == 0 or (uratio and data.num_unlabeled == 0):
      raise ValueError('the labeled (or, with uratio > 0, unlabeled) set is empty.')
    self.data = data
    self.global_batch, self.uratio, self.seed = global_batch, int(uratio), seed
    self.local_devices = local_devices
    self.process_index, self.process_count = process_index, process_count
    self.step = start_step
    self._perm_lb = _PermutationCache(data.num_labeled, seed, LABELED_STREAM)
    self._perm_ulb = _PermutationCache(data.num_unlabeled, seed, UNLABELED_STREAM)

  def __iter__(self) -> 'TrainIterator':
    return self

  def _share(self, indices: np.ndarray) -> np.ndarray:
    """This process's contiguous rows of a global index batch."""
    per_process = len(indices) // self.process_count
    return indices[self.process_index * per_process : (self.process_index + 1) * per_process]

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """This process's batch at `step` (pure in step: no iterator state is read or changed)."""
    data, num_local = self.data, self.local_devices
    idx_lb = self._share(
      batch_indices(
        data.num_labeled, self.global_batch, step, self.seed, LABELED_STREAM, self._perm_lb
      )
    )  # [B/P]
    train_pos = data.labeled_idx[idx_lb]
    out = {
      'x_lb': data.train_images.get(train_pos),
      'y_lb': data.train_labels[train_pos].astype(np.int32),
      'idx_lb': idx_lb.astype(np.int32),
    }
    if self.uratio:
      idx_ulb = self._share(
        batch_indices(
          data.num_unlabeled,
          self.global_batch * self.uratio,
          step,
          self.seed,
          UNLABELED_STREAM,
          self._perm_ulb,
        )
      )  # [uB/P]
      out.update(
        {
          'x_ulb': data.unlabeled_images.get(idx_ulb),
          'idx_ulb': idx_ulb.astype(np.int32),
          'y_ulb': data.unlabeled_labels[idx_ulb].astype(np.int32),
        }
      )
    return {k: _per_device(v, num_local) for k, v in out.items()}

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch(self.step)
    self.step += 1
    return out


def eval_batch_layout(batch_size: int, local_devices: int, process_count: int) -> int:
  """Rows per device of an eval batch: batch_size rounded UP to a multiple of the devices.

  Any batch size works on any device count; the padding rows carry mask 0.
  """
  if batch_size <= 0 or local_devices < 1 or process_count < 1:
    raise ValueError(
      f'eval batch_size={batch_size} must be positive (--config.data.'
      f'eval_batch_size); local_devices={local_devices}, process_count='
      f'{process_count} must be >= 1.'
    )
  return -(-batch_size // (local_devices * process_count))


def eval_batches(
  images: image_sources.ImageSource,
  labels: np.ndarray,
  batch_size: int,
  *,
  local_devices: int,
  process_index: int = 0,
  process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
  """This process's padded eval batches: x uint8 [L,b,H,W,C], y int32 [L,b], mask f32 [L,b].

  b = ceil(batch_size / (L * P)) (see eval_batch_layout). Process p takes the contiguous
  rows [p*S, (p+1)*S) with S = ceil(N / P); every process yields ceil(S / (L * b)) batches
  (the same count, for collectives); rows past the end of its share are zero images with
  mask 0, so each example counts exactly once.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f'bad layout: process_index={process_index}, process_count={process_count}.')
  per_process = eval_batch_layout(batch_size, local_devices, process_count) * local_devices
  labels = np.asarray(labels)
  num = len(labels)
  if len(images) != num:
    raise ValueError(f'{len(images)} images but {num} labels.')
  share = -(-num // process_count)
  start, end = min(process_index * share, num), min((process_index + 1) * share, num)
  for first in range(start, start + share, per_process):
    rows = np.arange(first, first + per_process)  # [b_p]
    real = rows < end
    x = np.zeros((per_process,) + tuple(images.image_shape), np.uint8)  # [b_p, H, W, C]
    y = np.zeros((per_process,), np.int32)
    if real.any():
      x[real] = images.get(rows[real])
      y[real] = labels[rows[real]]
    batch = {'x': x, 'y': y, 'mask': real.astype(np.float32)}
    yield {k: _per_device(v, local_devices) for k, v in batch.items()}


class Prefetcher:
  """Runs `iterator` and `place_fn` in a background thread, `size` batches ahead.

  Producer exceptions are re-raised by `next`; `close()` stops the thread. size 0 = no thread.
  """

  _END = object()

  def __init__(
    self, iterator: Iterator[Any], size: int, place_fn: Callable[[Any], Any] | None = None
  ):
    if size < 0:
      raise ValueError(f'prefetch size={size} must be >= 0 (--config.data.prefetch).')
    self.iterator = iterator
    self.place_fn = place_fn or (lambda x: x)
    self.size = size
    self._stop = threading.Event()
    self._closed = False
    self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
    self._thread = None
    if size > 0:
      self._thread = threading.Thread(target=self._produce, name='prefetch', daemon=True)
      self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self) -> None:
    try:
      for item in self.iterator:
        if not self._put(('item', self.place_fn(item))):
          return
      self._put(('end', None))
    except BaseException as e:
      self._put(('error', e))

  def __iter__(self) -> 'Prefetcher':
    return self

  def __next__(self) -> Any:
    if self._closed:
      raise StopIteration
    if self._thread is None:
      return self.place_fn(next(self.iterator))
    kind, value = self._queue.get()
    if kind == 'item':
      return value
    self._closed = True
    if kind == 'error':
      raise value
    raise StopIteration

  def close(self) -> None:
    """Stops the producer thread and drops what it had prefetched."""
    self._closed = True
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.05)
        except queue.Empty:
          pass
      self._thread.join()

  def __enter__(self) -> 'Prefetcher':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def prefetch(
  iterator: Iterator[Any], size: int, place_fn: Callable[[Any], Any] | None = None
) -> Prefetcher:
  """Background prefetch of `size` placed batches (see Prefetcher)."""
  return Prefetcher(iterator, size, place_fn)


def train_batches(config, data, algorithm, topo, start_step: int):
  """Prefetched, device-placed batches from `start_step` on (deterministic in the step)."""
  it = TrainIterator(
    data,
    global_batch=config.data.batch_size,
    uratio=config.data.uratio if algorithm.uses_unlabeled else 0,
    seed=config.seed,
    start_step=start_step,
    local_devices=topo.num_local_devices,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  return prefetch(it, config.data.prefetch, functools.partial(parallel.shard_batch, topo=topo))
