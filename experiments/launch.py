"""Prints (--dry_run) or runs the commands that train one config on Cloud TPU, a GPU node or SLURM.

  python -m experiments.launch --target=tpu --name=cmix-v4 --zone=us-central2-b \\
      --accelerator_type=v4-32 --bucket=my-bucket --spot \\
      --config=configs/classic_cv.py:softmatch,cifar10,40,0,cmix --dry_run
  python -m experiments.launch --target=gpu --config=configs/classic_cv.py:fixmatch,svhn,40,0
  python -m experiments.launch --target=slurm --nodes=4 --gpus_per_node=8 --bucket=my-bucket \\
      --config=configs/classic_cv.py:softmatch,cifar100,400,0,cmix --dry_run \\
      -- --config.calibratemix.passes=1

Arguments after `--` are extra `--config.FIELD=VALUE` overrides for cmix_jax.main. The config
and the flags are checked before anything is created; a problem is one line naming the fix.
Without --dry_run the commands run here one after the other and stop at the first failure
(TPU: the training runs detached on the workers, its log in ~/cmix_train.log). Rerunning the
training command resumes from --workdir (a SIGTERM, e.g. a spot VM's preemption notice or
SLURM's --signal, saves a checkpoint first). The gcloud/sbatch lines are what Cloud TPU and
SLURM document; tests check the printed lines, not a real cloud.
"""

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys

from cmix_jax import config_validation
from cmix_jax.data import specs
from experiments import common

TARGETS = ('tpu', 'gpu', 'slurm')
TARBALL = 'cmix_jax.tar.gz'  # `git archive` of HEAD (in the repo root, git-ignored), copied to every TPU worker
REMOTE_DIR = 'cmix_jax'  # the checkout on each TPU worker, under the home directory
REMOTE_LOG = '~/cmix_train.log'  # the detached training's output on each TPU worker
# TFDS builders `tfds build` can make from the internet (ImageNet needs its tars in manual_dir).
TFDS_BUILDABLE = ('cifar10', 'cifar100', 'svhn_cropped', 'stl10', 'imagenet2012')
# TPU generation -> (JAX devices per accelerator-type unit, default TPU VM software version).
# v2/v3/v4/v5p types count TensorCores (v4/v5p: 2 per chip = 1 JAX device); v5e/v6e count chips.
TPU_GENERATIONS = {
  'v2': (1, 'tpu-ubuntu2204-base'),
  'v3': (1, 'tpu-ubuntu2204-base'),
  'v4': (2, 'tpu-ubuntu2204-base'),
  'v5litepod': (1, 'v2-alpha-tpuv5-lite'),
  'v5p': (2, 'v2-alpha-tpuv5'),
  'v6e': (1, 'v2-alpha-tpuv6e'),
}
TPU_ALIASES = {'v5e': 'v5litepod'}  # v5e-8 is spelled v5litepod-8 in gcloud


