"""Side-by-side table of finished runs: mean +- std over seeds, USB's published error, dECE.

  python -m experiments.compare runs/sweeps/fmnist_study --out=runs/compare/fmnist
  python -m experiments.compare RUN_A RUN_B ... [--group_by=calibratemix.passes]
      [--reference=experiments/usb_reference_results.csv] [--paper=paper.csv] [--out=DIR]

A path is a run workdir (holds config.json; finished when it holds eval.json) or a
folder searched recursively for them (local or gs://, like --out). Runs are grouped by
(dataset, num_labels, algorithm, variant) plus the dotted config keys of --group_by;
variant is `base`, `cmix` (+CalibrateMix) or `randmix` (+random mixup, the ablation). The
metrics are eval.json's top level (the checkpoint its `selection` names). Writes table.md,
table.csv and reliability.png (each group's reliability.json pooled over seeds)
into --out and prints the Markdown table.

Reference / paper CSVs: columns algorithm,dataset,num_labels,error_mean,error_std
(percent; optional ece_mean,ece_std), `#` lines are comments. Dataset names are
USB's (cifar10, cifar100, svhn, stl10); algorithm is the base name, or
`<base>+calibratemix` / `<base>+randmix` for the variants.
"""

import csv
import dataclasses
import io
import json
import math
import os
import sys

import numpy as np

from cmix_jax import metrics as metrics_lib
from cmix_jax import plots
from cmix_jax import storage
from experiments import common

