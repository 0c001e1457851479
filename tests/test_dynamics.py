"""Tests for cmix_jax.dynamics: margins, AUM/APM/Welford updates, duplicates, data parallel."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import dynamics
from cmix_jax.dynamics import DynamicsState

AXIS = 'batch'


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _i32(x):
  return jnp.asarray(x, jnp.int32)


def _softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# ---------------------------------------------------------------- margins


def test_aum_margin_hand_values_and_float32():
  logits = _f32([[2.0, 1.0, 3.0], [2.0, 1.0, 3.0]])
  np.testing.assert_allclose(dynamics.aum_margin(logits, _i32([0, 2])), [-1.0, 1.0])
  out = dynamics.aum_margin(logits.astype(jnp.bfloat16), _i32([1, 2]))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, [-2.0, 1.0])


def test_aum_margin_tie_is_zero():
  logits = _f32([[3.0, 3.0, 1.0]])
  np.testing.assert_allclose(dynamics.aum_margin(logits, _i32([0])), [0.0])
  np.testing.assert_allclose(dynamics.aum_margin(logits, _i32([1])), [0.0])


def test_pseudo_margins_hand_values_and_ties():
  pm = dynamics.pseudo_margins(_f32([[2.0, 1.0, 3.0], [3.0, 3.0, 1.0]]))
  np.testing.assert_allclose(pm, [[-1.0, -2.0, 1.0], [0.0, 0.0, -2.0]])


def test_pseudo_margins_match_definition():
  z = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
  expected = np.stack([z[:, c] - np.delete(z, c, axis=1).max(1) for c in range(7)], 1)
  np.testing.assert_allclose(dynamics.pseudo_margins(_f32(z)), expected, rtol=1e-6)
  labels = np.array([0, 3, 6, 2, 2])
  np.testing.assert_allclose(
    dynamics.aum_margin(_f32(z), _i32(labels)), expected[np.arange(5), labels], rtol=1e-6
  )


# ---------------------------------------------------------------- APM

PM_LOGITS = [[2.0, 1.0, 3.0], [0.0, 4.0, 1.0], [1.0, 1.0, 5.0]]
PMS = [np.array([-1.0, -2.0, 1.0]), np.array([-4.0, 3.0, -3.0]), np.array([-4.0, -4.0, 4.0])]


def test_apm_recursion_three_updates():
  state = DynamicsState.init(1, 2, 3)
  update = jax.jit(functools.partial(dynamics.update_unlabeled, update_apm=True))
  for logits in PM_LOGITS:
    state = update(state, _i32([0]), _f32([logits]), _i32([2]))
  apm1 = 0.997 * PMS[0]
  apm2 = 0.4985 * PMS[1] + 0.5015 * apm1
  a3 = 0.997 / 3
  apm3 = a3 * PMS[2] + (1 - a3) * apm2
  np.testing.assert_allclose(state.apm[0], apm3, rtol=1e-6)
  np.testing.assert_array_equal(state.apm[1], [0.0, 0.0, 0.0])
  np.testing.assert_array_equal(state.apm_count, [3, 0])
  # Read-out: APM at the pseudo-label, after this step's update.
  np.testing.assert_allclose(
    dynamics.unlabeled_difficulty(state, _i32([0, 0]), _i32([1, 2]), 'margin'),
    [apm3[1], apm3[2]],
    rtol=1e-6,
  )


def test_apm_frozen_before_warmup_but_welford_runs():
  state = DynamicsState.init(1, 2, 3)
  update = jax.jit(dynamics.update_unlabeled)
  state = update(state, _i32([0]), _f32([PM_LOGITS[0]]), _i32([2]), update_apm=jnp.array(False))
  np.testing.assert_array_equal(state.apm, np.zeros((2, 3)))
  np.testing.assert_array_equal(state.apm_count, [0, 0])
  np.testing.assert_array_equal(state.ulb_conf_count, [1, 0])
  np.testing.assert_allclose(state.ulb_conf_mean[0], _softmax(PM_LOGITS[0])[2], rtol=1e-6)
  # First APM update after warm-up uses n = 0 (count before), i.e. alpha = delta.
  state = update(state, _i32([0]), _f32([PM_LOGITS[1]]), _i32([1]), update_apm=jnp.array(True))
  np.testing.assert_allclose(state.apm[0], 0.997 * PMS[1], rtol=1e-6)
  np.testing.assert_array_equal(state.ulb_conf_count, [2, 0])


# ---------------------------------------------------------------- fused (one-pass) split


def _hand_tables():
  """4 unlabeled samples after one APM update each; sample 0's history prefers class 0."""
  state = DynamicsState.init(1, 4, 3)
  history = _f32([[4.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 0.0, 2.0], [0.0, 0.0, 5.0]])
  return dynamics.update_unlabeled(
    state, _i32([0, 1, 2, 3]), history, _i32([0, 1, 2, 2]), update_apm=True
  )


