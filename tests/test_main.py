"""main / train_and_evaluate: every algorithm +- CalibrateMix and the baselines run (fake data);
the command line runs on the real default data and shows a readable console."""

import json
import math
import os

import pytest

from cmix_jax import train
from configs import tiny
from tests import helpers

needs_fmnist = pytest.mark.skipif(
  not os.path.isdir('/usr/share/datasets/fashion-mnist'),
  reason='the default data needs the Debian package dataset-fashion-mnist (make install)',
)

STEPS = 3  # CalibrateMix warm-up 0: the first step (it = 0) is base, steps 2 and 3 mix
SMALL = {  # the default config, shrunk to a few cheap steps on one device
  'num_train_steps': STEPS,
  'log_every': 1,
  'eval_every': STEPS,
  'checkpoint_every': STEPS,
  'num_devices': 1,
  'progress_bar': False,
  'data.batch_size': 8,
  'data.uratio': 2,
  'data.eval_batch_size': 1000,
  'data.val_size': 0,
  'eval.plots': False,
  'calibratemix.warmup_steps': 0,
}
# Each +CalibrateMix variant runs its base algorithm's plain step first (step 1 is warm-up),
# so these cover every base with and without CalibrateMix at one compile pair each; the
# command-line test below adds SoftMatch + CalibrateMix with the reference's two passes.
VARIANTS = {
  'supervised+label_smoothing': {'algorithm': 'supervised', 'ssl.label_smoothing': 0.1},
  'fixmatch+calibratemix': {'calibratemix.enabled': True},
  'flexmatch+calibratemix': {'algorithm': 'flexmatch', 'calibratemix.enabled': True},
  'softmatch+calibratemix_passes1': {
    'algorithm': 'softmatch',
    'calibratemix.enabled': True,
    'calibratemix.passes': 1,
  },
  'softmatch+random_mixup': {
    'algorithm': 'softmatch',
    'calibratemix.enabled': True,
    'calibratemix.random_pairing': True,
  },
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """One TFDS data dir for the module: Fashion-MNIST is stored there once, on first use."""
  return str(tmp_path_factory.mktemp('tfds'))


def _config(overrides: dict):
  """The tiny fake-data config, shrunk like SMALL, with `overrides`."""
  config = tiny.config(steps=STEPS)
  small = {k: v for k, v in SMALL.items() if not k.startswith('data.')}
  for key, value in {**small, **overrides}.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def _train_logs(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [r for r in map(json.loads, f) if r['kind'] == 'train']


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_every_variant_trains_and_evaluates(variant, tmp_path):
  workdir = str(tmp_path / variant)
  overrides = VARIANTS[variant]
  train.train_and_evaluate(_config(overrides), workdir)
  with open(os.path.join(workdir, 'eval.json')) as f:
    report = json.load(f)
  assert report['step'] == STEPS and report['selection'] == 'final'
  assert 0.0 <= report['accuracy'] <= 1.0 and 0.0 <= report['ece'] <= 1.0
  assert math.isfinite(report['nll']) and report['nll'] > 0
  # The precision the run computed in: on the CPU test devices, 'auto' is XLA's default.
  assert report['precision'] == dict(
    setting='auto', resolved='default', conv='default', matmul='default'
  )
  logs = _train_logs(workdir)
  assert [r['step'] for r in logs] == list(range(1, STEPS + 1))
  assert all(math.isfinite(r['loss']) for r in logs)
  mixing = overrides.get('calibratemix.enabled', False)
  # Step 1 (it = 0 <= warm-up) is base loss only; steps 2..3 add the mixup loss, and only then.
  assert ('mixup_loss' in logs[0]) is False
  assert all(('mixup_loss' in r) == mixing for r in logs[1:])
  if mixing:
    assert all(r['mixup_loss'] > 0 for r in logs[1:])
  assert ('unsup_loss' in logs[-1]) == (overrides.get('algorithm') != 'supervised')


@needs_fmnist
def test_main_module_runs_from_the_command_line(data_dir, tmp_path):
  """The user's entry point: `python -m cmix_jax.main --config=configs/default.py ...`."""
  workdir = str(tmp_path / 'cli')
  flags = [
    f'--config.{k}={v}'
    for k, v in {
      **SMALL,
      'data.data_dir': data_dir,
      'algorithm': 'softmatch',
      'calibratemix.enabled': True,
      'calibratemix.passes': 2,
    }.items()
  ]
  # a plain single-device process (XLA_FLAGS unset), as a user starts it
  proc = helpers.python_module(
    'cmix_jax.main', '--config=configs/default.py', f'--workdir={workdir}', *flags
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'eval.json')) as f:
    report = json.load(f)
  assert report['step'] == STEPS
  # The console: the plan, then the summary of the selected checkpoint; library INFO lines
  # (orbax's per-save lines) only in the run's log file.
  assert 'fashion_mnist_debian: 40 labeled, 0 validation, 60000 unlabeled' in proc.stdout
  assert f'accuracy {100 * report["accuracy"]:.2f} %' in proc.stdout
  for library_line in ('CheckpointManager', 'Saving checkpoint', 'Generating'):
    assert library_line not in proc.stdout + proc.stderr
  with open(os.path.join(workdir, 'train.log')) as f:
    assert 'CheckpointManager' in f.read()
  assert ['mixup_loss' in r for r in _train_logs(workdir)] == [False, True, True]
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['algorithm'] == 'softmatch' and saved['calibratemix']['enabled'] is True
  assert saved['num_train_steps'] == STEPS
