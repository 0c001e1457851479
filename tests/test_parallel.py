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
  return (
    {'w': state['w'] - 0.1 * grad, 'counts': counts},
    {'loss': jax.lax.pmean(loss(state['w']), parallel.AXIS)},
  )


def _run(backend, num_devices, steps=3):
  traces = []

  def counted_step(state, batch):
    traces.append(1)  # runs once per trace, i.e. once per compilation
    return _toy_step(state, batch)

  topo = parallel.make_topology(num_devices)
  rng = np.random.default_rng(0)
  state = parallel.replicate({'w': np.zeros(3, np.float32), 'counts': np.zeros(16, np.int32)}, topo)
  fn = parallel.parallelize(counted_step, topo, backend=backend)
  for _ in range(steps):
    x = rng.normal(size=(16, 3)).astype(np.float32)
    batch = {
      'x': x,
      'y': x @ np.array([1.0, -2.0, 3.0], np.float32),
      'idx': np.arange(16, dtype=np.int32),
    }
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
  np.testing.assert_allclose(
    parallel.first_replica_to_host(metrics)['loss'],
    parallel.first_replica_to_host(ref_metrics)['loss'],
    rtol=1e-5,
  )
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


# ---------------------------------------------------------------- multi-host start

SLURM = {
  'SLURM_JOB_ID': '77',
  'SLURM_STEP_NODELIST': 'node[1-2]',
  'SLURM_NTASKS': '2',
  'SLURM_PROCID': '1',
  'SLURM_LOCALID': '0',
}
OMPI = {
  'OMPI_MCA_orte_hnp_uri': '1531576320.0;tcp://10.96.0.1:34911',
  'OMPI_COMM_WORLD_SIZE': '4',
  'OMPI_COMM_WORLD_RANK': '0',
}
no_tpu_vm = lambda: 1  # what the metadata probe answers off a Cloud TPU VM


@pytest.mark.parametrize(
  'env,expected',
  [
    ({}, None),
    (SLURM, 'slurm'),
    (dict(SLURM, SLURM_NTASKS='1'), None),  # a one-task allocation is one process
    ({k: v for k, v in SLURM.items() if k != 'SLURM_STEP_NODELIST'}, None),  # salloc shell
    (OMPI, 'ompi'),
    (dict(OMPI, OMPI_COMM_WORLD_SIZE='1'), None),
    ({'TPU_WORKER_HOSTNAMES': 'host-0,host-1'}, 'tpu'),
    ({'TPU_WORKER_HOSTNAMES': 'host-0'}, None),
    ({'TPU_PROCESS_ADDRESSES': 'a:1,b:1,c:1,d:1'}, 'tpu'),
    ({'MEGASCALE_NUM_SLICES': '2'}, 'tpu'),
  ],
)
def test_detect_cluster_on_fake_environments(env, expected):
  assert parallel.detect_cluster(env, no_tpu_vm) == expected


def test_detect_cluster_asks_tpu_metadata_unless_told_not_to():
  assert parallel.detect_cluster({}, lambda: 4) == 'tpu'  # a 4-host TPU VM slice
  assert parallel.detect_cluster({'TPU_SKIP_MDS_QUERY': '1'}, lambda: 4) is None
  assert parallel.detect_cluster({}) is None  # this machine: no TPU VM, no network call


def _dist(**kwargs):
  from configs import default

  dist = default.get_config().distributed
  dist.update(kwargs)
  return dist


def test_start_distributed_modes_on_fake_environments():
  calls = []
  record = lambda *args: calls.append(args)
  # auto, nothing detected (a laptop): plain single process, initialize never called.
  assert 'single process' in parallel.start_distributed(_dist(), {}, record, no_tpu_vm)
  assert parallel.start_distributed(_dist(mode='off'), SLURM, record, no_tpu_vm).startswith(
    'single process'
  )
  assert not calls
  # auto on a cluster: JAX's own detection (no arguments).
  assert 'slurm' in parallel.start_distributed(_dist(), SLURM, record, no_tpu_vm)
  assert calls == [()]
  # explicit (and auto with an address): the given settings, CMIX_* env as fallback.
  calls.clear()
  parallel.start_distributed(
    _dist(mode='explicit', coordinator_address='10.0.0.1:99', num_processes=2, process_id=1),
    {},
    record,
    no_tpu_vm,
  )
  parallel.start_distributed(
    _dist(),
    {'CMIX_COORDINATOR_ADDRESS': 'h:1', 'CMIX_NUM_PROCESSES': '3', 'CMIX_PROCESS_ID': '2'},
    record,
    no_tpu_vm,
  )
  assert calls == [('10.0.0.1:99', 2, 1), ('h:1', 3, 2)]
  with pytest.raises(ValueError, match='coordinator_address'):
    parallel.start_distributed(_dist(mode='explicit'), SLURM, record, no_tpu_vm)
  with pytest.raises(ValueError, match="use one of \\('auto', 'explicit', 'off'\\)"):
    parallel.start_distributed(_dist(mode='mpi'), {}, record, no_tpu_vm)


def test_describe_names_processes_and_devices():
  text = parallel.describe(parallel.make_topology(8))
  assert text.startswith('process 0 of 1; 8 devices in the mesh (8 local, cpu')


@pytest.mark.parametrize(
  'setting,devices,expected',
  [(None, 1, False), (None, 2, True), (None, 8, True), (False, 8, False), (True, 1, True)],
)
def test_cross_replica_bn_defaults_to_sync_bn_on_more_than_one_device(setting, devices, expected):
  assert parallel.use_cross_replica_bn(setting, devices) is expected
