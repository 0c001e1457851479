"""Calibration metrics: hand-computed values, loop references, streaming, jax sums, temperature."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import metrics

# Six examples, three classes. Confidences 1.0 (last bin, closed), 0.7, 0.8 and
# 0.5 exactly on bin edges (they go to the bin that starts there), 0.75, 0.4.
HAND_PROBS = np.array(
  [
    [1.0, 0.0, 0.0],  # y=0 correct, conf 1.0 -> bin 9
    [0.7, 0.2, 0.1],  # y=1 wrong,   conf 0.7 -> bin 7 [0.7, 0.8)
    [0.1, 0.1, 0.8],  # y=2 correct, conf 0.8 -> bin 8
    [0.75, 0.25, 0.0],  # y=0 correct, conf 0.75 -> bin 7
    [0.5, 0.3, 0.2],  # y=2 wrong,   conf 0.5 -> bin 5
    [0.4, 0.35, 0.25],  # y=0 correct, conf 0.4 -> bin 4
  ]
)
HAND_LABELS = np.array([0, 1, 2, 0, 2, 0])


# ----------------------------------------------------------------------------
# Straightforward loop implementations (independent of the vectorised code).


def loop_bins(conf, correct, num_bins):
  """Per-bin (count, sum conf, sum correct) with [lo, hi) bins, last bin [lo, 1] closed."""
  count, csum, asum = [0] * num_bins, [0.0] * num_bins, [0.0] * num_bins
  for c, ok in zip(conf, correct):
    for b in range(num_bins):
      lo, hi = b / num_bins, (b + 1) / num_bins
      if lo <= c < hi or (b == num_bins - 1 and lo <= c <= 1.0):
        count[b] += 1
        csum[b] += c
        asum[b] += ok
        break
  return count, csum, asum


def loop_ece(probs, labels, num_bins):
  conf = [max(row) for row in probs.tolist()]
  correct = [float(int(np.argmax(row)) == y) for row, y in zip(probs, labels)]
  count, csum, asum = loop_bins(conf, correct, num_bins)
  n = len(labels)
  ece_value, mce_value = 0.0, 0.0
  for k, cs, a in zip(count, csum, asum):
    if k:
      gap = abs(a / k - cs / k)
      ece_value += k / n * gap
      mce_value = max(mce_value, gap)
  return ece_value, mce_value


def loop_adaptive_ece(probs, labels, num_bins):
  pairs = sorted(
    (max(row), float(int(np.argmax(row)) == y)) for row, y in zip(probs.tolist(), labels)
  )
  n, total, start = len(pairs), 0.0, 0
  for b in range(num_bins):
    size = n // num_bins + (1 if b < n % num_bins else 0)
    chunk = pairs[start : start + size]
    start += size
    if chunk:
      acc = sum(p[1] for p in chunk) / len(chunk)
      conf = sum(p[0] for p in chunk) / len(chunk)
      total += len(chunk) / n * abs(acc - conf)
  return total


def loop_classwise_ece(probs, labels, num_bins):
  n, num_classes = probs.shape
  per_class = []
  for c in range(num_classes):
    count, psum, lsum = loop_bins(probs[:, c].tolist(), [float(y == c) for y in labels], num_bins)
    per_class.append(sum(k / n * abs(ls / k - ps / k) for k, ps, ls in zip(count, psum, lsum) if k))
  return sum(per_class) / num_classes


def loop_nll_brier(probs, labels):
  nll_total, brier_total = 0.0, 0.0
  for row, y in zip(probs.tolist(), labels):
    nll_total -= math.log(row[y])
    brier_total += sum((p - float(c == y)) ** 2 for c, p in enumerate(row))
  return nll_total / len(labels), brier_total / len(labels)


def random_problem(seed, n=300, num_classes=5, scale=3.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, num_classes)) * scale  # [n, C]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  labels = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, num_classes, n))
  return probs, labels


# ----------------------------------------------------------------------------
# Hand-computed values.


def test_ece_and_mce_by_hand():
  # bins: 4 {0.4 ok}, 5 {0.5 wrong}, 7 {0.7 wrong, 0.75 ok}, 8 {0.8 ok}, 9 {1.0 ok}
  # ECE = (0.6 + 0.5 + 2 * |0.5 - 0.725| + 0.2 + 0) / 6 = 1.75 / 6
  assert metrics.ece(HAND_PROBS, HAND_LABELS) == pytest.approx(1.75 / 6, abs=1e-12)
  assert metrics.mce(HAND_PROBS, HAND_LABELS) == pytest.approx(0.6, abs=1e-12)
  # 15 bins: 0.4 -> [6/15, 7/15), 0.5 -> bin 7, 0.7 -> bin 10, 0.75 -> 11, 0.8 -> 12 (edge),
  # 1.0 -> 14: every example alone, gaps 0.6 + 0.5 + 0.7 + 0.25 + 0.2 + 0 = 2.25.
  assert metrics.ece(HAND_PROBS, HAND_LABELS, 15) == pytest.approx(2.25 / 6, abs=1e-12)


def test_reliability_table_by_hand():
  table = metrics.reliability_table(HAND_PROBS, HAND_LABELS, 10)
  np.testing.assert_array_equal(table['count'], [0, 0, 0, 0, 1, 1, 0, 2, 1, 1])
  np.testing.assert_allclose(
    table['mean_conf'], [0, 0, 0, 0, 0.4, 0.5, 0, 0.725, 0.8, 1.0], atol=1e-12
  )
  np.testing.assert_allclose(table['accuracy'], [0, 0, 0, 0, 1, 0, 0, 0.5, 1, 1])
  np.testing.assert_allclose(table['bin_lo'], np.arange(10) / 10)
  np.testing.assert_allclose(table['bin_hi'], np.arange(1, 11) / 10)


def test_other_metrics_by_hand():
  assert metrics.accuracy(HAND_PROBS, HAND_LABELS) == pytest.approx(4 / 6)
  assert metrics.error_rate(HAND_PROBS, HAND_LABELS) == pytest.approx(2 / 6)
  p_true = [1.0, 0.2, 0.8, 0.75, 0.2, 0.4]
  assert metrics.nll(HAND_PROBS, HAND_LABELS) == pytest.approx(
    -sum(math.log(p) for p in p_true) / 6, abs=1e-12
  )
  # per example: 0, 0.49+0.64+0.01, 0.01+0.01+0.04, 0.0625*2, 0.25+0.09+0.64, 0.36+0.1225+0.0625
  assert metrics.brier(HAND_PROBS, HAND_LABELS) == pytest.approx(2.85 / 6, abs=1e-12)
  # equal mass, 3 bins of 2: {0.4 ok, 0.5 x} 0.1, {0.7 x, 0.75 ok} 0.45, {0.8, 1.0 ok} 0.2
  assert metrics.adaptive_ece(HAND_PROBS, HAND_LABELS, 3) == pytest.approx(0.75 / 6, abs=1e-12)
  # 2 bins [0, .5), [.5, 1]: class 0 gaps 0.5 + 0.95, class 1 0.2, class 2 0.45 + 0.2
  assert metrics.classwise_ece(HAND_PROBS, HAND_LABELS, 2) == pytest.approx(2.3 / 18, abs=1e-12)


def test_summary_keys_and_consistency():
  s = metrics.summary(HAND_PROBS, HAND_LABELS)
  assert tuple(sorted(s)) == tuple(sorted(metrics.SUMMARY_KEYS))
  assert s['ece'] == pytest.approx(1.75 / 6)
  assert s['ece_15'] == pytest.approx(2.25 / 6)
  assert s['classwise_ece'] == pytest.approx(metrics.classwise_ece(HAND_PROBS, HAND_LABELS))
  assert s['adaptive_ece'] == pytest.approx(metrics.adaptive_ece(HAND_PROBS, HAND_LABELS))
  assert s['accuracy'] + s['error_rate'] == pytest.approx(1.0)


def test_bin_edges_are_exact_in_float32_and_float64():
  for dtype in (np.float32, np.float64):
    for num_bins in (10, 15, 49):
      edges = metrics.bin_edges(num_bins, dtype)
      values = edges.copy()  # every edge k/B goes to bin k (bin B-1 for 1.0)
      expected = np.minimum(np.arange(num_bins + 1), num_bins - 1)
      np.testing.assert_array_equal(metrics.bin_index(values, num_bins), expected)
      np.testing.assert_array_equal(
        np.asarray(metrics.bin_index(jnp.asarray(values.astype(np.float32)), num_bins)), expected
      )
  # literals: 0.1 -> [0.1, 0.2), 0.3 -> bin 3, 0.7 -> bin 7 (0.7 / 0.1 < 7 in float64)
  np.testing.assert_array_equal(metrics.bin_index(np.array([0.1, 0.3, 0.7, 1.0]), 10), [1, 3, 7, 9])


# ----------------------------------------------------------------------------
# Against loop implementations on random inputs.


@pytest.mark.parametrize('seed', [0, 1])
def test_metrics_match_loops(seed):
  probs, labels = random_problem(seed)
  for num_bins in (10, 15):
    ref_ece, ref_mce = loop_ece(probs, labels, num_bins)
    assert metrics.ece(probs, labels, num_bins) == pytest.approx(ref_ece, abs=1e-12)
    assert metrics.mce(probs, labels, num_bins) == pytest.approx(ref_mce, abs=1e-12)
  for num_bins in (15, 7):
    assert metrics.adaptive_ece(probs, labels, num_bins) == pytest.approx(
      loop_adaptive_ece(probs, labels, num_bins), abs=1e-12
    )
    assert metrics.classwise_ece(probs, labels, num_bins) == pytest.approx(
      loop_classwise_ece(probs, labels, num_bins), abs=1e-12
    )
  ref_nll, ref_brier = loop_nll_brier(probs, labels)
  assert metrics.nll(probs, labels) == pytest.approx(ref_nll, rel=1e-12)
  assert metrics.brier(probs, labels) == pytest.approx(ref_brier, rel=1e-12)
  assert metrics.accuracy(probs, labels) == pytest.approx(np.mean(probs.argmax(1) == labels))


def test_adaptive_ece_fewer_examples_than_bins():
  probs, labels = HAND_PROBS[:4], HAND_LABELS[:4]
  assert metrics.adaptive_ece(probs, labels, 15) == pytest.approx(
    loop_adaptive_ece(probs, labels, 15), abs=1e-12
  )


def test_nll_of_zero_probability_is_finite():
  probs = np.array([[1.0, 0.0], [0.5, 0.5]])
  value = metrics.nll(probs, np.array([1, 0]))
  assert math.isfinite(value) and value > 300  # -log(tiny float64) / 2 + log(2) / 2


# ----------------------------------------------------------------------------
# Streaming and the jax per-batch sums.


def _padded_batches(probs, labels, sizes, pad_to):
  """Batches of the given sizes, each padded with garbage rows (NaN probs, label -1, mask 0)."""
  start = 0
  for size in sizes:
    p = np.full((pad_to, probs.shape[1]), np.nan)
    y = np.full(pad_to, -1)
    m = np.zeros(pad_to)
    p[:size], y[:size], m[:size] = probs[start : start + size], labels[start : start + size], 1
    start += size
    yield p, y, m


def test_streaming_with_padding_equals_one_shot():
  probs, labels = random_problem(3, n=100, num_classes=4)
  sums = metrics.init_sums(4)
  for p, y, m in _padded_batches(probs, labels, (37, 1, 50, 12), 64):
    sums = metrics.update_sums(sums, p, y, m)
  streamed = metrics.finalize_sums(sums)
  one_shot = metrics.summary(probs, labels)
  assert sorted(streamed) == sorted(one_shot)
  for k, v in one_shot.items():
    assert streamed[k] == pytest.approx(v, abs=1e-12), k
  np.testing.assert_allclose(
    metrics.reliability_table_from_sums(sums, 15)['count'],
    metrics.reliability_table(probs, labels, 15)['count'],
  )


def test_merge_sums_is_union():
  probs, labels = random_problem(4, n=80, num_classes=3)
  a = metrics.update_sums(metrics.init_sums(3), probs[:30], labels[:30])
  b = metrics.update_sums(metrics.init_sums(3), probs[30:], labels[30:])
  merged = metrics.finalize_sums(metrics.merge_sums(a, b))
  for k, v in metrics.summary(probs, labels).items():
    assert merged[k] == pytest.approx(v, abs=1e-12), k
  with pytest.raises(ValueError, match='same num_classes'):
    metrics.merge_sums(a, metrics.init_sums(4))


def test_jax_batch_sums_equal_numpy_sums():
  probs, labels = random_problem(5, n=90, num_classes=6)
  probs32 = probs.astype(np.float32)
  step = jax.jit(metrics.batch_calibration_sums)
  host = metrics.init_sums(6)
  device_outputs = []
  for p, y, m in _padded_batches(probs32, labels, (40, 50), 64):
    p = np.where(m[:, None] > 0, p, 0.0).astype(np.float32)  # device padding is finite
    device_outputs.append(step(jnp.asarray(p), jnp.asarray(y, jnp.int32), jnp.asarray(m)))
    host = metrics.update_sums(host, p, y, m)
  streamed = metrics.merge_sums(*device_outputs)
  stacked = metrics.host_sums(jax.tree.map(lambda *x: jnp.stack(x), *device_outputs))
  for k in host:
    np.testing.assert_allclose(streamed[k], host[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(stacked[k], host[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for k in ('count', 'bins10_count', 'bins15_count', 'classwise15_count', 'correct'):
    np.testing.assert_array_equal(streamed[k], host[k], err_msg=k)  # bins agree exactly
  assert len(streamed['example_confidence']) == 90
  for k, v in metrics.finalize_sums(host).items():
    assert metrics.finalize_sums(streamed)[k] == pytest.approx(v, abs=1e-5), k


def test_jax_and_numpy_bin_float32_edges_identically():
  probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.9, 0.1], [0.6, 0.4], [1.0, 0.0]], np.float32)
  labels = np.array([0, 0, 0, 1, 0])
  dev = metrics.host_sums(metrics.batch_calibration_sums(jnp.asarray(probs), jnp.asarray(labels)))
  host = metrics.update_sums(metrics.init_sums(2), probs, labels)
  np.testing.assert_array_equal(dev['bins10_count'], host['bins10_count'])
  np.testing.assert_array_equal(host['bins10_count'], [0, 0, 0, 0, 0, 0, 1, 2, 0, 2])


def test_keep_examples_false_drops_adaptive_only():
  probs, labels = random_problem(6, n=50, num_classes=3)
  sums = metrics.update_sums(metrics.init_sums(3, keep_examples=False), probs, labels)
  out = metrics.finalize_sums(sums)
  assert 'adaptive_ece' not in out and out['ece'] == pytest.approx(metrics.ece(probs, labels))


# ----------------------------------------------------------------------------
# Temperature scaling.


@pytest.mark.parametrize('true_t', [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(true_t):
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(20000, 10)) * 3.0  # [N, C]
  scaled = logits / true_t
  p = np.exp(scaled - scaled.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  labels = (p.cumsum(1) > rng.random((len(p), 1))).argmax(1)  # y ~ softmax(z / T*)
  fitted = metrics.fit_temperature(logits, labels)
  assert fitted == pytest.approx(true_t, rel=0.05)
  assert fitted == metrics.fit_temperature(logits, labels)  # deterministic
  best = metrics.temperature_nll(logits, labels, fitted)
  for other in (fitted * 0.9, fitted * 1.1, 1.0):
    assert best <= metrics.temperature_nll(logits, labels, other)


def test_unit_temperature_leaves_metrics_unchanged():
  probs, labels = random_problem(8, n=200, num_classes=4)
  logits = np.log(probs)
  scaled = metrics.apply_temperature(logits, 1.0)
  again = np.exp(scaled - scaled.max(1, keepdims=True))
  again /= again.sum(1, keepdims=True)
  before, after = metrics.summary(probs, labels), metrics.summary(again, labels)
  for k, v in before.items():
    assert after[k] == pytest.approx(v, abs=1e-12), k
  np.testing.assert_allclose(
    np.asarray(metrics.apply_temperature(jnp.asarray(logits), 2.0)), logits / 2.0, rtol=1e-6
  )


# ----------------------------------------------------------------------------
# Bad input.


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match='softmax'):
    metrics.ece(np.array([[2.0, -1.0], [0.5, 3.0]]), np.array([0, 1]))
  with pytest.raises(ValueError, match=r'labels must lie in \[0, 3\)'):
    metrics.ece(HAND_PROBS, np.array([0, 1, 2, 3, 0, 0]))
  with pytest.raises(ValueError, match='labels must be'):
    metrics.summary(HAND_PROBS, HAND_LABELS[:4])
  with pytest.raises(ValueError, match='integer'):
    metrics.ece(HAND_PROBS, HAND_LABELS.astype(float))
  with pytest.raises(ValueError, match='mask'):
    metrics.update_sums(metrics.init_sums(3), HAND_PROBS, HAND_LABELS, np.ones(2))
  with pytest.raises(ValueError, match='NaN'):
    metrics.nll(np.array([[np.nan, 1.0]]), np.array([0]))
  with pytest.raises(ValueError, match='init_sums'):
    metrics.update_sums(metrics.init_sums(4), HAND_PROBS, HAND_LABELS)
  with pytest.raises(ValueError, match='no'):
    metrics.finalize_sums(metrics.init_sums(3))
  with pytest.raises(ValueError, match='num_bins'):
    metrics.ece(HAND_PROBS, HAND_LABELS, 0)
  with pytest.raises(ValueError, match='temperature'):
    metrics.apply_temperature(np.zeros((2, 2)), 0.0)
  with pytest.raises(ValueError, match='probs must be'):
    metrics.batch_calibration_sums(jnp.zeros((4,)), jnp.zeros((4,), jnp.int32))
