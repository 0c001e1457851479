"""What a run writes for people: metrics.jsonl, eval.json, pictures, the dynamics tables.

Every file goes through `storage`, so a workdir may be local or gs://.
"""

import os
import shutil
import tempfile

import numpy as np

from cmix_jax import dynamics
from cmix_jax import parallel
from cmix_jax import provenance
from cmix_jax import steps
from cmix_jax import storage


class UploadedEvents:
  """A metric writer for a bucket workdir: `writer` (clu) writes TensorBoard events into a
  local folder, whose files are uploaded whole into the workdir through `storage` each time
  scalars are written (every log and eval interval), as metrics.jsonl is rewritten whole."""

  def __init__(self, writer, local_dir: str, workdir: str):
    self._writer, self._local_dir, self._workdir = writer, local_dir, workdir

  def write_scalars(self, step: int, scalars: dict) -> None:
    self._writer.write_scalars(step, scalars)
    self.flush()

  def flush(self) -> None:
    """Flushes the events and uploads every local file (each run writes its own file)."""
    self._writer.flush()
    for folder, _, files in os.walk(self._local_dir):
      for name in files:
        local = os.path.join(folder, name)
        relative = os.path.relpath(local, self._local_dir)
        storage.copy_file(local, os.path.join(self._workdir, relative))

  def close(self) -> None:
    self.flush()
    self._writer.close()
    shutil.rmtree(self._local_dir, ignore_errors=True)


def metric_writer(workdir: str, tensorboard: bool):
  """clu's writer: TensorBoard events in the workdir (through a local folder when it is a
  bucket, see UploadedEvents), or logging only."""
  from clu import metric_writers  # imports TF

  if not tensorboard:
    return metric_writers.create_default_writer(None, just_logging=True)
  if not storage.is_remote(workdir):
    return metric_writers.create_default_writer(workdir)
  local_dir = tempfile.mkdtemp(prefix='cmix_jax_events_')
  return UploadedEvents(metric_writers.create_default_writer(local_dir), local_dir, workdir)


def append_jsonl(workdir: str, record: dict) -> None:
  """Appends one record to `workdir/metrics.jsonl` (on gs://: the object is rewritten)."""
  storage.append_jsonl(os.path.join(workdir, 'metrics.jsonl'), record)


def write_json(path: str, obj, **kwargs) -> None:
  """json.dumps(obj, **kwargs) written whole to `path`."""
  storage.write_json(path, obj, **kwargs)


def write_eval_report(result: dict, out_dir: str, prefix: str = 'eval', title: str = '') -> dict:
  """Writes `<prefix>.json`, `<prefix>_reliability.json`, the diagram and the histogram."""
  from cmix_jax import plots  # matplotlib is slow to import

  write_json(os.path.join(out_dir, f'{prefix}.json'), result['metrics'], indent=2, sort_keys=True)
  write_json(os.path.join(out_dir, f'{prefix}_reliability.json'), result['reliability'])
  ece = result['metrics'].get('ece')
  return {
    'reliability': plots.reliability_diagram(
      result['reliability'],
      os.path.join(out_dir, f'{prefix}_reliability.png'),
      title=title,
      ece=ece,
    )[0],
    'histogram': plots.confidence_histogram(
      result['confidence'], result['correct'], os.path.join(out_dir, f'{prefix}_confidence.png')
    )[0],
  }


def selected_report(config, result: dict, meta: dict, step: int) -> tuple[dict, list]:
  """(eval.json content, reliability table) of the checkpoint `eval.selection` names."""
  selection = config.eval.selection
  selected, selected_step, reliability = dict(result['metrics']), step, result['reliability']
  if selection != 'final' and meta['best']:
    selected = {k[len('test/') :]: v for k, v in meta['best'].items() if k.startswith('test/')}
    selected_step, reliability = meta['best']['step'], meta['best_reliability']
  report = {
    **selected,
    'selection': selection,
    'step': selected_step,
    'final': dict(result['metrics'], step=step),
    'best': meta['best'],
    'num_train_steps': config.num_train_steps,
    'precision': steps.model_precision(config),  # conv / matmul precision the run computed in
  }
  return report, reliability


def write_final_report(run, state, result: dict, meta: dict, step: int) -> dict:
  """Writes eval.json (the selected checkpoint's metrics), pictures and the dynamics tables."""
  report, reliability = selected_report(run.config, result, meta, step)
  report['provenance'] = provenance.describe(devices_used=run.topo.num_devices)
  plots = run.config.eval.plots
  dyn = host_dynamics(run, state) if plots else None  # a collective: every process joins
  if not run.is_lead:
    return report
  write_json(os.path.join(run.workdir, 'eval.json'), report, indent=2, sort_keys=True)
  if plots:
    write_eval_report(
      result, run.workdir, prefix='final', title=f'{run.config.algorithm} final (EMA, step {step})'
    )
    write_dynamics(run, dyn)
  # of the selected checkpoint, like eval.json's top level
  write_json(os.path.join(run.workdir, 'reliability.json'), reliability)
  _training_curves(run.workdir, meta)
  return report


def host_dynamics(run, state) -> dynamics.DynamicsState:
  """Full dynamics tables on the host from the stacked state (gathers shards)."""
  if run.sharded_field is None:
    return parallel.first_replica_to_host(state.dynamics)
  stacked = parallel.gather_stacked_to_host(state.dynamics)
  return dynamics.unshard_state(stacked, run.info.num_labeled, run.info.num_unlabeled)


def write_dynamics(run, dyn: dynamics.DynamicsState) -> None:
  """Exports the dynamics tables (.npz) and draws the labeled/unlabeled data maps."""
  from cmix_jax import plots

  dynamics.save_npz(dyn, os.path.join(run.workdir, 'dynamics.npz'))
  plots.data_map(
    np.asarray(dynamics.labeled_variability(dyn)),
    np.asarray(dynamics.labeled_confidence(dyn)),
    os.path.join(run.workdir, 'data_map_labeled.png'),
    title='labeled: gold-label probability',
  )
  if run.algorithm.uses_unlabeled:
    hidden = run.data.unlabeled_labels
    pseudo = np.asarray(dyn.apm).argmax(-1)
    correct = np.where(hidden >= 0, pseudo == hidden, False).astype(np.float32)
    plots.data_map(
      np.asarray(dynamics.unlabeled_variability(dyn)),
      np.asarray(dynamics.unlabeled_confidence(dyn)),
      os.path.join(run.workdir, 'data_map_unlabeled.png'),
      color=correct,
      color_label='APM pseudo-label correct',
      title='unlabeled: pseudo-label probability',
    )


def _training_curves(workdir: str, meta: dict) -> None:
  from cmix_jax import plots

  if meta['history']:
    history = [
      {'step': r['step'], 'accuracy': r['test/accuracy'], 'ece': r['test/ece']}
      for r in meta['history']
    ]
    plots.training_curves(history, os.path.join(workdir, 'curves.png'))