class LaunchError(ValueError):
  """A flag or config that cannot launch; the message names the fix."""


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one LaunchError line instead of usage + exit."""

  def error(self, message):
    raise LaunchError(f'{message} (see `python -m experiments.launch --help`).')


@dataclasses.dataclass(frozen=True)
class Step:
  """One command: what it does, its argv, and whether it only prints (a hint to run later)."""

  what: str
  argv: tuple
  hint_only: bool = False


def make_parser() -> argparse.ArgumentParser:
  parser = common.arg_parser(__doc__, _Parser)
  parser.add_argument('--target', required=True, choices=TARGETS, help='where to train')
  parser.add_argument(
    '--config',
    required=True,
    help='config file[:argument], e.g. configs/classic_cv.py:fixmatch,cifar10,40,0',
  )
  parser.add_argument('--name', default='', help='TPU VM / SLURM job name (default from config)')
  parser.add_argument('--zone', default='', help='TPU zone, e.g. us-central2-b')
  parser.add_argument('--project', default='', help='Google Cloud project (default: gcloud\'s)')
  parser.add_argument(
    '--accelerator_type',
    default='',
    help='TPU type: v4-8, v5e-8 (= v5litepod-8), v4-32, v5p-16, v6e-8 ...',
  )
  parser.add_argument(
    '--tpu_version', default='', help='TPU VM software version (default: per generation)'
  )
  parser.add_argument('--spot', action='store_true', help='TPU spot VM (preemptible, cheaper)')
  parser.add_argument(
    '--bucket', default='', help='gs:// bucket for data (BUCKET/tfds) and runs (BUCKET/runs/RUN)'
  )
  parser.add_argument(
    '--workdir',
    default='',
    help='run directory (default: BUCKET/runs/RUN '
    'with --bucket, else runs/RUN; RUN is named from --config)',
  )
  parser.add_argument(
    '--data_dir',
    default='',
    help='TFDS data dir (default: BUCKET/tfds with --bucket, else the config\'s data.data_dir)',
  )
  parser.add_argument('--nodes', type=int, default=1, help='SLURM nodes (one task per node)')
  parser.add_argument(
    '--gpus_per_node',
    type=int,
    default=0,
    help='GPUs per node (SLURM: required; gpu: used to check the batch)',
  )
  parser.add_argument('--partition', default='', help='SLURM partition (default: the cluster\'s)')
  parser.add_argument('--time', default='', help='SLURM time limit, e.g. 2-00:00:00')
  parser.add_argument('--dry_run', action='store_true', help='print the commands, run nothing')
  parser.add_argument(
    'overrides', nargs='*', help='after --: extra --config.FIELD=VALUE for cmix_jax.main'
  )
  return parser


# ----------------------------------------------------------------------------- checks


def load_config(config_flag: str):
  """The ConfigDict of `file[:argument]`, as ml_collections' config_flags builds it."""
  try:
    return common.load_config(config_flag)
  except FileNotFoundError as e:
    raise LaunchError(
      f'--config file {config_flag.partition(":")[0]} does not exist: give a path such as '
      'configs/classic_cv.py:fixmatch,cifar10,40,0 (relative to the repo).'
    ) from e
  except ValueError as e:
    raise LaunchError(f'--config={config_flag}: {e}') from e


def check_overrides(config, overrides) -> None:
  """Every override is --config.FIELD=VALUE with FIELD in the config (typos fail here)."""
  for override in overrides:
    match = re.fullmatch(r'--config\.([\w.]+)=(.*)', override)
    if not match:
      raise LaunchError(
        f'extra argument {override!r}: only --config.FIELD=VALUE may follow '
        '`--`, e.g. -- --config.calibratemix.passes=1.'
      )
    node = config
    for part in match.group(1).split('.'):
      if not hasattr(node, 'keys') or part not in node:
        raise LaunchError(
          f'{override}: the config has no field {match.group(1)!r}; check the '
          'spelling against configs/default.py.'
        )
      node = node[part]


