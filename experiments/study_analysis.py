"""What the dynamics study keeps of one finished run: one small JSON of numbers.

`analyze(workdir)` reads a finished run (final EMA checkpoint, dynamics.npz) and returns:
- `metrics`: test accuracy, ECE (10 bins), NLL, Brier, ... of the final EMA weights;
- `ts`: the temperature fitted on the held-out labeled validation slice and the test
  metrics after scaling (`cmix_jax.evaluate --temperature_scaling`'s functions);
- `apm_count`: the distribution of APM updates per unlabeled sample;
- `mechanism`: how well the stored APM at the current pseudo-label flags a wrong
  pseudo-label, against the current confidence (AUROC on the pool's hidden labels).
  "Current" = the EMA model on the un-augmented unlabeled images at the end of training;
- `ece_bootstrap`: a 95 % percentile-bootstrap interval of the test ECE over test images,
  the metric's own sampling noise (beside the study's paired intervals over seeds);
- `provenance`: what the run trained on (from its eval.json) and what analysed it.
"""

import io
import math
import os

import numpy as np
from scipy import stats

MIN_UPDATES = 30  # the study's target: mean APM updates per unlabeled sample after warm-up
BOOTSTRAP_RESAMPLES = 2000  # resamples of the test set for the ECE interval


def auroc(scores, positives) -> float:
  """Area under the ROC curve of `scores` ranking `positives` first (ties count half).

  The Mann-Whitney form: (rank sum of the positives - n_pos (n_pos + 1) / 2) / (n_pos n_neg)
  with average ranks; NaN when either class is empty.
  """
  scores = np.asarray(scores, np.float64).reshape(-1)
  positives = np.asarray(positives, bool).reshape(-1)
  if scores.shape != positives.shape:
    raise ValueError(f'auroc: {scores.shape[0]} scores for {positives.shape[0]} labels.')
  n_pos = int(positives.sum())
  n_neg = len(positives) - n_pos
  if not n_pos or not n_neg:
    return math.nan
  ranks = stats.rankdata(scores)  # average ranks for ties
  return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ece_of(confidence, correct, num_bins: int = 10, axis: int = -1):
  """ECE (equal-width bins, [lo, hi), last closed) along `axis`; vectorised for the bootstrap.

  confidence, correct: [..., N] -> [...]; the same number as cmix_jax.metrics.ece.
  """
  confidence = np.moveaxis(np.asarray(confidence, np.float64), axis, -1)  # [..., N]
  correct = np.moveaxis(np.asarray(correct, np.float64), axis, -1)  # [..., N]
  bins = np.minimum((confidence * num_bins).astype(np.int64), num_bins - 1)  # [..., N]
  onehot = bins[..., None] == np.arange(num_bins)  # [..., N, num_bins]
  gap = np.einsum('...nb,...n->...b', onehot, confidence - correct)  # [..., num_bins]
  return np.abs(gap).sum(-1) / confidence.shape[-1]


def ece_bootstrap(logits, labels, num_bins: int = 10, seed: int = 0) -> dict:
  """{'ece', 'low', 'high', 'resamples'}: 95 % percentile-bootstrap interval over examples."""
  probs = _softmax(logits)  # [N, C]
  confidence = probs.max(axis=1)  # [N]
  correct = (probs.argmax(axis=1) == np.asarray(labels)).astype(np.float64)  # [N]
  result = stats.bootstrap(
    (confidence, correct),
    lambda conf, corr, axis: ece_of(conf, corr, num_bins, axis),
    paired=True,
    vectorized=True,
    n_resamples=BOOTSTRAP_RESAMPLES,
    batch=100,
    method='percentile',
    rng=np.random.default_rng(seed),
  )
  interval = result.confidence_interval
  return {
    'ece': float(ece_of(confidence, correct, num_bins)),
    'low': float(interval.low),
    'high': float(interval.high),
    'resamples': BOOTSTRAP_RESAMPLES,
  }


