"""pipeline.py: index streams, process/device shares, resume, eval padding, prefetch."""

import threading

import numpy as np
import pytest

from cmix_jax.data import image_sources
from cmix_jax.data import pipeline
from tests import helpers

FAKE = dict(num_train=96, num_test=37, image_shape=(4, 4, 1), num_classes=4, seed=0)


def _data(num_labels=8, **kwargs):
  return helpers.load_ssl_data('fake', '', num_labels, seed=0, fake_kwargs=dict(FAKE, **kwargs))


def test_every_index_once_per_epoch_and_batches_straddle_epochs():
  n, batch = 10, 4  # 3 epochs = 30 items = 7.5 batches
  stream = np.concatenate([pipeline.batch_indices(n, batch, s, 5, 0) for s in range(15)])
  for epoch in range(6):
    np.testing.assert_array_equal(np.sort(stream[epoch * n : (epoch + 1) * n]), np.arange(n))
    np.testing.assert_array_equal(
      stream[epoch * n : (epoch + 1) * n], pipeline.epoch_permutation(n, 5, 0, epoch)
    )
  # Step 2 covers rows 8..11: the last two of epoch 0 and the first two of epoch 1.
  p0, p1 = pipeline.epoch_permutation(n, 5, 0, 0), pipeline.epoch_permutation(n, 5, 0, 1)
  np.testing.assert_array_equal(
    pipeline.batch_indices(n, batch, 2, 5, 0), np.concatenate([p0[8:], p1[:2]])
  )


def test_batch_larger_than_the_set_repeats_indices():
  idx = pipeline.batch_indices(3, 8, 0, 0, 0)  # 8 rows over epochs 0, 1, 2 (partial)
  assert len(idx) == 8
  np.testing.assert_array_equal(np.sort(idx[:3]), np.arange(3))
  np.testing.assert_array_equal(np.sort(idx[3:6]), np.arange(3))
  assert np.bincount(idx, minlength=3).max() >= 2


def test_streams_and_seeds_differ():
  a = pipeline.batch_indices(1000, 16, 0, 0, 0)
  assert not np.array_equal(a, pipeline.batch_indices(1000, 16, 0, 0, 1))
  assert not np.array_equal(a, pipeline.batch_indices(1000, 16, 0, 1, 0))
  np.testing.assert_array_equal(a, pipeline.batch_indices(1000, 16, 0, 0, 0))


def test_train_batch_shapes_dtypes_and_content():
  data = _data()
  it = pipeline.TrainIterator(data, global_batch=8, uratio=3, seed=0, local_devices=4)
  batch = next(it)
  assert it.step == 1
  assert batch['x_lb'].shape == (4, 2, 4, 4, 1) and batch['x_lb'].dtype == np.uint8
  assert batch['x_ulb'].shape == (4, 6, 4, 4, 1)
  for key, shape in (('y_lb', (4, 2)), ('idx_lb', (4, 2)), ('idx_ulb', (4, 6)), ('y_ulb', (4, 6))):
    assert batch[key].shape == shape and batch[key].dtype == np.int32, key
  # 8 labeled examples, batch 8: step 0 is exactly one epoch of the labeled set.
  np.testing.assert_array_equal(np.sort(batch['idx_lb'].ravel()), np.arange(8))
  idx_lb = batch['idx_lb'].reshape(-1)
  np.testing.assert_array_equal(
    batch['x_lb'].reshape(8, 4, 4, 1), data.train_images.get(data.labeled_idx[idx_lb])
  )
  np.testing.assert_array_equal(batch['y_lb'].ravel(), data.train_labels[data.labeled_idx[idx_lb]])
  idx_ulb = batch['idx_ulb'].reshape(-1)
  np.testing.assert_array_equal(
    batch['x_ulb'].reshape(24, 4, 4, 1), data.unlabeled_images.get(idx_ulb)
  )
  np.testing.assert_array_equal(batch['y_ulb'].ravel(), data.unlabeled_labels[idx_ulb])


def test_supervised_has_no_unlabeled_keys():
  it = pipeline.TrainIterator(_data(), global_batch=8, uratio=0, seed=0, local_devices=2)
  assert set(next(it)) == {'x_lb', 'y_lb', 'idx_lb'}


@pytest.mark.parametrize('process_count,local_devices', [(2, 2), (4, 1)])
def test_process_shares_concatenate_to_the_global_batch(process_count, local_devices):
  data = _data()
  whole = pipeline.TrainIterator(data, global_batch=8, uratio=2, seed=3, local_devices=1)
  for step in range(3):
    ref = whole.batch(step)
    shares = [
      pipeline.TrainIterator(
        data,
        global_batch=8,
        uratio=2,
        seed=3,
        start_step=step,
        local_devices=local_devices,
        process_index=p,
        process_count=process_count,
      ).batch(step)
      for p in range(process_count)
    ]
    for key in ref:
      flat = [s[key].reshape((-1,) + s[key].shape[2:]) for s in shares]
      np.testing.assert_array_equal(np.concatenate(flat), ref[key][0], err_msg=key)


