"""Evaluation over a whole split: calibration metrics, reliability table and pictures."""

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


def make_eval_fn(model, info: train.DataInfo, topo: parallel.Topology, backend: str,
                 use_ema: bool = True):
  """Parallel eval step: stacked state + sharded batch -> stacked logits/labels/mask."""
  step = functools.partial(train.eval_step, model=model, info=info, use_ema=use_ema)
  return parallel.parallelize(step, topo, backend=backend, donate_first=False)


def _local_rows(tree) -> dict:
  """This process's rows of stacked outputs as numpy, device axis flattened."""
  out = {}
  for key, x in tree.items():
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    host = np.concatenate([np.asarray(s.data) for s in shards])
    out[key] = host.reshape((-1,) + host.shape[2:])
  return out


def predict(eval_fn, state, images, labels, batch_size: int, topo: parallel.Topology):
  """Logits and labels of every example of a split (padding removed), on every process."""
  logits, labels_out = [], []
  for batch in pipeline.eval_batches(images, labels, batch_size,
                                     local_devices=topo.num_local_devices,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = _local_rows(eval_fn(state, parallel.shard_batch(batch, topo)))
    keep = out['mask'] > 0
    logits.append(out['logits'][keep])
    labels_out.append(out['labels'][keep])
  logits = np.concatenate(logits).astype(np.float32)
  labels_out = np.concatenate(labels_out)
  if jax.process_count() > 1:
    logits, labels_out = _gather_processes(logits, labels_out)
  return logits, labels_out


def _gather_processes(logits, labels):
  """Concatenates every process's share (shares may differ in length by padding)."""
  n = multihost_utils.process_allgather(np.array([len(labels)]))
  most = int(n.max())
  pad = most - len(labels)
  logits_p = np.pad(logits, ((0, pad), (0, 0)))
  labels_p = np.pad(labels, (0, pad), constant_values=-1)
  all_logits = multihost_utils.process_allgather(logits_p)
  all_labels = multihost_utils.process_allgather(labels_p)
  keep = [np.arange(most) < int(k) for k in np.ravel(n)]
  return (np.concatenate([l[m] for l, m in zip(all_logits, keep)]),
          np.concatenate([l[m] for l, m in zip(all_labels, keep)]))


def evaluate_logits(logits: np.ndarray, labels: np.ndarray, num_bins: int = 10) -> dict:
  """Every calibration metric plus the reliability table of a split's logits."""
  probs = np.asarray(jax.nn.softmax(logits.astype(np.float64), axis=-1))
  summary = metrics_lib.summary(probs, labels)
  table = metrics_lib.reliability_table(probs, labels, num_bins)
  return {'metrics': {k: float(v) for k, v in summary.items()},
          'reliability': {k: np.asarray(v).tolist() for k, v in table.items()},
          'confidence': probs.max(-1), 'correct': probs.argmax(-1) == labels}


def write_report(result: dict, out_dir: str, prefix: str = 'eval', title: str = '') -> dict:
  """Writes `<prefix>.json`, the reliability diagram and confidence histogram."""
  from cmix_jax import plots  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f'{prefix}.json'), 'w') as f:
    json.dump(result['metrics'], f, indent=2, sort_keys=True)
  with open(os.path.join(out_dir, f'{prefix}_reliability.json'), 'w') as f:
    json.dump(result['reliability'], f)
  paths = {}
  paths['reliability'] = plots.reliability_diagram(
      result['reliability'], os.path.join(out_dir, f'{prefix}_reliability.png'),
      title=title, ece=result['metrics'].get('ece'))
  paths['histogram'] = plots.confidence_histogram(
      result['confidence'], result['correct'], os.path.join(out_dir, f'{prefix}_confidence.png'))
  return paths
