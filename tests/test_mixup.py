"""Tests for cmix_jax.mixup: dissimilar pairing, median split, mixing, BCE, targeted mixup."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import mixup


def _keys(n, seed=0):
  return jax.random.split(jax.random.key(seed), n)


def _unit(x):
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


# ---------------------------------------------------------------- pairing kernel


def test_pair_dissimilar_k1_picks_the_most_dissimilar():
  e1, e2 = np.eye(3)[0], np.eye(3)[1]
  anchors = jnp.asarray([e1, -e1, 2 * e1 + e2], jnp.float32)
  pool = jnp.asarray([e1, -e1, e2], jnp.float32)
  pick = jax.vmap(lambda k: mixup.pair_dissimilar(k, anchors, pool, 1))(_keys(20))
  np.testing.assert_array_equal(pick, np.tile([1, 0, 1], (20, 1)))  # cosine -1, -1, -0.89


def test_pair_dissimilar_stays_in_top_k_and_is_uniform():
  rng = np.random.default_rng(0)
  anchors = rng.normal(size=(4, 2, 2, 3)).astype(np.float32)
  pool = rng.normal(size=(10, 2, 2, 3)).astype(np.float32)
  k, draws = 3, 1200
  sim = _unit(anchors) @ _unit(pool).T  # [4, 10]
  top_k = np.argsort(sim, axis=1)[:, :k]  # most dissimilar
  picks = np.asarray(
    jax.jit(
      jax.vmap(lambda key: mixup.pair_dissimilar(key, jnp.asarray(anchors), jnp.asarray(pool), k))
    )(_keys(draws, seed=1))
  )  # [draws, 4]
  for a in range(4):
    assert set(picks[:, a]) == set(top_k[a])  # never outside, every candidate reached
    freq = np.array([np.mean(picks[:, a] == j) for j in top_k[a]])
    np.testing.assert_allclose(freq, 1 / k, atol=0.06)  # ~5 sigma at 1200 draws


def test_pair_dissimilar_clips_k_and_survives_zero_vectors():
  anchors = jnp.zeros((2, 4), jnp.float32).at[1, 0].set(1.0)  # anchor 0 is all zeros
  pool = jnp.asarray([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
  picks = np.asarray(jax.vmap(lambda k: mixup.pair_dissimilar(k, anchors, pool, 10))(_keys(300)))
  assert picks.min() >= 0 and picks.max() <= 2
  assert set(picks[:, 0]) == {0, 1, 2}  # k clipped to the pool size 3
  k1 = jax.vmap(lambda k: mixup.pair_dissimilar(k, anchors, pool, 1))(_keys(5))
  # Anchor e1: similarity 0 to the zero row and to e2 (top_k breaks the tie by lower
  # index), 1 to itself; the zero rows produce no NaN.
  np.testing.assert_array_equal(k1[:, 1], 0)


def test_pair_dissimilar_rejects_bad_input():
  with pytest.raises(ValueError, match='k='):
    mixup.pair_dissimilar(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((4, 3)), 0)
  with pytest.raises(ValueError, match='pool is empty'):
    mixup.pair_dissimilar(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((0, 3)), 1)
  with pytest.raises(ValueError, match='same per-sample shape'):
    mixup.pair_dissimilar(jax.random.key(0), jnp.ones((2, 3)), jnp.ones((4, 2)), 1)


# ---------------------------------------------------------------- split, mix, loss


def test_median_split_is_stable_with_ties():
  hard, easy = mixup.median_split(jnp.asarray([1.0, 0.0, 1.0, 0.0, 1.0]))
  np.testing.assert_array_equal(hard, [1, 3])
  np.testing.assert_array_equal(easy, [0, 2, 4])
  hard, easy = mixup.median_split(jnp.asarray([2.0, 2.0, 2.0, 2.0]))
  np.testing.assert_array_equal(hard, [0, 1])
  np.testing.assert_array_equal(easy, [2, 3])


def test_mix_with_lambda_one_and_zero():
  rng = np.random.default_rng(1)
  x_lb = jnp.asarray(rng.normal(size=(3, 2, 2, 1)), jnp.float32)
  x_ulb = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
  y_lb, pseudo = jnp.asarray([2, 0, 1]), jnp.asarray([3, 1, 0, 2])
  anchor, partner = jnp.asarray([2, 0]), jnp.asarray([1, 3])
  x, a, b = mixup.mix_pairs(x_lb, y_lb, anchor, x_ulb, pseudo, partner, 1.0, 4)
  np.testing.assert_array_equal(x, x_lb[anchor])
  np.testing.assert_array_equal(a, np.eye(4)[[1, 2]])
  np.testing.assert_array_equal(b, np.eye(4)[[1, 2]])
  x, _, _ = mixup.mix_pairs(x_lb, y_lb, anchor, x_ulb, pseudo, partner, jnp.asarray([0.0, 0.25]), 4)
  np.testing.assert_allclose(x[0], x_ulb[1])
  np.testing.assert_allclose(x[1], 0.25 * x_lb[0] + 0.75 * x_ulb[3], rtol=1e-6)


def test_mixup_bce_hand_value():
  # logits (0, 2), a = (1, 0), b = (0, 1), lam = 0.25.
  sp = lambda v: math.log1p(math.exp(v))  # softplus; BCE(z, 1) = sp(-z), BCE(z, 0) = sp(z)
  bce_a = (sp(0.0) + sp(2.0)) / 2
  bce_b = (sp(0.0) + sp(-2.0)) / 2
  expected = 0.25 * bce_a + 0.75 * bce_b  # = 0.660038
  out = mixup.mixup_bce(
    jnp.asarray([[0.0, 2.0]], jnp.bfloat16),
    jnp.asarray([[1.0, 0.0]]),
    jnp.asarray([[0.0, 1.0]]),
    0.25,
  )
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  np.testing.assert_allclose(expected, 0.660038, atol=1e-6)


# ---------------------------------------------------------------- targeted mixup

B, U, K = 8, 12, 5


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(
    x_lb=jnp.asarray(rng.normal(size=(B, 4, 4, 3)), jnp.float32),
    y_lb=jnp.asarray(rng.integers(0, K, B), jnp.int32),
    lb_difficulty=jnp.asarray(rng.permutation(B), jnp.float32),
    x_ulb=jnp.asarray(rng.normal(size=(U, 4, 4, 3)), jnp.float32),
    pseudo_labels=jnp.asarray(rng.integers(0, K, U), jnp.int32),
    ulb_difficulty=jnp.asarray(rng.permutation(U), jnp.float32),
  )


def test_targeted_mixup_jits_and_pairs_easy_with_hard():
  inp = _inputs()
  run = jax.jit(functools.partial(mixup.targeted_mixup, num_classes=K, pair_k_frac=0.5))
  mixed = run(jax.random.key(3), **inp)
  assert mixed.x.shape == (B, 4, 4, 3) and mixed.onehot_a.shape == (B, K)
  assert mixed.num_first == B // 2 and mixed.lam_per_sample.shape == (B,)
  n1 = mixed.num_first
  anchor, partner = np.asarray(mixed.anchor_idx), np.asarray(mixed.partner_idx)
  lb_d, ulb_d = np.asarray(inp['lb_difficulty']), np.asarray(inp['ulb_difficulty'])
  easy_lb, hard_lb = set(np.argsort(lb_d)[B // 2 :]), set(np.argsort(lb_d)[: B // 2])
  hard_ulb = np.argsort(ulb_d)[: U // 2]
  easy_ulb = np.argsort(ulb_d)[U // 2 :]
  assert set(anchor[:n1]) == easy_lb and set(anchor[n1:]) == hard_lb
  assert set(partner[:n1]) <= set(hard_ulb) and set(partner[n1:]) <= set(easy_ulb)
  # Each set-1 partner is among the k = round(0.5 * 6) = 3 least similar unlabeled-hard.
  sim = _unit(inp['x_lb']) @ _unit(inp['x_ulb']).T  # [B, U]
  for a, p in zip(anchor[:n1], partner[:n1]):
    assert p in hard_ulb[np.argsort(sim[a, hard_ulb])[:3]]
  # Mixed images and targets follow the pairs with each set's lambda.
  lam = np.where(np.arange(B) < n1, mixed.lam1, mixed.lam2)
  np.testing.assert_allclose(mixed.lam_per_sample, lam)
  expected = (
    lam[:, None, None, None] * np.asarray(inp['x_lb'])[anchor]
    + (1 - lam[:, None, None, None]) * np.asarray(inp['x_ulb'])[partner]
  )
  np.testing.assert_allclose(mixed.x, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(mixed.onehot_a, np.eye(K)[np.asarray(inp['y_lb'])[anchor]])
  np.testing.assert_array_equal(
    mixed.onehot_b, np.eye(K)[np.asarray(inp['pseudo_labels'])[partner]]
  )
  assert 0.0 <= float(mixed.lam1) <= 1.0 and float(mixed.lam1) != float(mixed.lam2)


def test_targeted_mixup_pairs_on_features_when_given():
  inp = _inputs(1)
  # Features: labeled i -> e_0, unlabeled j -> e_0 except one -e_0 per half, so with
  # k = 1 every set-1 anchor takes the hard -e_0 sample and set 2 the easy one.
  order = np.argsort(np.asarray(inp['ulb_difficulty']))
  hard_target, easy_target = order[0], order[-1]
  f_ulb = np.tile(np.eye(3)[0], (U, 1))
  f_ulb[[hard_target, easy_target]] = -np.eye(3)[0]
  mixed = mixup.targeted_mixup(
    jax.random.key(0),
    **inp,
    num_classes=K,
    pair_k_frac=0.01,
    pair_lb=jnp.tile(jnp.eye(3)[0], (B, 1)),
    pair_ulb=jnp.asarray(f_ulb, jnp.float32),
  )
  np.testing.assert_array_equal(mixed.partner_idx[: B // 2], hard_target)
  np.testing.assert_array_equal(mixed.partner_idx[B // 2 :], easy_target)


def test_targeted_mixup_vmaps():
  inp = _inputs(2)
  stacked = jax.tree.map(lambda x: jnp.stack([x, x[::-1]]), inp)
  out = jax.vmap(lambda key, kw: mixup.targeted_mixup(key, **kw, num_classes=K))(_keys(2), stacked)
  assert out.x.shape == (2, B, 4, 4, 3) and out.lam1.shape == (2,)
  single = mixup.targeted_mixup(_keys(2)[1], **jax.tree.map(lambda x: x[1], stacked), num_classes=K)
  np.testing.assert_allclose(out.x[1], single.x, rtol=1e-6, atol=1e-6)


def test_random_pairing_covers_every_labeled_sample():
  inp = _inputs(3)
  mixed = jax.jit(functools.partial(mixup.targeted_mixup, num_classes=K, random_pairing=True))(
    jax.random.key(1), **inp
  )
  np.testing.assert_array_equal(np.sort(mixed.anchor_idx), np.arange(B))  # each once
  assert mixed.num_first == B - B // 2  # same set sizes as the targeted version
  assert np.all((np.asarray(mixed.partner_idx) >= 0) & (np.asarray(mixed.partner_idx) < U))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(B, K)), jnp.float32)
  loss, metrics = mixup.mixup_loss(logits, mixed)
  n1 = mixed.num_first
  expected = mixup.mixup_bce(
    logits[:n1], mixed.onehot_a[:n1], mixed.onehot_b[:n1], mixed.lam1
  ) + mixup.mixup_bce(logits[n1:], mixed.onehot_a[n1:], mixed.onehot_b[n1:], mixed.lam2)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(metrics['mixup_loss_2']) > 0.0


def test_mixup_loss_is_sum_of_two_sets_with_own_lambda():
  mixed = mixup.targeted_mixup(jax.random.key(4), **_inputs(4), num_classes=K)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(B, K)), jnp.float32)
  loss, metrics = jax.jit(mixup.mixup_loss)(logits, mixed)
  n1 = mixed.num_first
  first = mixup.mixup_bce(logits[:n1], mixed.onehot_a[:n1], mixed.onehot_b[:n1], mixed.lam1)
  second = mixup.mixup_bce(logits[n1:], mixed.onehot_a[n1:], mixed.onehot_b[n1:], mixed.lam2)
  np.testing.assert_allclose(loss, first + second, rtol=1e-6)
  np.testing.assert_allclose(metrics['mixup_loss_1'], first, rtol=1e-6)
  with pytest.raises(ValueError, match='logits'):
    mixup.mixup_loss(logits[:3], mixed)


def test_num_candidates_matches_reference_k():
  assert mixup.num_candidates(15 / 224, 224) == 15
  assert mixup.num_candidates(15 / 224, 4) == 1
  assert mixup.num_candidates(1.0, 7) == 7


def test_targeted_mixup_rejects_bad_input():
  inp = _inputs()
  with pytest.raises(ValueError, match='lb_difficulty'):
    mixup.targeted_mixup(jax.random.key(0), **dict(inp, lb_difficulty=jnp.zeros(3)), num_classes=K)
  with pytest.raises(ValueError, match='pair_k_frac'):
    mixup.targeted_mixup(jax.random.key(0), **inp, num_classes=K, pair_k_frac=0.0)
  with pytest.raises(ValueError, match='pair_ulb'):
    mixup.targeted_mixup(jax.random.key(0), **inp, num_classes=K, pair_lb=jnp.ones((B, 2)))


# ---------------------------------------------------------------- diagnostics


def test_hard_pseudo_label_error_ignores_unknown_labels():
  pseudo = jnp.asarray([0, 1, 2, 3])
  hidden = jnp.asarray([0, 2, -1, 1])
  np.testing.assert_allclose(
    mixup.hard_pseudo_label_error(pseudo, hidden, jnp.asarray([1, 2, 3])), 1.0
  )
  np.testing.assert_allclose(
    mixup.hard_pseudo_label_error(pseudo, hidden, jnp.asarray([0, 2])), 0.0
  )
  np.testing.assert_allclose(
    mixup.hard_pseudo_label_error(pseudo, hidden, jnp.asarray([0, 1])), 0.5
  )
  np.testing.assert_allclose(mixup.hard_pseudo_label_error(pseudo, hidden, jnp.asarray([2])), 0.0)


def test_difficulty_half_means():
  hard, easy = mixup.difficulty_half_means(jnp.asarray([4.0, 1.0, 3.0, 2.0, 5.0]))
  np.testing.assert_allclose([hard, easy], [1.5, 4.0])


def test_pair_k_frac_one_is_a_uniform_partner_from_the_opposite_half():
  # The "split kept, random partner" ablation: k = the whole half, so every partner of the
  # half is equally likely, whatever the similarity.
  inp = _inputs()
  run = jax.jit(
    jax.vmap(lambda key: mixup.targeted_mixup(key, num_classes=K, pair_k_frac=1.0, **inp))
  )
  mixed = run(_keys(1200, seed=4))
  n1 = B - B // 2
  ulb_d = np.asarray(inp['ulb_difficulty'])
  hard_ulb, easy_ulb = np.argsort(ulb_d)[: U // 2], np.argsort(ulb_d)[U // 2 :]
  partners = np.asarray(mixed.partner_idx)  # [draws, B]
  for col, half in [(0, hard_ulb), (n1, easy_ulb)]:
    freq = np.array([np.mean(partners[:, col] == j) for j in half])
    assert set(partners[:, col]) == set(half)
    np.testing.assert_allclose(freq, 1 / len(half), atol=0.07)


# ---------------------------------------------------------------- global scope

D = 8  # fake devices (tests/conftest.py)


def _global_inputs(b, u, seed=0, feature_dim=None):
  """Global-batch inputs; difficulties with ties so the stable sort order matters."""
  rng = np.random.default_rng(seed)
  inp = dict(
    x_lb=rng.normal(size=(b, 4, 4, 3)).astype(np.float32),
    y_lb=rng.integers(0, K, b).astype(np.int32),
    lb_difficulty=rng.integers(0, 3, b).astype(np.float32),
    x_ulb=rng.normal(size=(u, 4, 4, 3)).astype(np.float32),
    pseudo_labels=rng.integers(0, K, u).astype(np.int32),
    ulb_difficulty=rng.integers(0, 4, u).astype(np.float32),
  )
  if feature_dim:
    inp['pair_lb'] = rng.normal(size=(b, feature_dim)).astype(np.float32)
    inp['pair_ulb'] = rng.normal(size=(u, feature_dim)).astype(np.float32)
  return inp


def _per_device(tree):
  return jax.tree.map(lambda x: x.reshape((D, -1) + x.shape[1:]), tree)


def _global_shares(key, inp, logits, **kwargs):
  """pmap over 8 devices: each device's share of the global sets, its loss and fused targets."""

  def per_device(local, local_logits):
    mixed = mixup.global_targeted_mixup(key, **local, num_classes=K, axis_name='i', **kwargs)
    loss, metrics = mixup.mixup_loss(local_logits, mixed)
    return (
      mixed,
      jax.lax.pmean(loss, 'i'),
      jax.lax.pmean(metrics, 'i'),
      mixup.partner_onehot(mixed, local['pseudo_labels'], K),
    )

  return jax.pmap(per_device, axis_name='i')(_per_device(inp), _per_device(logits))


