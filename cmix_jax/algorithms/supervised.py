"""Labeled-only baseline: no unlabeled branch, no state."""

import dataclasses
from typing import ClassVar

from cmix_jax.algorithms import base


@dataclasses.dataclass(frozen=True)
class Supervised(base.Algorithm):
  """Cross-entropy on the labeled batch only; the trainer skips the unlabeled branch."""

  name: ClassVar[str] = 'supervised'
  uses_unlabeled: ClassVar[bool] = False

  def pseudo_label(self, state, logits_w, idx_ulb, *, axis_name=None):
    raise ValueError(
      'supervised uses no unlabeled data, so it has no pseudo-labels: skip the '
      'unlabeled branch when algorithm.uses_unlabeled is False.'
    )
