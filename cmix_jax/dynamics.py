"""Per-sample training dynamics: AUM (labeled), APM (unlabeled), cartography statistics.

The tables live in one pytree (`DynamicsState`) carried next to params and are
updated inside the jitted step by pure functions. Update rules (docs/method.md §3):

- AUM: running mean (sum / count) of the margin z_y - max_{j!=y} z_j, every step.
- APM: per class, APM <- a * PM + (1 - a) * APM with a = delta / (1 + n), n = the
  sample's APM count before this update; only when `update_apm` (after warm-up).
- Cartography: Welford running mean / population variance of the probability of
  the gold label (labeled) or of the pseudo-label (unlabeled), every step.
- APM label: the pseudo-label each sample had at its last APM update, so the fused
  (one-pass) CalibrateMix step can read the APM the two-pass step read for it then
  (`fused_unlabeled_difficulty`; see there for the exact sense of agreement).

Duplicate indices in one (global) batch follow the reference's PyTorch index
assignment: the sample is counted once per step and ONE value is kept; here,
deterministically, the last occurrence in batch order. Indices outside [0, N)
are ignored (e.g. -1 padding).

Layouts. Replicated (default): every device holds the full tables; with
`axis_name` the batch's (index, value) pairs are all-gathered before the scatter,
so every replica ends each step with identical tables, equal to the one-device
result on the concatenated batch. Sharded (`sharded=True`, needs `axis_name`):
device i holds rows [i*S, (i+1)*S) with S = ceil(N / D) (build with
`DynamicsState.init(..., num_shards=D)`), applies only the gathered updates it
owns, and batch read-outs are routed back with a psum. Both layouts give equal
numbers; `shard_state` / `unshard_state` convert between them on the host.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cmix_jax import storage

MEASURES = ('margin', 'confidence')


# ----------------------------------------------------------------------------
# Per-sample margins.


def aum_margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Margin z_y - max_{j!=y} z_j per sample, float32 [B] (negative if y is not top-1)."""
  _check_logits(logits, 'aum_margin')
  z = logits.astype(jnp.float32)  # [B, C]
  top_vals, top_idx = jax.lax.top_k(z, 2)  # [B, 2]
  z_y = jnp.take_along_axis(z, labels[:, None].astype(jnp.int32), axis=1)[:, 0]  # [B]
  return jnp.where(top_idx[:, 0] == labels, top_vals[:, 0] - top_vals[:, 1], z_y - top_vals[:, 0])


def pseudo_margins(logits: jax.Array) -> jax.Array:
  """For every class c, z_c - max_{j!=c} z_j, float32 [B, C] (from the top-2 values)."""
  _check_logits(logits, 'pseudo_margins')
  z = logits.astype(jnp.float32)  # [B, C]
  top_vals, top_idx = jax.lax.top_k(z, 2)  # [B, 2]
  is_top1 = jnp.arange(z.shape[1])[None, :] == top_idx[:, :1]  # [B, C]
  return jnp.where(is_top1, (top_vals[:, 0] - top_vals[:, 1])[:, None], z - top_vals[:, :1])


def _check_logits(logits, where: str) -> None:
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(
      f'{where}: logits must be [batch, num_classes] with num_classes >= 2, '
      f'got shape {logits.shape}.'
    )


# ----------------------------------------------------------------------------
# State.


