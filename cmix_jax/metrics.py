"""Calibration metrics: ECE (equal-width, equal-mass, class-wise), MCE, NLL, Brier, temperature.

Conventions (docs/method.md §5, the paper's evaluation):
- confidence = max_c p_c, prediction = argmax_c p_c (first maximum on ties).
- Equal-width bin b of B holds confidences in [b/B, (b+1)/B); the last bin
  [(B-1)/B, 1] is closed, so a confidence of exactly 1.0 lands in it and one
  exactly on an edge (0.1) lands in the bin that starts there ([0.1, 0.2)).
  Edges are the nearest values of the probabilities' dtype (at least float32)
  to k/B, computed by division, and bins are assigned in that dtype, so numpy
  on host and `batch_calibration_sums` inside a jitted step agree exactly.
- ECE = sum_b |B_b|/N * |acc_b - conf_b| as a fraction (not percent).

Streaming. Every metric is a function of a dict of sums (`init_sums`,
`update_sums`, `merge_sums`, `finalize_sums`): per-bin count / confidence /
correct sums for 10 and 15 bins, class-wise [C, 15] count / probability /
label-indicator sums, and totals for NLL, Brier, accuracy and count. Host sums
are float64. Equal-mass (adaptive) ECE needs the sorted confidences, so the sums
also keep one (confidence, correct) pair per example: two float64 per example,
0.8 MB for ImageNet's 50k test images; pass `keep_examples=False` to drop them
(and adaptive ECE with them). Inside a jitted eval step `batch_calibration_sums`
returns the same sums (compute dtype, padding rows masked), so only sums move to
the host; `host_sums` converts them (also when stacked over devices).
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

DEFAULT_BINS = (10, 15)  # equal-width bin counts kept in the sums; 10 is the paper's ECE
CLASSWISE_BINS = 15  # Kull et al. 2019 use 15 bins for class-wise ECE
ADAPTIVE_BINS = 15
HEADLINE_BINS = 10  # `ece` / `mce` of `summary`; other bin counts give `ece_<B>`
SUMMARY_KEYS = (
  'accuracy',
  'error_rate',
  'ece',
  'ece_15',
  'mce',
  'adaptive_ece',
  'classwise_ece',
  'nll',
  'brier',
)
_EXAMPLE_KEYS = ('example_confidence', 'example_correct')
_HOST_CHUNK_ELEMENTS = 1 << 22  # rows * classes per host chunk (bounds float64 temporaries)


# ----------------------------------------------------------------------------
# Bins.


def compute_dtype(dtype) -> np.dtype:
  """The dtype bins are assigned in: the probabilities' float dtype, at least float32."""
  return np.dtype(np.result_type(dtype, np.float32))


def bin_edges(num_bins: int, dtype=np.float64) -> np.ndarray:
  """Edges k/num_bins, k = 0..num_bins, each the nearest `dtype` value. [num_bins + 1]"""
  _check_num_bins(num_bins)
  dtype = np.dtype(dtype)
  return np.arange(num_bins + 1, dtype=dtype) / dtype.type(num_bins)


def bin_index(values, num_bins: int):
  """Equal-width bin of each value: [lo, hi), last bin closed; numpy or jax arrays."""
  xp = jnp if isinstance(values, jax.Array) else np
  interior = bin_edges(num_bins, compute_dtype(values.dtype))[1:-1]  # [num_bins - 1]
  return xp.searchsorted(xp.asarray(interior), values, side='right')


def _check_num_bins(num_bins) -> None:
  if (
    isinstance(num_bins, (bool, np.bool_))
    or not isinstance(num_bins, (int, np.integer))
    or num_bins < 1
  ):
    raise ValueError(f'num_bins must be a positive int, got {num_bins!r}.')


def _check_bin_list(num_bins: Sequence[int]) -> tuple:
  if isinstance(num_bins, (int, np.integer)):
    num_bins = (num_bins,)
  num_bins = tuple(num_bins)
  for b in num_bins:
    _check_num_bins(b)
  if len(set(num_bins)) != len(num_bins):
    raise ValueError(f'num_bins has duplicates: {num_bins}; list each bin count once.')
  return num_bins


