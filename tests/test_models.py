"""models: USB parameter counts, shapes, dtypes, BN momentum, cross-replica BN, USB WRN quirks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cmix_jax import models
from cmix_jax import steps
from cmix_jax.models.resnet import Bottleneck, ResNet
from cmix_jax.models.wrn import WideBasicBlock, WideResNet
from configs import default


def _init_key(seed=0):
  """RBG keys: model inits compile ~3x faster than with threefry on this CPU."""
  return jax.random.key(seed, impl='rbg')


def _abstract_variables(model, image_shape):
  """Variable shapes without running init (fast even for ResNet-50)."""
  return jax.eval_shape(
    functools.partial(model.init, train=False),
    jax.random.key(0),
    jnp.zeros((2,) + tuple(image_shape), jnp.float32),
  )


def _usb_wrn_param_count(depth, widen, num_groups, num_classes, in_channels=3):
  """Hand count of USB's WideResNet / WideResNetVar: stem conv with bias, bias-free block convs,
  two BNs per block (scale + shift), 1x1 shortcut on channel change, final BN, linear head."""
  n = (depth - 4) // 6
  total = 9 * in_channels * 16 + 16  # stem conv3x3 + bias
  c_in = 16
  for g in range(num_groups):
    c = 16 * 2**g * widen
    for i in range(n):
      cin = c_in if i == 0 else c
      total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c  # bn1, conv1, bn2, conv2
      total += cin * c if cin != c else 0  # shortcut
    c_in = c
  return total + 2 * c_in + c_in * num_classes + num_classes  # final BN, classifier


@pytest.mark.parametrize(
  'name,num_classes,image_shape,expected,approx_millions',
  [
    ('wrn_28_2', 10, (32, 32, 3), 1_467_626, 1.47),
    ('wrn_28_8', 100, (32, 32, 3), 23_401_028, 23.4),
    ('wrn_37_2', 10, (96, 96, 3), 5_929_450, 5.93),
    ('resnet50', 1000, (224, 224, 3), 25_557_032, 25.56),
    ('cnn_small', 10, (28, 28, 1), 24_058, None),
    ('cnn_small_nobn', 10, (28, 28, 1), 23_946, None),
  ],
)
def test_param_counts(name, num_classes, image_shape, expected, approx_millions):
  variables = _abstract_variables(models.create_model(name, num_classes), image_shape)
  count = models.param_count(variables['params'])
  assert count == expected
  if approx_millions is not None:
    assert round(count / 1e6, 2) == approx_millions
  if name.startswith('wrn'):
    depth, widen, groups = {'wrn_28_2': (28, 2, 3), 'wrn_28_8': (28, 8, 3), 'wrn_37_2': (28, 2, 4)}[
      name
    ]
    assert count == _usb_wrn_param_count(depth, widen, groups, num_classes)


def test_wrn_28_2_without_stem_bias_is_the_torchssl_figure():
  """USB's stem conv has a bias (+16); without it the count is FixMatch/TorchSSL's 1,467,610."""
  assert _usb_wrn_param_count(28, 2, 3, 10) - 16 == 1_467_610


@pytest.mark.parametrize(
  'name,num_classes,image_shape,feature_dim',
  [
    ('cnn_small', 10, (28, 28, 1), 64),
    ('cnn_small_nobn', 7, (28, 28, 1), 64),
    ('wrn_28_2', 10, (32, 32, 3), 128),
  ],
)
def test_output_shapes_concrete(name, num_classes, image_shape, feature_dim):
  model = models.create_model(name, num_classes)
  variables = models.init_model(model, _init_key(), image_shape)
  x = jax.random.normal(jax.random.key(1), (3,) + image_shape)  # [3, H, W, C]

  @jax.jit
  def train_and_eval(variables, x):
    train_out, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return train_out, model.apply(variables, x, train=False)

  outputs = train_and_eval(variables, x)
  for logits, features in outputs:
    assert logits.shape == (3, num_classes) and logits.dtype == jnp.float32
    assert features.shape == (3, feature_dim) and features.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  if name == 'cnn_small_nobn':  # stateless: no batch_stats, train flag irrelevant
    assert set(variables) == {'params'} and not any('bn' in k for k in variables['params'])
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
  else:
    assert set(variables) == {'params', 'batch_stats'}


@pytest.mark.parametrize(
  'name,num_classes,image_shape,feature_dim',
  [
    ('cnn_small', 10, (32, 32, 3), 64),
    ('wrn_28_8', 100, (32, 32, 3), 512),
    ('wrn_37_2', 10, (96, 96, 3), 256),
    ('resnet50', 1000, (224, 224, 3), 2048),
  ],
)
def test_output_shapes_abstract(name, num_classes, image_shape, feature_dim):
  model = models.create_model(name, num_classes)
  variables = _abstract_variables(model, image_shape)
  logits, features = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, jnp.zeros((3,) + image_shape)
  )
  assert logits.shape == (3, num_classes) and features.shape == (3, feature_dim)


@pytest.mark.parametrize(
  'name,image_shape,module_prefix,sizes',
  [
    ('wrn_28_2', (32, 32, 3), 'group', (32, 16, 8)),
    ('wrn_37_2', (96, 96, 3), 'group', (48, 24, 12, 6)),  # USB's WRN-var: first group stride 2
    ('resnet50', (224, 224, 3), 'stage', (56, 28, 14, 7)),
    ('cnn_small', (28, 28, 1), 'conv', (14, 7, 4)),  # PyTorch-style symmetric padding 1
  ],
)
def test_feature_map_sizes(name, image_shape, module_prefix, sizes):
  model = models.create_model(name, 10)
  variables = _abstract_variables(model, image_shape)
  _, state = jax.eval_shape(
    functools.partial(
      model.apply, train=False, capture_intermediates=True, mutable=['intermediates']
    ),
    variables,
    jnp.zeros((1,) + image_shape),
  )
  inter = state['intermediates']
  groups = sorted(k for k in inter if k.startswith(module_prefix))
  last_block = lambda g: sorted(k for k in groups if k.split('_')[0] == g)[-1]
  group_names = sorted({k.split('_')[0] for k in groups})
  got = tuple(inter[last_block(g)]['__call__'][0].shape[1] for g in group_names)
  assert got == sizes


@pytest.mark.parametrize(
  'name,image_shape',
  [
    ('cnn_small', (28, 28, 1)),
    ('wrn_28_8', (32, 32, 3)),
    ('wrn_37_2', (96, 96, 3)),
    ('resnet50', (64, 64, 3)),
  ],
)
def test_bf16_params_stay_float32_and_logits_float32(name, image_shape):
  model = models.create_model(name, 10, dtype='bfloat16')
  variables = _abstract_variables(model, image_shape)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, features = jax.eval_shape(
    functools.partial(model.apply, train=False), variables, jnp.zeros((2,) + image_shape)
  )
  assert logits.dtype == jnp.float32 and features.dtype == jnp.float32


@pytest.mark.parametrize(
  'name,image_shape', [('cnn_small', (28, 28, 1)), ('wrn_28_2', (16, 16, 3))]
)
def test_bf16_computes_in_bf16(name, image_shape):
  """Every conv and BN output inside the net is bf16; only the returned arrays are float32."""
  model = models.create_model(name, 10, dtype=jnp.bfloat16)
  variables = _abstract_variables(model, image_shape)
  _, state = jax.eval_shape(
    functools.partial(
      model.apply, train=True, capture_intermediates=True, mutable=['intermediates', 'batch_stats']
    ),
    variables,
    jnp.zeros((2,) + image_shape, jnp.float32),
  )
  layer_outputs = {
    jax.tree_util.keystr(path): leaf.dtype
    for path, leaf in jax.tree_util.tree_leaves_with_path(state['intermediates'])
    if str(path[-3].key).startswith(('conv', 'bn', 'shortcut'))
  }
  assert len(layer_outputs) >= 6
  assert set(layer_outputs.values()) == {jnp.dtype(jnp.bfloat16)}, layer_outputs


@pytest.mark.parametrize('bn_momentum', [None, 0.9])
def test_batch_stats_momentum(bn_momentum):
  """new = m * old + (1 - m) * batch stat; m = 0.999 by default, else config.model.bn_momentum."""
  config = default.get_config()
  config.model.bn_momentum = bn_momentum
  model = steps.create_model(config, 10)
  m = 0.999 if bn_momentum is None else bn_momentum
  variables = models.init_model(model, _init_key(), (8, 8, 1))
  k_mean, k_var, k_x = jax.random.split(jax.random.key(1), 3)
  old = {
    'mean': jax.random.normal(k_mean, (16,)),
    'var': jax.random.uniform(k_var, (16,), minval=0.5, maxval=2.0),
  }
  batch_stats = dict(variables['batch_stats'], bn0=old)
  x = jax.random.normal(k_x, (5, 8, 8, 1))  # [5, 8, 8, 1]
  _, mutated = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))(
    {'params': variables['params'], 'batch_stats': batch_stats}, x
  )
  conv0 = variables['params']['conv0']['kernel']  # [3, 3, 1, 16]
  z = jax.lax.conv_general_dilated(
    x, conv0, (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )  # [5, 4, 4, 16]
  new = mutated['batch_stats']['bn0']
  np.testing.assert_allclose(
    new['mean'], m * old['mean'] + (1 - m) * z.mean((0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    new['var'], m * old['var'] + (1 - m) * z.var((0, 1, 2)), rtol=1e-5, atol=1e-6
  )
  assert not np.allclose(new['mean'], old['mean'], rtol=0, atol=1e-7)


def test_leaky_relu_slope_by_hand():
  """One-conv CNN without BN, recomputed with slope 0.1 by hand."""
  model = models.create_model('cnn_small_nobn', 3, widths=(4,))
  variables = models.init_model(model, _init_key(), (6, 6, 2))
  p = jax.tree.map(np.asarray, variables['params'])
  p['conv0']['bias'] = np.linspace(-1.0, 1.0, 4, dtype=np.float32)  # both signs reach the act
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 2))
  logits, features = model.apply({'params': p}, x, train=False)
  z = (
    jax.lax.conv_general_dilated(
      x, p['conv0']['kernel'], (2, 2), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )
    + p['conv0']['bias']
  )
  assert np.any(z < 0) and np.any(z > 0)
  expected_features = np.where(z > 0, z, 0.1 * z).mean((1, 2))  # [2, 4]
  np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
    logits,
    expected_features @ p['classifier']['kernel'] + p['classifier']['bias'],
    rtol=1e-5,
    atol=1e-6,
  )


@pytest.fixture(scope='module')
def small_wrn():
  """USB WRN layout with one block per group (depth 10), widen 2: every first block changes
  channels, so it has group 1's activated input and groups 2-3's raw input."""
  model = WideResNet(10, depth=10, widen_factor=2)
  return model, models.init_model(model, _init_key(), (8, 8, 3))


def test_wrn_activate_before_residual_dead_bn_and_final_leaky_relu(small_wrn):
  """USB: group 1's first block feeds BN-activated input to conv + shortcut; later groups' first
  blocks feed the raw input, so their bn1 updates running stats but gets no gradient.
  Features are the pooled leaky-ReLU(0.1) of the final BN output."""
  model, variables = small_wrn
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  y = jnp.arange(4)

  def loss(params):
    (logits, features), mutated = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      x,
      train=True,
      capture_intermediates=lambda mdl, _: mdl.name == 'bn_final',
      mutable=['batch_stats', 'intermediates'],
    )
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (features, mutated)

  grads, (features, mutated) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  live = grads['group1_block0']['bn1']
  assert np.abs(live['scale']).sum() > 0 and np.abs(live['bias']).sum() > 0
  for group in ('group2_block0', 'group3_block0'):
    dead = grads[group]['bn1']
    assert np.all(dead['scale'] == 0) and np.all(dead['bias'] == 0)
    stats = mutated['batch_stats'][group]['bn1']
    assert not np.allclose(stats['mean'], variables['batch_stats'][group]['bn1']['mean'])
  z = mutated['intermediates']['bn_final']['__call__'][0]  # [4, 2, 2, 128]
  assert np.any(z < 0)
  np.testing.assert_allclose(
    features, np.where(z > 0, z, 0.1 * z).mean((1, 2)), rtol=1e-5, atol=1e-6
  )


def test_wrn_init_matches_usb(small_wrn):
  """Kaiming-normal fan-out convs (untruncated), xavier-normal classifier, zero bias, BN 1/0."""
  params = small_wrn[1]['params']
  kernel = np.asarray(params['group3_block0']['conv2']['kernel'])  # [3, 3, 128, 128]
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (9 * 128)), rtol=0.02)
  assert np.abs(kernel).max() > 3.5 * kernel.std()  # not a 2-sigma truncated normal
  head = np.asarray(params['classifier']['kernel'])  # [128, 10]
  np.testing.assert_allclose(head.std(), np.sqrt(2.0 / (128 + 10)), rtol=0.1)
  np.testing.assert_array_equal(params['classifier']['bias'], 0.0)
  bn = params['group2_block0']['bn2']
  np.testing.assert_array_equal(bn['scale'], 1.0)
  np.testing.assert_array_equal(bn['bias'], 0.0)
  stem_bias = np.asarray(params['conv_stem']['bias'])
  assert np.all(np.abs(stem_bias) <= 1 / np.sqrt(27)) and np.any(stem_bias != 0)


def _conv(x, kernel, stride, padding):
  """PyTorch-style conv: symmetric explicit padding."""
  return jax.lax.conv_general_dilated(
    x, kernel, (stride, stride), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
  )


@pytest.mark.parametrize(
  'out_channels,stride,activate_before_residual', [(8, 2, True), (8, 2, False), (4, 1, False)]
)
def test_wide_basic_block_by_hand(out_channels, stride, activate_before_residual):
  """Eval mode with fresh BN (mean 0, var 1, scale 1, shift 0): BN(x) = x / sqrt(1 + 1e-5)."""
  block = WideBasicBlock(out_channels, stride, activate_before_residual)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 4))  # [2, 6, 6, 4]
  variables = jax.jit(functools.partial(block.init, train=False))(_init_key(), x)
  out = jax.jit(functools.partial(block.apply, train=False))(variables, x)
  p = variables['params']
  bn = lambda z: z / np.sqrt(1 + 1e-5)
  act = lambda z: np.where(z > 0, z, 0.1 * z)
  pre = act(bn(x))
  branch_in = pre if (activate_before_residual or out_channels == 4) else x
  y = act(bn(_conv(branch_in, p['conv1']['kernel'], stride, ((1, 1), (1, 1)))))
  y = _conv(y, p['conv2']['kernel'], 1, ((1, 1), (1, 1)))
  if out_channels == 4:
    assert 'shortcut' not in p
    shortcut = x
  else:
    shortcut = _conv(branch_in, p['shortcut']['kernel'], stride, 'VALID')
  np.testing.assert_allclose(out, shortcut + y, rtol=1e-5, atol=1e-5)


def test_bottleneck_v15_by_hand():
  """ResNet v1.5: the stride sits on the 3x3 conv; projection 1x1 conv + BN on the shortcut."""
  block = Bottleneck(4, stride=2)
  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))  # [2, 6, 6, 8]
  variables = jax.jit(functools.partial(block.init, train=False))(_init_key(), x)
  out = jax.jit(functools.partial(block.apply, train=False))(variables, x)
  p = variables['params']
  bn = lambda z: z / np.sqrt(1 + 1e-5)
  relu = lambda z: np.maximum(z, 0)
  y = relu(bn(_conv(x, p['conv1']['kernel'], 1, 'VALID')))
  y = relu(bn(_conv(y, p['conv2']['kernel'], 2, ((1, 1), (1, 1)))))
  y = bn(_conv(y, p['conv3']['kernel'], 1, 'VALID'))  # [2, 3, 3, 16]
  shortcut = bn(_conv(x, p['proj_conv']['kernel'], 2, 'VALID'))
  np.testing.assert_allclose(out, relu(shortcut + y), rtol=1e-5, atol=1e-5)


def _tiny(kind):
  if kind == 'cnn_small':
    return lambda axis: models.create_model('cnn_small', 3, bn_axis_name=axis), (8, 8, 1)
  if kind == 'wrn':
    return lambda axis: WideResNet(3, depth=10, widen_factor=1, bn_axis_name=axis), (8, 8, 3)
  return lambda axis: ResNet(3, stage_sizes=(1, 1), bn_axis_name=axis), (16, 16, 3)


@pytest.mark.parametrize('kind', ['cnn_small', 'wrn', 'resnet'])
def test_cross_replica_bn_under_pmap_matches_one_device(kind):
  """bn_axis_name='batch' on 2 devices gives the batch_stats of 1 device on the full batch."""
  make, image_shape = _tiny(kind)
  variables = models.init_model(make(None), _init_key(), image_shape)
  x = jax.random.normal(jax.random.key(1), (8,) + image_shape)  # [8, H, W, C]

  def step(model, variables, x):
    (logits, _), mutated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return logits, mutated['batch_stats']

  ref_logits, ref_stats = jax.jit(functools.partial(step, make(None)))(variables, x)
  devices = jax.devices()[:2]
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), variables)
  logits, stats = jax.pmap(
    functools.partial(step, make('batch')), axis_name='batch', devices=devices
  )(stacked, x.reshape((2, 4) + image_shape))
  np.testing.assert_allclose(logits.reshape(ref_logits.shape), ref_logits, rtol=1e-4, atol=1e-4)
  for replica in range(2):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[replica], b, rtol=1e-4, atol=1e-5), stats, ref_stats
    )
  if kind != 'cnn_small':
    return
  # Without the axis name each device would normalise with its own half-batch statistics.
  _, local_stats = jax.pmap(functools.partial(step, make(None)), devices=devices)(
    stacked, x.reshape((2, 4) + image_shape)
  )
  assert not all(
    jax.tree.leaves(
      jax.tree.map(lambda a, b: np.allclose(a[0], b, rtol=1e-4, atol=1e-5), local_stats, ref_stats)
    )
  )


def test_registry_names_and_errors():
  assert models.MODEL_NAMES == (
    'cnn_small',
    'cnn_small_nobn',
    'wrn_28_2',
    'wrn_28_8',
    'wrn_37_2',
    'resnet50',
  )
  with pytest.raises(ValueError, match='valid names: cnn_small, cnn_small_nobn'):
    models.create_model('wrn_28_10', 10)
  with pytest.raises(ValueError, match='dtype'):
    models.create_model('cnn_small', 10, dtype='int8')
  with pytest.raises(ValueError, match='dtype'):
    models.create_model('cnn_small', 10, dtype='bf16')
  with pytest.raises(ValueError, match='num_classes'):
    models.create_model('cnn_small', 0)
  with pytest.raises(ValueError, match='keyword'):
    models.create_model('wrn_28_2', 10, widthz=3)
  with pytest.raises(ValueError, match='image_shape'):
    models.init_model(models.create_model('cnn_small', 10), _init_key(), (28, 28))
  with pytest.raises(ValueError, match="norm='group'"):
    models.init_model(models.create_model('cnn_small', 10, norm='group'), _init_key(), (8, 8, 1))
  with pytest.raises(ValueError, match='NHWC'):
    models.create_model('wrn_28_2', 10).init(jax.random.key(0), jnp.zeros((2, 32, 32)), train=False)
  with pytest.raises(ValueError, match='6n \\+ 4'):
    models.init_model(WideResNet(10, depth=27), _init_key(), (8, 8, 3))
  assert models.create_model('cnn_small', 10, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert models.create_model('wrn_28_2', 10, bn_axis_name='batch').bn_axis_name == 'batch'
