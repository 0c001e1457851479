"""Throughput of the whole train step (WRN-28-2, CIFAR shapes) and of evaluation, any device.

  python -m experiments.bench --paper       # the paper's step on every local GPU/TPU/CPU device
  python -m experiments.bench --batch_sizes=16 --breakdown      # the CPU figures of the README
  python -m experiments.bench --smoke       # tiny model and batch: proves it runs (seconds)

--paper is SoftMatch, SoftMatch + CalibrateMix passes=1 and passes=2 at the paper's batch
(64 labeled + 448 unlabeled, weak + strong views: 960 images per step), WRN-28-2, bfloat16,
on all local devices (the global batch split over them). Every size is a flag.
Prints one table: images/s of the train step (B + 2*mu*B input images) in all and per
device, step time (median of --steps timed steps after --warmup untimed ones), XLA's FLOP
count of one device's step and its fraction of the device's peak, and eval images/s; then
the peak memory. The peak is the data-sheet dense bf16 FLOP/s for known accelerators
(PEAK_FLOPS), else a matmul measured here in the run's dtype (CPU included). With
--breakdown, also where one step's time goes: the model's forward + backward alone
(cross-entropy over the same B + 2*mu*B images in one concatenated pass) and the on-device
augmentation alone; the rest is losses, pseudo-labels, dynamics, pairing, optimizer and EMA.
"""

import argparse
import os
import re
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cmix_jax import parallel
from cmix_jax import resume
from cmix_jax import run_setup
from cmix_jax import steps as step_lib
from cmix_jax.data import pipeline
from configs import default
from configs import tiny
from experiments import common

VARIANTS = {  # name -> (algorithm, variant of common.VARIANTS)
  'fixmatch': ('fixmatch', 'base'),
  'fixmatch+cmix1': ('fixmatch', 'cmix_fused'),
  'fixmatch+cmix2': ('fixmatch', 'cmix'),
  'softmatch': ('softmatch', 'base'),
  'softmatch+cmix1': ('softmatch', 'cmix_fused'),
  'softmatch+cmix2': ('softmatch', 'cmix'),
  'supervised': ('supervised', 'base'),
}
# Dense bf16 FLOP/s of one JAX device from the vendors' data sheets (no sparsity; NVIDIA's
# SXM parts; TPU v4/v5p: one chip = one JAX device). The first name found in the device's
# `device_kind` wins, so 'TPU v5 lite' (v5e) precedes 'TPU v5' (v5p).
PEAK_FLOPS = (
  ('H200', 989e12),
  ('H100', 989e12),
  ('A100', 312e12),
  ('TPU v4', 275e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5e', 197e12),
  ('TPU v5', 459e12),
  ('TPU v6 lite', 918e12),
)
# Presets: one command for the paper's step on an accelerator, one tiny run for a CPU test.
PRESETS = {
  'paper': dict(
    batch_sizes='64',
    uratio=7,
    model='wrn_28_2',
    dtype='bfloat16',
    image_shape='32,32,3',
    variants='softmatch,softmatch+cmix1,softmatch+cmix2',
    warmup=3,
    steps=10,
  ),
  'smoke': dict(
    batch_sizes='16',
    uratio=2,
    model='cnn_small',
    dtype='float32',
    image_shape='12,12,1',
    variants='fixmatch,fixmatch+cmix1,fixmatch+cmix2',
    warmup=1,
    steps=2,
    eval_batch_size=64,
    num_test=128,
  ),
}


def bench_config(
  variant: str,
  batch_size: int,
  uratio: int,
  model: str,
  image_shape=(32, 32, 3),
  dtype='float32',
  num_devices: int = -1,
  eval_batch_size: int = 256,
  num_test: int = 1024,
) -> ml_collections.ConfigDict:
  """A config on fake data of `image_shape` for one variant."""
  algorithm, name = VARIANTS[variant]
  c = default.get_config()
  c.algorithm = algorithm
  c.num_train_steps = 1000
  c.num_devices = num_devices
  c.progress_bar = False
  tiny.fake_data(c, max(4096, batch_size * uratio * 4), num_test, image_shape, num_classes=10)
  c.data.num_labels = 40
  c.data.batch_size = batch_size
  c.data.uratio = uratio
  c.data.eval_batch_size = eval_batch_size
  c.model.name = model
  c.model.dtype = dtype
  c.update_from_flattened_dict(common.VARIANTS[name])
  c.calibratemix.warmup_steps = 0
  c.eval.plots = False
  return c


def images_per_step(config) -> int:
  b = config.data.batch_size
  return b + (2 * config.data.uratio * b if config.algorithm != 'supervised' else 0)


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready(), tree)


