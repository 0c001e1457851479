"""experiments/study.py and study_analysis.py: grid, skip/resume, paired intervals, AUROC."""

import json
import math
import os

import numpy as np
import pytest

from experiments import common
from experiments import study
from experiments import study_analysis as analysis

T_975_DF2 = 4.302652729911275  # Student-t 97.5 % quantile, 2 degrees of freedom


# ---------------------------------------------------------------- grid and listing


def test_grid_lists_every_cell_seed_by_seed_with_its_overrides():
  runs = study.grid([0, 1, 2])
  assert len(runs) == 3 * (1 + 2 * 6) and len({r['name'] for r in runs}) == len(runs)
  assert [r['seed'] for r in runs] == [0] * 13 + [1] * 13 + [2] * 13  # complete pairs first
  by_name = {r['name']: r['overrides'] for r in runs}
  assert by_name['supervised-base-s0'] == {'algorithm': 'supervised', 'seed': 0}
  assert by_name['softmatch-split_random-s2'] == {
    'algorithm': 'softmatch',
    'seed': 2,
    'calibratemix.enabled': True,
    'calibratemix.pair_k_frac': 1.0,
  }
  assert by_name['fixmatch-control-s1'] == {
    'algorithm': 'fixmatch',
    'seed': 1,
    'calibratemix.enabled': True,
    'calibratemix.second_pass_only': True,
  }
  assert 'fixmatch-randmix-s1' not in by_name  # kept as a variant, not in the default grid
  assert study.grid([1], variants=('randmix',))[1]['overrides']['calibratemix.random_pairing']
  assert by_name['fixmatch-ls-s1'] == {
    'algorithm': 'fixmatch',
    'seed': 1,
    'ssl.label_smoothing': 0.1,
  }
  assert by_name['fixmatch-cmix_fused-s0']['calibratemix.passes'] == 1
  assert len(study.grid([5], variants=('base', 'cmix'))) == 5
  by_labels = study.grid([0, 1], variants=('base',), labels=(40, 250))
  assert [r['name'] for r in by_labels[:6]] == [
    'supervised-base-n40-s0',
    'fixmatch-base-n40-s0',
    'softmatch-base-n40-s0',
    'supervised-base-n250-s0',
    'fixmatch-base-n250-s0',
    'softmatch-base-n250-s0',
  ]  # seed by seed, each label count's cells together
  assert by_labels[4]['overrides'] == {'algorithm': 'fixmatch', 'seed': 0, 'data.num_labels': 250}
  with pytest.raises(ValueError, match='unknown variants'):
    study.grid([0], variants=('cmx',))


def test_dry_run_lists_runs_states_and_passes_config_overrides(tmp_path, capsys):
  out, root = tmp_path / 'out', tmp_path / 'runs'
  common.write_json(study.result_path(str(out), 'supervised-base-s0'), {'seed': 0})
  (root / 'fixmatch-base-s0').mkdir(parents=True)
  (root / 'fixmatch-base-s0' / 'eval.json').write_text('{}')
  (root / 'fixmatch-cmix-s0' / 'checkpoints').mkdir(parents=True)
  study.main(
    [
      '--dry_run',
      '--seeds=0',
      '--labels=',
      f'--out={out}',
      f'--root={root}',
      '--config.data.name=npz:/x.npz',
    ]
  )
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 13
  states = {line.split()[1]: line.split()[0] for line in lines}
  assert states['supervised-base-s0'] == 'done'
  assert states['fixmatch-base-s0'] == 'analyse'
  assert states['fixmatch-cmix-s0'] == 'resume'
  assert states['softmatch-cmix-s0'] == 'run'
  assert all('--config.data.name=npz:/x.npz' in line for line in lines)
  with pytest.raises(SystemExit, match='unknown argument'):
    study.main(['--dry_run', '--bogus'])
  with pytest.raises(SystemExit, match='--seeds'):
    study.main(['--dry_run', '--config.seed=3'])


def _main_without_training(monkeypatch, out, root, train, analyse, *flags):
  """study.main over the fixmatch base and cmix runs of seed 0, `train` and `analyse` standing
  in for the real ones, no table or pictures."""
  monkeypatch.setattr(study, 'train', train)
  monkeypatch.setattr(study, 'analyse', analyse)
  monkeypatch.setattr(study, 'write_table', lambda out, family: ('', {'primary': []}))
  monkeypatch.setattr(study, 'write_pictures', lambda *a: [])
  study.main(
    [
      '--seeds=0',
      '--labels=',
      '--only=fixmatch-',
      '--variants=base,cmix',
      f'--out={out}',
      f'--root={root}',
      *flags,
    ]
  )


