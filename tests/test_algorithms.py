"""Base SSL algorithms: losses, FixMatch, FlexMatch, SoftMatch against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import algorithms
from cmix_jax.algorithms import flexmatch
from cmix_jax.algorithms import softmatch
from configs import default


def logits_of(probs):
  """Logits whose softmax is exactly `probs` (rows sum to 1)."""
  return jnp.log(jnp.asarray(probs, jnp.float32))


def run_steps(algo, state, batches, axis_name=None):
  """Jitted pseudo_label over consecutive (logits, idx) batches -> [(pseudo, metrics)], state."""
  step = jax.jit(lambda s, l, i: algo.pseudo_label(s, l, i, axis_name=axis_name))
  outs = []
  for logits, idx in batches:
    pseudo, state, metrics = step(state, logits, jnp.asarray(idx, jnp.int32))
    outs.append((pseudo, metrics))
  return outs, state


# ----------------------------------------------------------------------------
# Losses.


def test_unsup_loss_is_weighted_ce_mean_over_all_samples():
  logits_s = jnp.array([[0.0, math.log(3)], [math.log(3), 0.0], [0.0, 0.0]])  # p1 = .75, .25, .5
  pseudo = algorithms.PseudoLabels(
    label=jnp.array([1, 1, 0]), weight=jnp.array([1.0, 0.5, 0.0]), max_prob=jnp.ones(3)
  )
  expected = (math.log(4 / 3) + 0.5 * math.log(4)) / 3  # the zero-weight sample still divides
  assert expected == pytest.approx(0.326943, abs=1e-6)
  loss = jax.jit(algorithms.unsup_loss)(logits_s, pseudo)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  loss_bf16 = algorithms.unsup_loss(logits_s.astype(jnp.bfloat16), pseudo)
  assert loss_bf16.dtype == jnp.float32
  np.testing.assert_allclose(loss_bf16, expected, rtol=1e-2)


def test_supervised_loss_and_label_smoothing():
  logits = jnp.array([[0.0, math.log(3)], [math.log(3), 0.0]])  # probs (.25, .75), (.75, .25)
  labels = jnp.array([1, 0])
  np.testing.assert_allclose(
    algorithms.supervised_loss(logits, labels), math.log(4 / 3), rtol=1e-6
  )  # 0.287682
  # a = 0.2, C = 2: targets (0.1, 0.9) -> -(0.9 log .75 + 0.1 log .25) = 0.397543 per row.
  expected = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
  assert expected == pytest.approx(0.397543, abs=1e-6)
  np.testing.assert_allclose(
    jax.jit(algorithms.supervised_loss)(logits, labels, 0.2), expected, rtol=1e-6
  )
  with pytest.raises(ValueError, match='label_smoothing'):
    algorithms.supervised_loss(logits, labels, 1.5)
  with pytest.raises(ValueError, match='labels'):
    algorithms.supervised_loss(logits, labels[:1])


# ----------------------------------------------------------------------------
# Construction.


def test_get_algorithm_reads_config_and_rejects_bad_values():
  config = default.get_config()
  assert algorithms.ALGORITHM_NAMES == ('supervised', 'fixmatch', 'flexmatch', 'softmatch')
  kinds = {}
  for name in algorithms.ALGORITHM_NAMES:
    config.algorithm = name
    algo = algorithms.get_algorithm(config)
    assert algo.name == name
    kinds[name] = algo
  assert not kinds['supervised'].uses_unlabeled
  assert all(kinds[n].uses_unlabeled for n in ('fixmatch', 'flexmatch', 'softmatch'))
  config.algorithm = 'flexmatch'
  config.ssl.p_cutoff, config.ssl.thresh_warmup = 0.7, False
  assert algorithms.get_algorithm(config) == algorithms.FlexMatch(p_cutoff=0.7, thresh_warmup=False)
  config.algorithm = 'softmatch'
  config.ssl.ema_p, config.ssl.n_sigma, config.ssl.dist_align = 0.9, 3.0, False
  algo = algorithms.get_algorithm(config)
  assert algo == algorithms.SoftMatch(ema_p=0.9, n_sigma=3.0, dist_align=False)
  hash(algo)  # usable as a jit static argument

  config.algorithm = 'meanteacher'
  with pytest.raises(ValueError, match='supervised, fixmatch, flexmatch, softmatch'):
    algorithms.get_algorithm(config)
  config.algorithm = 'fixmatch'
  config.ssl.p_cutoff = 1.5
  with pytest.raises(ValueError, match='p_cutoff'):
    algorithms.get_algorithm(config)
  config.algorithm = 'softmatch'
  config.ssl.ema_p = 1.0
  with pytest.raises(ValueError, match='ema_p'):
    algorithms.get_algorithm(config)


def test_supervised_has_no_pseudo_labels():
  algo = algorithms.Supervised()
  assert algo.init_state(10, 3) == {}
  with pytest.raises(ValueError, match='uses_unlabeled'):
    algo.pseudo_label({}, jnp.zeros((2, 3)), jnp.arange(2))


def test_bad_inputs_raise_before_compiling():
  algo = algorithms.FlexMatch()
  state = algo.init_state(10, 3)
  with pytest.raises(ValueError, match='init_state'):
    algo.pseudo_label(state, jnp.zeros((2, 4)), jnp.arange(2))  # 4 classes, state for 3
  with pytest.raises(ValueError, match='integer'):
    algo.pseudo_label(state, jnp.zeros((2, 3)), jnp.arange(2.0))
  with pytest.raises(ValueError, match='idx_ulb'):
    algo.pseudo_label(state, jnp.zeros((2, 3)), jnp.arange(3))
  with pytest.raises(ValueError, match='num_classes'):
    algo.init_state(10, 1)
  with pytest.raises(ValueError, match='variance'):
    algorithms.SoftMatch().pseudo_label(
      algorithms.SoftMatch().init_state(4, 3), jnp.zeros((1, 3)), jnp.arange(1)
    )


# ----------------------------------------------------------------------------
# FixMatch.


def test_fixmatch_mask_and_loss():
  algo = algorithms.FixMatch(p_cutoff=0.95)
  probs = [[0.96, 0.02, 0.02], [0.05, 0.90, 0.05], [0.01, 0.02, 0.97], [0.3, 0.3, 0.4]]
  ((pseudo, metrics),) = run_steps(algo, algo.init_state(8, 3), [(logits_of(probs), range(4))])[0]
  np.testing.assert_array_equal(pseudo.label, [0, 1, 2, 2])
  np.testing.assert_array_equal(pseudo.weight, [1, 0, 1, 0])
  np.testing.assert_allclose(pseudo.max_prob, [0.96, 0.90, 0.97, 0.4], rtol=1e-6)
  assert metrics['mask_ratio'] == pytest.approx(0.5)
  # Uniform strong logits: CE = log 3 for every sample, two of four kept -> log(3) / 2.
  loss = algorithms.unsup_loss(jnp.zeros((4, 3)), pseudo)
  np.testing.assert_allclose(loss, math.log(3) / 2, rtol=1e-6)


# ----------------------------------------------------------------------------
# FlexMatch: N = 6 unlabeled samples, C = 3 classes, p_cutoff = 0.95.

FLEX_STEPS = [
  # step 1: sigma = 0 -> every threshold 0; idx 0, 1, 2 are selected.
  ([[0.99, 0.005, 0.005], [0.005, 0.99, 0.005], [0.97, 0.02, 0.01], [0.2, 0.2, 0.6]], [0, 1, 2, 3]),
  # step 2: idx 4 appears twice, both selected: the LAST (class 1) wins.
  ([[0.5, 0.3, 0.2], [0.005, 0.005, 0.99], [0.3, 0.4, 0.3], [0.01, 0.98, 0.01]], [3, 4, 5, 4]),
  # step 3: idx 5 twice, only the first selected (class 2): an unselected repeat writes nothing.
  ([[0.005, 0.005, 0.99], [0.5, 0.3, 0.2], [0.02, 0.02, 0.96], [0.015, 0.97, 0.015]], [5, 5, 3, 0]),
]


def _flex_run(thresh_warmup):
  algo = algorithms.FlexMatch(p_cutoff=0.95, thresh_warmup=thresh_warmup)
  batches = [(logits_of(p), idx) for p, idx in FLEX_STEPS]
  return run_steps(algo, algo.init_state(6, 3), batches)


def test_flexmatch_thresholds_with_warmup():
  outs, state = _flex_run(thresh_warmup=True)
  (p1, m1), (p2, m2), (p3, m3) = outs
  # Step 1 masks with sigma = 0 (USB computes sigma AFTER the mask): all pass.
  np.testing.assert_array_equal(p1.weight, [1, 1, 1, 1])
  assert m1['mean_threshold'] == 0.0
  # After step 1: table (0, 1, 0, -1, -1, -1); counts -1: 3, c0: 2, c1: 1, c2: 0.
  # Warm-up: unused samples dominate, sigma = count / 3 = (2/3, 1/3, 0);
  # thresholds 0.95 * sigma / (2 - sigma) = (0.95 * 0.5, 0.95 * 0.2, 0) = (0.475, 0.19, 0).
  assert m2['mean_threshold'] == pytest.approx((0.475 + 0.19) / 3, abs=1e-6)
  # Step 2: idx 3 class 0 at 0.5 >= 0.475; idx 5 class 1 at 0.4 >= 0.19.
  np.testing.assert_array_equal(p2.weight, [1, 1, 1, 1])
  # After step 2: table (0, 1, 0, -1, 1, -1); counts -1: 2, c0: 2, c1: 2 -> sigma (1, 1, 0),
  # thresholds (0.95, 0.95, 0).
  assert m3['mean_threshold'] == pytest.approx(0.95 * 2 / 3, abs=1e-6)
  np.testing.assert_array_equal(p3.weight, [1, 0, 1, 1])  # 0.5 < 0.95 for class 0
  np.testing.assert_array_equal(p3.label, [2, 0, 2, 1])
  # After step 3: table (1, 1, 0, 2, 1, 2); counts c0: 1, c1: 3, c2: 2 -> sigma (1/3, 1, 2/3).
  np.testing.assert_array_equal(state.selected_label, [1, 1, 0, 2, 1, 2])
  np.testing.assert_allclose(state.classwise_acc, [1 / 3, 1.0, 2 / 3], rtol=1e-6)
  assert float(m3['selected_frac']) == 1.0
  assert float(m2['selected_frac']) == pytest.approx(4 / 6)


def test_flexmatch_thresholds_without_warmup():
  outs, state = _flex_run(thresh_warmup=False)
  (_, m1), (p2, m2), (p3, _) = outs
  # After step 1 the -1 count is excluded: sigma = count / max class count 2 = (1, 0.5, 0);
  # thresholds (0.95, 0.95 * 0.5 / 1.5, 0) = (0.95, 0.316667, 0).
  assert m2['mean_threshold'] == pytest.approx((0.95 + 0.95 / 3) / 3, abs=1e-6)
  np.testing.assert_array_equal(p2.weight, [0, 1, 1, 1])  # idx 3: 0.5 < 0.95 now
  np.testing.assert_array_equal(p3.weight, [1, 0, 1, 1])
  np.testing.assert_allclose(state.classwise_acc, [1 / 3, 1.0, 2 / 3], rtol=1e-6)


def test_flexmatch_keeps_sigma_while_one_value_fills_the_table():
  """USB updates sigma only while max count < N: a table all of one class keeps the old sigma."""
  algo = algorithms.FlexMatch()
  batches = [(logits_of([[0.99, 0.005, 0.005], [0.98, 0.01, 0.01]]), [0, 1])]
  _, state = run_steps(algo, algo.init_state(2, 3), batches)
  np.testing.assert_array_equal(state.selected_label, [0, 0])
  np.testing.assert_array_equal(state.classwise_acc, [0, 0, 0])


def test_write_last_selected_rules():
  table = jnp.full((6,), -1, jnp.int32)
  idx = jnp.array([2, 2, 5, 2, -1, 9, 0])
  values = jnp.array([10, 11, 12, 13, 14, 15, 16])
  selected = jnp.array([True, True, True, False, True, True, False])
  out = jax.jit(flexmatch.write_last_selected)(table, idx, values, selected)
  # idx 2: last SELECTED occurrence (11); -1 and 9 are out of range; idx 0 not selected.
  np.testing.assert_array_equal(out, [-1, -1, 11, -1, -1, 12])
  # Exactly one write per row (XLA leaves the winner of duplicate scatters unspecified).
  np.testing.assert_array_equal(
    flexmatch.last_selected(idx, selected, 6), [False, True, True, False, False, False, False]
  )


# ----------------------------------------------------------------------------
# SoftMatch.


def softmatch_reference(prob_steps, ema, n_sigma, num_classes):
  """Independent numpy version of USB's order: p_model, align, mu/var, weight."""
  p_model, mu, var = None, 1.0 / num_classes, 1.0
  results = []
  for probs in prob_steps:
    probs = np.asarray(probs, np.float64)
    batch_mean = probs.mean(axis=0)
    p_model = batch_mean if p_model is None else ema * p_model + (1 - ema) * batch_mean
    aligned = probs * (1.0 / num_classes + 1e-6) / (p_model + 1e-6)
    aligned /= aligned.sum(axis=1, keepdims=True)
    max_p = aligned.max(axis=1)
    mu = ema * mu + (1 - ema) * max_p.mean()
    var = ema * var + (1 - ema) * max_p.var(ddof=1)
    weight = np.exp(-(np.minimum(max_p - mu, 0.0) ** 2) / (2 * var / n_sigma**2))
    results.append(dict(p_model=p_model, mu=mu, var=var, max_p=max_p, weight=weight))
  return results


