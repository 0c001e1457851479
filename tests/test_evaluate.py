"""evaluate.py: a checkpoint's table, JSON and pictures; clear errors for bad workdirs."""

import json
import os
import shutil

import pytest

from cmix_jax import checkpointing
from cmix_jax import evaluate
from tests import helpers


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('evaluate') / 'run')
  helpers.driver(f'--workdir={workdir}', '--set=data.val_size=8')
  return workdir


def test_evaluate_reproduces_training_eval_and_writes_outputs(trained, tmp_path):
  out = str(tmp_path / 'out')
  report = evaluate.evaluate_workdir(trained, temperature_scaling=True, out=out)
  with open(os.path.join(trained, 'eval.json')) as f:
    final = json.load(f)['final']
  assert report['step'] == 4
  for key in ('accuracy', 'ece', 'nll', 'brier'):
    assert report['metrics'][key] == pytest.approx(final[key], rel=1e-5, abs=1e-6)
  assert (
    report['temperature'] > 0 and 'validation slice (8 examples)' in report['temperature_fit_on']
  )
  assert report['ts_metrics']['accuracy'] == pytest.approx(report['metrics']['accuracy'])
  for name in (
    'eval_latest_4.json',
    'eval_latest_4_reliability.png',
    'eval_latest_4_confidence.png',
    'eval_latest_4_ts_reliability.png',
  ):
    assert os.path.getsize(os.path.join(out, name)) > 0
  table = evaluate.format_table(report)
  assert '+TS (T=' in table and '| ece |' in table


def test_missing_checkpoint_names_the_workdir(trained, tmp_path):
  workdir = str(tmp_path / 'no_ckpt')
  os.makedirs(workdir)
  shutil.copy(os.path.join(trained, 'config.json'), workdir)
  with pytest.raises(evaluate.EvaluateError, match='no checkpoint in .*no_ckpt'):
    evaluate.evaluate_workdir(workdir)
  with pytest.raises(evaluate.EvaluateError, match='no config.json'):
    evaluate.evaluate_workdir(str(tmp_path))


def test_corrupted_checkpoints_name_the_directory(trained, tmp_path):
  workdir = str(tmp_path / 'corrupt')
  shutil.copytree(trained, workdir)
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints')):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'not a checkpoint')
  with pytest.raises(checkpointing.CheckpointError, match='corrupt/checkpoints'):
    evaluate.evaluate_workdir(workdir)
