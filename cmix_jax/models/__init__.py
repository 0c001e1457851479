"""Model registry: every network maps (x [B, H, W, C] f32, train) to (logits f32, features f32).

Parameters are float32; `dtype` is the compute dtype (bfloat16 for mixed precision). BN running
statistics live in the 'batch_stats' collection; `bn_axis_name` makes BN cross-replica.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cmix_jax.models.cnn import CNNSmall
from cmix_jax.models.conv import (
  CONV_GRADS,
  PRECISION_SETTINGS,
  PRECISIONS,
  lax_precision,
  resolve_precision,
)
from cmix_jax.models.resnet import ResNet, resnet50
from cmix_jax.models.wrn import WideResNet, wrn_28_2, wrn_28_8, wrn_37_2

__all__ = [
  'CONV_GRADS',
  'PRECISIONS',
  'PRECISION_SETTINGS',
  'CNNSmall',
  'MODEL_NAMES',
  'TRAIN_DTYPES',
  'ResNet',
  'WideResNet',
  'create_model',
  'init_model',
  'lax_precision',
  'param_count',
  'resolve_precision',
]

_BUILDERS = {
  'cnn_small': CNNSmall,
  'cnn_small_nobn': functools.partial(CNNSmall, norm='none'),
  'wrn_28_2': wrn_28_2,
  'wrn_28_8': wrn_28_8,
  'wrn_37_2': wrn_37_2,
  'resnet50': resnet50,
}
MODEL_NAMES = tuple(_BUILDERS)
# config.model.dtype: what training computes in (float16 would need loss scaling, which the
# step does not do); evaluation may compute in float16 too.
TRAIN_DTYPES = ('float32', 'bfloat16')
COMPUTE_DTYPES = (*TRAIN_DTYPES, 'float16')


def _compute_dtype(dtype) -> Any:
  """'bfloat16' / jnp.bfloat16 / ... -> the jnp dtype, or ValueError for non-float dtypes."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(f'Unknown model dtype {dtype!r}; use one of {COMPUTE_DTYPES}.') from e
  if name not in COMPUTE_DTYPES:
    raise ValueError(f'Unsupported model dtype {name!r}; use one of {COMPUTE_DTYPES}.')
  return jnp.dtype(name).type


def create_model(
  name: str, num_classes: int, *, dtype='float32', bn_axis_name: str | None = None, **kwargs
) -> nn.Module:
  """Builds a registered network; kwargs go to the module (e.g. widths for cnn_small)."""
  if name not in _BUILDERS:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}.')
  if (
    isinstance(num_classes, bool)
    or not isinstance(num_classes, (int, np.integer))
    or num_classes < 1
  ):
    raise ValueError(f'num_classes must be a positive int, got {num_classes!r}.')
  try:
    return _BUILDERS[name](
      int(num_classes), dtype=_compute_dtype(dtype), bn_axis_name=bn_axis_name, **kwargs
    )
  except TypeError as e:
    raise ValueError(f'Bad keyword arguments {sorted(kwargs)} for model {name!r}: {e}') from e


def param_count(params) -> int:
  """Total number of scalars in a parameter pytree (arrays or jax.ShapeDtypeStruct leaves)."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def init_model(model: nn.Module, key: jax.Array, image_shape: Sequence[int]) -> dict:
  """Variables ({'params', ['batch_stats']}) from a jitted init on 2 zero images, train=False."""
  image_shape = tuple(image_shape)
  if len(image_shape) != 3 or not all(
    isinstance(d, (int, np.integer)) and d > 0 for d in image_shape
  ):
    raise ValueError(f'image_shape must be (H, W, C) with positive ints, got {image_shape!r}.')
  images = jnp.zeros((2,) + image_shape, jnp.float32)  # [2, H, W, C]
  return jax.jit(functools.partial(model.init, train=False))(key, images)
