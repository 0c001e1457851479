"""CalibrateMix's two-pass step and its control arm (second_pass_only), on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import algorithms
from cmix_jax import base_step
from cmix_jax import steps
from cmix_jax.parallel import AXIS
from tests import tiny

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
