"""The paper's USB classic-CV settings, built from `algorithm,dataset,num_labels,seed[,variant]`.

Command (needs the TFDS data set in --config.data.data_dir; see README "Data"):
  python -m cmix_jax.main --config=configs/classic_cv.py:softmatch,cifar10,40,0 \
      --config.calibratemix.enabled=True --workdir=runs/softmatch_cifar10_40_0_cmix
`variant` is `base` (default), `cmix` (CalibrateMix on) or `randmix` (random-mixup ablation).
Hyperparameters are USB's classic CV configs (config/classic_cv/<algorithm>/
<algorithm>_<dataset>_<num_labels>_0.yaml in microsoft/Semi-supervised-learning): 2^20 steps,
B=64, mu=7, SGD 0.03 Nesterov, wd 5e-4 (1e-3 for CIFAR-100), EMA 0.999; CalibrateMix warm-up
150,000 steps and passes=2 as the reference code. As USB, the whole train split is unlabeled
(no validation slice), and SVHN draws its labels from train + extra.
ImageNet: USB ships one classic-CV ImageNet config, config/classic_cv/comatch/
comatch_imagenet_100k_0.yaml (100,000 labels, ResNet-50, wd 3e-4, B=64, mu=1); we take its
numbers for every algorithm. The paper reports ImageNet with ResNet-50, settings not published.
Expected result (WRN-28-2, CIFAR-10, 40 labels): USB's published error rates in
experiments/usb_reference_results.csv (FixMatch 8.33 +- 1.41 %); CalibrateMix should keep the
error and lower ECE.
"""

from configs import default

# dataset -> (our data name, network, weight decay, labels settings of the paper, uratio)
SETTINGS = {
  'cifar10': ('cifar10', 'wrn_28_2', 5e-4, (40, 250, 4000), 7),
  'cifar100': ('cifar100', 'wrn_28_8', 1e-3, (400, 2500, 10000), 7),
  'svhn': ('svhn_cropped', 'wrn_28_2', 5e-4, (40, 250, 1000), 7),
  'stl10': ('stl10', 'wrn_37_2', 5e-4, (40, 250, 1000), 7),
  'imagenet': ('imagenet2012', 'resnet50', 3e-4, (100_000,), 1),  # USB's comatch_imagenet_100k
}
ALGORITHMS = ('supervised', 'fixmatch', 'flexmatch', 'softmatch')
VARIANTS = ('base', 'cmix', 'randmix')
SEEDS = (0, 1, 2)


def parse(arg: str):
  """'softmatch,cifar10,40,0[,cmix]' -> (algorithm, dataset, num_labels, seed, variant)."""
  parts = [p.strip() for p in (arg or '').split(',')]
  if len(parts) not in (4, 5):
    raise ValueError(
      f'configs/classic_cv.py needs "algorithm,dataset,num_labels,seed[,variant]"'
      f', e.g. "fixmatch,cifar10,40,0"; got {arg!r}.'
    )
  algorithm, dataset, num_labels, seed = parts[:4]
  variant = parts[4] if len(parts) == 5 else 'base'
  if algorithm not in ALGORITHMS:
    raise ValueError(f'algorithm {algorithm!r}: use one of {ALGORITHMS}.')
  if dataset not in SETTINGS:
    raise ValueError(f'dataset {dataset!r}: use one of {tuple(SETTINGS)}.')
  if variant not in VARIANTS:
    raise ValueError(f'variant {variant!r}: use one of {VARIANTS}.')
  return algorithm, dataset, int(num_labels), int(seed), variant


def get_config(arg: str = 'fixmatch,cifar10,40,0'):
  algorithm, dataset, num_labels, seed, variant = parse(arg)
  data_name, network, weight_decay, _, uratio = SETTINGS[dataset]
  config = default.get_config()
  config.seed = seed  # the split, the init and every random key
  config.algorithm = algorithm  # from the argument
  config.num_train_steps = 2**20  # USB's classic CV budget
  config.log_every = 256  # fewer host syncs on a long run
  config.eval_every = 5120  # ~200 evaluations over the run
  config.checkpoint_every = 5120  # with each evaluation
  config.max_to_keep = 2  # the newest two; best/ keeps the selected one
  config.data.name = data_name  # our TFDS name of the data set (SETTINGS)
  config.data.data_dir = '~/tensorflow_datasets'  # TFDS's own default folder
  config.data.num_labels = num_labels  # from the argument
  config.data.batch_size = 64  # USB: B = 64
  config.data.uratio = uratio  # USB: mu = 7 (ImageNet: 1)
  config.data.val_size = 0  # USB: the whole train split is unlabeled, none held out
  config.data.eval_batch_size = 256  # USB's eval_batch_size
  config.model.name = network  # USB's network for the data set (SETTINGS)
  config.model.dtype = 'bfloat16'  # the reference runs with AMP on
  config.optim.weight_decay = weight_decay  # USB: 5e-4, 1e-3 for CIFAR-100, 3e-4 ImageNet
  config.calibratemix.warmup_steps = 150_000  # the reference's warm-up
  config.calibratemix.passes = 2  # the reference's second forward pass
  config.calibratemix.enabled = variant in ('cmix', 'randmix')  # base: the algorithm alone
  config.calibratemix.random_pairing = variant == 'randmix'  # the random-mixup ablation
  config.eval.selection = 'best_test'  # USB/reference practice; reports say so
  return config


def all_settings():
  """Every (algorithm, dataset, num_labels, seed, variant) of the paper's tables."""
  for dataset, (_, _, _, label_counts, _) in SETTINGS.items():
    for num_labels in label_counts:
      for algorithm in ('fixmatch', 'flexmatch', 'softmatch'):
        for variant in ('base', 'cmix'):
          for seed in SEEDS:
            yield algorithm, dataset, num_labels, seed, variant
