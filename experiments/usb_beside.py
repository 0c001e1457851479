"""USB's own FixMatch and SoftMatch (semilearn, unmodified) on our data draw and our network.

  pip install --no-deps semilearn==0.3.2 torchvision==0.28.0   # setup.cfg's usb extra says why
  python -m experiments.usb_beside                                    # what is missing
  python -m experiments.usb_beside --bases=softmatch --seeds=0 --steps=3 --out=runs/usb_smoke
  python -m experiments.usb_compare                                   # USB beside ours

Each run trains semilearn's algorithm class (built with `semilearn.get_config` and
`semilearn.get_algorithm`, trained by its own `AlgorithmBase.train` loop and hooks) on CPU:
  * data: our split for the seed (cmix_jax.data: the same labeled 40, the same
    class-balanced 5,000-image unlabeled pool, the same 500-image validation slice left
    out), checked against our run's split.json when --our_root holds that run;
  * network: cnn_small in torch (experiments/usb_models.py), parameter count asserted equal
    to the Flax model's;
  * hyperparameters: configs/fmnist_dynamics.py with the study's settings (STUDY_OVERRIDES);
  * augmentation: semilearn's RandAugment + Cutout and torchvision's crop/flip (DIFFERENCES).
The final EMA model (USB's evaluate: EMA weights, live BN statistics) is evaluated on the
Fashion-MNIST test split and scored with cmix_jax.metrics. One JSON per run,
`--out/<base>-n<labels>-s<seed>.json` (skipped when it exists): metrics, seconds, every
hyperparameter, PATCHES, DIFFERENCES, the split's digest and provenance.
--replicate=R > 0 trains again on the same draws with training seed seed + 1000 * R (init,
augmentation, loader workers) into `...-s<seed>-r<R>.json`: USB's own run-to-run spread on
one draw, the noise floor of the paired USB − ours differences.
"""

import argparse
import hashlib
import importlib
import importlib.metadata
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from cmix_jax import metrics
from cmix_jax import storage
from cmix_jax.data import augment
from cmix_jax.data import catalog
from cmix_jax.data import splits
from cmix_jax.data import ssl_data
from experiments import common

CONFIG = 'configs/fmnist_dynamics.py'
# What experiments/study.py sets on top of CONFIG for its runs (dotted key -> value).
STUDY_OVERRIDES = {'ssl.ema_p': 0.99}
BASES = ('fixmatch', 'softmatch')
REPLICATE_STRIDE = 1000  # training seed of replicate R: seed + REPLICATE_STRIDE * R
SEMILEARN_VERSION = '0.3.2'
# semilearn imports these at package import for audio / NLP / ViT nets and W&B / Aim logging.
UNUSED_IMPORTS = (
  'torchaudio',
  'transformers',
  'transformers.file_utils',
  'transformers.tokenization_utils_base',
  'transformers.data',
  'timm',
  'timm.models',
  'timm.models.layers',
  'wandb',
  'aim',
)
PATCHES = [
  {
    'name': 'torchvision_op_schemas',
    'why': "PyPI's torchvision 0.28.0 is the CUDA build: its C++ ops cannot load beside "
    'CPU-only torch, and its unconditional fake-kernel registration for nms/qnms then '
    'fails at import, so (only when that happens) the two op schemas are defined without '
    'kernels; the PIL transforms used here need no C++ op.',
  },
  {
    'name': 'stub_unused_imports',
    'why': 'semilearn imports '
    + ', '.join(sorted({m.split('.')[0] for m in UNUSED_IMPORTS}))
    + ' at package import for audio/NLP/ViT nets and W&B/Aim logging that are never built '
    'here (and no torchaudio release matches torch 2.13), so empty stub modules stand in.',
  },
  {
    'name': 'tensor_cuda_is_identity',
    'why': "semilearn's process_batch and evaluate move every batch with .cuda(gpu); on this "
    'GPU-less machine torch.Tensor.cuda returns the tensor itself while training and '
    'evaluating.',
  },
  {
    'name': 'drop_timer_hook',
    'why': "semilearn's TimerHook times steps with torch.cuda.Event (needs CUDA); it only "
    'logs timings, so it is removed from the algorithm\'s hooks.',
  },
  {
    'name': 'own_loaders',
    'why': 'Fashion-MNIST is not among semilearn\'s data sets (get_dataset returns None), '
    "so after construction loader_dict is set to semilearn's get_data_loader over "
    "semilearn's BasicDataset holding our split (train_lb, train_ulb; eval = test split).",
  },
]
DIFFERENCES = [
  'Init values: same scheme (kaiming fan_out convs, xavier head, zero biases, BN 1/0) but '
  "torch's generator, not jax's, so the same seed gives other initial weights.",
  "Batch order: USB's sampler permutes with a generator seeded by the epoch (0 here, one "
  'epoch of 2,000 steps), so the order of positions is the same for every seed; ours '
  'draws epoch permutations from (seed, stream, epoch).',
  'Augmentation RNG: PIL ops driven by Python random / numpy in DataLoader workers, ours '
  'by jax keys; same distributions (our augment.py follows semilearn op for op).',
  'Strong view on a grayscale image: semilearn\'s RandAugment runs on the image converted '
  "to RGB (its Cutout refuses a 3-tuple fill on an L image) and the result goes back to L; "
  'equal channels make every op channel-wise identical, and the fill (125, 123, 114) '
  'becomes 123, the grey our augment.py uses.',
  'Crop padding: 4 pixels (ours, round-half-up of 0.125 * 28) where semilearn\'s CIFAR '
  'recipe, int(28 * 0.125), would pad 3.',
  'Affine ops: PIL (nearest, 16.16 fixed point) here, our JAX re-implementation of the same '
  'arithmetic in ours (tested against PIL in tests/test_augment.py).',
  'BN running variance: torch updates it with the unbiased batch variance (n/(n-1), '
  'n = 240 * H * W >= 3,840), Flax with the biased one.',
  'Numerics: torch float32 CPU kernels vs XLA:CPU float32; evaluation softmax in numpy '
  'float64 here, jax float32 in ours.',
]


