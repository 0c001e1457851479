"""steps.py: optimizer, EMA, the jitted step, and its equivalence across device counts."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cmix_jax import dynamics
from cmix_jax import parallel
from cmix_jax import steps
from configs import tiny
from tests import helpers


def test_learning_rate_schedule_is_usb_cosine():
  optim = tiny.config().optim
  schedule = steps.learning_rate_schedule(optim, 1000)
  assert float(schedule(0)) == pytest.approx(0.03)
  assert float(schedule(500)) == pytest.approx(0.03 * np.cos(7 * np.pi * 0.5 / 16), rel=1e-6)
  assert float(schedule(1000)) == pytest.approx(
    0.005853, abs=1e-6
  )  # the final lr of docs/method.md §2


def test_optimizer_is_nesterov_sgd_with_coupled_decay_on_kernels_only():
  optim = tiny.config().optim
  tx = steps.create_optimizer(optim, num_steps=10**9)  # lr stays ~0.03 for two steps
  params = {'kernel': jnp.array([[1.0, -2.0]]), 'bias': jnp.array([0.5])}
  grads = {'kernel': jnp.array([[0.1, 0.2]]), 'bias': jnp.array([0.3])}
  state = tx.init(params)
  expected = {k: np.asarray(v, np.float64) for k, v in params.items()}
  buf = {k: np.zeros_like(v) for k, v in expected.items()}
  for _ in range(2):  # torch.optim.SGD(nesterov=True, weight_decay=wd) by hand
    updates, state = tx.update(grads, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    for k in expected:
      g = np.asarray(grads[k], np.float64) + (5e-4 * expected[k] if k == 'kernel' else 0.0)
      buf[k] = 0.9 * buf[k] + g
      expected[k] = expected[k] - 0.03 * (g + 0.9 * buf[k])
  for k in expected:
    np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-5)


def _steps(config, num_devices, num_steps, backend='pmap', monkeypatch=None):
  """helpers.run_on's (stacked state, metrics) and how many times steps.train_step was traced
  (counted when `monkeypatch` is given)."""
  traces = []
  if monkeypatch is not None:
    step = steps.train_step

    def counted(*args, **kwargs):
      traces.append(1)
      return step(*args, **kwargs)

    monkeypatch.setattr(steps, 'train_step', counted)  # make_step_fns reads it when called
  state, metrics = helpers.run_on(config, num_devices, num_steps, backend)
  if monkeypatch is not None:
    monkeypatch.undo()
  return state, metrics, len(traces)


@pytest.mark.parametrize('backend', ['pmap', 'shard_map'])
def test_fixmatch_eight_devices_equal_one_device(backend, monkeypatch):
  config = tiny.config(model='cnn_small_nobn')
  one, _, _ = _steps(config, 1, 3)
  eight, metrics, traces = _steps(config, 8, 3, backend, monkeypatch)
  one_host = parallel.first_replica_to_host(one)
  all_host = jax.device_get(eight)
  for replica in range(8):
    replica_state = jax.tree.map(lambda x: x[replica], all_host)
    helpers.assert_trees_close(replica_state.params, one_host.params)
    helpers.assert_trees_close(replica_state.dynamics, one_host.dynamics)
  assert traces == 1  # the step compiled once for all steps
  assert int(all_host.step[0]) == 3


def test_cross_replica_bn_eight_devices_equal_one_device():
  config = tiny.config(model='cnn_small')
  config.model.cross_replica_bn = True
  one, _, _ = _steps(config, 1, 2)
  eight, _, _ = _steps(config, 8, 2)
  helpers.assert_trees_close(
    parallel.first_replica_to_host(eight).params,
    parallel.first_replica_to_host(one).params,
    rtol=1e-4,
    atol=1e-5,
  )
  helpers.assert_trees_close(
    parallel.first_replica_to_host(eight).batch_stats,
    parallel.first_replica_to_host(one).batch_stats,
    rtol=1e-4,
    atol=1e-5,
  )


def test_ema_follows_its_formula():
  config = tiny.config(model='cnn_small_nobn')
  config.optim.ema_decay = 0.9
  config.num_devices = 1
  state0 = parallel.first_replica_to_host(helpers.fresh_state(helpers.parts(config)))
  state1, _, _ = _steps(config, 1, 1)
  state1 = parallel.first_replica_to_host(state1)
  expected = jax.tree.map(
    lambda e, p: 0.9 * np.asarray(e) + 0.1 * p, jax.device_get(state0.ema_params), state1.params
  )
  helpers.assert_trees_close(state1.ema_params, expected, rtol=1e-6, atol=1e-7)


def test_skipped_nonfinite_step_keeps_the_schedule_in_step():
  config = tiny.config(model='cnn_small_nobn')
  config.optim.lr = 1e38  # the update's norm overflows: every step is skipped
  config.max_nonfinite_steps = 10
  config.num_devices = 1
  state0 = parallel.first_replica_to_host(helpers.fresh_state(helpers.parts(config)))
  state, metrics, _ = _steps(config, 1, 2)
  state = parallel.first_replica_to_host(state)
  assert int(state.step) == 2 and int(state.nonfinite_steps) == 2
  helpers.assert_trees_close(
    state.params, jax.device_get(state0.params), rtol=0, atol=0
  )  # reverted
  assert int(optax.tree_utils.tree_get(state.opt_state, 'count')) == 2  # was 0 before the fix
  lr = steps.learning_rate_schedule(config.optim, config.num_train_steps)
  assert float(parallel.first_replica_to_host(metrics[1])['lr']) == pytest.approx(float(lr(1)))


@pytest.mark.parametrize('passes', [1, 2])
def test_calibratemix_step_runs_and_keeps_tables_identical(passes, monkeypatch):
  config = tiny.config(model='cnn_small_nobn', calibratemix=True)
  config.calibratemix.passes = passes
  config.calibratemix.warmup_steps = 1
  state, metrics, traces = _steps(config, 8, 3, monkeypatch=monkeypatch)
  host = jax.device_get(state)
  for replica in range(1, 8):
    helpers.assert_trees_close(
      jax.tree.map(lambda x: x[replica], host.dynamics),
      jax.tree.map(lambda x: x[0], host.dynamics),
      rtol=0,
      atol=0,
    )
  last = parallel.first_replica_to_host(metrics[-1])
  assert np.isfinite(last['loss']) and 'mixup_loss' in last
  assert 0.0 <= last['mix_lam1'] <= 1.0
  assert traces == 2  # one compile for the warm-up step, one for the mixup step
  # APM: one update per unlabeled sample (32 a step, none seen twice in 3 steps) of each step
  # after apm_start_after: step 2 for the two-pass step (after warm-up), steps 0..2 fused.
  counts = np.asarray(host.dynamics.apm_count[0])
  assert counts.max() == 1 and counts.sum() == 32 * (3 if passes == 1 else 1)


def test_sharded_dynamics_equal_replicated_with_one_eighth_of_the_memory():
  config = tiny.config(model='cnn_small_nobn', calibratemix=True)
  config.calibratemix.warmup_steps = 1
  replicated, _, _ = _steps(config, 8, 3)
  config.dynamics_sharded = True
  sharded, _, _ = _steps(config, 8, 3)
  reference = parallel.first_replica_to_host(replicated.dynamics)
  num_lb, num_ulb = reference.aum_sum.shape[0], reference.apm.shape[0]
  full = dynamics.unshard_state(jax.device_get(sharded.dynamics), num_lb, num_ulb)
  helpers.assert_trees_close(full, reference, rtol=1e-6, atol=1e-7)
  assert reference.apm_count.max() >= 1  # the comparison covers real APM updates
  per_device = sharded.dynamics.apm.addressable_shards[0].data.nbytes
  assert per_device * 8 == replicated.dynamics.apm.addressable_shards[0].data.nbytes
