"""The study's maturity rung: every unlabeled sample gets >= 300 APM updates after warm-up.

Command (the rung: FixMatch and SoftMatch x {base, control, two-pass, fused}, seeds 0-2,
results in experiments/results/fmnist_controlled/maturity/):
  python -m experiments.study --config=configs/fmnist_maturity.py --seeds=0,1,2 \
      --variants=base,control,cmix,cmix_fused --family=maturity --labels=40 \
      --root=runs/fmnist_maturity --out=experiments/results/fmnist_controlled/maturity
(27 runs, ~2.5 min each on an idle 2-core CPU.)
Sizing: a 1,000-image class-balanced pool over 3,200 steps, warm-up 448 (14 %, as the main
grid): (3,200 - 448) * 112 / 1,000 = 308 APM updates per unlabeled sample on average, against
38.5 in the main grid (configs/fmnist_dynamics.py). Pool size and run length change together,
so the rung asks whether matured APM carries information beyond confidence; a difference in
ECE effect between rung and grid is read as exploratory, not as caused by maturity alone.
Expected result (final EMA, test, mean of seeds 0-2): FixMatch 67.0 % / ECE 18.7 %, SoftMatch
69.7 % / ECE 17.4 %; 303-311 APM updates per unlabeled sample; AUROC(APM) within 0.05 of
AUROC(confidence) in every run.
"""

from configs import fmnist_dynamics


def get_config():
  """fmnist_dynamics.py with a 1,000-image pool and 3,200 steps."""
  config = fmnist_dynamics.get_config()
  config.num_train_steps = 3200
  config.eval_every = 3200  # one evaluation, at the end (selection is the final checkpoint)
  config.checkpoint_every = 800  # a killed run loses at most 800 steps
  config.data.unlabeled_size = 1000  # 100 per class, the labeled samples among them
  config.calibratemix.warmup_steps = 448  # 14 % of the run, as the main grid's 280 of 2,000
  # Running averages as the grid's (0.99: horizon ~100 updates, 0.99^3200 ~ 1e-14 of the init).
  return config
