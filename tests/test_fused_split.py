"""The fused (passes=1) CalibrateMix split at the step level: what it reads and when APM starts."""

import jax
import numpy as np
import pytest

from cmix_jax import base_step
from cmix_jax import calibratemix
from cmix_jax import dynamics
from cmix_jax import parallel
from cmix_jax import steps
from configs import tiny
from tests import helpers


def _run(passes, warmup=1):
  """The parts of a one-device CalibrateMix run and its fresh (stacked) state."""
  config = tiny.config(model='cnn_small_nobn', calibratemix=True, steps=warmup + 2)
  config.calibratemix.passes = passes
  config.calibratemix.warmup_steps = warmup
  config.num_devices = 1
  run = helpers.parts(config)
  return run, helpers.fresh_state(run)


def _hand_tables(dyn, num_classes, seed=0):
  """Every unlabeled row updated once, at a remembered label that is NOT the APM's argmax."""
  rng = np.random.default_rng(seed)
  n = dyn.apm.shape[0]
  apm = rng.normal(size=(n, num_classes)).astype(np.float32)
  label = (np.argmax(apm, 1) + 1 + rng.integers(0, num_classes - 1, n)) % num_classes
  return (
    dyn.replace(apm=apm, apm_label=label.astype(np.int32), apm_count=np.ones(n, np.int32)),
    apm,
    label,
  )


def test_fused_step_splits_where_the_two_pass_step_would_on_the_same_tables():
  run, state = _run(passes=1)
  state = parallel.first_replica_to_host(state)
  config, info = run.config, run.info
  dyn, apm, label = _hand_tables(state.dynamics, info.num_classes)
  state = state.replace(dynamics=dyn)
  batches = helpers.batches(run)
  batch = jax.tree.map(lambda x: np.asarray(x)[0], next(batches))  # device 0's share
  batches.close()
  idx = batch['idx_ulb']
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(len(idx), info.num_classes)).astype(np.float32)
  pseudo = np.argmax(logits, 1).astype(np.int32)

  def per_device(state, batch, logits, pseudo):
    before = calibratemix.fused_difficulties(state.dynamics, batch, config)
    after_dyn = dynamics.update_unlabeled(
      state.dynamics, batch['idx_ulb'], logits, pseudo, update_apm=True, axis_name=parallel.AXIS
    )
    two_pass = calibratemix.difficulties(after_dyn, batch, pseudo, config)
    fused_after = calibratemix.fused_difficulties(after_dyn, batch, config)
    key = jax.random.key(0)
    views = steps.make_views(key, batch, config, info, True)
    _, _, metrics = calibratemix.fused_loss(
      state.params,
      state,
      batch,
      views,
      key,
      model=run.model,
      algorithm=run.algorithm,
      config=config,
      num_classes=info.num_classes,
    )
    return before, two_pass, fused_after, metrics

  mapped = jax.vmap(per_device, axis_name=parallel.AXIS)
  add_axis = lambda tree: jax.tree.map(lambda x: np.asarray(x)[None], tree)
  out = jax.tree.map(
    lambda x: np.asarray(x)[0], mapped(add_axis(state), add_axis(batch), logits[None], pseudo[None])
  )
  before, two_pass, fused_after, metrics = out
  # Before the step: APM at the remembered label (not at the stored argmax).
  expected = apm[idx, label[idx]]  # [U]
  np.testing.assert_allclose(before[1], expected, rtol=1e-6)
  assert not np.allclose(before[1], apm[idx].max(1))
  # The fused step's mix metrics come from that split.
  order = np.argsort(expected, kind='stable')
  half = len(idx) // 2
  np.testing.assert_allclose(
    metrics['difficulty_ulb_hard'], expected[order[:half]].mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    metrics['difficulty_ulb_easy'], expected[order[half:]].mean(), rtol=1e-5
  )
  # Same tables (after this step's update), same pseudo-labels: the same difficulties.
  for fused_part, two_pass_part in zip(fused_after, two_pass):
    np.testing.assert_array_equal(fused_part, two_pass_part)


@pytest.mark.parametrize('passes', [1, 2])
def test_fused_apm_starts_one_unlabeled_epoch_before_mixing(passes):
  # 256 unlabeled, 32 per step, mixing from step 21 (position 672): epoch 1 = positions
  # 256..511 is the last complete one, it starts in step 8, so the fused APM starts there.
  run, state = _run(passes=passes, warmup=20)
  assert run.info.num_unlabeled == 256
  start = 7 if passes == 1 else 20
  assert base_step.apm_start_after(run.config, run.info.num_unlabeled) == start
  state, _ = helpers.run_steps(run, 21, state)  # steps 0..20: no mixing
  counts = np.asarray(parallel.first_replica_to_host(state.dynamics).apm_count)
  if passes == 1:
    assert counts.min() >= 1  # every sample has a row before the first mixed step
    label = np.asarray(parallel.first_replica_to_host(state.dynamics).apm_label)
    assert label.min() >= 0
  else:
    assert counts.max() == 0  # the reference: nothing before warm-up ends
