"""models/conv.py: the subpixel input gradient equals XLA's; model.precision resolves as documented."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cmix_jax import models
from cmix_jax import steps
from cmix_jax.models import conv
from configs import default

# (kernel, stride, padding, input H x W): every strided conv of the models, odd sizes included.
STRIDED = [
  (3, 2, (1, 1), (28, 28)),  # cnn_small on Fashion-MNIST: 28 -> 14 -> 7 -> 4
  (3, 2, (1, 1), (7, 7)),
  (3, 2, (1, 1), (32, 32)),  # WRN-28-2 groups 2 and 3, cnn_small on CIFAR
  (3, 2, (1, 1), (16, 16)),
  (1, 2, (0, 0), (32, 32)),  # WRN 1x1 shortcuts, ResNet-50 projections
  (1, 2, (0, 0), (7, 9)),
  (7, 2, (3, 3), (15, 17)),  # ResNet-50 stem (odd sides)
  (3, 2, (0, 1), (8, 8)),  # asymmetric padding
  (3, 3, (1, 1), (10, 11)),  # stride 3
  (2, 3, (1, 0), (10, 11)),  # kernel < stride: an untapped phase between tapped ones
]


def _loss(conv_fn, x, kernel):
  return jnp.sum(jnp.sin(conv_fn(x, kernel)))  # a cotangent that is not all ones


@pytest.mark.parametrize('size,stride,pad,hw', STRIDED)
def test_subpixel_gradient_equals_xla_grad(size, stride, pad, hw):
  x = jax.random.normal(jax.random.key(0), (2, *hw, 3))  # [N, H, W, C_in]
  kernel = jax.random.normal(jax.random.key(1), (size, size, 3, 5))  # [kh, kw, C_in, C_out]
  args = ((stride, stride), (pad, pad))
  plain = lambda x, k: lax.conv_general_dilated(x, k, *args, dimension_numbers=conv.NHWC)
  ours = lambda x, k: conv.strided_conv(x, k, *args)
  np.testing.assert_array_equal(ours(x, kernel), plain(x, kernel))  # XLA's own forward
  want_dx, want_dk = jax.grad(_loss, (1, 2))(plain, x, kernel)
  got_dx, got_dk = jax.grad(_loss, (1, 2))(ours, x, kernel)
  assert got_dx.shape == x.shape
  np.testing.assert_allclose(got_dx, want_dx, rtol=1e-5, atol=1e-5 * np.abs(want_dx).max())
  np.testing.assert_array_equal(got_dk, want_dk)  # XLA's own kernel gradient


def test_phase_taps_by_hand():
  # 3x3, stride 2, pad 1: dx[2m] = dy[m] w[1]; dx[2m+1] = dy[m] w[2] + dy[m+1] w[0] (3 = none).
  taps, d_max, first = conv._phase_taps(3, 2, 1)
  assert (d_max, first) == (0, 0) and taps.tolist() == [[1, 3], [2, 0]]
  # 1x1, stride 2: only phase 0 meets a tap; odd rows of dx are zero, not convolved.
  taps, d_max, first = conv._phase_taps(1, 2, 0)
  assert (d_max, first) == (0, 0) and taps.tolist() == [[0]]
  # 2-tap kernel, stride 3, pad 1: phase 0 meets k=1, phase 2 k=0 of the next output, 1 none.
  taps, d_max, first = conv._phase_taps(2, 3, 1)
  assert (d_max, first) == (0, 0) and taps.tolist() == [[1, 2], [2, 2], [2, 0]]


def test_unstrided_or_dilated_convs_keep_xla_gradient():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  for strides, rhs_dilation in (((1, 1), None), ((2, 2), (2, 2))):
    f = lambda x, k, fn: fn(
      x, k, strides, ((1, 1), (1, 1)), rhs_dilation=rhs_dilation, dimension_numbers=conv.NHWC
    )
    jaxpr = jax.make_jaxpr(
      jax.grad(lambda x: f(x, kernel, conv.subpixel_conv_general_dilated).sum())
    )
    assert 'custom_vjp' not in str(jaxpr(x))  # falls through to lax.conv_general_dilated
    want = jax.grad(lambda x: f(x, kernel, lax.conv_general_dilated).sum())(x)
    got = jax.grad(lambda x: f(x, kernel, conv.subpixel_conv_general_dilated).sum())(x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('name,image_shape', [('cnn_small', (12, 12, 1)), ('wrn_28_2', (8, 8, 3))])
def test_model_gradients_equal_under_either_conv_grad(name, image_shape):
  x = jax.random.normal(jax.random.key(2), (4, *image_shape))
  grads, outs = {}, {}
  for conv_grad in models.CONV_GRADS:
    model = models.create_model(name, 10, conv_grad=conv_grad)
    variables = models.init_model(model, jax.random.key(0), image_shape)

    def loss(params):
      (logits, _), _ = model.apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0]), logits

    grads[conv_grad], outs[conv_grad] = jax.grad(loss, has_aux=True)(variables['params'])
  np.testing.assert_array_equal(outs['subpixel'], outs['xla'])  # same forward, bit for bit
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads['xla']))
  for got, want in zip(jax.tree.leaves(grads['subpixel']), jax.tree.leaves(grads['xla'])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)  # float rounding only


def test_precision_settings_by_hand():
  resolve = models.resolve_precision
  assert resolve('auto', 'gpu') == dict(
    setting='auto', resolved='usb', conv='default', matmul='highest'
  )
  assert resolve('auto', 'cpu')['resolved'] == resolve('auto', 'tpu')['resolved'] == 'default'
  assert (resolve('float32', 'cpu')['conv'], resolve('float32', 'cpu')['matmul']) == (
    'highest',
    'highest',
  )
  assert models.lax_precision('default') is None
  assert models.lax_precision('highest') == lax.Precision.HIGHEST
  with pytest.raises(ValueError, match='tf32'):
    resolve('tf32', 'gpu')


def test_default_config_keeps_todays_model_on_cpu():
  # The default conv_grad and precision build the same modules as before the fields existed.
  config = default.get_config()
  model = steps.create_model(config, 10)
  assert (model.conv_grad, model.conv_precision, model.dense_precision) == ('xla', None, None)
  assert steps.model_precision(config)['resolved'] == (
    'usb' if jax.default_backend() == 'gpu' else 'default'
  )
