"""The workdir lease: one writing run per workdir, on a local disk or in a gs:// bucket.

Process 0 of the writing run holds workdir/lease.json (host, pid, boot id, start time,
heartbeat). Every change is a compare-and-swap against the version last read: in a bucket, an
upload or delete with a generation precondition (0: only if absent); on a local disk, a hard
link of a complete temp file (fails if the lease exists), and replace/delete under an flock of
the workdir. A lease is stale, and taken over with a warning, when its holder is gone from this
host (dead pid, or the host rebooted since) or its heartbeat is older than the timeout (a
holder elsewhere that stopped refreshing). A lease of this very process whose Lease object is
gone (a run dropped without release) is stale too.

Every process of a run calls `take` (at start) and `heartbeat` (at each log interval):
process 0 does the work and all processes raise together, so none waits for a peer that left.
"""

import datetime
import fcntl
import gc
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from typing import Any

from etils import epath
import jax

from cmix_jax import parallel
from cmix_jax import storage

LEASE_FILE = 'lease.json'
_HELD = weakref.WeakValueDictionary()  # token -> Lease, the leases this process holds


class LeaseHeldError(RuntimeError):
  """Another live run holds the workdir lease; the message says who, since when, and the fix."""


class LeaseLostError(RuntimeError):
  """This run's lease was taken over (judged stale) or removed while it ran."""


