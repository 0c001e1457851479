"""Strided convolutions whose input gradient is one stride-1 convolution (config.model.conv_grad).

XLA differentiates a stride-s convolution into an lhs-dilated (transposed) convolution, a slow
path on XLA:CPU (about 4x its forward here). The 'subpixel' input gradient splits the output
into its s*s phases: phase (p, q) of dx only meets the kernel taps congruent to it mod s, so
all phases are one stride-1 convolution of the cotangent with a [J, J, C_out, s*s*C_in]
kernel, then a depth-to-space. Same sums, other order: equal to XLA's to float rounding.
The forward and the kernel gradient are XLA's own.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_GRADS = ('xla', 'subpixel')
NHWC = ('NHWC', 'HWIO', 'NHWC')
# config.model.precision -> (conv, matmul) lax precision names. 'usb' is PyTorch's default on
# a GPU: cuDNN convolutions in TF32, matmuls in full float32.
PRECISIONS = {
  'default': ('default', 'default'),
  'float32': ('highest', 'highest'),
  'usb': ('default', 'highest'),
}
PRECISION_SETTINGS = ('auto', *PRECISIONS)  # config.model.precision; auto resolves per backend


def _phase_taps(size: int, stride: int, pad_lo: int) -> tuple[np.ndarray, int, int]:
  """(tap index [phases, J], or `size` for none; d_max; first phase) of one spatial axis.

  dx[s*m + p] = sum_j dy[m + j - d_max] * w[taps[p - first, j]]: in the forward y[o] reads
  x[s*o + k - pad_lo], so x[s*m + p] meets tap k = s*d + p + pad_lo of output o = m - d.
  Phases before `first` or after the last row meet no tap (dx is zero there: kernel < stride).
  """
  pairs = [(p, (k - p - pad_lo) // stride, k) for p in range(stride) for k in range(size)]
  pairs = [(p, d, k) for p, d, k in pairs if (k - p - pad_lo) % stride == 0]
  d_min, d_max = min(d for _, d, _ in pairs), max(d for _, d, _ in pairs)
  first, last = min(p for p, _, _ in pairs), max(p for p, _, _ in pairs)
  taps = np.full((last - first + 1, d_max - d_min + 1), size)  # `size` indexes the zero tap
  for p, d, k in pairs:
    taps[p - first, d_max - d] = k
  return taps, d_max, first


def subpixel_input_grad(dy, kernel, in_hw, strides, padding):
  """dx [N, H, W, C_in] of a NHWC/HWIO conv from its cotangent dy [N, Ho, Wo, C_out]."""
  (kh, kw, c_in, c_out), (sh, sw) = kernel.shape, strides
  taps_h, top, first_h = _phase_taps(kh, sh, padding[0][0])
  taps_w, left, first_w = _phase_taps(kw, sw, padding[1][0])
  (ph, jh), (pw, jw) = taps_h.shape, taps_w.shape  # phases with taps, window
  mh, mw = -(-in_hw[0] // sh), -(-in_hw[1] // sw)  # phase rows / columns, ceil(H / s)
  zero_tapped = jnp.pad(kernel, ((0, 1), (0, 1), (0, 0), (0, 0)))  # [kh+1, kw+1, C_in, C_out]
  phase_kernel = zero_tapped[taps_h[:, :, None, None], taps_w[None, None, :, :]]
  # [ph, jh, pw, jw, C_in, C_out] -> [jh, jw, C_out, ph * pw * C_in]
  phase_kernel = phase_kernel.transpose(1, 3, 5, 0, 2, 4).reshape(jh, jw, c_out, ph * pw * c_in)
  pads = [(top, mh + jh - 1 - dy.shape[1] - top, 0), (left, mw + jw - 1 - dy.shape[2] - left, 0)]
  dy = lax.pad(dy, jnp.zeros((), dy.dtype), [(0, 0, 0), *pads, (0, 0, 0)])
  phases = lax.conv_general_dilated(dy, phase_kernel, (1, 1), 'VALID', dimension_numbers=NHWC)
  n = dy.shape[0]  # phases: [N, mh, mw, ph * pw * C_in]
  dx = phases.reshape(n, mh, mw, ph, pw, c_in).transpose(0, 1, 3, 2, 4, 5)  # [N, mh, ph, mw, pw, C]
  no_pad = (0, 0, 0)
  untapped = [(first_h, sh - ph - first_h, 0), (first_w, sw - pw - first_w, 0)]  # zero phases
  dx = lax.pad(
    dx, jnp.zeros((), dx.dtype), [no_pad, no_pad, untapped[0], no_pad, untapped[1], no_pad]
  )
  return dx.reshape(n, mh * sh, mw * sw, c_in)[:, : in_hw[0], : in_hw[1]]  # [N, H, W, C_in]


def _plain_conv(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(
    x, kernel, strides, padding, dimension_numbers=NHWC, precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def strided_conv(x, kernel, strides, padding, precision=None):
  """NHWC/HWIO conv (x [N, H, W, C_in], kernel [kh, kw, C_in, C_out]) with the subpixel dx."""
  return _plain_conv(x, kernel, strides, padding, precision)


def _strided_conv_fwd(x, kernel, strides, padding, precision):
  return _plain_conv(x, kernel, strides, padding, precision), (x, kernel)


def _strided_conv_bwd(strides, padding, precision, residuals, dy):
  x, kernel = residuals
  _, kernel_vjp = jax.vjp(lambda k: _plain_conv(x, k, strides, padding, precision), kernel)
  dx = subpixel_input_grad(dy, kernel, x.shape[1:3], strides, padding)
  return dx.astype(x.dtype), kernel_vjp(dy)[0]


strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def subpixel_conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
):
  """lax.conv_general_dilated for nn.Conv; strided 2-D NHWC convs take the subpixel gradient."""
  plain = functools.partial(
    lax.conv_general_dilated,
    lhs_dilation=lhs_dilation,
    rhs_dilation=rhs_dilation,
    dimension_numbers=dimension_numbers,
    feature_group_count=feature_group_count,
    precision=precision,
  )
  nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC)
  dilated = any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
  if (
    lhs.ndim != 4
    or isinstance(padding, str)
    or all(s == 1 for s in window_strides)
    or dilated
    or feature_group_count != 1
    or lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc
  ):
    return plain(lhs, rhs, window_strides, padding)
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  return strided_conv(lhs, rhs, tuple(window_strides), padding, precision)


def resolve_precision(setting: str, platform: str) -> dict:
  """{'setting', 'conv', 'matmul'} of a config.model.precision; 'auto' = 'usb' on GPU, else default.

  XLA's default precision computes float32 convs and matmuls in TF32 on Ampere+ GPUs and in full
  float32 on CPU, so on a CPU every setting but 'float32' leaves today's numerics as they are.
  """
  if setting not in PRECISION_SETTINGS:
    raise ValueError(f'precision={setting!r}; use auto or one of {tuple(PRECISIONS)}.')
  name = ('usb' if platform == 'gpu' else 'default') if setting == 'auto' else setting
  conv, matmul = PRECISIONS[name]
  return {'setting': setting, 'resolved': name, 'conv': conv, 'matmul': matmul}


def lax_precision(name: str):
  """lax.Precision of a resolved name; None for 'default' (the ops' own default)."""
  return None if name == 'default' else lax.Precision(name)


def conv_fn(conv_grad: str):
  """nn.Conv's conv_general_dilated for a config.model.conv_grad (None: XLA's own)."""
  if conv_grad not in CONV_GRADS:
    raise ValueError(f'conv_grad={conv_grad!r}; use one of {CONV_GRADS}.')
  return None if conv_grad == 'xla' else subpixel_conv_general_dilated
