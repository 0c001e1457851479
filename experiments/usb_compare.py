"""USB's FixMatch / SoftMatch (experiments/usb_beside.py) beside ours, seed by seed: a Markdown table.

  python -m experiments.usb_compare
  python -m experiments.usb_compare --usb=DIR --ours=DIR --our_root=DIR --out=table.md

--usb holds usb_beside.py's `<base>-n<labels>-s<seed>.json`; --ours holds our study's
`<base>-base-n<labels>-s<seed>.json` (keys metrics.accuracy, metrics.ece); --our_workdirs
(our finished run workdirs of the same names, eval.json) fills the seeds --ours lacks. A seed is one
labeled draw on both sides, so differences are paired by seed. Per base and metric: mean ±
std of each side, the mean paired difference (USB − ours) with its 95 % t-interval, and an
equivalence verdict by TOST at ±--margin: the 90 % paired t-interval inside the margin is
"equivalent within 3 points", entirely outside it "different by more than 3 points", else
"not shown either way". With --our_root (our run workdirs) every USB run's split is checked
against our run's split.json and its hyperparameters against our config.json. USB replicates
(usb_beside.py --replicate=R: same draws, other training seed) give the noise floor: the
spread of USB replicate − USB beside the spread of USB − ours.
"""

import argparse
import json
import math
import os
import re
import sys

from experiments import common
from experiments import compare

BASES = ('fixmatch', 'softmatch')
METRICS = (('accuracy', 'accuracy'), ('ece', 'ECE (10 bins)'))
USB_FILE = re.compile(
  r'^(?P<base>[a-z]+)-n(?P<labels>\d+)-s(?P<seed>\d+)(?:-r(?P<replicate>\d+))?\.json$'
)
# Our study's names; the older dynamics study's `<base>-base-s<seed>.json` (40 labels) too.
OURS_FILE = re.compile(r'^(?P<base>[a-z]+)-base(?:-n(?P<labels>\d+))?-s(?P<seed>\d+)\.json$')
DEFAULT_USB = 'experiments/results/fmnist_controlled/usb'
DEFAULT_OURS = 'experiments/results/fmnist_controlled/runs'


def load_folder(folder: str, pattern: re.Pattern, labels: int, replicate: int = 0) -> dict:
  """(base, seed) -> record of every file in `folder` matching `pattern` at `labels` labels
  and `replicate` (a name without a label count is taken as `labels`, without one as 0)."""
  if not os.path.isdir(folder):
    return {}
  found = {}
  for name in sorted(os.listdir(folder)):
    match = pattern.match(name)
    if not match or match['base'] not in BASES:
      continue
    named = int(match['labels']) if match['labels'] else labels
    rep = int(match.groupdict().get('replicate') or 0)
    if named == labels and rep == replicate:
      with open(os.path.join(folder, name)) as f:
        found[(match['base'], int(match['seed']))] = json.load(f)
  return found


def load_workdirs(folder: str, labels: int) -> dict:
  """(base, seed) -> {'metrics': eval.json} of our finished `<base>-base-n<labels>-s<seed>` runs."""
  if not folder or not os.path.isdir(folder):
    return {}
  found = {}
  for name in sorted(os.listdir(folder)):
    match = OURS_FILE.match(name + '.json')
    path = os.path.join(folder, name, common.FINISHED_FILE)
    if not match or match['base'] not in BASES or not os.path.exists(path):
      continue
    if int(match['labels'] or labels) != labels:
      continue
    with open(path) as f:
      record = json.load(f)
    if record.get('step') == record.get('num_train_steps'):
      found[(match['base'], int(match['seed']))] = {'metrics': record, 'source': 'workdir'}
  return found


