"""Pictures: each writes a non-empty PNG and the numbers behind it, which match the input."""

import csv
import json
import math
import os

import numpy as np
import pytest

from cmix_jax import metrics
from cmix_jax import plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _check_png(path):
  assert os.path.getsize(path) > 2000
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC


def _problem(seed=0, n=400, num_classes=4):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, num_classes)) * 2.5  # [n, C]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  labels = np.where(rng.random(n) < 0.7, probs.argmax(1), rng.integers(0, num_classes, n))
  return probs, labels


def test_reliability_diagram_writes_png_and_numbers(tmp_path):
  probs, labels = _problem()
  table = metrics.reliability_table(probs, labels, 10)
  png, data = plots.reliability_diagram(table, str(tmp_path / 'rel.png'), title='t')
  _check_png(png)
  assert data == str(tmp_path / 'rel.data.json')
  with open(data) as f:
    saved = json.load(f)
  np.testing.assert_allclose(saved['count'], table['count'])
  np.testing.assert_allclose(saved['accuracy'], table['accuracy'])
  assert saved['ece'] == pytest.approx(metrics.ece(probs, labels), abs=1e-12)
  # lists (as loop.py writes reliability.json) work too, and an explicit ece is kept
  png2, data2 = plots.reliability_diagram(
    {k: np.asarray(v).tolist() for k, v in table.items()},
    str(tmp_path / 'sub' / 'rel2.png'),
    ece=0.123,
  )
  _check_png(png2)
  with open(data2) as f:
    assert json.load(f)['ece'] == 0.123


def test_table_ece_and_pooling():
  probs, labels = _problem(1)
  table = metrics.reliability_table(probs, labels, 15)
  assert plots.table_ece(table) == pytest.approx(metrics.ece(probs, labels, 15), abs=1e-12)
  a = {
    'bin_lo': [0, 0.5],
    'bin_hi': [0.5, 1],
    'count': [2, 1],
    'mean_conf': [0.3, 0.9],
    'accuracy': [0.5, 1.0],
  }
  b = {
    'bin_lo': [0, 0.5],
    'bin_hi': [0.5, 1],
    'count': [0, 3],
    'mean_conf': [0, 0.7],
    'accuracy': [0, 1 / 3],
  }
  pooled = plots.pool_tables([a, b])
  np.testing.assert_allclose(pooled['count'], [2, 4])
  np.testing.assert_allclose(pooled['mean_conf'], [0.3, (0.9 + 2.1) / 4])
  np.testing.assert_allclose(pooled['accuracy'], [0.5, 0.5])
  with pytest.raises(ValueError, match='same num_bins'):
    plots.pool_tables([a, table])


def test_confidence_histogram_counts(tmp_path):
  probs, labels = _problem(2)
  conf, correct = probs.max(1), probs.argmax(1) == labels
  png, data = plots.confidence_histogram(conf, correct, str(tmp_path / 'hist.png'), num_bins=10)
  _check_png(png)
  with open(data) as f:
    saved = json.load(f)
  assert sum(saved['count_correct']) == correct.sum()
  assert sum(saved['count_wrong']) == (~correct).sum()
  assert saved['accuracy'] == pytest.approx(correct.mean())
  assert saved['count_correct'][9] == np.sum(correct & (conf >= 0.9))


def test_data_map_subsamples_deterministically_and_drops_nonfinite(tmp_path):
  rng = np.random.default_rng(3)
  n = 3000
  variability, confidence = rng.random(n) * 0.5, rng.random(n)
  variability[:10] = np.nan  # never-seen samples
  color = (rng.random(n) < 0.5).astype(np.float32)
  paths = [
    plots.data_map(
      variability,
      confidence,
      str(tmp_path / f'map{i}.png'),
      color=color,
      color_label='pseudo-label correct',
      title='u',
      max_points=500,
    )
    for i in range(2)
  ]
  rows = []
  for png, data in paths:
    _check_png(png)
    with open(data) as f:
      rows.append(list(csv.DictReader(f)))
  assert len(rows[0]) == 500 and rows[0] == rows[1]
  idx = np.array([int(r['index']) for r in rows[0]])
  assert idx.min() >= 10 and len(np.unique(idx)) == 500
  np.testing.assert_allclose([float(r['confidence']) for r in rows[0]], confidence[idx])
  np.testing.assert_allclose([float(r['color']) for r in rows[0]], color[idx])
  # continuous colour and no colour
  _check_png(
    plots.data_map(variability, confidence, str(tmp_path / 'c.png'), color=rng.random(n))[0]
  )
  png, data = plots.data_map(variability[:50], confidence[:50], str(tmp_path / 'n.png'))
  _check_png(png)
  with open(data) as f:
    assert len(list(csv.DictReader(f))) == 40


def test_training_curves(tmp_path):
  history = [
    {'step': s, 'accuracy': 0.5 + s / 1000, 'ece': 0.1 - s / 10000, 'nll': None}
    for s in (300, 100, 200)
  ]
  png, data = plots.training_curves(history, str(tmp_path / 'curves.png'))
  _check_png(png)
  with open(data) as f:
    saved = json.load(f)
  assert list(saved) == ['accuracy', 'ece']
  assert saved['accuracy']['step'] == [100, 200, 300]
  np.testing.assert_allclose(saved['ece']['value'], [0.09, 0.08, 0.07])


def test_multi_reliability(tmp_path):
  tables = {f'run{i}': metrics.reliability_table(*_problem(i), 10) for i in range(3)}
  for overlay in (False, True):
    png, data = plots.multi_reliability(
      tables, str(tmp_path / f'multi{overlay}.png'), title='x', overlay=overlay
    )
    _check_png(png)
    with open(data) as f:
      saved = json.load(f)['tables']
    assert sorted(saved) == ['run0', 'run1', 'run2']
    assert saved['run1']['ece'] == pytest.approx(metrics.ece(*_problem(1)), abs=1e-12)


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match='lacks keys'):
    plots.reliability_diagram({'count': [1]}, str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='equal length'):
    plots.confidence_histogram([0.5, 0.6], [True], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='equal lengths'):
    plots.data_map([0.1, 0.2], [0.5], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='step'):
    plots.training_curves([{'accuracy': 1.0}], str(tmp_path / 'x.png'))
  with pytest.raises(ValueError, match='non-empty'):
    plots.multi_reliability({}, str(tmp_path / 'x.png'))
  assert not os.path.exists(tmp_path / 'x.png')


def test_forest_plot_writes_every_row_and_its_numbers(tmp_path):
  rows = [
    {
      'label': 'P1 fused − base',
      'group': 'P1',
      'mean': -2.0,
      'low': -3.5,
      'high': -0.5,
      'shown': True,
    },
    {'label': 'P2 two-pass − control', 'group': 'P2', 'mean': 0.3, 'low': -1.0, 'high': 1.6},
    {'label': 'one seed only', 'group': 'P2', 'mean': 0.1, 'low': math.nan, 'high': math.nan},
  ]
  png, data = plots.forest_plot(rows, str(tmp_path / 'forest.png'), title='t')
  assert os.path.getsize(png) > 0
  saved = json.loads(open(data).read())['rows']
  assert [r['label'] for r in saved] == [r['label'] for r in rows]  # top to bottom, as given
  assert saved[0]['shown'] is True and saved[1]['shown'] is None
  assert saved[2]['low'] is None and saved[2]['mean'] == 0.1  # NaN written as null
  with pytest.raises(ValueError, match='at least one row'):
    plots.forest_plot([], str(tmp_path / 'empty.png'))
