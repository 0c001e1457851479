"""FixMatch (Sohn et al. 2020) as in USB: hard pseudo-label, fixed confidence threshold."""

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from cmix_jax.algorithms import base


@dataclasses.dataclass(frozen=True)
class FixMatch(base.Algorithm):
  """label = argmax of the weak logits; weight = 1 where max softmax prob >= p_cutoff."""

  name: ClassVar[str] = 'fixmatch'
  p_cutoff: float = 0.95

  @classmethod
  def field_errors(cls, fields):
    return base.p_cutoff_errors(fields['p_cutoff'])

  def pseudo_label(self, state, logits_w, idx_ulb, *, axis_name=None):
    """Stateless: the mask needs only this batch (USB's FixedThresholdingHook)."""
    base.check_weak_batch('fixmatch', logits_w, idx_ulb)
    probs, label = base.weak_probs(logits_w)  # [U, C], [U]
    max_prob = jnp.max(probs, axis=-1)  # [U]
    weight = (max_prob >= self.p_cutoff).astype(jnp.float32)  # [U]
    pseudo = base.PseudoLabels(label=label, weight=weight, max_prob=max_prob)
    return pseudo, state, {'mask_ratio': jnp.mean(weight)}
