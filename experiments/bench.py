"""Throughput of the whole train step (WRN-28-2, CIFAR shapes) and of evaluation.

  python experiments/bench.py                       # B=16 and B=64, every variant
  python experiments/bench.py --batch_sizes=16 --steps=3 --variants=fixmatch,softmatch+cmix1

Prints one table: images/s of the train step (B + 2*mu*B input images), step time
(median of --steps timed steps after --warmup untimed ones), XLA's FLOP count of one
step and the achieved fraction of a measured dense-matmul peak, peak memory, and eval
images/s. The header names the device. With --breakdown, also where one step's time goes:
the model's forward + backward alone (cross-entropy over the same B + 2*mu*B images in one
concatenated pass) and the on-device augmentation alone; the rest is losses, pseudo-labels,
dynamics, pairing, optimizer and EMA.
"""

import argparse
import functools
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import ml_collections  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from cmix_jax import parallel  # pylint: disable=wrong-import-position
from cmix_jax import run_setup  # pylint: disable=wrong-import-position
from cmix_jax import steps  # pylint: disable=wrong-import-position
from configs import default  # pylint: disable=wrong-import-position

VARIANTS = {
    'fixmatch': ('fixmatch', False, 2),
    'softmatch': ('softmatch', False, 2),
    'softmatch+cmix1': ('softmatch', True, 1),
    'softmatch+cmix2': ('softmatch', True, 2),
    'supervised': ('supervised', False, 2),
}


def bench_config(variant: str, batch_size: int, uratio: int, model: str,
                 image_shape=(32, 32, 3), dtype='float32') -> ml_collections.ConfigDict:
  """A CIFAR-shaped config on fake data for one variant."""
  algorithm, cmix, passes = VARIANTS[variant]
  c = default.get_config()
  c.algorithm = algorithm
  c.num_train_steps = 1000
  c.progress_bar = False
  c.data.name = 'fake'
  c.data.fake = ml_collections.ConfigDict(dict(
      num_train=max(4096, batch_size * uratio * 4), num_test=1024, image_shape=image_shape,
      num_classes=10, seed=0))
  c.data.num_labels = 40
  c.data.batch_size = batch_size
  c.data.uratio = uratio
  c.data.eval_batch_size = 256
  c.model.name = model
  c.model.dtype = dtype
  c.calibratemix.enabled = cmix
  c.calibratemix.passes = passes
  c.calibratemix.warmup_steps = 0
  c.eval.plots = False
  return c


def images_per_step(config) -> int:
  b = config.data.batch_size
  return b + (2 * config.data.uratio * b if config.algorithm != 'supervised' else 0)


def _block(tree):
  jax.tree.map(lambda x: x.block_until_ready(), tree)


def time_train_step(config, warmup: int, steps: int):
  """(median seconds per step, FLOPs per step or None) of one variant."""
  with tempfile.TemporaryDirectory() as workdir:
    run = run_setup.build_run(config, workdir)
    state, _ = run_setup.initial_state(run)
    state = parallel.stack_state(state, run.topo, run.sharded_field)
    kind = 'mix' if config.calibratemix.enabled else 'base'
    fn = run_setup.make_step_fns(run)[kind]
    batches = run_setup.train_iterator(run, 0)
    flops = step_flops(run, state, next(batches), kind == 'mix')
    times = []
    for i in range(warmup + steps):
      batch = next(batches)
      t0 = time.perf_counter()
      state, metrics = fn(state, batch)
      _block((state.params, metrics))
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    batches.close()
    eval_ips = time_eval(run, state)
  return float(np.median(times)), flops, eval_ips


def step_flops(run, state, batch, mix: bool):
  """XLA's cost analysis of the whole (all-device) step, if the backend reports it."""
  step = functools.partial(steps.train_step, model=run.model, tx=run.tx,
                           algorithm=run.algorithm, config=run.config, info=run.info, mix=mix)
  fn = parallel.parallelize(step, run.topo, backend='shard_map', donate_first=False)
  try:
    cost = fn.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def time_eval(run, state, repeats: int = 3) -> float:
  """Evaluation images/s over the fake test split (EMA model)."""
  run.evaluator.evaluate_split(state, run.data)  # compile
  n = len(run.data.test_labels)
  t0 = time.perf_counter()
  for _ in range(repeats):
    run.evaluator.evaluate_split(state, run.data)
  return n * repeats / (time.perf_counter() - t0)


