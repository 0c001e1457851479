"""experiments/common.py: the training command, run bookkeeping, variants, the timer."""

import os

import pytest

from experiments import common


def test_main_command_orders_config_workdir_overrides_flags():
  argv = common.main_command('c.py', 'w', {'seed': 3, 'calibratemix.enabled': True}, ['--x'], 'py')
  assert argv == [
    'py',
    '-m',
    'cmix_jax.main',
    '--config=c.py',
    '--workdir=w',
    '--config.seed=3',
    '--config.calibratemix.enabled=True',
    '--x',
  ]
  assert common.main_command('c.py:a', 'w', python='py', data_dir='d')[3:] == [
    '--config=c.py:a',
    '--config.data.data_dir=d',
    '--workdir=w',
  ]


def test_load_config_takes_an_argument_and_names_a_missing_file():
  assert common.load_config('configs/default.py').data.name == 'fashion_mnist_debian'
  assert common.load_config('configs/classic_cv.py:fixmatch,cifar10,40,0').data.name == 'cifar10'
  with pytest.raises(FileNotFoundError, match='configs/nope.py'):
    common.load_config('configs/nope.py')


def test_run_bookkeeping(tmp_path):
  assert common.run_name('fixmatch', 'cmix', 0) == 'fixmatch-cmix-s0'
  assert common.run_name('softmatch', 'base', 2, 40) == 'softmatch-base-n40-s2'
  workdir = tmp_path / 'run'
  workdir.mkdir()
  assert not common.is_finished(str(workdir))
  (workdir / 'eval.json').write_text('{}')
  assert common.is_finished(str(workdir))
  assert common.log_path(str(workdir), 'logs') == str(workdir) + '.log'
  assert common.log_path('gs://b/runs/x/', 'logs') == os.path.join('logs', 'x.log')
  path = str(tmp_path / 'out' / 'r.json')
  common.write_json(path, {'b': float('nan'), 'a': 1})
  with open(path) as f:
    assert f.read() == '{\n "a": 1,\n "b": NaN\n}'


def test_variant_of_a_config_is_its_most_specific_variant():
  cmix = {'calibratemix': {'enabled': True, 'random_pairing': False, 'passes': 2}}
  assert common.variant_of({}) == 'base' and common.variant_of({'calibratemix': None}) == 'base'
  assert common.variant_of(cmix) == 'cmix'
  assert common.variant_of({'calibratemix': {**cmix['calibratemix'], 'passes': 1}}) == 'cmix_fused'
  randmix = {'calibratemix': {'enabled': True, 'random_pairing': True}}
  assert common.variant_of(randmix, ('base', 'cmix', 'randmix')) == 'randmix'
  fused = {'calibratemix': {'enabled': True, 'passes': 1}}
  assert common.variant_of(fused, ('base', 'cmix', 'randmix')) == 'cmix'  # compare.py's arms
  with pytest.raises(ValueError, match='include base'):
    common.variant_of({}, ('cmix',))


def test_median_seconds_warms_up_then_times_each_call():
  calls = []
  seconds = common.median_seconds(lambda: calls.append(1), 3, warmup=2)
  assert len(calls) == 5 and seconds >= 0
