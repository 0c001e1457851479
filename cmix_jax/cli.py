"""Command-line exits: bad input and stopped runs print ONE message, crashes keep their traceback.

  cli.run(main)  # instead of absl's app.run(main)

Exit status 2: bad input (flags, config values, missing data set, unusable workdir or
bucket, a workdir another run holds), found before anything is trained. Exit status 1: a
run that stopped for a reason it can name (a checkpoint that cannot be saved or read, a
lost workdir lease, a non-finite loss, a full or read-only disk).
Any other exception is a bug and propagates with its traceback.
"""

import errno
import logging
import os
import sys
from typing import NoReturn
from collections.abc import Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

Errors = tuple[type, ...] | Callable[[], tuple[type, ...]]
BAD_INPUT_STATUS = 2
STOPPED_STATUS = 1
# OS errors of writing or reading the workdir/data that the user fixes (space, rights, paths).
_STORAGE_ERRNOS = frozenset(
  {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR}
)


def fail(message: str, status: int) -> NoReturn:
  """Prints `message` as one error (no traceback) and exits with `status`."""
  sys.stderr.write(f'error: {message}\n')
  sys.stderr.flush()
  sys.exit(status)


def _bad_input_errors() -> tuple[type, ...]:
  # Imported late: importing cmix_jax pulls in JAX, which must come after the flags are read.
  from cmix_jax import config_validation
  from cmix_jax import lease
  from cmix_jax import storage
  from cmix_jax.data import specs

  return (
    config_validation.ConfigError,
    specs.DataNotFoundError,
    storage.StorageError,
    lease.LeaseHeldError,
  )


def _stopped_errors() -> tuple[type, ...]:
  from cmix_jax import checkpointing
  from cmix_jax import lease

  return (
    checkpointing.CheckpointSaveError,
    checkpointing.CheckpointError,
    lease.LeaseLostError,
  )


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or override as one message and status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f'{e} (see --helpshort)', BAD_INPUT_STATUS)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # a --config.* override
    fail(
      f'bad --config override or config file: {type(e).__name__}: {e}; check the field '
      'names and values against the config file.',
      BAD_INPUT_STATUS,
    )


def guarded(
  main: Callable[[list[str]], None],
  argv: list[str],
  bad_input: Errors = (),
  stopped: Errors = (),
  workdir: Callable[[], str] | None = None,
) -> None:
  """Runs `main(argv)`, turning the known failures into one message and an exit status.

  `bad_input` / `stopped`: the caller's own exception types of status 2 / 1, or a function
  returning them (so heavy modules are imported only once the flags are parsed).
  `workdir`: gives the run's workdir, named in messages about failed writes.
  """
  if len(argv) > 1:
    fail(f'unexpected arguments {argv[1:]}: flags are written --name=value.', BAD_INPUT_STATUS)
  terminal = absl_logging.get_absl_handler().python_handler  # set up by app.run by now
  if not isinstance(terminal.formatter, OneLineBackgroundErrors):
    terminal.setFormatter(OneLineBackgroundErrors(terminal.formatter))
  bad_input = _bad_input_errors() + tuple(bad_input() if callable(bad_input) else bad_input)
  stopped = _stopped_errors() + tuple(stopped() if callable(stopped) else stopped)
  try:
    main(argv)
  except bad_input as e:
    fail(str(e), BAD_INPUT_STATUS)
  except stopped as e:
    fail(str(e), STOPPED_STATUS)
  except Exception as e:
    storage_errno = _storage_errno(e)
    if storage_errno is None:
      raise
    where = f' (workdir {workdir()})' if workdir is not None else ''
    fail(
      f'{_summary(e, os.strerror(storage_errno))}{where}; fix the path or its permissions, '
      'or free space, then rerun the same command (a workdir resumes from its newest '
      'checkpoint).',
      STOPPED_STATUS,
    )


def _storage_errno(error: BaseException) -> int | None:
  from cmix_jax import storage

  number = storage.os_error_of(error)
  return number if number in _STORAGE_ERRNOS else None


def _summary(error: BaseException, cause: str) -> str:
  """'<cause>: <file>' from the OSError in the chain, else the first line naming the cause."""
  seen, lines = error, []
  while seen is not None and len(lines) < 20:
    if isinstance(seen, OSError) and seen.filename:
      return f'{cause}: {seen.filename}'
    lines.append((str(seen).strip().splitlines() or [type(seen).__name__])[0][:300])
    seen = seen.__cause__ or seen.__context__
  return next((line for line in lines if cause in line), f'{cause}: {lines[0]}')


class OneLineBackgroundErrors(logging.Formatter):
  """Terminal formatting without the tracebacks of errors that background writers log
  (orbax's and clu's threads, asyncio's unretrieved futures): the main thread re-raises the
  error and the user gets one message for it. Other handlers (the run's log file) still
  format the full record."""

  def __init__(self, inner: logging.Formatter):
    super().__init__()
    self.inner = inner

  def format(self, record: logging.LogRecord) -> str:
    if record.levelno < logging.ERROR or not any(
      f'{os.sep}{package}{os.sep}' in record.pathname for package in _BACKGROUND_WRITERS
    ):
      return self.inner.format(record)
    saved = record.exc_info, record.exc_text
    record.exc_info, record.exc_text = None, None
    try:
      return self.inner.format(record)
    finally:
      record.exc_info, record.exc_text = saved


_BACKGROUND_WRITERS = ('orbax', 'clu', 'asyncio')


def _quiet_closed_loop_hook(default_hook):
  """sys.unraisablehook that drops 'Event loop is closed' raised in tensorstore's callbacks.

  When an orbax write fails, orbax closes its event loop while tensorstore still completes
  the write's other futures; each completion reports that error as unraisable (pages of
  tracebacks on a full disk). The write's real error is reported once, by the loop.
  """

  def hook(unraisable):
    if (
      isinstance(unraisable.exc_value, RuntimeError)
      and str(unraisable.exc_value) == 'Event loop is closed'
    ):
      return
    default_hook(unraisable)

  return hook


def run(
  main: Callable[[list[str]], None],
  bad_input: Errors = (),
  stopped: Errors = (),
  workdir: Callable[[], str] | None = None,
) -> None:
  """absl's app.run(main) with the exits described in the module docstring."""
  sys.unraisablehook = _quiet_closed_loop_hook(sys.unraisablehook)
  app.run(lambda argv: guarded(main, argv, bad_input, stopped, workdir), flags_parser=_parse_flags)
