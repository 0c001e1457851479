"""The pass every train step shares: one forward, the base SSL loss, the dynamics update.

Per-device code; collectives name the axis `parallel.AXIS`. `cmix_jax.calibratemix` builds its
two variants from `base_pass`, and `cmix_jax.steps` assembles the whole step.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cmix_jax import algorithms
from cmix_jax import dynamics
from cmix_jax.parallel import AXIS


@flax.struct.dataclass
class BasePass:
  """What one forward pass over [x_lb, extra, x_ulb_w, x_ulb_s] gives the step."""

  loss: jax.Array  # f32 [] supervised + lambda_u * unsupervised
  logits_lb: jax.Array  # f32 [B, C]
  logits_w: jax.Array | None  # f32 [U, C] weak view (None without unlabeled data)
  logits_extra: jax.Array | None  # f32 [M, C] the extra rows (mixed sets), if any
  feats_lb: jax.Array  # [B, F] penultimate features
  feats_w: jax.Array | None  # [U, F]
  pseudo: algorithms.PseudoLabels | None  # targets of the unsupervised loss
  batch_stats: Any  # BN statistics after this pass
  algo_state: Any  # the algorithm's state after this pass
  metrics: dict


def apply_model(model, params, batch_stats, x, train: bool):
  """Forward pass -> (logits f32 [N, C], features [N, F], new batch_stats)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  if train and batch_stats:
    (logits, feats), mutated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits.astype(jnp.float32), feats, mutated['batch_stats']
  logits, feats = model.apply(variables, x, train=train)
  return logits.astype(jnp.float32), feats, batch_stats


def split_rows(x, sizes):
  """Splits along axis 0 into consecutive pieces of the given static sizes."""
  return jnp.split(x, np.cumsum(sizes)[:-1])


def tables_sharded(config) -> bool:
  """Whether each device owns 1/D of the dynamics tables (the one place this is read)."""
  return bool(config.dynamics_sharded)


def table_layout(config) -> dict:
  """Keyword arguments selecting the replicated or sharded dynamics-table layout."""
  return {'axis_name': AXIS, 'sharded': tables_sharded(config)}


def base_pass(
  params, batch_stats, algo_state, batch, views, *, model, algorithm, config, extra=None
) -> BasePass:
  """One training forward pass and the base algorithm's loss; `extra` rows ride along.

  The rows are ordered [x_lb, extra, x_ulb_w, x_ulb_s], the reference's order for its
  second pass, so BN statistics see every row of the pass.
  """
  uses_ulb = algorithm.uses_unlabeled
  inputs = (
    [views['lb']]
    + ([] if extra is None else [extra])
    + ([views['ulb_w'], views['ulb_s']] if uses_ulb else [])
  )
  logits, feats, batch_stats = apply_model(
    model, params, batch_stats, jnp.concatenate(inputs), train=True
  )
  sizes = [x.shape[0] for x in inputs]
  logit_parts, feat_parts = split_rows(logits, sizes), split_rows(feats, sizes)
  logits_lb, feats_lb = logit_parts.pop(0), feat_parts.pop(0)
  logits_extra = None if extra is None else logit_parts.pop(0)
  if extra is not None:
    feat_parts.pop(0)
  if uses_ulb:
    logits_w, logits_s = logit_parts
    loss, pseudo, algo_state, metrics = _ssl_losses(
      logits_lb, logits_w, logits_s, batch, algo_state, algorithm, config
    )
    feats_w = feat_parts[0]
  else:
    loss = algorithms.supervised_loss(logits_lb, batch['y_lb'], config.ssl.label_smoothing)
    logits_w = feats_w = pseudo = None
    metrics = {'sup_loss': loss}
  return BasePass(
    loss=loss,
    logits_lb=logits_lb,
    logits_w=logits_w,
    logits_extra=logits_extra,
    feats_lb=feats_lb,
    feats_w=feats_w,
    pseudo=pseudo,
    batch_stats=batch_stats,
    algo_state=algo_state,
    metrics=metrics,
  )


def _ssl_losses(logits_lb, logits_w, logits_s, batch, algo_state, algorithm, config):
  """Supervised + lambda_u * unsupervised loss of one forward pass, and the new algo state."""
  sup = algorithms.supervised_loss(logits_lb, batch['y_lb'], config.ssl.label_smoothing)
  pseudo, algo_state, algo_metrics = algorithm.pseudo_label(
    algo_state, jax.lax.stop_gradient(logits_w), batch['idx_ulb'], axis_name=AXIS
  )
  unsup = algorithms.unsup_loss(logits_s, pseudo)
  loss = sup + config.ssl.ulb_loss_ratio * unsup
  return loss, pseudo, algo_state, {'sup_loss': sup, 'unsup_loss': unsup, **algo_metrics}


def apm_start_after(config, num_unlabeled: int) -> int:
  """APM is updated at steps > this: warm-up's end, or one unlabeled epoch earlier (fused)."""
  cm = config.calibratemix
  fused = bool(cm.enabled) and cm.passes == 1
  return dynamics.apm_start_after(
    cm.warmup_steps, num_unlabeled, config.data.batch_size * config.data.uratio, fused
  )


def update_dynamics(dyn, batch, out: BasePass, step, config, num_unlabeled: int):
  """AUM/confidence every step; APM after warm-up as the reference (fused: see apm_start_after)."""
  dyn = dynamics.update_labeled(
    dyn,
    batch['idx_lb'],
    jax.lax.stop_gradient(out.logits_lb),
    batch['y_lb'],
    **table_layout(config),
  )
  if out.logits_w is not None:
    # reference: skipped while step <= warmup; the fused split needs every row written first
    update_apm = step > apm_start_after(config, num_unlabeled)
    dyn = dynamics.update_unlabeled(
      dyn,
      batch['idx_ulb'],
      jax.lax.stop_gradient(out.logits_w),
      out.pseudo.label,
      update_apm=update_apm,
      delta=config.calibratemix.apm_delta,
      **table_layout(config),
    )
  return dyn


def accuracy_metrics(out: BasePass, batch) -> dict:
  """Labeled train accuracy and, where hidden labels are known, pseudo-label accuracy."""
  metrics = {'train_acc': jnp.mean(jnp.argmax(out.logits_lb, -1) == batch['y_lb'])}
  if out.pseudo is not None and 'y_ulb' in batch:
    known = batch['y_ulb'] >= 0
    metrics['pseudo_label_acc'] = jnp.sum(
      (out.pseudo.label == batch['y_ulb']) * known
    ) / jnp.maximum(known.sum(), 1)
  return metrics
