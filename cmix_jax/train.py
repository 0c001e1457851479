"""Training and evaluation for CalibrateMix: `train_and_evaluate` and the host loop.

The loop runs the parallel train steps between boundaries (log, eval, checkpoint, end),
where it syncs with the host once; `periodic` says which actions a boundary takes.
Which step runs when is `step_kind`; the parallel steps of a run's parts come from
`steps.make_step_fns`, its batches from `pipeline.train_batches` (both shared with the
benchmarks and the tests). Run assembly lives in `run_setup`, the first state in `resume`,
evaluation in `evaluation`.
"""

import dataclasses
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
import tqdm

from cmix_jax import checkpointing
from cmix_jax import console
from cmix_jax import evaluation
from cmix_jax import lease
from cmix_jax import parallel
from cmix_jax import reports
from cmix_jax import resume
from cmix_jax import run_setup
from cmix_jax import steps
from cmix_jax import storage
from cmix_jax.data import pipeline


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/Inf more often than allowed."""


@dataclasses.dataclass
class StopFlag:
  """Set by the SIGTERM handler; read at step boundaries."""

  requested: bool = False


def _nothing(run, step: int) -> None:
  del run, step


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Callbacks at the loop's points, each called as hook(run, step); none by default. Tests
  inject faults through them: a kill after a checkpoint, a SIGTERM, a lease taken over."""

  before_steps: Callable[[Any, int], None] = _nothing  # before the steps from `step` on run
  before_log: Callable[[Any, int], None] = _nothing  # at a log boundary, before the heartbeat
  after_checkpoint: Callable[[Any, int], None] = _nothing  # the periodic save of `step` queued


@dataclasses.dataclass
class Progress:
  """The loop's host-side state between boundaries."""

  state: object  # stacked train state
  meta: dict  # checkpointed: step, eval history, best record
  step: int
  result: dict | None = None  # the latest evaluation


def periodic(step: int, every: int, total: int) -> bool:
  """Whether a boundary at `step` runs an action due every `every` steps (and at the end)."""
  return step % every == 0 or step == total


def step_kind(config, step: int) -> str:
  """'mix' for CalibrateMix steps (after warm-up), else 'base'."""
  cm = config.calibratemix
  return 'mix' if cm.enabled and step > cm.warmup_steps else 'base'  # steps 0..warmup: base


def run_steps(step_fns, state, batches, config, start: int, end: int, flag: StopFlag | None = None):
  """Steps [start, end) with no host sync (metrics stay on device); stops early on SIGTERM."""
  step_metrics = []
  for step in range(start, end):
    if flag is not None and flag.requested:
      break
    state, metrics = step_fns[step_kind(config, step)](state, next(batches))
    step_metrics.append(metrics)
  return state, step_metrics


def summarize_metrics(step_metrics: list) -> dict:
  """Mean over steps of replica 0's metrics (the one host sync per log interval)."""
  host = [parallel.first_replica_to_host(m) for m in step_metrics]
  keys = set().union(*host)
  return {k: float(np.mean([h[k] for h in host if k in h])) for k in sorted(keys)}


def check_finite(state, config) -> None:
  """Stops the run once more non-finite steps happened than allowed."""
  allowed = config.max_nonfinite_steps
  count = int(parallel.first_replica_to_host(state.nonfinite_steps))
  if count > allowed:
    first = int(parallel.first_replica_to_host(state.first_nonfinite_step))
    raise NonFiniteError(
      f'non-finite loss or gradient first at step {first} '
      f'({count} such steps skipped, {allowed} allowed); '
      'the last good checkpoint is kept. Lower the learning rate or raise '
      '--config.max_nonfinite_steps to skip such steps.'
    )


def selection_metric(config) -> str | None:
  return evaluation.SELECTION_SPLITS[config.eval.selection]


def evaluate(run: run_setup.Run, state, split: str = 'test') -> dict:
  """EMA-model metrics on the test split or the labeled validation slice."""
  return run.evaluator.evaluate_split(state, run.data, split)


def periodic_eval(run: run_setup.Run, state, step: int, meta: dict) -> dict:
  """Evaluates, writes metrics, and saves the `best` checkpoint when selection improves."""
  result = evaluate(run, state, 'test')
  record = {'step': step, **{f'test/{k}': v for k, v in result['metrics'].items()}}
  if run.config.eval.selection == 'best_val' and len(run.data.val_idx):
    val = evaluate(run, state, 'val')
    record.update({f'val/{k}': v for k, v in val['metrics'].items()})
  run.writer.write_scalars(step, record)
  meta['history'].append(record)
  sel = selection_metric(run.config)
  if sel and record[f'{sel}/accuracy'] > meta['best'].get(f'{sel}/accuracy', -1.0):
    meta['best'] = dict(record)
    meta['best_reliability'] = result['reliability']
    checkpointing.save(
      run.best_manager,
      step,
      parallel.unstack_state(state, run.topo, run.sharded_field),
      {'record': record},
      wait=True,
    )
  if run.is_lead:
    reports.append_jsonl(run.workdir, {'kind': 'eval', **record})
  return result


def save_checkpoint(run: run_setup.Run, state, step: int, meta: dict, wait: bool = False) -> None:
  checkpointing.save(
    run.manager,
    step,
    parallel.unstack_state(state, run.topo, run.sharded_field),
    dict(meta, step=step),
    wait=wait,
  )


def log_train(run: run_setup.Run, step: int, summary: dict) -> None:
  """Train metrics to the writer and metrics.jsonl; the workdir lease's heartbeat."""
  lease.heartbeat(run.lease, run.workdir)  # LeaseLostError on every process if taken over
  run.writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
  if run.is_lead:
    reports.append_jsonl(run.workdir, {'kind': 'train', 'step': step, **summary})