def apm_count_summary(counts) -> dict:
  """Mean, quantiles and shares of the per-sample APM update counts."""
  c = np.asarray(counts, np.float64).reshape(-1)
  if not len(c):
    return {'n': 0}
  q = np.percentile(c, [0, 5, 25, 50, 75, 95, 100])
  return {
    'n': int(len(c)),
    'mean': float(c.mean()),
    **{f'p{p}': float(v) for p, v in zip((0, 5, 25, 50, 75, 95, 100), q)},
    'share_zero': float(np.mean(c == 0)),
    f'share_below_{MIN_UPDATES}': float(np.mean(c < MIN_UPDATES)),
  }


def _softmax(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)  # [N, C]


def mechanism(
  apm: np.ndarray,
  apm_count: np.ndarray,
  running_confidence: np.ndarray,
  logits: np.ndarray,
  hidden_labels: np.ndarray,
) -> dict:
  """AUROCs for "this sample's current pseudo-label is wrong" (samples with an APM update).

  Scores (higher = more likely wrong): -APM at the current pseudo-label, -current max
  probability, -running mean probability of the pseudo-label (cartography confidence).
  """
  pseudo = np.argmax(logits, axis=1)  # [N]
  confidence = _softmax(logits).max(axis=1)  # [N]
  use = (np.asarray(hidden_labels) >= 0) & (np.asarray(apm_count) > 0)  # [N]
  wrong = (pseudo != hidden_labels)[use]
  apm_at_pseudo = np.take_along_axis(apm, pseudo[:, None], axis=1)[:, 0]  # [N]
  return {
    'n': int(use.sum()),
    'pseudo_label_error': float(wrong.mean()) if use.any() else None,
    'auroc_apm': auroc(-apm_at_pseudo[use], wrong),
    'auroc_confidence': auroc(-confidence[use], wrong),
    'auroc_running_confidence': auroc(-np.asarray(running_confidence)[use], wrong),
  }


def analyze(workdir: str) -> dict:
  """Final-EMA test metrics, temperature-scaled metrics, APM counts and the mechanism check."""
  from cmix_jax import evaluate
  from cmix_jax import provenance
  from cmix_jax import run_setup
  from cmix_jax import storage

  run = run_setup.build_run(evaluate.load_config(workdir), workdir, write=False)
  step, state = evaluate.restore(run, 'latest', None)
  report = evaluate.evaluate_restored(
    run, state, step, temperature_scaling=True, out=os.path.join(workdir, 'study_eval')
  )
  out = {
    'step': int(report['step']),
    'metrics': report['metrics'],
    'ts': {
      'temperature': report['temperature'],
      'fit_on': report['temperature_fit_on'],
      'metrics': report['ts_metrics'],
    },
    'apm_count': None,
    'mechanism': None,
    'provenance': {
      'train': storage.read_json(storage.as_path(workdir) / 'eval.json').get('provenance'),
      'analysis': provenance.describe(),
    },
  }
  test_logits, test_labels = run.evaluator.logits(state, run.data, 'test')
  out['ece_bootstrap'] = ece_bootstrap(test_logits, test_labels, run.config.eval.num_bins)
  if not run.algorithm.uses_unlabeled:
    return out  # supervised: no unlabeled pass, no APM
  npz = storage.as_path(workdir) / 'dynamics.npz'
  if not npz.exists():
    raise FileNotFoundError(
      f'{npz} is missing: the study needs the dynamics tables a run '
      'writes at its end with --config.eval.plots=True.'
    )
  with np.load(io.BytesIO(npz.read_bytes())) as tables:
    apm, counts, running = tables['apm'], tables['apm_count'], tables['ulb_confidence']
  logits, _ = run.evaluator.logits(state, run.data, 'unlabeled')  # [N_ulb, C], pool order
  if logits.shape != apm.shape:
    raise ValueError(
      f'{workdir}: the unlabeled pass gave {logits.shape} logits but the APM '
      f'table is {apm.shape}; was data.unlabeled_size changed after training?'
    )
  out['apm_count'] = apm_count_summary(counts)
  out['mechanism'] = mechanism(apm, counts, running, logits, np.asarray(run.data.unlabeled_labels))
  return out
