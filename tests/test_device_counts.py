"""Every shipped config runs unchanged on 1, 2, 4 and 8 devices (fake CPU devices)."""

import importlib

import numpy as np
import pytest

from cmix_jax import config_validation
from cmix_jax import parallel
from cmix_jax.data import specs
from configs import classic_cv
from configs import default
from configs import tiny
from tests import helpers

DEVICE_COUNTS = (1, 2, 4, 8)


def _variants(config):
  """The config as shipped, and with CalibrateMix on in each pass / scope variant."""
  yield config
  for passes in (1, 2):
    for scope in ('global', 'device'):
      variant = config.copy_and_resolve_references()
      variant.calibratemix.enabled = True
      variant.calibratemix.passes = passes
      variant.calibratemix.pair_scope = scope
      yield variant


@pytest.mark.parametrize('name', ['default', 'fmnist_study', 'fmnist_dynamics'])
def test_cpu_configs_validate_on_every_device_count(name):
  for config in _variants(importlib.import_module(f'configs.{name}').get_config()):
    for devices in DEVICE_COUNTS:
      assert config_validation.config_errors(config, devices, 10, 60000) == [], devices


def test_classic_cv_settings_validate_on_every_device_count():
  for algorithm, dataset, num_labels, seed, variant in classic_cv.all_settings():
    if seed:
      continue  # the seed changes nothing that validation reads
    config = classic_cv.get_config(f'{algorithm},{dataset},{num_labels},{seed},{variant}')
    num_classes = specs.SPECS[config.data.name].num_classes
    for devices in DEVICE_COUNTS:
      errors = config_validation.config_errors(config, devices, num_classes)
      assert not errors, (algorithm, dataset, num_labels, variant, devices, errors)


def _default_on_fake_data(num_devices: int):
  """The default config unchanged except for fake data of its shape (28x28x1, 10 classes)."""
  config = tiny.fake_data(default.get_config(), 1000, 1234, (28, 28, 1), num_classes=10)
  config.num_devices = num_devices
  config.calibratemix.enabled = True
  config.calibratemix.warmup_steps = 0  # step 0 base, step 1 CalibrateMix
  config.progress_bar = False
  return config


def test_default_config_evaluates_with_batch_500_and_trains_on_eight_devices():
  results = {}
  for devices in (1, 8):
    config = _default_on_fake_data(devices)
    config_validation.validate(config, devices, 10, 1000)  # as build_run checks it
    run = helpers.parts(config)
    assert run.config.data.eval_batch_size == 500  # 500 rows over 8 devices: padded
    state = helpers.fresh_state(run)
    results[devices] = helpers.evaluator(run).evaluate_split(state, run.data, 'test')
  assert len(results[8]['confidence']) == 1234  # every test example once, no padding row
  for name, value in results[1]['metrics'].items():
    assert results[8]['metrics'][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
  # Two train steps (base, then CalibrateMix) of the default model on 8 devices.
  state, metrics = helpers.run_steps(run, 2, state)
  last = parallel.first_replica_to_host(metrics[-1])
  assert np.isfinite(last['loss']) and np.isfinite(last['mixup_loss'])
  assert int(parallel.first_replica_to_host(state.step)) == 2
