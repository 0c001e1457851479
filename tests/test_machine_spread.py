"""experiments/machine_spread.py: which runs were trained on two machines, and by how much."""

import json

import pytest

from experiments import machine_spread


def record(name, seed, machine, accuracy, ece, variant='base', boot=None):
  """A result file as study.py writes it, reduced to what the script reads."""
  return {
    'name': name,
    'algorithm': 'fixmatch',
    'variant': variant,
    'labels': 40,
    'seed': seed,
    'metrics': {'accuracy': accuracy, 'ece': ece},
    'ece_bootstrap': boot,
    'provenance': {'train': {'machine_id': machine}},
  }


def write(folder, records):
  folder.mkdir(parents=True, exist_ok=True)
  for r in records:
    (folder / f'{r["name"]}.json').write_text(json.dumps(r))
  return str(folder)


STUDY = [
  record('fixmatch-base-n40-s0', 0, 'aaa', 0.70, 0.10, boot={'low': 0.09, 'high': 0.11}),
  record('fixmatch-base-n40-s1', 1, 'aaa', 0.74, 0.14),
  record('fixmatch-base-n40-s2', 2, 'aaa', 0.72, 0.12),
  record('fixmatch-ls-n40-s0', 0, 'aaa', 0.60, 0.05, variant='ls'),
]


def test_a_rerun_on_another_machine_is_paired_with_the_study_run_and_scaled_by_the_seed_sd():
  rerun = record('fixmatch-base-n40-s0', 0, 'bbb', 0.705, 0.095, boot={'low': 0.08, 'high': 0.11})
  same_machine = record('fixmatch-ls-n40-s0', 0, 'aaa', 0.61, 0.06, variant='ls')
  rows = machine_spread.spread_rows(STUDY, [rerun, same_machine])
  assert len(rows) == 1  # the ls rerun shares the study's machine: no machine pair
  row = rows[0]
  assert row['machines'] == ('aaa', 'bbb') and row['seeds'] == 3
  assert row['accuracy']['b_minus_a'] == pytest.approx(0.005)
  assert row['ECE']['b_minus_a'] == pytest.approx(-0.005)
  # seeds 0.70, 0.74, 0.72: SD 0.02; ECE 0.10, 0.14, 0.12: SD 0.02
  assert row['accuracy']['seed_sd'] == pytest.approx(0.02)
  assert row['ECE']['seed_sd'] == pytest.approx(0.02)
  assert row['ece_bootstrap_half_width'] == pytest.approx(0.015)  # the wider of the two
  assert not row['accuracy']['equal']


def test_equal_digits_on_two_machines_read_yes_and_the_folder_order_sets_study_first(tmp_path):
  study = write(tmp_path / 'runs', STUDY)
  other = write(tmp_path / 'rerun', [record('fixmatch-base-n40-s1', 1, 'ccc', 0.74, 0.14)])
  out = tmp_path / 'spread.md'
  assert machine_spread.main([f'--study={study}', f'--reruns={other}', f'--out={out}']) == 0
  text = out.read_text()
  assert '| fixmatch-base-n40-s1 | aaa → ccc | 74.00 / 74.00 | +0.00 |' in text
  assert text.count('\n| fixmatch') == 1 and '| yes |' in text
  assert 'Largest machine-to-machine move of one run: 0.00 accuracy points, 0.00 ECE' in text


def test_no_pair_and_a_missing_folder_each_give_one_line(tmp_path, capsys):
  study = write(tmp_path / 'runs', STUDY)
  assert machine_spread.main([f'--study={study}']) == 0
  assert capsys.readouterr().out == 'No run name is recorded on two different machines.\n'
  assert machine_spread.main([f'--study={study}', '--reruns=nowhere']) == 2
  assert capsys.readouterr().out.strip() == (
    'error: no such folder: nowhere; give result folders (runs/).'
  )
