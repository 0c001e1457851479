"""experiments/usb_beside.py and usb_compare.py: split checks, parameter counts, config mapping,
the comparison table; a 3-step semilearn run on fake data where torch and semilearn exist."""

import argparse
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

from cmix_jax.data import sources
from cmix_jax.data import splits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, 'experiments')


def _load(name: str):
  """An experiments/ script as a module (its folder on sys.path, as when run)."""
  if EXPERIMENTS not in sys.path:
    sys.path.insert(0, EXPERIMENTS)
  spec = importlib.util.spec_from_file_location(f'{name}_under_test', f'{EXPERIMENTS}/{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


usb_beside = _load('usb_beside')
usb_compare = _load('usb_compare')


def _fake_config(steps: int = 3):
  """The study config on small fake 28x28x1 data (sizes scaled down, settings kept)."""
  config = usb_beside.study_config(steps)
  config.data.name = 'fake'
  config.data.num_labels = 20
  config.data.val_size = 10
  config.data.unlabeled_size = 120
  return config


def _fake_raw():
  return sources.open_dataset(
    'fake', '', {'num_train': 200, 'num_test': 30, 'image_shape': (28, 28, 1)}
  )


def test_study_config_has_the_study_settings():
  config = usb_beside.study_config(2000)
  assert config.num_train_steps == 2000
  assert config.ssl.ema_p == 0.99  # STUDY_OVERRIDES
  assert (config.data.num_labels, config.data.batch_size, config.data.uratio) == (40, 16, 7)
  assert (config.optim.ema_decay, config.model.bn_momentum) == (0.99, 0.99)
  assert config.data.unlabeled_size == 5000 and config.data.val_size == 500
  usb_beside.check_usb_expressible(config)


@pytest.mark.parametrize(
  'key,value',
  [('optim.cosine_factor', 0.5), ('ssl.label_smoothing', 0.1), ('calibratemix.enabled', True)],
)
def test_settings_usb_cannot_express_are_refused(key, value):
  config = usb_beside.study_config(10)
  group, name = key.split('.')
  config[group][name] = value
  with pytest.raises(ValueError, match='USB cannot express'):
    usb_beside.check_usb_expressible(config)


def test_usb_args_mirror_our_config():
  config = usb_beside.study_config(2000)
  spec = _fake_raw().spec
  args = usb_beside.usb_args(config, spec, 'softmatch', 3, 'save', 1)
  assert args['algorithm'] == 'softmatch' and args['seed'] == 3
  assert (args['batch_size'], args['uratio'], args['num_labels']) == (16, 7, 40)
  assert (args['lr'], args['momentum'], args['weight_decay']) == (0.03, 0.9, 5e-4)
  assert (args['ema_m'], args['ema_p'], args['n_sigma'], args['p_cutoff']) == (0.99, 0.99, 2, 0.95)
  assert (args['num_train_iter'], args['num_eval_iter'], args['num_warmup_iter']) == (2000, 2000, 0)
  assert args['amp'] is False and args['use_cat'] is True and args['hard_label'] is True
  assert usb_beside.result_name('softmatch', 40, 2, replicate=1) == 'softmatch-n40-s2-r1'
  assert usb_beside.train_seed(2, 1) == 1002 and usb_beside.train_seed(2, 0) == 2
  aug = usb_beside.augmentation_settings(config, spec)
  assert aug['crop_pad'] == 4 and aug['flip'] and aug['randaugment_ops'] == 3


def test_param_count_arithmetic_equals_flax():
  for shape in ((28, 28, 1), (32, 32, 3)):
    ours = usb_beside.flax_param_count(shape, 10)
    assert ours == usb_beside.expected_param_count(shape[2], usb_beside.cnn_widths(), 10)
  assert usb_beside.flax_param_count((28, 28, 1), 10) == {'params': 24058, 'bn_running_stats': 224}


def test_split_check_against_our_split_json(tmp_path):
  config, raw = _fake_config(), _fake_raw()
  data = usb_beside.draw_split(config, 1, raw)
  indices = usb_beside.split_indices(data)
  assert len(indices['labeled_idx']) == 20 and len(indices['unlabeled_train_idx']) == 120
  assert not set(indices['val_idx']) & set(indices['unlabeled_train_idx'])
  assert set(indices['labeled_idx']) <= set(indices['unlabeled_train_idx'])
  workdir = tmp_path / 'fixmatch-base-n20-s1'
  workdir.mkdir()
  splits.save_split(
    str(workdir), data.labeled_idx, data.val_idx, data.train_labels, 1, 'fake',
    unlabeled=data.unlabeled_record(),
  )  # fmt: skip
  split_file = usb_beside.our_split_file(str(tmp_path), 'fixmatch', 20, 1)
  assert usb_beside.check_split(indices, 1, split_file).startswith('matches')
  assert usb_beside.check_split(indices, 1, str(tmp_path / 'none.json')) == 'absent'
  other = usb_beside.split_indices(usb_beside.draw_split(config, 2, raw))
  with pytest.raises(ValueError, match='differs'):
    usb_beside.check_split(other, 1, split_file)
  record = json.loads((workdir / 'split.json').read_text())
  digest = usb_beside.split_digest(usb_beside.split_json_indices(record))
  assert digest == usb_beside.split_digest(indices)


def test_tost_verdicts():
  iv = lambda low, high: {'low': low, 'high': high}
  assert usb_compare.tost_verdict(iv(-0.01, 0.02), 0.03) == 'equivalent within 3 points'
  assert usb_compare.tost_verdict(iv(0.031, 0.08), 0.03) == 'different by more than 3 points'
  assert usb_compare.tost_verdict(iv(-0.09, -0.04), 0.03).startswith('different')
  assert usb_compare.tost_verdict(iv(-0.01, 0.05), 0.03) == 'not shown either way'
  assert usb_compare.tost_verdict(iv(math.nan, math.nan), 0.03) == 'too few pairs'


def _records(values: dict) -> dict:
  return {
    k: {'metrics': {'accuracy': a, 'ece': e}, 'train_seconds': 1.0} for k, (a, e) in values.items()
  }


def test_compare_pairs_by_seed_and_writes_a_table(tmp_path):
  usb = _records({('fixmatch', s): (0.70 + 0.01 * s, 0.10) for s in range(4)})
  ours = _records(
    {('fixmatch', s): (0.70 + 0.01 * s + 0.002 * (-1) ** s, 0.11) for s in range(1, 5)}
  )
  row = usb_compare.compare_base(usb, ours, 'fixmatch', 'accuracy', 0.03)
  assert row['paired_seeds'] == [1, 2, 3]
  assert row['differences'] == pytest.approx([0.002, -0.002, 0.002])
  assert row['verdict'] == 'equivalent within 3 points'
  assert usb_compare.compare_base(usb, ours, 'softmatch', 'ece', 0.03)['verdict'] == 'no pairs yet'
  text = usb_compare.report(usb, ours, 0.03)
  assert '| fixmatch | accuracy |' in text and '| fixmatch | 4 | – | 74.20 |' in text
  for name, record in [('fixmatch-n40-s0.json', usb[('fixmatch', 0)])]:
    (tmp_path / name).write_text(json.dumps(record))
  (tmp_path / 'fixmatch-n250-s0.json').write_text('{}')
  (tmp_path / 'fixmatch-n40-s0-r1.json').write_text(json.dumps(usb[('fixmatch', 1)]))
  loaded = usb_compare.load_folder(str(tmp_path), usb_compare.USB_FILE, 40)
  assert list(loaded) == [('fixmatch', 0)]
  replicas = usb_compare.load_folder(str(tmp_path), usb_compare.USB_FILE, 40, replicate=1)
  assert replicas[('fixmatch', 0)]['metrics']['accuracy'] == 0.71
  assert '| fixmatch | accuracy | +1.00' in usb_compare.noise_floor(loaded, replicas, ours)
  dynamics = tmp_path / 'ours'
  dynamics.mkdir()
  (dynamics / 'softmatch-base-s2.json').write_text(json.dumps(ours[('fixmatch', 2)]))
  assert list(usb_compare.load_folder(str(dynamics), usb_compare.OURS_FILE, 40)) == [
    ('softmatch', 2)
  ]


def test_smoke_three_semilearn_steps_on_fake_data():
  pytest.importorskip('torch')
  if importlib.util.find_spec('semilearn') is None:  # not imported here: usb_beside patches first
    pytest.skip('semilearn is not installed (setup.cfg extra usb)')
  config, raw = _fake_config(3), _fake_raw()
  args = argparse.Namespace(our_root='', num_workers=0, torch_threads=1)
  record = usb_beside.run_one(config, 'softmatch', 0, raw, args)
  assert record['steps'] == 3 and record['num_test'] == 30
  assert record['param_counts']['torch'] == record['param_counts']['flax']
  assert record['bn_momentum_torch'] == 0.01 and record['usb_args']['ema_p'] == 0.99
  assert record['metrics']['accuracy'] == pytest.approx(record['usb_top1'])
  assert {'tensor_cuda_is_identity', 'drop_timer_hook'} <= set(record['patches_applied'])
  assert np.isfinite(record['metrics']['ece'])


def test_our_workdirs_fill_the_seeds_result_files_lack(tmp_path):
  for name, step in [('fixmatch-base-n40-s1', 2000), ('softmatch-base-n40-s1', 1500)]:
    (tmp_path / name).mkdir()
    record = {'accuracy': 0.7, 'ece': 0.1, 'step': step, 'num_train_steps': 2000}
    (tmp_path / name / 'eval.json').write_text(json.dumps(record))
  (tmp_path / 'fixmatch-base-n250-s2').mkdir()
  workdirs = usb_compare.load_workdirs(str(tmp_path), 40)
  assert list(workdirs) == [('fixmatch', 1)]  # unfinished and other label counts left out
  files = _records({('fixmatch', 1): (0.7, 0.1), ('fixmatch', 0): (0.6, 0.2)})
  ours, notes = usb_compare.merge_ours(files, workdirs)
  assert (
    sorted(ours) == [('fixmatch', 0), ('fixmatch', 1)] and 'source' not in ours[('fixmatch', 1)]
  )
  assert notes == ['fixmatch s1: ours twice, result file 70.00 % / ECE 10.00 %, rerun here '
                   '70.00 % / 10.00 % (identical)']  # fmt: skip
