"""checkpointing.py: damaged and interrupted checkpoints are moved aside, save failures are one
message, and a rerun resumes from the newest good checkpoint to the same end state."""

import errno
import os
import subprocess
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import checkpointing
from cmix_jax import storage
from cmix_jax import train
from experiments import common
from tests import helpers

STATE = {'w': jnp.arange(6.0), 'b': jnp.ones((2, 3), jnp.int32)}


def _state(step):
  return jax.tree.map(lambda x: x + step, STATE)


def _manager(workdir, max_to_keep=3):
  return checkpointing.create_manager(str(workdir), max_to_keep)


def _restore(manager):
  return checkpointing.restore_latest(manager, checkpointing.abstract_like(STATE))


def _garble(path):
  """Overwrites every file under `path` (a damaged disk or a stray copy)."""
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')


def _saved(workdir, steps):
  manager = _manager(workdir)
  for step in steps:
    checkpointing.save(manager, step, _state(step), {'step': step})
  checkpointing.wait_until_saved(manager)
  return manager


def test_unreadable_newest_is_moved_aside_and_its_step_saved_afresh(tmp_path):
  _saved(tmp_path, (1, 2))
  ckpts = tmp_path / 'checkpoints'
  _garble(ckpts / '2' / 'state')
  manager = _manager(tmp_path)
  step, state, meta = _restore(manager)
  assert (step, meta) == (1, {'step': 1})
  np.testing.assert_array_equal(state['w'], STATE['w'] + 1)
  assert sorted(os.listdir(ckpts)) == ['1', '2.unreadable']  # renamed, not deleted
  assert manager.all_steps() == [1]
  checkpointing.save(manager, 2, _state(2), {'step': 2}, wait=True)  # no StepAlreadyExists
  assert _restore(_manager(tmp_path))[0] == 2
  assert sorted(os.listdir(ckpts)) == ['1', '2', '2.unreadable']


def test_interrupted_saves_are_moved_aside_never_deleted(tmp_path):
  _saved(tmp_path, (1,))
  ckpts = tmp_path / 'checkpoints'
  for name in ('2.orbax-checkpoint-tmp', '3.orbax-checkpoint-tmp-1796', '2.partial'):
    os.makedirs(ckpts / name)
    (ckpts / name / 'part').write_text(name)
  assert _restore(_manager(tmp_path))[0] == 1
  assert sorted(os.listdir(ckpts)) == ['1', '2.partial', '2.partial.1', '3.partial']
  assert (ckpts / '2.partial.1' / 'part').read_text() == '2.orbax-checkpoint-tmp'
  assert (ckpts / '3.partial' / 'part').read_text() == '3.orbax-checkpoint-tmp-1796'


def test_nothing_readable_moves_nothing_and_names_the_directory(tmp_path):
  _saved(tmp_path, (1, 2))
  ckpts = tmp_path / 'checkpoints'
  _garble(ckpts)
  with pytest.raises(checkpointing.CheckpointError, match=f'No readable checkpoint in {ckpts}'):
    _restore(_manager(tmp_path))
  assert sorted(os.listdir(ckpts)) == ['1', '2']


def test_failure_cause_reads_the_os_error_through_orbax_wrappers():
  wrapped = ValueError(
    'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to '
    "write 39556 bytes to file 8: No space left on device [os_error_code='28']"
  )
  assert storage.failure_cause(wrapped) == os.strerror(errno.ENOSPC)
  try:
    try:
      raise PermissionError(errno.EACCES, 'denied', '/x')
    except OSError as e:
      raise RuntimeError('commit failed') from e
  except RuntimeError as e:
    assert storage.failure_cause(e) == os.strerror(errno.EACCES)
  assert storage.failure_cause(ValueError('PERMISSION_DENIED: bucket b\nmore')) == (
    'PERMISSION_DENIED: bucket b'
  )


