"""Times the batched pairing kernel against the reference's per-anchor Python loop.

USB shapes: two pairings of 32 anchors x 224 pool of 32x32x3 images (+ the mixing),
k = 15. The jitted kernel (`mixup.pair_dissimilar` twice + `mixup.mix`) is compared
with a plain numpy loop doing what the reference does per anchor (cosine similarity
against the pool, argsort, the k most dissimilar, one random choice, mix), and with
the same loop in torch when torch is importable. Also times the whole jitted
`targeted_mixup` (median splits included) at B=64, U=448, and one step's dynamics work
(AUM/APM/Welford table updates + the difficulty read-outs, tables donated as in the train
step) at CIFAR-10, CIFAR-100 and, with --imagenet, ImageNet table sizes.
First it prints what `calibratemix.pair_scope=global` moves between devices per step
(all-gathers of the pairing inputs, the reduce-scatter that builds the mixed images),
read off the traced program, at CIFAR and ImageNet shapes on 8 devices: full-size images,
downsampled images and features.

  python -m experiments.bench_pairing [--runs 30] [--warmup 3] [--imagenet] [--bytes_only]
"""

import argparse
import functools
import os

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

from cmix_jax import dynamics
from cmix_jax import mixup
from cmix_jax import parallel
from experiments import common

N_ANCHORS, POOL, IMAGE, K, NUM_CLASSES = 32, 224, (32, 32, 3), 15, 10
COLLECTIVES = ('all_gather', 'reduce_scatter')


def _collective_bytes(jaxpr) -> dict[str, int]:
  """Per-device bytes of every all_gather result and reduce_scatter operand in a jaxpr."""
  totals = dict.fromkeys(COLLECTIVES, 0)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'all_gather':
      totals['all_gather'] += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars)
    elif eqn.primitive.name == 'reduce_scatter':
      totals['reduce_scatter'] += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      for name, value in _collective_bytes(sub).items():
        totals[name] += value
  return totals


def global_pairing_bytes(
  batch: int,
  uratio: int,
  image: tuple,
  num_devices: int,
  pair_downsample: int = 1,
  feature_dim: int | None = None,
  num_classes: int = NUM_CLASSES,
) -> dict[str, int]:
  """Bytes each device receives per step from global_targeted_mixup's collectives (traced).

  Traces (never runs) one device's global_targeted_mixup of a global batch of `batch`
  labeled and uratio*batch unlabeled f32 images over `num_devices` devices.
  """
  b, u = batch // num_devices, batch * uratio // num_devices
  f32, i32 = jnp.float32, jnp.int32
  mesh = jax.sharding.AbstractMesh((num_devices,), (parallel.AXIS,))
  spec = jax.sharding.PartitionSpec(parallel.AXIS)
  args = [
    jax.ShapeDtypeStruct((n * num_devices,) + shape, dtype)
    for n, shape, dtype in (
      (b, image, f32),
      (b, (), i32),
      (b, (), f32),
      (u, image, f32),
      (u, (), i32),
      (u, (), f32),
    )
  ]
  if feature_dim:
    args += [jax.ShapeDtypeStruct((n * num_devices, feature_dim), f32) for n in (b, u)]

  def one_device(x_lb, y_lb, d_lb, x_ulb, pseudo, d_ulb, *feats):
    mixed = mixup.global_targeted_mixup(
      jax.random.key(0),
      x_lb=x_lb,
      y_lb=y_lb,
      lb_difficulty=d_lb,
      x_ulb=x_ulb,
      pseudo_labels=pseudo,
      ulb_difficulty=d_ulb,
      num_classes=num_classes,
      axis_name=parallel.AXIS,
      pair_lb=feats[0] if feats else None,
      pair_ulb=feats[1] if feats else None,
      pair_downsample=pair_downsample,
    )
    return mixed.x

  mapped = jax.shard_map(one_device, mesh=mesh, in_specs=(spec,) * len(args), out_specs=spec)
  return _collective_bytes(jax.make_jaxpr(mapped)(*args).jaxpr)


def print_gather_bytes(num_devices: int = 8) -> None:
  """The table of global-scope traffic per step at CIFAR and ImageNet shapes."""
  print(
    f'pair_scope=global traffic per device per step, {num_devices} devices, f32 views, '
    'B=64 U=448 global:'
  )
  cases = [
    ('CIFAR 32x32x3', (32, 32, 3), 1, None),
    ('CIFAR 32x32x3', (32, 32, 3), 4, None),
    ('CIFAR, WRN-28-2 features', (32, 32, 3), 1, 128),
    ('ImageNet 224x224x3', (224, 224, 3), 1, None),
    ('ImageNet 224x224x3', (224, 224, 3), 8, None),
    ('ImageNet, ResNet-50 features', (224, 224, 3), 1, 2048),
  ]
  for name, image, factor, feature_dim in cases:
    got = global_pairing_bytes(64, 7, image, num_devices, factor, feature_dim)
    pairing = f'features {feature_dim}' if feature_dim else f'pair_downsample={factor}'
    print(
      f'  {name:30s} {pairing:20s} all-gather {got["all_gather"] / 2**20:9.2f} MiB   '
      f'reduce-scatter {got["reduce_scatter"] / 2**20:8.2f} MiB'
    )


