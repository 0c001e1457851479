"""All data-parallel wiring: device mesh, replication, batch sharding, pmap / shard_map.

Step functions elsewhere are written as per-device code whose collectives name
the axis `AXIS`. This module is the only place that maps them over devices, so
`pmap`, `shard_map` and a one-device run share one layout: every array carries a
leading device axis [D, ...], sharded over the 1-D mesh axis 'batch'.
"""

import dataclasses
import functools
import os
import urllib.request
from typing import Any
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = 'batch'
BACKENDS = ('pmap', 'shard_map')


@dataclasses.dataclass(frozen=True)
class Topology:
  """The devices a run uses: a 1-D mesh over all processes' devices, axis 'batch'."""

  mesh: Mesh

  @property
  def devices(self) -> list:
    return list(self.mesh.devices.flat)

  @property
  def local_devices(self) -> list:
    return [d for d in self.devices if d.process_index == jax.process_index()]

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_local_devices(self) -> int:
    return len(self.local_devices)

  @property
  def stacked(self) -> NamedSharding:
    """Sharding of a [D, ...] array: row i lives on device i."""
    return NamedSharding(self.mesh, P(AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())


def make_topology(num_devices: int = -1) -> Topology:
  """Mesh over every device of every process, or the first `num_devices` (one process)."""
  devices = jax.devices()
  if num_devices not in (-1, None):
    if jax.process_count() > 1 and num_devices != len(devices):
      raise ValueError(
        f'num_devices={num_devices} is only supported in a single process; '
        f'multi-host runs use all {len(devices)} devices (set --config.num_devices=-1).'
      )
    if not 1 <= num_devices <= len(devices):
      raise ValueError(
        f'num_devices={num_devices} but {len(devices)} devices exist; '
        'set --config.num_devices to -1 or a number in range.'
      )
    devices = devices[:num_devices]
  return Topology(Mesh(np.asarray(devices), (AXIS,)))


def _stack_local(x, topo: Topology):
  """Host value -> global [D, ...] array holding one copy per device."""
  x = np.asarray(x)
  local = np.broadcast_to(x[None], (topo.num_local_devices,) + x.shape)
  return jax.make_array_from_process_local_data(topo.stacked, local, (topo.num_devices,) + x.shape)


def replicate(tree: Any, topo: Topology) -> Any:
  """Copies a host/replicated pytree onto every device as stacked [D, ...] arrays."""
  return jax.tree.map(lambda x: _stack_local(jax.device_get(x), topo), tree)


def put_stacked(tree: Any, topo: Topology) -> Any:
  """Host [D, ...] arrays that every process holds whole -> global arrays, row i on device i."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, topo.stacked, lambda index: x[index])

  return jax.tree.map(put, tree)


def shard_batch(batch: dict, topo: Topology) -> dict:
  """This process's [L, b, ...] numpy batch -> global [D, b, ...] arrays."""

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(
      topo.stacked, x, (topo.num_devices,) + x.shape[1:]
    )

  return jax.tree.map(put, batch)


@functools.cache
def _first_replica_fn(topo: Topology):
  return jax.jit(lambda t: jax.tree.map(lambda x: x[0], t), out_shardings=topo.replicated)


def unreplicate(tree: Any, topo: Topology) -> Any:
  """Stacked [D, ...] pytree -> device 0's copy, replicated (checkpointable on any host)."""
  return _first_replica_fn(topo)(tree)


def first_replica_to_host(tree: Any) -> Any:
  """Stacked pytree -> numpy copy of the first local replica (metrics, logging)."""
  return jax.tree.map(
    lambda x: (
      np.asarray(x.addressable_shards[0].data)[0] if isinstance(x, jax.Array) else np.asarray(x)[0]
    ),
    tree,
  )


def to_replicated(tree: Any, topo: Topology) -> Any:
  """Host pytree -> global arrays replicated over the mesh (the checkpoint layout)."""

  def put(x):
    x = np.asarray(jax.device_get(x))
    return jax.make_array_from_process_local_data(topo.replicated, x, x.shape)

  return jax.tree.map(put, tree)


def stack_state(state: Any, topo: Topology, sharded_field: str | None = None) -> Any:
  """Checkpoint layout -> the steps' stacked [D, ...] layout.

  In the checkpoint layout everything is replicated except `sharded_field` (a field of the
  state dataclass), which is stacked [D, N/D, ...] (each device's own slice) in both layouts.
  """
  if sharded_field is None:
    return replicate(state, topo)
  keep = getattr(state, sharded_field)
  return replicate(state.replace(**{sharded_field: None}), topo).replace(**{sharded_field: keep})


def unstack_state(state: Any, topo: Topology, sharded_field: str | None = None) -> Any:
  """The steps' stacked layout -> checkpoint layout (see `stack_state`)."""
  if sharded_field is None:
    return unreplicate(state, topo)
  keep = getattr(state, sharded_field)
  return unreplicate(state.replace(**{sharded_field: None}), topo).replace(**{sharded_field: keep})


def host_state_to_checkpoint_layout(
  state: Any, topo: Topology, sharded_field: str | None = None
) -> Any:
  """A fresh host state -> checkpoint layout (a sharded field's [D, ...] shards stacked)."""
  if sharded_field is None:
    return to_replicated(state, topo)
  keep = replicate(getattr(state, sharded_field), topo)
  return to_replicated(state.replace(**{sharded_field: None}), topo).replace(
    **{sharded_field: keep}
  )


def gather_stacked_to_host(tree: Any) -> Any:
  """Stacked [D, ...] arrays (rows on every process) -> numpy [D, ...] on every host."""
  return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)


