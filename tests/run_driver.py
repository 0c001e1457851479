"""Runs a tiny training job in its own process, for kill/preemption/multi-host tests.

python -m tests.run_driver --workdir=W --devices=4 [--kill_after_checkpoint=2]
    [--sigterm_after_step=1] [--take_lease_at_step=2] [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=0]
    [--set key=value ...]
"""

import argparse
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


def build_config(args):
  from tests import tiny  # pylint: disable=g-import-not-at-top

  config = tiny.config()
  for item in args.set:
    key, value = item.split('=', 1)
    target = config
    *parents, leaf = key.split('.')
    for p in parents:
      target = target[p]
    target[leaf] = type(target[leaf])(eval(value)) if not isinstance(target[leaf], str) else value  # pylint: disable=eval-used
  if args.coordinator:
    config.distributed.mode = 'explicit'
    config.distributed.coordinator_address = args.coordinator
    config.distributed.num_processes = args.num_processes
    config.distributed.process_id = args.process_id
    config.distributed.cpu_collectives = 'gloo'
  return config


def install_hooks(args, train):
  """Test-only fault injection around the real loop functions."""
  if args.kill_after_checkpoint >= 0:
    save = train.save_checkpoint

    def save_then_die(run, state, step, meta, wait=False):
      save(run, state, step, meta, wait=True)
      if step == args.kill_after_checkpoint:
        os.kill(os.getpid(), signal.SIGKILL)

    train.save_checkpoint = save_then_die
  if args.sigterm_after_step >= 0:
    run_steps = train.run_steps

    def steps_then_signal(step_fns, state, batches, config, start, end, flag=None):
      if start >= args.sigterm_after_step:
        os.kill(os.getpid(), signal.SIGTERM)
      return run_steps(step_fns, state, batches, config, start, end, flag)

    train.run_steps = steps_then_signal
  if args.take_lease_at_step >= 0:
    log_train = train.log_train

    def taken_then_log(run, step, summary):
      if step == args.take_lease_at_step and run.is_lead:
        foreign = {'host': 'other-host', 'pid': 1, 'token': 'theirs', 'heartbeat': 0.0}
        with open(os.path.join(run.workdir, 'lease.json'), 'w') as f:
          json.dump(foreign, f)
      log_train(run, step, summary)

    train.log_train = taken_then_log


def main(argv=None):
  args = parse_args(argv if argv is not None else sys.argv[1:])
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from cmix_jax import train  # pylint: disable=g-import-not-at-top

  install_hooks(args, train)
  result = train.train_and_evaluate(build_config(args), args.workdir, args.allow_config_change)
  print('RESULT', result.get('preempted', False), result.get('step'), flush=True)


if __name__ == '__main__':
  main()
