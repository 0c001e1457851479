"""train.py: exact resume after SIGKILL, preemption, host syncs, NaN guard, two hosts, a sharded
run resumed as two hosts on fewer devices."""

import json
import os

import jax
import numpy as np
import pytest

from cmix_jax import train
from configs import tiny
from experiments import common
from tests import helpers


def _train_records(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f) if r['kind'] == 'train'}


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(tmp_path):
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  helpers.driver(f'--workdir={straight}', '--devices=2', '--set=calibratemix.enabled=True')
  proc = helpers.driver(
    f'--workdir={killed}',
    '--devices=2',
    '--set=calibratemix.enabled=True',
    '--kill_after_checkpoint=2',
    check=False,
  )
  assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, no clean exit
  assert common.read_checkpoint(killed)[0] == 2
  helpers.driver(f'--workdir={killed}', '--devices=2', '--set=calibratemix.enabled=True')
  step_a, state_a, _ = common.read_checkpoint(straight)
  step_b, state_b, _ = common.read_checkpoint(killed)
  assert step_a == step_b == 4
  helpers.assert_same_state(state_a, state_b)  # params, EMA, optimizer, dynamics, algo, rng
  drop_timing = lambda r: {k: v for k, v in r.items() if k != 'steps_per_sec'}
  assert drop_timing(_train_records(straight)[4]) == drop_timing(_train_records(killed)[4])
  with open(os.path.join(straight, 'eval.json')) as f:
    eval_a = json.load(f)
  with open(os.path.join(killed, 'eval.json')) as f:
    eval_b = json.load(f)
  assert eval_a['final']['accuracy'] == eval_b['final']['accuracy']


def test_sigterm_saves_and_exits_zero_then_resumes(tmp_path):
  workdir = str(tmp_path / 'preempted')
  proc = helpers.driver(f'--workdir={workdir}', '--sigterm_after_step=2')
  assert 'Preempted: checkpoint saved at step 2' in proc.stdout
  assert common.read_checkpoint(workdir)[0] == 2
  proc = helpers.driver(f'--workdir={workdir}')
  assert 'RESULT False 4' in proc.stdout


def test_steps_between_logs_never_sync_with_the_host():
  run = helpers.parts(tiny.config())
  state = helpers.fresh_state(run)
  fns = helpers.step_fns(run)
  batches = helpers.batches(run)
  with jax.transfer_guard_device_to_host('disallow'):
    state, metrics = train.run_steps(fns, state, batches, run.config, 0, 3)
  batches.close()
  assert len(metrics) == 3 and isinstance(metrics[0]['loss'], jax.Array)
  summary = train.summarize_metrics(metrics)  # the one sync, at the log interval
  assert np.isfinite(summary['loss'])


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / 'nan')
  helpers.driver(f'--workdir={workdir}', '--set=num_train_steps=4')
  _, good, _ = common.read_checkpoint(workdir)
  config = tiny.config(steps=8)
  config.optim.lr = 1e38  # valid, but the update's norm overflows: a non-finite step
  with pytest.raises(train.NonFiniteError, match='first at step 4'):
    train.train_and_evaluate(config, workdir, allow_config_change=True)
  step, state, _ = common.read_checkpoint(workdir)
  assert step == 4
  helpers.assert_same_state(good, state)


def test_two_processes_over_loopback_equal_one_process(tmp_path):
  single = str(tmp_path / 'single')
  multi = str(tmp_path / 'multi')
  helpers.driver(f'--workdir={single}', '--devices=8')
  for p, out, err in helpers.two_processes(multi):
    assert p.returncode == 0, f'{out}\n{err[-4000:]}'
  _, state_single, _ = common.read_checkpoint(single)
  _, state_multi, _ = common.read_checkpoint(multi)
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
  helpers.driver(f'--workdir={straight}', '--devices=1', *sharded)  # pair_scope=global: any count
  proc = helpers.driver(
    f'--workdir={moved}', '--devices=8', *sharded, '--kill_after_checkpoint=4', check=False
  )
  assert proc.returncode == -9, proc.stderr[-2000:]
  for p, out, err in helpers.two_processes(moved, *sharded, devices=2):
    assert p.returncode == 0, f'{out}\n{err[-4000:]}'
    assert 'RESULT False 6' in out
  step_a, state_a, _ = common.read_checkpoint(straight)
  step_b, state_b, _ = common.read_checkpoint(moved)
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