def test_fused_split_equals_two_pass_split_on_the_same_tables_and_pseudo_labels():
  from cmix_jax import mixup

  state = _hand_tables()
  idx = _i32([0, 1, 2, 3])
  # This step: sample 0 now predicts class 1 (disagrees with its history), the rest agree.
  logits = _f32([[0.0, 3.0, 2.0], [0.0, 4.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 6.0]])
  pseudo = _i32([1, 1, 2, 2])
  after = dynamics.update_unlabeled(state, idx, logits, pseudo, update_apm=True)
  two_pass = dynamics.unlabeled_difficulty(after, idx, pseudo, 'margin')
  fused = dynamics.fused_unlabeled_difficulty(after, idx)  # same tables, same pseudo-labels
  np.testing.assert_array_equal(fused, two_pass)
  for a, b in zip(mixup.median_split(fused), mixup.median_split(two_pass)):
    np.testing.assert_array_equal(a, b)
  # By hand: sample 0's APM at class 1 = 0.4985 * PM(1) + 0.5015 * 0.997 * PM_hist(1).
  np.testing.assert_allclose(two_pass[0], 0.4985 * 1.0 + 0.5015 * 0.997 * -4.0, rtol=1e-6)
  np.testing.assert_array_equal(mixup.median_split(two_pass)[0], [0, 2])  # hard: 0 and 2
  np.testing.assert_array_equal(dynamics.stored_pseudo_label(after, idx), pseudo)
  # Within a step the fused one reads the tables before the update: the values the
  # two-pass split used at the previous visit (history's labels), not this step's.
  np.testing.assert_allclose(
    dynamics.fused_unlabeled_difficulty(state, idx),
    0.997 * np.array([3.0, 3.0, 1.0, 5.0]),
    rtol=1e-6,
  )
  # The old read-out (class of the highest stored APM) would call sample 0 easy this step
  # although its current pseudo-label reads hard: reading at the remembered label instead
  # gives the two-pass value of that label.
  stored_argmax = jnp.argmax(after.apm, axis=1)
  assert int(stored_argmax[0]) == 0 and float(after.apm[0, 0]) > 0 > float(two_pass[0])


def test_fused_difficulty_unseen_reads_zero_and_confidence_matches_two_pass():
  state = DynamicsState.init(1, 3, 3)
  np.testing.assert_array_equal(dynamics.fused_unlabeled_difficulty(state, _i32([0, 2])), [0, 0])
  np.testing.assert_array_equal(state.apm_label, [-1, -1, -1])
  np.testing.assert_array_equal(dynamics.stored_pseudo_label(state, _i32([0, 2])), [0, 0])
  frozen = dynamics.update_unlabeled(
    state, _i32([1]), _f32([[0.0, 2.0, 0.0]]), _i32([1]), update_apm=False
  )
  np.testing.assert_array_equal(frozen.apm_label, [-1, -1, -1])  # set with APM only
  after = _hand_tables()
  np.testing.assert_array_equal(
    dynamics.fused_unlabeled_difficulty(after, _i32([3, 1]), 'confidence'),
    dynamics.unlabeled_difficulty(after, _i32([3, 1]), _i32([0, 0]), 'confidence'),
  )


