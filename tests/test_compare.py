"""experiments/compare.py on fake workdirs: mean +- std, USB difference, paired dECE, files."""

import csv
import json
import os
import subprocess
import sys

import pytest

from experiments import compare
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REFERENCE = """# USB numbers (test copy)
# a second comment line
algorithm,dataset,num_labels,error_mean,error_std
fixmatch,cifar10,40,8.33,1.41
softmatch,svhn,250,2.15,0.05
"""
PAPER = """algorithm,dataset,num_labels,error_mean,error_std,ece_mean,ece_std
FixMatch + CalibrateMix,cifar10,40,7.50,0.50,1.20,0.10
"""


def write_run(
  root,
  name,
  algorithm='fixmatch',
  data='cifar10',
  labels=40,
  seed=0,
  cmix=False,
  random_pairing=False,
  error=0.1,
  ece=0.05,
  passes=2,
  finished=True,
):
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  config = {
    'algorithm': algorithm,
    'seed': seed,
    'data': {'name': data, 'num_labels': labels},
    'calibratemix': {'enabled': cmix, 'random_pairing': random_pairing, 'passes': passes},
  }
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    json.dump(config, f)
  if finished:
    report = {
      'accuracy': 1 - error,
      'error_rate': error,
      'ece': ece,
      'ece_15': ece + 0.01,
      'nll': 0.3 + error,
      'brier': 0.2,
      'selection': 'best_test',
      'step': 1000,
      'final': {'accuracy': 0.5},
    }
    with open(os.path.join(workdir, 'eval.json'), 'w') as f:
      json.dump(report, f)
    with open(os.path.join(workdir, 'reliability.json'), 'w') as f:
      json.dump(helpers.RELIABILITY_TABLE, f)
  return workdir


@pytest.fixture
def study(tmp_path):
  runs = tmp_path / 'runs'
  for seed, (err, ece) in enumerate([(0.10, 0.05), (0.12, 0.07), (0.14, 0.09)]):
    write_run(runs, f'fix_base_{seed}', seed=seed, error=err, ece=ece)
  for seed, (err, ece) in enumerate([(0.09, 0.02), (0.11, 0.04)]):
    write_run(runs, f'fix_cmix_{seed}', seed=seed, cmix=True, error=err, ece=ece)
  write_run(runs, 'fix_rand_0', seed=0, cmix=True, random_pairing=True, error=0.2, ece=0.15)
  write_run(
    runs,
    'soft_svhn_0',
    algorithm='softmatch',
    data='svhn_cropped',
    labels=250,
    error=0.03,
    ece=0.01,
  )
  write_run(runs, 'unfinished', seed=5, finished=False)
  (tmp_path / 'ref.csv').write_text(REFERENCE)
  (tmp_path / 'paper.csv').write_text(PAPER)
  return tmp_path


def _rows(study_dir, group_by=()):
  runs = compare.load_runs([str(study_dir / 'runs')], group_by)
  reference = compare.load_reference(str(study_dir / 'ref.csv'))
  paper = compare.load_reference(str(study_dir / 'paper.csv'))
  return {r['name']: r for r in compare.aggregate(runs, reference, paper)}, runs


def test_aggregate_mean_std_reference_and_paired_delta(study):
  rows, runs = _rows(study)
  assert len(runs) == 7  # the unfinished run is not loaded
  assert list(rows) == [
    'cifar10/40 fixmatch',
    'cifar10/40 fixmatch +CalibrateMix',
    'cifar10/40 fixmatch +random mixup',
    'svhn/250 softmatch',
  ]
  base = rows['cifar10/40 fixmatch']
  assert base['n_seeds'] == 3 and base['seeds'] == '0 1 2'
  assert base['error_rate_mean'] == pytest.approx(0.12)
  assert base['error_rate_std'] == pytest.approx(0.02)  # sample std of .10 .12 .14
  assert base['ece_mean'] == pytest.approx(0.07)
  assert base['usb_error_mean'] == 8.33 and base['usb_diff'] == pytest.approx(12.0 - 8.33)
  assert base['delta_n'] == 0
  cmix = rows['cifar10/40 fixmatch +CalibrateMix']
  assert cmix['usb_error_mean'] == 8.33  # the base's published number
  assert cmix['delta_n'] == 2  # seeds 0 and 1 only
  assert cmix['delta_ece_mean'] == pytest.approx(-0.03)  # .02-.05, .04-.07
  assert cmix['delta_ece_std'] == pytest.approx(0.0, abs=1e-12)
  assert cmix['delta_error_mean'] == pytest.approx(-0.01)
  assert cmix['paper_error_mean'] == 7.5 and cmix['paper_ece_mean'] == 1.2
  assert base['paper_error_mean'] != base['paper_error_mean']  # NaN: not in the paper CSV
  svhn = rows['svhn/250 softmatch']  # svhn_cropped -> svhn
  assert svhn['usb_error_mean'] == 2.15 and svhn['usb_diff'] == pytest.approx(3.0 - 2.15)


