"""The controlled study's config on Fashion-MNIST: long enough per unlabeled sample for APM.

Command (the main grid, 130 runs at 40 and 250 labels, ~2-4 h on an idle 2-core CPU;
experiments/results/fmnist_controlled/):
  python -m experiments.study
One run by hand:
  python -m cmix_jax.main --config=configs/fmnist_dynamics.py --workdir=runs/one \
      --config.algorithm=softmatch --config.calibratemix.enabled=True
Sizing: 2,000 steps, APM from step 281 (warm-up 280 = 14 %, the reference's 150k of 1M),
112 unlabeled per step over a 5,000-image class-balanced pool: 1,720 * 112 / 5,000 = 38.5
APM updates per unlabeled sample on average (>= 30), against ~1 in the 600-step study.
Expected result (final EMA, test, 40 labels, mean of seeds 0-4, from the controlled study's
base runs and USB's on the same draws): FixMatch 65.0 % / ECE 18.5 %, SoftMatch 69.6 % /
15.2 %. Seed 0 alone on a 2-core Xeon with AVX-512/AMX: FixMatch 70.59 % / 13.02 %,
SoftMatch 74.31 % / 10.02 % (other CPU models differ by up to ~0.6 / 0.7 points).
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
  # Running averages sized to 2,000 steps: decay 0.99 has a horizon of ~100 updates and
  # leaves 0.99^2000 = 2e-9 of the initial value (0.999 would leave 13.5 %).
  config.optim.ema_decay = 0.99  # weight EMA used for evaluation: horizon ~100 steps
  config.model.bn_momentum = 0.99  # BN running statistics: horizon ~100 steps (x2 in 2 passes)
  config.ssl.ema_p = 0.99  # softmatch's p_model/mu/sigma^2 EMAs: ~100 updates (x2 in 2 passes)
  config.calibratemix.warmup_steps = 280
  config.calibratemix.passes = 2
  config.eval.selection = 'final'  # no checkpoint picked on the test set
  config.eval.plots = True  # also writes dynamics.npz, which the study reads
  return config
