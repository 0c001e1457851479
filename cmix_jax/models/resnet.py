"""ResNet-50 v1.5 (stride on the 3x3 conv) for ImageNet-scale runs, as torchvision / USB.

Same layout as flax examples/imagenet; initialisers and BN settings follow USB's
semilearn/nets/resnet/resnet.py (torchvision): BN momentum 0.1 (Flax 0.9), eps 1e-5,
kaiming-normal fan-out convs, PyTorch-default classifier init, no zero-init of the last BN
unless zero_init_residual.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cmix_jax.models import conv as conv_lib
from cmix_jax.models.wrn import batch_norm
from cmix_jax.models.wrn import conv_no_bias
from cmix_jax.models.wrn import torch_default_bias_init

BN_MOMENTUM = 0.9  # Flax convention = PyTorch momentum 0.1
BN_EPS = 1e-5

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): std sqrt(2 / fan_out), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# nn.Linear's default weight init (kaiming_uniform_, a=sqrt(5)): U(+-1/sqrt(fan_in)).
dense_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (stride) -> 1x1 (4x width) with BN, ReLU; projection shortcut on shape change."""

  width: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  zero_init_residual: bool = False
  bn_momentum: float = BN_MOMENTUM
  conv_grad: str = 'xla'  # config.model.conv_grad
  conv_precision: str | None = None  # lax precision name of the convs; None = XLA's default

  @nn.compact
  def __call__(self, x, train: bool):
    conv = conv_no_bias(self.dtype, self.conv_grad, self.conv_precision)
    norm = batch_norm(train, self.bn_momentum, BN_EPS, self.dtype, self.bn_axis_name)
    out_channels = 4 * self.width
    y = nn.relu(norm(name='bn1')(conv(self.width, (1, 1), name='conv1')(x)))
    y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))  # [B, H/s, W/s, width]
    y = conv(out_channels, (1, 1), name='conv3')(y)
    last_scale_init = nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones
    y = norm(scale_init=last_scale_init, name='bn3')(y)  # [B, H/s, W/s, 4 * width]
    if self.stride != 1 or x.shape[-1] != out_channels:
      x = conv(out_channels, (1, 1), strides=self.stride, padding='VALID', name='proj_conv')(x)
      x = norm(name='proj_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """Bottleneck ResNet; stage_sizes (3, 4, 6, 3) is ResNet-50.

  Returns (logits [B, num_classes] float32, pooled features [B, 2048] float32).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  zero_init_residual: bool = False
  bn_momentum: float = BN_MOMENTUM
  conv_grad: str = 'xla'  # config.model.conv_grad
  conv_precision: str | None = None  # lax precision name of the convs; None = XLA's default
  dense_precision: str | None = None  # lax precision name of the classifier's matmul

  @nn.compact
  def __call__(self, x, train: bool):
    if x.ndim != 4:
      raise ValueError(f'ResNet expects NHWC images [B, H, W, C], got shape {x.shape}.')
    x = nn.Conv(
      64,
      (7, 7),
      strides=2,
      padding=((3, 3), (3, 3)),
      use_bias=False,
      kernel_init=conv_kernel_init,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.conv_precision,
      conv_general_dilated=conv_lib.conv_fn(self.conv_grad),
      name='conv_stem',
    )(x)  # [B, H/2, W/2, 64]
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=BN_EPS,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name,
      name='bn_stem',
    )(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # [B, H/4, W/4, 64]
    for stage, num_blocks in enumerate(self.stage_sizes):
      for i in range(num_blocks):
        x = Bottleneck(
          64 * 2**stage,
          stride=2 if stage > 0 and i == 0 else 1,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          zero_init_residual=self.zero_init_residual,
          bn_momentum=self.bn_momentum,
          conv_grad=self.conv_grad,
          conv_precision=self.conv_precision,
          name=f'stage{stage + 1}_block{i}',
        )(x, train)
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]
    logits = nn.Dense(
      self.num_classes,
      kernel_init=dense_kernel_init,
      bias_init=torch_default_bias_init(features.shape[-1]),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.dense_precision,
      name='classifier',
    )(features)  # [B, num_classes]
    return logits.astype(jnp.float32), features


def resnet50(num_classes: int, **kwargs) -> ResNet:
  """USB's resnet50 (torchvision layout, v1.5)."""
  return ResNet(num_classes, stage_sizes=(3, 4, 6, 3), **kwargs)
