"""What a person sees on the terminal: the run's plan, one progress bar, a closing summary.

Library INFO lines (orbax's per-save lines, TFDS) go to the run's log file instead; warnings
and errors still reach the terminal. `--alsologtostderr` (or `--verbosity=1`) brings the INFO
lines back.
"""

import contextlib
import logging
import logging.handlers
import os
import sys
import tempfile

from absl import logging as absl_logging

from cmix_jax import parallel

LOG_NAME = 'train.log'


def _is_local(path: str) -> bool:
  return '://' not in str(path)


def log_path_for(workdir: str) -> str:
  """Where a run's log file goes: in the workdir when local, else a local temp file."""
  if _is_local(workdir):
    return os.path.join(os.path.expanduser(workdir), LOG_NAME)
  name = ''.join(c if c.isalnum() else '_' for c in str(workdir))[-80:]
  return os.path.join(tempfile.gettempdir(), f'cmix_jax_{name}.log')


@contextlib.contextmanager
def routed_logs(workdir: str, to_terminal: bool):
  """INFO and above to the run's log file; the terminal keeps WARNING and above.

  Records are held in memory until `attach()` is called (after the config has been
  validated), so a refused config leaves no file behind. Yields a `LogRoute`.
  """
  route = LogRoute(log_path_for(workdir))
  root = logging.getLogger()
  absl_handler = absl_logging.get_absl_handler()
  old_root_level, old_absl_level = root.level, absl_handler.level
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  if not to_terminal:
    absl_handler.setLevel(logging.WARNING)
  root.addHandler(route.handler)
  try:
    yield route
  finally:
    root.removeHandler(route.handler)
    route.close()
    root.setLevel(old_root_level)
    absl_handler.setLevel(old_absl_level)


class _LogFile(logging.FileHandler):
  """The run's log file; a failed write (e.g. a full disk) is said once, then the file is left
  alone (the run's own error, if any, comes from the loop)."""

  failed = False

  def emit(self, record: logging.LogRecord) -> None:
    if not self.failed:
      super().emit(record)

  def handleError(self, record: logging.LogRecord) -> None:
    if not self.failed:
      self.failed = True
      sys.stderr.write(
        f'cmix_jax: cannot write {self.baseFilename} ({sys.exc_info()[1]}); '
        'the log file stops here.\n'
      )


class LogRoute:
  """A handler that buffers records until the log file may be written, then writes them there."""

  def __init__(self, path: str):
    self.path = path
    self.handler = logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1)
    self.handler.setLevel(logging.INFO)
    self._file = None

  def attach(self) -> None:
    """Starts writing the log file (buffered records first)."""
    if self._file is not None:
      return
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._file = _LogFile(self.path)
    self._file.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
    self.handler.setTarget(self._file)
    self.handler.flushLevel = logging.INFO  # from now on every record goes straight through
    self.handler.flush()

  def close(self) -> None:
    self.handler.setTarget(self._file)  # None: records kept in memory are dropped
    if self._file is None:
      self.handler.buffer.clear()
    self.handler.close()
    if self._file is not None:
      self._file.close()


def _say(run, text: str) -> None:
  if run.is_lead:
    print(text, flush=True)


def print_plan(run, start_step: int, log_path: str) -> None:
  """Data, split sizes, devices, steps and workdir, before the first step."""
  c, d = run.config, run.data
  cm = c.calibratemix
  method = c.algorithm + (
    f' + CalibrateMix (passes={cm.passes}, pair_scope={cm.pair_scope}, '
    f'from step {cm.warmup_steps + 1})'
    if cm.enabled
    else ''
  )
  ulb = c.data.batch_size * c.data.uratio if run.algorithm.uses_unlabeled else 0
  resume = f', resuming at step {start_step}' if start_step else ''
  shape = 'x'.join(map(str, run.info.image_shape))
  _say(
    run,
    '\n'.join(
      [
        f'cmix_jax: {method}',
        f'  data      {c.data.name}: {d.num_labeled} labeled, {len(d.val_idx)} validation, '
        f'{d.num_unlabeled} unlabeled, {len(d.test_labels)} test; {d.num_classes} classes of '
        f'{shape}',
        f'  devices   {parallel.describe(run.topo)}, {c.parallel_backend}; per '
        f'step {c.data.batch_size} labeled + {ulb} unlabeled images',
        f'  steps     {c.num_train_steps}{resume}; evaluate every {c.eval_every}, checkpoint every '
        f'{c.checkpoint_every}',
        f'  workdir   {run.workdir} (log: {log_path})',
      ]
    ),
  )


def print_summary(run, report: dict, log_path: str) -> None:
  """The selected checkpoint's metrics and where the outputs are."""
  _say(
    run,
    '\n'.join(
      [
        f'Done. {report["selection"]} checkpoint (step {report["step"]}): accuracy '
        f'{100 * report["accuracy"]:.2f} %, ECE {report["ece"]:.4f}, NLL {report["nll"]:.4f}, '
        f'Brier {report["brier"]:.4f}',
        f'  metrics   {os.path.join(run.workdir, "eval.json")} (and metrics.jsonl)',
        *(
          [
            f'  pictures  {run.workdir}: final_reliability.png, final_confidence.png, curves.png, '
            'data_map_*.png'
          ]
          if run.config.eval.plots
          else []
        ),
        *([f'  TensorBoard: tensorboard --logdir={run.workdir}'] if run.config.tensorboard else []),
        f'  log       {log_path}',
      ]
    ),
  )
