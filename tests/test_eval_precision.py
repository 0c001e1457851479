"""Evaluation runs the network in float32 even when training computes in bfloat16."""

import jax
import jax.numpy as jnp
import numpy as np

from cmix_jax import parallel
from cmix_jax import steps
from cmix_jax.data import augment
from configs import tiny
from tests import helpers


def test_bfloat16_trained_run_evaluates_with_float32_logits():
  config = tiny.config(model='cnn_small', steps=2)  # cnn_small has BN: running stats too
  config.model.dtype = 'bfloat16'
  run = helpers.parts(config)
  evaluator = helpers.evaluator(run)
  assert run.model.dtype == jnp.bfloat16 and evaluator.model.dtype == jnp.float32
  state, _ = helpers.run_steps(run, 2)
  logits, labels = evaluator.logits(state, run.data, 'test')  # [40, 4], the eval path

  host = parallel.unstack_state(state, run.topo, run.sharded_field)
  assert int(host.step) == 2
  variables = {'params': host.ema_params, 'batch_stats': host.ema_batch_stats}
  assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  images = augment.normalize(
    run.data.test_images.get(np.arange(len(labels))), run.info.mean, run.info.std
  )  # [40, 12, 12, 1]

  def logits_of(dtype):
    model = steps.create_model(config, run.info.num_classes, dtype=dtype)
    return np.asarray(model.apply(variables, images, train=False)[0], np.float32)

  np.testing.assert_array_equal(labels, run.data.test_labels)
  np.testing.assert_allclose(logits, logits_of('float32'), rtol=1e-5, atol=1e-5)
  # The same params through the bfloat16 model differ visibly: the check can tell them apart.
  assert np.abs(logits - logits_of('bfloat16')).max() > 1e-3
