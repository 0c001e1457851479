"""Workdir lease: one writing run per workdir, on a local disk and in a (emulated) bucket."""

import concurrent.futures
import json
import logging
import os
import socket
import subprocess
import time

import pytest

from cmix_jax import lease as lease_lib
from cmix_jax import storage
from tests import gcs as gcs_lib
from tests import helpers


@pytest.fixture(params=['local', 'gs'])
def workdir(request, tmp_path):
  if request.param == 'local':
    return str(tmp_path / 'run')
  request.getfixturevalue('gcs')
  return f'gs://{gcs_lib.BUCKET}/lease/{tmp_path.name}'


def _lease_path(workdir):
  return storage.as_path(workdir) / lease_lib.LEASE_FILE


def _read(workdir):
  path = _lease_path(workdir)
  return json.loads(path.read_text()) if path.exists() else None


def _plant(workdir, **fields):
  """Writes a lease record as some other run would have left it."""
  now = time.time()
  record = {
    'host': 'other-host',
    'pid': 12345,
    'boot_id': 'b',
    'token': 'theirs',
    'start_time': now - 60,
    'heartbeat': now - 5,
  }
  record.update(fields)
  storage.write_json(_lease_path(workdir), record)
  return record


def _dead_pid():
  proc = subprocess.Popen(['true'])
  proc.wait()
  return proc.pid


def test_second_acquire_is_refused_naming_the_holder_and_the_fix(workdir):
  lease = lease_lib.acquire(workdir, 600, process_index=0)
  record = _read(workdir)
  assert (record['host'], record['pid']) == (socket.gethostname(), os.getpid())
  with pytest.raises(lease_lib.LeaseHeldError) as err:
    lease_lib.acquire(workdir, 600, process_index=0)
  message = str(err.value)
  for part in (
    socket.gethostname(),
    f'pid {os.getpid()}',
    record['start_utc'],
    'another --workdir',
    'delete the lease file',
  ):
    assert part in message
  assert _read(workdir)['token'] == record['token']  # the refused run left it alone
  with pytest.raises(lease_lib.LeaseHeldError, match='another --workdir'):
    lease_lib.check(workdir, 600)  # the early, read-only check says the same
  lease.release()
  lease_lib.check(workdir, 600)


def test_released_lease_is_gone_and_can_be_taken_again(workdir):
  with lease_lib.acquire(workdir, 600, process_index=0) as lease:
    first = lease.record['token']
  assert _read(workdir) is None
  lease.release()  # a second release is a no-op
  with lease_lib.acquire(workdir, 600, process_index=0) as again:
    assert again.record['token'] != first
    assert _read(workdir)['token'] == again.record['token']


def test_stale_leases_are_taken_over_with_a_warning(workdir, caplog):
  host, boot = socket.gethostname(), lease_lib._boot_id()
  stale = [
    dict(host=host, pid=_dead_pid(), boot_id=boot),
    dict(host=host, pid=os.getppid(), boot_id='an-earlier-boot'),
    dict(heartbeat=time.time() - 601),
  ]
  for fields in stale:
    _plant(workdir, **fields)
    with caplog.at_level(logging.WARNING):
      with lease_lib.acquire(workdir, 600, process_index=0) as lease:
        assert _read(workdir)['token'] == lease.record['token']
    assert 'Taking over the workdir lease' in caplog.text
    caplog.clear()


def test_a_dropped_lease_of_this_process_is_taken_over(workdir):
  lease_lib.acquire(workdir, 600, process_index=0)  # a Run dropped without release
  with lease_lib.acquire(workdir, 600, process_index=0) as lease:
    assert _read(workdir)['token'] == lease.record['token']


def test_live_foreign_lease_is_refused_until_its_heartbeat_times_out(workdir):
  _plant(workdir, heartbeat=time.time() - 30)
  with pytest.raises(lease_lib.LeaseHeldError, match='host other-host pid 12345'):
    lease_lib.acquire(workdir, 600, process_index=0)
  with lease_lib.acquire(workdir, 20, process_index=0) as lease:  # 30 s > 20 s
    assert lease.held


def test_refresh_moves_the_heartbeat_and_notices_a_takeover(workdir):
  lease = lease_lib.acquire(workdir, 600, process_index=0)
  before = _read(workdir)['heartbeat']
  time.sleep(0.01)
  lease.refresh()
  assert _read(workdir)['heartbeat'] > before
  assert _read(workdir)['token'] == lease.record['token']
  _plant(workdir)  # another run judged us stale and took over
  with pytest.raises(lease_lib.LeaseLostError, match='taken over by host other-host'):
    lease.refresh()
  lease.release()
  assert _read(workdir)['token'] == 'theirs'  # not ours to remove


def _wait_for(condition, timeout_s=10.0):
  deadline = time.time() + timeout_s
  while not condition():
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def test_keep_alive_beats_between_log_intervals_and_stops_at_release(workdir):
  # A long compile or evaluation between two log intervals must not make the run look stale.
  lease = lease_lib.acquire(workdir, 600, process_index=0)
  first = _read(workdir)['heartbeat']
  thread = lease.keep_alive(0.1)
  _wait_for(lambda: _read(workdir)['heartbeat'] > first)
  assert _read(workdir)['token'] == lease.record['token']
  lease.release()
  thread.join(5)
  assert not thread.is_alive() and _read(workdir) is None