def test_finished_runs_are_skipped_trained_runs_only_analysed(tmp_path, monkeypatch):
  out, root = tmp_path / 'out', tmp_path / 'runs'
  common.write_json(study.result_path(str(out), 'supervised-base-s0'), {'seed': 0})
  (root / 'fixmatch-base-s0').mkdir(parents=True)
  (root / 'fixmatch-base-s0' / 'eval.json').write_text('{}')
  trained, analysed = [], []

  def fake_train(run, workdir, config, user):
    trained.append((run['name'], user))
    return 1.5

  def fake_analyse(workdir):
    analysed.append(os.path.basename(workdir))
    return {'metrics': {'accuracy': 0.5, 'ece': 0.1}}

  steps = '--config.num_train_steps=7'
  _main_without_training(monkeypatch, out, root, fake_train, fake_analyse, steps)
  assert trained == [('fixmatch-cmix-s0', {'num_train_steps': '7'})]  # base only analysed
  assert analysed == ['fixmatch-base-s0', 'fixmatch-cmix-s0']
  record = json.loads((out / 'runs' / 'fixmatch-cmix-s0.json').read_text())
  assert record['train_seconds'] == 1.5 and record['user_overrides'] == {'num_train_steps': '7'}
  assert record['overrides']['calibratemix.enabled'] is True
  assert json.loads((out / 'runs' / 'fixmatch-base-s0.json').read_text())['train_seconds'] is None
  trained.clear()
  analysed.clear()
  _main_without_training(monkeypatch, out, root, fake_train, fake_analyse, steps)
  assert not trained and not analysed  # everything finished: nothing reruns


def test_train_command_puts_user_overrides_last():
  run = study.grid([3], variants=('cmix',))[1]
  argv = study.train_command(run, 'w', 'c.py', {'data.name': 'fake'}, 'py')
  assert argv[:5] == ['py', '-m', 'cmix_jax.main', '--config=c.py', '--workdir=w']
  assert argv[5:] == [
    '--config.algorithm=fixmatch',
    '--config.seed=3',
    '--config.calibratemix.enabled=True',
    '--config.data.name=fake',
    '--config.progress_bar=False',
  ]


# ---------------------------------------------------------------- aggregation


def _record(
  algorithm,
  variant,
  seed,
  acc,
  ece,
  auroc_apm=None,
  auroc_conf=None,
  user=None,
  labels=None,
  machine='m1',
):
  rec = {
    'name': common.run_name(algorithm, variant, seed, labels),
    'algorithm': algorithm,
    'variant': variant,
    'labels': labels,
    'seed': seed,
    'overrides': {'algorithm': algorithm, 'seed': seed, **common.VARIANTS[variant]},
    'user_overrides': user or {},
    'metrics': {'accuracy': acc, 'ece': ece, 'nll': 1.0, 'brier': 0.5},
    'ts': {'temperature': 1.2, 'metrics': {'ece': ece / 2}},
    'ece_bootstrap': {'ece': ece, 'low': ece - 0.01, 'high': ece + 0.01, 'resamples': 2000},
    'apm_count': {'mean': 38.5, 'p5': 30.0},
    'mechanism': None,
    'provenance': {'train': {'machine_id': machine, 'commit': 'abc'}},
  }
  if auroc_apm is not None:
    rec['mechanism'] = {
      'auroc_apm': auroc_apm,
      'auroc_confidence': auroc_conf,
      'pseudo_label_error': 0.2,
    }
  return rec


def _write(out, records):
  for r in records:
    common.write_json(study.result_path(str(out), r['name']), r)


def test_paired_interval_hand_values():
  compare = study.compare
  iv = compare.paired_interval([-0.02, -0.01, -0.03])
  half = T_975_DF2 * 0.01 / math.sqrt(3)  # sd of the three differences is 0.01
  assert iv['n'] == 3
  np.testing.assert_allclose(
    [iv['mean'], iv['std'], iv['low'], iv['high']],
    [-0.02, 0.01, -0.02 - half, -0.02 + half],
    rtol=1e-9,
  )
  one = compare.paired_interval([0.5, math.nan])
  assert one['n'] == 1 and one['mean'] == 0.5 and math.isnan(one['low'])
  assert compare.paired_interval([])['n'] == 0


