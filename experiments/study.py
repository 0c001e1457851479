"""The controlled study: CalibrateMix against its base, its second pass and its ablations.

  python -m experiments.study                       # runs what is missing, then the table
  python -m experiments.study --dry_run             # lists the runs and their state
  python -m experiments.study --table_only          # re-aggregates the result files
  python -m experiments.study --config=configs/fmnist_maturity.py --seeds=0,1,2 \
      --variants=base,control,cmix,cmix_fused --family=maturity --labels=40 \
      --root=runs/fmnist_maturity --out=experiments/results/fmnist_controlled/maturity

Grid (configs/fmnist_dynamics.py, every cell on every seed and label count): supervised;
FixMatch and SoftMatch, each as the base, + the control (the reference's second pass without
mixing), + CalibrateMix (passes=2, the reference), + CalibrateMix fused (passes=1), + the
split with a random partner from the opposite half (pair_k_frac=1) and + label smoothing 0.1
(random mixup, `randmix`, on request). Runs go seed by seed, so a partial study has complete
pairs. The table tests the pre-registered family (`--family`) with paired t-tests and Holm's
correction and prints every other comparison as exploratory.

Each run trains in `--root/<name>` (--root and --out: local or gs://; a killed run resumes
from its checkpoint when the study is started again), is analysed
(experiments/study_analysis.py) and leaves `--out/runs/<name>.json`; a run with that file is
finished and skipped. The table (`--out/table.md`, `--out/summary.json`) is made from those
files alone. `--config.*` arguments go to every run unchanged (and are recorded; one results
folder holds one setting).
"""

import json
import math
import os
import subprocess
import sys
import time
import traceback

import numpy as np

from cmix_jax import storage
from experiments import common
from experiments import compare

CONFIG = 'configs/fmnist_dynamics.py'
BASES = ('fixmatch', 'softmatch')
VARIANT_LABELS = {
  'base': '',
  'control': ' + second pass, no mixup (control)',
  'cmix': ' + CalibrateMix (2 passes)',
  'cmix_fused': ' + CalibrateMix fused (1 pass)',
  'split_random': ' + split, random partner',
  'randmix': ' + random mixup (no split)',
  'ls': ' + label smoothing 0.1',
}
DEFAULT_VARIANTS = ('base', 'control', 'cmix', 'cmix_fused', 'split_random', 'ls')
ACC_MARGIN = 0.005  # "without costing accuracy": the 95 % interval stays above -0.5 points


def cells(variants=DEFAULT_VARIANTS, labels=(None,)) -> list[tuple]:
  """(algorithm, variant, labels) of every cell: per label count, supervised, then each base."""
  unknown = sorted(set(variants) - set(common.VARIANTS))
  if unknown:
    raise ValueError(f'unknown variants {unknown}; use some of {", ".join(common.VARIANTS)}.')
  return [
    cell
    for n in labels
    for cell in [('supervised', 'base', n)] + [(b, v, n) for b in BASES for v in variants]
  ]


def grid(seeds, variants=DEFAULT_VARIANTS, labels=(None,)) -> list[dict]:
  """Every run, seed by seed: name, algorithm, variant, labels, seed and config overrides.

  labels=None keeps the config's data.num_labels (and the run name has no -n part).
  """
  return [
    {
      'name': common.run_name(a, v, s, n),
      'algorithm': a,
      'variant': v,
      'labels': n,
      'seed': s,
      'overrides': {
        'algorithm': a,
        'seed': s,
        **({} if n is None else {'data.num_labels': n}),
        **common.VARIANTS[v],
      },
    }
    for s in seeds
    for a, v, n in cells(variants, labels)
  ]


def result_path(out: str, name: str) -> str:
  return os.path.join(out, 'runs', f'{name}.json')


