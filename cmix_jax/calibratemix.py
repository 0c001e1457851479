"""CalibrateMix's part of a train step after warm-up: split, pair, mix, and the mixup loss.

Two variants (`config.calibratemix.passes`), both per-device code on axis `parallel.AXIS`:
- `two_pass_loss` (2, the reference): after the base pass has updated the dynamics tables,
  split and pair with this step's pseudo-labels, then a second forward pass over
  [x_lb, mixed, x_ulb_w, x_ulb_s] adds its SSL loss and the mixup loss (BN statistics and
  the algorithm's state are updated a second time, as in the reference).
- `fused_loss` (1): split and pair from the tables before this step's update, so the mixed
  sets ride in the single forward pass; targets still use this step's pseudo-labels. The
  unlabeled split reads APM at each sample's pseudo-label of its last APM update
  (`dynamics.fused_unlabeled_difficulty`): on the same tables and pseudo-labels it is the
  two-pass split, and within a step it is the value the two-pass step read for that sample at
  its previous visit (it misses this step's APM term and a pseudo-label that changed since).
  APM starts one unlabeled epoch before mixing (`base_step.apm_start_after`), so no sample
  is split on an empty row.
`config.calibratemix.second_pass_only` = True is the control arm of passes=2: the same second
pass (its SSL loss, BN and algorithm-state updates, rows [x_lb, x_ulb_w, x_ulb_s]) without
the mixed rows and without the mixup loss, so "CalibrateMix - control" isolates the mixup.
`config.calibratemix.pair_scope` = 'global' splits and pairs the global batch (each device
mixes its share of the global sets; the same on any device count), 'device' each device's own.
"""

import jax

from cmix_jax import base_step
from cmix_jax import dynamics
from cmix_jax import mixup
from cmix_jax.parallel import AXIS

PASSES = (2, 1)  # calibratemix.passes: two_pass_loss (the reference) | fused_loss
PAIR_SPACES = ('pixels', 'features')  # calibratemix.pair_space: what pairing compares
PAIR_SCOPES = ('global', 'device')  # calibratemix.pair_scope: whose batch is split and paired


def difficulties(dyn, batch, pseudo_label, config):
  """(labeled [B], unlabeled [U]) difficulty of this device's samples from the tables."""
  measure, layout = config.calibratemix.difficulty, base_step.table_layout(config)
  return (
    dynamics.labeled_difficulty(dyn, batch['idx_lb'], measure, **layout),
    dynamics.unlabeled_difficulty(dyn, batch['idx_ulb'], pseudo_label, measure, **layout),
  )


def fused_difficulties(dyn, batch, config):
  """(labeled [B], unlabeled [U]) difficulty the fused step can know before its forward pass."""
  measure, layout = config.calibratemix.difficulty, base_step.table_layout(config)
  return (
    dynamics.labeled_difficulty(dyn, batch['idx_lb'], measure, **layout),
    dynamics.fused_unlabeled_difficulty(dyn, batch['idx_ulb'], measure, **layout),
  )


def global_scope(config) -> bool:
  """True when the split and pairing see the global batch (pair_scope='global')."""
  return config.calibratemix.pair_scope == 'global'


def mixed_sets(
  key, views, batch, pseudo_label, difficulty, config, num_classes, pair_feats=None
) -> mixup.MixedSets:
  """Targeted (or random) mixup: this device's share of the global sets, or its own sets.

  In global scope `key` must be the same on every device.
  """
  cm = config.calibratemix
  lb_difficulty, ulb_difficulty = difficulty
  pair_lb, pair_ulb = pair_feats if pair_feats is not None else (None, None)
  kwargs = dict(
    x_lb=views['lb'],
    y_lb=batch['y_lb'],
    lb_difficulty=lb_difficulty,
    x_ulb=views['ulb_w'],
    pseudo_labels=pseudo_label,
    ulb_difficulty=ulb_difficulty,
    num_classes=num_classes,
    pair_k_frac=cm.pair_k_frac,
    alpha=cm.mixup_alpha,
    pair_lb=pair_lb,
    pair_ulb=pair_ulb,
    random_pairing=cm.random_pairing,
    pair_downsample=cm.pair_downsample,
  )
  if global_scope(config):
    return mixup.global_targeted_mixup(key, axis_name=AXIS, **kwargs)
  return mixup.targeted_mixup(key, **kwargs)