def matmul_peak(n: int = 2048, repeats: int = 5) -> float:
  """Measured dense float32 matmul FLOP/s on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / float(np.median(times))


def _median_seconds(fn, warmup: int, steps: int) -> float:
  """Median wall time of fn() (blocked) over `steps` calls after `warmup` + 1 (compile) calls."""
  times = []
  for i in range(warmup + 1 + steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    if i > warmup:
      times.append(time.perf_counter() - t0)
  return float(np.median(times))


def model_grad_seconds(model_name: str, num_images: int, warmup: int, steps: int,
                       image_shape=(32, 32, 3), num_classes: int = 10) -> float:
  """Median seconds of the network's forward + backward alone on num_images (train-mode BN)."""
  from cmix_jax import models  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  model = models.create_model(model_name, num_classes)
  variables = models.init_model(model, jax.random.key(0), image_shape)
  images = jax.random.normal(jax.random.key(1), (num_images,) + tuple(image_shape))
  labels = jnp.arange(num_images) % num_classes

  @jax.jit
  def grad(params, batch_stats):
    def loss(p):
      (logits, _), new_stats = model.apply({'params': p, 'batch_stats': batch_stats}, images,
                                           train=True, mutable=['batch_stats'])
      log_probs = jax.nn.log_softmax(logits)  # [N, C]
      return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1)), new_stats
    return jax.grad(loss, has_aux=True)(params)

  return _median_seconds(lambda: grad(variables['params'], variables['batch_stats']), warmup,
                         steps)


def augment_seconds(batch_size: int, uratio: int, warmup: int, steps: int,
                    image_shape=(32, 32, 3)) -> float:
  """Median seconds of one step's on-device augmentation alone (weak lb, weak + strong ulb)."""
  from cmix_jax.data import augment  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  @jax.jit
  def views(key, x_lb, x_ulb):  # uint8 [B, H, W, C], [U, H, W, C]
    key_lb, key_w, key_s = jax.random.split(key, 3)
    return (augment.augment_batch(key_lb, x_lb, strong=False),
            augment.augment_batch(key_w, x_ulb, strong=False),
            augment.augment_batch(key_s, x_ulb, strong=True))

  rng = np.random.default_rng(0)
  x_lb = rng.integers(0, 256, (batch_size,) + tuple(image_shape), dtype=np.uint8)
  x_ulb = rng.integers(0, 256, (uratio * batch_size,) + tuple(image_shape), dtype=np.uint8)
  keys = iter(jax.random.split(jax.random.key(0), warmup + steps + 1))
  return _median_seconds(lambda: views(next(keys), x_lb, x_ulb), warmup, steps)


def peak_memory_bytes() -> int:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # host RSS on CPU


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--batch_sizes', default='16,64')
  parser.add_argument('--uratio', type=int, default=7)
  parser.add_argument('--variants', default='fixmatch,softmatch,softmatch+cmix1,softmatch+cmix2')
  parser.add_argument('--model', default='wrn_28_2')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--xla_flags', default=default.get_config().xla_flags,
                      help="backend flags as config.xla_flags ('' = XLA's defaults)")
  parser.add_argument('--breakdown', action='store_true',
                      help='also time the model forward+backward and the augmentation alone')
  args = parser.parse_args(argv)
  parallel.set_xla_flags(args.xla_flags)  # before the first computation starts the backend
  device = jax.devices()[0]
  peak = matmul_peak()
  print(f'device: {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s));'
        f' measured f32 matmul peak {peak / 1e9:.1f} GFLOP/s;'
        f' XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print('| B | variant | imgs/step | step s | train img/s | GFLOP/step | % of peak | eval img/s |')
  print('|---|---|---|---|---|---|---|---|')
  base_time, parts = {}, []
  for b in map(int, args.batch_sizes.split(',')):
    for variant in args.variants.split(','):
      config = bench_config(variant, b, args.uratio, args.model, dtype=args.dtype)
      config.num_devices = 1
      config.xla_flags = args.xla_flags
      secs, flops, eval_ips = time_train_step(config, args.warmup, args.steps)
      n = images_per_step(config)
      frac = f'{100 * flops / secs / peak:.1f}' if flops else 'n/a'
      gflop = f'{flops / 1e9:.1f}' if flops else 'n/a'
      base_time.setdefault((b, VARIANTS[variant][0]), secs)
      over = secs / base_time[(b, VARIANTS[variant][0])] - 1
      note = f' (+{100 * over:.1f}% over base)' if VARIANTS[variant][1] else ''
      print(f'| {b} | {variant}{note} | {n} | {secs:.3f} | {n / secs:.1f} | {gflop} | {frac} |'
            f' {eval_ips:.0f} |', flush=True)
    if args.breakdown:
      n = b * (1 + 2 * args.uratio)
      parts.append((b, model_grad_seconds(args.model, n, args.warmup, args.steps),
                    augment_seconds(b, args.uratio, args.warmup, args.steps)))
  print(f'peak memory: {peak_memory_bytes() / 2**30:.2f} GiB')
  for b, grad_s, aug_s in parts:
    step_s = base_time.get((b, 'fixmatch'))
    print(f'B={b}: model forward+backward alone {grad_s:.3f} s, augmentation alone {aug_s:.3f} s'
          + (f'; of the fixmatch step {step_s:.3f} s: model {100 * grad_s / step_s:.0f} %, '
             f'augmentation {100 * aug_s / step_s:.0f} %, rest '
             f'{100 * (1 - (grad_s + aug_s) / step_s):.0f} %' if step_s else ''))


if __name__ == '__main__':
  main()
