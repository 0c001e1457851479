"""Local or gs:// paths: JSON / JSONL / bytes through etils.epath, and preflight checks.

Every user-given path (workdir, data_dir, own-data sources, experiment outputs) goes through
`as_path`, so `~/runs/x` and `gs://bucket/runs/x` work alike.

Backends. epath reaches gs:// through fsspec/gcsfs here, not tf.io.gfile: TF's GCS client has
its endpoint compiled in, so it cannot be pointed at a local emulator, while gcsfs (like
google-cloud-storage, used for the workdir lease and the preflight checks) honours
STORAGE_EMULATOR_HOST. Using gcsfs everywhere makes the tests run the same code as Cloud.
Set EPATH_USE_TF=true in the environment to get tf.io.gfile back, and
GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=true for gcsfs's zonal / hierarchical-namespace buckets.
gcsfs's folder-listing cache is turned off (fsspec config): other processes write the same
workdir.

Writes. A GCS object cannot be appended to, so `append_jsonl` on gs:// reads the object and
writes it back with the new line (one small object per run; each write replaces it whole, so
a reader never sees half a line). Local writes go to a temp file renamed into place.
"""

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from typing import Any

os.environ.setdefault('EPATH_USE_TF', 'false')  # gcsfs for gs:// (see the module docstring)
# gcsfs's default class asks the Storage Control API for each bucket's layout (zonal/HNS) and,
# without that permission, asks again on every call; the plain class serves regular buckets.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

from etils import epath
import fsspec

# gcsfs would otherwise keep every folder listing forever, so a long-lived process would not
# see objects another process (a resumed run, another host) wrote after its first listing.
fsspec.config.conf.setdefault('gs', {}).setdefault('use_listings_cache', False)

REMOTE_SCHEMES = ('gs://', 's3://', 'az://', 'hf://')
PREFLIGHT_TIMEOUT_S = 60.0  # seconds the preflight keeps retrying a transient GCS error


class StorageError(RuntimeError):
  """A workdir or data dir that cannot be used; the message names the fix."""


def is_remote(path: Any) -> bool:
  """True for a bucket path (gs://, s3://, ...), False for a local one."""
  return os.fspath(path).startswith(REMOTE_SCHEMES)


