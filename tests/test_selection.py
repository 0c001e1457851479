"""Model selection: best_val/best_test keep the checkpoint a scripted accuracy sequence says."""

import json
import os

import numpy as np
import pytest

from cmix_jax import evaluate
from cmix_jax import run_setup
from cmix_jax import train
from cmix_jax.data import catalog
from cmix_jax.data import ssl_data
from configs import tiny

# Accuracy reported at steps 1..4 for the split that selects: the best is step 2 (0.75);
# step 4 ties it and must not replace it (strictly better only, like USB).
SCRIPTED = (0.25, 0.75, 0.5, 0.75)


def _scripted_evaluate(monkeypatch, selecting_split: str) -> list:
  """Wraps train.evaluate so `selecting_split` reports SCRIPTED; returns the test results seen."""
  real_evaluate = train.evaluate
  calls = {'n': 0}
  test_results = []

  def fake(run, state, split='test'):
    result = real_evaluate(run, state, split)
    if split == 'test':
      test_results.append(dict(result['metrics']))
    if split == selecting_split:
      result['metrics'] = dict(result['metrics'], accuracy=SCRIPTED[calls['n']])
      calls['n'] += 1
    return result

  monkeypatch.setattr(train, 'evaluate', fake)
  return test_results


def _config(selection: str, val_size: int):
  config = tiny.config(steps=4)
  config.eval_every = 1
  config.num_devices = 1
  config.data.val_size = val_size
  config.eval.selection = selection
  return config


@pytest.mark.parametrize('selection,split', [('best_val', 'val'), ('best_test', 'test')])
def test_selection_keeps_the_checkpoint_the_sequence_says(selection, split, monkeypatch, tmp_path):
  test_results = _scripted_evaluate(monkeypatch, split)
  workdir = str(tmp_path / selection)
  report = train.train_and_evaluate(_config(selection, val_size=8), workdir)
  assert report['selection'] == selection and report['step'] == 2
  assert len(test_results) == 4
  expected = test_results[1]  # the test metrics of step 2 (scripted if best_test)
  for key in ('ece', 'nll', 'brier'):
    assert report[key] == pytest.approx(expected[key])
  assert report['best']['step'] == 2 and report['final']['step'] == 4
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f)['selection'] == selection
  run = run_setup.build_run(evaluate.load_config(workdir), workdir, write=False)
  assert list(run.best_manager.all_steps()) == [2]
  monkeypatch.undo()
  # `evaluate --which=best` re-evaluates exactly that checkpoint.
  best = evaluate.evaluate_workdir(workdir, which='best', out=str(tmp_path / 'out'))
  assert best['step'] == 2
  for key in ('ece', 'nll', 'brier'):
    assert best['metrics'][key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6)


def test_final_selection_reports_the_last_step_and_keeps_no_best(monkeypatch, tmp_path):
  _scripted_evaluate(monkeypatch, 'test')
  workdir = str(tmp_path / 'final')
  report = train.train_and_evaluate(_config('final', val_size=0), workdir)
  assert report['selection'] == 'final' and report['step'] == 4
  assert report['accuracy'] == SCRIPTED[-1]
  best_dir = os.path.join(workdir, 'best')
  assert not (os.path.isdir(best_dir) and any(n.isdigit() for n in os.listdir(best_dir)))


def test_validation_slice_is_disjoint_seeded_and_never_trained_on():
  raw = catalog.open_dataset(
    'fake', '', dict(num_train=256, num_test=40, image_shape=(12, 12, 1), num_classes=4, seed=0)
  )
  data = ssl_data.make_ssl_data(raw, num_labels=32, seed=3, val_size=20)
  again = ssl_data.make_ssl_data(raw, num_labels=32, seed=3, val_size=20)
  other = ssl_data.make_ssl_data(raw, num_labels=32, seed=4, val_size=20)
  np.testing.assert_array_equal(data.val_idx, again.val_idx)
  np.testing.assert_array_equal(data.labeled_idx, again.labeled_idx)
  assert not np.array_equal(data.val_idx, other.val_idx)
  assert len(np.intersect1d(data.val_idx, data.labeled_idx)) == 0
  # Never trained on: neither labeled nor in the unlabeled stream (whose hidden labels would
  # otherwise leak through pseudo-labels); positions index the train split, not the test split.
  assert len(np.intersect1d(data.val_idx, data.unlabeled_train_idx)) == 0
  assert data.val_idx.max() < len(raw.train_labels)
  assert np.bincount(raw.train_labels[data.val_idx], minlength=4).tolist() == [5, 5, 5, 5]
