"""FlexMatch (Zhang et al. 2021) as in USB: curriculum pseudo-labelling with class-wise thresholds.

Mirrors USB `semilearn/algorithms/flexmatch/utils.py` (FlexMatchThresholdingHook):
  1. mask = max_prob >= p_cutoff * sigma[c] / (2 - sigma[c]) for the predicted class c,
     with sigma = `classwise_acc` as left by the PREVIOUS step (USB computes the mask
     first and calls `update()` last), so at step 1 sigma = 0 and every sample passes;
  2. samples with max_prob >= p_cutoff write their predicted class into `selected_label`;
  3. sigma is recomputed from the updated table, but only while no single value
     (e.g. -1 at the start) fills the whole table:
       thresh_warmup=True:  sigma_c = count(c) / max(count(-1), max_k count(k))
       thresh_warmup=False: sigma_c = count(c) / max_k count(k)
     otherwise sigma keeps its previous value.
Data parallel (our choice; USB keeps one unsynchronised table per GPU): (idx, class,
selected) are all-gathered before the scatter so every replica holds the same table;
an index repeated in the gathered batch keeps its LAST selected occurrence.
"""

import dataclasses
from typing import ClassVar

import flax
import jax
import jax.numpy as jnp

from cmix_jax.algorithms import base


@flax.struct.dataclass
class FlexMatchState:
  """Per-unlabeled-sample selection memory and the class-wise learning effect."""

  selected_label: jax.Array  # int32 [N_ulb], -1 = never selected
  classwise_acc: jax.Array  # float32 [C] sigma, used by the NEXT step's mask


def last_selected(idx: jax.Array, selected: jax.Array, num_rows: int) -> jax.Array:
  """bool [n]: selected, idx in [0, num_rows), and no later selected position has the same idx.

  Makes the scatter below write each row once, deterministically on any backend.
  """
  valid = selected & (idx >= 0) & (idx < num_rows)  # [n]
  key = jnp.where(valid, idx, num_rows)  # [n], num_rows = not written
  order = jnp.argsort(key, stable=True)  # equal indices keep batch order
  sorted_key = key[order]
  last_in_run = jnp.concatenate([sorted_key[1:] != sorted_key[:-1], jnp.ones((1,), bool)])
  return jnp.zeros(key.shape, bool).at[order].set(last_in_run) & valid


def write_last_selected(
  table: jax.Array, idx: jax.Array, values: jax.Array, selected: jax.Array
) -> jax.Array:
  """table[idx[i]] = values[i] where selected[i]; repeated indices keep the last selected one.

  Indices outside [0, N) (e.g. -1 padding) are ignored.
  """
  n_table = table.shape[0]
  keep = last_selected(idx, selected, n_table)  # [n]
  return table.at[jnp.where(keep, idx, n_table)].set(values.astype(table.dtype), mode='drop')


def learning_effect(
  selected_label: jax.Array, previous: jax.Array, thresh_warmup: bool
) -> jax.Array:
  """USB's `update()`: class-wise learning effect sigma [C] from the selection table."""
  num_classes = previous.shape[0]
  counts = jnp.bincount(selected_label + 1, length=num_classes + 1)  # [C + 1], bin 0 = unused
  class_counts = counts[1:]  # [C]
  denominator = jnp.max(counts) if thresh_warmup else jnp.max(class_counts)
  sigma = class_counts.astype(jnp.float32) / jnp.maximum(denominator, 1).astype(jnp.float32)
  # USB: `if max(pseudo_counter.values()) < ulb_dest_len`, i.e. not one value everywhere.
  return jnp.where(jnp.max(counts) < selected_label.shape[0], sigma, previous)


@dataclasses.dataclass(frozen=True)
class FlexMatch(base.Algorithm):
  """FixMatch with per-class thresholds p_cutoff * M(sigma_c), M(x) = x / (2 - x) (convex)."""

  name: ClassVar[str] = 'flexmatch'
  p_cutoff: float = 0.95
  thresh_warmup: bool = True

  @classmethod
  def field_errors(cls, fields):
    return base.p_cutoff_errors(fields['p_cutoff'])

  def init_state(self, num_unlabeled: int, num_classes: int) -> FlexMatchState:
    base.check_sizes(self.name, num_unlabeled, num_classes)
    return FlexMatchState(
      selected_label=jnp.full((num_unlabeled,), -1, jnp.int32),
      classwise_acc=jnp.zeros((num_classes,), jnp.float32),
    )

  def pseudo_label(self, state: FlexMatchState, logits_w, idx_ulb, *, axis_name=None):
    """Mask with last step's sigma, then record confident predictions and refresh sigma."""
    base.check_weak_batch('flexmatch', logits_w, idx_ulb, state.classwise_acc.shape[0])
    probs, label = base.weak_probs(logits_w)  # [U, C], [U]
    max_prob = jnp.max(probs, axis=-1)  # [U]
    sigma = state.classwise_acc  # [C] from the end of the previous step (USB order)
    class_threshold = self.p_cutoff * sigma / (2.0 - sigma)  # [C] convex mapping
    weight = (max_prob >= class_threshold[label]).astype(jnp.float32)  # [U]

    selected = max_prob >= self.p_cutoff  # [U]
    g_idx, g_label, g_selected = base.all_gather(
      axis_name, idx_ulb.astype(jnp.int32), label, selected
    )  # [n_global]
    selected_label = write_last_selected(state.selected_label, g_idx, g_label, g_selected)
    classwise_acc = learning_effect(selected_label, sigma, self.thresh_warmup)
    new_state = FlexMatchState(selected_label=selected_label, classwise_acc=classwise_acc)

    metrics = {
      'mask_ratio': jnp.mean(weight),
      'mean_threshold': jnp.mean(class_threshold),  # over classes, as used this step
      'selected_frac': jnp.mean((selected_label >= 0).astype(jnp.float32)),
    }
    pseudo = base.PseudoLabels(label=label, weight=weight, max_prob=max_prob)
    return pseudo, new_state, metrics
