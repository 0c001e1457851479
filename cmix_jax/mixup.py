"""CalibrateMix's targeted mixup (docs/method.md §4): median split, dissimilar pairing, mix, BCE.

Labeled-easy anchors are mixed with unlabeled-hard partners (set 1) and
labeled-hard anchors with unlabeled-easy partners (set 2). Each anchor's
partner is drawn uniformly among the k pool samples LEAST cosine-similar to it.
Everything has static shapes and is jittable and vmappable; the pairing is one
matmul + top_k for all anchors at once (the reference loops over anchors).

Two scopes: `targeted_mixup` splits and pairs the samples it is given (one device's
share, as DDP does); `global_targeted_mixup` is per-device code that gathers what the
split and pairing need over a named axis, splits and pairs the GLOBAL batch exactly as
one device would, and returns this device's share of the global mixed sets.
"""

import functools
import math

import flax
import jax
import jax.numpy as jnp
import optax

_NORM_EPS = 1e-8  # as torch.nn.functional.cosine_similarity


@flax.struct.dataclass
class MixedSets:
  """The two mixed sets, concatenated (set 1 = rows [:num_first]), and their targets."""

  x: jax.Array  # [n_mix, H, W, C] mixed images
  onehot_a: jax.Array  # f32 [n_mix, K] gold label of the labeled anchor
  onehot_b: jax.Array  # f32 [n_mix, K] pseudo-label of the unlabeled partner
  lam_per_sample: jax.Array  # f32 [n_mix] lambda of the sample's set
  lam1: jax.Array  # f32 [] lambda of set 1
  lam2: jax.Array  # f32 [] lambda of set 2 (= lam1 with random pairing, no set 2)
  anchor_idx: jax.Array  # int32 [n_mix] rows of x_lb (of the global batch in global scope)
  partner_idx: jax.Array  # int32 [n_mix] rows of x_ulb (of the global pool in global scope)
  in_first: jax.Array  # bool [n_mix] the row belongs to set 1
  row_weight: jax.Array  # f32 [n_mix] weight of the row in its set's mean (shares / set size)
  num_first: int = flax.struct.field(pytree_node=False)  # size of set 1 (whole, unshared)
  # None: the sets are this device's own; else the axis the global sets are shared over.
  axis_name: str | None = flax.struct.field(pytree_node=False, default=None)


def _unit_rows(x: jax.Array) -> jax.Array:
  """[n, ...] -> [n, D] float32 rows scaled to unit L2 norm (zero rows stay zero)."""
  flat = x.reshape(x.shape[0], math.prod(x.shape[1:])).astype(jnp.float32)  # [n, D]
  norm = jnp.linalg.norm(flat, axis=1, keepdims=True)  # [n, 1]
  return flat / jnp.maximum(norm, _NORM_EPS)


def pair_dissimilar(key: jax.Array, anchors: jax.Array, pool: jax.Array, k: int) -> jax.Array:
  """int32 [n_a]: per anchor, a uniform pick among the k pool rows of lowest cosine similarity.

  k is clipped to the pool size; all anchors are paired by one [n_a, n_p] matmul.
  """
  if anchors.shape[1:] != pool.shape[1:] or anchors.ndim < 2:
    raise ValueError(
      f'pair_dissimilar: anchors {anchors.shape} and pool {pool.shape} must be '
      '[n, ...] with the same per-sample shape.'
    )
  if pool.shape[0] < 1:
    raise ValueError('pair_dissimilar: the pool is empty; it needs at least one sample.')
  if int(k) != k or k < 1:
    raise ValueError(f'pair_dissimilar: k={k!r} must be an integer >= 1.')
  k = min(int(k), pool.shape[0])
  sim = jnp.matmul(
    _unit_rows(anchors), _unit_rows(pool).T, precision=jax.lax.Precision.HIGHEST
  )  # [n_a, n_p]
  _, candidates = jax.lax.top_k(-sim, k)  # [n_a, k] most dissimilar first
  pick = jax.random.randint(key, (anchors.shape[0],), 0, k)  # [n_a]
  return jnp.take_along_axis(candidates, pick[:, None], axis=1)[:, 0].astype(jnp.int32)


