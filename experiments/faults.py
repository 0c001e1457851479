"""Fault drill: runs each fault case against fresh temp workdirs and prints one line per case.

  python -m experiments.faults [--keep]     # exit status 1 if any case fails

Every case runs `python -m cmix_jax.main --config=configs/tiny.py:faults` (a tiny fake-data
job, 2 fake CPU devices) as a subprocess and checks what a user
would see: exit status, one error line without a traceback, what is left in the workdir, and
that a resumed run ends in the same state as an uninterrupted one (every array of the final
checkpoint equal). The small-disk case mounts a tmpfs (needs root); where it cannot, it says
SKIP. Takes 3-6 minutes on a 2-core CPU (7 cases, 13 short runs).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from configs import tiny
from experiments import common

CONFIG = 'configs/tiny.py:faults'
STEPS, CHECKPOINT_EVERY = tiny.FAULT_STEPS, tiny.FAULT_CHECKPOINT_EVERY
DEVICES = 2


# ----------------------------------------------------------------------------
# Running and inspecting.


def main_command(workdir: str, *overrides: str) -> list[str]:
  return common.main_command(CONFIG, workdir, flags=overrides)


def environment() -> dict:
  env = dict(
    os.environ,
    PYTHONPATH=common.REPO,
    TF_CPP_MIN_LOG_LEVEL='3',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}',
  )
  return env


def run_main(workdir: str, *overrides: str, timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(
    main_command(workdir, *overrides),
    cwd=common.REPO,
    env=environment(),
    capture_output=True,
    text=True,
    timeout=timeout,
    check=False,
  )


def error_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith('error: ')]


def same_end(reference: str, workdir: str) -> str:
  """'' if both runs end at the same step with equal arrays, else what differs."""
  import jax
  import numpy as np

  step_a, state_a, _ = common.read_checkpoint(reference)
  step_b, state_b, _ = common.read_checkpoint(workdir)
  if step_a != step_b:
    return f'final step {step_b} != {step_a}'
  arrays_b = dict(jax.tree_util.tree_flatten_with_path(state_b)[0])
  differing = [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_flatten_with_path(state_a)[0]
    if not np.array_equal(x, arrays_b.get(path))
  ]
  return f'{len(differing)} arrays differ, e.g. {differing[:2]}' if differing else ''


def garble(path: str) -> None:
  for root, _, files in os.walk(path):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')


def copy_run(src: str, dst: str) -> str:
  shutil.copytree(src, dst, symlinks=True)
  return dst


def rerun_damaged(root: str, workdir: str, moved_aside: str, done: str):
  """Reruns a damaged copy of the reference run: passes when the damaged checkpoint is now
  `moved_aside` in checkpoints/ and the run ends as the uninterrupted one did."""
  proc = run_main(workdir)
  entries = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  diff = same_end(os.path.join(root, 'reference'), workdir) if proc.returncode == 0 else 'n/a'
  ok = proc.returncode == 0 and moved_aside in entries and not diff
  return (
    done,
    f'status {proc.returncode}, checkpoints/ = {entries}, end state '
    f'{"equal to uninterrupted" if not diff else diff}',
    ok,
  )


# ----------------------------------------------------------------------------
# The cases. Each returns (what was done, what happened, passed).


def case_bad_values(root: str):
  """Values that cannot be right are refused before any write, whatever feature is off."""
  bad = [
    '--config.optim.lr=-1',
    '--config.calibratemix.passes=3',
    '--config.calibratemix.mixup_alpha=0',
    '--config.ssl.ema_p=2',
    '--config.ssl.p_cutoff=1.5',
    '--config.data.batch_size=15',
  ]
  problems = []
  for i, override in enumerate(bad):
    workdir = os.path.join(root, f'bad_{i}')
    proc = run_main(workdir, override)
    lines = error_lines(proc.stderr)
    if proc.returncode != 2 or 'Traceback' in proc.stderr or len(lines) != 1:
      problems.append(f'{override}: rc {proc.returncode}, {len(lines)} error lines')
    elif os.path.exists(workdir):
      problems.append(f'{override}: wrote {os.listdir(workdir)}')
  return (
    f'{len(bad)} bad overrides (lr=-1, passes=3, mixup_alpha=0, ema_p=2, p_cutoff=1.5, '
    f'batch 15 on {DEVICES} devices)',
    '; '.join(problems) or 'each: status 2, one error line, no traceback, no workdir',
    not problems,
  )


def case_reference(root: str):
  """The corrected command runs to the end (and is the reference for the resume cases)."""
  workdir = os.path.join(root, 'reference')
  start = time.time()
  proc = run_main(workdir)
  ok = proc.returncode == 0 and common.is_finished(workdir)
  return (
    'corrected rerun (no bad override), uninterrupted',
    f'status {proc.returncode} in {time.time() - start:.0f}s, eval.json '
    f'{"written" if ok else "missing"}' + ('' if ok else f': {proc.stderr[-500:]}'),
    ok,
  )


def case_corrupt_newest(root: str):
  workdir = copy_run(os.path.join(root, 'reference'), os.path.join(root, 'corrupt'))
  garble(os.path.join(workdir, 'checkpoints', str(STEPS)))
  return rerun_damaged(
    root, workdir, f'{STEPS}.unreadable', f'garbled every file of checkpoint {STEPS}, reran'
  )


def case_leftover_tmp(root: str):
  workdir = copy_run(os.path.join(root, 'reference'), os.path.join(root, 'leftover'))
  ckpts = os.path.join(workdir, 'checkpoints')
  os.rename(os.path.join(ckpts, str(STEPS)), os.path.join(ckpts, f'{STEPS}.orbax-checkpoint-tmp'))
  return rerun_damaged(
    root, workdir, f'{STEPS}.partial', f'left a cut-off save {STEPS}.orbax-checkpoint-tmp, reran'
  )


def case_full_disk(root: str):
  """A workdir on a tmpfs that holds one checkpoint: one message, then resume after growing."""
  mount_point = os.path.join(root, 'small_disk')
  os.makedirs(mount_point)
  mount = subprocess.run(
    ['mount', '-t', 'tmpfs', '-o', 'size=640k', 'tmpfs', mount_point],
    capture_output=True,
    text=True,
    check=False,
  )
  if mount.returncode:
    return 'workdir on a 640 KiB tmpfs', f'SKIP: cannot mount ({mount.stderr.strip()})', None
  try:
    workdir = os.path.join(mount_point, 'run')
    proc = run_main(workdir)
    lines = error_lines(proc.stderr)
    kept = sorted(n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.isdigit())
    checks = {
      'status 1': proc.returncode == 1,
      'one error line': len(lines) == 1,
      'no traceback': 'Traceback' not in proc.stderr,
      'names cause and workdir': bool(lines)
      and 'No space left on device' in lines[0]
      and workdir in lines[0],
      'a checkpoint kept': bool(kept),
    }
    first_ok = all(checks.values())
    subprocess.run(['mount', '-o', 'remount,size=64m', mount_point], check=True)
    again = run_main(workdir)
    diff = same_end(os.path.join(root, 'reference'), workdir) if again.returncode == 0 else 'n/a'
    ok = bool(first_ok) and again.returncode == 0 and not diff
    said = lines[0][:160] + '...' if lines else proc.stderr[-300:]
    missed = [k for k, v in checks.items() if not v]
    return (
      'workdir on a 640 KiB tmpfs, then grown to 64 MiB and rerun',
      f'status {proc.returncode}, kept checkpoints {kept}, said "{said}"'
      + (f' (missing: {missed})' if missed else '')
      + f'; rerun status {again.returncode}, end state {"equal" if not diff else diff}',
      ok,
    )
  finally:
    subprocess.run(['umount', mount_point], check=False)


def case_sigterm(root: str):
  """SIGTERM after the first checkpoint: saved at the next boundary, status 0, resume equal."""
  workdir = os.path.join(root, 'preempted')
  proc = subprocess.Popen(
    main_command(workdir),
    cwd=common.REPO,
    env=environment(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  first = os.path.join(workdir, 'checkpoints', str(CHECKPOINT_EVERY))
  deadline = time.time() + 600
  while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=600)
  preempted = proc.returncode == 0 and 'Preempted: checkpoint saved at step' in out
  saved_at = out.split('Preempted: checkpoint saved at step ')[-1].split()[0] if preempted else '?'
  again = run_main(workdir)
  diff = same_end(os.path.join(root, 'reference'), workdir) if again.returncode == 0 else 'n/a'
  ok = preempted and saved_at != str(STEPS) and again.returncode == 0 and not diff
  return (
    'SIGTERM once checkpoint 100 exists, then the same command again',
    f'status {proc.returncode}, saved at step {saved_at}; rerun status '
    f'{again.returncode}, end state {"equal" if not diff else diff}'
    + ('' if preempted else f': {err[-300:]}'),
    ok,
  )


def case_second_writer(root: str):
  """A second run on a workdir that a live run holds is refused with who holds it."""
  workdir = os.path.join(root, 'shared')
  longer = '--config.num_train_steps=100000'  # the holder outlives the second start
  holder = subprocess.Popen(
    main_command(workdir, longer),
    cwd=common.REPO,
    env=environment(),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 600
    while (
      not os.path.exists(os.path.join(workdir, 'metrics.jsonl'))
      and holder.poll() is None
      and time.time() < deadline
    ):
      time.sleep(0.2)
    proc = run_main(workdir, longer)
    still_running = holder.poll() is None
  finally:
    holder.send_signal(signal.SIGTERM)
    holder.communicate(timeout=600)
  lines = error_lines(proc.stderr)
  ok = (
    still_running
    and proc.returncode == 2
    and len(lines) == 1
    and 'is in use by another run' in lines[0]
    and f'pid {holder.pid}' in lines[0]
    and 'Traceback' not in proc.stderr
  )
  said = lines[0][:150] + '...' if lines else proc.stderr[-300:]
  return (
    'second run of the same command while the first trains',
    f'status {proc.returncode}, said "{said}"; holder '
    f'{"still training" if still_running else "had stopped"}, then SIGTERMed',
    ok,
  )


CASES = [
  ('bad values refused', case_bad_values),
  ('corrected rerun starts', case_reference),
  ('corrupt newest checkpoint', case_corrupt_newest),
  ('leftover tmp dir', case_leftover_tmp),
  ('save failure (disk full)', case_full_disk),
  ('SIGTERM + resume', case_sigterm),
  ('second writer refused', case_second_writer),
]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--keep', action='store_true', help='keep the temp workdirs')
  args = parser.parse_args(argv)
  root = tempfile.mkdtemp(prefix='cmix_faults_')
  failed = 0
  try:
    for name, case in CASES:
      start = time.time()
      try:
        done, happened, ok = case(root)
      except Exception as e:
        done, happened, ok = 'crashed', f'{type(e).__name__}: {e}', False
      verdict = 'SKIP' if ok is None else 'PASS' if ok else 'FAIL'
      failed += verdict == 'FAIL'
      print(f'{verdict}  {name:<26} {done} -> {happened} [{time.time() - start:.0f}s]', flush=True)
  finally:
    if args.keep:
      print(f'workdirs kept in {root}')
    else:
      shutil.rmtree(root, ignore_errors=True)
  print(json.dumps({'cases': len(CASES), 'failed': failed}))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