def state_of(run: dict, out: str, root: str) -> str:
  """done | analyse (trained, no result file) | resume (has checkpoints) | run."""
  workdir = storage.as_path(root) / run['name']
  if storage.as_path(result_path(out, run['name'])).exists():
    return 'done'
  if common.is_finished(workdir):
    return 'analyse'
  return 'resume' if (workdir / 'checkpoints').is_dir() else 'run'


def train_command(run: dict, workdir: str, config: str, user: dict, python: str) -> list[str]:
  """argv of one training run: the cell's overrides, then the user's (`--config.*`)."""
  overrides = {**run['overrides'], **user}
  return common.main_command(config, workdir, overrides, ['--config.progress_bar=False'], python)


def log_path(workdir: str) -> str:
  """Local file for a run's output: beside its workdir, or under runs/study_logs/ for gs://."""
  return common.log_path(workdir, os.path.join('runs', 'study_logs'))


def train(run: dict, workdir: str, config: str, user: dict) -> float:
  """Trains (or resumes) one run in a subprocess; returns its wall seconds."""
  log_file = log_path(workdir)
  os.makedirs(os.path.dirname(log_file), exist_ok=True)
  start = time.time()
  with open(log_file, 'a') as log:
    code = subprocess.call(
      train_command(run, workdir, config, user, sys.executable),
      stdout=log,
      stderr=subprocess.STDOUT,
      cwd=common.REPO,
    )
  if code:
    raise RuntimeError(f'{run["name"]} failed (exit {code}); see {log_file}')
  return time.time() - start


def analyse(workdir: str) -> dict:
  from experiments import study_analysis

  return study_analysis.analyze(workdir)


def complete(run: dict, out: str, root: str, config: str, user: dict) -> dict:
  """Trains (if needed) and analyses one run; writes and returns its result record."""
  workdir = os.path.join(root, run['name'])
  state = state_of(run, out, root)
  seconds = None
  if state in ('run', 'resume'):
    seconds = train(run, workdir, config, user)
  start = time.time()
  record = {
    'name': run['name'],
    'algorithm': run['algorithm'],
    'variant': run['variant'],
    'labels': run['labels'],
    'seed': run['seed'],
    'config': config,
    'overrides': run['overrides'],
    'user_overrides': user,
    'workdir': run['name'],  # under --root (no machine path in a committed result file)
    'train_seconds': seconds,
    'resumed': state == 'resume',
    **analyse(workdir),
  }
  record['analysis_seconds'] = time.time() - start
  common.write_json(result_path(out, run['name']), record)
  return record


# ----------------------------------------------------------------------------
# Table from the result files alone.


def load_results(out: str) -> list[dict]:
  """Every result file under out/runs; one setting only (same user overrides)."""
  folder = storage.as_path(out) / 'runs'
  if not folder.is_dir():
    return []
  results = [storage.read_json(path) for path in sorted(folder.glob('*.json'))]
  settings = {json.dumps(r.get('user_overrides', {}), sort_keys=True) for r in results}
  if len(settings) > 1:
    raise ValueError(
      f'{folder} mixes runs of different --config overrides {sorted(settings)}; '
      'give each setting its own --out.'
    )
  return results


def metric_value(record: dict, metric: str):
  """A metric of a result record by dotted path ('metrics.ece', 'mechanism.auroc_apm')."""
  node = record
  for part in metric.split('.'):
    if not isinstance(node, dict) or node.get(part) is None:
      return math.nan
    node = node[part]
  return float(node)


def cell_of(record: dict) -> tuple:
  """(algorithm, variant, labels) of a result record (labels None in single-count studies)."""
  return (record['algorithm'], record['variant'], record.get('labels'))


def by_cell(results) -> dict:
  """(algorithm, variant, labels) -> {seed: record}."""
  out = {}
  for r in results:
    out.setdefault(cell_of(r), {})[int(r['seed'])] = r
  return out


def machine_of(record: dict):
  """The machine id a run trained on (None for result files without provenance)."""
  prov = (record.get('provenance') or {}).get('train') or {}
  return prov.get('machine_id')


