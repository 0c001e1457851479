"""Train state, optimizer, the pure per-device train/eval steps, and the training loop.

The step functions are per-device code whose collectives name the axis
`parallel.AXIS`; `cmix_jax.parallel` maps them over devices (pmap or shard_map).
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from cmix_jax import algorithms
from cmix_jax import dynamics
from cmix_jax import mixup
from cmix_jax import models
from cmix_jax.data import augment
from cmix_jax.parallel import AXIS


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step; checkpointed as a whole."""
  step: jax.Array  # int32 []
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any
  ema_batch_stats: Any
  algo_state: Any
  dynamics: dynamics.DynamicsState
  rng: jax.Array  # raw uint32 key data, so checkpoints need no key dtype support
  nonfinite_steps: jax.Array  # int32 [], steps skipped for a non-finite loss/grad
  first_nonfinite_step: jax.Array  # int32 [], -1 until the first such step


@flax.struct.dataclass
class DataInfo:
  """Static facts about the data a state is built for."""
  num_labeled: int = flax.struct.field(pytree_node=False)
  num_unlabeled: int = flax.struct.field(pytree_node=False)
  num_classes: int = flax.struct.field(pytree_node=False)
  image_shape: tuple = flax.struct.field(pytree_node=False)
  mean: tuple = flax.struct.field(pytree_node=False)
  std: tuple = flax.struct.field(pytree_node=False)


def learning_rate_schedule(optim: ml_collections.ConfigDict, num_steps: int):
  """USB's cosine decay without warm-up: lr * cos(factor * pi * k / K)."""
  def schedule(count):
    progress = jnp.minimum(count, num_steps) / num_steps
    return optim.lr * jnp.cos(optim.cosine_factor * jnp.pi * progress)
  return schedule


def decay_mask(params):
  """Coupled L2 applies to kernels only, not to BN scales/shifts or biases (ndim <= 1)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
  """SGD + Nesterov momentum with coupled weight decay, as USB's classic CV setup."""
  return optax.chain(
      optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
      optax.sgd(learning_rate_schedule(optim, num_steps), momentum=optim.momentum,
                nesterov=optim.nesterov))


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The configured network; model.bn_momentum, when set, overrides the architecture's BN decay."""
  bn_momentum = config.model.get('bn_momentum')
  return models.create_model(
      config.model.name, num_classes, dtype=config.model.dtype,
      bn_axis_name=AXIS if config.model.cross_replica_bn else None,
      **({} if bn_momentum is None else {'bn_momentum': float(bn_momentum)}))


def create_train_state(config, model, tx, algorithm, info: DataInfo, rng,
                       dynamics_shards: int = 1) -> TrainState:
  """Fresh state on the host (unreplicated): init params, optimizer, algorithm and dynamics.

  With `dynamics_shards=D` the dynamics tables are one device's zero shard (N/D rows).
  """
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((2,) + tuple(info.image_shape), jnp.float32), train=False))(init_rng)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  algo_state = (algorithm.init_state(info.num_unlabeled, info.num_classes)
                if algorithm.uses_unlabeled else {})
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
      opt_state=tx.init(params), ema_params=params, ema_batch_stats=batch_stats,
      algo_state=algo_state,
      dynamics=dynamics.DynamicsState.init(info.num_labeled, info.num_unlabeled,
                                           info.num_classes, num_shards=dynamics_shards),
      rng=jax.random.key_data(state_rng),
      nonfinite_steps=jnp.zeros((), jnp.int32),
      first_nonfinite_step=-jnp.ones((), jnp.int32))


def _sample_keys(key, n_local: int):
  """One key per sample from its position in the GLOBAL batch (same on any device count)."""
  offset = jax.lax.axis_index(AXIS) * n_local
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n_local))


