"""Every config we ship builds and validates (no training), so none rots."""

import importlib.util
import os

import pytest

from cmix_jax import config_validation
from cmix_jax.data import datasets
from configs import classic_cv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'configs', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_paper_setting_builds_and_validates():
  settings = list(classic_cv.all_settings())
  # 5 data sets x 3 label counts (ImageNet 1) x 3 algorithms x {base, cmix} x 3 seeds
  assert len(settings) == (4 * 3 + 1) * 3 * 2 * 3
  for algorithm, dataset, num_labels, seed, variant in settings:
    config = classic_cv.get_config(f'{algorithm},{dataset},{num_labels},{seed},{variant}')
    num_classes = datasets.SPECS[config.data.name].num_classes
    for devices in (1, 8):
      errors = config_validation.config_errors(config, devices, num_classes)
      assert not errors, (algorithm, dataset, num_labels, seed, variant, errors)
    assert config.calibratemix.enabled == (variant == 'cmix')


@pytest.mark.parametrize('dataset,network,wd', [
    ('cifar10', 'wrn_28_2', 5e-4), ('cifar100', 'wrn_28_8', 1e-3), ('svhn', 'wrn_28_2', 5e-4),
    ('stl10', 'wrn_37_2', 5e-4), ('imagenet', 'resnet50', 3e-4)])
def test_paper_hyperparameters(dataset, network, wd):
  config = classic_cv.get_config(f'softmatch,{dataset},{classic_cv.SETTINGS[dataset][3][0]},0')
  assert config.model.name == network and config.optim.weight_decay == wd
  assert (config.num_train_steps, config.data.batch_size, config.data.uratio) == (2**20, 64, 7)
  assert (config.optim.lr, config.optim.momentum, config.optim.nesterov) == (0.03, 0.9, True)
  assert config.optim.ema_decay == 0.999 and config.calibratemix.warmup_steps == 150_000
  assert config.calibratemix.passes == 2 and config.calibratemix.pair_k_frac == 15 / 224


def test_bad_classic_cv_argument_names_the_format():
  with pytest.raises(ValueError, match='algorithm,dataset,num_labels,seed'):
    classic_cv.get_config('fixmatch,cifar10')
  with pytest.raises(ValueError, match='dataset'):
    classic_cv.get_config('fixmatch,mnist,40,0')


@pytest.mark.parametrize('name', ['default', 'fmnist_study', 'fmnist_dynamics'])
def test_cpu_configs_validate(name):
  config = _load(name).get_config()
  errors = config_validation.config_errors(config, 1, 10, 60000)
  assert not errors
  assert config.data.name == 'fashion_mnist_debian'
