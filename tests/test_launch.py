"""experiments/launch.py: the dry run's gcloud / sbatch lines, their quoting, and flag checks."""

import configparser
import os
import re
import shlex
import subprocess
import sys

import pytest

from experiments import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = 'configs/classic_cv.py:softmatch,cifar10,40,0,cmix'
TPU = [
  '--target=tpu',
  '--name=cmix-v4',
  '--zone=us-central2-b',
  '--bucket=my-bucket',
  f'--config={PAPER}',
]


def _dry_run(argv, capsys) -> list[list[str]]:
  """The dry run's commands, each split back into argv as a POSIX shell would."""
  assert launch.main(['--dry_run'] + argv) == 0
  out = capsys.readouterr().out
  lines = [line for line in out.splitlines() if line and not line.startswith('#')]
  return [shlex.split(line) for line in lines]


def _remote(argv: list[str]) -> list[str]:
  """The --command of a `gcloud ... ssh` line, split as the worker's shell would."""
  (command,) = [a[len('--command=') :] for a in argv if a.startswith('--command=')]
  return shlex.split(command)


def _steps(argv):
  args = launch.make_parser().parse_args(argv)
  return launch.STEP_BUILDERS[args.target](launch.plan(args))


def test_tpu_single_host_lines(capsys):
  create, pack, scp, install, build, train, logs, delete = _dry_run(
    TPU + ['--accelerator_type=v4-8'], capsys
  )
  assert create == [
    'gcloud',
    'compute',
    'tpus',
    'tpu-vm',
    'create',
    'cmix-v4',
    '--accelerator-type=v4-8',
    '--version=tpu-ubuntu2204-base',
    '--zone=us-central2-b',
  ]
  assert pack == ['git', 'archive', '--format=tar.gz', '--output=cmix_jax.tar.gz', 'HEAD']
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp'] and '--worker=all' in scp
  assert install[4:7] == ['ssh', 'cmix-v4', '--worker=all']
  assert _remote(install)[-6:] == ['python3', '-m', 'pip', 'install', '-e', '.[tpu]']
  assert build[6] == '--worker=0'
  assert _remote(build)[-4:] == ['tfds', 'build', 'cifar10', '--data_dir=gs://my-bucket/tfds']
  assert train[4:7] == ['ssh', 'cmix-v4', '--worker=all'] and train[-1] == '--zone=us-central2-b'
  remote = _remote(train)
  main = remote.index('python3')
  assert remote[main : main + 6] == [
    'python3',
    '-m',
    'cmix_jax.main',
    f'--config={PAPER}',
    '--config.data.data_dir=gs://my-bucket/tfds',
    '--workdir=gs://my-bucket/runs/softmatch-cifar10-40-0-cmix',
  ]
  assert remote[:3] == ['cd', 'cmix_jax', '&&'] and remote[-1] == '&'  # detached
  assert _remote(logs) == ['tail', '-f', '~/cmix_train.log']
  assert delete[4:6] == ['delete', 'cmix-v4']


@pytest.mark.parametrize(
  'accelerator,gcloud_type,version,devices',
  [
    ('v4-32', 'v4-32', 'tpu-ubuntu2204-base', 16),  # 4 hosts x 4 chips
    ('v5e-8', 'v5litepod-8', 'v2-alpha-tpuv5-lite', 8),
    ('v5p-16', 'v5p-16', 'v2-alpha-tpuv5', 8),
  ],
)
def test_tpu_types_spot_and_project(capsys, accelerator, gcloud_type, version, devices):
  argv = TPU + [f'--accelerator_type={accelerator}', '--spot', '--project=my-proj']
  assert launch.main(['--dry_run'] + argv) == 0
  out = capsys.readouterr().out
  assert f'({gcloud_type}: {devices} JAX devices, spot' in out
  commands = [shlex.split(l) for l in out.splitlines() if l and not l.startswith('#')]
  create = commands[0]
  assert f'--accelerator-type={gcloud_type}' in create and f'--version={version}' in create
  assert create[-2:] == ['--project=my-proj', '--spot']
  assert all('--project=my-proj' in c for c in commands if c[0] == 'gcloud')