def make_views(key, batch, config, info: DataInfo, uses_unlabeled: bool) -> dict:
  """Weak view of labeled, weak + strong views of unlabeled images, normalised."""
  k_lb, k_w, k_s = jax.random.split(key, 3)
  data = config.data
  weak = functools.partial(augment.weak_augment, pad_frac=data.crop_pad_frac, flip=data.flip)
  strong = functools.partial(augment.strong_augment, pad_frac=data.crop_pad_frac,
                             flip=data.flip, num_ops=data.randaugment_ops, cutout=data.cutout)
  norm = functools.partial(augment.normalize, mean=info.mean, std=info.std)
  n_lb = batch['x_lb'].shape[0]
  views = {'lb': norm(jax.vmap(weak)(_sample_keys(k_lb, n_lb), batch['x_lb']))}
  if uses_unlabeled:
    n_ulb = batch['x_ulb'].shape[0]
    views['ulb_w'] = norm(jax.vmap(weak)(_sample_keys(k_w, n_ulb), batch['x_ulb']))
    views['ulb_s'] = norm(jax.vmap(strong)(_sample_keys(k_s, n_ulb), batch['x_ulb']))
  return views


def _apply(model, params, batch_stats, x, train: bool):
  """Forward pass returning (logits f32, features, new batch_stats)."""
  variables = {'params': params}
  if batch_stats:
    variables['batch_stats'] = batch_stats
  if train and batch_stats:
    (logits, feats), mutated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits.astype(jnp.float32), feats, mutated['batch_stats']
  logits, feats = model.apply(variables, x, train=train)
  return logits.astype(jnp.float32), feats, batch_stats


def _split(x, sizes):
  """Splits along axis 0 into consecutive pieces of the given static sizes."""
  return jnp.split(x, np.cumsum(sizes)[:-1])


def _ssl_losses(logits_lb, logits_w, logits_s, batch, algo_state, algorithm, config):
  """Supervised + lambda_u * unsupervised loss of one forward pass, and the new algo state."""
  sup = algorithms.supervised_loss(logits_lb, batch['y_lb'], config.ssl.label_smoothing)
  pseudo, algo_state, algo_metrics = algorithm.pseudo_label(
      algo_state, jax.lax.stop_gradient(logits_w), batch['idx_ulb'], axis_name=AXIS)
  unsup = algorithms.unsup_loss(logits_s, pseudo)
  loss = sup + config.ssl.ulb_loss_ratio * unsup
  return loss, pseudo, algo_state, {'sup_loss': sup, 'unsup_loss': unsup, **algo_metrics}


def _table_layout(config) -> dict:
  """Keyword arguments selecting the replicated or sharded dynamics-table layout."""
  return {'axis_name': AXIS, 'sharded': bool(config.get('dynamics_sharded', False))}


def _update_dynamics(dyn, batch, logits_lb, logits_w, pseudo, step, config):
  """AUM/confidence every step; APM only after warm-up, as the reference code."""
  dyn = dynamics.update_labeled(dyn, batch['idx_lb'], jax.lax.stop_gradient(logits_lb),
                                batch['y_lb'], **_table_layout(config))
  if logits_w is not None:
    update_apm = step > config.calibratemix.warmup_steps  # reference: skipped while it <= warmup
    dyn = dynamics.update_unlabeled(dyn, batch['idx_ulb'], jax.lax.stop_gradient(logits_w),
                                    pseudo.label, update_apm=update_apm,
                                    delta=config.calibratemix.apm_delta,
                                    **_table_layout(config))
  return dyn


def _difficulties(dyn, batch, pseudo_label, config):
  """(labeled [B], unlabeled [U]) difficulty of this device's samples from the tables."""
  measure = config.calibratemix.difficulty
  return (dynamics.labeled_difficulty(dyn, batch['idx_lb'], measure, **_table_layout(config)),
          dynamics.unlabeled_difficulty(dyn, batch['idx_ulb'], pseudo_label, measure,
                                        **_table_layout(config)))


def _mixed_sets(key, views, feats, batch, pseudo_label, config, num_classes,
                lb_difficulty, ulb_difficulty):
  """Targeted (or random) mixup of this device's labeled and unlabeled weak views."""
  cm = config.calibratemix
  pair_lb = pair_ulb = None
  if cm.pair_space == 'features':
    pair_lb, pair_ulb = feats
  return mixup.targeted_mixup(
      key, x_lb=views['lb'], y_lb=batch['y_lb'], lb_difficulty=lb_difficulty,
      x_ulb=views['ulb_w'], pseudo_labels=pseudo_label, ulb_difficulty=ulb_difficulty,
      num_classes=num_classes, pair_k_frac=cm.pair_k_frac, alpha=cm.mixup_alpha,
      pair_lb=pair_lb, pair_ulb=pair_ulb, random_pairing=cm.random_pairing)