def test_softmatch_first_step_by_hand():
  """C = 2, probs (.6, .4), (.8, .2): p_model = batch mean (.7, .3), not an EMA from uniform."""
  algo = algorithms.SoftMatch(ema_p=0.5, n_sigma=2.0)
  ((pseudo, metrics),) = run_steps(
    algo, algo.init_state(4, 2), [(logits_of([[0.6, 0.4], [0.8, 0.2]]), [0, 1])]
  )[0]
  # aligned: (.6/.7, .4/.3) / sum = (.391304, .608696); (.8/.7, .2/.3) / sum = (.631579, .368421)
  np.testing.assert_allclose(pseudo.max_prob, [0.608696, 0.631579], atol=2e-6)
  np.testing.assert_array_equal(pseudo.label, [0, 0])  # raw argmax, though row 0 aligns to 1
  # batch mean .620137, unbiased var 2 * .0114416^2 = .00026182; mu_0 = 1/2, var_0 = 1.
  np.testing.assert_allclose(metrics['mu'], 0.5 * 0.5 + 0.5 * 0.620137, atol=2e-6)
  np.testing.assert_allclose(metrics['var'], 0.5 * 1.0 + 0.5 * 0.00026182, atol=2e-6)
  np.testing.assert_array_equal(pseudo.weight, [1.0, 1.0])  # both above mu = .560069


