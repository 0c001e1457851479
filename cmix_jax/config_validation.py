"""Checks a config before anything compiles or writes; each problem is one line with its fix."""

import ml_collections

from cmix_jax import algorithms
from cmix_jax import models
from cmix_jax import parallel
from cmix_jax.data import datasets


class ConfigError(ValueError):
  """A config that cannot run; the message lists every problem, one per line."""


def _known_dataset(name: str) -> bool:
  return name in datasets.SPECS or name.startswith(('npz:', 'folder:'))


def _positive(config, errors, *fields):
  for field in fields:
    value = config
    for part in field.split('.'):
      value = value[part]
    if value <= 0:
      errors.append(f'{field}={value} must be positive: set --config.{field} to a number > 0.')


def config_errors(config: ml_collections.ConfigDict, num_devices: int,
                  num_classes: int | None = None, num_train: int | None = None) -> list[str]:
  """Every problem with `config` for a run on `num_devices` devices (empty if none)."""
  errors = []
  if config.algorithm not in algorithms.ALGORITHM_NAMES:
    errors.append(f'unknown algorithm {config.algorithm!r}: use one of '
                  f'{", ".join(algorithms.ALGORITHM_NAMES)} (--config.algorithm).')
  if config.model.name not in models.MODEL_NAMES:
    errors.append(f'unknown model {config.model.name!r}: use one of '
                  f'{", ".join(models.MODEL_NAMES)} (--config.model.name).')
  if not _known_dataset(config.data.name):
    errors.append(f'unknown data set {config.data.name!r}: use one of '
                  f'{", ".join(sorted(datasets.SPECS))}, npz:PATH or folder:PATH '
                  '(--config.data.name).')
  bn_momentum = config.model.get('bn_momentum')
  if bn_momentum is not None and not 0.0 <= bn_momentum < 1.0:
    errors.append(f'model.bn_momentum={bn_momentum}: the BN running-average decay must be in '
                  '[0, 1), e.g. 0.99 (--config.model.bn_momentum), or unset for the default.')
  if config.model.dtype not in ('float32', 'bfloat16'):
    errors.append(f'model.dtype={config.model.dtype!r}: use float32 or bfloat16.')
  if config.get('parallel_backend', 'pmap') not in parallel.BACKENDS:
    errors.append(f'parallel_backend={config.parallel_backend!r}: use one of {parallel.BACKENDS}.')
  _positive(config, errors, 'num_train_steps', 'log_every', 'eval_every', 'checkpoint_every',
            'max_to_keep', 'data.num_labels', 'data.batch_size', 'data.eval_batch_size')
  if config.get('lease_timeout_s', 600.0) <= 0:
    errors.append(f'lease_timeout_s={config.lease_timeout_s} must be positive: the seconds '
                  'without heartbeat after which a workdir lease is taken over (default 600).')
  if config.data.uratio < 0 or (config.algorithm != 'supervised' and config.data.uratio == 0):
    errors.append(f'data.uratio={config.data.uratio}: semi-supervised algorithms need '
                  'uratio >= 1 (USB uses 7); only supervised may use 0.')
  for field, size in (('data.batch_size', config.data.batch_size),
                      ('data.batch_size * data.uratio', config.data.batch_size * config.data.uratio)):
    if size > 0 and size % num_devices:
      errors.append(f'{field}={size} is not divisible by the {num_devices} devices: '
                    f'use a multiple of {num_devices} or set --config.num_devices.')
  if num_classes and config.data.num_labels > 0 and config.data.num_labels % num_classes:
    errors.append(f'data.num_labels={config.data.num_labels} is not divisible by the '
                  f'{num_classes} classes: use a multiple of {num_classes} (class-balanced draw).')
  if num_train is not None and config.data.num_labels + config.data.val_size > num_train:
    errors.append(f'data.num_labels + data.val_size = '
                  f'{config.data.num_labels + config.data.val_size} exceeds the {num_train} '
                  'training examples: lower --config.data.num_labels.')
  errors += _calibratemix_errors(config)
  cm = config.calibratemix
  if cm.enabled and cm.get('pair_scope') == 'device' and config.data.batch_size < 2 * num_devices:
    errors.append(f'calibratemix.pair_scope=device splits each device\'s share, which needs >= 2 '
                  f'labeled samples per device: use data.batch_size >= {2 * num_devices} or '
                  'pair_scope=global.')
  errors += _eval_errors(config)
  if not 0.0 <= config.optim.ema_decay < 1.0:
    errors.append(f'optim.ema_decay={config.optim.ema_decay} must be in [0, 1).')
  return errors