@flax.struct.dataclass
class DynamicsState:
  """Per-sample tables (float32; counts int32), indexed by dataset index."""

  aum_sum: jax.Array  # [N_lb] sum of margins
  aum_count: jax.Array  # int32 [N_lb]
  lb_conf_mean: jax.Array  # [N_lb] Welford mean of p(gold label)
  lb_conf_m2: jax.Array  # [N_lb] Welford sum of squared deviations
  lb_conf_count: jax.Array  # int32 [N_lb]
  apm: jax.Array  # [N_ulb, C]
  apm_count: jax.Array  # int32 [N_ulb] APM updates so far
  apm_label: jax.Array  # int32 [N_ulb] pseudo-label at the last APM update (-1 = none yet)
  ulb_conf_mean: jax.Array  # [N_ulb] Welford mean of p(pseudo-label)
  ulb_conf_m2: jax.Array  # [N_ulb]
  ulb_conf_count: jax.Array  # int32 [N_ulb]

  @classmethod
  def init(
    cls, num_labeled: int, num_unlabeled: int, num_classes: int, num_shards: int = 1
  ) -> 'DynamicsState':
    """Zero tables; with num_shards=D, the zero tables of ONE shard (ceil(N/D) rows)."""
    for name, value, low in (
      ('num_labeled', num_labeled, 0),
      ('num_unlabeled', num_unlabeled, 0),
      ('num_classes', num_classes, 2),
      ('num_shards', num_shards, 1),
    ):
      if int(value) != value or value < low:
        raise ValueError(f'DynamicsState.init: {name}={value!r} must be an integer >= {low}.')
    n_lb = math.ceil(num_labeled / num_shards)
    n_ulb = math.ceil(num_unlabeled / num_shards)
    f32 = lambda *shape: jnp.zeros(shape, jnp.float32)
    i32 = lambda n: jnp.zeros((n,), jnp.int32)
    return cls(
      aum_sum=f32(n_lb),
      aum_count=i32(n_lb),
      lb_conf_mean=f32(n_lb),
      lb_conf_m2=f32(n_lb),
      lb_conf_count=i32(n_lb),
      apm=f32(n_ulb, num_classes),
      apm_count=i32(n_ulb),
      apm_label=jnp.full((n_ulb,), -1, jnp.int32),
      ulb_conf_mean=f32(n_ulb),
      ulb_conf_m2=f32(n_ulb),
      ulb_conf_count=i32(n_ulb),
    )


def shard_state(state: DynamicsState, num_shards: int) -> DynamicsState:
  """Host: full tables -> stacked shards [D, ceil(N/D), ...] (zero-padded rows)."""

  def split(x):
    x = np.asarray(x)
    rows = math.ceil(x.shape[0] / num_shards)
    pad = np.zeros((rows * num_shards - x.shape[0],) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad]).reshape((num_shards, rows) + x.shape[1:])

  return jax.tree.map(split, state)


def unshard_state(stacked: DynamicsState, num_labeled: int, num_unlabeled: int) -> DynamicsState:
  """Host: stacked shards [D, S, ...] -> full tables (first N rows)."""

  def join(x, n):
    x = np.asarray(x)
    return x.reshape((-1,) + x.shape[2:])[:n]

  lb = {'aum_sum', 'aum_count', 'lb_conf_mean', 'lb_conf_m2', 'lb_conf_count'}
  return stacked.replace(
    **{
      f.name: join(getattr(stacked, f.name), num_labeled if f.name in lb else num_unlabeled)
      for f in dataclasses.fields(stacked)
    }
  )


# ----------------------------------------------------------------------------
# Scatter plumbing shared by both layouts.


def _gather(axis_name: str | None, *arrays):
  """All-gathers per-device arrays along the batch axis (device order = batch order)."""
  if axis_name is None:
    return arrays
  return tuple(jax.lax.all_gather(a, axis_name, tiled=True) for a in arrays)


def _last_occurrence(idx: jax.Array) -> jax.Array:
  """bool [n]: True where no later position in the batch holds the same index."""
  order = jnp.argsort(idx, stable=True)  # equal indices keep batch order
  sorted_idx = idx[order]
  last_in_run = jnp.concatenate([sorted_idx[1:] != sorted_idx[:-1], jnp.ones((1,), bool)])
  return jnp.zeros(idx.shape, bool).at[order].set(last_in_run)


def _rows(idx: jax.Array, table_rows: int, axis_name: str | None, sharded: bool):
  """Gathered global indices [n] -> (read rows, write rows (table_rows = dropped), owned)."""
  offset = jax.lax.axis_index(axis_name) * table_rows if sharded else 0
  local = idx - offset  # [n]
  owned = (local >= 0) & (local < table_rows)
  read = jnp.clip(local, 0, max(table_rows - 1, 0))
  write = jnp.where(owned & _last_occurrence(idx), local, table_rows)
  return read, write, owned


def _check_layout(axis_name, sharded, where):
  if sharded and axis_name is None:
    raise ValueError(f'{where}: sharded=True needs axis_name (the data-parallel axis).')


def _check_batch(where: str, idx, logits, labels) -> None:
  if (
    idx.ndim != 1
    or labels.ndim != 1
    or logits.ndim != 2
    or not (idx.shape[0] == labels.shape[0] == logits.shape[0])
  ):
    raise ValueError(
      f'{where}: expected idx [B], logits [B, C], labels [B]; got '
      f'{idx.shape}, {logits.shape}, {labels.shape}.'
    )
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f'{where}: idx must be integer dataset indices, got {idx.dtype}.')