def _median_times(fns, runs: int, warmup: int) -> list[float]:
  """Median wall time (s) of each fn(), timed one case after another.

  Not interleaved: right after torch ops, torch's OpenMP threads keep spinning for a while
  and steal the cores from the next case (the jitted kernel measured 3x slower that way).
  """
  return [common.median_seconds(fn, runs, warmup) for fn in fns]


@jax.jit
def _kernel(key, lb_easy, ulb_hard, lb_hard, ulb_easy):
  """Both pairings + mixing, batched: the part the reference runs as a Python loop."""
  key_1, key_2, key_lam1, key_lam2 = jax.random.split(key, 4)
  partner_1 = mixup.pair_dissimilar(key_1, lb_easy, ulb_hard, K)  # [32]
  partner_2 = mixup.pair_dissimilar(key_2, lb_hard, ulb_easy, K)  # [32]
  lam_1 = jax.random.beta(key_lam1, 0.4, 0.4)
  lam_2 = jax.random.beta(key_lam2, 0.4, 0.4)
  x_1 = mixup.mix(lb_easy, ulb_hard[partner_1], lam_1)  # [32, 32, 32, 3]
  x_2 = mixup.mix(lb_hard, ulb_easy[partner_2], lam_2)
  return x_1, x_2, partner_1, partner_2


def _numpy_pairing(rng, anchors, pool, pool_labels):
  """The reference's loop, in numpy: one anchor at a time."""
  lam = rng.beta(0.4, 0.4)
  mixed = np.empty_like(anchors)
  y_b = np.empty(len(anchors), np.int64)
  pool_flat = pool.reshape(len(pool), -1)
  for i in range(len(anchors)):
    a = anchors[i].reshape(1, -1)
    cos = (pool_flat @ a[0]) / np.maximum(
      np.linalg.norm(pool_flat, axis=1) * np.linalg.norm(a), 1e-8
    )  # [224]
    dissimilar = np.argsort(cos)[:K]
    chosen = dissimilar[rng.integers(0, K)]
    mixed[i] = lam * anchors[i] + (1 - lam) * pool[chosen]
    y_b[i] = pool_labels[chosen]
  return mixed, y_b, lam


def _torch_loop_fn(data):
  """The reference's loop in torch (on CUDA when available), or None without torch."""
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    return None, None
  device = 'cuda' if torch.cuda.is_available() else 'cpu'
  t = {k: torch.as_tensor(np.asarray(v)).to(device) for k, v in data.items()}

  def pairing(x_easy, x_hard, y_hard):
    lam = np.random.beta(0.4, 0.4)
    mixed = torch.empty_like(x_easy)
    y_b = torch.empty(x_easy.shape[0], dtype=torch.long, device=device)
    for i in range(x_easy.shape[0]):
      sim = F.cosine_similarity(x_easy[i].view(1, -1), x_hard.view(x_hard.shape[0], -1), dim=1)
      _, top = torch.topk(sim, K, largest=False)
      chosen = top[torch.randint(0, K, (1,)).item()]
      mixed[i] = lam * x_easy[i] + (1 - lam) * x_hard[chosen]
      y_b[i] = y_hard[chosen]
    return mixed, y_b

  def run():
    pairing(t['lb_easy'], t['ulb_hard'], t['y_hard'])
    pairing(t['lb_hard'], t['ulb_easy'], t['y_easy'])
    if device == 'cuda':
      torch.cuda.synchronize()

  return run, device


