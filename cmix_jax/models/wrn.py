"""Wide ResNets as USB builds them (semilearn/nets/wrn/wrn.py and wrn_var.py).

WRN-28-2 (CIFAR-10, SVHN), WRN-28-8 (CIFAR-100) and USB's WRN-var-37-2 (STL-10, 96x96).
Layout, initialisers, BN settings and the first group's activate_before_residual follow
USB's current code (block convs without bias, block BN eps 1e-5, final BN eps 1e-3),
quirks included (see WideBasicBlock). An older USB revision used eps 1e-3 in every BN,
biased block convs and no activate_before_residual; block_bn_eps=1e-3 gives its BN setting.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cmix_jax.models import conv as conv_lib

LEAKY_SLOPE = 0.1
BN_MOMENTUM = 0.999  # Flax convention (decay of the running average) = PyTorch momentum 0.001
BLOCK_BN_EPS = 1e-5  # USB's blocks leave nn.BatchNorm2d's eps at its default
FINAL_BN_EPS = 1e-3  # USB's last BN before pooling sets eps=0.001

# kaiming_normal_(mode='fan_out', nonlinearity='leaky_relu', a=0): std sqrt(2 / fan_out).
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# xavier_normal_: std sqrt(2 / (fan_in + fan_out)); USB zeroes the classifier bias.
dense_kernel_init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'normal')


def torch_default_bias_init(fan_in: int):
  """PyTorch's default conv/linear bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (USB keeps it)."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def conv_no_bias(dtype, conv_grad: str = 'xla', precision=None):
  """nn.Conv without bias, kaiming fan-out init, float32 params computing in `dtype`."""
  return functools.partial(
    nn.Conv,
    use_bias=False,
    kernel_init=conv_kernel_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    precision=precision,
    conv_general_dilated=conv_lib.conv_fn(conv_grad),
  )


def batch_norm(train: bool, momentum: float, eps: float, dtype, axis_name: str | None):
  """nn.BatchNorm with batch statistics when training (averaged over `axis_name`)."""
  return functools.partial(
    nn.BatchNorm,
    use_running_average=not train,
    momentum=momentum,
    epsilon=eps,
    dtype=dtype,
    param_dtype=jnp.float32,
    axis_name=axis_name,
  )


class WideBasicBlock(nn.Module):
  """USB's pre-activation basic block: BN-act-conv3x3-BN-act-conv3x3 plus a shortcut.

  When the channel count changes, a 1x1 conv (stride as the block) is the shortcut and the
  block input x feeds both paths: BN-activated when activate_before_residual (USB's first
  group), raw otherwise. In the raw case bn1 still runs, so its running statistics update as
  in PyTorch, but its output is unused and its scale/shift get no gradient (USB's quirk).
  """

  out_channels: int
  stride: int
  activate_before_residual: bool
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_eps: float = BLOCK_BN_EPS
  bn_momentum: float = BN_MOMENTUM
  conv_grad: str = 'xla'  # config.model.conv_grad
  conv_precision: str | None = None  # lax precision name of the convs; None = XLA's default

  @nn.compact
  def __call__(self, x, train: bool):
    conv = conv_no_bias(self.dtype, self.conv_grad, self.conv_precision)
    norm = batch_norm(train, self.bn_momentum, self.bn_eps, self.dtype, self.bn_axis_name)
    act = functools.partial(nn.leaky_relu, negative_slope=LEAKY_SLOPE)
    equal_in_out = x.shape[-1] == self.out_channels
    if equal_in_out and self.stride != 1:
      raise ValueError(
        'WideBasicBlock: a stride-2 block must change the channel count '
        '(as in USB, the identity shortcut cannot downsample).'
      )
    pre = act(norm(name='bn1')(x))  # [B, H, W, C_in]
    if equal_in_out:
      branch_in, shortcut = pre, x
    else:
      branch_in = pre if self.activate_before_residual else x
      shortcut = conv(
        self.out_channels, (1, 1), strides=self.stride, padding='VALID', name='shortcut'
      )(branch_in)  # [B, H/s, W/s, C_out]
    y = conv(
      self.out_channels, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)), name='conv1'
    )(branch_in)  # [B, H/s, W/s, C_out]
    y = act(norm(name='bn2')(y))
    y = conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), name='conv2')(y)
    return shortcut + y


class WideResNet(nn.Module):
  """USB's WideResNet (num_groups=3) and WideResNetVar (num_groups=4, the STL-10 net).

  Returns (logits [B, num_classes] float32, pooled features [B, 16 * 2**(G-1) * widen] float32).
  """

  num_classes: int
  depth: int = 28
  widen_factor: int = 2
  first_stride: int = 1
  num_groups: int = 3
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  block_bn_eps: float = BLOCK_BN_EPS
  bn_momentum: float = BN_MOMENTUM  # Flax decay: the running stats need ~3/(1-m) steps
  conv_grad: str = 'xla'  # config.model.conv_grad
  conv_precision: str | None = None  # lax precision name of the convs; None = XLA's default
  dense_precision: str | None = None  # lax precision name of the classifier's matmul

  @nn.compact
  def __call__(self, x, train: bool):
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f'WideResNet depth={self.depth}: depth must be 6n + 4 (e.g. 28).')
    if x.ndim != 4:
      raise ValueError(f'WideResNet expects NHWC images [B, H, W, C], got shape {x.shape}.')
    blocks_per_group = (self.depth - 4) // 6
    x = nn.Conv(
      16,
      (3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=True,
      kernel_init=conv_kernel_init,
      bias_init=torch_default_bias_init(9 * x.shape[-1]),
      dtype=self.dtype,
      param_dtype=jnp.float32,
      precision=self.conv_precision,
      conv_general_dilated=conv_lib.conv_fn(self.conv_grad),
      name='conv_stem',
    )(x)  # [B, H, W, 16]
    for group in range(self.num_groups):
      channels = 16 * 2**group * self.widen_factor
      for i in range(blocks_per_group):
        stride = (self.first_stride if group == 0 else 2) if i == 0 else 1
        x = WideBasicBlock(
          channels,
          stride,
          activate_before_residual=group == 0,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          bn_eps=self.block_bn_eps,
          bn_momentum=self.bn_momentum,
          conv_grad=self.conv_grad,
          conv_precision=self.conv_precision,
          name=f'group{group + 1}_block{i}',
        )(x, train)
    x = nn.BatchNorm(
      use_running_average=not train,
      momentum=self.bn_momentum,
      epsilon=FINAL_BN_EPS,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      axis_name=self.bn_axis_name,
      name='bn_final',
    )(x)
    x = nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)  # [B, h, w, D]
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, D]
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


def wrn_28_2(num_classes: int, **kwargs) -> WideResNet:
  """USB's wrn_28_2: CIFAR-10 / SVHN."""
  return WideResNet(num_classes, depth=28, widen_factor=2, first_stride=1, num_groups=3, **kwargs)


def wrn_28_8(num_classes: int, **kwargs) -> WideResNet:
  """USB's wrn_28_8: CIFAR-100."""
  return WideResNet(num_classes, depth=28, widen_factor=8, first_stride=1, num_groups=3, **kwargs)


def wrn_37_2(num_classes: int, **kwargs) -> WideResNet:
  """USB's wrn_var_37_2 (STL-10, 96x96): depth-28 blocks in 4 groups, first group stride 2."""
  return WideResNet(num_classes, depth=28, widen_factor=2, first_stride=2, num_groups=4, **kwargs)