# USB's published classic-CV error rates, shipped beside this script
DEFAULT_REFERENCE = os.path.join(common.EXPERIMENTS, 'usb_reference_results.csv')
# our data.name -> USB's dataset name (the reference CSV's names)
DATASET_ALIASES = {
  'svhn_cropped': 'svhn',
  'svhn': 'svhn',
  'cifar10': 'cifar10',
  'cifar100': 'cifar100',
  'stl10': 'stl10',
  'imagenet2012': 'imagenet',
  'imagenet': 'imagenet',
}
VARIANTS = ('base', 'cmix', 'randmix')  # of common.VARIANTS: the paper's arms
VARIANT_LABELS = {'base': '', 'cmix': ' +CalibrateMix', 'randmix': ' +random mixup'}
VARIANT_SUFFIXES = {'base': '', 'cmix': '+calibratemix', 'randmix': '+randmix'}
ALGORITHM_ORDER = ('supervised', 'fullysupervised', 'fixmatch', 'flexmatch', 'softmatch')
METRICS = metrics_lib.SUMMARY_KEYS  # the columns every table reports


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run: its group fields, seed, metrics of the selected checkpoint."""

  workdir: str
  dataset: str  # USB name where one exists (svhn_cropped -> svhn), else data.name
  num_labels: str
  algorithm: str
  variant: str  # base | cmix | randmix
  extra: tuple  # ((dotted key, value), ...) from --group_by
  seed: int
  selection: str
  step: int | None
  metrics: dict
  reliability: dict | None

  @property
  def group(self) -> tuple:
    return (self.dataset, self.num_labels, self.algorithm, self.variant, self.extra)


# ----------------------------------------------------------------------------
# Loading.


def discover(paths) -> tuple:
  """(finished run dirs, unfinished run dirs) under the given workdirs / parent folders."""
  finished, unfinished = [], []
  for path in paths:
    if not storage.as_path(path).is_dir():
      raise ValueError(f'{path} is not a directory; pass run workdirs or folders holding them.')
    for root, dirs, files in storage.walk(path):
      dirs.sort()
      if 'config.json' in files or common.FINISHED_FILE in files:
        (finished if common.FINISHED_FILE in files else unfinished).append(os.fspath(root))
        dirs[:] = []  # a run's subfolders (checkpoints) hold no further runs
  return sorted(set(finished)), sorted(set(unfinished))


def _get(config: dict, dotted: str, source: str):
  try:
    return common.dotted(config, dotted)
  except KeyError:
    raise KeyError(f'{source} has no "{dotted}"') from None


def _read_json(path: str):
  try:
    return storage.read_json(path)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f'cannot read {path}: {e}') from e


def load_run(workdir: str, group_by=()) -> Run:
  """One run from workdir/config.json, eval.json and (optional) reliability.json."""
  config_path = os.path.join(workdir, 'config.json')
  config, report = _read_json(config_path), _read_json(os.path.join(workdir, 'eval.json'))
  try:
    data_name = str(_get(config, 'data.name', config_path))
    num_labels = str(_get(config, 'data.num_labels', config_path))
    algorithm = str(_get(config, 'algorithm', config_path)).lower()
    seed = int(_get(config, 'seed', config_path))
    extra = tuple((k, json.dumps(_get(config, k, config_path), sort_keys=True)) for k in group_by)
  except KeyError as e:
    raise ValueError(
      f'{e.args[0]}; is {workdir} a cmix_jax run? (--group_by keys must be '
      'dotted config fields, e.g. calibratemix.passes)'
    ) from e
  metrics = {k: float(report[k]) for k in METRICS if isinstance(report.get(k), (int, float))}
  if 'accuracy' not in metrics and 'error_rate' not in metrics:
    raise ValueError(f'{workdir}/eval.json has neither accuracy nor error_rate.')
  metrics.setdefault('error_rate', 1.0 - metrics.get('accuracy', math.nan))
  metrics.setdefault('accuracy', 1.0 - metrics['error_rate'])
  rel_path = os.path.join(workdir, 'reliability.json')
  reliability = _read_json(rel_path) if storage.as_path(rel_path).exists() else None
  step = report.get('step')
  return Run(
    workdir=workdir,
    dataset=DATASET_ALIASES.get(data_name, data_name),
    num_labels=num_labels,
    algorithm=algorithm,
    variant=common.variant_of(config, VARIANTS),
    extra=extra,
    seed=seed,
    selection=str(report.get('selection', 'unknown')),
    step=None if step is None else int(step),
    metrics=metrics,
    reliability=reliability,
  )


def load_runs(paths, group_by=()) -> list:
  """Every finished run under `paths`; ValueError on two runs with the same group and seed."""
  finished, _ = discover(paths)
  runs = [load_run(d, tuple(group_by)) for d in finished]
  seen = {}
  for run in runs:
    key = (run.group, run.seed)
    if key in seen:
      raise ValueError(
        f'{seen[key]} and {run.workdir} are the same setting and seed '
        f'{run.seed}; pass only one of them (or separate them with --group_by).'
      )
    seen[key] = run.workdir
  return runs


def normalize_algorithm(name: str) -> str:
  """'SoftMatch + CalibrateMix' -> 'softmatch+calibratemix'; '+cmix' and '+random mixup' too."""
  key = name.strip().lower().replace(' ', '').replace('_', '')
  for alias, canon in (
    ('+cmix', '+calibratemix'),
    ('+randommixup', '+randmix'),
    ('+randompairing', '+randmix'),
  ):
    if key.endswith(alias):
      key = key[: -len(alias)] + canon
  return key


def load_reference(path: str) -> dict:
  """(algorithm, dataset, num_labels) -> {'error_mean', 'error_std'[, 'ece_mean', 'ece_std']}."""
  try:
    lines = [
      line
      for line in storage.as_path(path).read_text().splitlines(keepends=True)
      if line.strip() and not line.lstrip().startswith('#')
    ]
  except OSError as e:
    raise ValueError(f'cannot read reference CSV {path}: {e}') from e
  reader = csv.DictReader(lines)
  need = {'algorithm', 'dataset', 'num_labels', 'error_mean', 'error_std'}
  if not reader.fieldnames or not need <= set(reader.fieldnames):
    raise ValueError(
      f'{path} must have columns {sorted(need)} (optional ece_mean, ece_std); '
      f'got {reader.fieldnames}.'
    )
  table = {}
  for row in reader:
    key = (
      normalize_algorithm(row['algorithm']),
      row['dataset'].strip().lower(),
      row['num_labels'].strip(),
    )
    table[key] = {
      k: _to_float(row.get(k))
      for k in ('error_mean', 'error_std', 'ece_mean', 'ece_std')
      if row.get(k) not in (None, '')
    }
  return table


def reference_notes(path: str) -> list:
  """The `#` comment lines of a reference CSV (caveats worth printing under the table)."""
  return [
    line.strip().lstrip('#').strip()
    for line in storage.as_path(path).read_text().splitlines()
    if line.lstrip().startswith('#')
  ]


def _to_float(text) -> float:
  try:
    return float(text)
  except (TypeError, ValueError):
    return math.nan


# ----------------------------------------------------------------------------
# Aggregation.


def _mean_std(values) -> tuple:
  """Mean and sample std (ddof=1; NaN for one value) of the finite values."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if not len(v):
    return math.nan, math.nan
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def paired_interval(differences, confidence: float = 0.95) -> dict:
  """Mean of paired differences with its two-sided Student-t interval.

  {'n', 'mean', 'std' (ddof=1), 'low', 'high'}; low/high are NaN below two pairs.
  Non-finite differences are dropped.
  """
  from scipy import stats

  d = np.asarray([x for x in differences if x is not None and math.isfinite(x)], np.float64)
  out = {'n': int(len(d)), 'mean': math.nan, 'std': math.nan, 'low': math.nan, 'high': math.nan}
  if not len(d):
    return out
  out['mean'] = float(d.mean())
  if len(d) < 2:
    return out
  out['std'] = float(d.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * out['std'] / math.sqrt(len(d))
  out['low'], out['high'] = out['mean'] - half, out['mean'] + half
  return out


def _sort_key(group: tuple):
  dataset, num_labels, algorithm, variant, extra = group
  labels = int(num_labels) if num_labels.isdigit() else math.inf
  algo = ALGORITHM_ORDER.index(algorithm) if algorithm in ALGORITHM_ORDER else len(ALGORITHM_ORDER)
  var = VARIANTS.index(variant) if variant in VARIANTS else len(VARIANTS)
  return (dataset, labels, algo, algorithm, extra, var)


def group_name(group: tuple) -> str:
  """'cifar10/40 softmatch +CalibrateMix [passes=1]'."""
  dataset, num_labels, algorithm, variant, extra = group
  tail = ''.join(f' [{k.split(".")[-1]}={v}]' for k, v in extra)
  return f'{dataset}/{num_labels} {algorithm}{VARIANT_LABELS.get(variant, " " + variant)}{tail}'


def aggregate(runs, reference: dict | None = None, paper: dict | None = None) -> list:
  """One row per group: metric means / stds over seeds, USB and paper numbers, paired dECE.

  Metric fields are fractions as in eval.json (`<metric>_mean`, `<metric>_std`);
  reference and paper fields are percent, as their CSVs; `usb_diff` = our mean
  error - USB's, in percentage points; `delta_ece_*` / `delta_error_*` = mean
  and std over the seeds both runs share of (variant - base), fractions.
  """
  groups = {}
  for run in runs:
    groups.setdefault(run.group, []).append(run)
  rows = []
  for group in sorted(groups, key=_sort_key):
    members = sorted(groups[group], key=lambda r: r.seed)
    dataset, num_labels, algorithm, variant, extra = group
    row = {
      'name': group_name(group),
      'dataset': dataset,
      'num_labels': num_labels,
      'algorithm': algorithm,
      'variant': variant,
      **{f'cfg:{k}': v for k, v in extra},
      'n_seeds': len(members),
      'seeds': ' '.join(str(r.seed) for r in members),
      'selection': ','.join(sorted({r.selection for r in members})),
      'steps': ' '.join('' if r.step is None else str(r.step) for r in members),
      'workdirs': ' '.join(r.workdir for r in members),
    }
    for m in METRICS:
      row[f'{m}_mean'], row[f'{m}_std'] = _mean_std(r.metrics.get(m) for r in members)
    usb = (reference or {}).get((algorithm, dataset, num_labels), {})
    row['usb_error_mean'] = usb.get('error_mean', math.nan)
    row['usb_error_std'] = usb.get('error_std', math.nan)
    row['usb_diff'] = 100 * row['error_rate_mean'] - row['usb_error_mean']
    ours = (algorithm + VARIANT_SUFFIXES.get(variant, '+' + variant), dataset, num_labels)
    published = (paper or {}).get(ours, {})
    for k in ('error_mean', 'error_std', 'ece_mean', 'ece_std'):
      row[f'paper_{k}'] = published.get(k, math.nan)
    row.update(
      _paired_delta(members, groups.get((dataset, num_labels, algorithm, 'base', extra)), variant)
    )
    rows.append(row)
  return rows


def _paired_delta(members, base_members, variant) -> dict:
  """(variant - base) over common seeds for ECE and error; empty fields for base rows."""
  out = {
    'delta_ece_mean': math.nan,
    'delta_ece_std': math.nan,
    'delta_error_mean': math.nan,
    'delta_error_std': math.nan,
    'delta_n': 0,
  }
  if variant == 'base' or not base_members:
    return out
  base = {r.seed: r for r in base_members}
  pairs = [(r, base[r.seed]) for r in members if r.seed in base]
  for metric, key in (('ece', 'delta_ece'), ('error_rate', 'delta_error')):
    out[f'{key}_mean'], out[f'{key}_std'] = _mean_std(
      r.metrics.get(metric, math.nan) - b.metrics.get(metric, math.nan) for r, b in pairs
    )
  out['delta_n'] = len(pairs)
  return out


# ----------------------------------------------------------------------------
# Formatting.


def _pm(mean: float, std: float, scale: float = 1.0, digits: int = 2, sign: bool = False) -> str:
  """'12.34 ± 0.56' ('12.34' for one seed, '' when missing)."""
  if not math.isfinite(mean):
    return ''
  fmt = f'{{:{"+" if sign else ""}.{digits}f}}'
  text = fmt.format(scale * mean)
  if math.isfinite(std):
    text += ' ± ' + f'{{:.{digits}f}}'.format(scale * std)
  return text


def format_markdown(rows, notes=()) -> str:
  """The Markdown table of `aggregate` rows (error / ECE in %, NLL and Brier raw)."""
  extra_keys = []
  for row in rows:
    extra_keys += [k for k in row if k.startswith('cfg:') and k not in extra_keys]
  header = (
    ['dataset', 'labels', 'algorithm']
    + [k[len('cfg:') :] for k in extra_keys]
    + [
      'seeds',
      'selection',
      'error (%)',
      'USB error (%)',
      'Δ vs USB',
      'paper error (%)',
      'ECE (%)',
      'ΔECE vs base',
      'paper ECE (%)',
      'ECE-15 (%)',
      'NLL',
      'Brier',
    ]
  )
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    usb_diff = r['usb_diff']
    delta = _pm(r['delta_ece_mean'], r['delta_ece_std'], 100, sign=True)
    if delta and r['delta_n'] != r['n_seeds']:
      delta += f' ({r["delta_n"]} paired)'
    cells = (
      [
        r['dataset'],
        r['num_labels'],
        r['algorithm'] + VARIANT_LABELS.get(r['variant'], ' ' + r['variant']),
      ]
      + [str(r.get(k, '')) for k in extra_keys]
      + [
        str(r['n_seeds']),
        r['selection'],
        _pm(r['error_rate_mean'], r['error_rate_std'], 100),
        _pm(r['usb_error_mean'], r['usb_error_std']),
        f'{usb_diff:+.2f}' if math.isfinite(usb_diff) else '',
        _pm(r['paper_error_mean'], r['paper_error_std']),
        _pm(r['ece_mean'], r['ece_std'], 100),
        delta,
        _pm(r['paper_ece_mean'], r['paper_ece_std']),
        _pm(r['ece_15_mean'], r['ece_15_std'], 100),
        _pm(r['nll_mean'], r['nll_std'], digits=3),
        _pm(r['brier_mean'], r['brier_std'], digits=3),
      ]
    )
    lines.append('| ' + ' | '.join(cells) + ' |')
  footer = [
    '',
    'Mean ± sample std (ddof=1) over seeds; error and ECE (10 equal-width bins) in %, '
    'ECE-15 with 15 bins; NLL and Brier per example. `selection` names the checkpoint '
    'the numbers come from (best_test = best test accuracy, as USB and the reference).',
    'USB error = USB\'s published error of the base algorithm; Δ vs USB = our error − '
    'USB\'s (percentage points). ΔECE vs base = mean ± std over shared seeds of '
    '(variant − base) ECE, percentage points.',
  ]
  footer += [f'Reference note: {n}' for n in notes]
  return '\n'.join(lines + footer) + '\n'


def write_csv(rows, path: str) -> str:
  """Every field of every row (fractions and percent as in `aggregate`)."""
  fields = []
  for row in rows:
    fields += [k for k in row if k not in fields]
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fieldnames=fields, restval='')
  writer.writeheader()
  for row in rows:
    writer.writerow(
      {k: ('' if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
    )
  storage.write_text(path, text.getvalue())
  return path


def pooled_reliability(runs) -> dict:
  """group name -> reliability table pooled over the group's seeds (runs with one)."""
  groups = {}
  for run in runs:
    if run.reliability is not None:
      groups.setdefault(run.group, []).append(run.reliability)
  out = {}
  for group in sorted(groups, key=_sort_key):
    try:
      out[f'{group_name(group)} ({len(groups[group])} seeds)'] = plots.pool_tables(groups[group])
    except ValueError as e:
      print(f'reliability of {group_name(group)} not pooled: {e}', file=sys.stderr)
  return out


def main(argv=None) -> int:
  parser = common.arg_parser(__doc__)
  parser.add_argument('workdirs', nargs='+', help='run workdirs or folders holding them')
  parser.add_argument(
    '--group_by', default='', help='comma-separated dotted config keys that also split groups'
  )
  parser.add_argument(
    '--reference', default=DEFAULT_REFERENCE, help='USB published errors CSV ("" for none)'
  )
  parser.add_argument('--paper', default='', help='CSV of the paper\'s numbers, same columns')
  parser.add_argument('--out', default='runs/compare', help='folder for table.md/csv, plots')
  args = parser.parse_args(argv)
  group_by = tuple(k.strip() for k in args.group_by.split(',') if k.strip())
  finished, unfinished = discover(args.workdirs)
  for d in unfinished:
    print(f'skipped (no eval.json, unfinished): {d}', file=sys.stderr)
  if not finished:
    raise SystemExit(
      f'no finished run (a folder with config.json and eval.json) under {" ".join(args.workdirs)}.'
    )
  runs = load_runs(finished, group_by)
  reference, notes = None, []
  if args.reference:
    if storage.as_path(args.reference).exists():
      reference, notes = load_reference(args.reference), reference_notes(args.reference)
    elif args.reference != DEFAULT_REFERENCE:
      raise SystemExit(f'--reference {args.reference} does not exist.')
    else:
      print(f'no USB reference at {args.reference}; the USB columns stay empty.', file=sys.stderr)
  paper = load_reference(args.paper) if args.paper else None
  rows = aggregate(runs, reference, paper)
  table = format_markdown(rows, notes)
  storage.write_text(os.path.join(args.out, 'table.md'), table)
  write_csv(rows, os.path.join(args.out, 'table.csv'))
  tables = pooled_reliability(runs)
  if tables:
    plots.multi_reliability(
      tables,
      os.path.join(args.out, 'reliability.png'),
      title='test-set reliability, pooled over seeds',
    )
  print(table)
  print(
    f'wrote {args.out}/table.md, table.csv' + (', reliability.png' if tables else ''),
    file=sys.stderr,
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
