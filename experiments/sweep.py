"""Sweeps without a home-made scheduler: one `python -m cmix_jax.main ...` line per run.

  python -m experiments.sweep paper                 # print every paper setting's command
  python -m experiments.sweep fmnist_study --run    # run the CPU study here, one by one
  python -m experiments.sweep paper | xargs -P 4 -I{} sh -c '{}'   # any scheduler

Each run's workdir is named from its settings under --root (local or gs://); a run whose
workdir holds `eval.json` is finished and skipped, so a sweep can be restarted at any point.
With --run, each run's log goes beside its workdir (under runs/sweep_logs/ for a bucket).
"""

import os
import shlex
import subprocess
import sys

from configs import classic_cv
from experiments import common

# The CPU study of Fashion-MNIST: (algorithm, variant) pairs, label settings and seeds.
FMNIST_RUNS = (
  ('supervised', 'base'),
  ('fixmatch', 'base'),
  ('fixmatch', 'cmix'),
  ('softmatch', 'base'),
  ('softmatch', 'cmix'),
  ('softmatch', 'randmix'),
)
FMNIST_LABELS = (40, 250)
SEEDS = (0, 1, 2)


def paper_grid():
  """Every setting of the paper's tables (configs/classic_cv.py)."""
  for algorithm, dataset, num_labels, seed, variant in classic_cv.all_settings():
    name = f'{algorithm}_{dataset}_{num_labels}_{seed}_{variant}'
    yield name, f'configs/classic_cv.py:{algorithm},{dataset},{num_labels},{seed},{variant}', {}


def fmnist_study_grid(config='configs/fmnist_study.py'):
  """The CPU study: supervised, FixMatch, SoftMatch, each +-CalibrateMix, random mixup."""
  for num_labels in FMNIST_LABELS:
    for algorithm, variant in FMNIST_RUNS:
      for seed in SEEDS:
        overrides = {
          'algorithm': algorithm,
          'seed': seed,
          'data.num_labels': num_labels,
          **common.VARIANTS[variant],
        }
        yield f'{algorithm}_fmnist_{num_labels}_{seed}_{variant}', config, overrides


GRIDS = {'paper': paper_grid, 'fmnist_study': fmnist_study_grid}


def main(argv=None):
  parser = common.arg_parser(__doc__)
  parser.add_argument('grid', choices=sorted(GRIDS))
  parser.add_argument('--root', default='runs/sweeps', help='parent of every run workdir')
  parser.add_argument('--run', action='store_true', help='run here, one after another')
  parser.add_argument(
    '--include_finished',
    action='store_true',
    help='also print runs whose workdir already has eval.json',
  )
  parser.add_argument('--filter', default='', help='only runs whose name contains this')
  parser.add_argument(
    '--python', default=sys.executable if '--run' in (argv or sys.argv) else 'python'
  )
  args = parser.parse_args(argv)
  runs = [(n, c, o) for n, c, o in GRIDS[args.grid]() if args.filter in n]
  for name, config, overrides in runs:
    workdir = os.path.join(args.root, args.grid, name)
    if common.is_finished(workdir) and not args.include_finished:
      if args.run:
        print(f'skip (finished): {name}', flush=True)
      continue
    argv_run = common.main_command(config, workdir, overrides, python=args.python)
    if not args.run:
      print(shlex.join(argv_run))
      continue
    print(f'run: {name}', flush=True)
    log = common.log_path(workdir, os.path.join('runs', 'sweep_logs', args.grid))
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'w') as f:
      code = subprocess.call(
        argv_run + ['--config.progress_bar=False'], stdout=f, stderr=subprocess.STDOUT
      )
    if code:
      print(f'FAILED ({code}): {name}; see {log}', flush=True)


if __name__ == '__main__':
  main()
