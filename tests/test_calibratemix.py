"""CalibrateMix's two-pass step and its control arm (second_pass_only), on a tiny model; both
CalibrateMix losses on a linear model against hand-computed numbers."""

import types

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import algorithms
from cmix_jax import base_step
from cmix_jax import calibratemix
from cmix_jax import dynamics
from cmix_jax import steps
from cmix_jax.parallel import AXIS
from configs import tiny

NUM_CLASSES, B, U, N_LB, N_ULB = 4, 8, 16, 32, 64


def _parts(algorithm: str):
  """Config, model, algorithm, info and a fresh state for 12x12x1 images, 4 classes."""
  config = tiny.config(model='cnn_small', algorithm=algorithm, calibratemix=True)
  config.ssl.p_cutoff = 0.01  # every pseudo-label counts, so the unsupervised term is non-zero
  info = steps.DataInfo(N_LB, N_ULB, NUM_CLASSES, (12, 12, 1), (0.5,), (0.25,))
  model = steps.create_model(config, NUM_CLASSES)
  algorithm = algorithms.get_algorithm(config)
  tx = steps.create_optimizer(config.optim, config.num_train_steps)
  state = steps.create_train_state(config, model, tx, algorithm, info, jax.random.key(0))
  return config, model, algorithm, info, state


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'x_lb': rng.integers(0, 256, (B, 12, 12, 1)).astype(np.uint8),
    'y_lb': rng.integers(0, NUM_CLASSES, B).astype(np.int32),
    'idx_lb': rng.permutation(N_LB)[:B].astype(np.int32),
    'x_ulb': rng.integers(0, 256, (U, 12, 12, 1)).astype(np.uint8),
    'idx_ulb': rng.permutation(N_ULB)[:U].astype(np.int32),
  }


def _on_one_device(fn, *args):
  """Runs per-device code with the `batch` axis bound to one device."""
  add = lambda t: jax.tree.map(lambda x: jnp.asarray(x)[None], t)
  out = jax.vmap(fn, axis_name=AXIS)(*map(add, args))
  return jax.tree.map(lambda x: np.asarray(x)[0], out)


def _losses(state, batch, config, model, algorithm, info):
  """(step loss, first-pass loss, second pass by hand without extra rows, with `extra`)."""
  kw = dict(model=model, algorithm=algorithm, config=config)

  def per_device(state, batch):
    key = jax.random.key(3)
    views = steps.make_views(key, batch, config, info, True)
    loss, _ = steps.train_loss(state.params, state, batch, views, key, info=info, mix=True, **kw)
    first = base_step.base_pass(
      state.params, state.batch_stats, state.algo_state, batch, views, **kw
    )
    plain = base_step.base_pass(
      state.params, first.batch_stats, first.algo_state, batch, views, **kw
    )
    return loss, first.loss, plain.loss, plain.algo_state

  return _on_one_device(per_device, state, batch)


@pytest.mark.parametrize('algorithm', ['fixmatch', 'softmatch'])
def test_control_arm_is_the_two_pass_step_without_mixed_rows_or_mixup_loss(algorithm):
  config, model, algo, info, state = _parts(algorithm)
  batch = _batch()
  config.calibratemix.second_pass_only = True
  control, first, second_plain, _ = _losses(state, batch, config, model, algo, info)
  # control = first pass's SSL loss + the same second pass over [x_lb, x_ulb_w, x_ulb_s]
  np.testing.assert_allclose(control, first + second_plain, rtol=1e-6)
  assert second_plain > 0
  config.calibratemix.second_pass_only = False
  mixed, first_again, _, _ = _losses(state, batch, config, model, algo, info)
  np.testing.assert_allclose(first_again, first, rtol=1e-6)
  assert abs(mixed - control) > 1e-3  # the mixed rows and mixup loss do change the step