@pytest.mark.parametrize(
  'warmup,n,u,fused,expected',
  [
    (5, 10, 4, False, 5),  # two-pass: the reference's warm-up
    (5, 10, 4, True, 1),  # first mix position 24 -> last full epoch 1 = positions 10..19
    (2, 10, 4, True, -1),  # warm-up shorter than an epoch: from step 0
    (100, 1000, 112, True, 88),  # mixing starts at position 11312: epoch 10 starts in step 89
  ],
)
def test_apm_start_after_covers_a_whole_epoch_before_mixing(warmup, n, u, fused, expected):
  from cmix_jax.data import pipeline

  start = dynamics.apm_start_after(warmup, n, u, fused)
  assert start == expected
  if fused:
    seen = np.concatenate(
      [pipeline.batch_indices(n, u, t, seed=0, stream_id=1) for t in range(start + 1, warmup + 1)]
    )
    if start >= 0:
      np.testing.assert_array_equal(np.unique(seen), np.arange(n))  # every sample updated


# ---------------------------------------------------------------- AUM and Welford


def test_aum_is_running_mean_over_steps():
  rng = np.random.default_rng(1)
  state = DynamicsState.init(3, 1, 4)
  update = jax.jit(dynamics.update_labeled)
  history = []
  for _ in range(4):
    z = rng.normal(size=(1, 4)).astype(np.float32)
    state = update(state, _i32([1]), _f32(z), _i32([2]))
    history.append(z[0, 2] - np.delete(z[0], 2).max())
  np.testing.assert_allclose(dynamics.aum(state), [0.0, np.mean(history), 0.0], rtol=1e-5)
  np.testing.assert_array_equal(state.aum_count, [0, 4, 0])
  np.testing.assert_allclose(
    dynamics.labeled_difficulty(state, _i32([1, 0]), 'margin'), [np.mean(history), 0.0], rtol=1e-5
  )


