"""The pure per-device pieces of training: train state, model, optimizer, train and eval steps.

`train_step` and `eval_step` are per-device code whose collectives name the axis
`parallel.AXIS`; `make_step_fns` maps the train step over the devices (pmap or shard_map)
for the loop (`cmix_jax.train`), the benchmarks and the tests. The base pass lives in `base_step`, CalibrateMix's in `calibratemix`.
"""

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from cmix_jax import base_step
from cmix_jax import calibratemix
from cmix_jax import dynamics
from cmix_jax import models
from cmix_jax import parallel
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


def create_optimizer(
  optim: ml_collections.ConfigDict, num_steps: int
) -> optax.GradientTransformation:
  """SGD + Nesterov momentum with coupled weight decay, as USB's classic CV setup."""
  return optax.chain(
    optax.add_decayed_weights(optim.weight_decay, mask=decay_mask),
    optax.sgd(
      learning_rate_schedule(optim, num_steps), momentum=optim.momentum, nesterov=optim.nesterov
    ),
  )


def create_model(
  config: ml_collections.ConfigDict,
  num_classes: int,
  num_devices: int = 1,
  dtype: str | None = None,
) -> nn.Module:
  """The configured network for `num_devices` training devices, computing in `dtype`.

  `dtype` defaults to model.dtype. model.bn_momentum, when set, overrides the architecture's
  BN decay; BN statistics are cross-replica (SyncBN) as model.cross_replica_bn says (None: on
  more than one device).
  """
  bn_momentum = config.model.bn_momentum
  sync_bn = parallel.use_cross_replica_bn(config.model.cross_replica_bn, num_devices)
  precision = model_precision(config)
  return models.create_model(
    config.model.name,
    num_classes,
    dtype=dtype or config.model.dtype,
    bn_axis_name=AXIS if sync_bn else None,
    conv_grad=config.model.conv_grad,
    conv_precision=models.lax_precision(precision['conv']),
    dense_precision=models.lax_precision(precision['matmul']),
    **({} if bn_momentum is None else {'bn_momentum': float(bn_momentum)}),
  )


def model_precision(config: ml_collections.ConfigDict) -> dict:
  """model.precision resolved on this backend: {'setting', 'resolved', 'conv', 'matmul'}."""
  return models.resolve_precision(config.model.precision, jax.default_backend())


def create_eval_model(
  config: ml_collections.ConfigDict, num_classes: int, num_devices: int = 1
) -> nn.Module:
  """The network computing in float32 on the same (float32) params, for evaluation.

  Accuracy and calibration are measured without bfloat16 rounding even when training
  computes in bfloat16 (classic_cv.py, as the reference's AMP).
  """
  return create_model(config, num_classes, num_devices, dtype='float32')


def create_train_state(
  config, model, tx, algorithm, info: DataInfo, rng, dynamics_shards: int = 1
) -> TrainState:
  """Fresh state on the host (unreplicated): init params, optimizer, algorithm and dynamics.

  With `dynamics_shards=D` the dynamics tables are one device's zero shard (N/D rows).
  """
  init_rng, state_rng = jax.random.split(rng)
  variables = jax.jit(
    lambda k: model.init(k, jnp.zeros((2,) + tuple(info.image_shape), jnp.float32), train=False)
  )(init_rng)
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})
  algo_state = (
    algorithm.init_state(info.num_unlabeled, info.num_classes) if algorithm.uses_unlabeled else {}
  )
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    batch_stats=batch_stats,
    opt_state=tx.init(params),
    ema_params=params,
    ema_batch_stats=batch_stats,
    algo_state=algo_state,
    dynamics=dynamics.DynamicsState.init(
      info.num_labeled, info.num_unlabeled, info.num_classes, num_shards=dynamics_shards
    ),
    rng=jax.random.key_data(state_rng),
    nonfinite_steps=jnp.zeros((), jnp.int32),
    first_nonfinite_step=-jnp.ones((), jnp.int32),
  )


def _sample_keys(key, n_local: int):
  """One key per sample from its position in the GLOBAL batch (same on any device count)."""
  offset = jax.lax.axis_index(AXIS) * n_local
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(offset + jnp.arange(n_local))


def make_views(key, batch, config, info: DataInfo, uses_unlabeled: bool) -> dict:
  """Weak view of labeled, weak + strong views of unlabeled images, normalised."""
  k_lb, k_w, k_s = jax.random.split(key, 3)
  data = config.data
  weak = functools.partial(augment.weak_augment, pad_frac=data.crop_pad_frac, flip=data.flip)
  strong = functools.partial(
    augment.strong_augment,
    pad_frac=data.crop_pad_frac,
    flip=data.flip,
    num_ops=data.randaugment_ops,
    cutout=data.cutout,
  )
  norm = functools.partial(augment.normalize, mean=info.mean, std=info.std)
  n_lb = batch['x_lb'].shape[0]
  views = {'lb': norm(jax.vmap(weak)(_sample_keys(k_lb, n_lb), batch['x_lb']))}
  if uses_unlabeled:
    n_ulb = batch['x_ulb'].shape[0]
    views['ulb_w'] = norm(jax.vmap(weak)(_sample_keys(k_w, n_ulb), batch['x_ulb']))
    views['ulb_s'] = norm(jax.vmap(strong)(_sample_keys(k_s, n_ulb), batch['x_ulb']))
  return views


