"""Evaluate a finished or running workdir's checkpoint on the test split.

  python -m cmix_jax.evaluate --workdir=DIR [--checkpoint=STEP | --which=best] [--raw]
                              [--temperature_scaling]

Prints a table of every calibration metric, writes `<out>/eval_<tag>.json` and the
reliability diagram / confidence histogram PNGs (EMA weights unless --raw).
`--temperature_scaling` fits a temperature by NLL on the held-out labeled validation
slice (needs a run trained with data.val_size > 0) and reports the metrics before and
after ("+TS"); training is never changed. --workdir and --out may be local or gs://.
A workdir without a run or checkpoint is one message and exit status 2 (cli.run).
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags
import ml_collections

from cmix_jax import checkpointing
from cmix_jax import cli
from cmix_jax import metrics
from cmix_jax import parallel
from cmix_jax import reports
from cmix_jax import resume
from cmix_jax import run_setup
from cmix_jax import storage

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Workdir of a run (holds config.json and checkpoints/).')
flags.DEFINE_integer('checkpoint', None, 'Step to evaluate (default: newest).')
flags.DEFINE_enum(
  'which',
  'latest',
  ['latest', 'best'],
  'latest checkpoint, or the selection checkpoint kept in best/.',
)
flags.DEFINE_bool('raw', False, 'Evaluate the raw weights instead of the EMA.')
flags.DEFINE_bool('temperature_scaling', False, 'Also report metrics after fitting a temperature.')
flags.DEFINE_string('out', None, 'Where to write results (default: the workdir).')
flags.mark_flag_as_required('workdir')


class EvaluateError(RuntimeError):
  """A workdir without a usable config or checkpoint."""


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run saved in `workdir` (its bucket checked first when gs://).

  As saved: `run_setup.build_run` gives the fields an older config.json lacks their defaults.
  """
  storage.check_readable(workdir)
  path = storage.as_path(workdir) / 'config.json'
  if not path.exists():
    raise EvaluateError(
      f'{workdir} has no config.json: is it a cmix_jax workdir? '
      'Pass the --workdir a training run wrote.'
    )
  return ml_collections.ConfigDict(storage.read_json(path))


def restore(run, which: str, step: int | None):
  """(step, stacked state) of the requested checkpoint."""
  manager = run.best_manager if which == 'best' else run.manager
  if step is not None and step not in manager.all_steps():
    raise EvaluateError(
      f'no checkpoint at step {step} in {manager.directory}; '
      f'available: {sorted(manager.all_steps())}.'
    )
  restored = resume.restore(run, manager, step)
  if restored is None:
    raise EvaluateError(
      f'no checkpoint in {checkpointing.checkpoint_dir(run.workdir)}'
      f'{"/../best" if which == "best" else ""}: train first.'
    )
  step, state, _ = restored
  return step, parallel.stack_state(state, run.topo, run.sharded_field)


def evaluate_workdir(
  workdir: str,
  which: str = 'latest',
  step: int | None = None,
  raw: bool = False,
  temperature_scaling: bool = False,
  out: str | None = None,
) -> dict:
  """Evaluates one checkpoint; returns {'step', 'metrics', 'ts_metrics', 'temperature'}."""
  run = run_setup.build_run(load_config(workdir), workdir, write=False)
  step, state = restore(run, which, step)
  return evaluate_restored(run, state, step, which, raw, temperature_scaling, out)


def evaluate_restored(
  run,
  state,
  step: int,
  which: str = 'latest',
  raw: bool = False,
  temperature_scaling: bool = False,
  out: str | None = None,
) -> dict:
  """`evaluate_workdir` on an already built run and restored (stacked) state."""
  tag = f'{which}_{step}{"_raw" if raw else ""}'
  out = out or run.workdir
  result = run.evaluator.evaluate_split(state, run.data, 'test', use_ema=not raw)
  reports.write_eval_report(
    result, out, prefix=f'eval_{tag}', title=f'{run.config.algorithm} {tag}'
  )
  report = {
    'step': step,
    'which': which,
    'weights': 'raw' if raw else 'ema',
    'metrics': result['metrics'],
  }
  if temperature_scaling:
    report.update(_temperature_scaled(run, state, raw, out, tag))
  reports.write_json(os.path.join(out, f'eval_{tag}.json'), report, indent=2, sort_keys=True)
  return report


def _temperature_scaled(run, state, raw, out, tag) -> dict:
  """Fits T on held-out labeled data, then evaluates the test split with logits / T."""
  if not len(run.data.val_idx):
    raise EvaluateError(
      f'{run.workdir} was trained without a held-out labeled slice, so there is nothing '
      'to fit a temperature on (the labeled training set would give a degenerate T). '
      'Train with --config.data.val_size=N (a multiple of the class count).'
    )
  fit_on = f'labeled validation slice ({len(run.data.val_idx)} examples)'
  logits, labels = run.evaluator.logits(state, run.data, 'val', use_ema=not raw)
  temperature = metrics.fit_temperature(logits, labels)
  result = run.evaluator.evaluate_split(
    state, run.data, 'test', use_ema=not raw, temperature=temperature
  )
  reports.write_eval_report(
    result,
    out,
    prefix=f'eval_{tag}_ts',
    title=f'{run.config.algorithm} {tag} +TS (T={temperature:.3f})',
  )
  return {'temperature': temperature, 'temperature_fit_on': fit_on, 'ts_metrics': result['metrics']}


def format_table(report: dict) -> str:
  """Metrics as a Markdown table (with a +TS column when present)."""
  ts = report.get('ts_metrics')
  head = '| metric | value |' + (f' +TS (T={report["temperature"]:.3f}) |' if ts else '')
  lines = [head, '|---|---|' + ('---|' if ts else '')]
  for key, value in report['metrics'].items():
    lines.append(f'| {key} | {value:.4f} |' + (f' {ts[key]:.4f} |' if ts else ''))
  return '\n'.join(lines)


def main(argv):
  del argv  # cli.run refuses positional arguments
  report = evaluate_workdir(
    FLAGS.workdir, FLAGS.which, FLAGS.checkpoint, FLAGS.raw, FLAGS.temperature_scaling, FLAGS.out
  )
  print(
    f'{FLAGS.workdir}: {report["which"]} checkpoint, step {report["step"]}, '
    f'{report["weights"]} weights'
  )
  print(format_table(report))


if __name__ == '__main__':
  cli.run(main, bad_input=(EvaluateError,), workdir=lambda: FLAGS.out or FLAGS.workdir)