def test_unwritable_directory_is_one_save_error_and_keeps_finished_ones(tmp_path):
  manager = _saved(tmp_path, (1,))
  ckpts = tmp_path / 'checkpoints'
  os.rename(ckpts, tmp_path / 'moved')
  ckpts.write_text('not a directory')  # any write under it fails, even as root
  with pytest.raises(checkpointing.CheckpointSaveError) as info:
    checkpointing.save(manager, 2, _state(2), {'step': 2}, wait=True)
  message = str(info.value)
  assert f'Cannot save the checkpoint of step 2 in {ckpts}' in message
  assert 'rerun the same command to resume' in message and '\n' not in message
  os.remove(ckpts)
  os.rename(tmp_path / 'moved', ckpts)
  assert _restore(_manager(tmp_path))[0] == 1


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 600 KiB tmpfs (needs root and mount rights; skipped where the machine forbids it)."""
  mount_point = tmp_path / 'small_disk'
  mount_point.mkdir()
  proc = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(mount_point)],
    capture_output=True,
    text=True,
    check=False,
  )
  if proc.returncode:
    pytest.skip(f'cannot mount a small tmpfs here: {proc.stderr.strip()}')
  yield mount_point
  subprocess.run(['umount', str(mount_point)], check=True)


def test_full_disk_during_async_save_is_one_message_at_the_next_boundary(small_tmpfs):
  manager = _saved(small_tmpfs, (1,))
  big = {'w': jax.random.normal(jax.random.key(0), (400_000,)), 'b': STATE['b']}  # 1.6 MB
  checkpointing.save(manager, 2, big, {'step': 2})  # asynchronous: returns at once
  with pytest.raises(checkpointing.CheckpointSaveError) as info:
    checkpointing.wait_until_saved(manager)
  assert str(info.value).startswith(
    f'Cannot save the checkpoint of step 2 in '
    f'{small_tmpfs / "checkpoints"}: No space left on device.'
  )
  assert 'newest finished one is step 1' in str(info.value)
  checkpointing.wait_until_saved(manager)  # reported once, not again at close
  manager = _manager(small_tmpfs)
  assert _restore(manager)[0] == 1  # the finished one is intact; the cut-off one moved aside
  assert '2.partial' in os.listdir(small_tmpfs / 'checkpoints')


class _FailedSaves:
  """A checkpoint manager whose pending save of step 2 failed on a full disk."""

  directory = '/w/checkpoints'

  def __init__(self):
    self.steps = [1, 2]

  def all_steps(self):
    return list(self.steps)

  def wait_until_finished(self):
    if 2 in self.steps:
      self.steps.remove(2)  # as orbax forgets a step it could not write
      raise ValueError("RESOURCE_EXHAUSTED: Error writing: [os_error_code='28']")


class _FailedFlush:
  def flush(self):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_pending_writes_fail_loudly_unless_the_run_already_failed(caplog):
  run = types.SimpleNamespace(manager=_FailedSaves(), writer=_FailedFlush())
  with pytest.raises(
    checkpointing.CheckpointSaveError, match='step 2 in /w/checkpoints: No space left on device'
  ):
    train.finish_writes(run, failed=False)
  run = types.SimpleNamespace(manager=_FailedSaves(), writer=_FailedFlush())
  train.finish_writes(run, failed=True)  # logged; the run's own error stays the one reported
  assert caplog.text.count('a pending write failed too: No space left on device') == 2


def test_corrupt_newest_then_rerun_ends_like_an_uninterrupted_run(tmp_path):
  straight, damaged = str(tmp_path / 'straight'), str(tmp_path / 'damaged')
  helpers.driver(f'--workdir={straight}')
  helpers.driver(f'--workdir={damaged}')
  ckpts = os.path.join(damaged, 'checkpoints')
  _garble(os.path.join(ckpts, '4'))
  os.makedirs(os.path.join(ckpts, '4.orbax-checkpoint-tmp', 'state'))  # a cut-off save too
  best = os.path.join(damaged, 'best', 'checkpoints')
  os.makedirs(os.path.join(best, '4.orbax-checkpoint-tmp'))  # and one of the selection's
  proc = helpers.driver(f'--workdir={damaged}')
  assert 'RESULT False 4' in proc.stdout
  assert sorted(os.listdir(ckpts)) == ['2', '4', '4.partial', '4.unreadable']
  assert os.listdir(best) == ['4.partial']
  assert 'Checkpoint of step 4 is unreadable' in proc.stderr
  step_a, state_a, _ = common.read_checkpoint(straight)
  step_b, state_b, _ = common.read_checkpoint(damaged)
  assert step_a == step_b == 4
  helpers.assert_same_state(state_a, state_b)