def _difference(ra: dict, rb: dict, metric: str) -> float:
  """a - b of one metric; 'mechanism' is AUROC(APM) - AUROC(confidence) of run a alone."""
  if metric == 'mechanism':
    return metric_value(ra, 'mechanism.auroc_apm') - metric_value(ra, 'mechanism.auroc_confidence')
  return metric_value(ra, metric) - metric_value(rb, metric)


def paired(cell_map: dict, a: tuple, b: tuple, metric: str) -> dict:
  """Paired (a - b) over the seeds both cells have: 95 % t-interval, two-sided t-test p, and
  how many pairs trained on two different (or unrecorded) machines."""
  from scipy import stats

  ra, rb = cell_map.get(a, {}), cell_map.get(b, {})
  seeds = sorted(set(ra) & set(rb))
  diffs = [_difference(ra[s], rb[s], metric) for s in seeds]
  out = compare.paired_interval(diffs)
  finite = np.asarray([d for d in diffs if math.isfinite(d)], np.float64)
  p = math.nan
  if len(finite) >= 2:
    p = (
      0.0 if np.ptp(finite) == 0 and finite[0] != 0 else float(stats.ttest_1samp(finite, 0).pvalue)
    )
  other_machine = sum(
    machine_of(ra[s]) is None or machine_of(ra[s]) != machine_of(rb[s]) for s in seeds
  )
  return {**out, 'p': p, 'seeds': seeds, 'pairs_not_on_one_machine': int(other_machine)}


def holm(pvalues) -> list[float]:
  """Holm's step-down adjusted p-values, in the given order (NaN counts as 1)."""
  p = np.asarray([1.0 if not math.isfinite(x) else x for x in pvalues], np.float64)
  m, order = len(p), np.argsort(p, kind='stable')
  adjusted, running = np.empty(m), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


# Pre-registered families (the study's README): id, what, arm a, arm b, metric.
FAMILIES = {
  'main': {
    'seeds_needed': 5,
    'tests': (
      ('P1', 'fused − base', 'cmix_fused', 'base', 'metrics.ece'),
      ('P2', 'two-pass − control', 'cmix', 'control', 'metrics.ece'),
      ('P3', 'two-pass − base', 'cmix', 'base', 'metrics.accuracy'),
      ('P4', 'two-pass − split + random partner', 'cmix', 'split_random', 'metrics.ece'),
    ),
  },
  'maturity': {
    'seeds_needed': 3,
    'tests': (
      ('M1', 'AUROC(APM) − AUROC(confidence), two-pass runs', 'cmix', 'cmix', 'mechanism'),
      ('M2', 'two-pass − control', 'cmix', 'control', 'metrics.ece'),
      ('M3', 'fused − base', 'cmix_fused', 'base', 'metrics.ece'),
    ),
  },
}
# Exploratory rows (printed where both arms exist): what, arm a, arm b, metric.
EXPLORATORY = (
  ('base − supervised', 'base', ('supervised', 'base'), 'metrics.accuracy'),
  ('two-pass − base', 'cmix', 'base', 'metrics.ece'),
  ('two-pass − base', 'cmix', 'base', 'metrics.brier'),
  ('two-pass − base', 'cmix', 'base', 'metrics.nll'),
  ('two-pass − base', 'cmix', 'base', 'ts.metrics.ece'),
  ('control − base', 'control', 'base', 'metrics.ece'),
  ('control − base', 'control', 'base', 'metrics.accuracy'),
  ('two-pass − control', 'cmix', 'control', 'metrics.accuracy'),
  ('fused − base', 'cmix_fused', 'base', 'metrics.accuracy'),
  ('two-pass − fused', 'cmix', 'cmix_fused', 'metrics.ece'),
  ('two-pass − fused', 'cmix', 'cmix_fused', 'metrics.accuracy'),
  ('two-pass − split + random partner', 'cmix', 'split_random', 'metrics.accuracy'),
  ('two-pass − random mixup', 'cmix', 'randmix', 'metrics.ece'),
  ('label smoothing − base', 'ls', 'base', 'metrics.ece'),
  ('label smoothing − base', 'ls', 'base', 'metrics.accuracy'),
  ('AUROC(APM) − AUROC(confidence), two-pass runs', 'cmix', 'cmix', 'mechanism'),
  ('AUROC(APM) − AUROC(confidence), fused runs', 'cmix_fused', 'cmix_fused', 'mechanism'),
)