# ----------------------------------------------------------------------------
# Per-batch sums, shared by numpy (host) and jax (inside a jitted step).


def _batch_sums(
  xp, scatter, probs, labels, valid, acc_dtype, num_bins, classwise_bins, keep_examples
):
  """Sums of one batch; bins assigned in probs' dtype, values summed in acc_dtype."""
  n, c = probs.shape
  cdt = probs.dtype
  probs = xp.where(valid[:, None], probs, xp.asarray(1.0 / c, cdt))  # [n, C] padding -> uniform
  labels = xp.where(valid, labels, 0).astype(xp.int32)  # [n]
  w = valid.astype(acc_dtype)  # [n]
  onehot = (labels[:, None] == xp.arange(c, dtype=xp.int32)[None, :]).astype(acc_dtype)  # [n, C]
  conf_c = probs.max(axis=-1)  # [n] compute dtype, for binning
  conf = conf_c.astype(acc_dtype)  # [n]
  correct = (probs.argmax(axis=-1) == labels).astype(acc_dtype)  # [n]
  probs_a = probs.astype(acc_dtype)  # [n, C]
  p_true = (probs_a * onehot).sum(axis=-1)  # [n]
  tiny = np.finfo(cdt).tiny
  sums = {
    'count': w.sum(),
    'correct': (w * correct).sum(),
    'nll': -(w * xp.log(xp.maximum(p_true, tiny))).sum(),
    'brier': (w * ((probs_a - onehot) ** 2).sum(axis=-1)).sum(),
  }
  for nb in num_bins:
    idx = bin_index(conf_c, nb)  # [n]
    sums[f'bins{nb}_count'] = scatter(w, idx, nb)  # [nb]
    sums[f'bins{nb}_conf'] = scatter(w * conf, idx, nb)
    sums[f'bins{nb}_correct'] = scatter(w * correct, idx, nb)
  if classwise_bins:
    nb = classwise_bins
    flat = (bin_index(probs, nb) + xp.arange(c)[None, :] * nb).reshape(-1)  # [n*C]
    wc = xp.broadcast_to(w[:, None], (n, c))  # [n, C]
    for name, values in (('count', wc), ('prob', wc * probs_a), ('label', wc * onehot)):
      sums[f'classwise{nb}_{name}'] = scatter(values.reshape(-1), flat, c * nb).reshape(c, nb)
  if keep_examples:
    sums['example_confidence'] = conf
    sums['example_correct'] = correct
  return sums


def _np_scatter(values, idx, length):
  return np.bincount(idx.reshape(-1), weights=values, minlength=length)


def _jax_scatter(values, idx, length):
  return jax.ops.segment_sum(values, idx, num_segments=length)


def batch_calibration_sums(
  probs: jax.Array,
  labels: jax.Array,
  mask: jax.Array | None = None,
  num_bins: Sequence[int] = DEFAULT_BINS,
  classwise_bins: int | None = CLASSWISE_BINS,
  keep_examples: bool = True,
) -> dict:
  """Calibration sums of one batch, jittable (num_bins etc. static); rows with mask 0 ignored.

  Returns the keys of `init_sums` in the compute dtype, plus `example_mask` [n]
  when `keep_examples`; bring them to the host with `host_sums` / `merge_sums`.
  """
  num_bins = _check_bin_list(num_bins)
  if classwise_bins:
    _check_num_bins(classwise_bins)
  _check_shapes(probs, labels, mask)
  probs = jnp.asarray(probs)
  probs = probs.astype(compute_dtype(probs.dtype))  # [n, C]
  valid = jnp.ones(probs.shape[:1], bool) if mask is None else jnp.asarray(mask) > 0  # [n]
  sums = _batch_sums(
    jnp,
    _jax_scatter,
    probs,
    jnp.asarray(labels),
    valid,
    probs.dtype,
    num_bins,
    classwise_bins,
    keep_examples,
  )
  if keep_examples:
    sums['example_mask'] = valid.astype(probs.dtype)
  return sums


# ----------------------------------------------------------------------------
# Host sums: init / update / merge / finalize.


