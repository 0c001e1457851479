"""experiments/usb_beside.py and usb_compare.py: split checks, parameter counts, config mapping,
the comparison table; a 3-step semilearn run on fake data where torch and semilearn exist."""

import argparse
import importlib.util
import json
import math

import numpy as np
import pytest

from cmix_jax.data import catalog
from cmix_jax.data import splits
from experiments import usb_beside
from experiments import usb_compare


def _fake_config(steps: int = 3):
  """The study config on small fake 28x28x1 data (sizes scaled down, settings kept)."""
  config = usb_beside.study_config(steps)
  config.data.name = 'fake'
  config.data.num_labels = 20
  config.data.val_size = 10
  config.data.unlabeled_size = 120
  return config


def _fake_raw():
  return catalog.open_dataset(
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
  assert usb_compare.smallest_margin(iv(-0.0072, 0.0106)) == '±1.06'


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


# ----------------------------------------------------------------------------------------
# Parity with semilearn's own pieces on identical inputs (torch + semilearn only).


def _semilearn():
  """semilearn through usb_beside's import patches, or a skip."""
  pytest.importorskip('torch')
  if importlib.util.find_spec('semilearn') is None:
    pytest.skip('semilearn is not installed (setup.cfg extra usb)')
  return usb_beside.import_semilearn()[0]


def _usb_unsup_losses(base: str, logits_w, logits_s):
  """USB's hooks and consistency loss over a sequence of weak / strong logits batches."""
  import torch
  from semilearn.algorithms.hooks import DistAlignEMAHook, FixedThresholdingHook
  from semilearn.algorithms.softmatch.utils import SoftMatchWeightingHook
  from semilearn.core.criterions import consistency_loss

  alg = argparse.Namespace(distributed=False, world_size=1, p_cutoff=0.95)
  align = DistAlignEMAHook(num_classes=10, momentum=0.99, p_target_type='uniform')
  weigh = SoftMatchWeightingHook(num_classes=10, n_sigma=2, momentum=0.99)
  losses = []
  for w, s in zip(logits_w, logits_s):
    w, s = torch.from_numpy(w), torch.from_numpy(s)
    probs = torch.softmax(w, dim=-1)
    if base == 'softmatch':
      mask = weigh.masking(alg, align.dist_align(alg, probs_x_ulb=probs), softmax_x_ulb=False)
    else:
      mask = FixedThresholdingHook().masking(alg, probs, softmax_x_ulb=False)
    losses.append(float(consistency_loss(s, torch.argmax(w, dim=-1), 'ce', mask=mask)))
  return losses


def _our_unsup_losses(base: str, logits_w, logits_s):
  """Our algorithm's pseudo-labels and unlabeled loss over the same sequence."""
  import jax.numpy as jnp

  from cmix_jax import algorithms
  from cmix_jax.algorithms import base as algo_base

  config = usb_beside.study_config(10)
  config.algorithm = base
  algorithm = algorithms.get_algorithm(config)
  state = algorithm.init_state(1000, 10)
  losses = []
  for w, s in zip(logits_w, logits_s):
    idx = jnp.arange(len(w))
    pseudo, state, _ = algorithm.pseudo_label(state, jnp.asarray(w), idx)
    losses.append(float(algo_base.unsup_loss(jnp.asarray(s), pseudo)))
  return losses


@pytest.mark.parametrize('base', ['fixmatch', 'softmatch'])
def test_unlabeled_loss_equals_semilearns(base):
  _semilearn()
  rng = np.random.default_rng(0)
  scale = np.linspace(1.0, 8.0, 6)  # confidences from low to saturated, as training goes
  logits_w = [(rng.normal(size=(112, 10)) * k).astype(np.float32) for k in scale]
  logits_s = [rng.normal(size=(112, 10)).astype(np.float32) for _ in scale]
  ours = _our_unsup_losses(base, logits_w, logits_s)
  usb = _usb_unsup_losses(base, logits_w, logits_s)
  assert ours == pytest.approx(usb, rel=1e-5, abs=1e-6)
  assert max(ours) > 0


def _flax_to_torch(params, batch_stats, model) -> None:
  """Copies Flax cnn_small variables into the torch CNNSmall (HWIO -> OIHW, [in, out] -> [out, in])."""
  import torch

  t = lambda x: torch.from_numpy(np.asarray(x).copy())
  with torch.no_grad():
    for i, (conv, bn) in enumerate(zip(model.convs, model.bns)):
      conv.weight.copy_(t(params[f'conv{i}']['kernel']).permute(3, 2, 0, 1))
      bn.weight.copy_(t(params[f'bn{i}']['scale']))
      bn.bias.copy_(t(params[f'bn{i}']['bias']))
      bn.running_mean.copy_(t(batch_stats[f'bn{i}']['mean']))
      bn.running_var.copy_(t(batch_stats[f'bn{i}']['var']))
    model.classifier.weight.copy_(t(params['classifier']['kernel']).T)
    model.classifier.bias.copy_(t(params['classifier']['bias']))


def test_network_forward_and_bn_update_equal_flax():
  _semilearn()
  import jax
  import torch

  from cmix_jax.models import cnn
  from experiments import usb_models

  flax_model = cnn.CNNSmall(num_classes=10, bn_momentum=0.99)
  x = np.random.default_rng(1).normal(size=(240, 28, 28, 1)).astype(np.float32)
  variables = flax_model.init(jax.random.key(0), x, train=False)
  (logits, _), updated = flax_model.apply(variables, x, train=True, mutable=['batch_stats'])
  torch_model = usb_models.CNNSmall(10, 1, bn_momentum=0.99)
  _flax_to_torch(variables['params'], variables['batch_stats'], torch_model)
  torch_logits = torch_model.train()(torch.from_numpy(x).permute(0, 3, 1, 2))['logits']
  np.testing.assert_allclose(torch_logits.detach().numpy(), logits, rtol=1e-4, atol=1e-4)
  stats = updated['batch_stats']
  for i, bn in enumerate(torch_model.bns):
    np.testing.assert_allclose(bn.running_mean.numpy(), stats[f'bn{i}']['mean'], atol=1e-6)
    # torch's running variance takes the unbiased batch variance (n / (n - 1)), Flax the biased
    np.testing.assert_allclose(bn.running_var.numpy(), stats[f'bn{i}']['var'], rtol=1e-4)
  eval_logits = flax_model.apply({**variables, 'batch_stats': stats}, x, train=False)[0]
  torch_eval = torch_model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2))['logits']
  np.testing.assert_allclose(torch_eval.detach().numpy(), eval_logits, rtol=1e-3, atol=1e-3)