# ----------------------------------------------------------------------------------------
# Our side: config, split, parameter count (no torch needed).


def study_config(steps: int, config_path: str = CONFIG):
  """CONFIG with STUDY_OVERRIDES and `steps` training steps."""
  config = common.load_config(config_path)
  for key, value in STUDY_OVERRIDES.items():
    node, *rest = key.split('.')
    config[node][rest[0]] = value
  config.num_train_steps = int(steps)
  return config


def data_dir(config) -> str:
  """The config's data_dir; a relative one is taken from the repository root."""
  path = os.path.expanduser(config.data.data_dir)
  return path if os.path.isabs(path) or storage.is_remote(path) else os.path.join(common.REPO, path)


def draw_split(config, seed: int, raw=None) -> ssl_data.SSLData:
  """Our labeled / validation / unlabeled sets for `seed`, by our own code (no training)."""
  raw = raw if raw is not None else catalog.open_dataset(config.data.name, data_dir(config))
  return ssl_data.make_ssl_data(
    raw,
    config.data.num_labels,
    seed,
    val_size=config.data.val_size,
    include_lb_to_ulb=config.data.include_lb_to_ulb,
    unlabeled_size=config.data.unlabeled_size,
  )


def split_indices(data: ssl_data.SSLData) -> dict:
  """Train positions of each set, as split.json records them (unlabeled: its subset's)."""
  return {
    'labeled_idx': np.asarray(data.labeled_idx, np.int64).tolist(),
    'val_idx': np.asarray(data.val_idx, np.int64).tolist(),
    'unlabeled_train_idx': np.asarray(data.unlabeled_train_idx, np.int64).tolist(),
  }


