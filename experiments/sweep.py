"""Sweeps without a home-made scheduler: one `python -m cmix_jax.main ...` line per run.

  python experiments/sweep.py paper                 # print every paper setting's command
  python experiments/sweep.py fmnist_study --run    # run the CPU study here, one by one
  python experiments/sweep.py paper | xargs -P 4 -I{} sh -c '{}'   # any scheduler

Each run's workdir is named from its settings under --root (local or gs://); a run whose
workdir holds `eval.json` is finished and skipped, so a sweep can be restarted at any point.
With --run, each run's log goes beside its workdir (under runs/sweep_logs/ for a bucket).
"""

import argparse
import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cmix_jax import storage
from configs import classic_cv

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
VARIANT_OVERRIDES = {
  'base': {},
  'cmix': {'calibratemix.enabled': True},
  'randmix': {'calibratemix.enabled': True, 'calibratemix.random_pairing': True},
}


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
          **VARIANT_OVERRIDES[variant],
        }
        yield f'{algorithm}_fmnist_{num_labels}_{seed}_{variant}', config, overrides


GRIDS = {'paper': paper_grid, 'fmnist_study': fmnist_study_grid}


def command(config: str, workdir: str, overrides: dict, python: str = 'python') -> list[str]:
  """The argv of one run."""
  argv = [python, '-m', 'cmix_jax.main', f'--config={config}', f'--workdir={workdir}']
  argv += [f'--config.{k}={v}' for k, v in overrides.items()]
  return argv


def is_finished(workdir: str) -> bool:
  return (storage.as_path(workdir) / 'eval.json').exists()


def log_path(root: str, grid: str, name: str) -> str:
  """Local file for a run's output: beside its workdir, or under runs/sweep_logs/ for gs://."""
  if storage.is_remote(root):
    return os.path.join('runs', 'sweep_logs', grid, f'{name}.log')
  return os.path.join(root, grid, f'{name}.log')


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
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
    if is_finished(workdir) and not args.include_finished:
      if args.run:
        print(f'skip (finished): {name}', flush=True)
      continue
    argv_run = command(config, workdir, overrides, args.python)
    if not args.run:
      print(shlex.join(argv_run))
      continue
    print(f'run: {name}', flush=True)
    log = log_path(args.root, args.grid, name)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'w') as f:
      code = subprocess.call(
        argv_run + ['--config.progress_bar=False'], stdout=f, stderr=subprocess.STDOUT
      )
    if code:
      print(f'FAILED ({code}): {name}; see {log}', flush=True)


if __name__ == '__main__':
  main()
