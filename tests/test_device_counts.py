"""Every shipped config runs unchanged on 1, 2, 4 and 8 devices."""

import importlib.util
import os

import pytest

from cmix_jax import config_validation
from cmix_jax.data import datasets
from configs import classic_cv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNTS = (1, 2, 4, 8)


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


@pytest.mark.parametrize('name', ['default', 'fmnist_study'])
def test_cpu_configs_validate_on_every_device_count(name):
  for config in _variants(_load(name).get_config()):
    for devices in DEVICE_COUNTS:
      assert config_validation.config_errors(config, devices, 10, 60000) == [], devices


def test_classic_cv_settings_validate_on_every_device_count():
  for algorithm, dataset, num_labels, seed, variant in classic_cv.all_settings():
    if seed:
      continue  # the seed changes nothing that validation reads
    config = classic_cv.get_config(f'{algorithm},{dataset},{num_labels},{seed},{variant}')
    num_classes = datasets.SPECS[config.data.name].num_classes
    for devices in DEVICE_COUNTS:
      errors = config_validation.config_errors(config, devices, num_classes)
      assert not errors, (algorithm, dataset, num_labels, variant, devices, errors)
