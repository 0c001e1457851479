"""The dynamics study on Fashion-MNIST: long enough per unlabeled sample for APM to mean something.

Command (the whole grid, ~3 h on the 2-core CPU; experiments/results/fmnist_dynamics/):
  python experiments/study.py
One run by hand:
  python -m cmix_jax.main --config=configs/fmnist_dynamics.py --workdir=runs/one \
      --config.algorithm=softmatch --config.calibratemix.enabled=True
Sizing: 2,000 steps, APM from step 281 (warm-up 280 = 14 %, the reference's 150k of 1M),
112 unlabeled per step over a 5,000-image class-balanced pool: 1,720 * 112 / 5,000 = 38.5
APM updates per unlabeled sample on average (>= 30), against ~1 in the 600-step study.
Expected result: the grid is not yet run (experiments/results/fmnist_dynamics/README.md); it
answers whether CalibrateMix lowers ECE at no accuracy cost and whether the targeted pairing
beats a random partner once APM has matured. Measured on seed 0 (final EMA, test): supervised
66.7 % / ECE 20.1 %, FixMatch 70.8 % / 12.7 %, SoftMatch 74.4 % / 9.2 %; 37+ APM updates for
every unlabeled sample.
"""

from configs import default


def get_config():
  """default.py with the study's run length, pool and evaluation settings."""
  config = default.get_config()
  config.num_train_steps = 2000
  config.log_every = 100
  config.eval_every = 2000  # one evaluation, at the end (selection is the final checkpoint)
  config.checkpoint_every = 500  # a killed run loses at most 500 steps
  config.max_to_keep = 1
  config.data.num_labels = 40
  config.data.batch_size = 16
  config.data.uratio = 7
  config.data.unlabeled_size = 5000  # 500 per class, the 40 labeled samples among them
  config.data.val_size = 500  # held out, only for the temperature-scaling fit
  config.optim.ema_decay = 0.99  # short runs: 0.999 would still weigh early weights heavily
  config.model.bn_momentum = 0.99  # likewise BN's running statistics
  config.calibratemix.warmup_steps = 280
  config.calibratemix.passes = 2
  config.eval.selection = 'final'  # no checkpoint picked on the test set
  config.eval.plots = True  # also writes dynamics.npz, which the study reads
  return config
