"""Interface of the base SSL algorithms, their two losses, and shared helpers.

An `Algorithm` is a frozen (hashable, jit-static) dataclass of hyperparameters.
Its state is a separate pytree carried in the train state; `pseudo_label` is a
pure per-device function that may all-gather / psum over `axis_name` so every
replica ends the step with identical state (equal to one device on the
concatenated global batch).
"""

import dataclasses
from typing import Any, ClassVar
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from cmix_jax import checks


@flax.struct.dataclass
class PseudoLabels:
  """Targets of the unlabeled loss for one (per-device) unlabeled batch."""

  label: jax.Array  # int32 [U] hard pseudo-label
  weight: jax.Array  # float32 [U] mask (0/1) or soft weight in [0, 1]
  max_prob: jax.Array  # float32 [U] the confidence the weight was computed from


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """Base class: hyperparameters as fields, state as an explicit pytree."""

  name: ClassVar[str] = 'base'
  uses_unlabeled: ClassVar[bool] = True

  @classmethod
  def field_errors(cls, fields: Mapping[str, Any]) -> list[str]:
    """Problems with hyperparameter values keyed by field name (= their config.ssl name)."""
    del fields  # no hyperparameters
    return []

  @classmethod
  def ssl_errors(cls, ssl: Mapping[str, Any]) -> list[str]:
    """Problems with this algorithm's fields as `config.ssl` holds them, built or not."""
    return cls.field_errors({f.name: ssl[f.name] for f in dataclasses.fields(cls)})

  def __post_init__(self):
    errors = self.field_errors(dataclasses.asdict(self))
    if errors:
      raise ValueError(f'{self.name}: ' + ' '.join(errors))

  def init_state(self, num_unlabeled: int, num_classes: int) -> Any:
    """Fresh (replicated) algorithm state; an empty dict when there is none."""
    check_sizes(self.name, num_unlabeled, num_classes)
    return {}

  def pseudo_label(
    self, state: Any, logits_w: jax.Array, idx_ulb: jax.Array, *, axis_name: str | None = None
  ) -> tuple[PseudoLabels, Any, dict]:
    """Weak-view logits [U, C] -> (pseudo-labels, new state, metrics)."""
    raise NotImplementedError(f'{type(self).__name__}.pseudo_label')


# ----------------------------------------------------------------------------
# Losses.


def unsup_loss(logits_s: jax.Array, pseudo: PseudoLabels) -> jax.Array:
  """USB consistency loss with hard labels: mean over ALL U samples of weight * CE (float32)."""
  if (
    logits_s.ndim != 2
    or pseudo.label.shape != (logits_s.shape[0],)
    or (pseudo.weight.shape != pseudo.label.shape)
  ):
    raise ValueError(
      f'unsup_loss: expected logits_s [U, C] and pseudo label/weight [U]; got '
      f'{logits_s.shape}, {pseudo.label.shape}, {pseudo.weight.shape}.'
    )
  ce = optax.softmax_cross_entropy_with_integer_labels(
    logits_s.astype(jnp.float32), pseudo.label.astype(jnp.int32)
  )  # [U]
  return jnp.mean(pseudo.weight.astype(jnp.float32) * ce)


def supervised_loss(
  logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean cross-entropy against one-hot labels smoothed as optax does: (1 - a) * onehot + a / C.

  (USB's `smooth_targets` spreads a over the C - 1 wrong classes instead; equal at a = 0.)
  """
  if logits.ndim != 2 or labels.shape != (logits.shape[0],):
    raise ValueError(
      f'supervised_loss: expected logits [B, C] and labels [B]; got {logits.shape}, {labels.shape}.'
    )
  if isinstance(label_smoothing, (int, float)) and label_smoothing_errors(label_smoothing):
    raise ValueError('supervised_loss: ' + label_smoothing_errors(label_smoothing)[0])
  targets = optax.smooth_labels(
    jax.nn.one_hot(labels, logits.shape[1], dtype=jnp.float32), label_smoothing
  )  # [B, C]
  return jnp.mean(optax.softmax_cross_entropy(logits.astype(jnp.float32), targets))


# ----------------------------------------------------------------------------
# Hyperparameter rules (one place each; config_validation and the dataclasses use them).


def label_smoothing_errors(value) -> list[str]:
  return checks.out_of_range('ssl.label_smoothing', value, '[0, 1)', 'not in USB: 0')


def p_cutoff_errors(value) -> list[str]:
  return checks.out_of_range(
    'ssl.p_cutoff', value, '(0, 1]', 'fixmatch/flexmatch confidence threshold; USB: 0.95'
  )


# ----------------------------------------------------------------------------
# Helpers shared by the algorithms.


def check_sizes(where: str, num_unlabeled: int, num_classes: int) -> None:
  for label, value, low in (('num_unlabeled', num_unlabeled, 1), ('num_classes', num_classes, 2)):
    if int(value) != value or value < low:
      raise ValueError(f'{where}.init_state: {label}={value!r} must be an integer >= {low}.')


def check_weak_batch(
  where: str, logits_w: jax.Array, idx_ulb: jax.Array, num_classes: int | None = None
) -> None:
  """Shape/dtype checks at trace time, so bad input fails before compiling."""
  if logits_w.ndim != 2 or logits_w.shape[1] < 2:
    raise ValueError(f'{where}: logits_w must be [U, C] with C >= 2, got {logits_w.shape}.')
  if idx_ulb.shape != (logits_w.shape[0],):
    raise ValueError(f'{where}: idx_ulb must be [U] = [{logits_w.shape[0]}], got {idx_ulb.shape}.')
  if not jnp.issubdtype(idx_ulb.dtype, jnp.integer):
    raise ValueError(f'{where}: idx_ulb must hold integer dataset indices, got {idx_ulb.dtype}.')
  if num_classes is not None and logits_w.shape[1] != num_classes:
    raise ValueError(
      f'{where}: logits_w has {logits_w.shape[1]} classes but the state was built '
      f'for {num_classes}: rebuild it with init_state(num_unlabeled, '
      f'{logits_w.shape[1]}).'
    )


def weak_probs(logits_w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(softmax probs float32 [U, C], argmax label int32 [U]) of the weak logits, no gradient."""
  logits = jax.lax.stop_gradient(logits_w).astype(jnp.float32)  # [U, C]
  return jax.nn.softmax(logits, axis=-1), jnp.argmax(logits, axis=-1).astype(jnp.int32)


def global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Sum over the data-parallel axis (identity on one device)."""
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def all_gather(axis_name: str | None, *arrays: jax.Array) -> tuple[jax.Array, ...]:
  """Concatenates per-device batches in device order (identity on one device)."""
  if axis_name is None:
    return arrays
  return tuple(jax.lax.all_gather(a, axis_name, tiled=True) for a in arrays)


def global_batch_size(local_size: int, axis_name: str | None) -> int:
  """Static size of the global batch (local size times the number of devices)."""
  return local_size if axis_name is None else local_size * jax.lax.axis_size(axis_name)