def test_markdown_table(study):
  write_run(study / 'runs', 'fix_cmix_9', seed=9, cmix=True, error=0.10, ece=0.03)  # no base
  rows, _ = _rows(study)
  text = compare.format_markdown(list(rows.values()), ['USB numbers (test copy)'])
  lines = text.splitlines()
  base = next(l for l in lines if l.startswith('| cifar10 | 40 | fixmatch |'))
  cells = [c.strip() for c in base.strip('|').split('|')]
  assert cells[3:8] == ['3', 'best_test', '12.00 ± 2.00', '8.33 ± 1.41', '+3.67']
  assert cells[9] == '7.00 ± 2.00'  # ECE %
  cmix = next(l for l in lines if '+CalibrateMix' in l)
  cells = [c.strip() for c in cmix.strip('|').split('|')]
  assert cells[3] == '3' and cells[5] == '10.00 ± 1.00'
  assert cells[8] == '7.50 ± 0.50'  # paper error
  assert cells[10] == '-3.00 ± 0.00 (2 paired)'
  assert cells[11] == '1.20 ± 0.10'  # paper ECE
  svhn = next(l for l in lines if l.startswith('| svhn | 250 | softmatch |'))
  assert '| 3.00 | 2.15 ± 0.05 | +0.85 |' in svhn  # one seed: no std
  assert 'Reference note: USB numbers (test copy)' in text


def test_group_by_and_duplicates(study):
  write_run(study / 'runs', 'fix_base_0_pass1', seed=0, passes=1, error=0.3)
  with pytest.raises(ValueError, match='same setting and seed 0'):
    compare.load_runs([str(study / 'runs')])
  rows, _ = _rows(study, ('calibratemix.passes',))
  assert rows['cifar10/40 fixmatch [passes=1]']['error_rate_mean'] == pytest.approx(0.3)
  assert rows['cifar10/40 fixmatch [passes=2]']['n_seeds'] == 3
  text = compare.format_markdown(list(rows.values()))
  assert '| calibratemix.passes |' in text.splitlines()[0]
  with pytest.raises(ValueError, match='dotted config fields'):
    compare.load_runs([str(study / 'runs')], ('calibratemix.nope',))


def test_cli_writes_table_csv_and_reliability(study):
  out = study / 'out'
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.compare',
      str(study / 'runs'),
      f'--reference={study / "ref.csv"}',
      f'--paper={study / "paper.csv"}',
      f'--out={out}',
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  assert (
    '| cifar10 | 40 | fixmatch | 3 | best_test | 12.00 ± 2.00 | 8.33 ± 1.41 | +3.67 |'
    in result.stdout
  )
  assert 'unfinished' in result.stderr
  assert (out / 'table.md').read_text() in result.stdout + '\n'
  with open(out / 'table.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 4 and float(rows[0]['error_rate_mean']) == pytest.approx(0.12)
  assert (out / 'reliability.png').stat().st_size > 2000
  pooled = json.loads((out / 'reliability.data.json').read_text())['tables']
  key = 'cifar10/40 fixmatch (3 seeds)'
  assert pooled[key]['count'] == [30.0, 90.0]  # three identical tables pooled


def test_bad_reference_columns(tmp_path):
  (tmp_path / 'bad.csv').write_text('algo,dataset\nfixmatch,cifar10\n')
  with pytest.raises(ValueError, match='must have columns'):
    compare.load_reference(str(tmp_path / 'bad.csv'))