def test_control_arm_updates_softmatch_state_twice_like_the_two_pass_step():
  config, model, algo, info, state = _parts('softmatch')
  config.calibratemix.second_pass_only = True
  batch = _batch(1)
  kw = dict(model=model, algorithm=algo, config=config)

  def per_device(state, batch):
    key = jax.random.key(3)
    views = steps.make_views(key, batch, config, info, True)
    _, (_, algo_state, _, metrics) = steps.train_loss(
      state.params, state, batch, views, key, info=info, mix=True, **kw
    )
    once = base_step.base_pass(
      state.params, state.batch_stats, state.algo_state, batch, views, **kw
    )
    return algo_state, once.algo_state, metrics

  after, once, metrics = _on_one_device(per_device, state, batch)
  _, _, _, twice = _losses(state, batch, config, model, algo, info)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(twice)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(once)))
  assert any(k.startswith('pass2_') for k in metrics)  # the second pass's own metrics
  assert not any(k.startswith('mix_') for k in metrics)  # nothing was mixed


def test_control_arm_needs_two_passes():
  from cmix_jax import config_validation

  config = tiny.config(calibratemix=True)
  config.calibratemix.second_pass_only = True
  config.calibratemix.passes = 1
  errors = config_validation.config_errors(config, 1, 4, 256)
  assert len(errors) == 1 and 'passes=2' in errors[0]


# ----------------------------------------------------------------------------
# Both CalibrateMix losses on a linear model with known weights, against numbers by hand.
#
# Two classes, 1x1x2 "images" (two pixels), a linear model z = x @ W with W = diag(2, 1).
#   labeled   x_lb0 = (1, 0), y = 0      x_lb1 = (0, 1), y = 1
#   unlabeled weak u0 = (0, 2): z = (0, 2), pseudo-label 1, p = sigmoid(2) < 0.95: masked
#                  u1 = (2, 0): z = (4, 0), pseudo-label 0, p = sigmoid(4) > 0.95: kept
#             strong s0 = (1, 1): z = (2, 1)          s1 = (0, 0): z = (0, 0)
# Tables: labeled AUM (-1, +1) -> lb0 hard, lb1 easy; unlabeled APM at the pseudo-label
# (5, -5) -> u1 hard, u0 easy. Set 1 = labeled-easy x unlabeled-hard = (lb1, u1), set 2 =
# (lb0, u0): each half has one sample, so the pairing has one choice.

_W = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
_LB = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # [B=2, pixels]
_ULB_W = np.array([[0.0, 2.0], [2.0, 0.0]], np.float32)  # [U=2, pixels]
_ULB_S = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)


class _Linear(flax.linen.Module):
  """logits = flat(x) @ kernel + bias; the features are the flat pixels."""

  @flax.linen.compact
  def __call__(self, x, train: bool = False):
    flat = x.reshape(x.shape[0], -1)  # [N, 2]
    return flax.linen.Dense(2)(flat), flat


def _softplus(z):
  return np.log1p(np.exp(z))


def _ce(z, label):
  """Softmax cross-entropy of one row of logits."""
  return np.log(np.exp(z).sum()) - z[label]


def _row_bce(z, onehot):
  """Sigmoid BCE of one row, a mean over its classes: softplus(z) - t * z."""
  return np.mean(_softplus(z) - onehot * z)


def _hand_parts():
  config = tiny.config(calibratemix=True)
  config.ssl.p_cutoff = 0.95
  model = _Linear()
  params = {'Dense_0': {'kernel': jnp.asarray(_W), 'bias': jnp.zeros(2)}}
  algorithm = algorithms.get_algorithm(config)  # FixMatch, no state
  image = lambda rows: jnp.asarray(rows).reshape(-1, 1, 1, 2)  # [n, H=1, W=1, C=2]
  views = {'lb': image(_LB), 'ulb_w': image(_ULB_W), 'ulb_s': image(_ULB_S)}
  batch = {
    'y_lb': np.array([0, 1], np.int32),
    'idx_lb': np.array([0, 1], np.int32),
    'idx_ulb': np.array([0, 1], np.int32),
  }
  dyn = dynamics.DynamicsState.init(2, 2, 2).replace(
    aum_sum=jnp.array([-1.0, 1.0]), aum_count=jnp.array([1, 1], jnp.int32)
  )
  return config, model, params, algorithm, views, batch, dyn


