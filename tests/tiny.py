"""Tiny configs on fake data for fast tests of the whole training path."""

import ml_collections

from configs import default


def config(
  model: str = 'cnn_small_nobn',
  algorithm: str = 'fixmatch',
  calibratemix: bool = False,
  steps: int = 4,
) -> ml_collections.ConfigDict:
  """FixMatch (or `algorithm`) on 12x12x1 fake data, 16 labeled + 32 unlabeled per step."""
  c = default.get_config()
  c.algorithm = algorithm
  c.num_train_steps = steps
  c.log_every = 2
  c.eval_every = steps
  c.checkpoint_every = 2
  c.progress_bar = False
  c.data.name = 'fake'
  c.data.fake = ml_collections.ConfigDict(
    dict(num_train=256, num_test=40, image_shape=(12, 12, 1), num_classes=4, seed=0)
  )
  c.data.num_labels = 32
  c.data.val_size = 0
  c.data.batch_size = 16
  c.data.uratio = 2
  c.data.eval_batch_size = 16
  c.data.prefetch = 1
  c.model.name = model
  c.ssl.p_cutoff = 0.3  # so the tiny model's pseudo-labels pass the threshold
  c.calibratemix.enabled = calibratemix
  c.calibratemix.warmup_steps = 1
  c.eval.plots = False
  return c
