"""The CPU study, from scratch to the committed table: one command.

  python experiments/study.py            # runs what is missing, then writes experiments/results/
  python experiments/study.py --table_only

Runs the `fmnist_study` grid of experiments/sweep.py (skipping finished runs), then
aggregates it with experiments/compare.py into experiments/results/ (table.md,
table.csv, reliability.png) and copies the seed-0 data maps and reliability diagrams
of the 40-label SoftMatch runs (base, +CalibrateMix, +random mixup) beside them.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import compare  # pylint: disable=g-import-not-at-top,wrong-import-position
import sweep  # pylint: disable=g-import-not-at-top,wrong-import-position

from cmix_jax import storage  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
PICTURES = ('data_map_labeled.png', 'data_map_unlabeled.png', 'final_reliability.png')


def copy_pictures(grid_root: str, out: str) -> list[str]:
  """Seed-0 pictures of the 40-label SoftMatch variants, renamed by run."""
  copied = []
  for variant in ('base', 'cmix', 'randmix'):
    run = f'softmatch_fmnist_40_0_{variant}'
    for picture in PICTURES:
      src = storage.as_path(grid_root) / run / picture
      if src.exists():
        dst = os.path.join(out, f'{run}_{picture}')
        storage.write_bytes(dst, src.read_bytes())
        copied.append(dst)
  return copied


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--root', default='runs/sweeps')
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  parser.add_argument('--table_only', action='store_true')
  args = parser.parse_args(argv)
  if not args.table_only:
    sweep.main(['fmnist_study', '--run', f'--root={args.root}'])
  grid_root = os.path.join(args.root, 'fmnist_study')  # --root and --out: local or gs://
  compare.main([grid_root, f'--out={args.out}'])
  for path in copy_pictures(grid_root, args.out):
    print('wrote', path)


if __name__ == '__main__':
  main()