def test_holm_hand_values():
  # p sorted: .01 (x4 = .04), .02 (x3 = .06), .03 (x2 = .06 -> monotone .06), .5 (x1 = .5)
  adjusted = study.holm([0.03, 0.5, 0.01, 0.02])
  np.testing.assert_allclose(adjusted, [0.06, 0.5, 0.04, 0.06])
  assert study.holm([math.nan, 0.01]) == [1.0, 0.02]  # an untestable comparison counts as p = 1
  assert study.holm([0.4, 0.6]) == [0.8, 0.8]  # capped at 1 before the running maximum


def _family_records(seeds, shift_fused=-0.03, machine_of_fused=lambda s: 'm1'):
  """Every main-family arm of FixMatch at 40 labels; fused ECE below base by `shift_fused`."""
  records = []
  for seed in seeds:
    acc, ece = 0.6 + 0.01 * seed, 0.10 + 0.01 * (seed % 2)
    noise = [0.004, -0.002, 0.001, -0.003, 0.0][seed % 5]
    arms = {
      'base': (acc, ece),
      'control': (acc + 0.001, ece + noise),
      'cmix': (acc + 0.02 + noise, ece - noise),
      'split_random': (acc + 0.02, ece + noise / 2),
      'cmix_fused': (acc, ece + shift_fused + noise / 4),
    }
    for arm, (a, e) in arms.items():
      machine = machine_of_fused(seed) if arm == 'cmix_fused' else 'm1'
      kw = dict(labels=40, machine=machine)
      if arm == 'cmix':
        kw.update(auroc_apm=0.80 + 0.01 * seed, auroc_conf=0.80)
      records.append(_record('fixmatch', arm, seed, a, e, **kw))
    records.append(_record('supervised', 'base', seed, acc - 0.1, 0.2, labels=40))
  return records


def test_primary_family_holm_verdicts_only_when_complete(tmp_path):
  out = tmp_path / 'out'
  _write(out, _family_records(range(4)))
  _, summary = study.write_table(str(out))
  assert {r['verdict'] for r in summary['primary']} == {'incomplete, no verdict'}  # 4 < 5 seeds
  _write(out, _family_records([4]))
  markdown, summary = study.write_table(str(out))
  rows = {r['id']: r for r in summary['primary']}
  assert [r['id'] for r in summary['primary']] == ['P1', 'P2', 'P3', 'P4']
  fused = rows['P1']
  diffs = [-0.03 + n / 4 for n in (0.004, -0.002, 0.001, -0.003, 0.0)]
  np.testing.assert_allclose(fused['mean'], np.mean(diffs), rtol=1e-9)
  from scipy import stats

  p = stats.ttest_1samp(diffs, 0).pvalue
  np.testing.assert_allclose(fused['p'], p, rtol=1e-9)
  assert fused['p_holm'] == pytest.approx(min(1.0, 4 * p))  # the smallest of 4 p-values
  assert fused['verdict'] == 'lower (shown)' and fused['n'] == 5
  assert rows['P3']['verdict'] == 'higher (shown)'  # accuracy +2 points on every seed
  assert rows['P2']['verdict'] == 'not shown'  # ECE -noise - noise: spans 0
  assert rows['P4']['verdict'] == 'not shown'
  assert summary['primary_pairs_not_on_one_machine'] == 0
  assert '| P1 | fixmatch | 40 | fused − base | metrics.ece (points) | 5 |' in markdown
  explore = {(r['comparison'], r['metric']): r for r in summary['exploratory']}
  assert explore[('base − supervised', 'metrics.accuracy')]['reading'] == 'higher'
  mech = explore[('AUROC(APM) − AUROC(confidence), two-pass runs', 'AUROC')]
  np.testing.assert_allclose(mech['mean'], 0.02, rtol=1e-6)  # 0, .01, ..., .04
  run = next(r for r in summary['runs'] if r['name'] == 'fixmatch-control-n40-s0')
  assert run['overrides']['calibratemix.second_pass_only'] is True
  assert run['ece_bootstrap']['resamples'] == 2000 and run['machine_id'] == 'm1'
  assert '| fixmatch + second pass, no mixup (control), 40 labels | 0 1 2 3 4 |' in markdown


