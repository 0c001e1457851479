"""Orbax checkpoints of the whole train state, in workdir/checkpoints (local or gs://).

Save failures surface as one CheckpointSaveError; damaged or interrupted checkpoints are
moved aside (never deleted) so a rerun resumes from the newest good one.
"""

import logging
from collections.abc import Callable
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from cmix_jax import storage


class CheckpointError(RuntimeError):
  """No readable checkpoint in a workdir that claims to hold one."""


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (no space, no permission, bucket error)."""


def checkpoint_dir(workdir: str) -> epath.Path:
  """workdir/checkpoints as an epath.Path (local paths made absolute, gs:// kept as is)."""
  return storage.as_path(workdir) / 'checkpoints'


def create_manager(
  workdir: str, max_to_keep: int, async_save: bool = True
) -> ocp.CheckpointManager:
  """Manager writing atomically (temp dir + rename) and asynchronously into workdir/checkpoints."""
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(
    checkpoint_dir(workdir), options=options, item_names=('state', 'meta')
  )


# ----------------------------------------------------------------------------
# Saving: failures of the asynchronous writes surface as one CheckpointSaveError.


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, wait: bool = False
) -> None:
  """Saves the (replicated, unstacked) state and JSON metadata at `step` (asynchronously).

  A failure of an earlier asynchronous save, or of this one, raises CheckpointSaveError
  naming the directory and the cause; finished checkpoints stay as they are.
  """
  wait_until_saved(manager)
  try:
    manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )
  except Exception as e:
    raise CheckpointSaveError(save_error_message(manager, step, e)) from e
  if wait:
    wait_until_saved(manager)


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
  """Blocks until the asynchronous saves are written; a failed one raises CheckpointSaveError."""
  pending = set(manager.all_steps())
  try:
    manager.wait_until_finished()
  except Exception as e:
    lost = pending - set(manager.all_steps())  # orbax forgets the step it could not write
    raise CheckpointSaveError(save_error_message(manager, max(lost) if lost else None, e)) from e


def save_error_message(
  manager: ocp.CheckpointManager, step: int | None, error: BaseException
) -> str:
  """One message: where, which step, why, what is kept, and what to do."""
  which = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
  kept = manager.all_steps()
  newest = (
    f'the newest finished one is step {max(kept)}'
    if kept
    else 'no finished checkpoint is there yet'
  )
  return (
    f'Cannot save {which} in {manager.directory}: {storage.failure_cause(error)}. '
    f'Finished checkpoints are left intact ({newest}); free space or fix access to '
    'that directory, then rerun the same command to resume.'
  )


# ----------------------------------------------------------------------------
# Restoring: an unreadable newest checkpoint and interrupted saves are moved aside.

UNREADABLE_SUFFIX = '.unreadable'  # <step>.unreadable: a checkpoint that could not be read
PARTIAL_SUFFIX = '.partial'  # <step>.partial: an interrupted save (orbax's tmp directory)
_TMP_MARK = '.orbax-checkpoint-tmp'  # orbax writes <step>.orbax-checkpoint-tmp, then renames


def move_aside(path: epath.Path, name: str) -> epath.Path:
  """Renames `path` to `name` in its directory (+.1, .2, ... if taken): nothing is deleted."""
  target = path.parent / name
  n = 0
  while target.exists():
    n += 1
    target = path.parent / f'{name}.{n}'
  path.rename(target)
  return target


def move_aside_partial_saves(directory: epath.PathLike) -> list[epath.Path]:
  """Moves every leftover `*.orbax-checkpoint-tmp*` entry of `directory` to <step>.partial.

  Such a directory is a save that was cut off (killed process, full disk); orbax would
  silently overwrite it when the step is saved again.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  moved = []
  for entry in sorted(directory.iterdir()):
    if _TMP_MARK in entry.name:
      target = move_aside(entry, entry.name.split(_TMP_MARK)[0] + PARTIAL_SUFFIX)
      logging.warning('Moved an interrupted checkpoint save aside: %s -> %s', entry, target)
      moved.append(target)
  return moved


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
  """The state saved at `step`, restored into the layout of `abstract_state`."""
  return manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
  )['state']


def saved_shapes(manager: ocp.CheckpointManager, step: int, field: str) -> dict[str, tuple]:
  """{array name: shape} of one state field as saved at `step` (read from metadata only)."""
  path = epath.Path(manager.directory) / str(step) / 'state'
  tree = ocp.StandardCheckpointHandler().metadata(path).tree
  return {name: tuple(leaf.shape) for name, leaf in tree[field].items()}


def restore_latest(
  manager: ocp.CheckpointManager,
  abstract_state: Any,
  adapt: Callable[[int, Any], Any] | None = None,
):
  """(step, state, meta) of the newest readable checkpoint, or None if there is none.

  Interrupted saves and checkpoints newer than the newest readable one are moved aside
  (renamed, never deleted) and logged once with the reason, so the run trains on and saves
  those steps afresh. If none can be read, nothing is moved and CheckpointError names the
  directory. `adapt(step, abstract_state)`, if given, returns the skeleton that step was
  saved in (e.g. dynamics shards of another device count).
  """
  directory = epath.Path(manager.directory)
  if _is_lead():
    move_aside_partial_saves(directory)
  _sync_and_reload(manager, 'cmix_jax_partial_saves_moved')
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return None
  errors = []
  for step in steps:
    try:
      abstract = adapt(step, abstract_state) if adapt is not None else abstract_state
      restored = manager.restore(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
        ),
      )
    except Exception as e:
      errors.append((step, e))
      continue
    if errors:
      _move_aside_unreadable(manager, errors, step)
    return step, restored['state'], restored['meta']
  raise CheckpointError(
    f'No readable checkpoint in {directory} (tried steps {steps}; last error: '
    f'{storage.failure_cause(errors[-1][1])}). Move the workdir aside to start afresh.'
  )


def _move_aside_unreadable(manager, errors: list, good_step: int) -> None:
  """Renames the unreadable steps newer than `good_step`, logging each one's reason once."""
  directory = epath.Path(manager.directory)
  for step, error in errors:
    if _is_lead():
      target = move_aside(directory / str(step), f'{step}{UNREADABLE_SUFFIX}')
      logging.warning(
        'Checkpoint of step %d is unreadable (%s): moved it to %s; resuming from step %d.',
        step,
        storage.failure_cause(error),
        target,
        good_step,
      )
  _sync_and_reload(manager, 'cmix_jax_unreadable_moved')


def _is_lead() -> bool:
  return jax.process_index() == 0


def _sync_and_reload(manager: ocp.CheckpointManager, name: str) -> None:
  """All processes wait for the lead's renames, then re-list the steps."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
  manager.reload()


def abstract_like(state: Any) -> Any:
  """Shape/dtype/sharding skeleton of a state, for restoring into the same layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