def save_workdir_records(workdirs: dict, folder: str, labels: int) -> list[str]:
  """Writes each workdir-sourced record of ours as `<base>-base-n<labels>-s<seed>.json`."""
  from experiments import usb_beside

  os.makedirs(folder, exist_ok=True)
  written = []
  for (base, seed), record in sorted(workdirs.items()):
    name = common.run_name(base, 'base', seed, labels)
    path = os.path.join(folder, f'{name}.json')
    out = {
      'name': name,
      'algorithm': base,
      'seed': seed,
      'metrics': {k: v for k, v in record['metrics'].items() if isinstance(v, (int, float))},
      'source': 'rerun',
      'command': 'python -m cmix_jax.main --config=configs/fmnist_dynamics.py '
      f'--config.algorithm={base} --config.seed={seed} --config.data.num_labels={labels} '
      '--config.ssl.ema_p=0.99 (eval.json, final EMA checkpoint)',
      'provenance': {'cpu': usb_beside.cpu_model(), 'git_commit': usb_beside.git_commit()},
    }
    with open(path, 'w') as f:
      json.dump(out, f, indent=1, sort_keys=True)
    written.append(path)
  return written


def merge_ours(files: dict, workdirs: dict) -> tuple[dict, list[str]]:
  """Result files first, workdirs for the seeds they lack; notes where both exist."""
  notes = []
  for key in sorted(set(files) & set(workdirs)):
    a, b = (metric(r, 'accuracy') for r in (files[key], workdirs[key]))
    e, f = (metric(r, 'ece') for r in (files[key], workdirs[key]))
    notes.append(
      f'{key[0]} s{key[1]}: ours twice, result file {100 * a:.2f} % / ECE {100 * e:.2f} %, '
      f'rerun here {100 * b:.2f} % / {100 * f:.2f} %' + (' (identical)' if (a, e) == (b, f) else '')
    )
  return {**workdirs, **files}, notes


def metric(record: dict, key: str) -> float:
  """record['metrics'][key] as a float (NaN when missing)."""
  value = (record.get('metrics') or {}).get(key)
  return math.nan if value is None else float(value)


def tost_verdict(interval90: dict, margin: float) -> str:
  """Equivalence from the 90 % paired interval against ±margin (two one-sided tests at 5 %)."""
  low, high = interval90['low'], interval90['high']
  points = f'{100 * margin:g} points'
  if not (math.isfinite(low) and math.isfinite(high)):
    return 'too few pairs'
  if -margin < low and high < margin:
    return f'equivalent within {points}'
  if low >= margin or high <= -margin:
    return f'different by more than {points}'
  return 'not shown either way'


def compare_base(usb: dict, ours: dict, base: str, key: str, margin: float) -> dict:
  """Both sides' values of one metric, the paired differences and their intervals."""
  usb_values = {s: metric(r, key) for (b, s), r in usb.items() if b == base}
  our_values = {s: metric(r, key) for (b, s), r in ours.items() if b == base}
  paired = sorted(set(usb_values) & set(our_values))
  diffs = [usb_values[s] - our_values[s] for s in paired]
  ci95 = compare.paired_interval(diffs, 0.95)
  ci90 = compare.paired_interval(diffs, 0.90)
  return {
    'base': base,
    'metric': key,
    'usb': compare._mean_std(usb_values.values()),
    'usb_seeds': sorted(usb_values),
    'ours': compare._mean_std(our_values.values()),
    'our_seeds': sorted(our_values),
    'paired_seeds': paired,
    'differences': diffs,
    'ci95': ci95,
    'ci90': ci90,
    'verdict': tost_verdict(ci90, margin) if paired else 'no pairs yet',
  }


def _pm(mean_std: tuple, n: int) -> str:
  mean, std = mean_std
  if not math.isfinite(mean):
    return '–'
  spread = f' ± {100 * std:.2f}' if math.isfinite(std) else ''
  return f'{100 * mean:.2f}{spread} (n={n})'