def _welford(mean, m2, count, x):
  """One Welford step per row: (mean, m2, count) after observing x."""
  n = count + 1
  dev = x - mean
  new_mean = mean + dev / n
  return new_mean, m2 + dev * (x - new_mean), n


def _label_prob(logits, labels):
  """float32 [B]: softmax probability of `labels`."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # [B, C]
  return jnp.take_along_axis(probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


# ----------------------------------------------------------------------------
# Updates.


def update_labeled(
  state: DynamicsState,
  idx: jax.Array,
  logits: jax.Array,
  labels: jax.Array,
  *,
  axis_name: str | None = None,
  sharded: bool = False,
) -> DynamicsState:
  """AUM sum/count and gold-label-probability Welford for this step's labeled batch."""
  _check_batch('update_labeled', idx, logits, labels)
  _check_layout(axis_name, sharded, 'update_labeled')
  margin = aum_margin(logits, labels)  # [B]
  prob = _label_prob(logits, labels)  # [B]
  idx, margin, prob = _gather(axis_name, idx.astype(jnp.int32), margin, prob)  # [n]
  read, write, _ = _rows(idx, state.aum_sum.shape[0], axis_name, sharded)
  mean, m2, count = _welford(
    state.lb_conf_mean[read], state.lb_conf_m2[read], state.lb_conf_count[read], prob
  )
  put = lambda table, rows: table.at[write].set(rows, mode='drop')
  return state.replace(
    aum_sum=put(state.aum_sum, state.aum_sum[read] + margin),
    aum_count=put(state.aum_count, state.aum_count[read] + 1),
    lb_conf_mean=put(state.lb_conf_mean, mean),
    lb_conf_m2=put(state.lb_conf_m2, m2),
    lb_conf_count=put(state.lb_conf_count, count),
  )


def update_unlabeled(
  state: DynamicsState,
  idx: jax.Array,
  logits: jax.Array,
  pseudo_labels: jax.Array,
  *,
  update_apm: jax.Array | bool,
  delta: float = 0.997,
  axis_name: str | None = None,
  sharded: bool = False,
) -> DynamicsState:
  """APM (only where the traced bool `update_apm`) and pseudo-label Welford (always)."""
  _check_batch('update_unlabeled', idx, logits, pseudo_labels)
  _check_layout(axis_name, sharded, 'update_unlabeled')
  if logits.shape[1] != state.apm.shape[1]:
    raise ValueError(
      f'update_unlabeled: logits have {logits.shape[1]} classes but the APM '
      f'table has {state.apm.shape[1]}; build the state with that num_classes.'
    )
  update_apm = jnp.asarray(update_apm)
  if update_apm.ndim != 0:
    raise ValueError(f'update_unlabeled: update_apm must be a scalar, got {update_apm.shape}.')
  pm = pseudo_margins(logits)  # [U, C]
  prob = _label_prob(logits, pseudo_labels)  # [U]
  idx, pm, prob, labels = _gather(
    axis_name, idx.astype(jnp.int32), pm, prob, pseudo_labels.astype(jnp.int32)
  )  # [n], [n, C], [n], [n]
  rows = state.apm.shape[0]
  read, write, _ = _rows(idx, rows, axis_name, sharded)
  apm_write = jnp.where(update_apm.astype(bool), write, rows)  # no scatter before warm-up ends
  n_before = state.apm_count[read]  # [n]
  alpha = (delta / (1.0 + n_before.astype(jnp.float32)))[:, None]  # [n, 1]
  apm_rows = alpha * pm + (1.0 - alpha) * state.apm[read]  # [n, C]
  mean, m2, count = _welford(
    state.ulb_conf_mean[read], state.ulb_conf_m2[read], state.ulb_conf_count[read], prob
  )
  put = lambda table, values: table.at[write].set(values, mode='drop')
  return state.replace(
    apm=state.apm.at[apm_write].set(apm_rows, mode='drop'),
    apm_count=state.apm_count.at[apm_write].set(n_before + 1, mode='drop'),
    apm_label=state.apm_label.at[apm_write].set(labels, mode='drop'),
    ulb_conf_mean=put(state.ulb_conf_mean, mean),
    ulb_conf_m2=put(state.ulb_conf_m2, m2),
    ulb_conf_count=put(state.ulb_conf_count, count),
  )


