"""CalibrateMix with pair_scope='global' and SyncBN: 8 devices train as one device does."""

import jax
import numpy as np
import pytest

from cmix_jax import parallel
from configs import tiny
from tests import helpers


@pytest.mark.parametrize('passes', [2, 1])
def test_calibratemix_eight_devices_equal_one_device(passes):
  config = tiny.config(model='cnn_small', calibratemix=True)  # with BatchNorm
  config.calibratemix.passes = passes
  config.calibratemix.pair_scope = 'global'
  config.calibratemix.warmup_steps = 0  # step 0 is the base step, steps 1 and 2 mix
  config.model.cross_replica_bn = True
  one, one_metrics = helpers.run_on(config, 1, 3)
  eight, eight_metrics = helpers.run_on(config, 8, 3)
  for step in range(3):
    a = parallel.first_replica_to_host(one_metrics[step])
    b = parallel.first_replica_to_host(eight_metrics[step])
    for name in ('loss', 'mixup_loss', 'mix_lam1', 'difficulty_ulb_hard'):
      if name in a:
        np.testing.assert_allclose(
          b[name], a[name], rtol=1e-4, atol=1e-6, err_msg=f'{name} at step {step}'
        )
    assert ('mixup_loss' in a) == (step > 0)
  one_host, eight_host = parallel.first_replica_to_host(one), jax.device_get(eight)
  for replica in (0, 7):
    replica_state = jax.tree.map(lambda x: x[replica], eight_host)
    helpers.assert_trees_close(replica_state.params, one_host.params, rtol=1e-4, atol=1e-5)
    helpers.assert_trees_close(
      replica_state.batch_stats, one_host.batch_stats, rtol=1e-4, atol=1e-5
    )
    helpers.assert_trees_close(replica_state.dynamics, one_host.dynamics, rtol=1e-4, atol=1e-5)
