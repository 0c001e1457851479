"""The GCS emulator of tests/gcs.py never outlives the test run that started it."""

import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
  """True while `pid` runs (a zombie counts as gone)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (OSError, IndexError):
    return False


def _gone(pids: list[int], timeout_s: float = 20.0) -> bool:
  deadline = time.monotonic() + timeout_s
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.1)
  return not any(_alive(p) for p in pids)


def test_no_emulator_outlives_an_xdist_session(tmp_path):
  pids_file = tmp_path / 'pids'
  env = dict(os.environ, EMULATOR_PIDS=str(pids_file), PYTHONPATH=str(ROOT))
  proc = subprocess.run(
    [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-q', '-n', '2', '--dist', 'each']
    + ['tests/emulator_probe.py'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  pids = [int(line) for line in pids_file.read_text().split()]
  assert len(set(pids)) == 2  # one emulator in each worker
  assert _gone(pids, timeout_s=0.5), f'emulators {pids} outlived the test session'


def test_the_emulator_dies_with_a_killed_parent(tmp_path):
  script = (
    'import os, signal\n'
    'from tests import gcs\n'
    'print(gcs.emulator().process.pid, flush=True)\n'
    'os.kill(os.getpid(), signal.SIGKILL)\n'  # no atexit, no session end
  )
  proc = subprocess.run(
    [sys.executable, '-c', script],
    cwd=ROOT,
    env=dict(os.environ, PYTHONPATH=str(ROOT)),
    capture_output=True,
    text=True,
    timeout=120,
  )
  pid = int(proc.stdout.split()[0])
  assert _gone([pid]), f'emulator {pid} outlived its killed parent'