def test_optimizer_and_schedule_equal_semilearns():
  sl = _semilearn()
  import jax.numpy as jnp
  import optax
  import torch

  from cmix_jax import steps

  config = usb_beside.study_config(20)
  rng = np.random.default_rng(2)
  params = {'kernel': rng.normal(size=(4, 3)).astype(np.float32), 'bias': np.ones(3, np.float32)}
  grads = [
    {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(20)
  ]
  tx = steps.create_optimizer(config.optim, 20)
  ours = {k: jnp.asarray(v) for k, v in params.items()}
  opt_state = tx.init(ours)
  for g in grads:
    updates, opt_state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, opt_state, ours)
    ours = optax.apply_updates(ours, updates)
  net = torch.nn.Linear(4, 3)
  with torch.no_grad():
    net.weight.copy_(torch.from_numpy(params['kernel'].T.copy()))
    net.bias.copy_(torch.from_numpy(params['bias']))
  o = config.optim
  opt = sl.core.utils.get_optimizer(net, 'SGD', o.lr, o.momentum, o.weight_decay)
  sched = sl.core.utils.get_cosine_schedule_with_warmup(opt, 20, num_warmup_steps=0)
  for g in grads:
    net.weight.grad = torch.from_numpy(g['kernel'].T.copy())
    net.bias.grad = torch.from_numpy(g['bias'])
    opt.step()
    sched.step()
  np.testing.assert_allclose(net.weight.detach().numpy().T, ours['kernel'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(net.bias.detach().numpy(), ours['bias'], rtol=1e-5, atol=1e-6)