def mix_metrics(mixed: mixup.MixedSets, pseudo_label, batch, difficulty) -> dict:
  """Diagnostics that show the easy/hard split means something (of the split that paired)."""
  lb_diff, ulb_diff = difficulty
  return {
    'mix_lam1': mixed.lam1,
    'mix_lam2': mixed.lam2,
    **mixup.split_metrics(
      lb_diff, ulb_diff, pseudo_label, batch.get('y_ulb'), axis_name=mixed.axis_name
    ),
  }


def two_pass_loss(
  params,
  first: base_step.BasePass,
  dyn,
  batch,
  views,
  key,
  *,
  model,
  algorithm,
  config,
  num_classes,
):
  """passes=2: mix from the tables `first` updated, then a second pass -> (loss, pass, metrics).

  `dyn` holds the tables after this step's update; the returned loss is the second pass's
  SSL loss plus the mixup loss (the caller adds the first pass's loss). With
  `second_pass_only` (the control arm) nothing is mixed: the second pass's SSL loss alone.
  """
  kw = dict(model=model, algorithm=algorithm, config=config)
  if config.calibratemix.second_pass_only:
    second = base_step.base_pass(params, first.batch_stats, first.algo_state, batch, views, **kw)
    return second.loss, second, {f'pass2_{k}': v for k, v in second.metrics.items()}
  pseudo_label = first.pseudo.label
  difficulty = difficulties(dyn, batch, pseudo_label, config)
  pair_feats = None
  if config.calibratemix.pair_space == 'features':
    pair_feats = jax.lax.stop_gradient((first.feats_lb, first.feats_w))
  mixed = mixed_sets(key, views, batch, pseudo_label, difficulty, config, num_classes, pair_feats)
  second = base_step.base_pass(
    params, first.batch_stats, first.algo_state, batch, views, extra=mixed.x, **kw
  )
  mix_loss, loss_metrics = mixup.mixup_loss(second.logits_extra, mixed)
  metrics = {
    **loss_metrics,
    **mix_metrics(mixed, pseudo_label, batch, difficulty),
    **{f'pass2_{k}': v for k, v in second.metrics.items()},
  }
  return second.loss + mix_loss, second, metrics


def fused_loss(params, state, batch, views, key, *, model, algorithm, config, num_classes):
  """passes=1: mixed sets in the one forward pass -> (mixup loss, the pass, metrics).

  Pairing reads the tables before this step's update; the unlabeled difficulty is APM at
  each sample's last APM-update pseudo-label, since this step's is not known yet.
  """
  stored_label = dynamics.stored_pseudo_label(
    state.dynamics, batch['idx_ulb'], **base_step.table_layout(config)
  )
  difficulty = fused_difficulties(state.dynamics, batch, config)
  mixed = mixed_sets(key, views, batch, stored_label, difficulty, config, num_classes)
  out = base_step.base_pass(
    params,
    state.batch_stats,
    state.algo_state,
    batch,
    views,
    model=model,
    algorithm=algorithm,
    config=config,
    extra=mixed.x,
  )
  # This step's pseudo-label of each partner, not the stored one (global pool in global scope).
  mixed = mixed.replace(onehot_b=mixup.partner_onehot(mixed, out.pseudo.label, num_classes))
  mix_loss, loss_metrics = mixup.mixup_loss(out.logits_extra, mixed)
  metrics = {**loss_metrics, **mix_metrics(mixed, out.pseudo.label, batch, difficulty)}
  return mix_loss, out, metrics
