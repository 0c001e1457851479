"""Evaluation of a train state over a whole split: streamed calibration sums -> metrics.

`Evaluator.evaluate_split` is the one path the training loop, `cmix_jax.evaluate` and
temperature scaling share; only per-batch sums (not probabilities) leave the devices.
"""

import dataclasses
import functools

import jax
import numpy as np

from cmix_jax import metrics as metrics_lib
from cmix_jax import parallel
from cmix_jax import steps
from cmix_jax.data import image_sources
from cmix_jax.data import pipeline
from cmix_jax.data import ssl_data

SPLITS = ('test', 'val', 'unlabeled')
# config.eval.selection -> the split whose accuracy picks the kept checkpoint (None: the last).
SELECTION_SPLITS = {'final': None, 'best_val': 'val', 'best_test': 'test'}


def eval_sums_step(
  state,
  batch,
  *,
  model,
  info: steps.DataInfo,
  use_ema: bool,
  temperature: float = 1.0,
  return_logits: bool = False,
):
  """Per-device calibration sums of one batch (and its logits when asked)."""
  out = steps.eval_step(state, batch, model=model, info=info, use_ema=use_ema)
  probs = jax.nn.softmax(out['logits'] / temperature, axis=-1)
  sums = metrics_lib.batch_calibration_sums(probs, out['labels'], out['mask'])
  if return_logits:
    sums.update(logits=out['logits'], labels=out['labels'])
  return sums


@functools.cache
def make_eval_fn(
  model,
  info: steps.DataInfo,
  topo: parallel.Topology,
  backend: str,
  use_ema: bool = True,
  temperature: float = 1.0,
  return_logits: bool = False,
):
  """Parallel eval step: stacked state + sharded batch -> stacked per-device sums (cached)."""
  step = functools.partial(
    eval_sums_step,
    model=model,
    info=info,
    use_ema=use_ema,
    temperature=temperature,
    return_logits=return_logits,
  )
  return parallel.parallelize(step, topo, backend=backend, donate_first=False)


def split_arrays(data: ssl_data.SSLData, split: str):
  """(images, labels) of the test split, the labeled validation slice or the unlabeled pool.

  The unlabeled pool's labels are its hidden labels, unknown ones (-1) read as class 0:
  its logits are for analysis (the dynamics study), its metrics only where all are known.
  """
  if split == 'test':
    return data.test_images, data.test_labels
  if split == 'val':
    val_images = image_sources.ArrayImageSource(data.train_images.get(data.val_idx))
    return val_images, data.train_labels[data.val_idx]
  if split == 'unlabeled':
    return data.unlabeled_images, np.maximum(data.unlabeled_labels, 0)
  raise ValueError(f'unknown split {split!r}: use one of {SPLITS}.')


def _gather_process_sums(sums: dict) -> dict:
  """Adds every process's sums; concatenates the per-example arrays."""
  return {
    key: (
      parallel.concat_over_processes(value)
      if key.startswith('example_')
      else parallel.sum_over_processes(value)
    )
    for key, value in sums.items()
  }


def result_from_sums(sums: dict, num_bins: int = 10) -> dict:
  """Every calibration metric, the reliability table and per-example confidence/correct."""
  return {
    'metrics': {k: float(v) for k, v in metrics_lib.finalize_sums(sums).items()},
    'reliability': {
      k: np.asarray(v).tolist()
      for k, v in metrics_lib.reliability_table_from_sums(sums, num_bins).items()
    },
    'confidence': np.asarray(sums['example_confidence']),
    'correct': np.asarray(sums['example_correct']) > 0,
  }


@dataclasses.dataclass(frozen=True)
class Evaluator:
  """Evaluates a stacked train state on a split of a run's data."""

  model: object
  info: steps.DataInfo
  topo: parallel.Topology
  backend: str
  batch_size: int
  num_bins: int = 10

  def _accumulate(self, eval_fn, state, images, labels):
    """(sums, logits, labels) of a split; logits only if `eval_fn` returns them."""
    sums = metrics_lib.init_sums(self.info.num_classes)
    logits, kept_labels = [], []
    for batch in pipeline.eval_batches(
      images,
      labels,
      self.batch_size,
      local_devices=self.topo.num_local_devices,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    ):
      out = parallel.local_rows(eval_fn(state, parallel.shard_batch(batch, self.topo)))
      if 'logits' in out:
        keep = out['example_mask'].reshape(-1) > 0
        logits.append(out.pop('logits').reshape((keep.size, -1))[keep])
        kept_labels.append(out.pop('labels').reshape(-1)[keep])
      sums = metrics_lib.merge_sums(sums, out)
    sums = _gather_process_sums(sums)
    if not logits:
      return sums, None, None
    return sums, np.concatenate(logits), np.concatenate(kept_labels)

  def evaluate_split(
    self,
    state,
    data: ssl_data.SSLData,
    split: str = 'test',
    *,
    use_ema: bool = True,
    temperature: float = 1.0,
  ) -> dict:
    """Metrics, reliability table and per-example confidence of `split` (see result_from_sums)."""
    eval_fn = make_eval_fn(self.model, self.info, self.topo, self.backend, use_ema, temperature)
    sums, _, _ = self._accumulate(eval_fn, state, *split_arrays(data, split))
    return result_from_sums(sums, self.num_bins)

  def logits(self, state, data: ssl_data.SSLData, split: str, *, use_ema: bool = True):
    """(logits [N, C], labels [N]) of `split`, this process's examples (for fitting a temperature)."""
    eval_fn = make_eval_fn(
      self.model, self.info, self.topo, self.backend, use_ema, return_logits=True
    )
    _, logits, labels = self._accumulate(eval_fn, state, *split_arrays(data, split))
    return logits, labels