def test_each_family_reads_the_others_primary_tests_as_exploratory():
  main = study.exploratory_comparisons('main')
  assert main == list(study.EXPLORATORY)  # M1 is already there, M2/M3 are P2/P1
  maturity = [(a, b, metric) for _, a, b, metric in study.exploratory_comparisons('maturity')]
  assert ('cmix', 'base', 'metrics.accuracy') in maturity  # P3, exploratory in the rung
  assert ('cmix', 'split_random', 'metrics.ece') in maturity  # P4 (printed where both arms exist)
  for test in study.FAMILIES['maturity']['tests']:
    assert test[2:] not in maturity  # never both primary and exploratory
  assert len(maturity) == len(set(maturity))


def test_forest_rows_put_points_and_auroc_on_one_axis():
  row = {'base': 'fixmatch', 'labels': 40, 'comparison': 'c', 'n': 3}
  summary = {
    'primary': [
      {
        **row,
        'id': 'M3',
        'metric': 'metrics.ece',
        'mean': -0.0186,
        'low': -0.0466,
        'high': 0.0094,
        'verdict': 'not shown',
      },
      {
        **row,
        'id': 'M1',
        'metric': 'AUROC',
        'mean': 0.017,
        'low': -0.012,
        'high': 0.047,
        'verdict': 'higher (shown)',
      },
    ]
  }
  ece, auroc = study.forest_rows(summary)
  assert (ece['mean'], ece['low'], ece['high']) == pytest.approx((-1.86, -4.66, 0.94))
  assert ece['label'] == 'M3 fixmatch, 40 labels: c (metrics.ece)' and not ece['shown']
  assert (auroc['mean'], auroc['low'], auroc['high']) == pytest.approx((1.7, -1.2, 4.7))  # x 100
  assert auroc['label'].endswith('(AUROC x 100)') and auroc['shown']


def test_pairs_on_two_machines_are_counted():
  cells = study.by_cell(_family_records(range(3), machine_of_fused=lambda s: f'm{s}'))
  iv = study.paired(cells, ('fixmatch', 'cmix_fused', 40), ('fixmatch', 'base', 40), 'metrics.ece')
  assert iv['pairs_not_on_one_machine'] == 2 and iv['seeds'] == [0, 1, 2]  # seeds 1, 2


def test_exploratory_reading_words():
  iv = lambda mean, low, high, n=3: {'n': n, 'mean': mean, 'low': low, 'high': high}
  assert study.exploratory_word(iv(-1, -2, -0.5)) == 'lower'
  assert study.exploratory_word(iv(1, 0.5, 2)) == 'higher'
  assert study.exploratory_word(iv(0, -1, 1)) == 'not shown'
  assert study.exploratory_word(iv(0, math.nan, math.nan, n=1)).startswith('not shown (1 pair')


def test_one_results_folder_holds_one_setting(tmp_path):
  _write(
    tmp_path,
    [
      _record('fixmatch', 'base', 0, 0.5, 0.1),
      _record('fixmatch', 'base', 1, 0.5, 0.1, user={'data.name': 'fake'}),
    ],
  )
  with pytest.raises(ValueError, match='own --out'):
    study.load_results(str(tmp_path))


# ---------------------------------------------------------------- analysis kernels


def test_auroc_hand_values_ties_and_sklearn():
  # Positives at scores 0.35 and 0.8, negatives at 0.1 and 0.4: 3 of 4 pairs ordered -> 0.75.
  assert analysis.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
  assert analysis.auroc([1.0, 1.0], [1, 0]) == 0.5  # a tie counts half
  assert analysis.auroc([3, 2, 1], [1, 1, 0]) == 1.0
  assert math.isnan(analysis.auroc([1, 2], [1, 1]))
  from sklearn import metrics

  rng = np.random.default_rng(0)
  scores, labels = rng.integers(0, 5, 200).astype(float), rng.random(200) < 0.3
  np.testing.assert_allclose(
    analysis.auroc(scores, labels), metrics.roc_auc_score(labels, scores), rtol=1e-12
  )


def test_mechanism_scores_wrong_pseudo_labels_by_hand():
  logits = np.array(
    [[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 5.0, 0.0]]
  )
  hidden = np.array([0, 0, 2, 1, -1])  # sample 4's label is unknown: left out
  pseudo_wrong = np.array([False, True, False, True])  # pseudo-labels 0, 1, 2, 0
  apm = np.array(
    [[2.0, -2.0, -3.0], [-1.0, -0.5, -2.0], [-1.0, -1.0, 1.5], [-1.0, 0.0, 0.0], [0.0, 9.0, 0.0]]
  )
  counts = np.array([30, 31, 29, 30, 30])
  running = np.array([0.9, 0.4, 0.8, 0.6, 0.99])
  out = analysis.mechanism(apm, counts, running, logits, hidden)
  assert out['n'] == 4 and out['pseudo_label_error'] == 0.5
  # -APM at the pseudo-label: [-2, 0.5, -1.5, 1]: both wrong samples rank above both right.
  assert out['auroc_apm'] == 1.0
  assert out['auroc_running_confidence'] == 1.0  # -[0.9, 0.4, 0.8, 0.6]
  conf = analysis._softmax(logits[:4]).max(1)
  expected = analysis.auroc(-conf, pseudo_wrong)
  assert out['auroc_confidence'] == expected
  assert analysis.mechanism(apm, np.zeros(5), running, logits, hidden)['n'] == 0