def train_loss(params, state, batch, views, key, *, model, algorithm, config, info, mix: bool):
  """Total loss of one step: the base pass, plus CalibrateMix's variant when `mix` (static)."""
  kw = dict(model=model, algorithm=algorithm, config=config)
  fused = mix and config.calibratemix.passes == 1
  if fused:
    mix_loss, first, mix_metrics = calibratemix.fused_loss(
      params, state, batch, views, key, num_classes=info.num_classes, **kw
    )
  else:
    first = base_step.base_pass(params, state.batch_stats, state.algo_state, batch, views, **kw)
  dyn = base_step.update_dynamics(
    state.dynamics, batch, first, state.step, config, info.num_unlabeled
  )
  last = first
  loss, metrics = first.loss, {**first.metrics, **base_step.accuracy_metrics(first, batch)}
  if mix and not fused:
    mix_loss, last, mix_metrics = calibratemix.two_pass_loss(
      params, first, dyn, batch, views, key, num_classes=info.num_classes, **kw
    )
  if mix:
    loss = loss + mix_loss
    metrics.update(mix_metrics)
  return loss, (last.batch_stats, last.algo_state, dyn, metrics)


def _where_finite(finite, new, old):
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def _with_step_counts(reverted, advanced):
  """`reverted` optimizer state with the step counters of `advanced`.

  A skipped (non-finite) step reverts the optimizer state but still counts, so the
  schedule's count stays equal to `state.step` and the learning rate never falls behind.
  """

  def pick(path, old, new):
    return new if path and getattr(path[-1], 'name', None) == 'count' else old

  return jax.tree_util.tree_map_with_path(pick, reverted, advanced)


def train_step(
  state: TrainState, batch: dict, *, model, tx, algorithm, config, info: DataInfo, mix: bool
):
  """One SGD step on one device's share of the global batch -> (state, metrics).

  Gradients, BN statistics and metrics are averaged over the `batch` axis; the
  dynamics and algorithm tables are updated from all replicas' samples.
  `mix` (static) selects the CalibrateMix step used after warm-up.
  """
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  aug_key, mix_key = jax.random.split(step_key)
  views = make_views(aug_key, batch, config, info, algorithm.uses_unlabeled)
  if not calibratemix.global_scope(config):
    # Pairing randomness differs per device (each pairs its own share, as DDP does); in
    # global scope every device draws the one global pairing with the same key.
    mix_key = jax.random.fold_in(mix_key, jax.lax.axis_index(AXIS))
  grad_fn = jax.value_and_grad(
    functools.partial(
      train_loss, model=model, algorithm=algorithm, config=config, info=info, mix=mix
    ),
    has_aux=True,
  )
  (loss, (batch_stats, algo_state, dyn, metrics)), grads = grad_fn(
    state.params, state, batch, views, mix_key
  )
  grads = jax.lax.pmean(grads, AXIS)
  batch_stats = jax.lax.pmean(batch_stats, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optim.ema_decay
  ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)

  loss = jax.lax.pmean(loss, AXIS)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(updates))
  new = dict(
    params=params,
    batch_stats=batch_stats,
    opt_state=opt_state,
    ema_params=ema_params,
    ema_batch_stats=batch_stats,
    algo_state=algo_state,
    dynamics=dyn,
  )
  old = {k: getattr(state, k) for k in new}
  new = _where_finite(finite, new, old)
  new['opt_state'] = _with_step_counts(new['opt_state'], opt_state)
  state = state.replace(
    step=state.step + 1,
    **new,
    nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
    first_nonfinite_step=jnp.where(
      (state.first_nonfinite_step < 0) & ~finite, state.step, state.first_nonfinite_step
    ),
  )
  metrics = jax.lax.pmean(metrics, AXIS)
  metrics.update(
    loss=loss,
    grad_norm=grad_norm,
    lr=learning_rate_schedule(config.optim, config.num_train_steps)(state.step - 1),
    nonfinite_steps=state.nonfinite_steps,
  )
  return state, metrics


def eval_step(state: TrainState, batch: dict, *, model, info: DataInfo, use_ema: bool = True):
  """Logits of one device's share of an evaluation batch (EMA weights by default)."""
  params = state.ema_params if use_ema else state.params
  batch_stats = state.ema_batch_stats if use_ema else state.batch_stats
  x = augment.normalize(batch['x'].astype(jnp.float32), info.mean, info.std)
  logits, _, _ = base_step.apply_model(model, params, batch_stats, x, train=False)
  return {'logits': logits, 'labels': batch['y'], 'mask': batch['mask']}


def make_step_fns(model, tx, algorithm, config, info, topo) -> dict:
  """The parallel train steps of these parts: 'base' (and 'mix' when CalibrateMix is on)."""
  step = functools.partial(
    train_step, model=model, tx=tx, algorithm=algorithm, config=config, info=info
  )
  kinds = ('base', 'mix') if config.calibratemix.enabled else ('base',)
  return {
    kind: parallel.parallelize(
      functools.partial(step, mix=kind == 'mix'), topo, backend=config.parallel_backend
    )
    for kind in kinds
  }