def init_sums(
  num_classes: int,
  num_bins: Sequence[int] = DEFAULT_BINS,
  classwise_bins: int | None = CLASSWISE_BINS,
  keep_examples: bool = True,
) -> dict:
  """Empty float64 sums for `num_classes` classes (see the module docstring for the keys)."""
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}.')
  num_bins = _check_bin_list(num_bins)
  sums = {k: np.zeros((), np.float64) for k in ('count', 'correct', 'nll', 'brier')}
  for nb in num_bins:
    for name in ('count', 'conf', 'correct'):
      sums[f'bins{nb}_{name}'] = np.zeros(nb, np.float64)
  if classwise_bins:
    _check_num_bins(classwise_bins)
    for name in ('count', 'prob', 'label'):
      sums[f'classwise{classwise_bins}_{name}'] = np.zeros(
        (num_classes, classwise_bins), np.float64
      )
  if keep_examples:
    for k in _EXAMPLE_KEYS:
      sums[k] = np.zeros(0, np.float64)
  return sums


def _layout(sums: dict) -> tuple:
  """(equal-width bin counts, class-wise bin count or None, num_classes or None, examples?)."""
  num_bins = tuple(
    sorted(int(k[4:-6]) for k in sums if k.startswith('bins') and k.endswith('_count'))
  )
  cw = [k for k in sums if k.startswith('classwise') and k.endswith('_count')]
  cw_bins = int(cw[0][len('classwise') : -len('_count')]) if cw else None
  num_classes = int(np.shape(sums[cw[0]])[-2]) if cw else None
  return num_bins, cw_bins, num_classes, 'example_confidence' in sums