def local_rows(tree: dict) -> dict:
  """This process's rows of stacked outputs as numpy [L, ...]."""
  out = {}
  for key, x in tree.items():
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    out[key] = np.concatenate([np.asarray(s.data) for s in shards])
  return out


def sum_over_processes(value: np.ndarray) -> np.ndarray:
  """Elementwise sum of a host array over all processes (identity in one process)."""
  if jax.process_count() == 1:
    return np.asarray(value)
  return np.asarray(multihost_utils.process_allgather(value)).sum(0)


def raise_on_every_process(error: BaseException | None, elsewhere: Callable[[], BaseException]):
  """Raises on every process if any process met an error: its own `error`, else `elsewhere()`.

  For decisions one process takes (process 0 and the workdir lease) that all must share, so no
  process goes on to wait for a peer that has stopped. Returns when no process has an error.
  """
  if sum_over_processes(np.array([int(error is not None)], np.int32))[0]:
    raise error or elsewhere()


def concat_over_processes(values: np.ndarray) -> np.ndarray:
  """Concatenation of every process's 1-D array of any length, in process order."""
  if jax.process_count() == 1:
    return np.asarray(values)
  lengths = np.ravel(multihost_utils.process_allgather(np.array([len(values)])))
  padded = np.pad(values, (0, int(lengths.max()) - len(values)))
  gathered = multihost_utils.process_allgather(padded)
  return np.concatenate([row[:n] for row, n in zip(gathered, lengths)])


def to_global(tree: Any, topo: Topology) -> Any:
  """Multi-host pmap outputs (this process's [L, ...] rows) -> global stacked [D, ...] arrays."""

  def glue(x):
    shards = sorted(x.addressable_shards, key=lambda s: topo.devices.index(s.device))
    rows = [s.data.reshape((1,) + x.shape[1:]) for s in shards]  # one [1, ...] per device
    return jax.make_array_from_single_device_arrays(
      (topo.num_devices,) + x.shape[1:], topo.stacked, rows
    )

  return jax.tree.map(glue, tree)


def _squeeze_apply(fn: Callable, num_args: int):
  """Per-device fn on [1, ...] blocks: drop the device axis, call, put it back."""

  def wrapped(*args):
    squeezed = jax.tree.map(lambda x: x[0], args[:num_args])
    out = fn(*squeezed)
    return jax.tree.map(lambda x: jnp.expand_dims(x, 0), out)

  return wrapped


def parallelize(
  fn: Callable,
  topo: Topology,
  *,
  backend: str = 'pmap',
  num_args: int = 2,
  donate_first: bool = True,
) -> Callable:
  """Maps per-device `fn(*args)` over the mesh; all args and outputs are stacked [D, ...]."""
  donate = (0,) if donate_first else ()
  if backend == 'pmap':
    if jax.process_count() == 1:
      return jax.pmap(fn, axis_name=AXIS, devices=topo.local_devices, donate_argnums=donate)
    pmapped = jax.pmap(fn, axis_name=AXIS, donate_argnums=donate)
    return lambda *args: to_global(pmapped(*args), topo)
  if backend == 'shard_map':
    mapped = jax.shard_map(
      _squeeze_apply(fn, num_args),
      mesh=topo.mesh,
      in_specs=(P(AXIS),) * num_args,
      out_specs=P(AXIS),
      check_vma=False,
    )
    return jax.jit(mapped, donate_argnums=donate)
  raise ValueError(f'unknown parallel backend {backend!r}; use one of {BACKENDS}.')


def set_xla_flags(flags: str) -> list[str]:
  """Appends each `--name=value` in `flags` to XLA_FLAGS unless XLA_FLAGS already names it.

  XLA reads XLA_FLAGS when the first backend starts, so call this before any computation; the
  flags the user set stay as they are. Returns the flags added.
  """
  current = os.environ.get('XLA_FLAGS', '')
  present = {f.split('=', 1)[0] for f in current.split()}
  added = [f for f in flags.split() if f.split('=', 1)[0] not in present]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join([current, *added]).strip()
  return added


DISTRIBUTED_MODES = ('auto', 'explicit', 'off')
CPU_COLLECTIVES = ('', 'gloo', 'mpi')  # distributed.cpu_collectives; '' = JAX's own
_SLURM_VARS = (
  'SLURM_JOB_ID',
  'SLURM_STEP_NODELIST',
  'SLURM_NTASKS',
  'SLURM_PROCID',
  'SLURM_LOCALID',
)  # what JAX's SLURM detection reads
_TPU_DEVICE_FILES = ('/dev/accel0', '/dev/vfio/0')  # present on Cloud TPU VMs