def test_welford_matches_numpy_mean_and_population_var():
  rng = np.random.default_rng(2)
  n_lb, n_ulb, c, steps = 4, 5, 6, 7
  state = DynamicsState.init(n_lb, n_ulb, c)
  up_lb = jax.jit(dynamics.update_labeled)
  up_ulb = jax.jit(functools.partial(dynamics.update_unlabeled, update_apm=True))
  y = np.array([0, 5, 2, 3])
  lb_hist, ulb_hist = [], []
  for _ in range(steps):
    z_lb = rng.normal(size=(n_lb, c)) * 3
    z_ulb = rng.normal(size=(n_ulb, c)) * 3
    pseudo = z_ulb.argmax(1)
    state = up_lb(state, _i32(np.arange(n_lb)), _f32(z_lb), _i32(y))
    state = up_ulb(state, _i32(np.arange(n_ulb)), _f32(z_ulb), _i32(pseudo))
    lb_hist.append(_softmax(z_lb)[np.arange(n_lb), y])
    ulb_hist.append(_softmax(z_ulb)[np.arange(n_ulb), pseudo])
  lb_hist, ulb_hist = np.stack(lb_hist), np.stack(ulb_hist)
  np.testing.assert_allclose(dynamics.labeled_confidence(state), lb_hist.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    dynamics.labeled_variability(state), lb_hist.std(0), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(dynamics.unlabeled_confidence(state), ulb_hist.mean(0), rtol=1e-5)
  np.testing.assert_allclose(
    dynamics.unlabeled_variability(state), ulb_hist.std(0), rtol=1e-4, atol=1e-6
  )
  np.testing.assert_allclose(state.lb_conf_m2 / steps, lb_hist.var(0), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(
    dynamics.labeled_difficulty(state, _i32([3, 0]), 'confidence'),
    lb_hist.mean(0)[[3, 0]],
    rtol=1e-5,
  )
  np.testing.assert_allclose(
    dynamics.unlabeled_difficulty(state, _i32([4, 1]), _i32([0, 0]), 'confidence'),
    ulb_hist.mean(0)[[4, 1]],
    rtol=1e-5,
  )


def test_unseen_samples_read_zero():
  state = DynamicsState.init(3, 2, 3)
  for fn in (dynamics.aum, dynamics.labeled_variability, dynamics.unlabeled_variability):
    out = np.asarray(fn(state))
    assert np.all(out == 0) and np.all(np.isfinite(out))


# ---------------------------------------------------------------- duplicates


def test_duplicate_indices_count_once_and_keep_last():
  state = DynamicsState.init(5, 4, 3)
  # Labeled index 3 appears at positions 0, 2, 3: the margin of position 3 is kept.
  z = _f32([[0.0, 0.0, 1.0], [5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [4.0, 0.0, 0.0]])
  y = _i32([0, 0, 0, 0])
  state = dynamics.update_labeled(state, _i32([3, 1, 3, 3]), z, y)
  np.testing.assert_array_equal(state.aum_count, [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(state.lb_conf_count, [0, 1, 0, 1, 0])
  np.testing.assert_allclose(state.aum_sum, [0.0, 5.0, 0.0, 4.0, 0.0])
  np.testing.assert_allclose(state.lb_conf_mean[3], _softmax([4.0, 0.0, 0.0])[0], rtol=1e-6)
  np.testing.assert_allclose(state.lb_conf_m2, np.zeros(5), atol=0)
  # A second step: the duplicate counts once again.
  state = dynamics.update_labeled(state, _i32([3, 3]), z[:2], y[:2])
  np.testing.assert_array_equal(state.aum_count[3], 2)
  np.testing.assert_allclose(state.aum_sum[3], 4.0 + 5.0)
  # Unlabeled: APM keeps the last occurrence's pseudo-margins, counted once.
  zu = _f32([PM_LOGITS[0], PM_LOGITS[1], PM_LOGITS[2]])
  state = dynamics.update_unlabeled(state, _i32([2, 2, 0]), zu, _i32([2, 1, 2]), update_apm=True)
  np.testing.assert_array_equal(state.apm_count, [1, 0, 1, 0])
  np.testing.assert_array_equal(state.ulb_conf_count, [1, 0, 1, 0])
  np.testing.assert_allclose(state.apm[2], 0.997 * PMS[1], rtol=1e-6)
  np.testing.assert_allclose(state.apm[0], 0.997 * PMS[2], rtol=1e-6)
  np.testing.assert_allclose(state.ulb_conf_mean[2], _softmax(PM_LOGITS[1])[1], rtol=1e-6)


def test_last_occurrence_mask_marks_exactly_the_last_duplicate():
  # XLA's CPU scatter happens to apply duplicates in order, so the table test above
  # cannot see the de-duplication; GPU scatter order is unspecified. Check the mask.
  last_occurrence = dynamics._last_occurrence
  np.testing.assert_array_equal(
    last_occurrence(_i32([3, 1, 3, 3, 0, 1])), [False, False, False, True, True, True]
  )
  idx = np.random.default_rng(5).integers(0, 7, 50)
  expected = [not np.any(idx[i + 1 :] == idx[i]) for i in range(50)]
  np.testing.assert_array_equal(last_occurrence(_i32(idx)), expected)


def test_out_of_range_indices_are_ignored():
  state = DynamicsState.init(3, 2, 3)
  state = dynamics.update_labeled(state, _i32([-1, 1, 3]), _f32(np.ones((3, 3))), _i32([0, 0, 0]))
  np.testing.assert_array_equal(state.aum_count, [0, 1, 0])


# ---------------------------------------------------------------- data parallel

N_LB, N_ULB, C, D, B, U = 20, 37, 5, 8, 4, 6


def _global_batches(seed, steps):
  """Global labeled/unlabeled batches with duplicates, within and across devices."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(steps):
    out.append(
      dict(
        idx_lb=rng.integers(0, N_LB, D * B).astype(np.int32),
        z_lb=(rng.normal(size=(D * B, C)) * 2).astype(np.float32),
        y_lb=rng.integers(0, C, D * B).astype(np.int32),
        idx_ulb=rng.integers(0, N_ULB, D * U).astype(np.int32),
        z_ulb=(rng.normal(size=(D * U, C)) * 2).astype(np.float32),
        pseudo=rng.integers(0, C, D * U).astype(np.int32),
      )
    )
  return out


def _step(state, batch, update_apm, axis_name=None, sharded=False):
  state = dynamics.update_labeled(
    state, batch['idx_lb'], batch['z_lb'], batch['y_lb'], axis_name=axis_name, sharded=sharded
  )
  state = dynamics.update_unlabeled(
    state,
    batch['idx_ulb'],
    batch['z_ulb'],
    batch['pseudo'],
    update_apm=update_apm,
    axis_name=axis_name,
    sharded=sharded,
  )
  reads = dict(
    lb_margin=dynamics.labeled_difficulty(
      state, batch['idx_lb'], 'margin', axis_name=axis_name, sharded=sharded
    ),
    lb_conf=dynamics.labeled_difficulty(
      state, batch['idx_lb'], 'confidence', axis_name=axis_name, sharded=sharded
    ),
    ulb_margin=dynamics.unlabeled_difficulty(
      state, batch['idx_ulb'], batch['pseudo'], 'margin', axis_name=axis_name, sharded=sharded
    ),
    ulb_conf=dynamics.unlabeled_difficulty(
      state, batch['idx_ulb'], batch['pseudo'], 'confidence', axis_name=axis_name, sharded=sharded
    ),
    ulb_fused=dynamics.fused_unlabeled_difficulty(
      state, batch['idx_ulb'], axis_name=axis_name, sharded=sharded
    ),
    ulb_stored=dynamics.stored_pseudo_label(
      state, batch['idx_ulb'], axis_name=axis_name, sharded=sharded
    ),
  )
  return state, reads


def _per_device(batch):
  def split(x):
    per = x.shape[0] // D
    return x.reshape((D, per) + x.shape[1:])

  return jax.tree.map(split, batch)


def _stack(state):
  """One copy per device, stacked [D, ...] (the pmap input layout)."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (D,) + x.shape), state)


def _reference_run(batches):
  """One device, the concatenated global batch."""
  state = DynamicsState.init(N_LB, N_ULB, C)
  step = jax.jit(_step, static_argnums=2)
  all_reads = []
  for t, batch in enumerate(batches):
    state, reads = step(state, batch, t > 0)
    all_reads.append(reads)
  return state, all_reads


def _assert_tables_equal(state, ref):
  for name in ('aum_count', 'lb_conf_count', 'apm_count', 'apm_label', 'ulb_conf_count'):
    np.testing.assert_array_equal(getattr(state, name), getattr(ref, name), err_msg=name)
  for name in ('aum_sum', 'lb_conf_mean', 'lb_conf_m2', 'apm', 'ulb_conf_mean', 'ulb_conf_m2'):
    np.testing.assert_allclose(
      getattr(state, name), getattr(ref, name), rtol=1e-6, atol=1e-7, err_msg=name
    )


needs_8 = pytest.mark.skipif(jax.device_count() < D, reason='needs 8 (fake) devices')


def _mapped_step(backend, update_apm, sharded):
  """Per-device `_step` mapped over D devices by pmap or shard_map; stacked [D, ...] io."""
  fn = functools.partial(_step, update_apm=update_apm, axis_name=AXIS, sharded=sharded)
  if backend == 'pmap':
    return jax.pmap(fn, axis_name=AXIS, devices=jax.devices()[:D])
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:D]), (AXIS,))

  def squeezed(state, batch):
    out = fn(*jax.tree.map(lambda x: x[0], (state, batch)))
    return jax.tree.map(lambda x: x[None], out)

  spec = jax.sharding.PartitionSpec(AXIS)
  return jax.jit(
    jax.shard_map(squeezed, mesh=mesh, in_specs=(spec, spec), out_specs=spec, check_vma=False)
  )


@needs_8
@pytest.mark.parametrize('backend', ['pmap', 'shard_map'])
def test_all_gather_replicas_identical_and_equal_one_device(backend):
  batches = _global_batches(3, steps=2)
  ref_state, ref_reads = _reference_run(batches)
  assert int(ref_state.aum_count.sum()) < 2 * D * B  # the batches did repeat indices

  state = _stack(DynamicsState.init(N_LB, N_ULB, C))
  for t, batch in enumerate(batches):
    state, reads = _mapped_step(backend, t > 0, sharded=False)(state, _per_device(batch))
    for name, value in reads.items():
      np.testing.assert_allclose(
        np.asarray(value).reshape(-1), ref_reads[t][name], rtol=1e-6, atol=1e-7, err_msg=name
      )
  for leaf in jax.tree.leaves(state):
    leaf = np.asarray(leaf)
    for replica in leaf[1:]:
      np.testing.assert_array_equal(replica, leaf[0])
  _assert_tables_equal(jax.tree.map(lambda x: np.asarray(x)[0], state), ref_state)


@needs_8
@pytest.mark.parametrize('backend', ['pmap', 'shard_map'])
def test_sharded_tables_equal_replicated_layout(backend):
  batches = _global_batches(4, steps=2)
  ref_state, ref_reads = _reference_run(batches)

  shard = DynamicsState.init(N_LB, N_ULB, C, num_shards=D)
  assert shard.aum_sum.shape == (3,) and shard.apm.shape == (5, C)  # ceil(20/8), ceil(37/8)
  state = _stack(shard)
  for t, batch in enumerate(batches):
    state, reads = _mapped_step(backend, t > 0, sharded=True)(state, _per_device(batch))
    for name, value in reads.items():
      np.testing.assert_allclose(
        np.asarray(value).reshape(-1), ref_reads[t][name], rtol=1e-6, atol=1e-7, err_msg=name
      )
  full = dynamics.unshard_state(jax.device_get(state), N_LB, N_ULB)
  assert full.apm.shape == (N_ULB, C)
  _assert_tables_equal(full, ref_state)
  # shard_state inverts unshard_state.
  again = dynamics.unshard_state(dynamics.shard_state(full, D), N_LB, N_ULB)
  _assert_tables_equal(again, full)


# ---------------------------------------------------------------- errors and export


def test_bad_input_raises_clear_errors():
  state = DynamicsState.init(3, 3, 3)
  with pytest.raises(ValueError, match='measure'):
    dynamics.labeled_difficulty(state, _i32([0]), 'aum')
  with pytest.raises(ValueError, match='axis_name'):
    dynamics.update_labeled(state, _i32([0]), _f32([[1.0, 2.0, 3.0]]), _i32([0]), sharded=True)
  with pytest.raises(ValueError, match='idx'):
    dynamics.update_labeled(state, _i32([0, 1]), _f32([[1.0, 2.0, 3.0]]), _i32([0]))
  with pytest.raises(ValueError, match='num_classes'):
    dynamics.update_unlabeled(state, _i32([0]), _f32([[1.0, 2.0]]), _i32([0]), update_apm=True)
  with pytest.raises(ValueError, match='num_classes'):
    DynamicsState.init(3, 3, 1)


def test_save_npz_round_trip(tmp_path):
  state = DynamicsState.init(3, 2, 3)
  state = dynamics.update_labeled(state, _i32([0, 2]), _f32([[2.0, 1.0, 3.0]] * 2), _i32([0, 2]))
  path = os.path.join(tmp_path, 'dynamics.npz')
  dynamics.save_npz(state, path)
  with np.load(path) as data:
    np.testing.assert_allclose(data['aum'], [-1.0, 0.0, 1.0])
    assert data['apm'].shape == (2, 3)
    assert {'lb_variability', 'ulb_confidence', 'aum_count'} <= set(data.files)
