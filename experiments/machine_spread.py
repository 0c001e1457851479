r"""The machine as a noise source: the same run trained on two machines, beside the seed spread.

Every study result file records the machine it trained on (`provenance.train.machine_id`,
CPU model and ISA flags, library versions, commit). Give this script the study's result
folder and any folders of reruns: for every run name found on two different machines it
prints both results, their difference, whether they are equal to the last float digit, and,
for scale, the spread of that cell over seeds (standard deviation over the study's seeds) and
the run's own ECE sampling noise (half-width of its bootstrap interval over test images).

    python -m experiments.machine_spread \
        --study=experiments/results/fmnist_controlled/runs \
        --reruns=experiments/results/fmnist_controlled/machine_rerun/runs \
        --out=experiments/results/fmnist_controlled/machine_rerun/machine_spread.md
"""

import argparse
import json
import math
import pathlib
import statistics
import sys

from experiments import study as study_results

METRICS = (('accuracy', 'metrics.accuracy'), ('ECE', 'metrics.ece'))


def load_folder(folder: str) -> list[dict]:
  """Every result file (`*.json` with a `name`) of one folder, sorted by file name."""
  records = [json.loads(p.read_text()) for p in sorted(pathlib.Path(folder).glob('*.json'))]
  return [r for r in records if 'name' in r and 'metrics' in r]


def machine_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
  """(first, other) for each run name recorded on two machines: the first file seen and the
  first later file of the same name whose machine id differs."""
  first, pairs = {}, {}
  for r in records:
    name = r['name']
    first.setdefault(name, r)
    if name not in pairs and study_results.machine_of(r) != study_results.machine_of(first[name]):
      pairs[name] = (first[name], r)
  return list(pairs.values())


def seed_sd(study: list[dict], cell: tuple, dotted: str) -> tuple[float, int]:
  """Standard deviation over seeds of one cell's metric in the study, and how many seeds."""
  values = [
    study_results.metric_value(r, dotted) for r in study if study_results.cell_of(r) == cell
  ]
  values = [v for v in values if math.isfinite(v)]
  return (statistics.stdev(values) if len(values) >= 2 else math.nan), len(values)


def spread_rows(study: list[dict], reruns: list[dict]) -> list[dict]:
  """One row per run trained on two machines: the study's value and the other machine's
  (a = the first file of the name, the study's where it has one), difference, seed SD, noise."""
  rows = []
  for a, b in machine_pairs(study + reruns):
    row = {
      'name': a['name'],
      'machines': (study_results.machine_of(a), study_results.machine_of(b)),
    }
    for label, dotted in METRICS:
      va, vb = (study_results.metric_value(r, dotted) for r in (a, b))
      sd, row['seeds'] = seed_sd(study, study_results.cell_of(a), dotted)
      row[label] = {'a': va, 'b': vb, 'b_minus_a': vb - va, 'equal': va == vb, 'seed_sd': sd}
    boots = [r.get('ece_bootstrap') or {} for r in (a, b)]
    halves = [(x['high'] - x['low']) / 2 for x in boots if 'high' in x and 'low' in x]
    row['ece_bootstrap_half_width'] = max(halves) if halves else math.nan
    rows.append(row)
  return rows


def markdown(rows: list[dict]) -> str:
  """The table, in points (percent), with a one-line reading under it."""
  if not rows:
    return 'No run name is recorded on two different machines.\n'
  lines = [
    '| run | machines (study → other) | accuracy study / other (%) | other − study | seed SD '
    '| ECE study / other (%) | other − study '
    '| seed SD | ECE bootstrap ± | equal to the last digit |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for row in rows:
    acc, ece = row['accuracy'], row['ECE']
    lines.append(
      f'| {row["name"]} | {row["machines"][0]} → {row["machines"][1]} '
      f'| {100 * acc["a"]:.2f} / {100 * acc["b"]:.2f} | {100 * acc["b_minus_a"]:+.2f} '
      f'| {100 * acc["seed_sd"]:.2f} '
      f'| {100 * ece["a"]:.2f} / {100 * ece["b"]:.2f} | {100 * ece["b_minus_a"]:+.2f} '
      f'| {100 * ece["seed_sd"]:.2f} | {100 * row["ece_bootstrap_half_width"]:.2f} '
      f'| {"yes" if acc["equal"] and ece["equal"] else "no"} |'
    )
  largest = {k: max(abs(100 * r[k]['b_minus_a']) for r in rows) for k in ('accuracy', 'ECE')}
  lines += [
    '',
    f'Largest machine-to-machine move of one run: {largest["accuracy"]:.2f} accuracy points, '
    f'{largest["ECE"]:.2f} ECE points (seed SD: the cell\'s standard deviation over the '
    f'study\'s seeds; ECE bootstrap ±: half-width of the 95 % interval over test images).',
  ]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--study', required=True, help="the study's result folder (runs/)")
  parser.add_argument('--reruns', default='', help='comma-separated folders of reruns')
  parser.add_argument('--out', default='', help='write the Markdown table here (else print)')
  args = parser.parse_args(argv)
  folders = [args.study] + [f for f in args.reruns.split(',') if f.strip()]
  missing = [f for f in folders if not pathlib.Path(f).is_dir()]
  if missing:
    print(f'error: no such folder: {", ".join(missing)}; give result folders (runs/).')
    return 2
  study = load_folder(args.study)
  reruns = [r for f in folders[1:] for r in load_folder(f)]
  text = markdown(spread_rows(study, reruns))
  if args.out:
    pathlib.Path(args.out).write_text(text)
  print(text, end='')
  return 0


if __name__ == '__main__':
  sys.exit(main())
