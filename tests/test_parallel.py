"""parallel.py: layout round trips and pmap / shard_map / one-device equivalence."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import parallel


def _toy_step(state, batch):
  """Per-device SGD on a linear model with a global-mean gradient and a global scatter."""
  def loss(w):
    return jnp.mean((batch['x'] @ w - batch['y']) ** 2)
  grad = jax.lax.pmean(jax.grad(loss)(state['w']), parallel.AXIS)
  idx = jax.lax.all_gather(batch['idx'], parallel.AXIS, tiled=True)
  counts = state['counts'].at[idx].add(1)
  return ({'w': state['w'] - 0.1 * grad, 'counts': counts},
          {'loss': jax.lax.pmean(loss(state['w']), parallel.AXIS)})


def _run(backend, num_devices, steps=3):
  traces = []

  def counted_step(state, batch):
    traces.append(1)  # runs once per trace, i.e. once per compilation
    return _toy_step(state, batch)

  topo = parallel.make_topology(num_devices)
  rng = np.random.default_rng(0)
  state = parallel.replicate({'w': np.zeros(3, np.float32),
                              'counts': np.zeros(16, np.int32)}, topo)
  fn = parallel.parallelize(counted_step, topo, backend=backend)
  for _ in range(steps):
    x = rng.normal(size=(16, 3)).astype(np.float32)
    batch = {'x': x, 'y': x @ np.array([1., -2., 3.], np.float32),
             'idx': np.arange(16, dtype=np.int32)}
    local = jax.tree.map(lambda a: a.reshape((num_devices, -1) + a.shape[1:]), batch)
    state, metrics = fn(state, parallel.shard_batch(local, topo))
  return state, metrics, len(traces)


@pytest.mark.parametrize('backend', parallel.BACKENDS)
def test_backends_match_one_device(backend):
  ref_state, ref_metrics, _ = _run('pmap', 1)
  state, metrics, num_traces = _run(backend, 8)
  host = jax.device_get(state)
  for replica in range(8):
    np.testing.assert_allclose(host['w'][replica], np.asarray(ref_state['w'])[0], rtol=1e-5)
    np.testing.assert_array_equal(host['counts'][replica], np.full(16, 3))
  np.testing.assert_allclose(parallel.first_replica_to_host(metrics)['loss'],
                             parallel.first_replica_to_host(ref_metrics)['loss'], rtol=1e-5)
  assert num_traces == 1  # compiled once for all steps


def test_replicate_unreplicate_round_trip():
  topo = parallel.make_topology(8)
  tree = {'a': np.arange(6, dtype=np.float32).reshape(2, 3), 'b': np.int32(7)}
  stacked = parallel.replicate(tree, topo)
  assert stacked['a'].shape == (8, 2, 3)
  assert stacked['a'].sharding.spec == parallel.jax.sharding.PartitionSpec(parallel.AXIS)
  back = parallel.unreplicate(stacked, topo)
  assert back['a'].shape == (2, 3) and back['a'].sharding.is_fully_replicated
  np.testing.assert_array_equal(np.asarray(back['a']), tree['a'])
  assert int(back['b']) == 7


def test_bad_device_count_and_backend():
  with pytest.raises(ValueError, match='num_devices'):
    parallel.make_topology(99)
  with pytest.raises(ValueError, match='pmap'):
    parallel.parallelize(_toy_step, parallel.make_topology(1), backend='vmap')


def test_set_xla_flags_appends_only_flags_not_already_named(monkeypatch):
  """User-set XLA_FLAGS win; new flags are appended once, in order."""
  monkeypatch.setenv('XLA_FLAGS', '--a=1 --b=2')
  assert parallel.set_xla_flags('--b=3 --c=4') == ['--c=4']
  assert os.environ['XLA_FLAGS'] == '--a=1 --b=2 --c=4'
  assert parallel.set_xla_flags('--c=5') == []
  monkeypatch.delenv('XLA_FLAGS')
  assert parallel.set_xla_flags('--d=1 --e') == ['--d=1', '--e']
  assert os.environ['XLA_FLAGS'] == '--d=1 --e'
  assert parallel.set_xla_flags('') == [] and os.environ['XLA_FLAGS'] == '--d=1 --e'
