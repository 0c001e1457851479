"""train.py: exact resume after SIGKILL, preemption, host syncs, NaN guard, two hosts, a sharded
run resumed as two hosts on fewer devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cmix_jax import parallel
from cmix_jax import run_setup
from cmix_jax import train
from tests import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _driver(*args, check=True, timeout=240):
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
    [sys.executable, '-m', 'tests.run_driver', *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check and proc.returncode:
    raise AssertionError(
      f'driver failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}'
    )
  return proc


def _latest_state(workdir):
  """The newest checkpoint's (step, state as numpy, meta), whatever topology saved it."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'meta'))
  step = mngr.latest_step()
  path = os.path.join(workdir, 'checkpoints', str(step))
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(os.path.join(path, 'state')).item_metadata.tree
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(os.path.join(path, 'state'), restore_args=as_numpy)
  with open(os.path.join(path, 'meta', 'metadata')) as f:
    meta = json.load(f)
  return step, state, meta


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['kind'] == 'train'}


def _assert_same_state(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  for path, x in flat_a:
    np.testing.assert_array_equal(x, flat_b[path], err_msg=jax.tree_util.keystr(path))


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path):
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  _driver(f'--workdir={straight}', '--devices=2', '--set=calibratemix.enabled=True')
  proc = _driver(
    f'--workdir={killed}',
    '--devices=2',
    '--set=calibratemix.enabled=True',
    '--kill_after_checkpoint=2',
    check=False,
  )
  assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, no clean exit
  assert _latest_state(killed)[0] == 2
  _driver(f'--workdir={killed}', '--devices=2', '--set=calibratemix.enabled=True')
  step_a, state_a, _ = _latest_state(straight)
  step_b, state_b, _ = _latest_state(killed)
  assert step_a == step_b == 4
  _assert_same_state(state_a, state_b)  # params, EMA, optimizer, dynamics, algo, rng
  drop_timing = lambda r: {k: v for k, v in r.items() if k != 'steps_per_sec'}
  assert drop_timing(_train_records(straight)[4]) == drop_timing(_train_records(killed)[4])
  with open(os.path.join(straight, 'eval.json')) as f:
    eval_a = json.load(f)
  with open(os.path.join(killed, 'eval.json')) as f:
    eval_b = json.load(f)
  assert eval_a['final']['accuracy'] == eval_b['final']['accuracy']


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / 'preempted')
  proc = _driver(f'--workdir={workdir}', '--sigterm_after_step=2')
  assert 'Preempted: checkpoint saved at step 2' in proc.stdout
  assert _latest_state(workdir)[0] == 2
  proc = _driver(f'--workdir={workdir}')
  assert 'RESULT False 4' in proc.stdout


def test_steps_between_logs_never_sync_with_the_host(tmp_path):
  run = run_setup.build_run(tiny.config(), str(tmp_path))
  state, _ = run_setup.initial_state(run)
  state = parallel.replicate(state, run.topo)
  fns = run_setup.make_step_fns(run)
  batches = run_setup.train_iterator(run, 0)
  with jax.transfer_guard_device_to_host('disallow'):
    state, metrics = train.run_steps(fns, state, batches, run.config, 0, 3)
  batches.close()
  assert len(metrics) == 3 and isinstance(metrics[0]['loss'], jax.Array)
  summary = train.summarize_metrics(metrics)  # the one sync, at the log interval
  assert np.isfinite(summary['loss'])


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'nan')
  _driver(f'--workdir={workdir}', '--set=num_train_steps=4')
  _, good, _ = _latest_state(workdir)
  config = tiny.config(steps=8)
  config.optim.lr = 1e38  # valid, but the update's norm overflows: a non-finite step
  with pytest.raises(train.NonFiniteError, match='first at step 4'):
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  step, state, _ = _latest_state(workdir)
  assert step == 4
  _assert_same_state(good, state)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _two_processes(workdir, *args, timeout=300, devices=4):
  """Runs the driver as two processes (`devices` fake devices each) over loopback; (process,
  out, err) each."""
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        '-m',
        'tests.run_driver',
        f'--workdir={workdir}',
        f'--devices={devices}',
        f'--coordinator=127.0.0.1:{port}',
        '--num_processes=2',
        f'--process_id={i}',
        *args,
      ],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    return [(p, *p.communicate(timeout=timeout)) for p in procs]
  finally:  # a hung pair (the failure some tests look for) is not left running
    for p in procs:
      p.kill()