def test_gpu_node_lines(capsys):
  install, build, train = _dry_run(
    [
      '--target=gpu',
      '--config=configs/classic_cv.py:fixmatch,svhn,40,0',
      '--data_dir=/data/tfds',
      '--',
      '--config.calibratemix.passes=1',
    ],
    capsys,
  )
  assert install == ['python', '-m', 'pip', 'install', '-e', '.[cuda]']
  assert build == ['tfds', 'build', 'svhn_cropped', '--data_dir=/data/tfds']
  assert train == [
    'python',
    '-m',
    'cmix_jax.main',
    '--config=configs/classic_cv.py:fixmatch,svhn,40,0',
    '--config.data.data_dir=/data/tfds',
    '--workdir=runs/fixmatch-svhn-40-0',
    '--config.calibratemix.passes=1',
  ]


def test_slurm_lines_one_task_per_node_with_all_its_gpus(capsys):
  *_, sbatch = _dry_run(
    [
      '--target=slurm',
      '--nodes=4',
      '--gpus_per_node=8',
      '--bucket=gs://my-bucket/',
      f'--config={PAPER}',
      '--partition=a100',
      '--time=2-00:00:00',
    ],
    capsys,
  )
  assert sbatch[:8] == [
    'sbatch',
    '--job-name=softmatch-cifar10-40-0-cmix',
    '--nodes=4',
    '--ntasks-per-node=1',
    '--gpus-per-node=8',
    '--signal=TERM@300',
    '--requeue',
    '--output=softmatch-cifar10-40-0-cmix-%j.log',
  ]
  assert '--partition=a100' in sbatch and '--time=2-00:00:00' in sbatch
  (wrap,) = [a[len('--wrap=') :] for a in sbatch if a.startswith('--wrap=')]
  assert shlex.split(wrap) == [
    'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7',
    'srun',
    'python',
    '-m',
    'cmix_jax.main',
    f'--config={PAPER}',
    '--config.data.data_dir=gs://my-bucket/tfds',
    '--workdir=gs://my-bucket/runs/softmatch-cifar10-40-0-cmix',
  ]


def test_imagenet_is_built_as_array_record(capsys):
  _, build, _ = _dry_run(
    [
      '--target=gpu',
      '--config=configs/classic_cv.py:fixmatch,imagenet,100000,0',
      '--data_dir=/d',
      '--gpus_per_node=8',
    ],
    capsys,
  )
  assert build == [
    'tfds',
    'build',
    'imagenet2012',
    '--data_dir=/d',
    '--manual_dir=/d/downloads/manual',
    '--file_format=array_record',
  ]


def test_fashion_mnist_has_no_tfds_build(capsys):
  install, train = _dry_run(['--target=gpu', '--config=configs/default.py', '--data_dir=d'], capsys)
  assert install[-1] == '.[cuda]' and train[2] == 'cmix_jax.main'


ODD = "--config.data.name=folder:/tmp/my data/it's \"x\" $HOME;rm"


@pytest.mark.parametrize(
  'target,extra',
  [('tpu', ['--accelerator_type=v4-8']), ('gpu', []), ('slurm', ['--gpus_per_node=8'])],
)
def test_quoting_round_trips_through_every_shell_layer(capsys, target, extra):
  base = TPU[1:] if target == 'tpu' else [f'--config={PAPER}']
  commands = _dry_run([f'--target={target}'] + base + extra + ['--', ODD], capsys)
  steps = _steps([f'--target={target}'] + base + extra + ['--', ODD])
  assert commands == [list(s.argv) for s in steps]  # printed line -> the exact argv
  train = next(c for c in commands if any('cmix_jax.main' in a for a in c))
  if target == 'tpu':
    inner = _remote(train)
  elif target == 'slurm':
    inner = shlex.split(next(a for a in train if a.startswith('--wrap='))[len('--wrap=') :])
  else:
    inner = train
  assert inner.count(ODD) == 1  # the remote / batch shell sees the override as one word