def _bases_and_labels(cell_map: dict) -> list[tuple]:
  """(base, labels) groups present, in the grid's order."""
  labels = sorted({c[2] for c in cell_map}, key=lambda n: -1 if n is None else n)
  return [
    (b, n) for n in labels for b in BASES if any(c[:1] == (b,) and c[2] == n for c in cell_map)
  ]


def _arm(base: str, arm, labels) -> tuple:
  return (*arm, labels) if isinstance(arm, tuple) else (base, arm, labels)


def primary(cell_map: dict, family: str = 'main') -> list[dict]:
  """The family's tests for every (base, labels): intervals, p, Holm-adjusted p, verdict."""
  spec = FAMILIES[family]
  rows = []
  for base, labels in _bases_and_labels(cell_map):
    for test_id, what, a, b, metric in spec['tests']:
      a_cell, b_cell = _arm(base, a, labels), _arm(base, b, labels)
      iv = paired(cell_map, a_cell, b_cell, metric)
      complete = min(len(cell_map.get(a_cell, {})), len(cell_map.get(b_cell, {})))
      rows.append(
        {
          'id': test_id,
          'base': base,
          'labels': labels,
          'comparison': what,
          'metric': 'AUROC' if metric == 'mechanism' else metric,
          'complete': complete >= spec['seeds_needed'],
          **iv,
        }
      )
  for row, adjusted in zip(rows, holm([r['p'] for r in rows])):
    row['p_holm'] = adjusted
    row['verdict'] = _primary_verdict(row, all(r['complete'] for r in rows))
  return rows


def _primary_verdict(row: dict, family_complete: bool) -> str:
  if not family_complete:
    return 'incomplete, no verdict'
  if row['p_holm'] < 0.05:
    return 'lower (shown)' if row['mean'] < 0 else 'higher (shown)'
  return 'not shown'


def exploratory_word(iv: dict) -> str:
  """'lower' / 'higher' when the unadjusted 95 % interval excludes 0, else 'not shown'."""
  if iv['n'] < 2 or not math.isfinite(iv['low']):
    return f'not shown ({iv["n"]} pair(s))'
  if iv['high'] < 0:
    return 'lower'
  if iv['low'] > 0:
    return 'higher'
  return 'not shown'


def exploratory_comparisons(family: str) -> list[tuple]:
  """EXPLORATORY, then the other families' primary tests, less the family's own tests:
  (what, arm a, arm b, metric), each pair of arms and metric once."""
  own = {test[2:] for test in FAMILIES[family]['tests']}
  others = [test[1:] for name, spec in FAMILIES.items() if name != family for test in spec['tests']]
  comparisons, seen = [], set(own)
  for what, a, b, metric in (*EXPLORATORY, *others):
    if (a, b, metric) not in seen:
      seen.add((a, b, metric))
      comparisons.append((what, a, b, metric))
  return comparisons


def exploratory(cell_map: dict, family: str = 'main') -> list[dict]:
  """Every exploratory row of the family whose two arms exist, per (base, labels)."""
  rows = []
  for base, labels in _bases_and_labels(cell_map):
    for what, a, b, metric in exploratory_comparisons(family):
      a_cell, b_cell = _arm(base, a, labels), _arm(base, b, labels)
      if a_cell not in cell_map or b_cell not in cell_map:
        continue
      iv = paired(cell_map, a_cell, b_cell, metric)
      name = 'AUROC' if metric == 'mechanism' else metric
      rows.append(
        {
          'base': base,
          'labels': labels,
          'comparison': what,
          'metric': name,
          **iv,
          'reading': exploratory_word(iv),
        }
      )
  return rows


