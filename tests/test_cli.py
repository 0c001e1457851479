"""cli.py / main.py: bad input is one message and exit status 2, a stopped run one message and
status 1, and a crash keeps its traceback."""

import errno
import os

import pytest

from cmix_jax import checkpointing
from cmix_jax import cli
from cmix_jax import config_validation
from tests import helpers


def _main(*args, module='cmix_jax.main'):
  return helpers.python_module(module, *args)


def _error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


@pytest.mark.parametrize(
  'override,message',
  [
    ('--config.optim.lr=-1', 'optim.lr=-1.0 must be in (0, inf)'),
    ('--config.ssl.p_cutoff=1.5', 'ssl.p_cutoff=1.5'),
    ('--config.optim.lr=abc', "could not convert string to float: 'abc'"),
    ('--config.no_such_field=1', "'no_such_field'"),
    ('extra_argument', "unexpected arguments ['extra_argument']"),
    ('--config.num_devices=64', 'num_devices=64 but 1 devices exist'),
  ],
)
def test_bad_input_is_one_message_status_2_and_no_write(override, message, tmp_path):
  workdir = tmp_path / 'run'
  proc = _main('--config=configs/default.py', f'--workdir={workdir}', override)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  (line,) = _error_lines(proc.stderr)
  assert message in line or message in proc.stderr.split(line, 1)[1]
  assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'a_file'
  path.write_text('x')
  proc = _main('--config=configs/default.py', f'--workdir={path}')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert _error_lines(proc.stderr) == [
    f'error: cannot write to workdir {path}: {path} is not a folder; pick a writable '
    '--workdir (or fix its permissions).'
  ]


def test_evaluate_of_a_workdir_without_a_run_is_one_message(tmp_path):
  proc = _main(f'--workdir={tmp_path}', module='cmix_jax.evaluate')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert _error_lines(proc.stderr) == [
    f'error: {tmp_path} has no config.json: is it a cmix_jax workdir? Pass the --workdir a '
    'training run wrote.'
  ]


def _exit_of(error, capsys):
  def main(argv):
    del argv
    raise error

  with pytest.raises(SystemExit) as info:
    cli.guarded(main, ['prog'])
  return info.value.code, capsys.readouterr().err


def test_stopped_runs_and_storage_errors_are_one_message_status_1(capsys):
  code, err = _exit_of(
    checkpointing.CheckpointSaveError('Cannot save ... in /w/checkpoints'), capsys
  )
  assert (code, err) == (1, 'error: Cannot save ... in /w/checkpoints\n')
  code, err = _exit_of(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/eval.json'), capsys)
  assert code == 1 and err.startswith('error: No space left on device: /w/eval.json; ')
  try:  # how clu's asynchronous metric writer reports TensorFlow's failed flush
    try:
      raise RuntimeError('/w/events.out.tfevents.1; No space left on device\n\tFailed to flush')
    except RuntimeError as e:
      raise ValueError('Error occurred ASYNCHRONOUSLY.') from e
  except ValueError as e:
    wrapped = e
  code, err = _exit_of(wrapped, capsys)
  assert code == 1 and err.startswith('error: /w/events.out.tfevents.1; No space left on device; ')
  assert err.count('\n') == 1
  code, err = _exit_of(config_validation.ConfigError('invalid config:\n  x'), capsys)
  assert (code, err) == (2, 'error: invalid config:\n  x\n')


def test_a_crash_keeps_its_traceback():
  def main(argv):
    del argv
    raise ZeroDivisionError('a bug')

  with pytest.raises(ZeroDivisionError):
    cli.guarded(main, ['prog'])
  with pytest.raises(FileNotFoundError):  # not a storage errno the user fixes
    cli.guarded(lambda argv: open('/nonexistent/x', encoding='utf-8'), ['prog'])
