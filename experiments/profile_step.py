"""Per-op profile of one train step on this machine (jax.profiler), grouped by XLA thunk kind.

  python -m experiments.profile_step                             # FixMatch, WRN-28-2, B=16
  python -m experiments.profile_step --conv_grad=subpixel --batch_size=64
  python -m experiments.profile_step --model=cnn_small --image_shape=28,28,1

Traces --steps steps after compiling and warming up, then sums the trace's events of XLA's
host threads by kind (the thunk name without its .N suffix: transpose_copy_fusion,
convolution-base-dilated = the lhs-dilated input gradient of a strided conv, ...). On XLA:CPU
a convolution thunk only enqueues Eigen's kernel, which then runs untraced on the same pool:
the convolutions' compute is what the traced kinds leave of the pool's two threads
('untraced: Eigen conv kernels + idle'). Each kind: ms per step summed over threads.
"""

import collections
import glob
import os
import re
import tempfile
import time

import jax

from cmix_jax import parallel
from configs import default
from experiments import bench
from experiments import common

SKIP = ('ThunkExecutor::Execute', 'ThunkExecutor::Execute (wait for completion)')


def trace_steps(step, state, batch, steps: int, trace_dir: str) -> float:
  """Runs `steps` traced steps; returns their wall seconds."""
  jax.profiler.start_trace(trace_dir)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, _ = step(state, batch)
    jax.block_until_ready(state.params)
  wall = time.perf_counter() - t0
  jax.profiler.stop_trace()
  return wall


def kinds(trace_dir: str) -> tuple[collections.Counter, collections.Counter, int]:
  """(ns by thunk kind, event count by kind, XLA host threads) from the trace's xplane."""
  path = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True))[-1]
  plane = jax.profiler.ProfileData.from_file(path).find_plane_with_name('/host:CPU')
  ns, count, threads = collections.Counter(), collections.Counter(), 0
  for line in plane.lines:
    if not line.name.startswith('tf_XLAEigen'):
      continue
    threads += 1
    for event in line.events:
      if event.name.startswith('$') or event.name in SKIP:
        continue
      kind = re.sub(r'\.\d+$', '', event.name)
      ns[kind] += event.duration_ns
      count[kind] += 1
  return ns, count, threads


def main(argv=None):
  parser = common.arg_parser(__doc__)
  parser.add_argument('--variant', default='fixmatch', choices=sorted(bench.VARIANTS))
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--uratio', type=int, default=7)
  parser.add_argument('--model', default='wrn_28_2')
  parser.add_argument('--image_shape', default='32,32,3')
  parser.add_argument('--conv_grad', default='xla', help='model.conv_grad')
  parser.add_argument('--steps', type=int, default=2, help='traced steps')
  parser.add_argument('--rows', type=int, default=12, help='kinds shown')
  args = parser.parse_args(argv)
  parallel.set_xla_flags(default.get_config().xla_flags)
  shape = tuple(int(s) for s in args.image_shape.split(','))
  config = bench.bench_config(
    args.variant, args.batch_size, args.uratio, args.model, shape, num_devices=1
  )
  config.model.conv_grad = args.conv_grad
  with tempfile.TemporaryDirectory() as workdir, tempfile.TemporaryDirectory() as trace_dir:
    _, step, state, batch, batches = bench.compiled_step(config, workdir)
    for _ in range(2):  # warm-up
      state, _ = step(state, batch)
    jax.block_until_ready(state.params)
    wall = trace_steps(step, state, batch, args.steps, trace_dir) / args.steps
    ns, count, threads = kinds(trace_dir)
    batches.close()
  ms = {k: v / 1e6 / args.steps for k, v in ns.items()}
  pool_ms = 1e3 * wall * threads
  print(
    f'{args.variant} {args.model} B={args.batch_size} uratio={args.uratio} '
    f'conv_grad={args.conv_grad}: {1e3 * wall:.0f} ms per traced step, {threads} XLA threads '
    f'({pool_ms:.0f} thread-ms per step)'
  )
  print('| thunk kind | ms/step (thread-ms) | % of thread-ms | thunks/step |')
  print('|---|---|---|---|')
  for kind, value in sorted(ms.items(), key=lambda kv: -kv[1])[: args.rows]:
    print(f'| {kind} | {value:.0f} | {100 * value / pool_ms:.1f} | {count[kind] // args.steps} |')
  rest = pool_ms - sum(ms.values())
  print(f'| untraced: Eigen conv kernels + idle | {rest:.0f} | {100 * rest / pool_ms:.1f} | |')


if __name__ == '__main__':
  main()
