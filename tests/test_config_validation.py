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
    ('data.eval_batch_size', 20, 'not divisible by the 8 devices'),
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
