"""Where a run starts: a fresh state, or a checkpoint restored into this run's device layout.

`initial_state` gives the loop its first state (the newest readable checkpoint, else a fresh
one); `restore` reads one checkpoint, for the loop and for `cmix_jax.evaluate` alike. Dynamics
tables saved sharded over another device count are read whole and cut anew.
"""

import dataclasses
import logging

import jax
import numpy as np

from cmix_jax import checkpointing
from cmix_jax import dynamics
from cmix_jax import parallel
from cmix_jax import steps

# `run` below is a run_setup.Run (config, topo, info, model, tx, algorithm, managers, ...).


def _host_state(run, key):
  """The run's fresh host state from `key` (one device's zero dynamics shard when sharded)."""
  shards = run.topo.num_devices if run.sharded_field else 1
  return steps.create_train_state(
    run.config, run.model, run.tx, run.algorithm, run.info, key, dynamics_shards=shards
  )


def fresh_state(run):
  """A new state in the checkpoint layout (zero dynamics shards when sharded)."""
  state = _host_state(run, jax.random.key(run.config.seed))
  return parallel.host_state_to_checkpoint_layout(state, run.topo, run.sharded_field)


def abstract_state(run):
  """Shape/dtype/sharding skeleton of `fresh_state(run)`, traced without running or compiling
  the model's init (a resumed run needs only the skeleton)."""
  host = jax.eval_shape(lambda key: _host_state(run, key), jax.random.key(run.config.seed))
  state = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=run.topo.replicated), host
  )
  if run.sharded_field is None:
    return state
  stacked = jax.tree.map(  # [D, N/D, ...]: each device's shard, as `parallel.replicate` lays out
    lambda x: jax.ShapeDtypeStruct(
      (run.topo.num_devices, *x.shape), x.dtype, sharding=run.topo.stacked
    ),
    getattr(host, run.sharded_field),
  )
  return state.replace(**{run.sharded_field: stacked})


def initial_state(run):
  """(state in checkpoint layout, meta) from the newest readable checkpoint, or fresh."""
  if run.is_lead:  # a cut-off save of the selection checkpoint is kept, not overwritten
    checkpointing.move_aside_partial_saves(run.best_manager.directory)
  restored = restore(run, run.manager)
  if restored is None:
    return fresh_state(run), {'step': 0, 'history': [], 'best': {}}
  step, state, meta = restored
  logging.info('Resuming from step %d in %s', step, run.workdir)
  return state, meta


def restore(run, manager, step: int | None = None):
  """(step, state in checkpoint layout, meta) of `manager`'s checkpoint `step`, or of its newest
  readable one when `step` is None (None if there is none); meta is None for a given step.

  The state comes in this run's layout whatever device count saved it. Unreadable newest
  steps are moved aside.
  """
  abstract = abstract_state(run)
  adapt = saved_layout(run, manager)
  if step is None:
    restored = checkpointing.restore_latest(manager, abstract, adapt)
    if restored is None:
      return None
    step, state, meta = restored
  else:
    state, meta = checkpointing.restore_state(manager, step, adapt(step, abstract)), None
  return step, reshard_dynamics(run, state), meta


def saved_layout(run, manager):
  """`restore_latest`'s adapt: sharded dynamics tables as saved, whatever the device count
  (the identity for a run without sharded tables).

  A checkpoint of a sharded run holds [D_saved, ceil(N/D_saved), ...] tables; they are read
  whole (replicated) when D_saved differs from this run's D, and `reshard_dynamics` cuts
  them anew. Everything else is replicated in the checkpoint and restores on any count.
  """
  if run.sharded_field is None:
    return lambda step, abstract: abstract

  def adapt(step: int, abstract):
    shapes = checkpointing.saved_shapes(manager, step, run.sharded_field)
    field = getattr(abstract, run.sharded_field)
    if all(shapes[n] == x.shape for n, x in _fields(field).items()):
      return abstract
    saved = field.replace(
      **{
        n: jax.ShapeDtypeStruct(shapes[n], x.dtype, sharding=run.topo.replicated)
        for n, x in _fields(field).items()
      }
    )
    return abstract.replace(**{run.sharded_field: saved})

  return adapt


def reshard_dynamics(run, state):
  """A restored state with its dynamics shards cut for this run's device count (see above)."""
  if run.sharded_field is None:
    return state
  tables = getattr(state, run.sharded_field)
  saved_devices = tables.apm.shape[0]
  if saved_devices == run.topo.num_devices:
    return state
  host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tables)
  full = dynamics.unshard_state(host, run.info.num_labeled, run.info.num_unlabeled)
  resharded = dynamics.shard_state(full, run.topo.num_devices)
  logging.info(
    'Dynamics tables saved in %d shards, cut into %d for this run.',
    saved_devices,
    run.topo.num_devices,
  )
  return state.replace(**{run.sharded_field: parallel.put_stacked(resharded, run.topo)})


def _fields(node) -> dict:
  return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)}
