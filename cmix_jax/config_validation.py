"""Checks a config before anything compiles or writes; each problem is one line with its fix.

`with_defaults` lays a config over configs/default.py (the one place defaults live), so a
config.json older than a field, or a partial config of a test or user file, gets the default;
a field default.py lacks is refused. `FIELD_RULES` gives every field of configs/default.py its
rule, checked whatever switches are on: a value that cannot be right (a negative learning rate,
passes=3, mixup_alpha=0, ema_p=2) is refused even when the feature that reads it is off.
`CROSS_RULES` check how fields combine (CalibrateMix needs unlabeled data, the warm-up must end
before training does); those about a feature apply when it is on.
"""

import copy
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from cmix_jax import algorithms
from cmix_jax import calibratemix
from cmix_jax import checks
from cmix_jax import dynamics
from cmix_jax import evaluation
from cmix_jax import models
from cmix_jax import parallel
from cmix_jax.data import specs
from configs import default

_XLA_FLAG = re.compile(r'--[A-Za-z0-9_]+(=\S*)?$')
_HOST_PORT = re.compile(r'(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):(\d+)$')


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem, one per line."""


def _refuse(problems: list[str]) -> None:
  if problems:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(problems))


# ----------------------------------------------------------------------------- defaults


def with_defaults(config) -> ml_collections.ConfigDict:
  """A copy of configs/default.py with `config` (a ConfigDict or nested dict) laid over it.

  Fields `config` lacks keep their default; a field configs/default.py does not have, or a
  value of another type than its default's, is a ConfigError naming the field.
  """
  merged = default.get_config()
  _refuse(_merge_into(merged, copy.deepcopy(config), ''))
  return merged


def _merge_into(target: ml_collections.ConfigDict, source, prefix: str) -> list[str]:
  """Sets `source`'s fields in `target`, recursively; the problem lines of those it cannot."""
  problems = []
  for key, value in source.items():
    field = f'{prefix}{key}'
    if key not in target:
      problems.append(
        f'unknown config field {field}: configs/default.py has no such field; '
        'check its spelling or remove it.'
      )
    elif isinstance(target[key], ml_collections.ConfigDict):
      if hasattr(value, 'items'):
        problems += _merge_into(target[key], value, f'{field}.')
      else:
        problems.append(
          f'{field}={value!r}: configs/default.py has a group of fields here; set them '
          f'one by one (--config.{field}.NAME=VALUE).'
        )
    else:
      try:
        target[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
      except TypeError:
        problems.append(
          f'{field}={value!r} must be of type {target.get_type(key).__name__}, as in '
          f'configs/default.py: set --config.{field} accordingly.'
        )
  return problems


# ----------------------------------------------------------------------------- field rules

Rule = Callable[[str, Any], list[str]]  # (dotted field, its value) -> problem lines


def integer(low: int) -> Rule:
  """An int >= `low` (not a bool)."""
  return lambda field, value: checks.not_integer(field, value, low)


def one_of(choices) -> Rule:
  """One of `choices` (the owning module's constant)."""
  return lambda field, value: checks.not_one_of(field, value, tuple(choices))


def in_range(interval: str, note: str = '') -> Rule:
  """A number in `interval`, e.g. '(0, 1]'; `note` (the usual value) joins the message."""
  return lambda field, value: checks.out_of_range(field, value, interval, note)


def optional(rule: Rule) -> Rule:
  """None (unset: the code's own choice) or what `rule` accepts."""
  return lambda field, value: [] if value is None else rule(field, value)


def anything(field: str, value: Any) -> list[str]:
  """Every value of the field's type is right (ml_collections keeps the type): booleans."""
  del field, value
  return []


def _num_devices(field: str, value: Any) -> list[str]:
  if value == -1:
    return []
  return [
    e.replace('integer >= 1', 'integer >= 1 or -1 (all devices)')
    for e in checks.not_integer(field, value, 1)
  ]


def _xla_flags(field: str, value: Any) -> list[str]:
  return [
    f'{field}: {flag!r} is not an XLA flag: write --name=value items separated by spaces, '
    f'or set --config.{field}= for none.'
    for flag in str(value).split()
    if not _XLA_FLAG.match(flag)
  ]


def _host_port(field: str, address: Any) -> list[str]:
  match = _HOST_PORT.match(address) if address else None
  if not address or (match and 1 <= int(match.group(2)) <= 65535):
    return []
  return [
    f'{field}={address!r}: write HOST:PORT with a port in [1, 65535], e.g. '
    "'10.0.0.1:1234', or '' for a single process."
  ]


def _data_set(field: str, name: Any) -> list[str]:
  if name in specs.SPECS or (isinstance(name, str) and name.startswith(('npz:', 'folder:'))):
    return []
  return [
    f'unknown data set {name!r}: use one of {", ".join(sorted(specs.SPECS))}, npz:PATH or '
    f'folder:PATH (--config.{field}).'
  ]


def _fake_data(field: str, fake: Any) -> list[str]:
  """The fake data set's shape (tests, benchmarks)."""
  errors = checks.not_integer(f'{field}.num_train', fake['num_train'], 1)
  errors += checks.not_integer(f'{field}.num_test', fake['num_test'], 1)
  errors += checks.not_integer(f'{field}.num_classes', fake['num_classes'], 2)
  shape = tuple(fake['image_shape'])
  if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
    errors.append(f'{field}.image_shape={shape}: use (height, width, channels), e.g. (12, 12, 1).')
  return errors


def _pair_downsample(field: str, factor: Any) -> list[str]:
  if isinstance(factor, int) and factor >= 1:
    return []
  return [f'{field}={factor!r}: use an integer >= 1 (1 = pair on full-size images).']


def _ssl(field: str, ssl: Any) -> list[str]:
  """Every ssl.* field: the algorithms' own rules, the ones their dataclasses check."""
  del field
  return algorithms.ssl_errors(ssl)


# Every field of configs/default.py, in its order, and its rule. A row may name a group
# (ssl) whose owner checks all of its fields.
FIELD_RULES: dict[str, Rule] = {
  'seed': integer(0),
  'algorithm': one_of(algorithms.ALGORITHM_NAMES),
  'num_train_steps': integer(1),
  'log_every': integer(1),
  'eval_every': integer(1),
  'checkpoint_every': integer(1),
  'max_to_keep': integer(1),
  'num_devices': _num_devices,
  'progress_bar': anything,
  'parallel_backend': one_of(parallel.BACKENDS),
  'max_nonfinite_steps': integer(0),
  'lease_timeout_s': in_range(
    '(0, inf)', 'seconds without heartbeat before a workdir lease is taken over'
  ),
  'tensorboard': anything,
  'dynamics_sharded': anything,
  'xla_flags': _xla_flags,
  'distributed.mode': one_of(parallel.DISTRIBUTED_MODES),
  'distributed.coordinator_address': _host_port,
  'distributed.num_processes': integer(0),
  'distributed.process_id': integer(-1),
  'distributed.cpu_collectives': one_of(parallel.CPU_COLLECTIVES),
  'data.name': _data_set,
  'data.data_dir': anything,  # a missing data set gets its own message when it is read
  'data.num_labels': integer(1),
  'data.batch_size': integer(1),
  'data.uratio': integer(0),
  'data.eval_batch_size': integer(1),  # any size: evaluation pads its last shard
  'data.include_lb_to_ulb': anything,
  'data.crop_pad_frac': in_range(
    '[0, 0.5]', 'reflect padding as a fraction of the side; USB: 0.125'
  ),
  'data.flip': anything,
  'data.randaugment_ops': integer(0),
  'data.cutout': anything,
  'data.prefetch': integer(0),
  'data.val_size': integer(0),
  'data.unlabeled_size': integer(-1),
  'data.fake': optional(_fake_data),
  'model.name': one_of(models.MODEL_NAMES),
  'model.dtype': one_of(models.TRAIN_DTYPES),
  'model.cross_replica_bn': anything,  # True, False or None (the device count decides)
  'model.bn_momentum': optional(
    in_range('[0, 1)', 'BN running-average decay, e.g. 0.99; unset = the default')
  ),
  'model.conv_grad': one_of(models.CONV_GRADS),
  'model.precision': one_of(models.PRECISION_SETTINGS),
  'optim.lr': in_range('(0, inf)', 'USB: 0.03'),
  'optim.momentum': in_range('[0, 1)', 'USB: 0.9'),
  'optim.nesterov': anything,
  'optim.weight_decay': in_range('[0, inf)', 'USB: 5e-4'),
  'optim.cosine_factor': in_range(
    '[0, 0.5]', 'above 0.5 the cosine schedule turns the lr negative; USB: 7/16'
  ),
  'optim.ema_decay': in_range('[0, 1)', 'USB: 0.999'),
  'ssl': _ssl,
  'calibratemix.enabled': anything,
  'calibratemix.warmup_steps': integer(0),
  'calibratemix.passes': one_of(calibratemix.PASSES),
  'calibratemix.pair_k_frac': in_range('(0, 1]', 'reference: 15/224'),
  'calibratemix.mixup_alpha': in_range(
    '(0, inf)', 'Beta(alpha, alpha) of the mixing weight; reference: 0.4'
  ),
  'calibratemix.difficulty': one_of(dynamics.MEASURES),
  'calibratemix.pair_space': one_of(calibratemix.PAIR_SPACES),
  'calibratemix.apm_delta': in_range(
    '(0, 1]', 'APM update weight delta / (1 + n); reference: 0.997'
  ),
  'calibratemix.random_pairing': anything,
  'calibratemix.second_pass_only': anything,
  'calibratemix.pair_scope': one_of(calibratemix.PAIR_SCOPES),
  'calibratemix.pair_downsample': _pair_downsample,
  'eval.num_bins': integer(1),
  'eval.selection': one_of(evaluation.SELECTION_SPLITS),
  'eval.plots': anything,
}


def rule_of(field: str) -> Rule | None:
  """The rule of a dotted field: its own row, or the row of a group holding it."""
  parts = field.split('.')
  for end in range(len(parts), 0, -1):
    rule = FIELD_RULES.get('.'.join(parts[:end]))
    if rule is not None:
      return rule
  return None


def _value(config, field: str) -> Any:
  for part in field.split('.'):
    config = config[part]
  return config


# ----------------------------------------------------------------------------- cross-field rules


@dataclasses.dataclass(frozen=True)
class Facts:
  """What the rules know beside the config: the devices and, when known, the data set's size."""

  num_devices: int
  num_classes: int | None = None
  num_train: int | None = None


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


def process_id_below_count(config, facts: Facts) -> list[str]:
  dist = config.distributed
  if dist.num_processes > 0 and dist.process_id >= dist.num_processes:
    return [
      f'distributed.process_id={dist.process_id} must be below '
      f'distributed.num_processes={dist.num_processes} (ids count from 0).'
    ]
  return []


def semi_supervised_needs_unlabeled_batch(config, facts: Facts) -> list[str]:
  if config.algorithm != 'supervised' and config.data.uratio == 0:
    return [
      f'data.uratio={config.data.uratio}: semi-supervised algorithms need '
      'uratio >= 1 (USB uses 7); only supervised may use 0.'
    ]
  return []


def batch_splits_over_devices(config, facts: Facts) -> list[str]:
  # (batch_size * uratio splits whenever batch_size does; evaluation pads its last shard.)
  return device_split_errors('data.batch_size', config.data.batch_size, facts.num_devices)


def labels_divide_into_classes(config, facts: Facts) -> list[str]:
  num_labels, num_classes = config.data.num_labels, facts.num_classes
  if num_classes and num_labels > 0 and num_labels % num_classes:
    return [
      f'data.num_labels={num_labels} is not divisible by the {num_classes} classes: '
      f'use a multiple of {num_classes} (class-balanced draw).'
    ]
  return []


def unlabeled_subset_fits(config, facts: Facts) -> list[str]:
  size, num_train = config.data.unlabeled_size, facts.num_train
  if num_train is not None and isinstance(size, int) and size > num_train:
    return [
      f'data.unlabeled_size={size} exceeds the {num_train} training examples: lower it, or '
      'set --config.data.unlabeled_size=0 for all of them.'
    ]
  return []


def labeled_and_validation_fit(config, facts: Facts) -> list[str]:
  drawn = config.data.num_labels + config.data.val_size
  if facts.num_train is not None and drawn > facts.num_train:
    return [
      f'data.num_labels + data.val_size = {drawn} exceeds the {facts.num_train} training '
      'examples: lower --config.data.num_labels.'
    ]
  return []


def features_need_two_passes(config, facts: Facts) -> list[str]:
  cm = config.calibratemix
  if cm.pair_space == 'features' and cm.passes == 1:
    return [
      'calibratemix.pair_space=features needs passes=2 (features come from '
      'the first pass): set --config.calibratemix.passes=2.'
    ]
  return []


def control_arm_needs_two_passes(config, facts: Facts) -> list[str]:
  cm = config.calibratemix
  if cm.second_pass_only and cm.passes != 2:
    return [
      'calibratemix.second_pass_only is the control arm of the two-pass step: set '
      '--config.calibratemix.passes=2 (or second_pass_only=False).'
    ]
  return []


def downsampling_pairs_pixels_only(config, facts: Facts) -> list[str]:
  factor = config.calibratemix.pair_downsample
  if isinstance(factor, int) and factor > 1 and config.calibratemix.pair_space == 'features':
    return [
      f'calibratemix.pair_downsample={factor} shrinks images, but '
      'pair_space=features pairs on features: set pair_downsample=1.'
    ]
  return []


def calibratemix_needs_unlabeled_data(config, facts: Facts) -> list[str]:
  if config.calibratemix.enabled and config.algorithm == 'supervised':
    return [
      'calibratemix.enabled needs unlabeled data: use a semi-supervised '
      'algorithm (fixmatch, flexmatch, softmatch), not supervised.'
    ]
  return []


def warmup_ends_before_training(config, facts: Facts) -> list[str]:
  warmup, steps = config.calibratemix.warmup_steps, config.num_train_steps
  if config.calibratemix.enabled and 0 <= warmup and 0 < steps <= warmup:
    return [
      f'calibratemix.warmup_steps={warmup} must be in [0, num_train_steps={steps}): '
      'lower the warm-up or train longer.'
    ]
  return []


def device_scope_needs_two_per_device(config, facts: Facts) -> list[str]:
  cm, batch_size, num_devices = config.calibratemix, config.data.batch_size, facts.num_devices
  if cm.enabled and cm.pair_scope == 'device' and 0 < batch_size < 2 * num_devices:
    return [
      "calibratemix.pair_scope=device splits each device's share, which needs >= 2 labeled "
      f'samples per device: use data.batch_size >= {2 * num_devices} or pair_scope=global.'
    ]
  return []


def best_val_needs_validation_slice(config, facts: Facts) -> list[str]:
  if config.eval.selection == 'best_val' and config.data.val_size <= 0:
    return [
      'eval.selection=best_val needs a validation slice: set '
      '--config.data.val_size to a positive multiple of the class count.'
    ]
  return []


CROSS_RULES: tuple[Callable[[Any, Facts], list[str]], ...] = (
  process_id_below_count,
  semi_supervised_needs_unlabeled_batch,
  batch_splits_over_devices,
  labels_divide_into_classes,
  unlabeled_subset_fits,
  labeled_and_validation_fit,
  features_need_two_passes,
  control_arm_needs_two_passes,
  downsampling_pairs_pixels_only,
  calibratemix_needs_unlabeled_data,
  warmup_ends_before_training,
  device_scope_needs_two_per_device,
  best_val_needs_validation_slice,
)


# ----------------------------------------------------------------------------- entry points


def config_errors(
  config: ml_collections.ConfigDict,
  num_devices: int,
  num_classes: int | None = None,
  num_train: int | None = None,
) -> list[str]:
  """Every problem with a full `config` (see `with_defaults`) on `num_devices` devices."""
  facts = Facts(num_devices, num_classes, num_train)
  errors = [e for field, rule in FIELD_RULES.items() for e in rule(field, _value(config, field))]
  return errors + [e for rule in CROSS_RULES for e in rule(config, facts)]


def validate(
  config, num_devices: int, num_classes: int | None = None, num_train: int | None = None
) -> None:
  """Raises ConfigError listing every problem, one line each."""
  _refuse(config_errors(config, num_devices, num_classes, num_train))
