"""The dynamics study: can CalibrateMix's training-dynamics split be seen on a 2-core CPU?

  python experiments/study.py                       # runs what is missing, then the table
  python experiments/study.py --dry_run             # lists the runs and their state
  python experiments/study.py --table_only          # re-aggregates the result files
  python experiments/study.py --seeds=0,1,2,3 --out=DIR --config.data.name=npz:PATH

Grid (configs/fmnist_dynamics.py, every cell on every seed): supervised; FixMatch and
SoftMatch, each as the base, + CalibrateMix (passes=2, the reference), + the split with a
random partner from the opposite half (pair_k_frac=1), + random mixup without a split
(random_pairing), + label smoothing 0.1 and + CalibrateMix fused (passes=1). Seeds draw
different labeled sets. Runs go seed by seed, so a partial study has complete pairs.

Each run trains in `--root/<name>` (--root and --out: local or gs://; a killed run resumes from its checkpoint when the
study is started again), is analysed (experiments/study_analysis.py) and leaves
`--out/runs/<name>.json`; a run with that file is finished and skipped. The table
(`--out/table.md`, `--out/summary.json`) is made from those files alone. `--config.*`
arguments go to every run unchanged (and are recorded; one results folder holds one
setting).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

import compare  # pylint: disable=g-import-not-at-top,wrong-import-position
from cmix_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG = 'configs/fmnist_dynamics.py'
BASES = ('fixmatch', 'softmatch')
# variant -> config overrides on top of a base algorithm
VARIANTS = {
  'base': {},
  'control': {'calibratemix.enabled': True, 'calibratemix.second_pass_only': True},
  'cmix': {'calibratemix.enabled': True},
  'cmix_fused': {'calibratemix.enabled': True, 'calibratemix.passes': 1},
  'split_random': {'calibratemix.enabled': True, 'calibratemix.pair_k_frac': 1.0},
  'randmix': {'calibratemix.enabled': True, 'calibratemix.random_pairing': True},
  'ls': {'ssl.label_smoothing': 0.1},
}
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
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    raise ValueError(f'unknown variants {unknown}; use some of {", ".join(VARIANTS)}.')
  return [
    cell
    for n in labels
    for cell in [('supervised', 'base', n)] + [(b, v, n) for b in BASES for v in variants]
  ]


def run_name(algorithm: str, variant: str, seed: int, labels=None) -> str:
  return f'{algorithm}-{variant}' + ('' if labels is None else f'-n{labels}') + f'-s{seed}'


def grid(seeds, variants=DEFAULT_VARIANTS, labels=(None,)) -> list[dict]:
  """Every run, seed by seed: name, algorithm, variant, labels, seed and config overrides.

  labels=None keeps the config's data.num_labels (and the run name has no -n part).
  """
  return [
    {
      'name': run_name(a, v, s, n),
      'algorithm': a,
      'variant': v,
      'labels': n,
      'seed': s,
      'overrides': {
        'algorithm': a,
        'seed': s,
        **({} if n is None else {'data.num_labels': n}),
        **VARIANTS[v],
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
  if (workdir / 'eval.json').exists():
    return 'analyse'
  return 'resume' if (workdir / 'checkpoints').is_dir() else 'run'


def train_command(run: dict, workdir: str, config: str, user: dict, python: str) -> list[str]:
  """argv of one training run: the cell's overrides, then the user's (`--config.*`)."""
  argv = [python, '-m', 'cmix_jax.main', f'--config={config}', f'--workdir={workdir}']
  argv += [f'--config.{k}={v}' for k, v in {**run['overrides'], **user}.items()]
  return argv + ['--config.progress_bar=False']


def log_path(workdir: str) -> str:
  """Local file for a run's output: beside its workdir, or under runs/study_logs/ for gs://."""
  if storage.is_remote(workdir):
    return os.path.join('runs', 'study_logs', os.path.basename(workdir.rstrip('/')) + '.log')
  return os.path.abspath(os.path.expanduser(workdir)) + '.log'


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
      cwd=ROOT,
    )
  if code:
    raise RuntimeError(f'{run["name"]} failed (exit {code}); see {log_file}')
  return time.time() - start


def analyse(workdir: str) -> dict:
  import study_analysis  # pylint: disable=g-import-not-at-top

  return study_analysis.analyze(workdir)