def _mix_metrics(mixed, pseudo, batch, lb_diff, ulb_diff) -> dict:
  """Diagnostics that show the easy/hard split means something."""
  hard_lb, easy_lb = mixup.median_split(lb_diff)
  hard_ulb, easy_ulb = mixup.median_split(ulb_diff)
  out = {'mix_lam1': mixed.lam1, 'mix_lam2': mixed.lam2,
         'difficulty_lb_easy': lb_diff[easy_lb].mean(),
         'difficulty_lb_hard': lb_diff[hard_lb].mean(),
         'difficulty_ulb_easy': ulb_diff[easy_ulb].mean(),
         'difficulty_ulb_hard': ulb_diff[hard_ulb].mean()}
  if 'y_ulb' in batch:
    out['hard_pseudo_label_error'] = mixup.hard_pseudo_label_error(
        pseudo.label, batch['y_ulb'], hard_ulb)
  return out


def _loss_fn(params, state, batch, views, key, *, model, algorithm, config, info, mix: bool):
  """Total loss of one step (base, or base + CalibrateMix with 1 or 2 passes)."""
  uses_ulb = algorithm.uses_unlabeled
  n_lb = views['lb'].shape[0]
  inputs = [views['lb']] + ([views['ulb_w'], views['ulb_s']] if uses_ulb else [])
  passes = config.calibratemix.passes
  fused = mix and passes == 1
  mixed = None
  if fused:
    # Fused variant: pairing uses the tables before this step's update; the unlabeled
    # difficulty is read at the class the stored APM prefers (this step's pseudo-label
    # is not known before the forward pass). Targets use this step's pseudo-labels.
    stored_label = dynamics.stored_pseudo_label(state.dynamics, batch['idx_ulb'],
                                                **_table_layout(config))
    lb_diff, ulb_diff = _difficulties(state.dynamics, batch, stored_label, config)
    mixed = _mixed_sets(key, views, None, batch, stored_label, config, info.num_classes,
                        lb_diff, ulb_diff)
    inputs.append(mixed.x)
  logits, feats, batch_stats = _apply(model, params, state.batch_stats,
                                      jnp.concatenate(inputs), train=True)
  sizes = [n_lb] + ([views['ulb_w'].shape[0]] * 2 if uses_ulb else []) + (
      [mixed.x.shape[0]] if fused else [])
  pieces = _split(logits, sizes)
  logits_lb = pieces[0]
  metrics = {}
  algo_state = state.algo_state
  if uses_ulb:
    loss, pseudo, algo_state, metrics = _ssl_losses(
        logits_lb, pieces[1], pieces[2], batch, algo_state, algorithm, config)
    logits_w = pieces[1]
  else:
    loss = algorithms.supervised_loss(logits_lb, batch['y_lb'], config.ssl.label_smoothing)
    metrics['sup_loss'] = loss
    pseudo, logits_w = None, None
  dyn = _update_dynamics(state.dynamics, batch, logits_lb, logits_w, pseudo, state.step, config)

  if fused:
    mixed = mixed.replace(onehot_b=_pseudo_onehot(mixed, pseudo, info.num_classes))
    mix_loss, mix_metrics = mixup.mixup_loss(pieces[-1], mixed)
    loss = loss + mix_loss
    metrics.update(mix_metrics)
    metrics.update(_mix_metrics(mixed, pseudo, batch, lb_diff, ulb_diff))
  elif mix:
    feat_pieces = _split(feats, sizes)
    pair_feats = (feat_pieces[0], feat_pieces[1]) if config.calibratemix.pair_space == 'features' else None
    lb_diff, ulb_diff = _difficulties(dyn, batch, pseudo.label, config)
    mixed = _mixed_sets(key, views, jax.lax.stop_gradient(pair_feats) if pair_feats else None,
                        batch, pseudo.label, config, info.num_classes, lb_diff, ulb_diff)
    # Reference: a second forward over [x_lb, mixed_1, mixed_2, x_ulb_w, x_ulb_s]; BN
    # statistics and the algorithm's EMAs are updated a second time.
    n_mix = mixed.x.shape[0]
    logits2, _, batch_stats = _apply(
        model, params, batch_stats,
        jnp.concatenate([views['lb'], mixed.x, views['ulb_w'], views['ulb_s']]), train=True)
    l_lb, l_mix, l_w, l_s = _split(logits2, [n_lb, n_mix, views['ulb_w'].shape[0],
                                             views['ulb_s'].shape[0]])
    loss2, _, algo_state, _ = _ssl_losses(l_lb, l_w, l_s, batch, algo_state, algorithm, config)
    mix_loss, mix_metrics = mixup.mixup_loss(l_mix, mixed)
    loss = loss + loss2 + mix_loss
    metrics.update(mix_metrics)
    metrics.update(_mix_metrics(mixed, pseudo, batch, lb_diff, ulb_diff))
  if uses_ulb and 'y_ulb' in batch:
    known = batch['y_ulb'] >= 0
    metrics['pseudo_label_acc'] = (jnp.sum((pseudo.label == batch['y_ulb']) * known)
                                   / jnp.maximum(known.sum(), 1))
  metrics['train_acc'] = jnp.mean(jnp.argmax(logits_lb, -1) == batch['y_lb'])
  return loss, (batch_stats, algo_state, dyn, metrics)


