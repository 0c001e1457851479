"""config_validation.py: each bad config gives one line naming the fix, before any write."""

import os

import pytest

from cmix_jax import algorithms
from cmix_jax import config_validation
from cmix_jax import run_setup
from cmix_jax.data import specs
from configs import default
from configs import tiny


def _set(config, key, value):
  *parents, leaf = key.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


def _get(config, key):
  for part in key.split('.'):
    config = config[part]
  return config


def _leaves(config, prefix=''):
  """Dotted names of every leaf field of a ConfigDict."""
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}'


# (field, bad value, fragment of its one error line). Every non-boolean field of
# configs/default.py has at least one row (or rows of its subfields), whatever switch would
# read it (test below).
BAD = [
  ('seed', -1, 'seed=-1 must be an integer >= 0'),
  ('algorithm', 'meanteacher', "algorithm='meanteacher': use one of"),
  ('num_train_steps', 0, 'num_train_steps=0 must be an integer >= 1'),
  ('log_every', 0, 'log_every=0'),
  ('eval_every', -5, 'eval_every=-5'),
  ('checkpoint_every', 0, 'checkpoint_every=0'),
  ('max_to_keep', 0, 'max_to_keep=0'),
  ('lease_timeout_s', 0.0, 'lease_timeout_s=0.0 must be in (0, inf)'),
  ('num_devices', 0, 'num_devices=0 must be an integer >= 1 or -1'),
  ('num_devices', -2, 'num_devices=-2'),
  ('parallel_backend', 'xmap', 'parallel_backend'),
  ('max_nonfinite_steps', -1, 'max_nonfinite_steps=-1'),
  ('xla_flags', 'xla_cpu_foo=1', "'xla_cpu_foo=1' is not an XLA flag"),
  ('xla_flags', '--a=1 -b', "'-b' is not an XLA flag"),
  ('distributed.mode', 'mpi', "distributed.mode='mpi': use one of"),
  ('distributed.coordinator_address', '10.0.0.1', 'write HOST:PORT'),
  ('distributed.coordinator_address', 'host:99999', 'write HOST:PORT'),
  ('distributed.num_processes', -1, 'distributed.num_processes=-1'),
  ('distributed.process_id', -2, 'distributed.process_id=-2'),
  ('distributed.cpu_collectives', 'nccl', 'distributed.cpu_collectives'),
  ('data.name', 'mnist_typo', 'unknown data set'),
  ('data.num_labels', 30, 'not divisible by the 4 classes'),
  ('data.num_labels', 1000, 'exceeds the 256 training examples'),
  ('data.num_labels', 0, 'data.num_labels=0 must be an integer >= 1'),
  ('data.batch_size', 12, 'data.batch_size=12 is not divisible by the 8 devices: use 8 or 16'),
  ('data.batch_size', 30, 'data.batch_size=30 is not divisible by the 8 devices: use 24 or 32'),
  ('data.batch_size', 4, 'data.batch_size=4 is not divisible by the 8 devices: use 8 '),
  ('data.batch_size', -8, 'data.batch_size=-8 must be an integer >= 1'),
  ('data.uratio', 0, 'uratio >= 1'),
  ('data.uratio', -1, 'data.uratio=-1 must be an integer >= 0'),
  ('data.eval_batch_size', 0, 'data.eval_batch_size=0'),
  ('data.crop_pad_frac', 0.75, 'data.crop_pad_frac=0.75 must be in [0, 0.5]'),
  ('data.crop_pad_frac', -0.1, 'data.crop_pad_frac'),
  ('data.randaugment_ops', -1, 'data.randaugment_ops=-1'),
  ('data.prefetch', -1, 'data.prefetch=-1'),
  ('data.val_size', -10, 'data.val_size=-10'),
  ('data.unlabeled_size', -2, 'data.unlabeled_size=-2 must be an integer >= -1'),
  ('data.unlabeled_size', 300, 'data.unlabeled_size=300 exceeds the 256 training examples'),
  ('data.fake.num_train', 0, 'data.fake.num_train=0 must be an integer >= 1'),
  ('data.fake.num_test', 0, 'data.fake.num_test=0 must be an integer >= 1'),
  ('data.fake.num_classes', 1, 'data.fake.num_classes=1 must be an integer >= 2'),
  ('data.fake.image_shape', (12, 12), 'data.fake.image_shape=(12, 12): use (height, width'),
  ('model.name', 'vit', "model.name='vit': use one of"),
  ('model.dtype', 'float16', 'model.dtype'),
  ('model.bn_momentum', 1.0, 'bn_momentum=1.0'),
  ('model.conv_grad', 'fft', "model.conv_grad='fft': use one of"),
  ('model.precision', 'tf32', "model.precision='tf32': use one of"),
  ('optim.lr', -1.0, 'optim.lr=-1.0 must be in (0, inf)'),
  ('optim.lr', 0.0, 'optim.lr=0.0'),
  ('optim.lr', float('nan'), 'optim.lr=nan'),
  ('optim.momentum', 1.0, 'optim.momentum=1.0 must be in [0, 1)'),
  ('optim.momentum', -0.1, 'optim.momentum'),
  ('optim.weight_decay', -1e-4, 'optim.weight_decay=-0.0001 must be in [0, inf)'),
  ('optim.cosine_factor', -0.1, 'optim.cosine_factor=-0.1'),
  ('optim.cosine_factor', 1.0, 'turns the lr negative'),
  ('optim.ema_decay', 1.0, 'optim.ema_decay=1.0 must be in [0, 1)'),
  ('ssl.ulb_loss_ratio', -1.0, 'ssl.ulb_loss_ratio=-1.0 must be in [0, inf)'),
  ('ssl.label_smoothing', 1.0, 'ssl.label_smoothing=1.0 must be in [0, 1)'),
  ('ssl.p_cutoff', 1.5, 'ssl.p_cutoff=1.5 must be in (0, 1]'),
  ('ssl.p_cutoff', 0.0, 'ssl.p_cutoff=0.0'),
  ('ssl.ema_p', 2.0, 'ssl.ema_p=2.0 must be in [0, 1)'),  # softmatch's, while fixmatch runs
  ('ssl.n_sigma', 0.0, 'ssl.n_sigma=0.0 must be in (0, inf)'),
  ('calibratemix.warmup_steps', 10, 'warmup_steps=10 must be in'),
  ('calibratemix.warmup_steps', -1, 'calibratemix.warmup_steps=-1 must be an integer >= 0'),
  ('calibratemix.passes', 3, 'calibratemix.passes=3'),
  ('calibratemix.pair_k_frac', 0.0, 'calibratemix.pair_k_frac=0.0 must be in (0, 1]'),
  ('calibratemix.mixup_alpha', 0.0, 'calibratemix.mixup_alpha=0.0 must be in (0, inf)'),
  ('calibratemix.difficulty', 'loss', 'difficulty'),
  ('calibratemix.pair_space', 'logits', 'calibratemix.pair_space'),
  ('calibratemix.apm_delta', 1.5, 'calibratemix.apm_delta=1.5 must be in (0, 1]'),
  ('calibratemix.pair_scope', 'world', "calibratemix.pair_scope='world': use one of 'global'"),
  ('calibratemix.pair_downsample', 0, 'pair_downsample=0'),
  ('eval.num_bins', 0, 'eval.num_bins=0'),
  ('eval.selection', 'best', 'eval.selection'),
  ('eval.selection', 'best_val', 'val_size'),
]