@pytest.mark.parametrize(
  'argv,message',
  [
    (['--config=configs/default.py'], 'the following arguments are required: --target'),
    (['--target=aws', '--config=configs/default.py'], "invalid choice: 'aws'"),
    (
      ['--target=tpu', '--config=configs/default.py'],
      '--target=tpu needs --name, --zone, --accelerator_type, --bucket',
    ),
    (TPU + ['--accelerator_type=v9-8'], "--accelerator_type='v9-8': use GENERATION-SIZE"),
    (TPU + ['--accelerator_type=v4-8', '--workdir=runs/local'], 'give gs:// paths'),
    (
      [
        '--target=tpu',
        '--name=Bad_Name',
        '--zone=z',
        '--accelerator_type=v4-8',
        '--bucket=my-bucket',
        '--config=configs/default.py',
      ],
      "--name='Bad_Name'",
    ),
    (['--target=gpu', '--config=configs/default.py', '--spot'], '--spot is for --target=tpu'),
    (['--target=gpu', '--config=configs/default.py', '--nodes=2'], '--nodes is for --target=slurm'),
    (['--target=slurm', '--config=configs/default.py'], '--target=slurm needs --gpus_per_node'),
    (['--target=gpu', '--config=configs/nope.py'], '--config file configs/nope.py does not exist'),
    (['--target=gpu', '--config=configs/classic_cv.py:fixmatch,mnist,40,0'], "dataset 'mnist'"),
    (['--target=gpu', '--config=configs/default.py', '--bucket=Bad Bucket'], "--bucket='Bad"),
    (['--target=gpu', '--config=configs/default.py', '--', '--seed=1'], 'only --config.FIELD'),
    (
      ['--target=gpu', '--config=configs/default.py', '--', '--config.data.nme=x'],
      "no field 'data.nme'",
    ),
    (
      ['--target=slurm', '--gpus_per_node=3', f'--config={PAPER}'],
      'cannot run on 3 devices: data.batch_size=64 is not divisible',
    ),
  ],
)
def test_bad_flags_give_one_clear_line(capsys, argv, message):
  assert launch.main(['--dry_run'] + argv) == 2
  captured = capsys.readouterr()
  assert captured.out == ''
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('launch.py: error: '), captured.err
  assert message in lines[0]


def test_without_dry_run_runs_each_step_and_stops_at_the_first_failure(monkeypatch, capsys):
  calls = []

  def fake_run(argv, cwd, check):
    calls.append(tuple(argv))
    return subprocess.CompletedProcess(argv, 3 if argv[0] == 'tfds' else 0)

  monkeypatch.setattr(launch.subprocess, 'run', fake_run)
  argv = ['--target=gpu', '--config=configs/classic_cv.py:fixmatch,cifar10,40,0', '--data_dir=/d']
  assert launch.main(argv) == 3
  assert [c[0] for c in calls] == ['python', 'tfds']  # training never started
  assert 'step 2 (Build the data set once) failed with exit code 3' in capsys.readouterr().err
  calls.clear()
  assert launch.main(TPU + ['--accelerator_type=v4-8']) == 0
  assert len(calls) == 6  # log and delete are printed, not run
  assert calls[-1][4] == 'ssh' and any('nohup' in a for a in calls[-1])


def test_install_extras_exist_in_setup_cfg():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  extras = setup['options.extras_require']
  assert 'jax[tpu]' in extras['tpu'] and 'jax[cuda12]' in extras['cuda']
  used = set()
  for argv in (
    TPU + ['--accelerator_type=v4-8'],
    ['--target=gpu', f'--config={PAPER}'],
    ['--target=slurm', '--gpus_per_node=8', f'--config={PAPER}'],
  ):
    for step in _steps(argv):
      used.update(re.findall(r"\.\[(\w+)\]", ' '.join(step.argv)))
  assert used == {'tpu', 'cuda'} and used <= set(extras)


def test_script_runs_from_the_command_line():
  result = subprocess.run(
    [
      sys.executable,
      '-m',
      'experiments.launch',
      '--target=gpu',
      '--config=configs/default.py',
      '--data_dir=d',
      '--dry_run',
    ],
    capture_output=True,
    text=True,
    check=True,
    cwd=ROOT,
  )
  assert 'python -m cmix_jax.main --config=configs/default.py' in result.stdout


def _bash_blocks(text: str) -> list[str]:
  return re.findall(r'```bash\n(.*?)```', text, re.S)


def test_docs_cloud_md_shows_what_the_dry_runs_print(capsys):
  with open(os.path.join(ROOT, 'docs', 'cloud.md')) as f:
    blocks = _bash_blocks(f.read())
  checked = 0
  for command, printed in zip(blocks, blocks[1:]):
    if not command.startswith('python -m experiments.launch'):
      continue
    argv = shlex.split(command.replace('\\\n', ' '))[3:]
    assert '--dry_run' in argv
    assert launch.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.splitlines()
    shown = [line for line in printed.splitlines() if line.strip()]
    assert shown and all(line in out for line in shown), (command, out)
    checked += 1
  assert checked == 3  # TPU, GPU node, SLURM