def test_keep_alive_notices_a_takeover_and_refresh_raises_it(workdir):
  lease = lease_lib.acquire(workdir, 600, process_index=0)
  thread = lease.keep_alive(0.1)
  _plant(workdir)  # another run judged us stale and took over
  _wait_for(lambda: lease.lost is not None)
  thread.join(5)
  assert not thread.is_alive()
  with pytest.raises(lease_lib.LeaseLostError, match='taken over by host other-host'):
    lease.refresh()  # what the training loop calls at its next log interval
  lease.release()
  assert _read(workdir)['token'] == 'theirs'


def test_a_dropped_lease_with_keep_alive_is_still_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  thread = lease_lib.acquire(workdir, 600, process_index=0).keep_alive(60)
  with lease_lib.acquire(workdir, 600, process_index=0) as lease:  # no LeaseHeldError
    assert _read(workdir)['token'] == lease.record['token']
  thread.join(5)
  assert not thread.is_alive()  # the dropped lease's thread ended with it


def test_racing_runs_get_exactly_one_lease(workdir, monkeypatch):
  _plant(workdir, heartbeat=time.time() - 1000)  # a stale lease all of them want to take over
  for store in (lease_lib._LocalLeaseFile, lease_lib._GcsLeaseObject):
    read = store.read

    def slow_read(self, read=read):  # every run reads the stale lease before any writes
      result = read(self)
      time.sleep(0.1)
      return result

    monkeypatch.setattr(store, 'read', slow_read)

  def try_acquire(_):
    try:
      return lease_lib.acquire(workdir, 600, process_index=0)
    except lease_lib.LeaseHeldError:
      return None

  with concurrent.futures.ThreadPoolExecutor(6) as pool:
    leases = [lease for lease in pool.map(try_acquire, range(6)) if lease is not None]
  assert len(leases) == 1
  assert _read(workdir)['token'] == leases[0].record['token']
  leases[0].release()


def test_early_check_passes_a_free_or_stale_workdir_and_writes_nothing(tmp_path):
  lease_lib.check(str(tmp_path / 'new'), 600)
  assert not (tmp_path / 'new').exists()
  _plant(str(tmp_path), heartbeat=time.time() - 700)
  lease_lib.check(str(tmp_path), 600)


def test_only_process_zero_holds_a_lease(tmp_path):
  lease = lease_lib.acquire(str(tmp_path / 'run'), 600, process_index=1)
  lease.refresh()
  lease.release()
  assert not lease.held
  assert not (tmp_path / 'run' / lease_lib.LEASE_FILE).exists()


def test_nonpositive_timeout_is_refused(tmp_path):
  with pytest.raises(ValueError, match='lease_timeout_s'):
    lease_lib.acquire(str(tmp_path), 0, process_index=0)


def test_run_assembly_refuses_a_busy_workdir_before_writing(tmp_path):
  from cmix_jax import run_setup
  from configs import tiny

  workdir = str(tmp_path / 'run')
  boot = lease_lib._boot_id()
  _plant(workdir, host=socket.gethostname(), pid=os.getppid(), boot_id=boot)  # a live process
  with pytest.raises(lease_lib.LeaseHeldError, match=f'pid {os.getppid()}'):
    run_setup.build_run(tiny.config(), workdir)
  assert os.listdir(workdir) == [lease_lib.LEASE_FILE]  # no config.json, no split.json


def test_a_lease_lost_on_process_zero_stops_both_processes_of_a_two_host_run(tmp_path):
  """Two processes over loopback: another run takes the lease at the step-4 heartbeat; both
  processes stop there (none waits for a peer that left), the step-2 checkpoint is kept."""
  workdir = str(tmp_path / 'run')
  results = helpers.two_processes(workdir, '--take_lease_at_step=4', timeout=240)
  for (p, out, err), expected in zip(
    results, ('taken over by host other-host', 'process 0 lost the workdir lease')
  ):
    assert p.returncode != 0 and 'LeaseLostError' in err and expected in err, out + err[-3000:]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2']
  assert _read(workdir)['token'] == 'theirs'  # the other run's lease is not ours to remove


def test_take_and_heartbeat_raise_on_every_process_with_the_holders_words(tmp_path):
  workdir = str(tmp_path / 'run')
  held = lease_lib.take(workdir, 600)
  with pytest.raises(lease_lib.LeaseHeldError, match=f'pid {os.getpid()}'):
    lease_lib.take(workdir, 600)  # this process's live lease: held, not stale
  lease_lib.heartbeat(held, workdir)
  _plant(workdir, token='theirs', heartbeat=time.time())
  with pytest.raises(lease_lib.LeaseLostError, match='taken over by host other-host'):
    lease_lib.heartbeat(held, workdir)
  lease_lib.heartbeat(lease_lib.NoLease(), workdir)  # other processes: nothing to refresh