def split_digest(indices: dict) -> str:
  """sha256 of the three index lists (canonical JSON), to compare draws at a glance."""
  text = json.dumps({k: indices[k] for k in sorted(indices)}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def split_json_indices(record: dict) -> dict:
  """The same three lists from a split.json record (unlabeled ones only with a subset)."""
  unlabeled = record.get('unlabeled') or {}
  return {
    'labeled_idx': [int(i) for i in record['labeled_idx']],
    'val_idx': [int(i) for i in record['val_idx']],
    'unlabeled_train_idx': [int(i) for i in unlabeled.get('train_idx', [])],
  }


def check_split(indices: dict, seed: int, split_file: str) -> str:
  """'matches <file>' or 'absent'; raises ValueError when the file draws other indices."""
  if not split_file or not os.path.exists(split_file):
    return 'absent'
  record = storage.read_json(split_file)
  if int(record['seed']) != seed:
    raise ValueError(f'{split_file} is seed {record["seed"]}, not {seed}.')
  theirs = split_json_indices(record)
  bad = [k for k in indices if theirs[k] != indices[k]]
  if bad:
    raise ValueError(f'{split_file} differs from our draw for seed {seed} in {bad}.')
  return f'matches {os.path.basename(os.path.dirname(split_file))}/{splits.SPLIT_FILE}'


def expected_param_count(in_channels: int, widths, num_classes: int) -> dict:
  """cnn_small's trainable parameters (bias-free convs, BN scale + bias, dense) and BN stats."""
  chans = (in_channels, *widths)
  convs = sum(9 * a * b for a, b in zip(chans[:-1], chans[1:]))
  return {
    'params': convs + 2 * sum(widths) + (widths[-1] + 1) * num_classes,
    'bn_running_stats': 2 * sum(widths),
  }


def flax_param_count(image_shape, num_classes: int) -> dict:
  """Our Flax cnn_small: elements in 'params' (BN scale/bias included) and in 'batch_stats'."""
  import jax
  import jax.numpy as jnp

  from cmix_jax.models import cnn

  model = cnn.CNNSmall(num_classes=num_classes)
  variables = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), train=False)
  )
  count = lambda tree: int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
  return {'params': count(variables['params']), 'bn_running_stats': count(variables['batch_stats'])}


def cnn_widths() -> tuple:
  """cnn_small's widths (the CNNSmall default our config's model.name selects)."""
  from cmix_jax.models import cnn

  return tuple(cnn.CNNSmall.widths)


# ----------------------------------------------------------------------------------------
# USB's side: hyperparameters, semilearn import, loaders, one run.


def check_usb_expressible(config) -> None:
  """Raises ValueError for config settings USB's FixMatch / SoftMatch cannot express."""
  problems = []
  if abs(config.optim.cosine_factor - 7 / 16) > 1e-12:
    problems.append(f'optim.cosine_factor={config.optim.cosine_factor} (USB: 7/16 fixed)')
  if not config.optim.nesterov:
    problems.append('optim.nesterov=False (USB: always Nesterov)')
  if config.ssl.label_smoothing:
    problems.append(f'ssl.label_smoothing={config.ssl.label_smoothing} (USB: none)')
  if not config.data.cutout:
    problems.append('data.cutout=False (USB: Cutout always follows RandAugment)')
  if not config.ssl.dist_align:
    problems.append('ssl.dist_align=False (kept on here, as in our SoftMatch default)')
  if config.calibratemix.enabled:
    problems.append('calibratemix.enabled=True (only the bases run in USB)')
  if config.model.name != 'cnn_small':
    problems.append(f'model.name={config.model.name} (only cnn_small is mirrored)')
  if problems:
    raise ValueError('USB cannot express: ' + '; '.join(problems))