def _calibratemix_errors(config) -> list[str]:
  cm = config.calibratemix
  errors = []
  if not cm.enabled:
    return errors
  if config.algorithm == 'supervised':
    errors.append('calibratemix.enabled needs unlabeled data: use a semi-supervised '
                  'algorithm (fixmatch, flexmatch, softmatch), not supervised.')
  if config.num_train_steps > 0 and not 0 <= cm.warmup_steps < config.num_train_steps:
    errors.append(f'calibratemix.warmup_steps={cm.warmup_steps} must be in [0, '
                  f'num_train_steps={config.num_train_steps}): lower the warm-up or train longer.')
  if cm.passes not in (1, 2):
    errors.append(f'calibratemix.passes={cm.passes}: use 2 (reference) or 1 (fused).')
  if cm.difficulty not in ('margin', 'confidence'):
    errors.append(f'calibratemix.difficulty={cm.difficulty!r}: use margin or confidence.')
  if cm.pair_space not in ('pixels', 'features'):
    errors.append(f'calibratemix.pair_space={cm.pair_space!r}: use pixels or features.')
  if cm.pair_space == 'features' and cm.passes == 1:
    errors.append('calibratemix.pair_space=features needs passes=2 (features come from '
                  'the first pass): set --config.calibratemix.passes=2.')
  if not 0.0 < cm.pair_k_frac <= 1.0:
    errors.append(f'calibratemix.pair_k_frac={cm.pair_k_frac} must be in (0, 1].')
  if cm.get('pair_scope', 'global') not in ('global', 'device'):
    errors.append(f'calibratemix.pair_scope={cm.pair_scope!r}: use global (the same on any '
                  'device count) or device (each device pairs its own share).')
  pair_downsample = cm.get('pair_downsample', 1)
  if int(pair_downsample) != pair_downsample or pair_downsample < 1:
    errors.append(f'calibratemix.pair_downsample={pair_downsample!r}: use an integer >= 1 '
                  '(1 = pair on full-size images).')
  elif pair_downsample > 1 and cm.pair_space == 'features':
    errors.append(f'calibratemix.pair_downsample={pair_downsample} shrinks images, but '
                  'pair_space=features pairs on features: set pair_downsample=1.')
  if cm.mixup_alpha <= 0:
    errors.append(f'calibratemix.mixup_alpha={cm.mixup_alpha} must be positive.')
  return errors


def _eval_errors(config) -> list[str]:
  errors = []
  if config.eval.selection not in ('final', 'best_val', 'best_test'):
    errors.append(f'eval.selection={config.eval.selection!r}: use final, best_val or best_test.')
  if config.eval.selection == 'best_val' and config.data.val_size <= 0:
    errors.append('eval.selection=best_val needs a validation slice: set '
                  '--config.data.val_size to a positive multiple of the class count.')
  if config.eval.num_bins <= 0:
    errors.append(f'eval.num_bins={config.eval.num_bins} must be positive.')
  return errors


def validate(config, num_devices: int, num_classes: int | None = None,
             num_train: int | None = None) -> None:
  """Raises ConfigError listing every problem, one line each."""
  errors = config_errors(config, num_devices, num_classes, num_train)
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))