def write_json(path: str, record) -> None:
  """Written whole, local or gs:// (a killed study never leaves half a result file)."""
  storage.write_json(path, record, indent=1, sort_keys=True, allow_nan=True)


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
  write_json(result_path(out, run['name']), record)
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


def _value(record: dict, metric: str):
  """A metric of a result record by dotted path ('metrics.ece', 'mechanism.auroc_apm')."""
  node = record
  for part in metric.split('.'):
    if not isinstance(node, dict) or node.get(part) is None:
      return math.nan
    node = node[part]
  return float(node)


def by_cell(results) -> dict:
  """(algorithm, variant) -> {seed: record}."""
  out = {}
  for r in results:
    out.setdefault((r['algorithm'], r['variant']), {})[int(r['seed'])] = r
  return out


def paired(cell_map: dict, a: tuple, b: tuple, metric: str) -> dict:
  """Paired (a - b) of one metric over the seeds both cells have, with its 95 % t-interval."""
  ra, rb = cell_map.get(a, {}), cell_map.get(b, {})
  seeds = sorted(set(ra) & set(rb))
  return compare.paired_interval([_value(ra[s], metric) - _value(rb[s], metric) for s in seeds])


def verdict_lower(iv: dict, what: str) -> str:
  """'yes' when the whole interval is below 0, 'no' when above, else 'not shown'."""
  if iv['n'] < 2:
    return f'not run yet ({iv["n"]} paired seed(s))'
  if iv['high'] < 0:
    return 'yes'
  if iv['low'] > 0:
    return f'no: it raises {what}'
  return 'not shown (the interval includes 0)'


def verdict_no_cost(iv: dict) -> str:
  """Accuracy non-inferiority with margin ACC_MARGIN."""
  if iv['n'] < 2:
    return f'not run yet ({iv["n"]} paired seed(s))'
  if iv['high'] < 0:
    return f'no: it costs {-100 * iv["mean"]:.2f} points'
  if iv['low'] >= -ACC_MARGIN:
    return f'yes (no loss beyond {100 * ACC_MARGIN:.1f} points)'
  return 'not shown (a loss above the margin is inside the interval)'


def comparisons(base: str) -> list[tuple]:
  """(label, cell a, cell b, metric, scale) of the paired differences reported for a base."""
  c = lambda v: (base, v)
  out = [(f'{base} − supervised', c('base'), ('supervised', 'base'), 'metrics.accuracy')]
  for metric in (
    'metrics.ece',
    'metrics.accuracy',
    'metrics.nll',
    'metrics.brier',
    'ts.metrics.ece',
  ):
    out.append((f'{base}: CalibrateMix − base', c('cmix'), c('base'), metric))
  for other in ('split_random', 'randmix', 'ls', 'cmix_fused'):
    for metric in ('metrics.ece', 'metrics.accuracy'):
      out.append((f'{base}: CalibrateMix − {other}', c('cmix'), c(other), metric))
  for metric in ('metrics.ece', 'metrics.accuracy'):
    out.append((f'{base}: split_random − randmix', c('split_random'), c('randmix'), metric))
    out.append((f'{base}: label smoothing − base', c('ls'), c('base'), metric))
  out.append(
    (f'{base}: AUROC APM − confidence (CalibrateMix runs)', c('cmix'), c('cmix'), 'mechanism')
  )
  return out


def _mechanism_interval(cell_map, cell) -> dict:
  runs = cell_map.get(cell, {})
  return compare.paired_interval(
    _value(r, 'mechanism.auroc_apm') - _value(r, 'mechanism.auroc_confidence')
    for r in runs.values()
  )