def tpu_type(accelerator_type: str) -> tuple[str, str, int]:
  """'v5e-8' -> ('v5litepod-8', 'v5litepod', 8 JAX devices); bad names raise LaunchError."""
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator_type)
  generation = match and TPU_ALIASES.get(match.group(1), match.group(1))
  if not match or generation not in TPU_GENERATIONS:
    raise LaunchError(
      f'--accelerator_type={accelerator_type!r}: use GENERATION-SIZE with a '
      f'generation of {", ".join(list(TPU_GENERATIONS) + list(TPU_ALIASES))}, '
      'e.g. v4-8, v5e-8 or v4-32.'
    )
  size = int(match.group(2))
  per_device = TPU_GENERATIONS[generation][0]
  return f'{generation}-{size}', generation, max(size // per_device, 1)


def bucket_url(bucket: str) -> str:
  """'my-bucket' or 'gs://my-bucket/' -> 'gs://my-bucket'."""
  name = bucket[len('gs://') :] if bucket.startswith('gs://') else bucket
  name = name.strip('/')
  if not re.fullmatch(r'[a-z0-9][a-z0-9._-]*[a-z0-9](/[^\s]*)?', name):
    raise LaunchError(
      f'--bucket={bucket!r}: give a Cloud Storage bucket such as my-bucket or '
      'gs://my-bucket (lower-case letters, digits, -, _ and .).'
    )
  return f'gs://{name}'


def run_name(config_flag: str) -> str:
  """A name from the config: 'configs/classic_cv.py:softmatch,cifar10,40,0' -> 'softmatch-...'."""
  path, _, argument = config_flag.partition(':')
  stem = os.path.splitext(os.path.basename(path))[0]
  raw = argument or stem
  return re.sub(r'[^a-z0-9]+', '-', raw.lower()).strip('-')


@dataclasses.dataclass(frozen=True)
class Plan:
  """The checked flags: everything the command builders need."""

  args: argparse.Namespace
  config: object
  name: str
  workdir: str
  data_dir: str
  num_devices: int
  accelerator_type: str = ''
  tpu_version: str = ''


def _need(args, target, *flags):
  missing = [f for f in flags if not getattr(args, f)]
  if missing:
    raise LaunchError(
      f'--target={target} needs {", ".join("--" + f for f in missing)}, e.g. '
      + {
        'tpu': '--name=cmix-v4 --zone=us-central2-b --accelerator_type=v4-8 --bucket=my-bucket',
        'slurm': '--gpus_per_node=8',
      }[target]
      + '.'
    )


def _check_target_flags(args: argparse.Namespace) -> None:
  """Refuses flags of another target and impossible counts."""
  if args.target != 'tpu':
    for flag in ('zone', 'accelerator_type', 'tpu_version', 'spot', 'project'):
      if getattr(args, flag):
        raise LaunchError(f'--{flag} is for --target=tpu; drop it for --target={args.target}.')
  if args.target != 'slurm':
    for flag, default in (('nodes', 1), ('partition', ''), ('time', '')):
      if getattr(args, flag) != default:
        raise LaunchError(f'--{flag} is for --target=slurm; drop it for --target={args.target}.')
  if args.nodes < 1 or args.gpus_per_node < 0:
    raise LaunchError('--nodes must be >= 1 and --gpus_per_node >= 0.')
  if args.target == 'tpu':
    _need(args, 'tpu', 'name', 'zone', 'accelerator_type', 'bucket')
  elif args.target == 'slurm':
    _need(args, 'slurm', 'gpus_per_node')


def _paths(args: argparse.Namespace, config) -> tuple[str, str]:
  """(workdir, data_dir): the flags, else under --bucket, else local defaults."""
  bucket = bucket_url(args.bucket) if args.bucket else ''
  data_dir = args.data_dir or (f'{bucket}/tfds' if bucket else config.data.data_dir)
  if not data_dir.startswith('gs://'):
    data_dir = os.path.expanduser(data_dir)
  run = run_name(args.config)
  workdir = args.workdir or (f'{bucket}/runs/{run}' if bucket else f'runs/{run}')
  if args.target == 'tpu' and not (workdir.startswith('gs://') and data_dir.startswith('gs://')):
    raise LaunchError(
      '--target=tpu: every worker must see the same data and run directory; '
      'give gs:// paths for --workdir and --data_dir (or leave them to --bucket).'
    )
  return workdir, data_dir


def _check_config(config, config_flag: str, num_devices: int) -> None:
  """The config's own checks (batch divisibility, ...) for the target's device count."""
  spec = specs.SPECS.get(config.data.name)
  errors = config_validation.config_errors(config, num_devices, spec and spec.num_classes)
  if errors:
    raise LaunchError(
      f'--config={config_flag} cannot run on {num_devices} devices: ' + ' '.join(errors)
    )


def plan(args: argparse.Namespace) -> Plan:
  """Checks the flags and the config; every problem is one LaunchError naming the fix."""
  config = load_config(args.config)
  check_overrides(config, args.overrides)
  _check_target_flags(args)
  name = args.name or run_name(args.config)
  if not re.fullmatch(r'[a-z]([a-z0-9-]*[a-z0-9])?', name):
    raise LaunchError(
      f'--name={name!r}: use lower-case letters, digits and -, starting with a '
      'letter (a TPU VM name), e.g. --name=cmix-v4.'
    )
  accelerator_type, tpu_version = '', ''
  if args.target == 'tpu':
    accelerator_type, generation, num_devices = tpu_type(args.accelerator_type)
    tpu_version = args.tpu_version or TPU_GENERATIONS[generation][1]
  else:
    num_devices = (args.nodes * args.gpus_per_node) or 1
  workdir, data_dir = _paths(args, config)
  _check_config(config, args.config, num_devices)
  return Plan(
    args=args,
    config=config,
    name=name,
    workdir=workdir,
    data_dir=data_dir,
    num_devices=num_devices,
    accelerator_type=accelerator_type,
    tpu_version=tpu_version,
  )


# ----------------------------------------------------------------------------- commands


def train_argv(p: Plan, python: str = 'python') -> list[str]:
  """The argv of cmix_jax.main for this plan."""
  return common.main_command(
    p.args.config, p.workdir, flags=p.args.overrides, python=python, data_dir=p.data_dir
  )


def tfds_build_argv(p: Plan) -> list[str] | None:
  """`tfds build NAME --data_dir=...` for a TFDS data set, None for ours / fake / own data."""
  spec = specs.SPECS.get(p.config.data.name)
  if spec is None or spec.tfds_name not in TFDS_BUILDABLE:
    return None
  argv = ['tfds', 'build', spec.tfds_name, f'--data_dir={p.data_dir}']
  if not spec.in_memory:  # random access per batch needs ArrayRecord files
    argv += [f'--manual_dir={p.data_dir}/downloads/manual', '--file_format=array_record']
  return argv


def _gcloud_tpu(p: Plan, verb: str, *rest) -> list[str]:
  argv = ['gcloud', 'compute', 'tpus', 'tpu-vm', verb, *rest, f'--zone={p.args.zone}']
  return argv + ([f'--project={p.args.project}'] if p.args.project else [])


def _ssh(p: Plan, worker: str, command: str) -> list[str]:
  return _gcloud_tpu(p, 'ssh', p.name, f'--worker={worker}', f'--command={command}')


def tpu_steps(p: Plan) -> list[Step]:
  """Create the TPU VM, copy + install the code on all workers, build data, train detached."""
  local_bin = 'export PATH="$HOME/.local/bin:$PATH"'  # pip --user scripts (tfds) on the workers
  create = _gcloud_tpu(
    p, 'create', p.name, f'--accelerator-type={p.accelerator_type}', f'--version={p.tpu_version}'
  ) + (['--spot'] if p.args.spot else [])
  install = (
    f'rm -rf {REMOTE_DIR} && mkdir {REMOTE_DIR} && '
    f'tar -xzf {os.path.basename(TARBALL)} -C {REMOTE_DIR} && cd {REMOTE_DIR} && '
    + shlex.join(['python3', '-m', 'pip', 'install', '-e', '.[tpu]'])
  )
  train = (
    f'cd {REMOTE_DIR} && nohup '
    + shlex.join(train_argv(p, 'python3'))
    + f' > {REMOTE_LOG} 2>&1 < /dev/null &'
  )
  kind = f'{p.accelerator_type}: {p.num_devices} JAX devices' + (
    ', spot: preemptible, recreate and rerun to resume' if p.args.spot else ''
  )
  steps = [
    Step(f'Create the TPU VM ({kind})', tuple(create)),
    Step(
      'Pack the committed code (HEAD)',
      ('git', 'archive', '--format=tar.gz', f'--output={TARBALL}', 'HEAD'),
    ),
    Step(
      'Copy it to every worker',
      tuple(
        _gcloud_tpu(p, 'scp', TARBALL, f'{p.name}:{os.path.basename(TARBALL)}', '--worker=all')
      ),
    ),
    Step('Install on every worker', tuple(_ssh(p, 'all', install))),
  ]
  build = tfds_build_argv(p)
  if build:
    steps.append(
      Step(
        'Build the data set into the bucket once (worker 0)',
        tuple(_ssh(p, '0', f'{local_bin} && ' + shlex.join(build))),
      )
    )
  steps += [
    Step(
      'Train on every worker (detached; rerun to resume from the workdir)',
      tuple(_ssh(p, 'all', train)),
    ),
    Step('Follow the log', tuple(_ssh(p, '0', f'tail -f {REMOTE_LOG}')), hint_only=True),
    Step(
      'Delete the VM when done', tuple(_gcloud_tpu(p, 'delete', p.name, '--quiet')), hint_only=True
    ),
  ]
  return steps


def gpu_steps(p: Plan) -> list[Step]:
  """Install with CUDA wheels, build the data, train on every local GPU (one command)."""
  steps = [
    Step('Install with the CUDA 12 wheels', ('python', '-m', 'pip', 'install', '-e', '.[cuda]'))
  ]
  build = tfds_build_argv(p)
  if build:
    steps.append(Step('Build the data set once', tuple(build)))
  steps.append(Step('Train on all local GPUs (rerun to resume)', tuple(train_argv(p))))
  return steps


def slurm_steps(p: Plan) -> list[Step]:
  """Install + data on the login node, then one sbatch job: one task per node, all its GPUs."""
  device_ids = ','.join(str(i) for i in range(p.args.gpus_per_node))
  # jax.distributed reads the SLURM variables; by default it would give each task only GPU
  # SLURM_LOCALID, so every task claims all GPUs of its node.
  wrap = f'JAX_LOCAL_DEVICE_IDS={device_ids} srun ' + shlex.join(train_argv(p))
  sbatch = [
    'sbatch',
    f'--job-name={p.name}',
    f'--nodes={p.args.nodes}',
    '--ntasks-per-node=1',
    f'--gpus-per-node={p.args.gpus_per_node}',
    '--signal=TERM@300',
    '--requeue',
    f'--output={p.name}-%j.log',
  ]
  sbatch += [f'--partition={p.args.partition}'] if p.args.partition else []
  sbatch += [f'--time={p.args.time}'] if p.args.time else []
  steps = [
    Step(
      'Install with the CUDA 12 wheels (login node, environment shared with the nodes)',
      ('python', '-m', 'pip', 'install', '-e', '.[cuda]'),
    )
  ]
  build = tfds_build_argv(p)
  if build:
    steps.append(Step('Build the data set once (login node)', tuple(build)))
  steps.append(
    Step(
      f'Submit: {p.args.nodes} node(s) x {p.args.gpus_per_node} GPUs, SIGTERM '
      '5 min before the time limit saves a checkpoint; requeue resumes',
      tuple(sbatch + [f'--wrap={wrap}']),
    )
  )
  return steps


STEP_BUILDERS = {'tpu': tpu_steps, 'gpu': gpu_steps, 'slurm': slurm_steps}


def render(steps) -> str:
  """The steps as a shell script: '# N. what' then the command, quoted for a POSIX shell."""
  lines = []
  for i, step in enumerate(steps, 1):
    lines.append(f'# {i}. {step.what}' + (' (run it yourself)' if step.hint_only else ''))
    lines.append(shlex.join(step.argv))
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  try:
    args = make_parser().parse_args(argv)
    the_plan = plan(args)
  except LaunchError as e:
    print(f'launch.py: error: {e}', file=sys.stderr)
    return 2
  steps = STEP_BUILDERS[args.target](the_plan)
  if args.dry_run:
    print(render(steps), end='')
    return 0
  for i, step in enumerate(steps, 1):
    if step.hint_only:
      print(f'# {step.what}:\n{shlex.join(step.argv)}')
      continue
    print(f'# {i}. {step.what}\n{shlex.join(step.argv)}', flush=True)
    result = subprocess.run(step.argv, cwd=common.REPO, check=False)
    if result.returncode:
      print(
        f'launch.py: step {i} ({step.what}) failed with exit code {result.returncode}; '
        'fix it and rerun (finished steps are safe to repeat except the VM creation).',
        file=sys.stderr,
      )
      return result.returncode
  return 0


if __name__ == '__main__':
  sys.exit(main())