def _boot_id() -> str:
  """This machine's boot id: a restarted host with the same name gets a new one."""
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _pid_alive(pid: int) -> bool:
  """True while `pid` runs on this host (a zombie counts as dead)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return True


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime(
    '%Y-%m-%d %H:%M:%S UTC'
  )


def _encode(record: dict) -> bytes:
  return json.dumps(record, sort_keys=True).encode()


def _decode(data: bytes) -> dict:
  try:
    record = json.loads(data)
  except ValueError:
    record = None
  return record if isinstance(record, dict) else {'unreadable': data[:200].decode('latin-1')}


class _LocalLeaseFile:
  """Compare-and-swap on a local file; the version is the file's bytes."""

  def __init__(self, path: epath.Path):
    self.path = os.fspath(path)
    self.dir = os.path.dirname(self.path)

  def _locked(self):
    fd = os.open(self.dir, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd

  def _unlock(self, fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)

  def _read_raw(self) -> bytes | None:
    try:
      with open(self.path, 'rb') as f:
        return f.read()
    except FileNotFoundError:
      return None

  def read(self) -> tuple[dict | None, Any]:
    raw = self._read_raw()
    return (None, None) if raw is None else (_decode(raw), raw)

  def _write_tmp(self, data: bytes) -> str:
    tmp = f'{self.path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    return tmp

  def create(self, record: dict) -> Any:
    os.makedirs(self.dir, exist_ok=True)
    data = _encode(record)
    tmp = self._write_tmp(data)
    fd = self._locked()
    try:
      os.link(tmp, self.path)  # atomic, and fails if the lease exists
      return data
    except FileExistsError:
      return None
    finally:
      self._unlock(fd)
      os.unlink(tmp)

  def replace(self, record: dict, version: Any) -> Any:
    data = _encode(record)
    tmp = self._write_tmp(data)
    fd = self._locked()
    try:
      if self._read_raw() != version:
        return None
      os.replace(tmp, self.path)
      return data
    finally:
      self._unlock(fd)
      if os.path.exists(tmp):
        os.unlink(tmp)

  def delete(self, version: Any) -> bool:
    fd = self._locked()
    try:
      if self._read_raw() != version:
        return False
      os.unlink(self.path)
      return True
    finally:
      self._unlock(fd)


class _GcsLeaseObject:
  """Compare-and-swap on a GCS object; the version is its generation (0: absent)."""

  def __init__(self, path: epath.Path):
    from google.cloud import storage as gcs

    self.bucket = gcs.Client().bucket(storage.bucket_of(path))
    self.name = storage.object_name(path)

  def read(self) -> tuple[dict | None, Any]:
    from google.api_core import exceptions as api

    for _ in range(5):
      blob = self.bucket.get_blob(self.name)
      if blob is None:
        return None, None
      try:
        return _decode(blob.download_as_bytes(if_generation_match=blob.generation)), blob.generation
      except (api.PreconditionFailed, api.NotFound):
        continue  # replaced or deleted between the two requests: read again
    raise LeaseHeldError(
      f'gs://{self.bucket.name}/{self.name} keeps changing; another run '
      'is taking it over right now. Retry in a minute.'
    )

  def _upload(self, record: dict, generation: int) -> Any:
    from google.api_core import exceptions as api

    blob = self.bucket.blob(self.name)
    try:
      blob.upload_from_string(
        _encode(record), content_type='application/json', if_generation_match=generation
      )
    except api.PreconditionFailed:
      return None
    return blob.generation

  def create(self, record: dict) -> Any:
    return self._upload(record, 0)

  def replace(self, record: dict, version: Any) -> Any:
    return self._upload(record, version)

  def delete(self, version: Any) -> bool:
    from google.api_core import exceptions as api

    try:
      self.bucket.blob(self.name).delete(if_generation_match=version)
    except (api.PreconditionFailed, api.NotFound):
      return False
    return True


def _lease_store(path: epath.Path):
  if not storage.is_remote(path):
    return _LocalLeaseFile(path)
  if os.fspath(path).startswith('gs://'):
    return _GcsLeaseObject(path)
  raise storage.StorageError(
    f'{path}: the workdir lease works on local disks and gs:// '
    'buckets only; use one of those for --workdir.'
  )


def _describe(record: dict, now: float) -> str:
  if 'unreadable' in record:
    return f'an unreadable lease ({record["unreadable"]!r})'
  return (
    f'host {record.get("host")} pid {record.get("pid")}, started '
    f'{_utc(record.get("start_time", 0))}, last heartbeat '
    f'{now - record.get("heartbeat", 0):.0f} s ago'
  )


def stale_reason(record: dict, timeout_s: float, now: float | None = None) -> str | None:
  """Why a lease record's holder is gone, or None while it may still be running."""
  now = time.time() if now is None else now
  if (record.get('host'), record.get('pid')) == (socket.gethostname(), os.getpid()):
    gc.collect()  # a dropped Run may sit in a reference cycle
    held = _HELD.get(record.get('token'))
    if held is None or not held.held:
      return 'it belongs to an earlier run in this process that no longer holds it'
  elif record.get('host') == socket.gethostname() and 'pid' in record:
    if record.get('boot_id') and record['boot_id'] != _boot_id():
      return f'host {record["host"]} has rebooted since the lease was taken'
    if not _pid_alive(int(record['pid'])):
      return f'pid {record["pid"]} no longer runs on this host ({record["host"]})'
  age = now - float(record.get('heartbeat', 0))
  if age > timeout_s:
    return f'its last heartbeat is {age:.0f} s old (lease_timeout_s={timeout_s:g})'
  return None


class Lease:
  """The workdir lease held by this process: refresh() at each log interval and from a
  keep-alive thread in between, release() at exit. A context manager releases on leaving
  the block, whatever the exit."""

  def __init__(self, path: epath.Path, store, record: dict, version: Any):
    self.path = path
    self._store = store
    self.record = record
    self.version = version
    self.held = True
    self.lost: LeaseLostError | None = None  # set once another run has taken the lease
    self._lock = threading.Lock()  # refresh/release from the loop and the keep-alive thread
    self._stop = threading.Event()
    _HELD[record['token']] = self

  def _lost(self, current: dict | None) -> LeaseLostError:
    self.held = False
    who = 'removed' if current is None else f'taken over by {_describe(current, time.time())}'
    self.lost = LeaseLostError(
      f'the workdir lease {self.path} was {who}: another run now writes '
      'this workdir, so this one must stop. Check that only one run uses '
      'the workdir (a longer config.lease_timeout_s keeps a slow run from '
      'being judged stale).'
    )
    return self.lost

  def refresh(self) -> None:
    """Writes a new heartbeat; LeaseLostError if another run took the lease over."""
    with self._lock:
      if self.lost is not None:
        raise self.lost
      if not self.held:
        raise LeaseLostError(f'the workdir lease {self.path} was released; acquire a new one.')
      current, version = self._store.read()
      if current is None or current.get('token') != self.record['token']:
        raise self._lost(current)
      now = time.time()
      record = dict(current, heartbeat=now, heartbeat_utc=_utc(now))
      new_version = self._store.replace(record, version)
      if new_version is None:
        raise self._lost(self._store.read()[0])
      self.record, self.version = record, new_version

  def keep_alive(self, interval_s: float) -> threading.Thread:
    """Refreshes the heartbeat every `interval_s` s in a daemon thread until release(), so a
    long compile, evaluation or save never makes a live run look stale. A takeover it meets
    is kept in `lost` (refresh() raises it); a failed write is retried at the next beat."""

    lease, stop = weakref.ref(self), self._stop  # a dropped Lease is collected, and stops
    weakref.finalize(self, stop.set)

    def beat():
      while not stop.wait(interval_s):
        held = lease()
        if held is None:
          return
        try:
          held.refresh()
        except LeaseLostError:
          return
        except Exception as e:
          logging.warning('Workdir lease heartbeat failed (%s); retrying in %g s.', e, interval_s)
        del held

    thread = threading.Thread(target=beat, name='cmix_jax_lease_heartbeat', daemon=True)
    thread.start()
    return thread

  def release(self) -> None:
    """Removes the lease if this run still holds it (best effort: failures only warn)."""
    self._stop.set()
    with self._lock:
      self._release()

  def _release(self) -> None:
    if not self.held:
      return
    self.held = False
    try:
      current, version = self._store.read()
      if current is not None and current.get('token') == self.record['token']:
        self._store.delete(version)
    except Exception as e:
      logging.warning(
        'Could not release the workdir lease %s (%s); the next run takes it over once it is stale.',
        self.path,
        e,
      )

  def __enter__(self) -> 'Lease':
    return self

  def __exit__(self, *exc) -> None:
    self.release()


class NoLease:
  """What processes other than 0 hold: the same methods, doing nothing."""

  held = False

  def refresh(self) -> None:
    pass

  def keep_alive(self, interval_s: float) -> None:
    pass

  def release(self) -> None:
    pass

  def __enter__(self) -> 'NoLease':
    return self

  def __exit__(self, *exc) -> None:
    pass


def _held_error(path: epath.Path, current: dict, timeout_s: float) -> LeaseHeldError:
  return LeaseHeldError(
    f'workdir {path.parent} is in use by another run: {_describe(current, time.time())} '
    f'(lease {path}). Wait for that run to finish or use another --workdir; if that run is '
    'really gone, delete the lease file (a lease without heartbeat for '
    f'lease_timeout_s={timeout_s:g} s is taken over by itself).'
  )


def check(workdir: str, timeout_s: float) -> None:
  """Raises LeaseHeldError if a live run holds the workdir lease; reads only, writes nothing.

  For refusing early (before loading data); `take` still decides, atomically.
  """
  path = storage.as_path(workdir) / LEASE_FILE
  current, _ = _lease_store(path).read()
  if current is not None and stale_reason(current, timeout_s) is None:
    raise _held_error(path, current, timeout_s)


def acquire(workdir: str, timeout_s: float, process_index: int | None = None) -> Lease | NoLease:
  """Takes workdir/lease.json for this run (process 0 only), taking over a stale one.

  Raises LeaseHeldError naming the holder, since when, and the fix when a live run holds it.
  """
  if timeout_s <= 0:
    raise ValueError(
      f'lease_timeout_s={timeout_s} must be > 0 (seconds without heartbeat '
      'after which a lease is taken over): set --config.lease_timeout_s.'
    )
  process_index = jax.process_index() if process_index is None else process_index
  if process_index != 0:
    return NoLease()
  path = storage.as_path(workdir) / LEASE_FILE
  store = _lease_store(path)
  now = time.time()
  mine = {
    'host': socket.gethostname(),
    'pid': os.getpid(),
    'boot_id': _boot_id(),
    'token': uuid.uuid4().hex,
    'start_time': now,
    'start_utc': _utc(now),
    'heartbeat': now,
    'heartbeat_utc': _utc(now),
  }
  lease = Lease(path, store, mine, None)  # registered before writing: see stale_reason
  try:
    return _take(lease, store, timeout_s)
  except BaseException:
    lease.held = False
    raise


def _take(lease: Lease, store, timeout_s: float) -> Lease:
  """acquire's compare-and-swap loop: create, or take over a stale lease."""
  path, mine = lease.path, lease.record
  for _ in range(5):
    current, version = store.read()
    if current is None:
      version = store.create(mine)
    elif current.get('token') == mine['token']:
      lease.version = version  # ours: the reply to our write was lost
      return lease
    else:
      reason = stale_reason(current, timeout_s)
      if reason is None:
        raise _held_error(path, current, timeout_s)
      logging.warning(
        'Taking over the workdir lease %s from %s: %s.',
        path,
        _describe(current, time.time()),
        reason,
      )
      version = store.replace(mine, version)
    if version is not None:
      lease.version = version
      return lease
  raise LeaseHeldError(
    f'the workdir lease {path} changed hands repeatedly while this run '
    'tried to take it; another run is starting in the same workdir. Wait '
    'for it or use another --workdir.'
  )


# ----------------------------------------------------------------------------
# Every process of a run: process 0 holds the lease, all processes stop together.


def take(workdir: str, timeout_s: float) -> Lease | NoLease:
  """The workdir lease on process 0 (a no-op elsewhere), kept alive with four beats per
  timeout; every process raises LeaseHeldError if process 0 could not take it."""
  held, error = NoLease(), None
  try:
    held = acquire(workdir, timeout_s)
  except LeaseHeldError as e:
    error = e
  parallel.raise_on_every_process(
    error,
    lambda: LeaseHeldError(
      f'process 0 could not take the workdir lease of {workdir}; see its error.'
    ),
  )
  held.keep_alive(timeout_s / 4)
  return held


def heartbeat(held: Lease | NoLease, workdir: str) -> None:
  """Refreshes the lease (held by process 0); if it was lost, every process raises
  LeaseLostError here, so no process waits for a peer that has left."""
  error = None
  try:
    held.refresh()
  except LeaseLostError as e:
    error = e
  parallel.raise_on_every_process(
    error,
    lambda: LeaseLostError(f'process 0 lost the workdir lease of {workdir}; see its error.'),
  )
