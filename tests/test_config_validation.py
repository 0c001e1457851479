"""config_validation.py: each bad config gives one line naming the fix, before any write."""

import os

import pytest

from cmix_jax import config_validation
from cmix_jax import run_setup
from cmix_jax.data import datasets
from tests import tiny


def _set(config, key, value):
  *parents, leaf = key.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


BAD = [
    ('algorithm', 'meanteacher', 'unknown algorithm'),
    ('model.name', 'vit', 'unknown model'),
    ('data.name', 'mnist_typo', 'unknown data set'),
    ('data.num_labels', 30, 'not divisible by the 4 classes'),
    ('data.num_labels', 1000, 'exceeds the 256 training examples'),
    ('data.batch_size', 12, 'not divisible by the 8 devices'),
    ('num_train_steps', 0, 'must be positive'),
    ('data.batch_size', -8, 'must be positive'),
    ('data.uratio', 0, 'uratio >= 1'),
    ('calibratemix.warmup_steps', 10, 'warmup_steps=10 must be in'),
    ('calibratemix.passes', 3, 'passes=3'),
    ('calibratemix.difficulty', 'loss', 'difficulty'),
    ('eval.selection', 'best_val', 'val_size'),
    ('model.dtype', 'float16', 'model.dtype'),
    ('model.bn_momentum', 1.0, 'bn_momentum=1.0'),
    ('parallel_backend', 'xmap', 'parallel_backend'),
    ('calibratemix.pair_scope', 'world', 'pair_scope=.world.: use global'),
    ('calibratemix.pair_downsample', 0, 'pair_downsample=0'),
    ('distributed.mode', 'mpi', "distributed.mode='mpi': use one of"),
]


@pytest.mark.parametrize('key,value,message', BAD)
def test_bad_config_gives_one_clear_line_before_any_write(key, value, message, tmp_path):
  config = tiny.config(calibratemix=True)
  config.num_devices = 8
  _set(config, key, value)
  workdir = str(tmp_path / 'never_written')
  with pytest.raises(config_validation.ConfigError, match=message) as info:
    run_setup.build_run(config, workdir)
  assert len(str(info.value).splitlines()) == 2  # header + exactly one problem
  assert not os.path.exists(workdir)


def test_device_pair_scope_needs_two_labeled_samples_per_device():
  config = tiny.config(calibratemix=True)  # batch 16
  config.calibratemix.pair_scope = 'device'
  assert config_validation.config_errors(config, 8, 4, 256) == []
  errors = config_validation.config_errors(config, 16, 4, 256)
  assert any('data.batch_size >= 32 or pair_scope=global' in e for e in errors)
  config.calibratemix.pair_scope = 'global'  # one labeled sample per device is fine
  config.data.batch_size, config.data.uratio = 8, 2
  assert config_validation.config_errors(config, 8, 4, 256) == []


def test_pair_downsample_applies_to_pixels_only():
  config = tiny.config(calibratemix=True)
  config.calibratemix.pair_downsample = 2
  assert config_validation.config_errors(config, 8, 4, 256) == []
  config.calibratemix.pair_space = 'features'
  errors = config_validation.config_errors(config, 8, 4, 256)
  assert errors == ['calibratemix.pair_downsample=2 shrinks images, but pair_space=features '
                    'pairs on features: set pair_downsample=1.']


def test_calibratemix_on_supervised_is_refused():
  config = tiny.config(algorithm='supervised', calibratemix=True)
  errors = config_validation.config_errors(config, num_devices=1)
  assert any('needs unlabeled data' in e for e in errors)


def test_missing_data_set_says_how_to_get_it(tmp_path):
  config = tiny.config()
  config.data.name = 'cifar10'
  config.data.num_labels = 40
  config.data.data_dir = str(tmp_path / 'empty')
  with pytest.raises(datasets.DataNotFoundError, match='tfds build cifar10'):
    run_setup.build_run(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_good_config_has_no_errors():
  assert config_validation.config_errors(tiny.config(calibratemix=True), 8, 4, 256) == []