def usb_args(config, spec, base: str, seed: int, save_dir: str, num_workers: int) -> dict:
  """The dict semilearn.get_config turns into USB's argparse namespace for one run."""
  steps = int(config.num_train_steps)
  return {
    'algorithm': base,
    'net': 'cnn_small',
    'dataset': 'fashion_mnist',  # unknown to semilearn: get_dataset returns None
    'num_classes': int(spec.num_classes),
    'num_labels': int(config.data.num_labels),
    'batch_size': int(config.data.batch_size),
    'uratio': int(config.data.uratio),
    'eval_batch_size': int(config.data.eval_batch_size),
    'include_lb_to_ulb': bool(config.data.include_lb_to_ulb),
    'img_size': int(spec.image_shape[0]),
    'crop_ratio': 1.0 - float(config.data.crop_pad_frac),
    'epoch': 1,
    'num_train_iter': steps,
    'num_warmup_iter': 0,
    'num_eval_iter': steps,  # one evaluation, after the last step
    'num_log_iter': max(1, min(100, steps)),
    'optim': 'SGD',
    'lr': float(config.optim.lr),
    'momentum': float(config.optim.momentum),
    'weight_decay': float(config.optim.weight_decay),
    'layer_decay': 1.0,
    'ema_m': float(config.optim.ema_decay),
    'ulb_loss_ratio': float(config.ssl.ulb_loss_ratio),
    'use_cat': True,
    'amp': False,
    'clip_grad': 0.0,
    'hard_label': True,
    'T': 0.5,  # unused with hard labels
    'p_cutoff': float(config.ssl.p_cutoff),
    'dist_align': bool(config.ssl.dist_align),
    'dist_uniform': True,
    'ema_p': float(config.ssl.ema_p),
    'n_sigma': int(config.ssl.n_sigma),
    'per_class': False,
    'seed': int(seed),
    'gpu': None,
    'world_size': 1,
    'rank': 0,
    'distributed': False,
    'multiprocessing_distributed': False,
    'num_workers': int(num_workers),
    'train_sampler': 'RandomSampler',
    'save_dir': save_dir,
    'save_name': f'{base}_s{seed}',
    'resume': False,
    'use_tensorboard': False,
    'use_wandb': False,
    'use_aim': False,
    'use_pretrain': False,
    'pretrain_path': '',
  }


def augmentation_settings(config, spec) -> dict:
  """What the transforms use: padding, flip, RandAugment ops, normalisation."""
  return {
    'image_shape': list(spec.image_shape),
    'crop_pad': augment.crop_pad(config.data.crop_pad_frac, spec.image_shape[1]),
    'flip': bool(config.data.flip),
    'randaugment_ops': int(config.data.randaugment_ops),
    'randaugment_m': 5,  # semilearn's CIFAR recipe; unused by its RandAugment
    'cutout': True,
    'mean': list(spec.mean),
    'std': list(spec.std),
  }


def _stub_attribute(attr: str):
  """Any public attribute of a stub module: a new empty class."""
  if attr.startswith('__'):
    raise AttributeError(attr)
  return type(attr, (), {})


def _stub_module(name: str) -> types.ModuleType:
  """An empty module whose every attribute is a new empty class (for `from x import Y`)."""
  module = types.ModuleType(name)
  module.__getattr__ = _stub_attribute
  return module


