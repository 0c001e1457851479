"""Tests for cmix_jax.data.augment: PIL-equivalent ops on tiny images, random views, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from cmix_jax.data import augment


def _pil(img_uint8):
  """[H, W, C] uint8 -> PIL image ('L' for C = 1)."""
  img = np.asarray(img_uint8, np.uint8)
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _np(pil_image, channels):
  """PIL image -> [H, W, C] float32."""
  out = np.asarray(pil_image, np.float32)
  return out[..., None] if channels == 1 else out


def _random_image(seed, shape=(8, 9, 3), low=0, high=256):
  return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


def _pil_affine(img, coeffs, bilinear=False):
  pil = _pil(img)
  resample = Image.BILINEAR if bilinear else Image.NEAREST
  return _np(pil.transform(pil.size, Image.AFFINE, coeffs, resample), img.shape[-1])


# ---------------------------------------------------------------- identity magnitudes


@pytest.mark.parametrize('channels', [1, 3])
def test_identity_magnitudes_leave_the_image_unchanged(channels):
  img = _random_image(0, (8, 8, channels))
  expected = img.astype(np.float32)
  for name, out in [
    ('identity', augment.identity(img)),
    ('brightness', augment.brightness(img, 1.0)),
    ('color', augment.color(img, 1.0)),
    ('contrast', augment.contrast(img, 1.0)),
    ('sharpness', augment.sharpness(img, 1.0)),
    ('rotate', augment.rotate(img, 0.0)),
    ('rotate360', augment.rotate(img, 360.0)),
    ('shear_x', augment.shear_x(img, 0.0)),
    ('shear_y', augment.shear_y(img, 0.0)),
    ('translate_x', augment.translate_x(img, 0.0)),
    ('translate_y', augment.translate_y(img, 0.0)),
    ('posterize', augment.posterize(img, 8)),
    ('solarize', augment.solarize(img, 256)),
    ('cutout', augment.cutout(img, (4.0, 4.0), 0.0, 0.0)),
  ]:
    assert out.dtype == jnp.float32, name
    np.testing.assert_array_equal(out, expected, err_msg=name)


# ---------------------------------------------------------------- hand-computed LUT ops


def test_solarize_inverts_exactly_the_pixels_at_or_above_threshold():
  img = np.array([[[0], [99]], [[100], [255]]], np.uint8)
  out = augment.solarize(img, 100)
  np.testing.assert_array_equal(out[..., 0], [[0, 99], [155, 0]])
  np.testing.assert_array_equal(augment.solarize(img, 0.0)[..., 0], [[255, 156], [155, 0]])


def test_posterize_keeps_the_top_bits():
  img = np.array([[[183, 255, 7]]], np.uint8)  # 0b10110111, 0b11111111, 0b00000111
  np.testing.assert_array_equal(augment.posterize(img, 3), [[[160, 224, 0]]])
  np.testing.assert_array_equal(augment.posterize(img, 1), [[[128, 128, 0]]])
  # USB passes int(U[4, 8)): a fractional bit count is truncated, like int(v).
  np.testing.assert_array_equal(augment.posterize(img, 4.9), augment.posterize(img, 4))


def test_equalize_matches_pil_on_a_known_histogram():
  # 900 pixels: levels 10/50/100/200 with counts 180/270/90/360. By hand (PIL's rule):
  # step = (900 - count of the top level) // 255 = 540 // 255 = 2, and
  # lut[v] = (step // 2 + #pixels below v) // step, clipped to 255.
  counts = [180, 270, 90, 360]
  values = np.repeat(np.array([10, 50, 100, 200], np.uint8), counts)
  img = np.random.default_rng(1).permutation(values).reshape(30, 30, 1)
  expected = {10: 0, 50: (1 + 180) // 2, 100: (1 + 450) // 2, 200: 255}  # 270 -> 255
  out = np.asarray(augment.equalize(img))
  for level, mapped in expected.items():
    np.testing.assert_array_equal(out[img == level], mapped)
  np.testing.assert_array_equal(out, _np(ImageOps.equalize(_pil(img)), 1))
  # A third of the pixels: step = (300 - 120) // 255 = 0, so PIL leaves the image as is.
  small = (
    np.random.default_rng(0)
    .permutation(np.repeat(np.array([10, 50, 100, 200], np.uint8), [60, 90, 30, 120]))
    .reshape(15, 20, 1)
  )
  np.testing.assert_array_equal(augment.equalize(small), small.astype(np.float32))


@pytest.mark.parametrize('channels', [1, 3])
def test_equalize_and_autocontrast_match_pil_on_random_images(channels):
  equalize, auto_contrast = jax.jit(augment.equalize), jax.jit(augment.auto_contrast)
  for seed in range(6):
    rng = np.random.default_rng(seed)
    img = _random_image(seed, (32, 32, channels), rng.integers(0, 100), rng.integers(120, 256))
    if seed % 2:
      img = (img // 37 * 37).astype(np.uint8)  # few levels, ties, constant-ish channels
    np.testing.assert_array_equal(equalize(img), _np(ImageOps.equalize(_pil(img)), channels))
    np.testing.assert_array_equal(
      auto_contrast(img), _np(ImageOps.autocontrast(_pil(img)), channels)
    )


def test_auto_contrast_reproduces_pils_double_rounding():
  # lo=0, hi=25: PIL's int(25 * (255/25) + 0) is 254, not 255 (double rounding);
  # lo=10, hi=20 stretches exactly; a constant channel is left alone.
  img = np.zeros((2, 2, 3), np.uint8)
  img[..., 0] = [[0, 25], [5, 25]]
  img[..., 1] = [[10, 20], [15, 12]]
  img[..., 2] = 77
  out = np.asarray(augment.auto_contrast(img))
  np.testing.assert_array_equal(out[..., 0], [[0, 254], [51, 254]])
  np.testing.assert_array_equal(out[..., 1], [[0, 255], [127, 51]])
  np.testing.assert_array_equal(out[..., 2], 77)
  np.testing.assert_array_equal(out, _np(ImageOps.autocontrast(_pil(img)), 3))


# ---------------------------------------------------------------- ImageEnhance blends


@pytest.mark.parametrize('channels', [1, 3])
def test_enhance_ops_match_pil_within_one_grey_level(channels):
  enhancers = {
    'brightness': ImageEnhance.Brightness,
    'contrast': ImageEnhance.Contrast,
    'sharpness': ImageEnhance.Sharpness,
    'color': ImageEnhance.Color,
  }
  for seed, factor in enumerate([0.05, 0.3, 0.77, 1.6]):
    img = _random_image(seed, (8, 9, channels))
    for name, enhancer in enhancers.items():
      ours = np.asarray(getattr(augment, name)(img, factor))
      pil = _np(enhancer(_pil(img)).enhance(factor), channels)
      assert np.abs(ours - pil).max() <= 1, (name, factor)


def test_brightness_and_contrast_by_hand():
  img = np.array([[[10], [101]], [[200], [255]]], np.uint8)
  # Brightness 0.5: floor(0.5 x).
  np.testing.assert_array_equal(augment.brightness(img, 0.5)[..., 0], [[5, 50], [100, 127]])
  # Contrast 0.5 about round(mean) = round(141.5) = 142: floor(142 + 0.5 (x - 142)).
  np.testing.assert_array_equal(augment.contrast(img, 0.5)[..., 0], [[76, 121], [171, 198]])


def test_color_zero_gives_pil_grey_and_is_identity_on_grayscale():
  img = _random_image(3, (4, 4, 3))
  grey = _np(_pil(img).convert('L'), 1)
  np.testing.assert_array_equal(augment.color(img, 0.0), np.repeat(grey, 3, axis=-1))
  gray_img = _random_image(4, (4, 4, 1))
  np.testing.assert_array_equal(augment.color(gray_img, 0.2), gray_img.astype(np.float32))


def test_sharpness_zero_is_the_smooth_filter_with_border_kept():
  img = np.zeros((4, 4, 1), np.uint8)
  img[1, 1, 0] = 130
  out = np.asarray(augment.sharpness(img, 0.0))[..., 0]
  # Interior (1..2, 1..2): kernel 1 1 1/1 5 1/1 1 1 over 13 -> 130*5/13 = 50 at the centre,
  # 130/13 = 10 at its interior neighbours; the border rows/columns are copied.
  np.testing.assert_array_equal(out, [[0, 0, 0, 0], [0, 50, 10, 0], [0, 10, 10, 0], [0, 0, 0, 0]])


# ---------------------------------------------------------------- geometric ops


def test_translate_moves_a_known_pixel_and_fills_with_black():
  img = np.full((8, 8, 3), 9, np.uint8)
  img[3, 4] = (200, 100, 50)
  # USB TranslateX: output x reads input x + frac*W; frac = 0.25 -> 2 px to the left.
  out = np.asarray(augment.translate_x(img, 0.25))
  np.testing.assert_array_equal(out[3, 2], (200, 100, 50))
  np.testing.assert_array_equal(out[:, 6:], 0)  # uncovered columns: PIL default fill
  np.testing.assert_array_equal(out[:, :6][out[:, :6, 0] != 200], 9)
  out = np.asarray(augment.translate_y(img, -0.25, fill=(1, 2, 3)))
  np.testing.assert_array_equal(out[5, 4], (200, 100, 50))  # 2 px down
  np.testing.assert_array_equal(out[:2].reshape(-1, 3), np.tile([1, 2, 3], (16, 1)))


def test_rotate_90_is_a_counter_clockwise_quarter_turn():
  img = _random_image(5, (6, 6, 3))
  np.testing.assert_array_equal(augment.rotate(img, 90.0), np.rot90(img, 1).astype(np.float32))
  np.testing.assert_array_equal(augment.rotate(img, -90.0), np.rot90(img, -1).astype(np.float32))


def test_shear_x_by_hand():
  img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1) * 10 + 5
  # Output (x, y) reads input floor(x + 0.5 + 0.5 (y + 0.5)): shifts 0, 1, 1, 2 per row.
  out = np.asarray(augment.shear_x(img, 0.5))[..., 0]
  src = img[..., 0]
  expected = np.array(
    [[src[y, x + s] if x + s < 4 else 0 for x in range(4)] for y, s in enumerate([0, 1, 1, 2])]
  )
  np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('channels', [1, 3])
def test_geometric_ops_match_pil_nearest_exactly(channels):
  rng = np.random.default_rng(7)
  rotate, shear_x, shear_y, translate_x, translate_y = (
    jax.jit(op)
    for op in (
      augment.rotate,
      augment.shear_x,
      augment.shear_y,
      augment.translate_x,
      augment.translate_y,
    )
  )
  for seed in range(5):
    img = _random_image(seed, (9, 8, channels))
    h, w = img.shape[:2]
    deg, shear, frac = rng.uniform(-30, 30), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)
    pil = _pil(img)
    np.testing.assert_array_equal(rotate(img, deg), _np(pil.rotate(deg), channels))
    np.testing.assert_array_equal(shear_x(img, shear), _pil_affine(img, (1, shear, 0, 0, 1, 0)))
    np.testing.assert_array_equal(shear_y(img, shear), _pil_affine(img, (1, 0, 0, shear, 1, 0)))
    np.testing.assert_array_equal(
      translate_x(img, frac), _pil_affine(img, (1, 0, frac * w, 0, 1, 0))
    )
    np.testing.assert_array_equal(
      translate_y(img, frac), _pil_affine(img, (1, 0, 0, 0, 1, frac * h))
    )
    fill = (128,) * channels  # PIL's fillcolor as a tuple
    np.testing.assert_array_equal(
      augment.rotate(img, deg, fill=128),
      _np(pil.rotate(deg, fillcolor=fill if channels == 3 else 128), channels),
    )


def test_bilinear_affine_matches_pil_within_one_grey_level():
  img = _random_image(11, (10, 10, 3))
  ours = np.asarray(augment.rotate(img, 17.0, bilinear=True))
  pil = _np(_pil(img).rotate(17.0, resample=Image.BILINEAR), 3)
  assert np.abs(ours - pil).max() <= 1
  assert np.mean(ours == pil) > 0.95
  ours = np.asarray(augment.shear_y(img, -0.23, bilinear=True))
  assert np.abs(ours - _pil_affine(img, (1, 0, 0, -0.23, 1, 0), bilinear=True)).max() <= 1


# ---------------------------------------------------------------- cutout


def test_cutout_fills_the_right_square():
  img = np.zeros((8, 8, 3), np.uint8)
  out = np.asarray(augment.cutout(img, (4.0, 3.0), 3.0, augment.CUTOUT_FILL_RGB))
  # x0 = int(3 - 1.5) = 1, x1 = 1 + 3 = 4 (inclusive); y0 = int(4 - 1.5) = 2, y1 = 5.
  box = np.zeros((8, 8), bool)
  box[2:6, 1:5] = True
  np.testing.assert_array_equal(out[box], np.tile(augment.CUTOUT_FILL_RGB, (16, 1)))
  np.testing.assert_array_equal(out[~box], 0)


def test_cutout_matches_pil_rectangle_including_border_clipping():
  rng = np.random.default_rng(2)
  cutout = jax.jit(augment.cutout)
  for _ in range(20):
    img = _random_image(int(rng.integers(100)), (8, 8, 3))
    w = 8
    size = rng.uniform(0, 0.5) * w
    cx, cy = rng.uniform(1, w), rng.uniform(1, w)  # USB's np.random.uniform(w) range
    x0, y0 = int(max(0, cx - size / 2)), int(max(0, cy - size / 2))
    pil = _pil(img)
    ImageDraw.Draw(pil).rectangle((x0, y0, min(w, x0 + size), min(w, y0 + size)), (125, 123, 114))
    np.testing.assert_array_equal(cutout(img, (cy, cx), size, (125, 123, 114)), _np(pil, 3))


# ---------------------------------------------------------------- grayscale


def test_every_op_works_on_grayscale_and_matches_pil_l_mode():
  img = _random_image(21, (8, 8, 1), 20, 230)
  pil = _pil(img)
  cases = [
    (augment.auto_contrast(img), ImageOps.autocontrast(pil)),
    (augment.equalize(img), ImageOps.equalize(pil)),
    (augment.posterize(img, 5), ImageOps.posterize(pil, 5)),
    (augment.solarize(img, 100), ImageOps.solarize(pil, 100)),
    (augment.brightness(img, 0.4), ImageEnhance.Brightness(pil).enhance(0.4)),
    (augment.contrast(img, 0.4), ImageEnhance.Contrast(pil).enhance(0.4)),
    (augment.color(img, 0.4), ImageEnhance.Color(pil).enhance(0.4)),
    (augment.sharpness(img, 0.4), ImageEnhance.Sharpness(pil).enhance(0.4)),
    (augment.rotate(img, 12.0), pil.rotate(12.0)),
    (augment.shear_x(img, 0.2), pil.transform(pil.size, Image.AFFINE, (1, 0.2, 0, 0, 1, 0))),
    (augment.shear_y(img, 0.2), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0.2, 1, 0))),
    (augment.translate_x(img, 0.2), pil.transform(pil.size, Image.AFFINE, (1, 0, 1.6, 0, 1, 0))),
    (augment.translate_y(img, 0.2), pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, 1.6))),
  ]
  for i, (ours, ref) in enumerate(cases):
    assert ours.shape == (8, 8, 1), i
    assert np.abs(np.asarray(ours) - _np(ref, 1)).max() <= 1, i
  out = augment.cutout(img, (4.0, 4.0), 2.0, augment.CUTOUT_FILL_GRAY)
  assert out.shape == (8, 8, 1) and np.sum(np.asarray(out) == 123) >= 9


# ---------------------------------------------------------------- random views


def test_random_flip_mirrors_or_keeps_and_both_happen():
  img = _random_image(0, (4, 5, 3))
  outs = np.asarray(
    jax.vmap(augment.random_flip, (0, None))(jax.random.split(jax.random.key(0), 32), img)
  )
  flipped = np.all(outs == img[:, ::-1].astype(np.float32), axis=(1, 2, 3))
  kept = np.all(outs == img.astype(np.float32), axis=(1, 2, 3))
  assert np.all(flipped ^ kept) and flipped.any() and kept.any()
  np.testing.assert_array_equal(outs[flipped][:, 0, 4], np.tile(img[0, 0], (flipped.sum(), 1)))


def test_random_crop_is_a_slice_of_the_reflect_padded_image():
  img = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 3  # unique values
  pad = 2
  reflect = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode='reflect').astype(np.float32)
  edge = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode='edge').astype(np.float32)
  offsets = set()
  for key in jax.random.split(jax.random.key(3), 40):
    out = np.asarray(augment.random_crop(key, img, pad))
    hits = [
      (i, j)
      for i in range(2 * pad + 1)
      for j in range(2 * pad + 1)
      if np.array_equal(out, reflect[i : i + 8, j : j + 8])
    ]
    assert len(hits) == 1
    offsets.add(hits[0])
    if hits[0] != (pad, pad):
      i, j = hits[0]
      assert not np.array_equal(out, edge[i : i + 8, j : j + 8])  # reflect, not edge
  assert len(offsets) >= 12  # offsets spread over the 5x5 possibilities
  assert {o[0] for o in offsets} == set(range(5)) and {o[1] for o in offsets} == set(range(5))


def test_crop_pad_rounds_the_fraction_of_the_side():
  assert [augment.crop_pad(0.125, s) for s in (32, 96, 28)] == [4, 12, 4]
  with pytest.raises(ValueError, match='pad_frac'):
    augment.crop_pad(1.5, 32)


def test_weak_augment_is_a_flipped_crop():
  img = np.arange(64, dtype=np.uint8).reshape(8, 8, 1)
  reflect = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode='reflect').astype(np.float32)
  crops = [reflect[i : i + 8, j : j + 8] for i in range(3) for j in range(3)]
  candidates = crops + [c[:, ::-1] for c in crops]
  for key in jax.random.split(jax.random.key(1), 10):
    out = np.asarray(augment.weak_augment(key, img, pad_frac=0.125))  # pad = 1 at 8
    assert any(np.array_equal(out, c) for c in candidates)
    no_flip = np.asarray(augment.weak_augment(key, img, pad_frac=0.0, flip=False))
    np.testing.assert_array_equal(no_flip, img.astype(np.float32))


# ---------------------------------------------------------------- RandAugment


def test_randaugment_ops_follow_usb_list_and_ranges():
  names = [name for name, *_ in augment.RANDAUGMENT_OPS]
  assert names == [
    'AutoContrast',
    'Brightness',
    'Color',
    'Contrast',
    'Equalize',
    'Identity',
    'Posterize',
    'Rotate',
    'Sharpness',
    'ShearX',
    'ShearY',
    'Solarize',
    'TranslateX',
    'TranslateY',
  ]
  ranges = {name: (low, high) for name, _, low, high in augment.RANDAUGMENT_OPS}
  assert ranges['Brightness'] == (0.05, 0.95) and ranges['Posterize'] == (4.0, 8.0)
  assert ranges['Rotate'] == (-30.0, 30.0) and ranges['Solarize'] == (0.0, 256.0)
  assert ranges['ShearX'] == ranges['TranslateY'] == (-0.3, 0.3)


@pytest.mark.parametrize('channels', [1, 3])
def test_vmapped_randaugment_op_equals_each_public_op(channels):
  ops = augment.RANDAUGMENT_OPS
  units = np.array([0.0, 0.37, 0.999], np.float32)
  index = np.repeat(np.arange(len(ops)), len(units)).astype(np.int32)
  unit = np.tile(units, len(ops))
  imgs = np.stack([_random_image(i, (8, 8, channels)) for i in range(len(index))])
  outs = np.asarray(jax.jit(jax.vmap(augment.randaugment_op))(imgs.astype(np.float32), index, unit))
  for n, (i, u) in enumerate(zip(index, unit)):
    name, op, low, high = ops[i]
    expected = op(imgs[n], low + (high - low) * u)
    np.testing.assert_array_equal(outs[n], expected, err_msg=f'{name} u={u}')


def test_strong_augment_without_ops_is_weak_plus_a_cutout_square():
  img = np.zeros((8, 8, 3), np.uint8)
  for key in jax.random.split(jax.random.key(4), 8):
    out = np.asarray(augment.strong_augment(key, img, num_ops=0, pad_frac=0.0, flip=False))
    painted = np.all(out == augment.CUTOUT_FILL_RGB, axis=-1)
    assert np.all(out[~painted] == 0) and painted.any()
    rows, cols = np.nonzero(painted)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert painted.sum() == height * width  # one filled rectangle
    assert height <= 4 and width <= 4  # floor(side) + 1 with side < 0.5 * 8
  gray = augment.strong_augment(jax.random.key(0), img[..., :1], num_ops=0)
  assert set(np.unique(gray)) == {0.0, augment.CUTOUT_FILL_GRAY}


# ---------------------------------------------------------------- batch entry point


@pytest.mark.parametrize('channels', [1, 3])
def test_augment_batch_shape_dtype_range_and_per_sample_keys(channels):
  images = np.repeat(np.arange(64, dtype=np.uint8).reshape(1, 8, 8, 1) * 4, 6, axis=0)
  images = np.repeat(images, channels, axis=-1)  # six identical images
  key = jax.random.key(0)
  fn = jax.jit(
    augment.augment_batch, static_argnames=('strong', 'pad_frac', 'flip', 'num_ops', 'cutout')
  )
  for strong in (False, True):
    out = fn(key, images, strong=strong)
    assert out.shape == images.shape and out.dtype == jnp.float32
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert np.array_equal(out, np.round(out))  # integer grey levels, as PIL's uint8
    assert len({np.asarray(o).tobytes() for o in out}) > 1  # samples drew different keys
    np.testing.assert_array_equal(out, fn(key, images, strong=strong))  # deterministic
  weak = np.asarray(fn(key, images, strong=False))
  assert set(np.unique(weak)) <= set(np.unique(images).astype(np.float32))
  # Sample i is the single-image view under the i-th split key.
  for i, sample_key in enumerate(jax.random.split(key, 6)):
    np.testing.assert_array_equal(weak[i], augment.weak_augment(sample_key, images[i]))


def test_bad_input_raises_clear_errors():
  with pytest.raises(ValueError, match='C = 1 or 3'):
    augment.augment_batch(jax.random.key(0), np.zeros((2, 8, 8, 2), np.uint8), strong=False)
  with pytest.raises(ValueError, match='N, H, W, C'):
    augment.augment_batch(jax.random.key(0), np.zeros((8, 8, 3), np.uint8), strong=False)
  with pytest.raises(ValueError, match='pad'):
    augment.random_crop(jax.random.key(0), np.zeros((4, 4, 3), np.uint8), 4)
  with pytest.raises(ValueError, match='vmap'):
    augment.weak_augment(jax.random.key(0), np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match='one per channel'):
    augment.normalize(np.zeros((2, 2, 3)), (0.5, 0.5), (0.2, 0.2))


def test_normalize_by_hand():
  x = np.array([[[0.0, 127.5, 255.0]]], np.float32)
  out = augment.normalize(x, (0.5, 0.5, 0.5), (0.25, 0.5, 0.125))
  np.testing.assert_allclose(out, [[[-2.0, 0.0, 4.0]]], atol=1e-6)
  gray = augment.normalize(np.full((1, 2, 2, 1), 51.0), (0.1,), (0.2,))
  np.testing.assert_allclose(gray, 0.5, atol=1e-6)
