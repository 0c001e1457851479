"""Every config we ship builds and validates (no training), so none rots."""

import dataclasses
import importlib
import os

import numpy as np
import pytest

from cmix_jax import config_validation
from cmix_jax.data import fake_data
from cmix_jax.data import image_sources
from cmix_jax.data import specs
from cmix_jax.data import ssl_data
from configs import classic_cv
from configs import tiny
from experiments import common
from experiments import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_paper_setting_builds_and_validates():
  settings = list(classic_cv.all_settings())
  # 5 data sets x 3 label counts (ImageNet 1) x 3 algorithms x {base, cmix} x 3 seeds
  assert len(settings) == (4 * 3 + 1) * 3 * 2 * 3
  for algorithm, dataset, num_labels, seed, variant in settings:
    config = classic_cv.get_config(f'{algorithm},{dataset},{num_labels},{seed},{variant}')
    num_classes = specs.SPECS[config.data.name].num_classes
    for devices in (1, 8):
      errors = config_validation.config_errors(config, devices, num_classes)
      assert not errors, (algorithm, dataset, num_labels, seed, variant, errors)
    assert config.calibratemix.enabled == (variant == 'cmix')


@pytest.mark.parametrize(
  'dataset,network,wd,uratio',
  [
    ('cifar10', 'wrn_28_2', 5e-4, 7),
    ('cifar100', 'wrn_28_8', 1e-3, 7),
    ('svhn', 'wrn_28_2', 5e-4, 7),
    ('stl10', 'wrn_37_2', 5e-4, 7),
    ('imagenet', 'resnet50', 3e-4, 1),
  ],
)  # USB's comatch_imagenet_100k_0.yaml
def test_paper_hyperparameters(dataset, network, wd, uratio):
  config = classic_cv.get_config(f'softmatch,{dataset},{classic_cv.SETTINGS[dataset][3][0]},0')
  assert config.model.name == network and config.optim.weight_decay == wd
  assert (config.num_train_steps, config.data.batch_size) == (2**20, 64)
  assert config.data.uratio == uratio
  assert config.data.val_size == 0 and config.data.include_lb_to_ulb  # USB: all train unlabeled
  assert (config.optim.lr, config.optim.momentum, config.optim.nesterov) == (0.03, 0.9, True)
  assert config.optim.ema_decay == 0.999 and config.calibratemix.warmup_steps == 150_000
  assert config.calibratemix.passes == 2 and config.calibratemix.pair_k_frac == 15 / 224


def test_classic_cv_cites_the_shipped_reference_table_that_compare_reads():
  doc = classic_cv.__doc__
  assert '../' not in doc and '/work/' not in doc
  assert 'experiments/usb_reference_results.csv' in doc
  assert compare.DEFAULT_REFERENCE == os.path.join(REPO, 'experiments', 'usb_reference_results.csv')
  reference = compare.load_reference(compare.DEFAULT_REFERENCE)
  assert reference[('fixmatch', 'cifar10', '40')]['error_mean'] == 8.33  # the docstring's figure


def _svhn_like_raw():
  """SVHN's spec on fake data: 20 train images (labels 0..1 from i % 2) and 30 extra (2..3)."""
  arrays = fake_data.make_fake(num_train=20, num_test=4, image_shape=(2, 2, 1), num_classes=4)
  train_images = np.arange(20, dtype=np.uint8).reshape(20, 1, 1, 1) * np.ones(
    (1, 2, 2, 1), np.uint8
  )
  extra_images = (100 + np.arange(30, dtype=np.uint8)).reshape(30, 1, 1, 1) * np.ones(
    (1, 2, 2, 1), np.uint8
  )
  spec = dataclasses.replace(specs.SPECS['svhn_cropped'], num_classes=4, image_shape=(2, 2, 1))
  return ssl_data.RawData(
    spec=spec,
    train_images=image_sources.ArrayImageSource(train_images),
    train_labels=(np.arange(20) % 2).astype(np.int32),
    test_images=image_sources.ArrayImageSource(arrays['test'][0]),
    test_labels=arrays['test'][1],
    extra_images=image_sources.ArrayImageSource(extra_images),
    extra_labels=(2 + np.arange(30) % 2).astype(np.int32),
  )


def test_svhn_labels_are_drawn_from_train_and_extra():
  raw = _svhn_like_raw()
  assert raw.spec.labeled_from_extra
  data = ssl_data.make_ssl_data(raw, num_labels=8, seed=0)
  # Classes 2 and 3 live only in extra: a class-balanced draw of 8 takes 2 of each.
  assert sorted(data.labeled_labels.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
  images = data.labeled_images()[:, 0, 0, 0]  # [8] pixel = image id
  for image, label in zip(images, data.labeled_labels):
    assert (image < 100 and label in (0, 1)) or (image >= 100 and label in (2, 3))
  # Unlabeled = train then extra, each once (labeled included, as USB's include_lb_to_ulb).
  assert data.num_unlabeled == 50
  assert data.unlabeled_images.get(np.arange(50))[:, 0, 0, 0].tolist() == (
    list(range(20)) + list(range(100, 130))
  )
  assert data.unlabeled_labels.tolist() == raw.train_labels.tolist() + raw.extra_labels.tolist()


def test_without_labeled_from_extra_labels_stay_in_train():
  raw = _svhn_like_raw()
  raw = dataclasses.replace(raw, spec=dataclasses.replace(raw.spec, labeled_from_extra=False))
  with pytest.raises(ValueError, match='class 2 has only 0 examples'):  # extra is not drawn
    ssl_data.make_ssl_data(raw, num_labels=8, seed=0)


def test_bad_classic_cv_argument_names_the_format():
  with pytest.raises(ValueError, match='algorithm,dataset,num_labels,seed'):
    classic_cv.get_config('fixmatch,cifar10')
  with pytest.raises(ValueError, match='dataset'):
    classic_cv.get_config('fixmatch,mnist,40,0')


@pytest.mark.parametrize('name', ['default', 'fmnist_study', 'fmnist_dynamics', 'fmnist_maturity'])
def test_cpu_configs_validate(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  errors = config_validation.config_errors(config, 1, 10, 60000)
  assert not errors
  assert config.data.name == 'fashion_mnist_debian'


def test_tiny_config_is_the_tests_job_and_the_fault_drills():
  job = tiny.get_config()
  assert job.to_dict() == tiny.config().to_dict()
  assert (job.data.name, job.data.fake.image_shape, job.data.fake.num_classes) == (
    'fake',
    (12, 12, 1),
    4,
  )
  assert (job.num_train_steps, job.data.batch_size, job.data.uratio) == (4, 16, 2)
  drill = common.load_config('configs/tiny.py:faults')  # as cmix_jax.main reads it
  assert drill.to_dict() == tiny.get_config('faults').to_dict()
  assert (drill.num_train_steps, drill.checkpoint_every, drill.eval_every, drill.log_every) == (
    tiny.FAULT_STEPS,
    tiny.FAULT_CHECKPOINT_EVERY,
    300,
    50,
  )
  assert drill.calibratemix.enabled and drill.calibratemix.warmup_steps == 50
  assert drill.data.fake == job.data.fake and drill.model.name == job.model.name
  for config, devices in ((job, 1), (drill, 2)):
    assert not config_validation.config_errors(config, devices, 4, 256)
  with pytest.raises(ValueError, match='faults'):
    tiny.get_config('fault')
