"""What a result ran on: machine, devices, library versions and the code's commit.

Float results differ in their last digits between CPU models (and grow over a run), so a
result is only comparable bit for bit with one from the same hardware and software; every
run's eval.json and every study result file carry this record.
"""

import hashlib
import importlib.metadata
import os
import platform
import subprocess

import jax

ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'amx_tile')
PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tensorflow-cpu')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return ''


def cpu() -> dict:
  """CPU model, the ISA flags that change XLA:CPU's kernels, and core counts."""
  info = _read('/proc/cpuinfo')
  model = next((l.split(':', 1)[1].strip() for l in info.splitlines() if 'model name' in l), '')
  flags_line = next((l for l in info.splitlines() if l.startswith('flags')), '')
  flags = set(flags_line.split(':', 1)[-1].split())
  return {
    'model': model or platform.processor(),
    'isa': [f for f in ISA_FLAGS if f in flags],
    'cores': os.cpu_count(),
    'cores_usable': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None,
  }


def machine_id() -> str:
  """A short id of this machine (host name and boot), so pairs can say they shared one."""
  text = platform.node() + _read('/proc/sys/kernel/random/boot_id').strip()
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def versions() -> dict:
  """Installed versions of the numerical stack (None where a package is absent)."""
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_commit(repo: str = REPO) -> dict:
  """{'commit': HEAD or None, 'dirty': uncommitted changes to tracked files} of `repo`."""

  def git(*args):
    out = subprocess.run(['git', '-C', repo, *args], capture_output=True, text=True, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else None

  try:
    commit = git('rev-parse', 'HEAD')
    status = git('status', '--porcelain', '--untracked-files=no')
  except (OSError, subprocess.SubprocessError):
    return {'commit': None, 'dirty': None}
  return {'commit': commit, 'dirty': None if status is None else bool(status)}


def describe(devices_used: int | None = None) -> dict:
  """The whole record: machine, devices (those visible, and those the run used), versions,
  commit and XLA flags."""
  devices = jax.devices()
  return {
    'machine_id': machine_id(),
    'cpu': cpu(),
    'platform': devices[0].platform,
    'device_kind': devices[0].device_kind,
    'device_count': jax.device_count(),
    'devices_used': devices_used,
    'process_count': jax.process_count(),
    'versions': versions(),
    **git_commit(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
