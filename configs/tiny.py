"""A tiny job on fake data (12x12x1, 4 classes, a small CNN): the tests' and the fault drill's.

  python -m cmix_jax.main --config=configs/tiny.py --workdir=runs/tiny          # 4 steps
  python -m cmix_jax.main --config=configs/tiny.py:faults --workdir=runs/faults # 300 steps
`faults` is the job of `python -m experiments.faults`: FixMatch + CalibrateMix (warm-up 50),
a checkpoint every 100 steps. In code, `tiny.config(model=, algorithm=, calibratemix=, steps=)`
builds the tests' variants and `fake_data(config, ...)` puts any config on fake data
(experiments/bench.py's CIFAR-shaped jobs).
"""

import ml_collections

from configs import default

FAULT_STEPS = 300  # the fault drill's run length
FAULT_CHECKPOINT_EVERY = 100


def fake_data(
  config: ml_collections.ConfigDict,
  num_train: int = 256,
  num_test: int = 40,
  image_shape=(12, 12, 1),
  num_classes: int = 4,
) -> ml_collections.ConfigDict:
  """Sets `config` (in place, and returns it) to draw fake images of `image_shape`."""
  config.data.name = 'fake'
  config.data.fake = ml_collections.ConfigDict(
    dict(
      num_train=num_train,
      num_test=num_test,
      image_shape=tuple(image_shape),
      num_classes=num_classes,
      seed=0,
    )
  )
  return config


def config(
  model: str = 'cnn_small_nobn',
  algorithm: str = 'fixmatch',
  calibratemix: bool = False,
  steps: int = 4,
) -> ml_collections.ConfigDict:
  """FixMatch (or `algorithm`) on 12x12x1 fake data, 16 labeled + 32 unlabeled per step."""
  c = fake_data(default.get_config())
  c.algorithm = algorithm
  c.num_train_steps = steps
  c.log_every = 2
  c.eval_every = steps
  c.checkpoint_every = 2
  c.progress_bar = False
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


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """'' : the tests' default job; 'faults': the fault drill's."""
  if not arg:
    return config()
  if arg != 'faults':
    raise ValueError(f'configs/tiny.py takes no argument or "faults", not {arg!r}.')
  c = config(calibratemix=True, steps=FAULT_STEPS)
  c.log_every = 50
  c.checkpoint_every = FAULT_CHECKPOINT_EVERY
  c.calibratemix.warmup_steps = 50
  c.data.prefetch = default.get_config().data.prefetch  # the drill has always run with it
  return c