# ----------------------------------------------------------------------------
# Read-outs for the current batch.


def _read_batch(
  row_fn: Callable,
  idx: jax.Array,
  per_sample: Sequence[jax.Array],
  table_rows: int,
  axis_name: str | None,
  sharded: bool,
) -> jax.Array:
  """row_fn(rows, *per_sample) for this device's batch, routed from the owners if sharded."""
  if not sharded:
    return row_fn(idx, *per_sample)
  n_local = idx.shape[0]
  gidx, *gathered = _gather(axis_name, idx.astype(jnp.int32), *per_sample)  # [n]
  read, _, owned = _rows(gidx, table_rows, axis_name, sharded)
  values = jax.lax.psum(jnp.where(owned, row_fn(read, *gathered), 0.0), axis_name)  # [n]
  return jax.lax.dynamic_slice_in_dim(values, jax.lax.axis_index(axis_name) * n_local, n_local)


def _check_measure(measure: str, where: str) -> None:
  if measure not in MEASURES:
    raise ValueError(f'{where}: measure={measure!r}; use one of {MEASURES}.')


def _mean_or_zero(total, count):
  return jnp.where(count > 0, total / jnp.maximum(count, 1).astype(jnp.float32), 0.0)


def labeled_difficulty(
  state: DynamicsState,
  idx: jax.Array,
  measure: str = 'margin',
  *,
  axis_name: str | None = None,
  sharded: bool = False,
) -> jax.Array:
  """float32 [B]: AUM ('margin') or running mean gold-label prob ('confidence'); low = hard."""
  _check_measure(measure, 'labeled_difficulty')
  _check_layout(axis_name, sharded, 'labeled_difficulty')
  if measure == 'margin':
    row_fn = lambda r: _mean_or_zero(state.aum_sum[r], state.aum_count[r])
  else:
    row_fn = lambda r: state.lb_conf_mean[r]
  return _read_batch(row_fn, idx, (), state.aum_sum.shape[0], axis_name, sharded)


def unlabeled_difficulty(
  state: DynamicsState,
  idx: jax.Array,
  pseudo_labels: jax.Array,
  measure: str = 'margin',
  *,
  axis_name: str | None = None,
  sharded: bool = False,
) -> jax.Array:
  """float32 [U]: APM at the pseudo-label ('margin') or running mean p(pseudo) ('confidence')."""
  _check_measure(measure, 'unlabeled_difficulty')
  _check_layout(axis_name, sharded, 'unlabeled_difficulty')
  if idx.shape != pseudo_labels.shape or idx.ndim != 1:
    raise ValueError(
      f'unlabeled_difficulty: idx {idx.shape} and pseudo_labels '
      f'{pseudo_labels.shape} must both be [U].'
    )
  if measure == 'margin':
    row_fn = lambda r, p: state.apm[r, p]
  else:
    row_fn = lambda r, p: state.ulb_conf_mean[r]
  return _read_batch(
    row_fn, idx, (pseudo_labels.astype(jnp.int32),), state.apm.shape[0], axis_name, sharded
  )


def stored_pseudo_label(
  state: DynamicsState, idx: jax.Array, *, axis_name: str | None = None, sharded: bool = False
) -> jax.Array:
  """int32 [U]: each sample's pseudo-label at its last APM update (0 if it has none yet)."""
  _check_layout(axis_name, sharded, 'stored_pseudo_label')
  row_fn = lambda r: jnp.maximum(state.apm_label[r], 0).astype(jnp.float32)
  return _read_batch(row_fn, idx, (), state.apm.shape[0], axis_name, sharded).astype(jnp.int32)