def _interval(iv: dict) -> str:
  if not math.isfinite(iv['mean']):
    return '–'
  if not math.isfinite(iv['low']):
    return f'{100 * iv["mean"]:+.2f}'
  return f'{100 * iv["mean"]:+.2f} [{100 * iv["low"]:+.2f}, {100 * iv["high"]:+.2f}]'


def smallest_margin(interval90: dict) -> str:
  """The tightest ±margin (points) TOST would call equivalent: the 90 % interval's far end."""
  ends = (interval90['low'], interval90['high'])
  if not all(math.isfinite(e) for e in ends):
    return '–'
  return f'±{100 * max(abs(e) for e in ends):.2f}'


def table(rows: list[dict], margin: float) -> str:
  """The Markdown table (values in percentage points)."""
  lines = [
    '| base | metric | USB (semilearn) | ours (cmix_jax) | USB − ours, paired: mean '
    '[95 % CI] | 90 % CI | verdict (TOST ±' + f'{100 * margin:g} points) | smallest margin shown |',
    '|---|---|---|---|---|---|---|---|',
  ]
  labels = dict(METRICS)
  for r in rows:
    ci90 = r['ci90']
    ci90_text = (
      f'[{100 * ci90["low"]:+.2f}, {100 * ci90["high"]:+.2f}]'
      if math.isfinite(ci90['low'])
      else '–'
    )
    lines.append(
      f'| {r["base"]} | {labels[r["metric"]]} | {_pm(r["usb"], len(r["usb_seeds"]))} | '
      f'{_pm(r["ours"], len(r["our_seeds"]))} | {_interval(r["ci95"])} | {ci90_text} | '
      f'{r["verdict"]} | {smallest_margin(ci90)} |'
    )
  return '\n'.join(lines)


def per_seed_table(usb: dict, ours: dict) -> str:
  """One line per (base, seed): both sides' accuracy and ECE, and USB's train seconds."""
  lines = [
    '| base | seed | USB accuracy | ours accuracy | USB ECE | ours ECE | USB train s | ours from |',
    '|---|---|---|---|---|---|---|---|',
  ]
  fmt = lambda r, k: '–' if r is None else f'{100 * metric(r, k):.2f}'
  source = lambda r: '–' if r is None else r.get('source', 'result file')
  for base, seed in sorted(set(usb) | set(ours)):
    u, o = usb.get((base, seed)), ours.get((base, seed))
    seconds = '–' if u is None else f'{u.get("train_seconds", math.nan):.0f}'
    lines.append(
      f'| {base} | {seed} | {fmt(u, "accuracy")} | {fmt(o, "accuracy")} | '
      f'{fmt(u, "ece")} | {fmt(o, "ece")} | {seconds} | {source(o)} |'
    )
  return '\n'.join(lines)


def audit(usb: dict, our_root: str) -> list[str]:
  """Split and hyperparameter checks of every USB run against our workdir of the same draw."""
  from experiments import usb_beside

  notes = []
  for (base, seed), record in sorted(usb.items()):
    labels = record['hyperparameters']['data.num_labels']
    name = common.run_name(base, 'base', seed, labels)
    roots = [r for r in our_root.split(',') if os.path.exists(os.path.join(r, name, 'split.json'))]
    workdir = os.path.join(roots[0] if roots else '', name)
    split_file = os.path.join(workdir, 'split.json')
    if not roots:
      notes.append(f'{base} s{seed}: no split.json of ours yet')
      continue
    with open(split_file) as f:
      ours = usb_beside.split_json_indices(json.load(f))
    same = usb_beside.split_digest(ours) == record['split']['digest']
    notes.append(f'{base} s{seed}: split {"identical" if same else "DIFFERENT"}')
    config_file = os.path.join(workdir, 'config.json')
    if os.path.exists(config_file):
      with open(config_file) as f:
        config = json.load(f)
      bad = [
        f'{k}={v!r} (ours {config[k.split(".")[0]][k.split(".")[1]]!r})'
        for k, v in record['hyperparameters'].items()
        if '.' in k and config[k.split('.')[0]][k.split('.')[1]] != v
      ]
      if config.get('num_train_steps') != record['hyperparameters']['num_train_steps']:
        bad.append(f'num_train_steps (ours {config.get("num_train_steps")})')
      notes[-1] += ', hyperparameters ' + ('identical' if not bad else 'DIFFER: ' + '; '.join(bad))
  return notes