def median_split(difficulty: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hard_idx [n//2], easy_idx [n - n//2]): stable ascending sort, the lower half is hard."""
  if difficulty.ndim != 1:
    raise ValueError(f'median_split: difficulty must be [n], got {difficulty.shape}.')
  n = difficulty.shape[0]
  order = jnp.argsort(difficulty, stable=True).astype(jnp.int32)  # [n]
  return order[: n // 2], order[n // 2 :]


def mix(x_a: jax.Array, x_b: jax.Array, lam) -> jax.Array:
  """lam * x_a + (1 - lam) * x_b; lam is a scalar or one value per row of x_a."""
  lam = jnp.asarray(lam, jnp.float32)
  lam = lam.reshape(lam.shape + (1,) * (x_a.ndim - lam.ndim))  # broadcast over features
  mixed = lam * x_a.astype(jnp.float32) + (1.0 - lam) * x_b.astype(jnp.float32)
  return mixed.astype(x_a.dtype)


def mix_pairs(x_lb, y_lb, anchor_idx, x_ulb, pseudo_labels, partner_idx, lam, num_classes):
  """Mixes x_lb[anchor_idx] with x_ulb[partner_idx] -> (x [n], onehot_a [n, K], onehot_b [n, K])."""
  x = mix(x_lb[anchor_idx], x_ulb[partner_idx], lam)  # [n, H, W, C]
  onehot_a = jax.nn.one_hot(y_lb[anchor_idx], num_classes, dtype=jnp.float32)  # [n, K]
  onehot_b = jax.nn.one_hot(pseudo_labels[partner_idx], num_classes, dtype=jnp.float32)
  return x, onehot_a, onehot_b


def mixup_bce(logits: jax.Array, onehot_a: jax.Array, onehot_b: jax.Array, lam) -> jax.Array:
  """lam * BCE(logits, a) + (1 - lam) * BCE(logits, b), each a mean over batch x classes."""
  if not logits.shape == onehot_a.shape == onehot_b.shape or logits.ndim != 2:
    raise ValueError(
      f'mixup_bce: logits {logits.shape}, onehot_a {onehot_a.shape} and '
      f'onehot_b {onehot_b.shape} must all be the same [n, K].'
    )
  if logits.shape[0] == 0:
    raise ValueError('mixup_bce: empty batch (the mean would be NaN).')
  lam = jnp.asarray(lam, jnp.float32)
  return lam * _row_bce(logits, onehot_a).mean() + (1.0 - lam) * _row_bce(logits, onehot_b).mean()


def _row_bce(logits: jax.Array, onehot: jax.Array) -> jax.Array:
  """f32 [n]: BCE-with-logits of each row, a mean over its classes."""
  z = logits.astype(jnp.float32)  # [n, K]
  return optax.sigmoid_binary_cross_entropy(z, onehot.astype(jnp.float32)).mean(axis=1)


def num_candidates(pair_k_frac: float, pool_size: int) -> int:
  """k = max(1, round(pair_k_frac * pool_size)); 15/224 of a 224 pool -> 15."""
  return max(1, round(pair_k_frac * pool_size))


def downsample(x: jax.Array, factor: int) -> jax.Array:
  """[n, H, W, C] -> f32 [n, ceil(H/f), ceil(W/f), C] means of f x f blocks (edges repeated).

  Cheap pairing inputs: 1/f^2 of the bytes to gather.
  """
  if factor == 1:
    return x
  n, h, w, c = x.shape
  hs, ws = -(-h // factor), -(-w // factor)
  padded = jnp.pad(
    x.astype(jnp.float32), ((0, 0), (0, hs * factor - h), (0, ws * factor - w), (0, 0)), mode='edge'
  )  # [n, hs*f, ws*f, C]
  return padded.reshape(n, hs, factor, ws, factor, c).mean(axis=(2, 4))


def _check_targeted(
  x_lb,
  y_lb,
  lb_difficulty,
  x_ulb,
  pseudo_labels,
  ulb_difficulty,
  pair_lb,
  pair_ulb,
  pair_k_frac,
  alpha,
  num_classes,
  pair_downsample,
  min_samples=2,
):
  """Shape and hyper-parameter checks, before anything is traced."""
  b, u = x_lb.shape[0], x_ulb.shape[0]
  if x_lb.shape[1:] != x_ulb.shape[1:]:
    raise ValueError(
      f'targeted_mixup: x_lb {x_lb.shape} and x_ulb {x_ulb.shape} must have the same image shape.'
    )
  if y_lb.shape != (b,) or lb_difficulty.shape != (b,):
    raise ValueError(
      f'targeted_mixup: y_lb {y_lb.shape} and lb_difficulty '
      f'{lb_difficulty.shape} must be [{b}] like x_lb.'
    )
  if pseudo_labels.shape != (u,) or ulb_difficulty.shape != (u,):
    raise ValueError(
      f'targeted_mixup: pseudo_labels {pseudo_labels.shape} and ulb_difficulty '
      f'{ulb_difficulty.shape} must be [{u}] like x_ulb.'
    )
  if b < min_samples or u < min_samples:
    raise ValueError(
      f'targeted_mixup: needs at least 2 labeled and 2 unlabeled samples per '
      f'split (got {b} and {u}) so both halves of the split are non-empty.'
    )
  if (pair_lb is None) != (pair_ulb is None):
    raise ValueError(
      'targeted_mixup: give both pair_lb and pair_ulb (pairing features) or '
      'neither (pair on the images).'
    )
  if pair_lb is not None and (
    pair_lb.shape[0] != b or pair_ulb.shape[0] != u or pair_lb.shape[1:] != pair_ulb.shape[1:]
  ):
    raise ValueError(
      f'targeted_mixup: pair_lb {pair_lb.shape} / pair_ulb {pair_ulb.shape} '
      f'must be [{b}, ...] / [{u}, ...] with the same feature shape.'
    )
  if int(pair_downsample) != pair_downsample or pair_downsample < 1:
    raise ValueError(
      f'targeted_mixup: pair_downsample={pair_downsample!r} must be an integer '
      '>= 1 (1 = pair on full-size images).'
    )
  if not 0.0 < pair_k_frac <= 1.0:
    raise ValueError(f'targeted_mixup: pair_k_frac={pair_k_frac} must be in (0, 1].')
  if not alpha > 0.0:
    raise ValueError(f'targeted_mixup: alpha={alpha} must be positive (Beta(alpha, alpha)).')
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'targeted_mixup: num_classes={num_classes!r} must be an integer >= 2.')


def _pairing_inputs(x, pair_feats, pair_downsample):
  """What the cosine pairing compares: the given features, else the (downsampled) images."""
  return downsample(x, pair_downsample) if pair_feats is None else pair_feats


def _pair_sets(
  key, lb_difficulty, ulb_difficulty, feats_lb, feats_ulb, *, pair_k_frac, alpha, random_pairing
):
  """The split, pairing and lambdas of the two sets, as indices (one kernel for both scopes).

  Returns (anchor_idx [B], partner_idx [B], lam1, lam2, num_first); anchors are rows of the
  labeled batch, partners rows of the unlabeled pool, set 1 = rows [:num_first].
  """
  key_pair1, key_pair2, key_lam1, key_lam2 = jax.random.split(key, 4)
  b, u = lb_difficulty.shape[0], ulb_difficulty.shape[0]
  if random_pairing:
    # Ablation: a random (not difficulty) split of the labeled batch into the same two
    # set sizes, each anchor with a uniformly random unlabeled partner.
    order = jax.random.permutation(key_pair2, b).astype(jnp.int32)  # [B]
    anchor_idx = jnp.concatenate([order[b // 2 :], order[: b // 2]])  # [B]
    partner_idx = jax.random.randint(key_pair1, (b,), 0, u).astype(jnp.int32)  # [B]
    num_first = b - b // 2
  else:
    hard_lb, easy_lb = median_split(lb_difficulty)  # [B//2], [B - B//2]
    hard_ulb, easy_ulb = median_split(ulb_difficulty)  # [U//2], [U - U//2]
    k1 = num_candidates(pair_k_frac, hard_ulb.shape[0])
    k2 = num_candidates(pair_k_frac, easy_ulb.shape[0])
    partner1 = hard_ulb[pair_dissimilar(key_pair1, feats_lb[easy_lb], feats_ulb[hard_ulb], k1)]
    partner2 = easy_ulb[pair_dissimilar(key_pair2, feats_lb[hard_lb], feats_ulb[easy_ulb], k2)]
    anchor_idx = jnp.concatenate([easy_lb, hard_lb])  # [B]
    partner_idx = jnp.concatenate([partner1, partner2])  # [B]
    num_first = easy_lb.shape[0]
  lam1 = jax.random.beta(key_lam1, alpha, alpha, dtype=jnp.float32)
  lam2 = jax.random.beta(key_lam2, alpha, alpha, dtype=jnp.float32)
  return anchor_idx, partner_idx, lam1, lam2, num_first


def _row_layout(rows: jax.Array, num_first: int, num_total: int, num_shares: int):
  """(in_first bool [n], row_weight f32 [n]) of global rows `rows` of the two sets.

  row_weight = num_shares / size of the row's set: summed over one share it gives that
  share's part of each set's mean, so the mean over shares (pmean) is the whole sets' loss.
  """
  in_first = rows < num_first  # [n]
  num_second = max(num_total - num_first, 1)  # 0 rows of set 2: its weight is never used
  weight = jnp.where(in_first, num_shares / num_first, num_shares / num_second)
  return in_first, weight.astype(jnp.float32)


def targeted_mixup(
  key: jax.Array,
  *,
  x_lb: jax.Array,
  y_lb: jax.Array,
  lb_difficulty: jax.Array,
  x_ulb: jax.Array,
  pseudo_labels: jax.Array,
  ulb_difficulty: jax.Array,
  num_classes: int,
  pair_k_frac: float = 15 / 224,
  alpha: float = 0.4,
  pair_lb: jax.Array | None = None,
  pair_ulb: jax.Array | None = None,
  random_pairing: bool = False,
  pair_downsample: int = 1,
) -> MixedSets:
  """Set 1 = labeled-easy x unlabeled-hard, set 2 = labeled-hard x unlabeled-easy.

  Low difficulty = hard (median split). Pairs on pair_lb / pair_ulb (e.g. features)
  when given, else on the images (average-downsampled by pair_downsample). One lambda
  ~ Beta(alpha, alpha) per set.
  random_pairing: ablation with no difficulty split: the labeled batch is split at
  random into the same two set sizes, each anchor gets a uniformly random unlabeled
  partner; same loss (mix_1 + mix_2, one lambda per set) as the targeted version.
  """
  _check_targeted(
    x_lb,
    y_lb,
    lb_difficulty,
    x_ulb,
    pseudo_labels,
    ulb_difficulty,
    pair_lb,
    pair_ulb,
    pair_k_frac,
    alpha,
    num_classes,
    pair_downsample,
  )
  b = x_lb.shape[0]
  anchor_idx, partner_idx, lam1, lam2, num_first = _pair_sets(
    key,
    lb_difficulty,
    ulb_difficulty,
    _pairing_inputs(x_lb, pair_lb, pair_downsample),
    _pairing_inputs(x_ulb, pair_ulb, pair_downsample),
    pair_k_frac=pair_k_frac,
    alpha=alpha,
    random_pairing=random_pairing,
  )
  in_first, row_weight = _row_layout(jnp.arange(b), num_first, b, 1)
  lam_per_sample = jnp.where(in_first, lam1, lam2)  # [B]
  x, onehot_a, onehot_b = mix_pairs(
    x_lb, y_lb, anchor_idx, x_ulb, pseudo_labels, partner_idx, lam_per_sample, num_classes
  )
  return MixedSets(
    x=x,
    onehot_a=onehot_a,
    onehot_b=onehot_b,
    lam_per_sample=lam_per_sample,
    lam1=lam1,
    lam2=lam2,
    anchor_idx=anchor_idx,
    partner_idx=partner_idx,
    in_first=in_first,
    row_weight=row_weight,
    num_first=num_first,
  )


def _gather(x: jax.Array, axis_name: str) -> jax.Array:
  """[n, ...] per device -> [D * n, ...] in device order (the global batch's rows)."""
  return jax.lax.all_gather(x, axis_name, tiled=True)


def _mix_across_devices(x_lb, x_ulb, anchor_idx, partner_idx, lam, axis_name):
  """This device's share of the global mixed images without gathering full-size images.

  Every device writes lam * its own anchors and (1 - lam) * its own partners into the
  global rows that use them (zeros elsewhere); one reduce-scatter adds the two nonzero
  terms of each row (so the sum is the one-device value) and hands each device its rows.
  """
  device = jax.lax.axis_index(axis_name)
  b, u = x_lb.shape[0], x_ulb.shape[0]
  expand = lambda v: v.reshape(v.shape + (1,) * (x_lb.ndim - 1))  # [n] -> [n, 1, 1, 1]
  own_anchor = expand(anchor_idx // b == device)  # [B_g, 1, 1, 1]
  own_partner = expand(partner_idx // u == device)
  lam = expand(lam)
  from_lb = jnp.where(own_anchor, lam * x_lb[anchor_idx % b].astype(jnp.float32), 0.0)
  from_ulb = jnp.where(
    own_partner, (1.0 - lam) * x_ulb[partner_idx % u].astype(jnp.float32), 0.0
  )  # [B_g, H, W, C]
  mixed = jax.lax.psum_scatter(from_lb + from_ulb, axis_name, scatter_dimension=0, tiled=True)
  return mixed.astype(x_lb.dtype)  # [B_g / D, H, W, C]


def global_targeted_mixup(
  key: jax.Array,
  *,
  x_lb: jax.Array,
  y_lb: jax.Array,
  lb_difficulty: jax.Array,
  x_ulb: jax.Array,
  pseudo_labels: jax.Array,
  ulb_difficulty: jax.Array,
  num_classes: int,
  axis_name: str,
  pair_k_frac: float = 15 / 224,
  alpha: float = 0.4,
  pair_lb: jax.Array | None = None,
  pair_ulb: jax.Array | None = None,
  random_pairing: bool = False,
  pair_downsample: int = 1,
) -> MixedSets:
  """Per-device: this device's share of `targeted_mixup` of the GLOBAL batch over `axis_name`.

  Arguments are this device's rows (as `targeted_mixup`); `key` must be the same on every
  device. Gathers difficulties, labels, pseudo-labels and the pairing inputs (features, or
  images downsampled by pair_downsample), splits and pairs the global batch as one device
  would, and returns global rows [i*b, (i+1)*b) of the mixed sets on device i (b = local
  labeled count). anchor_idx / partner_idx index the global batch / pool. With pairing on
  full-size images those are gathered anyway and mixed locally; otherwise full-size images
  never cross devices whole: a reduce-scatter builds each device's mixed rows.
  """
  _check_targeted(
    x_lb,
    y_lb,
    lb_difficulty,
    x_ulb,
    pseudo_labels,
    ulb_difficulty,
    pair_lb,
    pair_ulb,
    pair_k_frac,
    alpha,
    num_classes,
    pair_downsample,
    min_samples=1,
  )
  num_devices = jax.lax.axis_size(axis_name)
  b, u = x_lb.shape[0], x_ulb.shape[0]
  b_global, u_global = b * num_devices, u * num_devices
  if b_global < 2 or u_global < 2:
    raise ValueError(
      f'global_targeted_mixup: needs at least 2 labeled and 2 unlabeled samples '
      f'in the global batch (got {b_global} and {u_global}).'
    )
  gather = functools.partial(_gather, axis_name=axis_name)
  full_images = pair_lb is None and pair_downsample == 1
  feats_lb = gather(_pairing_inputs(x_lb, pair_lb, pair_downsample))  # [B_g, ...]
  feats_ulb = gather(_pairing_inputs(x_ulb, pair_ulb, pair_downsample))  # [U_g, ...]
  anchor_g, partner_g, lam1, lam2, num_first = _pair_sets(
    key,
    gather(lb_difficulty),
    gather(ulb_difficulty),
    feats_lb,
    feats_ulb,
    pair_k_frac=pair_k_frac,
    alpha=alpha,
    random_pairing=random_pairing,
  )  # [B_g] each
  in_first_g, row_weight_g = _row_layout(jnp.arange(b_global), num_first, b_global, num_devices)
  lam_g = jnp.where(in_first_g, lam1, lam2)  # [B_g]
  share = lambda v: jax.lax.dynamic_slice_in_dim(v, jax.lax.axis_index(axis_name) * b, b)
  anchor_idx, partner_idx = share(anchor_g), share(partner_g)  # [b]
  lam_per_sample = share(lam_g)  # [b]
  if full_images:
    x = mix(feats_lb[anchor_idx], feats_ulb[partner_idx], lam_per_sample)  # [b, H, W, C]
  else:
    x = _mix_across_devices(x_lb, x_ulb, anchor_g, partner_g, lam_g, axis_name)
  onehot_a = jax.nn.one_hot(gather(y_lb)[anchor_idx], num_classes, dtype=jnp.float32)
  onehot_b = jax.nn.one_hot(gather(pseudo_labels)[partner_idx], num_classes, dtype=jnp.float32)
  return MixedSets(
    x=x,
    onehot_a=onehot_a,
    onehot_b=onehot_b,
    lam_per_sample=lam_per_sample,
    lam1=lam1,
    lam2=lam2,
    anchor_idx=anchor_idx,
    partner_idx=partner_idx,
    in_first=share(in_first_g),
    row_weight=share(row_weight_g),
    num_first=num_first,
    axis_name=axis_name,
  )


def partner_onehot(mixed: MixedSets, pseudo_labels: jax.Array, num_classes: int) -> jax.Array:
  """f32 [n_mix, K]: one-hot of `pseudo_labels` (this device's [U]) at each row's partner.

  The fused step re-targets its mixed sets with this step's pseudo-labels; in global scope
  partner_idx indexes the global pool, so the labels are gathered first.
  """
  if mixed.axis_name is not None:
    pseudo_labels = _gather(pseudo_labels, mixed.axis_name)  # [U_g]
  return jax.nn.one_hot(pseudo_labels[mixed.partner_idx], num_classes, dtype=jnp.float32)


def mixup_loss(logits_mixed: jax.Array, mixed: MixedSets) -> tuple[jax.Array, dict]:
  """mix_1 + mix_2: each set's lambda-weighted BCE, a mean over the set's rows x classes.

  On a share of global sets the values are this share's part times the number of shares,
  so their pmean over the axis is the whole sets' loss (set 2 absent -> 0).
  """
  n_mix = mixed.x.shape[0]
  if logits_mixed.shape[0] != n_mix:
    raise ValueError(f'mixup_loss: {logits_mixed.shape[0]} logits for {n_mix} mixed samples.')
  lam = mixed.lam_per_sample
  row_loss = lam * _row_bce(logits_mixed, mixed.onehot_a) + (1.0 - lam) * _row_bce(
    logits_mixed, mixed.onehot_b
  )  # [n_mix]
  weighted = mixed.row_weight * row_loss  # [n_mix]
  loss1 = jnp.sum(jnp.where(mixed.in_first, weighted, 0.0))
  loss2 = jnp.sum(jnp.where(mixed.in_first, 0.0, weighted))
  loss = loss1 + loss2
  return loss, {'mixup_loss_1': loss1, 'mixup_loss_2': loss2, 'mixup_loss': loss}


def difficulty_half_means(difficulty: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean difficulty of the hard half, of the easy half) of one batch's median split."""
  hard_idx, easy_idx = median_split(difficulty)
  return difficulty[hard_idx].mean(), difficulty[easy_idx].mean()


def split_metrics(
  lb_difficulty: jax.Array,
  ulb_difficulty: jax.Array,
  pseudo_labels: jax.Array,
  hidden_labels: jax.Array | None = None,
  axis_name: str | None = None,
) -> dict:
  """Mean difficulty of each half of the split, and the unlabeled-hard pseudo-label error.

  Shows the easy/hard split means something. With `axis_name` (global scope) the inputs
  are gathered first, so the values are those of the split the global pairing used.
  """
  if axis_name is not None:
    gather = functools.partial(_gather, axis_name=axis_name)
    lb_difficulty, ulb_difficulty = gather(lb_difficulty), gather(ulb_difficulty)
    pseudo_labels = gather(pseudo_labels)
    hidden_labels = None if hidden_labels is None else gather(hidden_labels)
  hard_lb, easy_lb = median_split(lb_difficulty)
  hard_ulb, easy_ulb = median_split(ulb_difficulty)
  out = {
    'difficulty_lb_easy': lb_difficulty[easy_lb].mean(),
    'difficulty_lb_hard': lb_difficulty[hard_lb].mean(),
    'difficulty_ulb_easy': ulb_difficulty[easy_ulb].mean(),
    'difficulty_ulb_hard': ulb_difficulty[hard_ulb].mean(),
  }
  if hidden_labels is not None:
    out['hard_pseudo_label_error'] = hard_pseudo_label_error(pseudo_labels, hidden_labels, hard_ulb)
  return out


def hard_pseudo_label_error(
  pseudo_labels: jax.Array, hidden_labels: jax.Array, hard_idx: jax.Array
) -> jax.Array:
  """Fraction of unlabeled-hard samples with a wrong pseudo-label (hidden label -1 ignored)."""
  pseudo = pseudo_labels[hard_idx]
  hidden = hidden_labels[hard_idx]
  known = hidden >= 0
  wrong = jnp.sum((pseudo != hidden) & known)
  return wrong / jnp.maximum(known.sum(), 1).astype(jnp.float32)
