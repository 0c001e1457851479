"""Entry point: `python -m cmix_jax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g. `--config.seed=3`.
Bad input (flags, config values, data set, workdir) exits with status 2 and one message;
a run stopped for a reason it names (checkpoint save failure, non-finite loss) with 1.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from absl import flags
from absl import logging
from ml_collections import config_flags

from cmix_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and pictures.')
flags.DEFINE_bool(
  'allow_config_change', False, 'Resume a workdir even if its saved config differs from --config.'
)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv  # cli.run refuses positional arguments
  from cmix_jax import train  # after flag parsing

  logging.info('workdir: %s', FLAGS.workdir)
  train.train_and_evaluate(
    FLAGS.config,
    FLAGS.workdir,
    FLAGS.allow_config_change,
    log_to_terminal=FLAGS.alsologtostderr or FLAGS.verbosity >= 1,
  )


def _stopped_errors() -> tuple[type, ...]:
  from cmix_jax import train

  return (train.NonFiniteError,)


if __name__ == '__main__':
  cli.run(main, stopped=_stopped_errors, workdir=lambda: FLAGS.workdir)