def test_apm_count_summary():
  out = analysis.apm_count_summary(np.array([0, 10, 30, 40, 70]))
  assert out['n'] == 5 and out['mean'] == 30.0 and out['p50'] == 30.0 and out['p100'] == 70.0
  assert out['share_zero'] == 0.2 and out['share_below_30'] == 0.4


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, monkeypatch, capsys):
  out, root = tmp_path / 'out', tmp_path / 'runs'

  def fake_analyse(workdir):
    if 'cmix' in workdir:
      raise FileNotFoundError('dynamics.npz is missing')
    return {'metrics': {'accuracy': 0.5, 'ece': 0.1}}

  _main_without_training(monkeypatch, out, root, lambda *a: 1.0, fake_analyse)
  assert 'FAILED: fixmatch-cmix-s0' in capsys.readouterr().out
  assert sorted(os.listdir(out / 'runs')) == ['fixmatch-base-s0.json']


def test_one_tiny_run_end_to_end_leaves_a_result_file_and_a_table(tmp_path):
  config = tmp_path / 'tiny_study.py'
  config.write_text(
    'from configs import tiny\n\n\n'
    'def get_config():\n'
    '  c = tiny.config(steps=6)  # FixMatch base: one step program to compile\n'
    '  c.calibratemix.warmup_steps = 2\n'
    '  c.data.val_size = 8\n'
    '  c.data.unlabeled_size = 64\n'
    '  c.eval.plots = True\n'
    '  return c\n'
  )
  out, root = tmp_path / 'out', tmp_path / 'runs'
  study.main(
    [
      '--seeds=0',
      '--labels=',
      '--only=fixmatch-base-',
      f'--config={config}',
      f'--out={out}',
      f'--root={root}',
      '--config.num_devices=1',
    ]
  )
  record = json.loads((out / 'runs' / 'fixmatch-base-s0.json').read_text())
  assert record['step'] == 6 and 0 <= record['metrics']['ece'] <= 1
  assert record['ts']['temperature'] > 0 and 'ece' in record['ts']['metrics']
  assert record['apm_count']['n'] == 64  # the unlabeled subset, not the whole train split
  # APM after warm-up (the tables run in every SSL run): steps 3..5, 32 per step.
  assert record['apm_count']['mean'] == pytest.approx(3 * 32 / 64)
  assert record['mechanism']['n'] <= 64 and 0 <= record['mechanism']['auroc_apm'] <= 1
  assert record['user_overrides'] == {'num_devices': '1'}
  assert record['workdir'] == 'fixmatch-base-s0'  # relative to --root: no machine path
  split = json.loads((root / 'fixmatch-base-s0' / 'split.json').read_text())
  assert split['unlabeled']['size'] == 64 and split['unlabeled']['per_class'] == [16] * 4
  assert '| fixmatch | 0 |' in (out / 'table.md').read_text()
  assert (
    record['ece_bootstrap']['low'] <= record['metrics']['ece'] <= record['ece_bootstrap']['high']
  )
  assert record['ece_bootstrap']['ece'] == pytest.approx(record['metrics']['ece'], abs=1e-6)
  prov = record['provenance']['train']
  assert (
    prov['devices_used'] == 1
    and prov['device_count'] >= 1
    and prov['versions']['jax']
    and prov['cpu']['cores'] >= 1
  )
  # Pictures: the first seed's data maps, and one reliability figure pooled over seeds whose
  # panel is the same final EMA evaluation as the result file.
  pictures = out / 'pictures'
  assert (pictures / 'fixmatch-base-s0_data_map_unlabeled.png').stat().st_size > 0
  panels = json.loads((pictures / 'reliability.data.json').read_text())['tables']
  assert list(panels) == ['fixmatch (1 seeds)']
  assert panels['fixmatch (1 seeds)']['ece'] == pytest.approx(record['metrics']['ece'], abs=1e-4)