def verdicts(cell_map: dict, base: str) -> list[tuple[str, str, dict]]:
  """(claim, verdict, interval) per claim of the paper, for one base."""
  c = lambda v: (base, v)
  ece = paired(cell_map, c('cmix'), c('base'), 'metrics.ece')
  acc = paired(cell_map, c('cmix'), c('base'), 'metrics.accuracy')
  vs_split = paired(cell_map, c('cmix'), c('split_random'), 'metrics.ece')
  vs_rand = paired(cell_map, c('cmix'), c('randmix'), 'metrics.ece')
  v_split, v_rand = verdict_lower(vs_split, 'ECE'), verdict_lower(vs_rand, 'ECE')
  if v_split.startswith('not run') or v_rand.startswith('not run'):
    targeted = 'not run yet'
  elif v_split == v_rand == 'yes':
    targeted = 'yes'
  elif v_split.startswith('no:') or v_rand.startswith('no:'):
    targeted = 'no: an ablation has lower ECE'
  else:
    targeted = f'not shown (vs split+random partner: {v_split}; vs random mixup: {v_rand})'
  mech = _mechanism_interval(cell_map, c('cmix'))
  if mech['n'] < 2:
    mech_verdict = f'not run yet ({mech["n"]} seed(s))'
  elif mech['low'] > 0:
    mech_verdict = 'yes'
  elif mech['high'] < 0:
    mech_verdict = 'no: the current confidence flags wrong pseudo-labels better'
  else:
    mech_verdict = 'no: APM carries no more information than confidence here'
  ssl = paired(cell_map, c('base'), ('supervised', 'base'), 'metrics.accuracy')
  return [
    (
      f'{base} beats supervised on accuracy (setting sanity)',
      verdict_lower({**ssl, 'low': -ssl['high'], 'high': -ssl['low']}, 'nothing').replace(
        'no: it raises nothing', 'no: supervised is more accurate'
      ),
      ssl,
    ),
    (f'{base}: CalibrateMix lowers ECE', verdict_lower(ece, 'ECE'), ece),
    (f'{base}: … without costing accuracy', verdict_no_cost(acc), acc),
    (f'{base}: targeted pairing beats the ablations (ECE)', targeted, vs_rand),
    (f'{base}: stored APM flags wrong pseudo-labels better than confidence', mech_verdict, mech),
  ]


def _pm(values, scale=1.0, digits=2) -> str:
  mean, std = compare._mean_std(values)  # pylint: disable=protected-access
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


CELL_COLUMNS = (  # header, metric path, scale, digits
  ('accuracy (%)', 'metrics.accuracy', 100, 2),
  ('ECE (%)', 'metrics.ece', 100, 2),
  ('NLL', 'metrics.nll', 1, 3),
  ('Brier', 'metrics.brier', 1, 3),
  ('ECE after TS (%)', 'ts.metrics.ece', 100, 2),
  ('T', 'ts.temperature', 1, 2),
  ('AUROC APM', 'mechanism.auroc_apm', 1, 3),
  ('AUROC confidence', 'mechanism.auroc_confidence', 1, 3),
  ('pseudo-label error (%)', 'mechanism.pseudo_label_error', 100, 1),
  ('APM updates (mean)', 'apm_count.mean', 1, 1),
  ('APM updates (p5)', 'apm_count.p5', 1, 0),
)


def table(results) -> tuple[str, dict]:
  """(Markdown, summary dict) of the result records: per-cell means, paired differences."""
  cell_map = by_cell(results)
  order = [c for c in cells() if c in cell_map] + sorted(set(cell_map) - set(cells()))
  lines = [
    '| run | seeds | ' + ' | '.join(h for h, *_ in CELL_COLUMNS) + ' |',
    '|' + '---|' * (len(CELL_COLUMNS) + 2),
  ]
  summary = {'cells': {}, 'paired': [], 'verdicts': []}
  for cell in order:
    runs = [cell_map[cell][s] for s in sorted(cell_map[cell])]
    label = cell[0] + VARIANT_LABELS.get(cell[1], ' ' + cell[1])
    values = {h: [_value(r, m) for r in runs] for h, m, *_ in CELL_COLUMNS}
    lines.append(
      f'| {label} | {" ".join(str(r["seed"]) for r in runs)} | '
      + ' | '.join(_pm(values[h], scale, digits) for h, _, scale, digits in CELL_COLUMNS)
      + ' |'
    )
    summary['cells'][f'{cell[0]}/{cell[1]}'] = {
      'seeds': [r['seed'] for r in runs],
      **{m: compare._mean_std(values[h]) for h, m, *_ in CELL_COLUMNS},
    }  # pylint: disable=protected-access
  lines += [
    '',
    '| paired difference (same seed) | metric | seeds | mean [95 % t-interval] |',
    '|---|---|---|---|',
  ]
  bases = [b for b in BASES if any(c[0] == b for c in cell_map)]
  for base in bases:
    for label, a, b, metric in comparisons(base):
      iv = (
        _mechanism_interval(cell_map, a)
        if metric == 'mechanism'
        else paired(cell_map, a, b, metric)
      )
      if iv['n'] == 0:
        continue
      scale, unit = (100, 'points') if metric.endswith(('ece', 'accuracy')) else (1, '')
      name = 'AUROC' if metric == 'mechanism' else metric
      lines.append(
        f'| {label} | {name}{" (" + unit + ")" if unit else ""} | {iv["n"]} | '
        f'{_ci(iv, scale, 2 if scale == 100 else 3)} |'
      )
      summary['paired'].append({'comparison': label, 'metric': name, **iv})
  lines += ['', '| claim | verdict | paired mean [95 % interval] |', '|---|---|---|']
  for base in bases:
    for claim, verdict, iv in verdicts(cell_map, base):
      scale = 1 if 'APM' in claim else 100
      lines.append(f'| {claim} | {verdict} | {_ci(iv, scale, 3 if scale == 1 else 2)} |')
      summary['verdicts'].append({'claim': claim, 'verdict': verdict, **iv})
  lines += [
    '',
    'Final EMA checkpoint, test split; mean ± sample std over seeds. ECE: 10 equal-width '
    'bins. TS: temperature fitted by NLL on the held-out labeled validation slice. AUROC: '
    'how well −APM at the current pseudo-label (or −current max probability) ranks the '
    'unlabeled samples whose current pseudo-label is wrong first (hidden labels; EMA model, '
    'un-augmented images). Paired differences: same seed (= same labeled draw), Student-t '
    f'95 % interval; "without costing accuracy" = interval above −{100 * ACC_MARGIN:.1f} '
    'points.',
  ]
  return '\n'.join(lines) + '\n', summary