def _pm(values, scale=1.0, digits=2) -> str:
  mean, std = compare._mean_std(values)
  if not math.isfinite(mean):
    return ''
  text = f'{scale * mean:.{digits}f}'
  return text + (f' ± {scale * std:.{digits}f}' if math.isfinite(std) else '')


def _ci(iv: dict, scale: float, digits: int = 2) -> str:
  if iv['n'] == 0 or not math.isfinite(iv['mean']):
    return ''
  text = f'{scale * iv["mean"]:+.{digits}f}'
  if math.isfinite(iv['low']):
    text += f' [{scale * iv["low"]:+.{digits}f}, {scale * iv["high"]:+.{digits}f}]'
  return text


def _scale(metric: str) -> tuple[float, int, str]:
  """(scale, digits, unit) a metric is printed in."""
  if metric.endswith(('ece', 'accuracy')):
    return 100, 2, ' (points)'
  return 1, 3, ''


CELL_COLUMNS = (  # header, metric path, scale, digits
  ('accuracy (%)', 'metrics.accuracy', 100, 2),
  ('ECE (%)', 'metrics.ece', 100, 2),
  ('ECE bootstrap half-width (%)', 'ece_bootstrap.half_width', 100, 2),
  ('NLL', 'metrics.nll', 1, 3),
  ('Brier', 'metrics.brier', 1, 3),
  ('ECE after TS (%)', 'ts.metrics.ece', 100, 2),
  ('AUROC APM', 'mechanism.auroc_apm', 1, 3),
  ('AUROC confidence', 'mechanism.auroc_confidence', 1, 3),
  ('pseudo-label error (%)', 'mechanism.pseudo_label_error', 100, 1),
  ('APM updates (mean)', 'apm_count.mean', 1, 1),
  ('APM updates (p5)', 'apm_count.p5', 1, 0),
)


def cell_order(cell: tuple) -> tuple:
  """Sort key: label count, then supervised and the bases, then the variants' order."""
  algorithm, variant, labels = cell
  algorithms = ('supervised',) + BASES
  return (
    -1 if labels is None else labels,
    algorithms.index(algorithm) if algorithm in algorithms else len(algorithms),
    list(common.VARIANTS).index(variant) if variant in common.VARIANTS else len(common.VARIANTS),
  )


def cell_label(cell: tuple) -> str:
  algorithm, variant, labels = cell
  return (
    algorithm
    + VARIANT_LABELS.get(variant, ' ' + variant)
    + ('' if labels is None else f', {labels} labels')
  )


def _with_half_width(record: dict) -> dict:
  boot = record.get('ece_bootstrap')
  if boot:
    record = {**record, 'ece_bootstrap': {**boot, 'half_width': (boot['high'] - boot['low']) / 2}}
  return record


def run_summary(record: dict) -> dict:
  """What summary.json keeps of one run: overrides, headline metrics, APM counts, bootstrap."""
  prov = (record.get('provenance') or {}).get('train') or {}
  return {
    'name': record['name'],
    'seed': record['seed'],
    'labels': record.get('labels'),
    'overrides': record.get('overrides'),
    'user_overrides': record.get('user_overrides'),
    'metrics': {k: record['metrics'].get(k) for k in ('accuracy', 'ece', 'nll', 'brier')},
    'ece_after_ts': metric_value(record, 'ts.metrics.ece'),
    'ece_bootstrap': record.get('ece_bootstrap'),
    'apm_count': record.get('apm_count'),
    'mechanism': record.get('mechanism'),
    'machine_id': prov.get('machine_id'),
    'commit': prov.get('commit'),
    'train_seconds': record.get('train_seconds'),
  }