def _dynamics_step_fn(
  num_labeled: int, num_unlabeled: int, num_classes: int, batch: int, ulb_batch: int
):
  """A () -> None timing one step's table updates + read-outs, the state donated in place."""
  rng = np.random.default_rng(1)
  state = dynamics.DynamicsState.init(num_labeled, num_unlabeled, num_classes)
  inputs = dict(
    idx_lb=jnp.asarray(rng.integers(0, num_labeled, batch), jnp.int32),
    logits_lb=jnp.asarray(rng.normal(size=(batch, num_classes)), jnp.float32),
    y_lb=jnp.asarray(rng.integers(0, num_classes, batch), jnp.int32),
    idx_ulb=jnp.asarray(rng.integers(0, num_unlabeled, ulb_batch), jnp.int32),
    logits_w=jnp.asarray(rng.normal(size=(ulb_batch, num_classes)), jnp.float32),
  )

  @functools.partial(jax.jit, donate_argnums=0)
  def step(state, idx_lb, logits_lb, y_lb, idx_ulb, logits_w):
    pseudo = jnp.argmax(logits_w, axis=-1)  # [U]
    state = dynamics.update_labeled(state, idx_lb, logits_lb, y_lb)
    state = dynamics.update_unlabeled(state, idx_ulb, logits_w, pseudo, update_apm=True)
    return state, (
      dynamics.labeled_difficulty(state, idx_lb),
      dynamics.unlabeled_difficulty(state, idx_ulb, pseudo),
    )

  holder = [state]

  def run():
    holder[0], read = step(holder[0], **inputs)
    jax.block_until_ready(read)

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=30)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument(
    '--imagenet',
    action='store_true',
    help='also time the dynamics step at ImageNet size (5.2 GB of tables)',
  )
  common.add_xla_flags(parser)
  parser.add_argument(
    '--bytes_only',
    action='store_true',
    help='print the global-scope traffic table and stop (nothing runs)',
  )
  args = parser.parse_args()
  parallel.set_xla_flags(args.xla_flags)  # before the first computation starts the backend
  print_gather_bytes()
  if args.bytes_only:
    return

  rng = np.random.default_rng(0)
  data = {
    name: rng.normal(size=(n,) + IMAGE).astype(np.float32)
    for name, n in (
      ('lb_easy', N_ANCHORS),
      ('lb_hard', N_ANCHORS),
      ('ulb_hard', POOL),
      ('ulb_easy', POOL),
    )
  }
  data['y_hard'] = rng.integers(0, NUM_CLASSES, POOL)
  data['y_easy'] = rng.integers(0, NUM_CLASSES, POOL)
  device_data = {k: jnp.asarray(data[k]) for k in ('lb_easy', 'ulb_hard', 'lb_hard', 'ulb_easy')}
  keys = iter(jax.random.split(jax.random.key(0), 10_000))

  def run_kernel():
    jax.block_until_ready(_kernel(next(keys), **device_data))

  def run_numpy():
    _numpy_pairing(rng, data['lb_easy'], data['ulb_hard'], data['y_hard'])
    _numpy_pairing(rng, data['lb_hard'], data['ulb_easy'], data['y_easy'])

  # Sanity: the kernel's partners lie in numpy's top-k most dissimilar sets.
  _, _, partner_1, _ = _kernel(next(keys), **device_data)
  flat = lambda x: (
    x.reshape(len(x), -1) / np.linalg.norm(x.reshape(len(x), -1), axis=1, keepdims=True)
  )
  top_k = np.argsort(flat(data['lb_easy']) @ flat(data['ulb_hard']).T, axis=1)[:, :K]
  assert all(p in row for p, row in zip(np.asarray(partner_1), top_k)), 'kernel left top-k'

  print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  print(
    f'backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); '
    f'{N_ANCHORS} anchors x {POOL} pool of {IMAGE}, k={K}, two pairings + mixing; '
    f'median of {args.runs} runs after {args.warmup} warm-up'
  )
  b, u = 2 * N_ANCHORS, 2 * POOL
  full = jax.jit(functools.partial(mixup.targeted_mixup, num_classes=NUM_CLASSES))
  full_inputs = dict(
    x_lb=jnp.asarray(rng.normal(size=(b,) + IMAGE), jnp.float32),
    y_lb=jnp.asarray(rng.integers(0, NUM_CLASSES, b)),
    lb_difficulty=jnp.asarray(rng.normal(size=b), jnp.float32),
    x_ulb=jnp.asarray(rng.normal(size=(u,) + IMAGE), jnp.float32),
    pseudo_labels=jnp.asarray(rng.integers(0, NUM_CLASSES, u)),
    ulb_difficulty=jnp.asarray(rng.normal(size=u), jnp.float32),
  )
  cases = [
    ('jitted kernel (pair_dissimilar x2 + mix)', run_kernel),
    ('numpy per-anchor loop', run_numpy),
    (
      f'jitted targeted_mixup (B={b}, U={u}, splits included)',
      lambda: jax.block_until_ready(full(next(keys), **full_inputs)),
    ),
  ]
  torch_run, torch_device = _torch_loop_fn(data)
  if torch_run is not None:
    cases.append((f'torch per-anchor loop ({torch_device})', torch_run))
  else:
    print('torch not importable: torch loop skipped')
  seconds = _median_times([fn for _, fn in cases], args.runs, args.warmup)
  rows = list(zip([name for name, _ in cases], seconds))
  t_kernel, t_numpy = seconds[0], seconds[1]

  for name, median in rows:
    print(f'{name:58s} {median * 1e3:9.3f} ms   x{median / t_kernel:8.1f} vs kernel')
  print(f'speed-up of the kernel over the numpy loop: {t_numpy / t_kernel:.1f}x (target >= 50x)')
  if torch_run is not None:
    print(f'speed-up of the kernel over the torch loop: {seconds[3] / t_kernel:.1f}x')

  tables = [('CIFAR-10', 4000, 50000, 10), ('CIFAR-100', 10000, 50000, 100)]
  if args.imagenet:
    tables.append(('ImageNet', 128116, 1281167, 1000))
  names = [
    f'dynamics step, {name} tables ({n_lb} x {n_ulb} x {c}), B=64 U=448'
    for name, n_lb, n_ulb, c in tables
  ]
  seconds = _median_times(
    [_dynamics_step_fn(n_lb, n_ulb, c, 64, 448) for _, n_lb, n_ulb, c in tables],
    args.runs,
    args.warmup,
  )
  for name, median in zip(names, seconds):
    print(f'{name:66s} {median * 1e3:9.3f} ms')


if __name__ == '__main__':
  main()
