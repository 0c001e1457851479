"""Each WRN-28-2 convolution alone: forward, input and kernel gradient, XLA against torch.

  python -m experiments.bench_convs                 # N = 240 images (B = 16 at uratio 7)
  python -m experiments.bench_convs --n=960 --conv_grad=subpixel

XLA side: jitted lax.conv_general_dilated (NHWC) and its two VJPs, under the default config's
xla_flags; torch side (when installed): F.conv2d, torch.nn.grad.conv2d_input / conv2d_weight
(NCHW, oneDNN). Median ms of --repeats calls after one warm-up; the last row weights each
layer by how often WRN-28-2 has it.
"""

import os

import jax
from jax import lax

from cmix_jax import parallel
from cmix_jax.models import conv
from configs import default
from experiments import common

# (name, input side, C_in, C_out, kernel, stride, layers of WRN-28-2 with this shape)
LAYERS = (
  ('stem 3x3 3->16 @32', 32, 3, 16, 3, 1, 1),
  ('g1 3x3 16->32 @32', 32, 16, 32, 3, 1, 1),
  ('g1 1x1 16->32 @32', 32, 16, 32, 1, 1, 1),
  ('g1 3x3 32->32 @32', 32, 32, 32, 3, 1, 7),
  ('g2 3x3 s2 32->64 @32', 32, 32, 64, 3, 2, 1),
  ('g2 1x1 s2 32->64 @32', 32, 32, 64, 1, 2, 1),
  ('g2 3x3 64->64 @16', 16, 64, 64, 3, 1, 7),
  ('g3 3x3 s2 64->128 @16', 16, 64, 128, 3, 2, 1),
  ('g3 1x1 s2 64->128 @16', 16, 64, 128, 1, 2, 1),
  ('g3 3x3 128->128 @8', 8, 128, 128, 3, 1, 7),
)


def median_ms(fn, repeats: int) -> float:
  """Median wall ms of fn() (its result blocked on) after one warm-up call."""
  return 1e3 * common.median_seconds(fn, repeats)


def xla_layer(n, side, c_in, c_out, k, s, conv_grad, repeats) -> tuple[float, float, float]:
  """(forward, input gradient, kernel gradient) ms of one NHWC layer in XLA."""
  pad = ((k // 2, k // 2),) * 2
  fn = lax.conv_general_dilated if conv_grad == 'xla' else conv.subpixel_conv_general_dilated
  f = lambda x, w: fn(x, w, (s, s), pad, dimension_numbers=conv.NHWC)
  x = jax.random.normal(jax.random.key(0), (n, side, side, c_in))  # [N, H, W, C_in]
  w = jax.random.normal(jax.random.key(1), (k, k, c_in, c_out))  # [k, k, C_in, C_out]
  dy = f(x, w)  # [N, H/s, W/s, C_out], as the cotangent
  fwd = jax.jit(f)
  dx = jax.jit(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0])
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0])
  return (
    median_ms(lambda: fwd(x, w), repeats),
    median_ms(lambda: dx(x, w, dy), repeats),
    median_ms(lambda: dw(x, w, dy), repeats),
  )


def torch_layer(torch, n, side, c_in, c_out, k, s, repeats) -> tuple[float, float, float]:
  """(forward, input gradient, kernel gradient) ms of one NCHW layer in torch."""
  f = torch.nn.functional
  x, w = torch.randn(n, c_in, side, side), torch.randn(c_out, c_in, k, k)
  dy = f.conv2d(x, w, stride=s, padding=k // 2)
  grad = torch.nn.grad
  return (
    median_ms(lambda: f.conv2d(x, w, stride=s, padding=k // 2), repeats),
    median_ms(lambda: grad.conv2d_input(x.shape, w, dy, stride=s, padding=k // 2), repeats),
    median_ms(lambda: grad.conv2d_weight(x, w.shape, dy, stride=s, padding=k // 2), repeats),
  )


def main(argv=None):
  parser = common.arg_parser(__doc__)
  parser.add_argument('--n', type=int, default=240, help='images per call')
  parser.add_argument('--conv_grad', default='xla', choices=conv.CONV_GRADS)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args(argv)
  parallel.set_xla_flags(default.get_config().xla_flags)
  try:
    import torch

    torch.set_num_threads(os.cpu_count())
  except ImportError:
    torch = None
  print(f'N={args.n}, conv_grad={args.conv_grad}, ms per call (torch: {torch is not None})')
  print('| layer (x count) | XLA fwd | XLA dx | XLA dw | torch fwd | torch dx | torch dw |')
  print('|---|---|---|---|---|---|---|')
  totals = [0.0] * 6
  for name, side, c_in, c_out, k, s, count in LAYERS:
    shape = (args.n, side, c_in, c_out, k, s)
    ms = xla_layer(*shape, args.conv_grad, args.repeats)
    ms += torch_layer(torch, *shape, args.repeats) if torch else (float('nan'),) * 3
    totals = [t + count * m for t, m in zip(totals, ms)]
    print(f'| {name} (x{count}) | ' + ' | '.join(f'{m:.1f}' for m in ms) + ' |', flush=True)
  print('| weighted sum | ' + ' | '.join(f'{t:.0f}' for t in totals) + ' |')


if __name__ == '__main__':
  main()