# Fields whose every value of their type may be right: booleans (ml_collections keeps the
# type, so also the bool-or-None placeholders) and the data dir (a missing data set gets
# its own message when it is read).
FREE = {'data.data_dir', 'model.cross_replica_bn'}


@pytest.mark.parametrize('key,value,message', BAD)
@pytest.mark.parametrize('calibratemix', [True, False])
def test_each_bad_value_gives_one_line_whatever_switch_is_on(key, value, message, calibratemix):
  config = tiny.config(calibratemix=calibratemix)
  _set(config, key, value)
  if key == 'calibratemix.warmup_steps' and value == 10 and not calibratemix:
    assert not config_validation.config_errors(config, 8, 4, 256)  # only matters when on
    return
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate(config, 8, 4, 256)
  lines = str(info.value).splitlines()
  assert len(lines) == 2, lines  # header + exactly one problem
  assert message in lines[1]


def test_every_field_of_the_default_config_has_a_rule():
  config = default.get_config()
  leaves = set(_leaves(config))
  unruled = {k for k in leaves if config_validation.rule_of(k) is None}
  assert not unruled, f'fields without a row in config_validation.FIELD_RULES: {unruled}'
  stale = {f for f in config_validation.FIELD_RULES if not any(_within(k, f) for k in leaves)}
  assert not stale, f'FIELD_RULES rows of fields configs/default.py does not have: {stale}'
  booleans = {k for k in leaves if isinstance(_get(config, k), bool)}
  free = {k for k in leaves if config_validation.rule_of(k) is config_validation.anything}
  assert free <= booleans | FREE, f'fields that accept any value: {free - booleans - FREE}'
  checked = {key for key, _, _ in BAD}
  unchecked = {k for k in leaves - booleans - FREE if not any(_within(c, k) for c in checked)}
  assert not unchecked, f'fields without a BAD row (a value their rule refuses): {unchecked}'


def _within(field, group):
  return field == group or field.startswith(f'{group}.')


@pytest.mark.parametrize(
  'key,value,message',
  [
    ('data.batch_size', 12, 'not divisible by the 8 devices'),
    ('optim.lr', -1.0, 'optim.lr=-1.0'),
    ('ssl.p_cutoff', 1.5, 'ssl.p_cutoff=1.5'),
    ('calibratemix.passes', 3, 'passes=3'),
  ],
)
def test_bad_config_is_refused_before_any_write(key, value, message, tmp_path):
  config = tiny.config(calibratemix=True)
  config.num_devices = 8
  _set(config, key, value)
  workdir = str(tmp_path / 'never_written')
  with pytest.raises(config_validation.ConfigError, match=message):
    run_setup.build_run(config, workdir)
  assert not os.path.exists(workdir)