def at_boundary(
  run: run_setup.Run, progress: Progress, summary: dict, bar, hooks: Hooks = Hooks()
) -> None:
  """The periodic actions of one boundary: log, evaluate, checkpoint."""
  config, step = run.config, progress.step
  total = config.num_train_steps
  if periodic(step, config.log_every, total):
    hooks.before_log(run, step)
    log_train(run, step, summary)
  if periodic(step, config.eval_every, total):
    progress.result = periodic_eval(run, progress.state, step, progress.meta)
    metrics = progress.result['metrics']
    bar.set_postfix(
      loss=f'{summary["loss"]:.3f}', acc=f'{metrics["accuracy"]:.4f}', ece=f'{metrics["ece"]:.4f}'
    )
  if periodic(step, config.checkpoint_every, total):
    save_checkpoint(run, progress.state, step, progress.meta)
    hooks.after_checkpoint(run, step)


def boundaries(config, start: int) -> list[int]:
  """Steps at which the loop syncs with the host (log, eval, checkpoint, end)."""
  total = config.num_train_steps
  marks = {total}
  for every in (config.log_every, config.eval_every, config.checkpoint_every):
    marks.update(range(every, total, every))
  return sorted(m for m in marks if m > start)


def _install_sigterm(flag: StopFlag):
  def handler(signum, frame):
    flag.requested = True

  try:
    return signal.signal(signal.SIGTERM, handler)
  except ValueError:  # not the main thread
    return None


def _preempt(run: run_setup.Run, progress: Progress) -> dict:
  """Saves at the current step boundary so a rerun of the same command resumes here."""
  step = progress.step
  if step in run.manager.all_steps():  # this boundary's periodic checkpoint is already there
    checkpointing.wait_until_saved(run.manager)
  else:
    save_checkpoint(run, progress.state, step, progress.meta, wait=True)
  logging.warning('SIGTERM: saved a checkpoint at step %d in %s.', step, run.workdir)
  if run.is_lead:
    print(
      f'Preempted: checkpoint saved at step {step} in {run.workdir}; rerun the same '
      'command to resume.',
      flush=True,
    )
  return {'preempted': True, 'step': step}


def train(run: run_setup.Run, state, meta: dict, flag: StopFlag, hooks: Hooks = Hooks()) -> dict:
  """Trains from `state` (checkpoint layout) to the end; returns the final report or preemption."""
  config = run.config
  progress = Progress(
    parallel.stack_state(state, run.topo, run.sharded_field), meta, int(meta['step'])
  )
  step_fns = steps.make_step_fns(run.model, run.tx, run.algorithm, config, run.info, run.topo)
  batches = pipeline.train_batches(config, run.data, run.algorithm, run.topo, progress.step)
  bar = tqdm.tqdm(
    total=config.num_train_steps,
    initial=progress.step,
    dynamic_ncols=True,
    disable=not (run.is_lead and config.progress_bar),
    desc=config.algorithm,
  )
  t0 = time.time()
  try:
    for end in boundaries(config, progress.step):
      hooks.before_steps(run, progress.step)
      progress.state, step_metrics = run_steps(
        step_fns, progress.state, batches, config, progress.step, end, flag
      )
      if not step_metrics:
        break
      summary = summarize_metrics(step_metrics)
      summary['steps_per_sec'] = len(step_metrics) / max(time.time() - t0, 1e-9)
      progress.step, t0 = progress.step + len(step_metrics), time.time()
      bar.update(len(step_metrics))
      check_finite(progress.state, config)
      at_boundary(run, progress, summary, bar, hooks)
      if flag.requested:
        break
  finally:
    bar.close()
    batches.close()
  checkpointing.wait_until_saved(run.manager)  # a failed last save stops the run here
  if flag.requested and progress.step < config.num_train_steps:
    return _preempt(run, progress)
  if progress.result is None:
    progress.result = periodic_eval(run, progress.state, progress.step, progress.meta)
  return reports.write_final_report(
    run, progress.state, progress.result, progress.meta, progress.step
  )


def finish_writes(run: run_setup.Run, failed: bool) -> None:
  """Waits for the asynchronous checkpoint and metric writes.

  Their failures raise (CheckpointSaveError for a checkpoint) unless the run has already
  failed, in which case they are logged and the first error stays the one reported.
  """
  for finish in (lambda: checkpointing.wait_until_saved(run.manager), run.writer.flush):
    try:
      finish()
    except Exception as e:
      if not failed:
        raise
      logging.warning('After the failure, a pending write failed too: %s', storage.failure_cause(e))


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  allow_config_change: bool = False,
  stop_flag: StopFlag | None = None,
  log_to_terminal: bool = True,
  hooks: Hooks | None = None,
) -> dict:
  """Trains (resuming from `workdir` if possible), evaluates, writes the final report.

  `log_to_terminal=False` sends library INFO lines (orbax, TFDS) to the run's log file only;
  `hooks` are called at the loop's points (see Hooks).
  """
  with console.routed_logs(workdir, log_to_terminal) as log:
    run = run_setup.build_run(config, workdir, allow_config_change)
    with run.lease:  # released however the run ends; a killed run's lease is taken over
      if run.is_lead:
        log.attach()  # the config passed every check: the workdir may be written now
      state, meta = resume.initial_state(run)
      console.print_plan(run, int(meta['step']), log.path)
      flag = stop_flag or StopFlag()
      previous = _install_sigterm(flag)
      try:
        report = train(run, state, meta, flag, hooks or Hooks())
      except BaseException:
        finish_writes(run, failed=True)
        raise
      else:
        finish_writes(run, failed=False)
      finally:
        if previous is not None:
          signal.signal(signal.SIGTERM, previous)
      if not report.get('preempted'):
        console.print_summary(run, report, log.path)
      return report