def update_sums(sums: dict, probs, labels, mask=None) -> dict:
  """New sums with a batch of probabilities [n, C] and integer labels [n] added (mask [n])."""
  probs, labels, valid = _check_host_inputs(probs, labels, mask)
  num_bins, cw_bins, num_classes, keep = _layout(sums)
  if num_classes is not None and probs.shape[1] != num_classes:
    raise ValueError(
      f'probs have {probs.shape[1]} classes but the sums were built for '
      f'{num_classes}; use init_sums({probs.shape[1]}).'
    )
  out = dict(sums)
  chunk = max(1, _HOST_CHUNK_ELEMENTS // max(1, probs.shape[1]))
  for start in range(0, probs.shape[0], chunk):
    part = _batch_sums(
      np,
      _np_scatter,
      probs[start : start + chunk],
      labels[start : start + chunk],
      valid[start : start + chunk],
      np.float64,
      num_bins,
      cw_bins,
      keep,
    )
    if keep:
      keep_rows = valid[start : start + chunk]
      for k in _EXAMPLE_KEYS:
        part[k] = part[k][keep_rows]
    out = merge_sums(out, part)
  return out


def host_sums(sums: dict) -> dict:
  """Float64 numpy sums from `batch_calibration_sums` output (leading device axes summed)."""
  sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  lead = sums['count'].ndim  # > 0 when stacked over devices / steps
  out = {}
  for k, v in sums.items():
    if k in _EXAMPLE_KEYS or k == 'example_mask':
      continue
    out[k] = v.sum(axis=tuple(range(lead))) if lead else v
  if 'example_mask' in sums:
    keep_rows = sums['example_mask'].reshape(-1) > 0
    for k in _EXAMPLE_KEYS:
      out[k] = sums[k].reshape(-1)[keep_rows]
  elif 'example_confidence' in sums:
    for k in _EXAMPLE_KEYS:
      out[k] = sums[k].reshape(-1)
  return out


def merge_sums(a: dict, b: dict) -> dict:
  """Sums of the union of two sets of examples (either may be `batch_calibration_sums` output)."""
  a, b = host_sums(a), host_sums(b)
  if set(a) != set(b) or any(np.shape(a[k]) != np.shape(b[k]) for k in a if k not in _EXAMPLE_KEYS):
    raise ValueError(
      f'cannot merge sums of different layouts ({_layout(a)} vs {_layout(b)}); '
      'build both with the same num_classes, num_bins, classwise_bins and '
      'keep_examples.'
    )
  return {k: np.concatenate([a[k], b[k]]) if k in _EXAMPLE_KEYS else a[k] + b[k] for k in a}


def _binned_ece(conf_sum, correct_sum, total) -> float:
  """sum_b |B_b|/N |acc_b - conf_b| = sum_b |correct_b - conf_b| / N."""
  return float(np.abs(correct_sum - conf_sum).sum() / total)


def _binned_mce(count, conf_sum, correct_sum) -> float:
  full = count > 0
  return float(np.max(np.abs(correct_sum[full] - conf_sum[full]) / count[full]))


def _equal_mass_ece(confidence, correct, num_bins: int) -> float:
  """Equal-mass bins: sorted by confidence (ties: incorrect first), np.array_split in num_bins."""
  _check_num_bins(num_bins)
  order = np.lexsort((correct, confidence))  # [N] order-independent for equal inputs
  total = 0.0
  for part in np.array_split(order, num_bins):
    if len(part):
      total += abs(correct[part].sum() - confidence[part].sum())
  return float(total / len(order))


def finalize_sums(sums: dict, adaptive_bins: int = ADAPTIVE_BINS) -> dict:
  """Every metric from sums: `ece`/`mce` (10 bins), `ece_<B>` for other bin counts, etc."""
  sums = host_sums(sums)
  num_bins, cw_bins, _, keep = _layout(sums)
  n = float(sums['count'])
  if n <= 0:
    raise ValueError(
      'the sums hold no examples; call update_sums with at least one unmasked example first.'
    )
  accuracy = float(sums['correct']) / n
  out = {'accuracy': accuracy, 'error_rate': 1.0 - accuracy}
  for nb in num_bins:
    bins = [sums[f'bins{nb}_{k}'] for k in ('count', 'conf', 'correct')]
    if nb == HEADLINE_BINS:
      out['ece'] = _binned_ece(*bins[1:], n)
      out['mce'] = _binned_mce(*bins)
    else:
      out[f'ece_{nb}'] = _binned_ece(*bins[1:], n)
  if keep:
    out['adaptive_ece'] = _equal_mass_ece(
      sums['example_confidence'], sums['example_correct'], adaptive_bins
    )
  if cw_bins:
    gap = np.abs(sums[f'classwise{cw_bins}_prob'] - sums[f'classwise{cw_bins}_label'])  # [C, B]
    out['classwise_ece'] = float(gap.sum(axis=1).mean() / n)
  out['nll'] = float(sums['nll']) / n
  out['brier'] = float(sums['brier']) / n
  return out


def reliability_table_from_sums(sums: dict, num_bins: int = HEADLINE_BINS) -> dict:
  """Reliability table (bin_lo, bin_hi, count, mean_conf, accuracy) from sums; empty bins 0."""
  sums = host_sums(sums)
  if f'bins{num_bins}_count' not in sums:
    raise ValueError(
      f'the sums hold no {num_bins}-bin statistics (they have '
      f'{_layout(sums)[0]}); build them with num_bins including {num_bins}.'
    )
  count = sums[f'bins{num_bins}_count']
  safe = np.maximum(count, 1.0)
  edges = bin_edges(num_bins, np.float64)
  return {
    'bin_lo': edges[:-1],
    'bin_hi': edges[1:],
    'count': count,
    'mean_conf': np.where(count > 0, sums[f'bins{num_bins}_conf'] / safe, 0.0),
    'accuracy': np.where(count > 0, sums[f'bins{num_bins}_correct'] / safe, 0.0),
  }


# ----------------------------------------------------------------------------
# One-shot metrics on host arrays.


def _one_shot(
  probs, labels, num_bins=(), classwise_bins=None, keep_examples=False, mask=None
) -> dict:
  probs_np = np.asarray(probs)
  if probs_np.ndim != 2:
    raise ValueError(f'probs must be [num_examples, num_classes], got shape {probs_np.shape}.')
  sums = init_sums(max(1, probs_np.shape[1]), num_bins, classwise_bins, keep_examples)
  return update_sums(sums, probs_np, labels, mask)


def ece(probs, labels, num_bins: int = 10) -> float:
  """Expected calibration error with equal-width bins ([lo, hi), last closed), a fraction."""
  s = _one_shot(probs, labels, (num_bins,))
  return _binned_ece(s[f'bins{num_bins}_conf'], s[f'bins{num_bins}_correct'], _nonempty(s))


def mce(probs, labels, num_bins: int = 10) -> float:
  """Maximum over non-empty equal-width bins of |acc_b - conf_b|."""
  s = _one_shot(probs, labels, (num_bins,))
  _nonempty(s)
  return _binned_mce(*(s[f'bins{num_bins}_{k}'] for k in ('count', 'conf', 'correct')))


def adaptive_ece(probs, labels, num_bins: int = ADAPTIVE_BINS) -> float:
  """ECE with equal-mass bins (sorted confidences split into num_bins near-equal parts)."""
  _check_num_bins(num_bins)
  s = _one_shot(probs, labels, keep_examples=True)
  _nonempty(s)
  return _equal_mass_ece(s['example_confidence'], s['example_correct'], num_bins)


def classwise_ece(probs, labels, num_bins: int = CLASSWISE_BINS) -> float:
  """Kull et al. 2019: mean over classes c of the equal-width binned ECE of p_c vs 1[y=c]."""
  s = _one_shot(probs, labels, classwise_bins=num_bins)
  n = _nonempty(s)
  gap = np.abs(s[f'classwise{num_bins}_prob'] - s[f'classwise{num_bins}_label'])  # [C, B]
  return float(gap.sum(axis=1).mean() / n)


def nll(probs, labels) -> float:
  """Mean negative log-likelihood of the labels (p clipped at the dtype's smallest normal)."""
  s = _one_shot(probs, labels)
  return float(s['nll']) / _nonempty(s)


def brier(probs, labels) -> float:
  """Brier score: sum over classes of (p_c - 1[y=c])^2, mean over examples."""
  s = _one_shot(probs, labels)
  return float(s['brier']) / _nonempty(s)


def accuracy(probs, labels) -> float:
  """Top-1 accuracy as a fraction."""
  s = _one_shot(probs, labels)
  return float(s['correct']) / _nonempty(s)


def error_rate(probs, labels) -> float:
  """Top-1 error as a fraction."""
  return 1.0 - accuracy(probs, labels)


def reliability_table(probs, labels, num_bins: int = HEADLINE_BINS) -> dict:
  """Per equal-width bin: bin_lo, bin_hi, count, mean_conf, accuracy (empty bins: 0, 0)."""
  s = _one_shot(probs, labels, (num_bins,))
  _nonempty(s)
  return reliability_table_from_sums(s, num_bins)


def summary(probs, labels, mask=None) -> dict:
  """Every metric of SUMMARY_KEYS on one set of probabilities [N, C] and labels [N]."""
  return finalize_sums(_one_shot(probs, labels, DEFAULT_BINS, CLASSWISE_BINS, True, mask))


def _nonempty(sums: dict) -> float:
  n = float(sums['count'])
  if n <= 0:
    raise ValueError('no (unmasked) examples: metrics need at least one.')
  return n


# ----------------------------------------------------------------------------
# Input checks (host; shape checks also at trace time for the jax path).


def _check_shapes(probs, labels, mask) -> None:
  if np.ndim(probs) != 2:
    raise ValueError(f'probs must be [num_examples, num_classes], got shape {np.shape(probs)}.')
  n = np.shape(probs)[0]
  if np.ndim(labels) != 1 or np.shape(labels)[0] != n:
    raise ValueError(
      f'labels must be [num_examples] = [{n}] integer classes, got shape {np.shape(labels)}.'
    )
  if mask is not None and (np.ndim(mask) != 1 or np.shape(mask)[0] != n):
    raise ValueError(
      f'mask must be [num_examples] = [{n}] (1 = real example, 0 = padding), '
      f'got shape {np.shape(mask)}.'
    )
  if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
    raise ValueError(
      f'labels must be integer class indices, got dtype '
      f'{jnp.result_type(labels)}; cast with labels.astype(int).'
    )


def _check_host_inputs(probs, labels, mask):
  """-> (probs in compute dtype [n, C], int64 labels [n], bool valid [n]) or ValueError."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  mask = None if mask is None else np.asarray(mask)
  _check_shapes(probs, labels, mask)
  if not (np.issubdtype(probs.dtype, np.number) or probs.dtype == bool) or np.issubdtype(
    probs.dtype, np.complexfloating
  ):
    raise ValueError(f'probs must be real numbers, got dtype {probs.dtype}.')
  probs = probs.astype(compute_dtype(probs.dtype))
  valid = np.ones(len(labels), bool) if mask is None else mask > 0
  num_classes = probs.shape[1]
  p, y = probs[valid], labels[valid]
  if len(y) and (y.min() < 0 or y.max() >= num_classes):
    raise ValueError(
      f'labels must lie in [0, {num_classes}) for unmasked examples, got range '
      f'[{y.min()}, {y.max()}]; mask padding rows with mask=0.'
    )
  if not np.all(np.isfinite(p)):
    raise ValueError(
      'probs contain NaN or Inf (a diverged model?); metrics need finite probabilities.'
    )
  tol = 1e-3 if probs.dtype.itemsize >= 4 else 5e-2
  if len(y) and (p.min() < -tol or p.max() > 1 + tol or np.max(np.abs(p.sum(axis=1) - 1.0)) > tol):
    raise ValueError(
      'probs must be probabilities (in [0, 1], rows summing to 1); these look '
      'like logits: apply softmax first, e.g. jax.nn.softmax(logits, axis=-1).'
    )
  return probs, labels.astype(np.int64), valid


def _check_logits(logits, labels) -> tuple:
  logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
  _check_shapes(logits, labels, None)
  if len(labels) == 0:
    raise ValueError('fit_temperature needs at least one example.')
  if labels.min() < 0 or labels.max() >= logits.shape[1]:
    raise ValueError(
      f'labels must lie in [0, {logits.shape[1]}), got range [{labels.min()}, {labels.max()}].'
    )
  if not np.all(np.isfinite(logits)):
    raise ValueError('logits contain NaN or Inf; temperature scaling needs finite logits.')
  return logits, labels.astype(np.int64)


# ----------------------------------------------------------------------------
# Temperature scaling (Guo et al. 2017).


def temperature_nll(logits, labels, temperature: float) -> float:
  """Mean NLL of softmax(logits / T) in float64 (exact log-softmax, no clipping)."""
  logits, labels = _check_logits(logits, labels)
  return _temperature_nll(*_shifted_logits(logits, labels), float(temperature))


def _shifted_logits(logits: np.ndarray, labels: np.ndarray) -> tuple:
  """(z - max_c z [N, C] <= 0, z_y - max_c z [N]): logsumexp then needs no max per call."""
  shifted = logits - logits.max(axis=1, keepdims=True)  # [N, C]
  return shifted, np.take_along_axis(shifted, labels[:, None], axis=1)[:, 0]


def _temperature_nll(shifted: np.ndarray, shifted_true: np.ndarray, temperature: float) -> float:
  beta = 1.0 / temperature
  log_norm = np.log(np.exp(beta * shifted).sum(axis=1))  # [N] >= 0: the max term is exp(0)
  return float(np.mean(log_norm - beta * shifted_true))


def fit_temperature(logits, labels, bounds: tuple = (0.01, 100.0), xatol: float = 1e-5) -> float:
  """Temperature T in `bounds` minimising the NLL of softmax(logits / T) on (logits, labels).

  NLL is convex in 1/T, hence unimodal in log T: bounded Brent search over log T
  (deterministic; `xatol` in log T; a bound is returned when the optimum lies
  outside, e.g. on perfectly separated data where NLL keeps falling as T -> 0).
  """
  lo, hi = (float(b) for b in bounds)
  if not (0 < lo < hi and np.isfinite(hi)):
    raise ValueError(f'bounds must be 0 < lo < hi < inf, got {bounds}.')
  shifted, shifted_true = _shifted_logits(*_check_logits(logits, labels))
  result = scipy.optimize.minimize_scalar(
    lambda log_t: _temperature_nll(shifted, shifted_true, float(np.exp(log_t))),
    bounds=(np.log(lo), np.log(hi)),
    method='bounded',
    options={'xatol': xatol},
  )
  return float(np.clip(np.exp(result.x), lo, hi))


def apply_temperature(logits, temperature: float):
  """logits / T (numpy or jax); softmax of the result is the temperature-scaled prediction."""
  t = float(temperature)
  if not (np.isfinite(t) and t > 0):
    raise ValueError(f'temperature must be a finite positive number, got {temperature!r}.')
  return logits / t
