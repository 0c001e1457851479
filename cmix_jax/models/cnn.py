"""cnn_small: a small conv net sized for CPU runs on 28x28x1 and 32x32x3 images."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cmix_jax.models import conv as conv_lib

LEAKY_SLOPE = 0.1
BN_MOMENTUM = 0.999  # Flax convention: PyTorch momentum 0.001, as the WRNs
BN_EPS = 1e-3
NORMS = ('batch', 'none')

# kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu'), untruncated, as USB's WRN convs.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# xavier_normal_, untruncated, as USB's WRN classifier.
dense_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


class CNNSmall(nn.Module):
  """[stride-2 conv3x3 -> BN -> leaky ReLU 0.1] per width, global average pool, dense.

  Stride-2 convs downsample instead of max-pools: XLA:CPU's max-pool backward and the 4x
  FLOPs of stride-1 convs made a 32-64-128 max-pool net ~15x slower per training step here.
  norm='none' drops every BN (convs get a bias instead): a stateless model for equivalence tests.
  """

  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  norm: str = 'batch'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_momentum: float = BN_MOMENTUM
  conv_grad: str = 'xla'  # config.model.conv_grad
  conv_precision: str | None = None  # lax precision name of the convs; None = XLA's default
  dense_precision: str | None = None  # lax precision name of the classifier's matmul

  @nn.compact
  def __call__(self, x, train: bool):
    if self.norm not in NORMS:
      raise ValueError(f'CNNSmall norm={self.norm!r}; use one of {NORMS}.')
    if x.ndim != 4:
      raise ValueError(f'CNNSmall expects NHWC images [B, H, W, C], got shape {x.shape}.')
    use_bn = self.norm == 'batch'
    conv = functools.partial(
      nn.Conv,
      kernel_size=(3, 3),
      strides=(2, 2),
      padding=((1, 1), (1, 1)),
      use_bias=not use_bn,
      kernel_init=conv_kernel_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.conv_precision,
      conv_general_dilated=conv_lib.conv_fn(self.conv_grad),
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=BN_EPS,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name,
    )
    for i, width in enumerate(self.widths):
      x = conv(width, name=f'conv{i}')(x)  # [B, ceil(H/2), ceil(W/2), width]
      if use_bn:
        x = norm(name=f'bn{i}')(x)
      x = nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, widths[-1]]
    logits = nn.Dense(
      self.num_classes,
      kernel_init=dense_kernel_init,
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.dense_precision,
      name='classifier',
    )(features)  # [B, num_classes]
    return logits.astype(jnp.float32), features