def noise_floor(usb: dict, replicas: dict, ours: dict) -> str:
  """Per base and metric: spread of USB replicate − USB (same draw, other training seed)
  beside the spread of USB − ours; equal spreads mean the two sides differ by noise alone."""
  lines = [
    '| base | metric | USB r − USB, same draw: mean [95 % CI], sd (n) | USB − ours: sd (n) |',
    '|---|---|---|---|',
  ]
  labels = dict(METRICS)
  for base in BASES:
    for key, _ in METRICS:
      rep = compare_base(replicas, usb, base, key, math.inf)
      pair = compare_base(usb, ours, base, key, math.inf)
      if not rep['paired_seeds']:
        continue
      sd = lambda iv: '–' if not math.isfinite(iv['std']) else f'{100 * iv["std"]:.2f}'
      lines.append(
        f'| {base} | {labels[key]} | {_interval(rep["ci95"])}, {sd(rep["ci95"])} '
        f'(n={rep["ci95"]["n"]}) | {sd(pair["ci95"])} (n={pair["ci95"]["n"]}) |'
      )
  return '\n'.join(lines) if len(lines) > 2 else ''


def report(usb: dict, ours: dict, margin: float, notes=(), replicas=None) -> str:
  """Summary table, per-seed table, the replicate noise floor and notes, as Markdown."""
  rows = [compare_base(usb, ours, b, k, margin) for b in BASES for k, _ in METRICS]
  parts = [table(rows, margin), '', per_seed_table(usb, ours)]
  floor = noise_floor(usb, replicas or {}, ours)
  if floor:
    parts += ['', floor]
  if notes:
    parts += ['', *[f'- {n}' for n in notes]]
  return '\n'.join(parts) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--usb', default=DEFAULT_USB, help="usb_beside.py's --out")
  parser.add_argument(
    '--ours', default=DEFAULT_OURS, help="our result folders, comma-separated (the first wins)"
  )
  parser.add_argument(
    '--our_root', default='', help='folders of our run workdirs, comma-separated, for the audit'
  )
  parser.add_argument(
    '--our_workdirs', default='', help='our finished workdirs, for seeds --ours lacks (eval.json)'
  )
  parser.add_argument('--labels', type=int, default=40)
  parser.add_argument('--margin', type=float, default=0.03, help='equivalence margin (fraction)')
  parser.add_argument('--save_ours', default='', help='write the workdir records of ours here')
  parser.add_argument('--replicate', type=int, default=1, help="usb_beside's --replicate")
  parser.add_argument('--out', default='', help='also write the Markdown here')
  args = parser.parse_args(argv)
  usb = load_folder(os.path.join(common.REPO, args.usb), USB_FILE, args.labels)
  replicas = load_folder(os.path.join(common.REPO, args.usb), USB_FILE, args.labels, args.replicate)
  files = {}
  for folder in reversed([f for f in args.ours.split(',') if f]):  # the first folder wins
    files.update(load_folder(os.path.join(common.REPO, folder), OURS_FILE, args.labels))
  workdirs = load_workdirs(args.our_workdirs, args.labels)
  if args.save_ours:
    print('\n'.join(save_workdir_records(workdirs, args.save_ours, args.labels)))
  ours, notes = merge_ours(files, workdirs)
  notes += audit(usb, args.our_root) if args.our_root else []
  if not ours:
    notes.append(f'no result files of ours in {args.ours} yet')
  text = report(usb, ours, args.margin, notes, replicas)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
  return 0


if __name__ == '__main__':
  sys.exit(main())