def as_path(path: Any) -> epath.Path:
  """epath.Path of a user-given path: `~` expanded and made absolute when local."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def bucket_of(path: Any) -> str:
  """'gs://bucket/a/b' -> 'bucket'."""
  return os.fspath(path).split('://', 1)[1].split('/', 1)[0]


def object_name(path: Any) -> str:
  """'gs://bucket/a/b' -> 'a/b' (the object name inside the bucket)."""
  rest = os.fspath(path).split('://', 1)[1]
  return rest.split('/', 1)[1].rstrip('/') if '/' in rest else ''


def walk(path: Any):
  """(folder, subfolder names, file names) under `path`, like os.walk, for local or gs://.

  Top-down: emptying `dirs` in place prunes. Local folders come back as given (`~` expanded);
  epath's own walk drops the gs:// of the folders it yields, here they keep it.
  """
  if not is_remote(path):
    for root, dirs, files in os.walk(os.path.expanduser(os.fspath(path))):
      yield epath.Path(root), dirs, files
    return
  scheme = os.fspath(path).split('://', 1)[0] + '://'
  for root, dirs, files in as_path(path).walk():
    root = os.fspath(root)
    if not root.startswith(scheme):
      root = scheme + root.lstrip('/')
    yield epath.Path(root), dirs, files


# ----------------------------------------------------------------------------- reading, writing


def write_bytes(path: Any, data: bytes) -> epath.Path:
  """Writes `data` whole: temp file + rename locally, one object upload on a bucket."""
  path = as_path(path)
  if is_remote(path):  # no folders in a bucket (and no mkdir, which could create a bucket)
    path.write_bytes(data)
    return path
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def write_text(path: Any, text: str) -> epath.Path:
  return write_bytes(path, text.encode('utf-8'))


def write_json(path: Any, payload: Any, **dump_kwargs) -> epath.Path:
  """json.dumps(payload, **dump_kwargs) written whole to `path`."""
  return write_text(path, json.dumps(payload, **dump_kwargs))


def read_json(path: Any) -> Any:
  return json.loads(as_path(path).read_text())


def append_jsonl(path: Any, record: Any) -> epath.Path:
  """Appends one JSON line: a real append locally, read + rewrite on a bucket."""
  path = as_path(path)
  line = json.dumps(record) + '\n'
  if not is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as f:
      f.write(line)
    return path
  old = path.read_text() if path.exists() else ''
  if old and not old.endswith('\n'):
    old += '\n'
  path.write_text(old + line)
  return path


def read_jsonl(path: Any) -> list:
  """Every record of a JSONL file (blank lines skipped)."""
  return [json.loads(line) for line in as_path(path).read_text().splitlines() if line.strip()]


def copy_file(local_file: str, path: Any) -> epath.Path:
  """Copies a local file to `path` in 16 MiB blocks (a bucket object is written whole)."""
  path = as_path(path)
  if not is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
  with open(local_file, 'rb') as src, path.open('wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 24)
  return path


def save_npz(path: Any, **arrays) -> epath.Path:
  """np.savez to a local temp file (zip wants to seek), then renamed or uploaded into place."""
  import numpy as np

  path = as_path(path)
  local_dir = None
  if not is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    local_dir = os.fspath(path.parent)
  fd, tmp = tempfile.mkstemp(suffix='.npz.tmp', prefix=f'.{path.name}.', dir=local_dir)
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
    if is_remote(path):
      copy_file(tmp, path)
    else:
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


# ----------------------------------------------------------------------------- preflight


def _gcs_client():
  from google.cloud import storage as gcs

  return gcs.Client()


def _retry(timeout_s: float):
  from google.cloud.storage import retry as gcs_retry

  return gcs_retry.DEFAULT_RETRY.with_timeout(timeout_s)


def _bucket_error(path: Any, what: str, error: Exception) -> StorageError:
  """One message per failure kind, naming the bucket and the fix."""
  from google.api_core import exceptions as api
  from google.auth import exceptions as auth

  bucket = bucket_of(path)
  if isinstance(error, auth.DefaultCredentialsError):
    fix = (
      f'no Google Cloud credentials were found ({error}); run `gcloud auth '
      'application-default login`, set GOOGLE_APPLICATION_CREDENTIALS to a key file, or '
      'run on a VM whose service account can use the bucket.'
    )
  elif isinstance(error, api.NotFound):
    fix = (
      f'bucket gs://{bucket} does not exist; create it (`gcloud storage buckets create '
      f'gs://{bucket}`) or fix the path.'
    )
  elif isinstance(error, (api.Forbidden, api.Unauthorized)):
    fix = (
      f'the credentials in use may not {what} gs://{bucket} ({error.message}); grant '
      'them roles/storage.objectAdmin on the bucket, or use credentials that have it.'
    )
  else:
    fix = (
      f'gs://{bucket} could not be reached ({type(error).__name__}: {error}); check the '
      'network (and STORAGE_EMULATOR_HOST when using an emulator), then retry.'
    )
  return StorageError(f'cannot {what} {os.fspath(path)}: {fix}')


def _nearest_existing(path: str) -> str:
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def check_writable(workdir: Any, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> epath.Path:
  """Raises StorageError (naming the fix) unless `workdir` can be written; leaves nothing.

  Local: the workdir, or the nearest folder above it that exists, must be a writable folder.
  gs://: a probe object is written and removed.
  """
  path = as_path(workdir)
  if not is_remote(path):
    existing = _nearest_existing(os.fspath(path))
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
      what = 'is not a folder' if not os.path.isdir(existing) else 'is not writable'
      raise StorageError(
        f'cannot write to workdir {path}: {existing} {what}; pick a '
        'writable --workdir (or fix its permissions).'
      )
    return path
  if not os.fspath(path).startswith('gs://'):
    return path  # other clouds: the first write reports its own error
  probe = f'.write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}'
  try:
    blob = (
      _gcs_client().bucket(bucket_of(path)).blob('/'.join(filter(None, (object_name(path), probe))))
    )
    blob.upload_from_string(b'probe', retry=_retry(timeout_s), timeout=timeout_s)
    blob.delete(retry=_retry(timeout_s), timeout=timeout_s)
  except Exception as e:
    raise _bucket_error(path, 'write to', e) from None
  return path


def check_readable(data_dir: Any, timeout_s: float = PREFLIGHT_TIMEOUT_S) -> epath.Path:
  """Raises StorageError (naming the fix) unless the bucket of a gs:// data_dir can be listed.

  A local data_dir passes here; a missing data set there is reported by the data loader.
  """
  path = as_path(data_dir)
  if not os.fspath(path).startswith('gs://'):
    return path
  try:
    blobs = _gcs_client().list_blobs(
      bucket_of(path),
      prefix=object_name(path),
      max_results=1,
      retry=_retry(timeout_s),
      timeout=timeout_s,
    )
    list(blobs)
  except Exception as e:
    raise _bucket_error(path, 'read', e) from None
  return path


# ----------------------------------------------------------------------------
# Failure causes: the operating system's words behind a failed write, for error messages.


def os_error_of(error: BaseException) -> int | None:
  """The errno behind `error` or anything in its cause/context chain, if one is known.

  Orbax/tensorstore wrap OS errors in ValueErrors whose text ends in os_error_code='N';
  TensorFlow's file writers only keep the operating system's words in their message.
  """
  seen, visited = error, set()
  while seen is not None and id(seen) not in visited:
    visited.add(id(seen))
    if isinstance(seen, OSError) and seen.errno:
      return seen.errno
    text = str(seen)
    code = re.search(r"os_error_code='?(\d+)", text)
    if code:
      return int(code.group(1))
    for number in _WORDED_ERRNOS:
      if os.strerror(number) in text:
        return number
    seen = seen.__cause__ or seen.__context__
  return None


_WORDED_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)


def failure_cause(error: BaseException) -> str:
  """The operating system's words for a failed write (e.g. 'No space left on device'), else
  the first line of the error."""
  number = os_error_of(error)
  if number is not None:
    return os.strerror(number)
  first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return first_line[:300]