@pytest.mark.parametrize('case', ['pixels', 'downsample', 'features', 'random', 'one_per_device'])
def test_global_scope_equals_one_device_on_the_whole_batch(case):
  b, u = (8, 16) if case == 'one_per_device' else (16, 48)
  inp = _global_inputs(b, u, seed=len(case), feature_dim=6 if case == 'features' else None)
  kwargs = dict(
    pair_k_frac=0.3,
    random_pairing=case == 'random',
    pair_downsample=2 if case == 'downsample' else 1,
  )
  logits = np.random.default_rng(7).normal(size=(b, K)).astype(np.float32)
  key = jax.random.key(11)
  ref = mixup.targeted_mixup(key, **inp, num_classes=K, **kwargs)
  ref_loss, ref_metrics = mixup.mixup_loss(jnp.asarray(logits), ref)
  shares, loss, metrics, fused_b = _global_shares(key, inp, logits, **kwargs)
  whole = lambda x: np.asarray(x).reshape((b,) + x.shape[2:])  # device shares, in order
  np.testing.assert_array_equal(whole(shares.anchor_idx), ref.anchor_idx)
  np.testing.assert_array_equal(whole(shares.partner_idx), ref.partner_idx)
  np.testing.assert_array_equal(whole(shares.in_first), ref.in_first)
  np.testing.assert_array_equal(whole(shares.lam_per_sample), ref.lam_per_sample)
  np.testing.assert_allclose(whole(shares.x), ref.x, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(whole(shares.onehot_a), ref.onehot_a)
  np.testing.assert_array_equal(whole(shares.onehot_b), ref.onehot_b)
  np.testing.assert_array_equal(whole(fused_b), ref.onehot_b)  # gathered pseudo-labels
  for replica in range(D):  # lambda drawn once per pairing, the same on every device
    assert shares.lam1[replica] == ref.lam1 and shares.lam2[replica] == ref.lam2
  np.testing.assert_allclose(loss[0], ref_loss, rtol=1e-6)
  for name in ('mixup_loss_1', 'mixup_loss_2'):
    np.testing.assert_allclose(metrics[name][0], ref_metrics[name], rtol=1e-6)
  if case == 'pixels':  # the whole-set loss, by the per-set formula
    n1 = ref.num_first
    expected = mixup.mixup_bce(
      logits[:n1], ref.onehot_a[:n1], ref.onehot_b[:n1], ref.lam1
    ) + mixup.mixup_bce(logits[n1:], ref.onehot_a[n1:], ref.onehot_b[n1:], ref.lam2)
    np.testing.assert_allclose(loss[0], expected, rtol=1e-6)


def test_device_scope_splits_each_share_on_its_own():
  """What `device` scope means: 8 separate splits of 2 labeled / 6 unlabeled samples."""
  inp = _global_inputs(16, 48, seed=3)
  keys = _keys(D, seed=5)
  local = jax.vmap(lambda k, kw: mixup.targeted_mixup(k, **kw, num_classes=K, pair_k_frac=0.3))(
    keys, _per_device(jax.tree.map(jnp.asarray, inp))
  )
  assert np.asarray(local.anchor_idx).max() < 2  # rows of the device's own 2 samples
  whole = mixup.targeted_mixup(keys[0], **inp, num_classes=K, pair_k_frac=0.3)
  assert np.asarray(whole.anchor_idx).max() >= 2


def test_downsample_averages_blocks():
  x = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  small = mixup.downsample(x, 2)
  assert small.shape == (2, 2, 2, 1)
  expected = np.asarray(x).reshape(2, 2, 2, 2, 2, 1).mean(axis=(2, 4))  # 2x2 block means
  np.testing.assert_allclose(small, expected, rtol=1e-6)
  thirds = mixup.downsample(x, 3)  # ceil(4 / 3) = 2 blocks; the last repeats row/column 3
  assert thirds.shape == (2, 2, 2, 1)
  np.testing.assert_allclose(thirds[0, 1, 1, 0], 15.0)  # the 3x3 block of copies of x[0, 3, 3]
  np.testing.assert_allclose(thirds[0, 0, 0, 0], np.asarray(x)[0, :3, :3].mean())
  assert mixup.downsample(x, 1) is x
  with pytest.raises(ValueError, match='pair_downsample'):
    mixup.targeted_mixup(jax.random.key(0), **_inputs(), num_classes=K, pair_downsample=0)


def test_bench_counts_the_global_scope_traffic_by_hand():
  """experiments/bench_pairing.py reads the collectives off the traced per-device program."""
  from experiments import bench_pairing as bench

  pixels = 32 * 32 * 3 * 4  # f32 bytes of one image
  scalars = (64 + 448) * 4 * 2  # difficulties, labels / pseudo-labels of the global batch
  full = bench.global_pairing_bytes(64, 7, (32, 32, 3), 8)
  assert full == {'all_gather': (64 + 448) * pixels + scalars, 'reduce_scatter': 0}
  small = bench.global_pairing_bytes(64, 7, (32, 32, 3), 8, pair_downsample=4)
  # 8x8 pooled pairing inputs; each device reduce-scatters a [64, 32, 32, 3] mixed batch.
  assert small == {'all_gather': (64 + 448) * pixels // 16 + scalars, 'reduce_scatter': 64 * pixels}


def test_split_metrics_in_global_scope_are_the_whole_batch_values():
  inp = _global_inputs(16, 48, seed=9)
  hidden = np.random.default_rng(2).integers(-1, K, 48).astype(np.int32)
  args = (inp['lb_difficulty'], inp['ulb_difficulty'], inp['pseudo_labels'], hidden)
  whole = mixup.split_metrics(*args)
  shared = jax.pmap(lambda *a: mixup.split_metrics(*a, axis_name='i'), axis_name='i')(
    *_per_device(args)
  )
  for name, value in whole.items():
    np.testing.assert_allclose(shared[name], np.full(D, value), rtol=1e-6, err_msg=name)
  hard_lb = np.argsort(inp['lb_difficulty'], kind='stable')[:8]
  np.testing.assert_allclose(whole['difficulty_lb_hard'], inp['lb_difficulty'][hard_lb].mean())