def compiled_step(config, workdir: str) -> tuple:
  """(run, its compiled train step, the initial state, the first batch, the batch iterator)."""
  run = run_setup.build_run(config, workdir)
  state, _ = resume.initial_state(run)
  state = parallel.stack_state(state, run.topo, run.sharded_field)
  kind = 'mix' if config.calibratemix.enabled else 'base'
  batches = pipeline.train_batches(config, run.data, run.algorithm, run.topo, 0)
  batch = next(batches)
  fns = step_lib.make_step_fns(run.model, run.tx, run.algorithm, config, run.info, run.topo)
  return run, fns[kind].lower(state, batch).compile(), state, batch, batches


def time_train_step(config, warmup: int, steps: int, with_eval: bool = True):
  """(median seconds per step, one device's FLOPs per step or None, eval img/s, devices).

  with_eval=False skips the evaluation timing (eval img/s is then None).
  """
  with tempfile.TemporaryDirectory() as workdir:
    run, step, state, batch, batches = compiled_step(config, workdir)  # timed and costed
    flops = step_flops(step)
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      _block((state.params, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
      batch = next(batches)
    batches.close()
    eval_ips = time_eval(run, state) if with_eval else None
  return float(np.median(times)), flops, eval_ips, run.topo.num_devices


def time_ours(
  variant: str,
  batch_size: int,
  uratio: int,
  warmup: int,
  steps: int,
  model: str = 'wrn_28_2',
  image_shape=(32, 32, 3),
  dtype: str = 'float32',
  conv_grad: str = 'xla',
) -> float:
  """Median seconds per step of one variant on one device (experiments/bench_torch.py --compare)."""
  config = bench_config(variant, batch_size, uratio, model, image_shape, dtype, num_devices=1)
  config.model.conv_grad = conv_grad
  seconds, _, _, _ = time_train_step(config, warmup, steps, with_eval=False)
  return seconds


def step_flops(compiled) -> float | None:
  """XLA's FLOPs of one device's share of a compiled step (the SPMD program), if reported."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0)) or None
  except Exception:
    return None


def time_eval(run, state, repeats: int = 3) -> float:
  """Evaluation images/s over the fake test split (EMA model)."""
  run.evaluator.evaluate_split(state, run.data)  # compile
  n = len(run.data.test_labels)
  t0 = time.perf_counter()
  for _ in range(repeats):
    run.evaluator.evaluate_split(state, run.data)
  return n * repeats / (time.perf_counter() - t0)


def matmul_peak(n: int = 2048, repeats: int = 5, dtype='float32') -> float:
  """Measured dense matmul FLOP/s in `dtype` on the default device."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  return 2 * n**3 / common.median_seconds(lambda: f(a), repeats)


def device_peak(device, dtype: str) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  if device.platform != 'cpu':
    kind = device.device_kind.lower()
    for name, peak in PEAK_FLOPS:
      if name.lower() in kind:
        return peak, f'{name} dense bf16, data sheet'
    return matmul_peak(8192, dtype=dtype), f'measured {dtype} matmul (unknown accelerator)'
  return matmul_peak(dtype=dtype), f'measured {dtype} matmul'  # CPU: AMX makes bf16 faster


def model_grad_seconds(
  model_name: str,
  num_images: int,
  warmup: int,
  steps: int,
  image_shape=(32, 32, 3),
  num_classes: int = 10,
  dtype: str = 'float32',
) -> float:
  """Median seconds of the network's forward + backward alone on num_images (train-mode BN)."""
  from cmix_jax import models

  model = models.create_model(model_name, num_classes, dtype=dtype)
  variables = models.init_model(model, jax.random.key(0), image_shape)
  images = jax.random.normal(jax.random.key(1), (num_images,) + tuple(image_shape))
  labels = jnp.arange(num_images) % num_classes

  @jax.jit
  def grad(params, batch_stats):
    def loss(p):
      (logits, _), new_stats = model.apply(
        {'params': p, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
      )
      log_probs = jax.nn.log_softmax(logits)  # [N, C]
      return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1)), new_stats

    return jax.grad(loss, has_aux=True)(params)

  params, stats = variables['params'], variables['batch_stats']
  return common.median_seconds(lambda: grad(params, stats), steps, warmup + 1)  # + compile


def augment_seconds(
  batch_size: int, uratio: int, warmup: int, steps: int, image_shape=(32, 32, 3)
) -> float:
  """Median seconds of one step's on-device augmentation alone (weak lb, weak + strong ulb)."""
  from experiments import bench_augment

  views = bench_augment.step_views  # uint8 [B, H, W, C], [U, H, W, C]
  rng = np.random.default_rng(0)
  x_lb = rng.integers(0, 256, (batch_size,) + tuple(image_shape), dtype=np.uint8)
  x_ulb = rng.integers(0, 256, (uratio * batch_size,) + tuple(image_shape), dtype=np.uint8)
  keys = iter(jax.random.split(jax.random.key(0), warmup + steps + 1))
  return common.median_seconds(lambda: views(next(keys), x_lb, x_ulb), steps, warmup + 1)


def peak_memory_bytes() -> int:
  """The largest peak over the local devices; host RSS where devices report none (CPU)."""
  peaks = [(d.memory_stats() or {}).get('peak_bytes_in_use') for d in jax.local_devices()]
  if all(p is not None for p in peaks):
    return int(max(peaks))
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS on CPU


# Defaults without a preset (the README's CPU table); a preset replaces those it names.
DEFAULTS = dict(
  batch_sizes='16,64',
  uratio=7,
  variants='fixmatch,softmatch,softmatch+cmix1,softmatch+cmix2',
  model='wrn_28_2',
  dtype='float32',
  image_shape='32,32,3',
  eval_batch_size=256,
  num_test=1024,
  warmup=2,
  steps=5,
)


def parse_args(argv=None) -> argparse.Namespace:
  """Flags; a flag given explicitly wins over --paper / --smoke, which win over DEFAULTS."""
  parser = common.arg_parser(__doc__)
  parser.add_argument(
    '--paper',
    action='store_true',
    help='the paper\'s step: ' + ', '.join(f'{k}={v}' for k, v in PRESETS['paper'].items()),
  )
  parser.add_argument(
    '--smoke',
    action='store_true',
    help='tiny model and batch: ' + ', '.join(f'{k}={v}' for k, v in PRESETS['smoke'].items()),
  )
  helps = dict(
    batch_sizes='global labeled batches B',
    uratio='unlabeled batch = uratio * B',
    variants=f'comma-separated, of {", ".join(VARIANTS)}',
    model='network',
    dtype='float32 | bfloat16 (compute)',
    image_shape='H,W,C of the fake images',
    eval_batch_size='global eval batch',
    num_test='fake test images (eval)',
    warmup='untimed steps after compiling',
    steps='timed steps (median reported)',
  )
  for key, value in DEFAULTS.items():
    parser.add_argument(
      f'--{key}', type=type(value), default=None, help=f'{helps[key]} (default {value})'
    )
  parser.add_argument('--num_devices', type=int, default=-1, help='local devices; -1 = all')
  common.add_xla_flags(parser)
  parser.add_argument(
    '--breakdown',
    action='store_true',
    help='also time the model forward+backward and the augmentation alone',
  )
  args = parser.parse_args(argv)
  if args.paper and args.smoke:
    parser.error('--paper and --smoke are two presets: pick one.')
  preset = PRESETS['paper'] if args.paper else PRESETS['smoke'] if args.smoke else {}
  for key, value in DEFAULTS.items():
    if getattr(args, key) is None:
      setattr(args, key, preset.get(key, value))
  unknown = [v for v in args.variants.split(',') if v not in VARIANTS]
  if unknown:
    parser.error(f'unknown variant(s) {unknown}: use {", ".join(VARIANTS)}.')
  if not re.fullmatch(r'\d+,\d+,\d+', args.image_shape):
    parser.error(f'--image_shape={args.image_shape!r}: give H,W,C, e.g. 32,32,3.')
  return args


def main(argv=None):
  args = parse_args(argv)
  parallel.set_xla_flags(args.xla_flags)  # before the first computation starts the backend
  image_shape = tuple(int(x) for x in args.image_shape.split(','))
  device = jax.local_devices()[0]
  peak, peak_source = device_peak(device, args.dtype)
  print(
    f'device: {device.device_kind} ({jax.default_backend()}, {jax.local_device_count()} '
    f'local device(s)); peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source}); '
    f'{args.model} {args.dtype}, images {image_shape}; '
    f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}'
  )
  print(
    '| B | variant | devices | imgs/step | step s | train img/s | img/s/device '
    '| GFLOP/step/device | % of peak | eval img/s |'
  )
  print('|---|---|---|---|---|---|---|---|---|---|')
  base_time, parts = {}, []
  for b in map(int, args.batch_sizes.split(',')):
    for variant in args.variants.split(','):
      config = bench_config(
        variant,
        b,
        args.uratio,
        args.model,
        image_shape,
        args.dtype,
        args.num_devices,
        args.eval_batch_size,
        args.num_test,
      )
      config.xla_flags = args.xla_flags
      secs, flops, eval_ips, devices = time_train_step(config, args.warmup, args.steps)
      n = images_per_step(config)
      frac = f'{100 * flops / secs / peak:.2g}' if flops else 'n/a'
      gflop = f'{flops / 1e9:.4g}' if flops else 'n/a'
      base_time.setdefault((b, VARIANTS[variant][0]), secs)
      over = secs / base_time[(b, VARIANTS[variant][0])] - 1
      note = f' ({100 * over:+.1f}% over base)' if VARIANTS[variant][1] != 'base' else ''
      print(
        f'| {b} | {variant}{note} | {devices} | {n} | {secs:.4f} | {n / secs:.1f} | '
        f'{n / secs / devices:.1f} | {gflop} | {frac} | {eval_ips:.0f} |',
        flush=True,
      )
    if args.breakdown:
      n = b * (1 + 2 * args.uratio)
      parts.append(
        (
          b,
          model_grad_seconds(args.model, n, args.warmup, args.steps, image_shape, dtype=args.dtype),
          augment_seconds(b, args.uratio, args.warmup, args.steps, image_shape),
        )
      )
  print(f'peak memory: {peak_memory_bytes() / 2**30:.2f} GiB')
  for b, grad_s, aug_s in parts:
    step_s = base_time.get((b, 'fixmatch'))
    print(
      f'B={b}: model forward+backward alone {grad_s:.3f} s, augmentation alone {aug_s:.3f} s'
      + (
        f'; of the fixmatch step {step_s:.3f} s: model {100 * grad_s / step_s:.0f} %, '
        f'augmentation {100 * aug_s / step_s:.0f} %, rest '
        f'{100 * (1 - (grad_s + aug_s) / step_s):.0f} %'
        if step_s
        else ''
      )
    )


if __name__ == '__main__':
  main()
