"""Orbax checkpoints of the whole train state, with fall-back to an older step."""

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """No readable checkpoint in a workdir that claims to hold one."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def create_manager(workdir: str, max_to_keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  """Manager writing atomically (temp dir + rename) and asynchronously into workdir/checkpoints."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'meta'))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         wait: bool = False) -> None:
  """Saves the (replicated, unstacked) state and JSON metadata at `step`."""
  manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
  if wait:
    manager.wait_until_finished()


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The state saved at `step`, restored into the layout of `abstract_state`."""
  return manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))['state']


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any):
  """(step, state, meta) of the newest readable checkpoint, or None if there is none.

  An unreadable newest checkpoint (e.g. a damaged disk) is skipped with a warning and
  the previous one is used; if none can be read, CheckpointError names the directory.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      if errors:
        logging.warning('Checkpoint(s) %s unreadable; resumed from step %d instead.',
                        [s for s, _ in errors], step)
      return step, restored['state'], restored['meta']
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Cannot read checkpoint at step %d: %s', step, e)
      errors.append((step, e))
  raise CheckpointError(
      f'No readable checkpoint in {manager.directory} (tried steps {steps}; last error: '
      f'{errors[-1][1]!r}). Move the workdir aside to start afresh.')


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of a state, for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
