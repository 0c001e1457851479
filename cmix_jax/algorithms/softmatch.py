"""SoftMatch (Chen et al. 2023) as in USB: uniform alignment + truncated-Gaussian sample weights.

Order of one step, read from USB `semilearn/algorithms/softmatch/softmatch.py`
(train_step), `semilearn/algorithms/hooks/dist_align.py` (DistAlignEMAHook) and
`semilearn/algorithms/softmatch/utils.py` (SoftMatchWeightingHook):
  1. probs = softmax(raw weak logits);
  2. p_model <- batch mean of the RAW probs on the first step, else
     ema_p * p_model + (1 - ema_p) * batch mean (DistAlignEMAHook.update_p);
  3. aligned = probs * (1/C + 1e-6) / (p_model + 1e-6) with the UPDATED p_model,
     renormalised per row (DistAlignEMAHook.dist_align, eps as in USB);
  4. mu, var <- ema_p * (mu, var) + (1 - ema_p) * (mean, unbiased variance) of the
     aligned max prob over the (all-gathered) batch, from mu = 1/C, var = 1;
  5. weight = exp(-min(max_aligned - mu, 0)^2 / (2 var / n_sigma^2)) with the UPDATED
     mu, var (the hook's `masking` calls `update` first);
  6. pseudo-label = argmax of the RAW weak logits (not the aligned probs).
USB's SoftMatch.train_step calls the alignment hook regardless of its `dist_align`
argument; `dist_align=False` here skips step 3 (p_model is still tracked).
Batch statistics are over the GLOBAL batch (psum of sums and counts; the variance
is two-pass around the global mean), equal to one device on the concatenated batch.
"""

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp

from cmix_jax import checks
from cmix_jax.algorithms import base

_ALIGN_EPS = 1e-6  # USB's DistAlignEMAHook


@flax.struct.dataclass
class SoftMatchState:
  """EMAs of the unlabeled class distribution and of the aligned max-prob mean / variance."""

  p_model: jax.Array  # float32 [C]; replaced by the first batch's mean
  num_updates: jax.Array  # int32 [], steps seen (0 = p_model not yet initialised)
  mu: jax.Array  # float32 [] EMA of the batch mean of the aligned max prob
  var: jax.Array  # float32 [] EMA of its unbiased batch variance


def align_to_uniform(probs: jax.Array, p_model: jax.Array) -> jax.Array:
  """Uniform distribution alignment: probs * (1/C) / p_model, rows renormalised ([U, C])."""
  p_target = 1.0 / probs.shape[-1]
  aligned = probs * (p_target + _ALIGN_EPS) / (p_model + _ALIGN_EPS)  # [U, C]
  return aligned / jnp.sum(aligned, axis=-1, keepdims=True)


def truncated_gaussian_weight(
  max_prob: jax.Array, mu: jax.Array, var: jax.Array, n_sigma: float
) -> jax.Array:
  """1 above the mean, Gaussian fall-off below it with std sqrt(var) / n_sigma."""
  below = jnp.minimum(max_prob - mu, 0.0)  # [U]
  return jnp.exp(-jnp.square(below) / (2.0 * var / n_sigma**2))


@dataclasses.dataclass(frozen=True)
class SoftMatch(base.Algorithm):
  """Soft weights from an EMA Gaussian of the (aligned) confidence; no hard threshold."""

  name: ClassVar[str] = 'softmatch'
  ema_p: float = 0.999
  n_sigma: float = 2.0
  dist_align: bool = True

  @classmethod
  def field_errors(cls, fields):
    return checks.out_of_range(
      'ssl.ema_p', fields['ema_p'], '[0, 1)', 'softmatch EMA momentum; USB: 0.999'
    ) + checks.out_of_range(
      'ssl.n_sigma', fields['n_sigma'], '(0, inf)', 'softmatch Gaussian width divisor; USB: 2'
    )

  def init_state(self, num_unlabeled: int, num_classes: int) -> SoftMatchState:
    base.check_sizes(self.name, num_unlabeled, num_classes)
    return SoftMatchState(
      p_model=jnp.full((num_classes,), 1.0 / num_classes, jnp.float32),
      num_updates=jnp.zeros((), jnp.int32),
      mu=jnp.full((), 1.0 / num_classes, jnp.float32),
      var=jnp.ones((), jnp.float32),
    )

  def pseudo_label(self, state: SoftMatchState, logits_w, idx_ulb, *, axis_name=None):
    """Update p_model, align, update mu/var on the global batch, then weight (USB order)."""
    num_classes = state.p_model.shape[0]
    base.check_weak_batch('softmatch', logits_w, idx_ulb, num_classes)
    n_global = base.global_batch_size(logits_w.shape[0], axis_name)
    if n_global < 2:
      raise ValueError(
        f'softmatch: the global unlabeled batch has {n_global} sample; the '
        'unbiased variance needs >= 2 (raise data.batch_size or data.uratio).'
      )
    m = self.ema_p
    probs, label = base.weak_probs(logits_w)  # [U, C] raw, [U] from raw logits

    batch_mean_probs = base.global_sum(jnp.sum(probs, axis=0), axis_name) / n_global  # [C]
    p_model = jnp.where(
      state.num_updates > 0, m * state.p_model + (1.0 - m) * batch_mean_probs, batch_mean_probs
    )
    used = align_to_uniform(probs, p_model) if self.dist_align else probs  # [U, C]

    max_prob = jnp.max(used, axis=-1)  # [U]
    batch_mu = base.global_sum(jnp.sum(max_prob), axis_name) / n_global
    batch_var = base.global_sum(jnp.sum(jnp.square(max_prob - batch_mu)), axis_name) / (
      n_global - 1
    )
    mu = m * state.mu + (1.0 - m) * batch_mu
    var = m * state.var + (1.0 - m) * batch_var
    weight = truncated_gaussian_weight(max_prob, mu, var, self.n_sigma)  # [U]

    new_state = SoftMatchState(p_model=p_model, num_updates=state.num_updates + 1, mu=mu, var=var)
    pseudo = base.PseudoLabels(label=label, weight=weight, max_prob=max_prob)
    return pseudo, new_state, {'mask_ratio': jnp.mean(weight), 'mu': mu, 'var': var}
