"""Runs a tiny training job in its own process, for kill/preemption/multi-host tests.

python -m tests.run_driver --workdir=W --devices=4 [--kill_after_checkpoint=2]
    [--sigterm_after_step=1] [--take_lease_at_step=2] [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0]
    [--set key=value ...]
"""

import argparse
import ast
import json
import os
import signal
import sys


def parse_args(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--devices', type=int, default=1)
  parser.add_argument(
    '--kill_after_checkpoint',
    type=int,
    default=-1,
    help='SIGKILL this process right after the checkpoint of this step',
  )
  parser.add_argument(
    '--sigterm_after_step',
    type=int,
    default=-1,
    help='send this process SIGTERM once this many steps have run',
  )
  parser.add_argument(
    '--take_lease_at_step',
    type=int,
    default=-1,
    help='process 0 lets "another run" take the workdir lease at this log step',
  )
  parser.add_argument('--coordinator', default='')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--allow_config_change', action='store_true')
  parser.add_argument('--set', action='append', default=[], help='config override key=value')
  return parser.parse_args(argv)


def _literal(text: str):
  """A Python literal (True, 6, 1e-3, (1, 2)) as its value; anything else as the text."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def build_config(args):
  from configs import tiny

  config = tiny.config()
  config.update_from_flattened_dict(
    {key: _literal(text) for key, text in (item.split('=', 1) for item in args.set)}
  )
  if args.coordinator:
    config.distributed.mode = 'explicit'
    config.distributed.coordinator_address = args.coordinator
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
    config.distributed.cpu_collectives = 'gloo'
  return config


def make_hooks(args, train, checkpointing):
  """Test-only fault injection at the loop's points (train.Hooks)."""

  def after_checkpoint(run, step):
    if step == args.kill_after_checkpoint:
      checkpointing.wait_until_saved(run.manager)
      os.kill(os.getpid(), signal.SIGKILL)

  def before_steps(run, step):
    if 0 <= args.sigterm_after_step <= step:
      os.kill(os.getpid(), signal.SIGTERM)

  def before_log(run, step):
    if step == args.take_lease_at_step and run.is_lead:
      foreign = {'host': 'other-host', 'pid': 1, 'token': 'theirs', 'heartbeat': 0.0}
      with open(os.path.join(run.workdir, 'lease.json'), 'w') as f:
        json.dump(foreign, f)

  return train.Hooks(
    before_steps=before_steps, before_log=before_log, after_checkpoint=after_checkpoint
  )


def main(argv=None):
  args = parse_args(argv if argv is not None else sys.argv[1:])
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  from cmix_jax import checkpointing
  from cmix_jax import train

  result = train.train_and_evaluate(
    build_config(args),
    args.workdir,
    args.allow_config_change,
    hooks=make_hooks(args, train, checkpointing),
  )
  print('RESULT', result.get('preempted', False), result.get('step'), flush=True)


if __name__ == '__main__':
  main()