PICTURES = ('data_map_labeled.png', 'data_map_unlabeled.png')  # copied per run of the picture seed


def write_pictures(runs: list[dict], root: str, out: str, seed: int) -> list[str]:
  """`out/pictures/`: every cell's final reliability diagram (one figure) and data maps, of
  the runs of `seed` whose workdirs are here; returns the files written."""
  from cmix_jax import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to import)

  folder = storage.as_path(out) / 'pictures'
  tables, written = {}, []
  for run in (r for r in runs if r['seed'] == seed):
    workdir = storage.as_path(root) / run['name']
    if not (workdir / 'final_reliability.json').exists():
      continue
    label = run['algorithm'] + VARIANT_LABELS.get(run['variant'], ' ' + run['variant'])
    tables[label] = storage.read_json(workdir / 'final_reliability.json')
    for picture in PICTURES:
      if (workdir / picture).exists():
        target = folder / f'{run["name"]}_{picture}'
        written.append(str(storage.write_bytes(target, (workdir / picture).read_bytes())))
  if tables:
    path = str(folder / f'reliability_s{seed}.png')
    title = f'final EMA model, test split, seed {seed}'
    written += list(plots.multi_reliability(tables, path, title=title, ncols=4))
  return written


def write_table(out: str) -> str:
  results = load_results(out)
  if not results:
    raise SystemExit(f'no result files in {out}/runs yet: run the study first.')
  markdown, summary = table(results)
  storage.write_text(storage.as_path(out) / 'table.md', markdown)
  write_json(os.path.join(out, 'summary.json'), summary)
  return markdown


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
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--seeds', default='0,1,2,3,4', help='comma-separated seeds (labeled draws)')
  parser.add_argument(
    '--out',
    default=os.path.join(HERE, 'results', 'fmnist_dynamics'),
    help='results folder: runs/*.json, table.md, summary.json',
  )
  parser.add_argument('--root', default='runs/fmnist_dynamics', help='run workdirs')
  parser.add_argument('--config', default=CONFIG, help='the study config file')
  parser.add_argument(
    '--variants',
    default=','.join(DEFAULT_VARIANTS),
    help=f'variants of each base to run (supervised always runs); of {",".join(VARIANTS)}',
  )
  parser.add_argument(
    '--labels',
    default='',
    help='comma-separated label counts (data.num_labels per run); empty = the config\'s',
  )
  parser.add_argument('--only', default='', help='only runs whose name contains this')
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
      except Exception:  # pylint: disable=broad-except
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
  print(write_table(args.out))
  picture_seed = seeds[0] if args.picture_seed is None else args.picture_seed
  written = write_pictures(runs, args.root, args.out, picture_seed)
  print(f'{len(written)} picture files of seed {picture_seed} in {args.out}/pictures')
  return 0


if __name__ == '__main__':
  sys.exit(main())
