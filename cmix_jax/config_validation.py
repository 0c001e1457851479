"""Checks a config before anything compiles or writes; each problem is one line with its fix.

Every field of configs/default.py is checked whatever switches are on: a value that cannot
be right (a negative learning rate, passes=3, mixup_alpha=0, ema_p=2) is refused even when
the feature that reads it is off. Rules about how fields combine (CalibrateMix needs
unlabeled data, the warm-up must end before training does) apply when the feature is on.
"""

import re

import ml_collections

from cmix_jax import algorithms
from cmix_jax import checks
from cmix_jax import models
from cmix_jax import parallel
from cmix_jax.data import specs

_XLA_FLAG = re.compile(r'--[A-Za-z0-9_]+(=\S*)?$')
_HOST_PORT = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d+)$')


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem, one per line."""


def _known_dataset(name: str) -> bool:
  return name in specs.SPECS or name.startswith(('npz:', 'folder:'))


def _integers(config, low: int, *fields) -> list[str]:
  """One line for each dotted `field` of `config` that is not an integer >= low."""
  errors = []
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    errors += checks.not_integer(field, value, low)
  return errors


def device_split_errors(field: str, size: int, num_devices: int) -> list[str]:
  """One line naming the nearest valid sizes when `size` cannot be split over the devices."""
  if size <= 0 or size % num_devices == 0:
    return []
  below = size // num_devices * num_devices
  nearest = f'{below} or {below + num_devices}' if below else f'{num_devices}'
  return [
    f'{field}={size} is not divisible by the {num_devices} devices: use {nearest} '
    '(or set --config.num_devices).'
  ]


def config_errors(
  config: ml_collections.ConfigDict,
  num_devices: int,
  num_classes: int | None = None,
  num_train: int | None = None,
) -> list[str]:
  """Every problem with `config` for a run on `num_devices` devices (empty if none)."""
  return (
    _run_errors(config)
    + _backend_errors(config)
    + _data_errors(config, num_devices, num_classes, num_train)
    + _model_errors(config)
    + _optim_errors(config)
    + algorithms.ssl_errors(config.ssl)
    + _calibratemix_errors(config, num_devices)
    + _eval_errors(config)
  )


def _run_errors(config) -> list[str]:
  """Top-level fields: algorithm, step counts and cadences, seed."""
  errors = checks.not_one_of('algorithm', config.algorithm, algorithms.ALGORITHM_NAMES)
  errors += _integers(config, 0, 'seed', 'max_nonfinite_steps')
  errors += _integers(
    config, 1, 'num_train_steps', 'log_every', 'eval_every', 'checkpoint_every', 'max_to_keep'
  )
  if 'lease_timeout_s' in config:  # absent from the config.json of workdirs older than the lease
    errors += checks.out_of_range(
      'lease_timeout_s',
      config.lease_timeout_s,
      '(0, inf)',
      'seconds without heartbeat before a workdir lease is taken over',
    )
  return errors


def _backend_errors(config) -> list[str]:
  """Devices, parallel backend, XLA flags and the multi-host fields."""
  errors = []
  if config.num_devices != -1:
    errors += [
      e.replace('integer >= 1', 'integer >= 1 or -1 (all devices)')
      for e in checks.not_integer('num_devices', config.num_devices, 1)
    ]
  errors += checks.not_one_of(
    'parallel_backend', config.get('parallel_backend', 'pmap'), parallel.BACKENDS
  )
  for flag in str(config.get('xla_flags', '')).split():
    if not _XLA_FLAG.match(flag):
      errors.append(
        f'xla_flags: {flag!r} is not an XLA flag: write --name=value items '
        'separated by spaces, or set --config.xla_flags= for none.'
      )
  dist = config.get('distributed')
  if dist is None:
    return errors
  errors += checks.not_one_of('distributed.mode', dist.mode, parallel.DISTRIBUTED_MODES)
  address = dist.coordinator_address
  match = _HOST_PORT.match(address) if address else None
  if address and not (match and 1 <= int(match.group(2)) <= 65535):
    errors.append(
      f'distributed.coordinator_address={address!r}: write HOST:PORT with a port in '
      "[1, 65535], e.g. '10.0.0.1:1234', or '' for a single process."
    )
  errors += _integers(config, 0, 'distributed.num_processes')
  errors += _integers(config, -1, 'distributed.process_id')
  if dist.num_processes > 0 and dist.process_id >= dist.num_processes:
    errors.append(
      f'distributed.process_id={dist.process_id} must be below '
      f'distributed.num_processes={dist.num_processes} (ids count from 0).'
    )
  errors += checks.not_one_of(
    'distributed.cpu_collectives', dist.cpu_collectives, ('', 'gloo', 'mpi')
  )
  return errors


def _data_errors(
  config, num_devices: int, num_classes: int | None, num_train: int | None
) -> list[str]:
  """data.*: the data set name, sizes, batch split over the devices, augmentation."""
  data = config.data
  errors = []
  if not _known_dataset(data.name):
    errors.append(
      f'unknown data set {data.name!r}: use one of '
      f'{", ".join(sorted(specs.SPECS))}, npz:PATH or folder:PATH '
      '(--config.data.name).'
    )
  errors += _integers(config, 1, 'data.num_labels', 'data.batch_size', 'data.eval_batch_size')
  errors += _integers(
    config, 0, 'data.uratio', 'data.randaugment_ops', 'data.prefetch', 'data.val_size'
  )
  if config.algorithm != 'supervised' and data.uratio == 0:
    errors.append(
      f'data.uratio={data.uratio}: semi-supervised algorithms need '
      'uratio >= 1 (USB uses 7); only supervised may use 0.'
    )
  errors += device_split_errors('data.batch_size', data.batch_size, num_devices)
  # (batch_size * uratio splits whenever batch_size does; evaluation pads its last shard.)
  errors += checks.out_of_range(
    'data.crop_pad_frac',
    data.crop_pad_frac,
    '[0, 0.5]',
    'reflect padding as a fraction of the side; USB: 0.125',
  )
  if num_classes and data.num_labels > 0 and data.num_labels % num_classes:
    errors.append(
      f'data.num_labels={data.num_labels} is not divisible by the '
      f'{num_classes} classes: use a multiple of {num_classes} (class-balanced draw).'
    )
  unlabeled_size = data.get('unlabeled_size', 0)
  errors += checks.not_integer('data.unlabeled_size', unlabeled_size, -1)
  if num_train is not None and isinstance(unlabeled_size, int) and unlabeled_size > num_train:
    errors.append(
      f'data.unlabeled_size={unlabeled_size} exceeds the {num_train} training '
      'examples: lower it, or set --config.data.unlabeled_size=0 for all of them.'
    )
  if num_train is not None and data.num_labels + data.val_size > num_train:
    errors.append(
      f'data.num_labels + data.val_size = {data.num_labels + data.val_size} '
      f'exceeds the {num_train} training examples: lower --config.data.num_labels.'
    )
  fake = data.get('fake')
  if fake is not None:
    errors += _integers(config, 1, 'data.fake.num_train', 'data.fake.num_test')
    errors += _integers(config, 2, 'data.fake.num_classes')
    shape = tuple(fake.image_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
      errors.append(
        f'data.fake.image_shape={shape}: use (height, width, channels), e.g. (12, 12, 1).'
      )
  return errors


def _model_errors(config) -> list[str]:
  model = config.model
  errors = checks.not_one_of('model.name', model.name, models.MODEL_NAMES)
  errors += checks.not_one_of('model.dtype', model.dtype, ('float32', 'bfloat16'))
  errors += checks.not_one_of('model.conv_grad', model.get('conv_grad', 'xla'), models.CONV_GRADS)
  precisions = ('auto', *models.PRECISIONS)
  errors += checks.not_one_of('model.precision', model.get('precision', 'auto'), precisions)
  if model.get('bn_momentum') is not None:
    errors += checks.out_of_range(
      'model.bn_momentum',
      model.bn_momentum,
      '[0, 1)',
      'BN running-average decay, e.g. 0.99; unset = the default',
    )
  return errors


def _optim_errors(config) -> list[str]:
  optim = config.optim
  return (
    checks.out_of_range('optim.lr', optim.lr, '(0, inf)', 'USB: 0.03')
    + checks.out_of_range('optim.momentum', optim.momentum, '[0, 1)', 'USB: 0.9')
    + checks.out_of_range('optim.weight_decay', optim.weight_decay, '[0, inf)', 'USB: 5e-4')
    + checks.out_of_range(
      'optim.cosine_factor',
      optim.cosine_factor,
      '[0, 0.5]',
      'above 0.5 the cosine schedule turns the lr negative; USB: 7/16',
    )
    + checks.out_of_range('optim.ema_decay', optim.ema_decay, '[0, 1)', 'USB: 0.999')
  )


def _calibratemix_errors(config, num_devices: int) -> list[str]:
  """calibratemix.*: every value always; how it combines with the run only when enabled."""
  cm = config.calibratemix
  errors = _integers(config, 0, 'calibratemix.warmup_steps')
  errors += checks.not_one_of('calibratemix.passes', cm.passes, (2, 1))
  errors += checks.not_one_of('calibratemix.difficulty', cm.difficulty, ('margin', 'confidence'))
  errors += checks.not_one_of('calibratemix.pair_space', cm.pair_space, ('pixels', 'features'))
  if cm.pair_space == 'features' and cm.passes == 1:
    errors.append(
      'calibratemix.pair_space=features needs passes=2 (features come from '
      'the first pass): set --config.calibratemix.passes=2.'
    )
  if cm.second_pass_only and cm.passes != 2:
    errors.append(
      'calibratemix.second_pass_only is the control arm of the two-pass step: set '
      '--config.calibratemix.passes=2 (or second_pass_only=False).'
    )
  errors += checks.out_of_range(
    'calibratemix.pair_k_frac', cm.pair_k_frac, '(0, 1]', 'reference: 15/224'
  )
  errors += checks.out_of_range(
    'calibratemix.mixup_alpha',
    cm.mixup_alpha,
    '(0, inf)',
    'Beta(alpha, alpha) of the mixing weight; reference: 0.4',
  )
  errors += checks.out_of_range(
    'calibratemix.apm_delta',
    cm.apm_delta,
    '(0, 1]',
    'APM update weight delta / (1 + n); reference: 0.997',
  )
  errors += checks.not_one_of('calibratemix.pair_scope', cm.pair_scope, ('global', 'device'))
  pair_downsample = cm.pair_downsample
  if not isinstance(pair_downsample, int) or pair_downsample < 1:
    errors.append(
      f'calibratemix.pair_downsample={pair_downsample!r}: use an integer >= 1 '
      '(1 = pair on full-size images).'
    )
  elif pair_downsample > 1 and cm.pair_space == 'features':
    errors.append(
      f'calibratemix.pair_downsample={pair_downsample} shrinks images, but '
      'pair_space=features pairs on features: set pair_downsample=1.'
    )
  if not cm.enabled:
    return errors
  if config.algorithm == 'supervised':
    errors.append(
      'calibratemix.enabled needs unlabeled data: use a semi-supervised '
      'algorithm (fixmatch, flexmatch, softmatch), not supervised.'
    )
  if 0 <= cm.warmup_steps and 0 < config.num_train_steps <= cm.warmup_steps:
    errors.append(
      f'calibratemix.warmup_steps={cm.warmup_steps} must be in [0, '
      f'num_train_steps={config.num_train_steps}): lower the warm-up or train longer.'
    )
  if cm.pair_scope == 'device' and 0 < config.data.batch_size < 2 * num_devices:
    errors.append(
      f'calibratemix.pair_scope=device splits each device\'s share, which needs >= 2 '
      f'labeled samples per device: use data.batch_size >= {2 * num_devices} or '
      'pair_scope=global.'
    )
  return errors


def _eval_errors(config) -> list[str]:
  errors = checks.not_one_of(
    'eval.selection', config.eval.selection, ('final', 'best_val', 'best_test')
  )
  if config.eval.selection == 'best_val' and config.data.val_size <= 0:
    errors.append(
      'eval.selection=best_val needs a validation slice: set '
      '--config.data.val_size to a positive multiple of the class count.'
    )
  errors += _integers(config, 1, 'eval.num_bins')
  return errors


def validate(
  config, num_devices: int, num_classes: int | None = None, num_train: int | None = None
) -> None:
  """Raises ConfigError listing every problem, one line each."""
  errors = config_errors(config, num_devices, num_classes, num_train)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))