def fused_unlabeled_difficulty(
  state: DynamicsState,
  idx: jax.Array,
  measure: str = 'margin',
  *,
  axis_name: str | None = None,
  sharded: bool = False,
) -> jax.Array:
  """float32 [U]: the unlabeled difficulty the fused (one-pass) step can know before its pass.

  'margin': APM at the pseudo-label of the sample's last APM update (0 if none yet);
  'confidence': the running mean p(pseudo-label). In what sense it agrees with the two-pass
  `unlabeled_difficulty(state_after_update, idx, pseudo_labels)`: on the same tables, whose
  last update used the same pseudo-labels, both give the same values (so the same median
  split). Within a step the fused read comes from the tables BEFORE this step's update, i.e.
  it is exactly the value the two-pass step read for that sample at its previous visit; it
  misses this step's APM term (weight ~1/(n+1)) and a pseudo-label that changed since.
  """
  _check_measure(measure, 'fused_unlabeled_difficulty')
  _check_layout(axis_name, sharded, 'fused_unlabeled_difficulty')
  if measure == 'margin':

    def row_fn(r):
      label = state.apm_label[r]  # [n]
      value = jnp.take_along_axis(state.apm[r], jnp.maximum(label, 0)[:, None], axis=1)[:, 0]
      return jnp.where(label >= 0, value, 0.0)
  else:
    row_fn = lambda r: state.ulb_conf_mean[r]
  return _read_batch(row_fn, idx, (), state.apm.shape[0], axis_name, sharded)


def apm_start_after(warmup_steps: int, num_unlabeled: int, ulb_batch: int, fused: bool) -> int:
  """APM is updated at steps > this: warm-up's end (reference), or earlier for the fused step.

  The fused step splits on tables written before its pass, so its APM starts at the first
  step of the last complete unlabeled epoch before mixing (step warmup_steps + 1) begins:
  every sample then has at least one APM update when the first mixed step reads it
  (batches walk seeded epoch permutations, `pipeline.batch_indices`). Warm-ups shorter
  than one epoch start APM at step 0. `ulb_batch` is the GLOBAL unlabeled batch.
  """
  if not fused:
    return warmup_steps
  if num_unlabeled < 1 or ulb_batch < 1:
    raise ValueError(
      f'apm_start_after: num_unlabeled={num_unlabeled} and ulb_batch={ulb_batch} must be >= 1.'
    )
  first_mix_position = (warmup_steps + 1) * ulb_batch
  last_full_epoch = first_mix_position // num_unlabeled - 1
  if last_full_epoch < 0:
    return -1
  return last_full_epoch * num_unlabeled // ulb_batch - 1  # its first step, minus one


# ----------------------------------------------------------------------------
# Whole-table read-outs (plots, analysis). Variability is the POPULATION standard
# deviation sqrt(m2 / count), as Swayamdipta et al. (np.std over epochs).


def aum(state: DynamicsState) -> jax.Array:
  """[N_lb] area under the margin (0 for samples never seen)."""
  return _mean_or_zero(state.aum_sum, state.aum_count)


def labeled_confidence(state: DynamicsState) -> jax.Array:
  """[N_lb] running mean probability of the gold label."""
  return jnp.asarray(state.lb_conf_mean)


def labeled_variability(state: DynamicsState) -> jax.Array:
  """[N_lb] population std of the gold-label probability (0 for fewer than 1 update)."""
  return jnp.sqrt(jnp.maximum(_mean_or_zero(state.lb_conf_m2, state.lb_conf_count), 0.0))


def unlabeled_confidence(state: DynamicsState) -> jax.Array:
  """[N_ulb] running mean probability of the (then-current) pseudo-label."""
  return jnp.asarray(state.ulb_conf_mean)


def unlabeled_variability(state: DynamicsState) -> jax.Array:
  """[N_ulb] population std of the pseudo-label probability."""
  return jnp.sqrt(jnp.maximum(_mean_or_zero(state.ulb_conf_m2, state.ulb_conf_count), 0.0))


def to_numpy_dict(state: DynamicsState) -> dict:
  """All raw tables plus the derived read-outs, as numpy arrays (host)."""
  out = {f.name: np.asarray(getattr(state, f.name)) for f in dataclasses.fields(state)}
  out.update(
    aum=np.asarray(aum(state)),
    lb_confidence=np.asarray(labeled_confidence(state)),
    lb_variability=np.asarray(labeled_variability(state)),
    ulb_confidence=np.asarray(unlabeled_confidence(state)),
    ulb_variability=np.asarray(unlabeled_variability(state)),
  )
  return out


def save_npz(state: DynamicsState, path: str) -> None:
  """Writes `to_numpy_dict(state)` to `path` (.npz, local or gs://) for offline analysis."""
  storage.save_npz(path, **to_numpy_dict(state))
