"""Throughput of on-device augmentation (`augment.augment_batch`) for one training step.

A USB classic step views 960 images: 64 labeled weak + 448 unlabeled weak + 448
unlabeled strong (B = 64, mu = 7). Times that step jitted on the local backend, for
CIFAR-shaped 32x32x3 and Fashion-MNIST-shaped 28x28x1 images, and each part alone.
Prints images/s from the median of several runs after warm-up (compile excluded).

  python -m experiments.bench_augment [--runs 10] [--warmup 2]
"""

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from cmix_jax.data import augment
from experiments import common

NUM_LB, NUM_ULB = 64, 448


@functools.partial(jax.jit, static_argnames=('strong',))
def _views(key, images, strong: bool):
  return augment.augment_batch(key, images, strong=strong)


@jax.jit
def step_views(key, x_lb, x_ulb):
  """The three views of one step, as the train step makes them."""
  key_lb, key_w, key_s = jax.random.split(key, 3)
  return (
    augment.augment_batch(key_lb, x_lb, strong=False),
    augment.augment_batch(key_w, x_ulb, strong=False),
    augment.augment_batch(key_s, x_ulb, strong=True),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=2)
  args = parser.parse_args()
  print(
    f'backend {jax.default_backend()}, {jax.device_count()} device(s); '
    f'median of {args.runs} runs after {args.warmup} warm-up'
  )
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  for shape in ((32, 32, 3), (28, 28, 1)):
    x_lb = jnp.asarray(rng.integers(0, 256, (NUM_LB, *shape), dtype=np.uint8))
    x_ulb = jnp.asarray(rng.integers(0, 256, (NUM_ULB, *shape), dtype=np.uint8))
    weak = common.median_seconds(lambda: _views(key, x_ulb, False), args.runs, args.warmup)
    strong = common.median_seconds(lambda: _views(key, x_ulb, True), args.runs, args.warmup)
    step = common.median_seconds(lambda: step_views(key, x_lb, x_ulb), args.runs, args.warmup)
    total = NUM_LB + 2 * NUM_ULB
    name = 'x'.join(map(str, shape))
    print(
      f'{name}: weak {NUM_ULB / weak:9.0f} img/s ({weak * 1e3:7.1f} ms / {NUM_ULB})  '
      f'strong {NUM_ULB / strong:8.0f} img/s ({strong * 1e3:7.1f} ms / {NUM_ULB})  '
      f'step {total / step:8.0f} img/s ({step * 1e3:7.1f} ms / {total})'
    )


if __name__ == '__main__':
  main()