def test_restart_at_step_k_yields_the_uninterrupted_batches():
  data = _data(num_labels=12)
  kwargs = dict(global_batch=8, uratio=2, seed=1, local_devices=2)
  straight = pipeline.TrainIterator(data, **kwargs)
  batches = [next(straight) for _ in range(9)]  # 9 * 8 > 12 * 5: crosses labeled epochs
  resumed = pipeline.TrainIterator(data, start_step=5, **kwargs)
  for step in range(5, 9):
    got = next(resumed)
    for key in got:
      np.testing.assert_array_equal(got[key], batches[step][key], err_msg=f'{key} step {step}')
  assert resumed.step == 9


def test_bad_layout_is_refused_with_the_fix():
  with pytest.raises(ValueError, match='not divisible by 2 processes x 3 local devices = 6'):
    pipeline.TrainIterator(
      _data(), global_batch=8, uratio=1, seed=0, local_devices=3, process_count=2
    )
  with pytest.raises(ValueError, match='eval_batch_size'):
    next(
      pipeline.eval_batches(
        image_sources.ArrayImageSource(np.zeros((5, 2, 2, 1), np.uint8)),
        np.zeros(5),
        0,
        local_devices=4,
      )
    )


@pytest.mark.parametrize(
  'num,batch,local_devices,process_count',
  [
    (37, 8, 2, 2),
    (37, 12, 1, 3),
    (5, 8, 2, 4),
    (16, 8, 2, 1),
    # batch sizes that do not divide over the devices: rounded up per device, padded
    (37, 10, 4, 1),
    (37, 500, 8, 1),
    (37, 7, 2, 2),
    (3, 5, 3, 2),
  ],
)
def test_eval_padding_covers_every_example_once(num, batch, local_devices, process_count):
  images = np.arange(num, dtype=np.uint8).reshape(num, 1, 1, 1) + 1  # image = index + 1
  source = image_sources.ArrayImageSource(images)
  labels = np.arange(num) % 3
  per_process = [
    list(
      pipeline.eval_batches(
        source,
        labels,
        batch,
        local_devices=local_devices,
        process_index=p,
        process_count=process_count,
      )
    )
    for p in range(process_count)
  ]
  counts = {len(b) for b in per_process}
  share = -(-num // process_count)
  per_device = -(-batch // (local_devices * process_count))  # batch rounded up to the devices
  assert counts == {-(-share // (per_device * local_devices))}  # same count on every process
  seen = []
  for batches in per_process:
    for b in batches:
      assert b['x'].shape == (local_devices, per_device, 1, 1, 1)
      assert b['mask'].dtype == np.float32 and b['y'].dtype == np.int32
      real = b['mask'].ravel() > 0
      x = b['x'].ravel()
      assert np.all(x[~real] == 0)
      seen += list(x[real].astype(int) - 1)
      np.testing.assert_array_equal(b['y'].ravel()[real], labels[x[real].astype(int) - 1])
  np.testing.assert_array_equal(seen, np.arange(num))  # each once, in order across processes


def test_prefetch_places_in_order_and_closes():
  placed_in = []

  def place(x):
    placed_in.append(threading.current_thread().name)
    return x * 10

  fetcher = pipeline.prefetch(iter(range(100)), 2, place)
  assert [next(fetcher) for _ in range(5)] == [0, 10, 20, 30, 40]
  fetcher.close()
  assert not fetcher._thread.is_alive()
  assert set(placed_in) == {'prefetch'}
  with pytest.raises(StopIteration):
    next(fetcher)
  assert list(pipeline.prefetch(iter(range(3)), 1)) == [0, 1, 2]
  assert list(pipeline.prefetch(iter(range(3)), 0, lambda x: -x)) == [0, -1, -2]


def test_prefetch_reraises_producer_errors():
  def broken():
    yield 1
    raise KeyError('disk gone')

  fetcher = pipeline.prefetch(broken(), 2, None)
  assert next(fetcher) == 1
  with pytest.raises(KeyError, match='disk gone'):
    next(fetcher)
  fetcher.close()


def test_prefetched_train_iterator_matches_direct():
  data = _data()
  kwargs = dict(global_batch=8, uratio=1, seed=2, local_devices=2)
  direct = pipeline.TrainIterator(data, **kwargs)
  with pipeline.prefetch(pipeline.TrainIterator(data, **kwargs), 3, None) as fetched:
    for _ in range(4):
      a, b = next(direct), next(fetched)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