def _count(env: Mapping[str, str], name: str) -> int:
  """Integer env variable, 1 when absent or unreadable."""
  try:
    return int(env.get(name, '1'))
  except ValueError:
    return 1


def _gce_tpu_worker_count(timeout_s: float = 2.0) -> int:
  """Hosts of this Cloud TPU VM's slice, from the metadata server; 1 when not on one."""
  if not any(os.path.exists(f) for f in _TPU_DEVICE_FILES):
    return 1
  url = (
    'http://'
    + os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
    + '/computeMetadata/v1/instance/attributes/worker-network-endpoints'
  )
  request = urllib.request.Request(url, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
      return len(response.read().decode().split(','))
  except (OSError, ValueError):
    return 1


def detect_cluster(
  env: Mapping[str, str] | None = None, tpu_worker_count: Callable[[], int] = _gce_tpu_worker_count
) -> str | None:
  """'slurm', 'ompi' or 'tpu' when JAX can join a cluster of more than one process, else None.

  SLURM: JAX's variables present and SLURM_NTASKS > 1. Open MPI: launched by mpirun
  (OMPI_MCA_orte_hnp_uri) with OMPI_COMM_WORLD_SIZE > 1. Cloud TPU: more than one host
  in TPU_PROCESS_ADDRESSES / TPU_WORKER_HOSTNAMES (GKE), more than one slice
  (MEGASCALE_NUM_SLICES), or a TPU VM whose metadata lists more than one worker.
  """
  env = os.environ if env is None else env
  if all(v in env for v in _SLURM_VARS) and _count(env, 'SLURM_NTASKS') > 1:
    return 'slurm'
  if 'OMPI_MCA_orte_hnp_uri' in env and _count(env, 'OMPI_COMM_WORLD_SIZE') > 1:
    return 'ompi'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  if len([h for h in hosts.split(',') if h.strip()]) > 1 or _count(env, 'MEGASCALE_NUM_SLICES') > 1:
    return 'tpu'
  if 'TPU_SKIP_MDS_QUERY' not in env and tpu_worker_count() > 1:
    return 'tpu'
  return None


def _explicit_settings(dist, env: Mapping[str, str]) -> tuple[str, int, int]:
  """(coordinator address, process count, process id): config first, CMIX_* env second."""
  address = dist.coordinator_address or env.get('CMIX_COORDINATOR_ADDRESS', '')
  num = dist.num_processes or _count(env, 'CMIX_NUM_PROCESSES')
  pid = dist.process_id
  pid = pid if pid >= 0 else int(env.get('CMIX_PROCESS_ID', '0'))
  return address, int(num), int(pid)


def start_distributed(
  dist,
  env: Mapping[str, str] | None = None,
  initialize: Callable[..., None] = jax.distributed.initialize,
  tpu_worker_count: Callable[[], int] = _gce_tpu_worker_count,
) -> str:
  """Joins a multi-process run as `dist.mode` says; returns what it did, in words.

  auto: the explicit settings when a coordinator address is given (config or
  CMIX_COORDINATOR_ADDRESS), else `jax.distributed.initialize()` when `detect_cluster`
  finds a cluster, else a plain single-process run. explicit: coordinator_address /
  num_processes / process_id (CMIX_* env as fallback). off: never initializes.
  Must run before the first computation starts the backend.
  """
  env = os.environ if env is None else env
  mode = dist.mode
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(
      f'distributed.mode={mode!r}: use one of {DISTRIBUTED_MODES} (--config.distributed.mode).'
    )
  if dist.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  if mode == 'off':
    return 'single process (distributed.mode=off)'
  address, num, pid = _explicit_settings(dist, env)
  if mode == 'explicit' and not address:
    raise ValueError(
      'distributed.mode=explicit needs --config.distributed.coordinator_address '
      '(or CMIX_COORDINATOR_ADDRESS), e.g. 10.0.0.1:1234.'
    )
  if jax.distributed.is_initialized():
    return 'already joined'
  if address:
    initialize(address, num, pid)
    return f'joined {address} as process {pid} of {num}'
  cluster = detect_cluster(env, tpu_worker_count)
  if cluster is None:
    return 'single process (no cluster detected)'
  initialize()
  return f'joined the {cluster} cluster'


def describe(topo: Topology) -> str:
  """One line for the run's plan: process index/count and global/local device counts."""
  kind = topo.devices[0].device_kind if topo.devices else '?'
  return (
    f'process {jax.process_index()} of {jax.process_count()}; '
    f'{topo.num_devices} devices in the mesh ({topo.num_local_devices} local, '
    f'{jax.default_backend()} {kind})'
  )


def use_cross_replica_bn(setting: bool | None, num_devices: int) -> bool:
  """BN statistics over the global batch: explicit True/False wins, None = more than 1 device.

  As USB's multi-GPU runs (SyncBN), so the BN a model sees does not depend on the device count.
  """
  return num_devices > 1 if setting is None else bool(setting)