def table(results, family: str = 'main') -> tuple[str, dict]:
  """(Markdown, summary dict) of the result records: cells, the pre-registered family, the
  exploratory rows."""
  results = [_with_half_width(r) for r in results]
  cell_map = by_cell(results)
  lines = [
    '| run | seeds | ' + ' | '.join(h for h, *_ in CELL_COLUMNS) + ' |',
    '|' + '---|' * (len(CELL_COLUMNS) + 2),
  ]
  summary = {'family': family, 'runs': [], 'cells': {}, 'primary': [], 'exploratory': []}
  for cell in sorted(cell_map, key=cell_order):
    runs = [cell_map[cell][s] for s in sorted(cell_map[cell])]
    values = {h: [metric_value(r, m) for r in runs] for h, m, *_ in CELL_COLUMNS}
    lines.append(
      f'| {cell_label(cell)} | {" ".join(str(r["seed"]) for r in runs)} | '
      + ' | '.join(_pm(values[h], scale, digits) for h, _, scale, digits in CELL_COLUMNS)
      + ' |'
    )
    summary['cells']['/'.join(map(str, cell))] = {
      'seeds': [r['seed'] for r in runs],
      **{m: compare._mean_std(values[h]) for h, m, *_ in CELL_COLUMNS},
    }
    summary['runs'] += [run_summary(r) for r in runs]
  lines += [
    '',
    f'Pre-registered comparisons ({family} family; paired by seed, two-sided t-test, Holm '
    f'over the {sum(len(FAMILIES[family]["tests"]) for _ in _bases_and_labels(cell_map))} '
    'tests):',
    '',
    '| id | base | labels | comparison | metric | seeds | mean [95 % t-interval] | p | p (Holm) '
    '| verdict |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in primary(cell_map, family):
    scale, digits, unit = _scale(row['metric'])
    lines.append(
      f'| {row["id"]} | {row["base"]} | {row["labels"] or ""} | {row["comparison"]} | '
      f'{row["metric"]}{unit} | {row["n"]} | {_ci(row, scale, digits)} | {_p(row["p"])} | '
      f'{_p(row["p_holm"])} | {row["verdict"]} |'
    )
    summary['primary'].append(row)
  lines += [
    '',
    'Exploratory (unadjusted 95 % t-intervals; "lower"/"higher" only when the interval '
    'excludes 0; no verdicts):',
    '',
    '| base | labels | comparison | metric | seeds | mean [95 % t-interval] | reading |',
    '|---|---|---|---|---|---|---|',
  ]
  for row in exploratory(cell_map, family):
    scale, digits, unit = _scale(row['metric'])
    lines.append(
      f'| {row["base"]} | {row["labels"] or ""} | {row["comparison"]} | {row["metric"]}{unit} '
      f'| {row["n"]} | {_ci(row, scale, digits)} | {row["reading"]} |'
    )
    summary['exploratory'].append(row)
  mismatched = sum(r['pairs_not_on_one_machine'] for r in summary['primary'])
  summary['primary_pairs_not_on_one_machine'] = mismatched
  lines += [
    '',
    f'Primary pairs whose two runs trained on different (or unrecorded) machines: {mismatched}.',
    'Final EMA checkpoint, test split; mean ± sample std over seeds. ECE: 10 equal-width '
    'bins; its bootstrap half-width: half the 95 % percentile-bootstrap interval over test '
    'images. TS: temperature fitted by NLL on the held-out labeled slice. AUROC: how well '
    '−APM at the current pseudo-label (or −current max probability) ranks the unlabeled '
    'samples whose current pseudo-label is wrong first (hidden labels; EMA model, '
    'un-augmented images).',
  ]
  return '\n'.join(lines) + '\n', summary


def _p(p: float) -> str:
  return '' if not math.isfinite(p) else (f'{p:.3f}' if p >= 0.001 else f'{p:.1e}')


PICTURES = ('data_map_labeled.png', 'data_map_unlabeled.png')  # copied per run of the picture seed


def _pooled_reliability(runs: list[dict], root: str) -> dict:
  """cell label -> final reliability table pooled over the seeds whose workdirs are here."""
  from cmix_jax import plots  # matplotlib is slow to import

  tables = {}
  for run in runs:
    path = storage.as_path(root) / run['name'] / 'final_reliability.json'
    if path.exists():
      cell = (run['algorithm'], run['variant'], run['labels'])
      tables.setdefault(cell, []).append(storage.read_json(path))
  return {
    f'{cell_label(c)} ({len(tables[c])} seeds)': plots.pool_tables(tables[c])
    for c in sorted(tables, key=cell_order)
  }


def forest_rows(summary: dict) -> list[dict]:
  """The pre-registered comparisons as forest-plot rows: ECE and accuracy in points, an AUROC
  difference x 100 so that it reads on the same axis (0.01 AUROC = 1)."""
  rows = []
  for row in summary['primary']:
    scale = _scale(row['metric'])[0]
    metric = row['metric']
    if metric == 'AUROC':
      scale, metric = 100, 'AUROC x 100'
    labels = '' if row['labels'] is None else f', {row["labels"]} labels'
    rows.append(
      {
        'label': f'{row["id"]} {row["base"]}{labels}: {row["comparison"]} ({metric})',
        'group': row['id'],
        'mean': scale * row['mean'],
        'low': scale * row['low'],
        'high': scale * row['high'],
        'shown': row['verdict'].endswith('(shown)'),
      }
    )
  return rows


def write_pictures(runs: list[dict], root: str, out: str, seed: int, summary: dict) -> list[str]:
  """`out/pictures/`: the forest plot of the pre-registered comparisons, one reliability
  diagram per arm (pooled over seeds, a figure per label count) and the data maps of the
  runs of `seed`, from the workdirs under `root` that are here; returns the files written."""
  from cmix_jax import plots

  folder = storage.as_path(out) / 'pictures'
  written = []
  rows = forest_rows(summary)
  if rows:
    title = f'pre-registered comparisons ({summary["family"]}): mean, 95 % t-interval; filled = shown (Holm)'
    written += plots.forest_plot(
      rows,
      str(folder / f'forest_{summary["family"]}.png'),
      'paired difference (points'
      + ('; AUROC x 100)' if any(r['metric'] == 'AUROC' for r in summary['primary']) else ')'),
      title,
    )
  for labels in sorted({r['labels'] for r in runs}, key=lambda n: -1 if n is None else n):
    tables = _pooled_reliability([r for r in runs if r['labels'] == labels], root)
    if tables:
      name = 'reliability' + ('' if labels is None else f'_n{labels}')
      title = 'final EMA model, test split, pooled over seeds'
      written += plots.multi_reliability(tables, str(folder / f'{name}.png'), title=title, ncols=4)
  for run in (r for r in runs if r['seed'] == seed):
    for picture in PICTURES:
      source = storage.as_path(root) / run['name'] / picture
      if source.exists():
        target = folder / f'{run["name"]}_{picture}'
        written.append(str(storage.write_bytes(target, source.read_bytes())))
  return [str(w) for w in written]


def write_table(out: str, family: str = 'main') -> tuple[str, dict]:
  """table.md and summary.json of `out` from its result files; returns (Markdown, summary)."""
  results = load_results(out)
  if not results:
    raise SystemExit(f'no result files in {out}/runs yet: run the study first.')
  markdown, summary = table(results, family)
  storage.write_text(storage.as_path(out) / 'table.md', markdown)
  common.write_json(os.path.join(out, 'summary.json'), summary)
  return markdown, summary


# ----------------------------------------------------------------------------
# Command line.


def parse_overrides(extra: list[str]) -> dict:
  """`--config.a.b=v` arguments -> {'a.b': 'v'}; anything else is refused."""
  user = {}
  for arg in extra:
    if not arg.startswith('--config.') or '=' not in arg:
      raise SystemExit(
        f'unknown argument {arg!r}: study.py passes only --config.FIELD=VALUE on to the runs.'
      )
    key, value = arg[len('--config.') :].split('=', 1)
    if key in ('algorithm', 'seed'):
      raise SystemExit(f'--config.{key} is set per run by the study; use --seeds for seeds.')
    user[key] = value
  return user


def main(argv=None) -> int:
  parser = common.arg_parser(__doc__)
  parser.add_argument('--seeds', default='0,1,2,3,4', help='comma-separated seeds (labeled draws)')
  parser.add_argument(
    '--out',
    default=os.path.join(common.EXPERIMENTS, 'results', 'fmnist_controlled'),
    help='results folder: runs/*.json, table.md, summary.json',
  )
  parser.add_argument('--root', default='runs/fmnist_controlled', help='run workdirs')
  parser.add_argument('--config', default=CONFIG, help='the study config file')
  parser.add_argument(
    '--variants',
    default=','.join(DEFAULT_VARIANTS),
    help=f'variants of each base to run (supervised always runs); of {",".join(common.VARIANTS)}',
  )
  parser.add_argument(
    '--labels',
    default='40,250',
    help='comma-separated label counts (data.num_labels per run); empty = the config\'s',
  )
  parser.add_argument('--only', default='', help='only runs whose name contains this')
  parser.add_argument(
    '--family',
    default='main',
    choices=sorted(FAMILIES),
    help="the pre-registered comparisons the table tests: 'main' (the grid) or 'maturity'",
  )
  parser.add_argument('--dry_run', action='store_true', help='list the runs and their state')
  parser.add_argument('--table_only', action='store_true', help='only re-aggregate')
  parser.add_argument(
    '--picture_seed',
    type=int,
    default=None,
    help='seed whose runs give out/pictures/ (default: the first of --seeds)',
  )
  args, extra = parser.parse_known_args(argv)
  user = parse_overrides(extra)
  seeds = [int(s) for s in args.seeds.split(',') if s.strip()]
  variants = tuple(v.strip() for v in args.variants.split(',') if v.strip())
  labels = tuple(int(n) for n in args.labels.split(',') if n.strip()) or (None,)
  runs = [r for r in grid(seeds, variants, labels) if args.only in r['name']]
  if args.dry_run:
    for run in runs:
      workdir = os.path.join(args.root, run['name'])
      print(
        f'{state_of(run, args.out, args.root):8s} {run["name"]:32s} '
        + ' '.join(train_command(run, workdir, args.config, user, 'python')[3:])
      )
    return 0
  if not args.table_only:
    for i, run in enumerate(runs):
      if state_of(run, args.out, args.root) == 'done':
        continue
      print(f'[{i + 1}/{len(runs)}] {run["name"]}', flush=True)
      try:
        record = complete(run, args.out, args.root, args.config, user)
      except Exception:
        # A failed run is reported with its traceback; the others go on (rerun to retry).
        print(f'FAILED: {run["name"]}\n{traceback.format_exc()}', flush=True)
        continue
      trained = record['train_seconds']
      print(
        f'  done: accuracy {record["metrics"]["accuracy"]:.4f}, ECE '
        f'{record["metrics"]["ece"]:.4f}, '
        + (f'train {trained:.0f} s' if trained is not None else 'analysed only'),
        flush=True,
      )
  markdown, summary = write_table(args.out, args.family)
  print(markdown)
  picture_seed = seeds[0] if args.picture_seed is None else args.picture_seed
  written = write_pictures(runs, args.root, args.out, picture_seed, summary)
  print(f'{len(written)} picture files of seed {picture_seed} in {args.out}/pictures')
  return 0


if __name__ == '__main__':
  sys.exit(main())