def test_any_eval_batch_size_is_accepted():
  config = tiny.config()
  config.data.eval_batch_size = 20  # not a multiple of 8: evaluation pads the last shard
  assert config_validation.config_errors(config, 8, 4, 256) == []


def test_algorithm_rules_are_the_ones_the_dataclasses_use():
  config = tiny.config()
  config.ssl.ema_p = 2.0
  (line,) = algorithms.ssl_errors(config.ssl)
  with pytest.raises(ValueError) as info:
    algorithms.SoftMatch(ema_p=2.0)
  assert line in str(info.value)
  with pytest.raises(ValueError, match='ssl.ema_p=2.0'):
    algorithms.get_algorithm(config)  # refused though fixmatch runs


def test_device_pair_scope_needs_two_labeled_samples_per_device():
  config = tiny.config(calibratemix=True)  # batch 16
  config.calibratemix.pair_scope = 'device'
  assert config_validation.config_errors(config, 8, 4, 256) == []
  errors = config_validation.config_errors(config, 16, 4, 256)
  assert any('data.batch_size >= 32 or pair_scope=global' in e for e in errors)
  config.calibratemix.pair_scope = 'global'  # one labeled sample per device is fine
  config.data.batch_size, config.data.uratio = 8, 2
  assert config_validation.config_errors(config, 8, 4, 256) == []


def test_pair_downsample_applies_to_pixels_only():
  config = tiny.config(calibratemix=True)
  config.calibratemix.pair_downsample = 2
  assert config_validation.config_errors(config, 8, 4, 256) == []
  config.calibratemix.pair_space = 'features'
  errors = config_validation.config_errors(config, 8, 4, 256)
  assert errors == [
    'calibratemix.pair_downsample=2 shrinks images, but pair_space=features '
    'pairs on features: set pair_downsample=1.'
  ]


def test_calibratemix_on_supervised_is_refused():
  config = tiny.config(algorithm='supervised', calibratemix=True)
  errors = config_validation.config_errors(config, num_devices=1)
  assert any('needs unlabeled data' in e for e in errors)


def test_several_problems_are_listed_together():
  config = tiny.config()
  config.optim.lr, config.ssl.p_cutoff = -1.0, 1.5
  errors = config_validation.config_errors(config, 8, 4, 256)
  assert len(errors) == 2 and 'optim.lr' in errors[0] and 'ssl.p_cutoff' in errors[1]


def test_missing_data_set_says_how_to_get_it(tmp_path):
  config = tiny.config()
  config.data.name = 'cifar10'
  config.data.num_labels = 40
  config.data.data_dir = str(tmp_path / 'empty')
  with pytest.raises(specs.DataNotFoundError, match='tfds build cifar10'):
    run_setup.build_run(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_defaults_fill_what_a_config_lacks():
  partial = {'seed': 3, 'data': {'num_labels': 80}, 'calibratemix': {'enabled': True}}
  expected = default.get_config()
  expected.seed, expected.data.num_labels, expected.calibratemix.enabled = 3, 80, True
  merged = config_validation.with_defaults(partial)
  assert merged.to_dict() == expected.to_dict()
  assert config_validation.with_defaults(merged).to_dict() == expected.to_dict()  # idempotent
  config = tiny.config()  # a full config (with fake data) is kept as it is, not shared
  merged = config_validation.with_defaults(config)
  assert merged.to_dict() == config.to_dict() and merged.data.fake is not config.data.fake


def test_defaults_refuse_an_unknown_field_naming_it():
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.with_defaults({'seed': 1, 'data': {'nme': 'cifar10'}, 'optim': {'lr': 0.1}})
  assert str(info.value) == (
    'invalid config:\n  unknown config field data.nme: configs/default.py has no such field; '
    'check its spelling or remove it.'
  )
  with pytest.raises(config_validation.ConfigError, match='unknown config field no_such_group'):
    config_validation.with_defaults({'no_such_group': {'x': 1}})


def test_defaults_refuse_a_value_of_another_type():
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.with_defaults({'data': {'batch_size': 'many'}})
  assert str(info.value).splitlines()[1] == (
    "  data.batch_size='many' must be of type int, as in configs/default.py: set "
    '--config.data.batch_size accordingly.'
  )
  with pytest.raises(
    config_validation.ConfigError, match='distributed=None: configs/default.py has'
  ):
    config_validation.with_defaults({'distributed': None})  # a group is never None
  assert config_validation.with_defaults({'data': {'fake': None}}).data.fake is None  # optional


def test_good_configs_have_no_errors():
  assert config_validation.config_errors(tiny.config(calibratemix=True), 8, 4, 256) == []
  assert config_validation.config_errors(default.get_config(), 8, 10, 60000) == []
