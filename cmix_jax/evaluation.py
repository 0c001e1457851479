"""Evaluation over a whole split: streamed calibration sums, metrics, reliability, pictures."""

import functools
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from cmix_jax import metrics as metrics_lib
from cmix_jax import parallel
from cmix_jax import train
from cmix_jax.data import pipeline


def eval_sums_step(state, batch, *, model, info: train.DataInfo, use_ema: bool,
                   temperature: float = 1.0, return_logits: bool = False):
  """Per-device calibration sums of one batch (only sums, not probabilities, leave the device)."""
  out = train.eval_step(state, batch, model=model, info=info, use_ema=use_ema)
  probs = jax.nn.softmax(out['logits'] / temperature, axis=-1)
  sums = metrics_lib.batch_calibration_sums(probs, out['labels'], out['mask'])
  if return_logits:
    sums.update(logits=out['logits'], labels=out['labels'])
  return sums


def make_eval_fn(model, info: train.DataInfo, topo: parallel.Topology, backend: str,
                 use_ema: bool = True, temperature: float = 1.0, return_logits: bool = False):
  """Parallel eval step: stacked state + sharded batch -> stacked per-device sums."""
  step = functools.partial(eval_sums_step, model=model, info=info, use_ema=use_ema,
                           temperature=temperature, return_logits=return_logits)
  return parallel.parallelize(step, topo, backend=backend, donate_first=False)


def _local_rows(tree) -> dict:
  """This process's rows of stacked outputs as numpy [L, ...]."""
  out = {}
  for key, x in tree.items():
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    out[key] = np.concatenate([np.asarray(s.data) for s in shards])
  return out


def _batches(images, labels, batch_size: int, topo: parallel.Topology):
  return pipeline.eval_batches(images, labels, batch_size, local_devices=topo.num_local_devices,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())


def accumulate(eval_fn, state, images, labels, batch_size: int, topo: parallel.Topology,
               num_classes: int) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
  """(calibration sums, logits, labels) of a split; logits only if eval_fn returns them."""
  sums = metrics_lib.init_sums(num_classes)
  logits, kept_labels = [], []
  for batch in _batches(images, labels, batch_size, topo):
    out = _local_rows(eval_fn(state, parallel.shard_batch(batch, topo)))
    if 'logits' in out:
      keep = out['example_mask'].reshape(-1) > 0
      logits.append(out.pop('logits').reshape((keep.size, -1))[keep])
      kept_labels.append(out.pop('labels').reshape(-1)[keep])
    sums = metrics_lib.merge_sums(sums, out)
  if jax.process_count() > 1:
    sums = _gather_process_sums(sums)
  if not logits:
    return sums, None, None
  return sums, np.concatenate(logits), np.concatenate(kept_labels)


def _gather_process_sums(sums: dict) -> dict:
  """Adds every process's sums; concatenates the per-example arrays."""
  out = {}
  for key, value in sums.items():
    if key.startswith('example_'):
      out[key] = _gather_ragged(value)
    else:
      out[key] = np.asarray(multihost_utils.process_allgather(value)).sum(0)
  return out


def _gather_ragged(values: np.ndarray) -> np.ndarray:
  lengths = np.ravel(multihost_utils.process_allgather(np.array([len(values)])))
  padded = np.pad(values, (0, int(lengths.max()) - len(values)))
  gathered = multihost_utils.process_allgather(padded)
  return np.concatenate([row[:n] for row, n in zip(gathered, lengths)])


def result_from_sums(sums: dict, num_bins: int = 10) -> dict:
  """Every calibration metric, the reliability table and per-example confidence/correct."""
  return {'metrics': {k: float(v) for k, v in metrics_lib.finalize_sums(sums).items()},
          'reliability': {k: np.asarray(v).tolist() for k, v in
                          metrics_lib.reliability_table_from_sums(sums, num_bins).items()},
          'confidence': np.asarray(sums['example_confidence']),
          'correct': np.asarray(sums['example_correct']) > 0}


def write_report(result: dict, out_dir: str, prefix: str = 'eval', title: str = '') -> dict:
  """Writes `<prefix>.json`, `<prefix>_reliability.json`, the diagram and the histogram."""
  from cmix_jax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{prefix}.json'), 'w') as f:
    json.dump(result['metrics'], f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, f'{prefix}_reliability.json'), 'w') as f:
    json.dump(result['reliability'], f)
  ece = result['metrics'].get('ece')
  return {
      'reliability': plots.reliability_diagram(
          result['reliability'], os.path.join(out_dir, f'{prefix}_reliability.png'),
          title=title, ece=ece)[0],
      'histogram': plots.confidence_histogram(
          result['confidence'], result['correct'],
          os.path.join(out_dir, f'{prefix}_confidence.png'))[0]}