def _pseudo_onehot(mixed, pseudo, num_classes):
  """One-hot of this step's pseudo-label of each mixed sample's unlabeled partner."""
  return jax.nn.one_hot(pseudo.label[mixed.partner_idx], num_classes, dtype=jnp.float32)


def _where_finite(finite, new, old):
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def train_step(state: TrainState, batch: dict, *, model, tx, algorithm, config,
               info: DataInfo, mix: bool):
  """One SGD step on one device's share of the global batch -> (state, metrics).

  Gradients, BN statistics and metrics are averaged over the `batch` axis; the
  dynamics and algorithm tables are updated from all replicas' samples.
  `mix` (static) selects the CalibrateMix step used after warm-up.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  aug_key, mix_key = jax.random.split(step_key)
  views = make_views(aug_key, batch, config, info, algorithm.uses_unlabeled)
  # Pairing randomness differs per device (each pairs its own share, as DDP does).
  mix_key = jax.random.fold_in(mix_key, jax.lax.axis_index(AXIS))
  grad_fn = jax.value_and_grad(functools.partial(
      _loss_fn, model=model, algorithm=algorithm, config=config, info=info, mix=mix),
      has_aux=True)
  (loss, (batch_stats, algo_state, dyn, metrics)), grads = grad_fn(
      state.params, state, batch, views, mix_key)
  grads = jax.lax.pmean(grads, AXIS)
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optim.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  loss = jax.lax.pmean(loss, AXIS)
  grad_norm = optax.global_norm(grads)
  finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            & jnp.isfinite(optax.global_norm(updates)))
  new = dict(params=params, batch_stats=batch_stats, opt_state=opt_state,
             ema_params=ema_params, ema_batch_stats=batch_stats, algo_state=algo_state,
             dynamics=dyn)
  old = {k: getattr(state, k) for k in new}
  new = _where_finite(finite, new, old)
  state = state.replace(
      step=state.step + 1, **new,
      nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite,
                                     state.step, state.first_nonfinite_step))
  metrics = jax.lax.pmean(metrics, AXIS)
  metrics.update(loss=loss, grad_norm=grad_norm,
                 lr=learning_rate_schedule(config.optim, config.num_train_steps)(state.step - 1),
                 nonfinite_steps=state.nonfinite_steps)
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model, info: DataInfo, use_ema: bool = True):
  """Probabilities of one device's share of an evaluation batch (EMA weights by default)."""
  params = state.ema_params if use_ema else state.params
  batch_stats = state.ema_batch_stats if use_ema else state.batch_stats
  x = augment.normalize(batch['x'].astype(jnp.float32), info.mean, info.std)
  logits, _, _ = _apply(model, params, batch_stats, x, train=False)
  return {'logits': logits, 'labels': batch['y'], 'mask': batch['mask']}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       allow_config_change: bool = False) -> dict:
  """Runs (or resumes) training in `workdir`; returns the final evaluation report."""
  from cmix_jax import loop  # pylint: disable=g-import-not-at-top
  return loop.run(config, workdir, allow_config_change)
