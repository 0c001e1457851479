"""CalibrateMix's targeted mixup (docs/method.md §4): median split, dissimilar pairing, mix, BCE.

Labeled-easy anchors are mixed with unlabeled-hard partners (set 1) and
labeled-hard anchors with unlabeled-easy partners (set 2). Each anchor's
partner is drawn uniformly among the k pool samples LEAST cosine-similar to it.
Everything has static shapes and is jittable and vmappable; the pairing is one
matmul + top_k for all anchors at once (the reference loops over anchors).
"""

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
  anchor_idx: jax.Array  # int32 [n_mix] rows of x_lb
  partner_idx: jax.Array  # int32 [n_mix] rows of x_ulb
  num_first: int = flax.struct.field(pytree_node=False)  # size of set 1


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
    raise ValueError(f'pair_dissimilar: anchors {anchors.shape} and pool {pool.shape} must be '
                     '[n, ...] with the same per-sample shape.')
  if pool.shape[0] < 1:
    raise ValueError('pair_dissimilar: the pool is empty; it needs at least one sample.')
  if int(k) != k or k < 1:
    raise ValueError(f'pair_dissimilar: k={k!r} must be an integer >= 1.')
  k = min(int(k), pool.shape[0])
  sim = jnp.matmul(_unit_rows(anchors), _unit_rows(pool).T,
                   precision=jax.lax.Precision.HIGHEST)  # [n_a, n_p]
  _, candidates = jax.lax.top_k(-sim, k)  # [n_a, k] most dissimilar first
  pick = jax.random.randint(key, (anchors.shape[0],), 0, k)  # [n_a]
  return jnp.take_along_axis(candidates, pick[:, None], axis=1)[:, 0].astype(jnp.int32)


