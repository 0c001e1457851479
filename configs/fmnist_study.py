"""The CPU reproduction study on Fashion-MNIST (experiments/results/README.md).

Command (one run; `python -m experiments.sweep fmnist_study --run` runs the whole grid,
superseded by configs/fmnist_dynamics.py, see experiments/results/README.md):
  python -m cmix_jax.main --config=configs/fmnist_study.py --workdir=runs/study/one \
      --config.algorithm=softmatch --config.calibratemix.enabled=True --config.data.num_labels=40
Short runs sized so that the 36-run grid (supervised, FixMatch +-CM, SoftMatch +-CM, random
mixup; 40 and 250 labels; seeds 0-2) finishes in about an hour on a 2-core CPU. The
warm-up is short so that most steps use the mixup. Expected: see experiments/results/.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.num_train_steps = 600
  config.log_every = 100
  config.eval_every = 300
  config.checkpoint_every = 600
  config.max_to_keep = 1
  config.data.batch_size = 16
  config.data.uratio = 7
  config.optim.ema_decay = 0.99  # short runs: 0.999 would still weigh the init at 55 %
  config.model.bn_momentum = 0.99  # likewise BN's running stats: 0.999 leaves them 55 % at init
  config.ssl.ema_p = 0.99  # softmatch's EMAs likewise (its committed results used 0.999)
  config.calibratemix.warmup_steps = 150
  config.calibratemix.passes = 2
  config.data.val_size = 0  # all labels train; selection is the final checkpoint
  config.eval.selection = 'final'  # no peeking at the test set
  config.eval.plots = True
  return config