def test_softmatch_alignment_and_weight_formulas():
  aligned = softmatch.align_to_uniform(jnp.array([[0.6, 0.4]]), jnp.array([0.8, 0.2]))
  np.testing.assert_allclose(aligned, [[0.75 / 2.75, 2 / 2.75]], atol=1e-6)  # (.2727, .7273)
  weight = softmatch.truncated_gaussian_weight(jnp.array([0.5, 0.9]), 0.7, 0.04, 2.0)
  np.testing.assert_allclose(weight, [math.exp(-2.0), 1.0], rtol=1e-6)  # (.2)^2 / (2*.04/4) = 2


@pytest.mark.parametrize('ema', [0.999, 0.5])
def test_softmatch_three_steps_match_numpy(ema):
  rng = np.random.default_rng(0)
  prob_steps = [rng.dirichlet(np.full(3, 0.4), size=8) for _ in range(3)]
  algo = algorithms.SoftMatch(ema_p=ema, n_sigma=2.0)
  outs, state = run_steps(
    algo, algo.init_state(8, 3), [(logits_of(p), np.arange(8)) for p in prob_steps]
  )
  ref = softmatch_reference(prob_steps, ema, 2.0, 3)
  for (pseudo, metrics), r, probs in zip(outs, ref, prob_steps):
    np.testing.assert_allclose(pseudo.max_prob, r['max_p'], rtol=1e-5)
    np.testing.assert_allclose(metrics['mu'], r['mu'], rtol=1e-5)
    np.testing.assert_allclose(metrics['var'], r['var'], rtol=1e-5)
    np.testing.assert_allclose(pseudo.weight, r['weight'], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(pseudo.label, probs.argmax(axis=1))
  np.testing.assert_allclose(state.p_model, ref[-1]['p_model'], rtol=1e-5)
  assert int(state.num_updates) == 3
  if ema == 0.5:  # the recursion moved mu/var enough that some weights are soft
    weights = np.concatenate([np.asarray(p.weight) for p, _ in outs])
    assert np.any((weights > 0.01) & (weights < 0.99))


def test_softmatch_label_is_raw_argmax_when_alignment_flips_it():
  probs = [[0.9, 0.05, 0.05]] * 3 + [[0.6, 0.35, 0.05]]
  algo = algorithms.SoftMatch()
  ((pseudo, _),) = run_steps(algo, algo.init_state(4, 3), [(logits_of(probs), range(4))])[0]
  # p_model = (.825, .125, .05); row 3 aligns to (.727273, 2.8, 1) / 4.527273 -> argmax 1.
  assert int(pseudo.label[3]) == 0
  np.testing.assert_allclose(pseudo.max_prob[3], 2.8 / 4.527273, rtol=1e-5)  # .618474
  # rows 0-2 align to (1.090909, .4, 1) / 2.490909: label and aligned argmax stay 0.
  np.testing.assert_allclose(pseudo.max_prob[0], 1.090909 / 2.490909, rtol=1e-5)  # .437956
  np.testing.assert_array_equal(pseudo.label, [0, 0, 0, 0])


def test_softmatch_dist_align_off_uses_raw_confidence():
  probs = [[0.9, 0.05, 0.05], [0.6, 0.35, 0.05]]
  algo = algorithms.SoftMatch(dist_align=False)
  ((pseudo, _),) = run_steps(algo, algo.init_state(4, 3), [(logits_of(probs), range(2))])[0]
  np.testing.assert_allclose(pseudo.max_prob, [0.9, 0.6], rtol=1e-6)


def test_weak_branch_has_no_gradient_and_computes_in_float32():
  logits = jax.random.normal(jax.random.key(0), (6, 3))
  algo = algorithms.SoftMatch(ema_p=0.5)
  state = algo.init_state(6, 3)
  grad = jax.grad(lambda z: jnp.sum(algo.pseudo_label(state, z, jnp.arange(6))[0].weight))(logits)
  np.testing.assert_array_equal(grad, np.zeros((6, 3)))
  pseudo, new_state, _ = algo.pseudo_label(state, logits.astype(jnp.bfloat16), jnp.arange(6))
  assert pseudo.max_prob.dtype == pseudo.weight.dtype == new_state.p_model.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Data parallel: 8 devices equal one device on the concatenated global batch.


def map_over_devices(per_device_fn, devices, backend):
  """Per-device fn -> fn on stacked [D, ...] args/outputs, via pmap or shard_map."""
  if backend == 'pmap':
    return jax.pmap(per_device_fn, axis_name='batch', devices=devices)

  def blockwise(*args):  # [1, ...] blocks -> per-device call -> [1, ...] blocks
    out = per_device_fn(*jax.tree.map(lambda x: x[0], args))
    return jax.tree.map(lambda x: x[None], out)

  mesh = jax.sharding.Mesh(np.array(devices), ('batch',))
  spec = jax.sharding.PartitionSpec('batch')
  return jax.jit(
    jax.shard_map(blockwise, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
  )


@pytest.mark.parametrize('backend', ['pmap', 'shard_map'])
@pytest.mark.parametrize('name', ['flexmatch', 'softmatch'])
def test_eight_devices_equal_one_device(name, backend):
  devices = jax.devices()
  n_dev, per_dev, num_classes, num_ulb = len(devices), 2, 3, 12
  assert n_dev == 8
  algo = (
    algorithms.FlexMatch(p_cutoff=0.8) if name == 'flexmatch' else algorithms.SoftMatch(ema_p=0.5)
  )
  rng = np.random.default_rng(1)
  batches = [
    (
      jnp.asarray(4 * rng.normal(size=(n_dev * per_dev, num_classes)), jnp.float32),
      jnp.asarray(rng.integers(0, num_ulb, n_dev * per_dev), jnp.int32),
    )  # repeats
    for _ in range(3)
  ]

  state_1 = algo.init_state(num_ulb, num_classes)
  state_8 = jax.tree.map(lambda x: jnp.stack([x] * n_dev), state_1)
  step_8 = map_over_devices(
    lambda s, l, i: algo.pseudo_label(s, l, i, axis_name='batch'), devices, backend
  )
  step_1 = jax.jit(algo.pseudo_label)
  for logits, idx in batches:
    pseudo_1, state_1, _ = step_1(state_1, logits, idx)
    pseudo_8, state_8, _ = step_8(
      state_8, logits.reshape(n_dev, per_dev, -1), idx.reshape(n_dev, per_dev)
    )
    np.testing.assert_allclose(
      np.asarray(pseudo_8.weight).reshape(-1), pseudo_1.weight, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(np.asarray(pseudo_8.label).reshape(-1), pseudo_1.label)
    for leaf_8, leaf_1 in zip(jax.tree.leaves(state_8), jax.tree.leaves(state_1)):
      for replica in np.asarray(leaf_8):  # every replica holds the one-device state
        np.testing.assert_allclose(replica, leaf_1, rtol=1e-5)
  if name == 'flexmatch':
    assert np.any(np.asarray(state_1.selected_label) >= 0)
    assert len(np.unique(np.asarray(batches[0][1]))) < n_dev * per_dev  # duplicates exercised