def _hand_losses(lam1, lam2):
  """(supervised + unsupervised loss, mixup loss of set 1, of set 2), by hand."""
  sup = np.mean([_ce(_LB[0] @ _W, 0), _ce(_LB[1] @ _W, 1)])
  unsup = np.mean([0.0 * _ce(_ULB_S[0] @ _W, 1), 1.0 * _ce(_ULB_S[1] @ _W, 0)])
  # Set 1: lb1 (y = 1) mixed with u1 (pseudo 0); set 2: lb0 (y = 0) with u0 (pseudo 1).
  z1 = (lam1 * _LB[1] + (1 - lam1) * _ULB_W[1]) @ _W  # = (4 (1 - lam1), lam1)
  z2 = (lam2 * _LB[0] + (1 - lam2) * _ULB_W[0]) @ _W  # = (2 lam2, 2 (1 - lam2))
  one_hot = np.eye(2)
  mix1 = lam1 * _row_bce(z1, one_hot[1]) + (1 - lam1) * _row_bce(z1, one_hot[0])
  mix2 = lam2 * _row_bce(z2, one_hot[0]) + (1 - lam2) * _row_bce(z2, one_hot[1])
  return sup + unsup, mix1, mix2


def test_two_pass_loss_on_a_linear_model_equals_the_hand_computed_loss():
  config, model, params, algorithm, views, batch, dyn = _hand_parts()
  # After this step's update: APM at this step's pseudo-labels (1, 0) is (5, -5).
  dyn = dyn.replace(apm=jnp.array([[-9.0, 5.0], [-5.0, -9.0]]))
  kw = dict(model=model, algorithm=algorithm, config=config)

  def per_device(params, views, batch, dyn):
    first = base_step.base_pass(params, {}, {}, batch, views, **kw)
    loss, second, metrics = calibratemix.two_pass_loss(
      params, first, dyn, batch, views, jax.random.key(5), num_classes=2, **kw
    )
    return first.pseudo.label, first.loss, loss, second.loss, metrics

  pseudo, first_loss, loss, second_loss, metrics = _on_one_device(
    per_device, params, views, batch, dyn
  )
  np.testing.assert_array_equal(pseudo, [1, 0])
  ssl, mix1, mix2 = _hand_losses(float(metrics['mix_lam1']), float(metrics['mix_lam2']))
  np.testing.assert_allclose(first_loss, ssl, rtol=1e-6)
  np.testing.assert_allclose(second_loss, ssl, rtol=1e-6)  # same weights, same views
  np.testing.assert_allclose(metrics['mixup_loss_1'], mix1, rtol=1e-6)
  np.testing.assert_allclose(metrics['mixup_loss_2'], mix2, rtol=1e-6)
  np.testing.assert_allclose(loss, ssl + mix1 + mix2, rtol=1e-6)  # second pass + mixup


def test_fused_loss_on_a_linear_model_equals_the_hand_computed_loss():
  config, model, params, algorithm, views, batch, dyn = _hand_parts()
  config.calibratemix.passes = 1
  # Before this step's update: APM at each sample's stored label (0, 1) is (5, -5); at this
  # step's pseudo-labels (1, 0) it would be a tie, which splits the other way round.
  dyn = dyn.replace(
    apm=jnp.array([[5.0, -9.0], [-9.0, -5.0]]),
    apm_label=jnp.array([0, 1], jnp.int32),
    apm_count=jnp.array([1, 1], jnp.int32),
  )
  state = types.SimpleNamespace(dynamics=dyn, batch_stats={}, algo_state={})
  kw = dict(model=model, algorithm=algorithm, config=config)

  def per_device(params, views, batch, state):
    state = types.SimpleNamespace(**state)
    loss, out, metrics = calibratemix.fused_loss(
      params, state, batch, views, jax.random.key(5), num_classes=2, **kw
    )
    return out.pseudo.label, out.loss, loss, metrics

  pseudo, base_loss, mix_loss, metrics = _on_one_device(
    per_device, params, views, batch, vars(state)
  )
  np.testing.assert_array_equal(pseudo, [1, 0])
  ssl, mix1, mix2 = _hand_losses(float(metrics['mix_lam1']), float(metrics['mix_lam2']))
  np.testing.assert_allclose(base_loss, ssl, rtol=1e-6)  # the one pass's SSL loss
  # Targets: this step's pseudo-labels (1, 0), not the stored ones (0, 1).
  np.testing.assert_allclose(metrics['mixup_loss_1'], mix1, rtol=1e-6)
  np.testing.assert_allclose(metrics['mixup_loss_2'], mix2, rtol=1e-6)
  np.testing.assert_allclose(mix_loss, mix1 + mix2, rtol=1e-6)