def median_split(difficulty: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(hard_idx [n//2], easy_idx [n - n//2]): stable ascending sort, the lower half is hard."""
  if difficulty.ndim != 1:
    raise ValueError(f'median_split: difficulty must be [n], got {difficulty.shape}.')
  n = difficulty.shape[0]
  order = jnp.argsort(difficulty, stable=True).astype(jnp.int32)  # [n]
  return order[:n // 2], order[n // 2:]


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
    raise ValueError(f'mixup_bce: logits {logits.shape}, onehot_a {onehot_a.shape} and '
                     f'onehot_b {onehot_b.shape} must all be the same [n, K].')
  if logits.shape[0] == 0:
    raise ValueError('mixup_bce: empty batch (the mean would be NaN).')
  z = logits.astype(jnp.float32)
  bce_a = optax.sigmoid_binary_cross_entropy(z, onehot_a.astype(jnp.float32)).mean()
  bce_b = optax.sigmoid_binary_cross_entropy(z, onehot_b.astype(jnp.float32)).mean()
  lam = jnp.asarray(lam, jnp.float32)
  return lam * bce_a + (1.0 - lam) * bce_b


def num_candidates(pair_k_frac: float, pool_size: int) -> int:
  """k = max(1, round(pair_k_frac * pool_size)); 15/224 of a 224 pool -> 15."""
  return max(1, round(pair_k_frac * pool_size))


def _check_targeted(x_lb, y_lb, lb_difficulty, x_ulb, pseudo_labels, ulb_difficulty,
                    pair_lb, pair_ulb, pair_k_frac, alpha, num_classes):
  """Shape and hyper-parameter checks, before anything is traced."""
  b, u = x_lb.shape[0], x_ulb.shape[0]
  if x_lb.shape[1:] != x_ulb.shape[1:]:
    raise ValueError(f'targeted_mixup: x_lb {x_lb.shape} and x_ulb {x_ulb.shape} must have '
                     'the same image shape.')
  if y_lb.shape != (b,) or lb_difficulty.shape != (b,):
    raise ValueError(f'targeted_mixup: y_lb {y_lb.shape} and lb_difficulty '
                     f'{lb_difficulty.shape} must be [{b}] like x_lb.')
  if pseudo_labels.shape != (u,) or ulb_difficulty.shape != (u,):
    raise ValueError(f'targeted_mixup: pseudo_labels {pseudo_labels.shape} and ulb_difficulty '
                     f'{ulb_difficulty.shape} must be [{u}] like x_ulb.')
  if b < 2 or u < 2:
    raise ValueError(f'targeted_mixup: needs at least 2 labeled and 2 unlabeled samples per '
                     f'device (got {b} and {u}) so both halves of the split are non-empty.')
  if (pair_lb is None) != (pair_ulb is None):
    raise ValueError('targeted_mixup: give both pair_lb and pair_ulb (pairing features) or '
                     'neither (pair on the images).')
  if pair_lb is not None and (pair_lb.shape[0] != b or pair_ulb.shape[0] != u
                              or pair_lb.shape[1:] != pair_ulb.shape[1:]):
    raise ValueError(f'targeted_mixup: pair_lb {pair_lb.shape} / pair_ulb {pair_ulb.shape} '
                     f'must be [{b}, ...] / [{u}, ...] with the same feature shape.')
  if not 0.0 < pair_k_frac <= 1.0:
    raise ValueError(f'targeted_mixup: pair_k_frac={pair_k_frac} must be in (0, 1].')
  if not alpha > 0.0:
    raise ValueError(f'targeted_mixup: alpha={alpha} must be positive (Beta(alpha, alpha)).')
  if int(num_classes) != num_classes or num_classes < 2:
    raise ValueError(f'targeted_mixup: num_classes={num_classes!r} must be an integer >= 2.')


def targeted_mixup(key: jax.Array, *, x_lb: jax.Array, y_lb: jax.Array,
                   lb_difficulty: jax.Array, x_ulb: jax.Array, pseudo_labels: jax.Array,
                   ulb_difficulty: jax.Array, num_classes: int,
                   pair_k_frac: float = 15 / 224, alpha: float = 0.4,
                   pair_lb: jax.Array | None = None, pair_ulb: jax.Array | None = None,
                   random_pairing: bool = False) -> MixedSets:
  """Set 1 = labeled-easy x unlabeled-hard, set 2 = labeled-hard x unlabeled-easy.

  Low difficulty = hard (median split). Pairs on pair_lb / pair_ulb (e.g. features)
  when given, else on the images. One lambda ~ Beta(alpha, alpha) per set.
  random_pairing: ablation with no difficulty split: the labeled batch is split at
  random into the same two set sizes, each anchor gets a uniformly random unlabeled
  partner; same loss (mix_1 + mix_2, one lambda per set) as the targeted version.
  """
  _check_targeted(x_lb, y_lb, lb_difficulty, x_ulb, pseudo_labels, ulb_difficulty,
                  pair_lb, pair_ulb, pair_k_frac, alpha, num_classes)
  key_pair1, key_pair2, key_lam1, key_lam2 = jax.random.split(key, 4)
  b, u = x_lb.shape[0], x_ulb.shape[0]

  if random_pairing:
    # Ablation: a random (not difficulty) split of the labeled batch into the same two
    # set sizes, each anchor with a uniformly random unlabeled partner.
    order = jax.random.permutation(key_pair2, b).astype(jnp.int32)  # [B]
    anchor_idx = jnp.concatenate([order[b // 2:], order[:b // 2]])  # [B]
    partner_idx = jax.random.randint(key_pair1, (b,), 0, u).astype(jnp.int32)  # [B]
    num_first = b - b // 2
  else:
    feats_lb = x_lb if pair_lb is None else pair_lb
    feats_ulb = x_ulb if pair_ulb is None else pair_ulb
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
  lam_per_sample = jnp.concatenate([jnp.full((num_first,), lam1),
                                    jnp.full((b - num_first,), lam2)])  # [B]
  x, onehot_a, onehot_b = mix_pairs(x_lb, y_lb, anchor_idx, x_ulb, pseudo_labels,
                                    partner_idx, lam_per_sample, num_classes)
  return MixedSets(x=x, onehot_a=onehot_a, onehot_b=onehot_b, lam_per_sample=lam_per_sample,
                   lam1=lam1, lam2=lam2, anchor_idx=anchor_idx, partner_idx=partner_idx,
                   num_first=num_first)


def mixup_loss(logits_mixed: jax.Array, mixed: MixedSets) -> tuple[jax.Array, dict]:
  """mix_1 + mix_2: mixup_bce of each set with its own lambda (set 2 absent -> 0)."""
  n_mix = mixed.x.shape[0]
  if logits_mixed.shape[0] != n_mix:
    raise ValueError(f'mixup_loss: {logits_mixed.shape[0]} logits for {n_mix} mixed samples.')
  n1 = mixed.num_first
  loss1 = mixup_bce(logits_mixed[:n1], mixed.onehot_a[:n1], mixed.onehot_b[:n1], mixed.lam1)
  loss2 = (mixup_bce(logits_mixed[n1:], mixed.onehot_a[n1:], mixed.onehot_b[n1:], mixed.lam2)
           if n1 < n_mix else jnp.zeros((), jnp.float32))
  loss = loss1 + loss2
  return loss, {'mixup_loss_1': loss1, 'mixup_loss_2': loss2, 'mixup_loss': loss}


def difficulty_half_means(difficulty: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean difficulty of the hard half, of the easy half) of one batch's median split."""
  hard_idx, easy_idx = median_split(difficulty)
  return difficulty[hard_idx].mean(), difficulty[easy_idx].mean()


def hard_pseudo_label_error(pseudo_labels: jax.Array, hidden_labels: jax.Array,
                            hard_idx: jax.Array) -> jax.Array:
  """Fraction of unlabeled-hard samples with a wrong pseudo-label (hidden label -1 ignored)."""
  pseudo = pseudo_labels[hard_idx]
  hidden = hidden_labels[hard_idx]
  known = hidden >= 0
  wrong = jnp.sum((pseudo != hidden) & known)
  return wrong / jnp.maximum(known.sum(), 1).astype(jnp.float32)