def test_two_processes_over_loopback_equal_one_process(tmp_path):
  single = str(tmp_path / 'single')
  multi = str(tmp_path / 'multi')
  _driver(f'--workdir={single}', '--devices=8')
  for p, out, err in _two_processes(multi):
    assert p.returncode == 0, f'{out}\n{err[-4000:]}'
  _, state_single, _ = _latest_state(single)
  _, state_multi, _ = _latest_state(multi)
  flat_s = jax.tree_util.tree_flatten_with_path(state_single)[0]
  flat_m = dict(jax.tree_util.tree_flatten_with_path(state_multi)[0])
  for path, x in flat_s:
    np.testing.assert_allclose(
      np.asarray(x, np.float64),
      np.asarray(flat_m[path], np.float64),
      rtol=1e-5,
      atol=1e-6,
      err_msg=jax.tree_util.keystr(path),
    )
  with open(os.path.join(single, 'eval.json')) as f:
    single_eval = json.load(f)
  with open(os.path.join(multi, 'eval.json')) as f:
    multi_eval = json.load(f)
  assert single_eval['final']['accuracy'] == pytest.approx(multi_eval['final']['accuracy'])


def test_sharded_run_of_one_host_resumes_as_two_hosts_on_fewer_devices(tmp_path):
  # A pod run preempted and moved to a smaller slice: 8 dynamics shards saved by one process
  # are cut into 4 (two processes, 2 devices each) and training goes on as if uninterrupted.
  sharded = ['--set=calibratemix.enabled=True', '--set=dynamics_sharded=True']
  sharded.append('--set=num_train_steps=6')
  straight, moved = str(tmp_path / 'straight'), str(tmp_path / 'moved')
  _driver(f'--workdir={straight}', '--devices=1', *sharded)  # pair_scope=global: any count
  proc = _driver(
    f'--workdir={moved}', '--devices=8', *sharded, '--kill_after_checkpoint=4', check=False
  )
  assert proc.returncode == -9, proc.stderr[-2000:]
  for p, out, err in _two_processes(moved, *sharded, devices=2):
    assert p.returncode == 0, f'{out}\n{err[-4000:]}'
    assert 'RESULT False 6' in out
  step_a, state_a, _ = _latest_state(straight)
  step_b, state_b, _ = _latest_state(moved)
  assert step_a == step_b == 6
  tables_a, tables_b = state_a['dynamics'], state_b['dynamics']
  assert tables_a['apm'].shape[0] == 1 and tables_b['apm'].shape[0] == 4
  for name, saved in tables_a.items():
    full_a = saved.reshape((-1,) + saved.shape[2:])  # padding rows sit at each shard's end
    full_b = tables_b[name].reshape((-1,) + saved.shape[2:])
    rows = min(len(full_a), len(full_b))
    full_a, full_b = full_a[:rows], full_b[:rows]
    if 'count' in name or name == 'apm_label':
      np.testing.assert_array_equal(full_b, full_a, err_msg=name)  # what was seen, exactly
    else:
      np.testing.assert_allclose(full_b, full_a, rtol=1e-5, atol=1e-6, err_msg=name)
  assert tables_a['apm_count'].sum() > 0
  for x, y in zip(jax.tree.leaves(state_a['params']), jax.tree.leaves(state_b['params'])):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)