def _import_torchvision(torch) -> bool:
  """Imports torchvision; True when its op schemas had to be defined first (PATCHES[0])."""
  try:
    importlib.import_module('torchvision')
    return False
  except RuntimeError as e:
    if 'torchvision::nms' not in str(e):
      raise
  for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
    del sys.modules[name]
  lib = torch.library.Library('torchvision', 'FRAGMENT')
  lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  lib.define('qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  _import_torchvision.library = lib  # keep the definitions alive
  importlib.import_module('torchvision')
  return True


def import_semilearn() -> tuple:
  """(semilearn, names of the PATCHES applied at import)."""
  import torch

  applied = ['torchvision_op_schemas'] if _import_torchvision(torch) else []
  for name in UNUSED_IMPORTS:
    sys.modules[name] = _stub_module(name)
  applied.append('stub_unused_imports')
  import semilearn

  return semilearn, applied


def _to_rgb(img):
  return img.convert('RGB')


def _to_gray(img):
  return img.convert('L')


def transforms_for(aug: dict) -> dict:
  """torchvision / semilearn transforms: weak, strong, eval (PIL 'L' image -> [1, H, W])."""
  from semilearn.datasets.augmentation import RandAugment
  from torchvision import transforms as T

  side = aug['image_shape'][0]
  crop = [T.RandomCrop(side, padding=aug['crop_pad'], padding_mode='reflect')]
  crop += [T.RandomHorizontalFlip()] if aug['flip'] else []
  tail = [T.ToTensor(), T.Normalize(aug['mean'], aug['std'])]
  gray = aug['image_shape'][2] == 1
  randaugment = [RandAugment(aug['randaugment_ops'], aug['randaugment_m'])]
  if gray:
    randaugment = [T.Lambda(_to_rgb), *randaugment, T.Lambda(_to_gray)]
  return {
    'weak': T.Compose(crop + tail),
    'strong': T.Compose(crop + randaugment + tail),
    'eval': T.Compose(tail),
  }


def _images(source, idx) -> np.ndarray:
  """uint8 [N, H, W] (grayscale) or [N, H, W, 3] for PIL's fromarray."""
  images = np.asarray(source.get(np.asarray(idx, np.int64)))
  return images[..., 0] if images.shape[-1] == 1 else images


def build_loaders(semilearn, args, data: ssl_data.SSLData, aug: dict) -> dict:
  """semilearn's BasicDataset + get_data_loader over our split: train_lb, train_ulb, eval."""
  from semilearn.datasets.cv_datasets.datasetbase import BasicDataset

  tf = transforms_for(aug)
  alg, classes = args.algorithm, args.num_classes
  as_long = lambda y: np.asarray(y, np.int64)  # torch's losses want int64 targets
  lb_images = _images(data.train_images, data.labeled_idx)
  lb = BasicDataset(alg, lb_images, as_long(data.labeled_labels), classes, tf['weak'])
  ulb_images = _images(data.unlabeled_images, np.arange(data.num_unlabeled))
  ulb_labels = as_long(data.unlabeled_labels)  # never read by FixMatch / SoftMatch
  ulb = BasicDataset(alg, ulb_images, ulb_labels, classes, tf['weak'], True, tf['strong'])
  test_images = _images(data.test_images, np.arange(len(data.test_labels)))
  test = BasicDataset(alg, test_images, as_long(data.test_labels), classes, tf['eval'])
  loader = semilearn.get_data_loader
  steps, epochs, workers = args.num_train_iter, args.epoch, args.num_workers
  return {
    'train_lb': loader(
      args, lb, args.batch_size, data_sampler=args.train_sampler, num_iters=steps,
      num_epochs=epochs, num_workers=workers,
    ),
    'train_ulb': loader(
      args, ulb, args.batch_size * args.uratio, data_sampler=args.train_sampler,
      num_iters=steps, num_epochs=epochs, num_workers=2 * workers,
    ),
    'eval': loader(
      args, test, args.eval_batch_size, data_sampler=None, num_workers=workers, drop_last=False
    ),
  }  # fmt: skip


class _CudaIsIdentity:
  """torch.Tensor.cuda returns the tensor itself inside this block (PATCHES)."""

  def __enter__(self):
    import torch

    self.saved = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    return self

  def __exit__(self, *exc):
    import torch

    torch.Tensor.cuda = self.saved


def drop_hook(algorithm, name: str) -> None:
  """Removes a registered hook by name from semilearn's hook list and dict."""
  algorithm._hooks = [h for h in algorithm._hooks if h.name != name]
  algorithm.hooks_dict.pop(name, None)


def seed_everything(seed: int) -> None:
  """What USB's train.py seeds: Python, numpy and torch."""
  import torch

  random.seed(seed)
  np.random.seed(seed)
  torch.manual_seed(seed)


def softmax64(logits: np.ndarray) -> np.ndarray:
  """Row softmax in float64."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=1, keepdims=True))
  return z / z.sum(axis=1, keepdims=True)


def train_usb(config, base: str, seed: int, data, num_workers: int, threads: int) -> dict:
  """Trains semilearn's `base` on our split; returns test logits, USB's accuracy, counts."""
  import torch

  from experiments import usb_models

  torch.set_num_threads(threads)
  semilearn, applied = import_semilearn()
  spec = data.spec
  aug = augmentation_settings(config, spec)
  bn_momentum = float(config.model.bn_momentum)
  builder = usb_models.net_builder(spec.image_shape[2], cnn_widths(), bn_momentum)
  with tempfile.TemporaryDirectory() as save_dir, _CudaIsIdentity():
    args = semilearn.get_config(usb_args(config, spec, base, seed, save_dir, num_workers))
    seed_everything(seed)
    algorithm = semilearn.get_algorithm(args, builder, tb_log=None, logger=None)
    drop_hook(algorithm, 'TimerHook')
    algorithm.loader_dict = build_loaders(semilearn, args, data, aug)
    counts = usb_models.param_counts(algorithm.model)
    start = time.time()
    algorithm.train()
    seconds = time.time() - start
    final = algorithm.evaluate('eval', return_logits=True)
  applied += ['tensor_cuda_is_identity', 'drop_timer_hook', 'own_loaders']
  args_record = {k: v for k, v in sorted(vars(args).items()) if k not in ('save_dir', 'dist_url')}
  return {
    'logits': final['eval/logits'],
    'usb_top1': float(final['eval/top-1-acc']),
    'usb_eval_loss': float(final['eval/loss']),
    'train_seconds': seconds,
    'param_counts': counts,
    'patches_applied': applied,
    'usb_args': json.loads(json.dumps(args_record, default=str)),
    'augmentation': aug,
    'bn_momentum_torch': round(1.0 - bn_momentum, 12),
    'versions': {
      **usb_models.torch_summary(),
      'semilearn': importlib.metadata.version('semilearn'),
      'torchvision': importlib.metadata.version('torchvision'),
    },
    'torch_seeded': int(torch.initial_seed()),
  }


# ----------------------------------------------------------------------------------------
# Result files.


def result_name(base: str, num_labels: int, seed: int, replicate: int = 0) -> str:
  return f'{base}-n{num_labels}-s{seed}' + (f'-r{replicate}' if replicate else '')


def result_path(out: str, base: str, num_labels: int, seed: int, replicate: int = 0) -> str:
  return os.path.join(out, result_name(base, num_labels, seed, replicate) + '.json')


def train_seed(seed: int, replicate: int) -> int:
  """The seed of USB's training RNGs: the draw's seed for replicate 0, shifted for others."""
  return seed + REPLICATE_STRIDE * replicate


def our_split_file(our_root: str, base: str, num_labels: int, seed: int) -> str:
  """split.json of our matching base run under --our_root ('' when no root is given)."""
  if not our_root:
    return ''
  return os.path.join(our_root, common.run_name(base, 'base', seed, num_labels), splits.SPLIT_FILE)


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else platform.processor()."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def git_commit() -> str:
  """HEAD of this checkout, with '+dirty' when tracked files differ from it."""
  run = lambda *a: subprocess.run(
    ['git', *a], cwd=common.REPO, capture_output=True, text=True, check=False
  ).stdout.strip()
  head = run('rev-parse', 'HEAD') or 'unknown'
  return head + ('+dirty' if run('status', '--porcelain', '--untracked-files=no') else '')


def hyperparameters(config) -> dict:
  """Every setting of ours this comparison mirrors (config values, after STUDY_OVERRIDES)."""
  keys = {
    'data': (
      'name', 'num_labels', 'batch_size', 'uratio', 'eval_batch_size', 'include_lb_to_ulb',
      'crop_pad_frac', 'flip', 'randaugment_ops', 'cutout', 'val_size', 'unlabeled_size',
    ),
    'model': ('name', 'bn_momentum'),
    'optim': ('lr', 'momentum', 'nesterov', 'weight_decay', 'cosine_factor', 'ema_decay'),
    'ssl': (
      'ulb_loss_ratio', 'label_smoothing', 'p_cutoff', 'dist_align', 'ema_p', 'n_sigma',
    ),
  }  # fmt: skip
  flat = {f'{g}.{k}': config[g][k] for g, names in keys.items() for k in names}
  return {'num_train_steps': int(config.num_train_steps), **flat}


def run_one(config, base: str, seed: int, raw, args) -> dict:
  """Draws our split, checks it, trains USB's base, scores it; returns the result record."""
  data = draw_split(config, seed, raw)
  indices = split_indices(data)
  split_file = our_split_file(args.our_root, base, config.data.num_labels, seed)
  split_check = check_split(indices, seed, split_file)
  spec = data.spec
  ours = flax_param_count(spec.image_shape, spec.num_classes)
  expected = expected_param_count(spec.image_shape[2], cnn_widths(), spec.num_classes)
  if ours != expected:
    raise AssertionError(f'Flax cnn_small has {ours}, the layer arithmetic {expected}.')
  replicate = getattr(args, 'replicate', 0)
  run = train_usb(
    config, base, train_seed(seed, replicate), data, args.num_workers, args.torch_threads
  )
  if run['param_counts'] != ours:
    raise AssertionError(f'torch cnn_small has {run["param_counts"]}, ours {ours}.')
  logits = np.asarray(run.pop('logits'))
  start = time.time()
  summary = metrics.summary(softmax64(logits), np.asarray(data.test_labels))
  return {
    'name': result_name(base, config.data.num_labels, seed, replicate),
    'implementation': f'semilearn {run["versions"]["semilearn"]}',
    'algorithm': base,
    'seed': seed,
    'replicate': replicate,
    'train_seed': train_seed(seed, replicate),
    'steps': int(config.num_train_steps),
    'config': CONFIG,
    'study_overrides': STUDY_OVERRIDES,
    'metrics': {k: float(v) for k, v in summary.items()},
    'num_test': int(len(logits)),
    'usb_top1': run.pop('usb_top1'),
    'usb_eval_loss': run.pop('usb_eval_loss'),
    'train_seconds': run.pop('train_seconds'),
    'metric_seconds': time.time() - start,
    'hyperparameters': hyperparameters(config),
    'param_counts': {'torch': run.pop('param_counts'), 'flax': ours},
    'param_count_note': 'params = conv kernels + BN scale/bias + dense kernel/bias (flax '
    "'params', torch parameters()); BN running mean/var counted apart (flax 'batch_stats', "
    'torch buffers).',
    'split': {
      'digest': split_digest(indices),
      'num_labeled': len(indices['labeled_idx']),
      'num_val': len(indices['val_idx']),
      'num_unlabeled': len(indices['unlabeled_train_idx']),
      'labeled_idx': indices['labeled_idx'],
      'check': split_check,
    },
    'patches': PATCHES,
    'differences': DIFFERENCES,
    'provenance': {
      'cpu': cpu_model(),
      'python': platform.python_version(),
      'numpy': np.__version__,
      'git_commit': getattr(args, 'git_commit', '') or git_commit(),
      'num_workers': args.num_workers,
      **run.pop('versions'),
    },
    **run,
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--bases', default=','.join(BASES), help='fixmatch,softmatch')
  parser.add_argument('--seeds', default='0,1,2', help='comma-separated seeds (our draws)')
  parser.add_argument('--steps', type=int, default=2000, help='training steps per run')
  parser.add_argument('--out', default='experiments/results/fmnist_controlled/usb')
  parser.add_argument(
    '--our_root', default='', help='workdirs of our runs (<base>-base-n40-s<seed>/split.json)'
  )
  parser.add_argument('--replicate', type=int, default=0, help='0, or R: same draws, other RNG')
  parser.add_argument('--num_workers', type=int, default=1, help="USB's loader workers")
  # One thread: on the 2 shared cores here a second intra-op thread made each step ~15x slower.
  parser.add_argument('--torch_threads', type=int, default=1, help='torch intra-op threads')
  args = parser.parse_args(argv)
  bases = [b for b in args.bases.split(',') if b]
  unknown = sorted(set(bases) - set(BASES))
  if unknown:
    parser.error(f'unknown bases {unknown}; use some of {",".join(BASES)}.')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  config = study_config(args.steps)
  check_usb_expressible(config)
  args.git_commit = git_commit()  # the code this process loaded, before any later edit
  print('PATCHES (semilearn is not modified on disk):')
  for patch in PATCHES:
    print(f'  {patch["name"]}: {patch["why"]}')
  raw = None
  for seed in seeds:
    for base in bases:
      path = result_path(args.out, base, config.data.num_labels, seed, args.replicate)
      if os.path.exists(path):
        print(f'done     {path}')
        continue
      if raw is None:
        raw = catalog.open_dataset(config.data.name, data_dir(config))
      print(f'running  {base} seed {seed}, {args.steps} steps', flush=True)
      record = run_one(config, base, seed, raw, args)
      common.write_json(path, record)
      m = record['metrics']
      print(
        f'wrote    {path}: accuracy {m["accuracy"]:.4f} ECE {m["ece"]:.4f} '
        f'({record["train_seconds"]:.0f} s; split {record["split"]["check"]})',
        flush=True,
      )
  return 0


if __name__ == '__main__':
  sys.exit(main())
