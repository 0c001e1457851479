"""On-device image augmentation: USB's weak and strong (RandAugment + Cutout) views in JAX.

Every op is a pure function of one image [H, W, C] (float32, 0..255, C = 1 or 3) and a
magnitude, with PIL's semantics on uint8: ops floor/round/clip where PIL does, so an
integer-valued input gives the integer result PIL gives (tests compare against PIL).
Random views take one key per image and are meant to run vmapped inside the jitted step.

Reference: USB `semilearn/datasets/augmentation/randaugment.py` and its CIFAR transforms
(RandomCrop(reflect) -> RandomHorizontalFlip -> RandAugment(3) -> Cutout). Where USB's
code is more specific than the paper (docs/method.md §1) this module follows the code:
  * Brightness/Color/Contrast/Sharpness factors are uniform in [0.05, 0.95] (never
    enhance above 1); Posterize keeps int(U[4, 8)) = 4..7 bits; Solarize threshold
    U[0, 256); Rotate U[-30, 30) degrees counter-clockwise; Shear/Translate U[-0.3, 0.3)
    with no extra random sign (USB commented the sign flips out; ranges are symmetric).
  * Rotate/Shear/Translate are called without `fillcolor`, so PIL fills uncovered pixels
    with 0 (black), not (128, 128, 128): `AFFINE_FILL = 0`; pass `affine_fill` to change.
    Sampling is nearest (PIL's default), with PIL's 16.16 fixed-point affine coordinates.
  * Cutout: side v = U[0, 0.5)*width; centre from `np.random.uniform(w)`, which is
    U(1, w] (low=w, high=1), not U[0, w); PIL's rectangle includes both corners, so it
    paints floor(v)+1 pixels per side (clipped at the border), never nothing for v > 0.
  * Crop before flip (USB order; same distribution as flip before crop). The pad is
    round-half-up(pad_frac*side), the paper's 4 pixels at 32: 12 at 96 and 4 at 28, where
    USB's int(side*(1-crop_ratio)) would give 3.
Grayscale: Color is the identity (PIL's L->L->L round trip); Cutout fills with 123, the
grey PIL's own RGB->L conversion gives (125, 123, 114) (PIL refuses a 3-tuple on an L
image, so USB itself has no grayscale answer).
"""

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

AFFINE_FILL = 0.0  # USB calls PIL rotate/transform without fillcolor -> black.
CUTOUT_FILL_RGB = (125.0, 123.0, 114.0)
CUTOUT_FILL_GRAY = 123.0  # PIL convert('L') of CUTOUT_FILL_RGB.
_LUMA_16 = (19595, 38470, 7471)  # PIL's RGB->L weights in 16.16 fixed point.


def _check_image(img, where: str):
  """Raises ValueError unless img is one [H, W, C] image with C in (1, 3)."""
  if img.ndim != 3 or img.shape[-1] not in (1, 3):
    raise ValueError(
      f'{where}: expected one image [H, W, C] with C = 1 or 3, got shape '
      f'{tuple(img.shape)}; vmap over the batch or use augment_batch.'
    )


def _as_float(img):
  """Any image (uint8 or float, 0..255) as float32."""
  return jnp.asarray(img).astype(jnp.float32)


def _fill_vector(fill, channels: int):
  """Fill colour as a [C] float32 vector (a scalar is broadcast)."""
  fill = jnp.asarray(fill, jnp.float32).reshape(-1)
  if fill.shape[0] not in (1, channels):
    raise ValueError(
      f'fill has {fill.shape[0]} values for a {channels}-channel image; '
      'give one value or one per channel.'
    )
  return jnp.broadcast_to(fill, (channels,))


def _grey(img):
  """PIL convert('L') (rounded 16.16 luma) as [H, W, 1]; identity for C = 1."""
  if img.shape[-1] == 1:
    return img
  weighted = img.astype(jnp.int32) @ jnp.asarray(_LUMA_16, jnp.int32)  # [H, W]
  return jnp.right_shift(weighted + 32768, 16).astype(jnp.float32)[..., None]


def _blend(degenerate, img, factor):
  """PIL Image.blend(degenerate, img, factor): truncate, clip to 0..255."""
  factor = jnp.asarray(factor, jnp.float32)
  return jnp.clip(jnp.floor(degenerate + factor * (img - degenerate)), 0.0, 255.0)


# ----------------------------------------------------------------------------------------
# Photometric ops (image [H, W, C] float32 0..255, magnitude) -> image.


def identity(img, v=None):
  """Returns the image unchanged (magnitude ignored)."""
  del v
  return _as_float(img)


def _floor_div(numerator, denominator):
  """Exact floor(n / d) of non-negative int32 arrays below 2^24, vectorised.

  Float quotient plus a one-step correction: XLA's float division is not always
  correctly rounded, and int32 division does not vectorise on CPU.
  """
  quotient = jnp.floor(numerator.astype(jnp.float32) / denominator.astype(jnp.float32))
  quotient = quotient.astype(jnp.int32)
  quotient = quotient - (quotient * denominator > numerator).astype(jnp.int32)
  return quotient + ((quotient + 1) * denominator <= numerator).astype(jnp.int32)


def _apply_lut(lut, img):
  """Maps every pixel of channel k through lut[:, k]: lut [256, C], img [H, W, C] -> float32."""
  pixels = jnp.clip(img, 0, 255).astype(jnp.int32).reshape(-1, img.shape[-1])  # [HW, C]
  return jnp.take_along_axis(lut, pixels, axis=0).astype(jnp.float32).reshape(img.shape)


@functools.lru_cache(maxsize=1)
def _autocontrast_low_table() -> tuple[np.ndarray, np.ndarray]:
  """Where PIL's autocontrast LUT lands one below the exact (ix - lo)*255 // (hi - lo).

  PIL computes int(ix*scale + offset) in double; when (ix-lo)*255/(hi-lo) is an integer k
  this is sometimes k - 1e-14 and truncates to k - 1 (e.g. lo=0, hi=25 maps 25 to 254).
  These are the only differences from the exact value: 12,094 of 2.8 M (lo, hi, ix) cases
  in 5,958 (lo, hi) pairs. Returns row [65536] int32 (lo*256 + hi -> row, 0 = none) and
  bits [rows, 8] uint32 (bit ix set where PIL is one lower).
  """
  low_keys = []
  for span in range(1, 256):
    g = math.gcd(255, span)
    lo = np.arange(0, 256 - span)[:, None]  # [L, 1]
    m = np.arange(g + 1)[None, :]  # [1, g+1]; ix - lo = m*span/g gives integer results
    ix = lo + m * (span // g)  # [L, g+1]
    exact = np.broadcast_to(m * (255 // g), ix.shape)
    scale = 255.0 / span
    pil = (ix * scale + (-lo * scale)).astype(np.int64)
    low = pil != exact
    lo_full = np.broadcast_to(lo, ix.shape)
    low_keys.append(((lo_full * 256 + lo_full + span) * 256 + ix)[low])
  low_keys = np.concatenate(low_keys)
  pairs, row_of_key = np.unique(low_keys // 256, return_inverse=True)
  row = np.zeros(65536, np.int32)
  row[pairs] = np.arange(1, len(pairs) + 1)
  bits = np.zeros((len(pairs) + 1, 8), np.uint32)
  level = low_keys % 256
  np.bitwise_or.at(bits, (row_of_key + 1, level // 32), (1 << (level % 32)).astype(np.uint32))
  return row, bits


def auto_contrast(img, v=None):
  """PIL ImageOps.autocontrast per channel: stretch [min, max] to [0, 255], PIL's LUT exactly."""
  del v
  img = _as_float(img)
  c = img.shape[-1]
  lo = img.min(axis=(0, 1)).astype(jnp.int32)  # [C]
  hi = img.max(axis=(0, 1)).astype(jnp.int32)  # [C]
  pixels = img.astype(jnp.int32).reshape(-1, c)  # [HW, C]
  # Per pixel rather than via a [256, C] LUT: XLA fuses the LUT into the gather anyway.
  exact = _floor_div((pixels - lo) * 255, jnp.maximum(hi - lo, 1))  # [HW, C]
  row_table, bits_table = _autocontrast_low_table()
  words = jnp.asarray(bits_table)[jnp.asarray(row_table)[lo * 256 + hi]]  # [C, 8]
  word = jnp.take_along_axis(words.T, jnp.right_shift(pixels, 5), axis=0)  # [HW, C]
  pil_low = jnp.right_shift(word, (pixels & 31).astype(jnp.uint32)) & 1
  stretched = (exact - pil_low.astype(jnp.int32)).astype(jnp.float32).reshape(img.shape)
  return jnp.where(hi > lo, stretched, img)


def brightness(img, v):
  """PIL ImageEnhance.Brightness: blend with black by factor v."""
  img = _as_float(img)
  return _blend(jnp.zeros_like(img), img, v)


def color(img, v):
  """PIL ImageEnhance.Color: blend with the image's own grey (identity for C = 1)."""
  img = _as_float(img)
  if img.shape[-1] == 1:
    return img
  return _blend(_grey(img), img, v)


def contrast(img, v):
  """PIL ImageEnhance.Contrast: blend with the rounded mean grey level."""
  img = _as_float(img)
  grey_sum = jnp.sum(_grey(img).astype(jnp.int32))
  count = img.shape[0] * img.shape[1]
  mean = _floor_div(2 * grey_sum + count, jnp.int32(2 * count))  # int(mean + 0.5)
  return _blend(mean.astype(jnp.float32), img, v)


def equalize(img, v=None):
  """PIL ImageOps.equalize per channel (histogram LUT with step = (N - count of max) // 255)."""
  del v
  img = _as_float(img)
  h, w, c = img.shape
  pixels = jnp.clip(img, 0, 255).astype(jnp.int32).reshape(-1, c)  # [HW, C]
  hist = jnp.bincount((pixels * c + jnp.arange(c)).reshape(-1), length=256 * c)
  hist = hist.reshape(256, c)  # [256, C]; a flat bincount scatters ~5x faster on CPU
  top_count = jnp.take_along_axis(hist, pixels.max(axis=0)[None, :], axis=0)[0]  # [C]
  step = (h * w - top_count) // 255  # [C]; 0 for a (near-)constant channel -> identity
  safe_step = jnp.maximum(step, 1)
  below = jnp.cumsum(hist, axis=0) - hist  # [256, C]: pixels strictly below each level
  lut = jnp.minimum(_floor_div(safe_step // 2 + below, safe_step), 255)  # [256, C]
  return jnp.where(step > 0, _apply_lut(lut, img), img)


def posterize(img, bits):
  """PIL ImageOps.posterize: keep the top int(bits) bits (clipped to 1..8, as USB's max(1, v))."""
  img = _as_float(img)
  keep = jnp.clip(jnp.floor(jnp.asarray(bits, jnp.float32)), 1, 8).astype(jnp.int32)
  mask = jnp.bitwise_not(jnp.left_shift(1, 8 - keep) - 1)
  return jnp.bitwise_and(img.astype(jnp.int32), mask).astype(jnp.float32)


def sharpness(img, v):
  """PIL ImageEnhance.Sharpness: blend with the SMOOTH-filtered image (border pixels kept)."""
  img = _as_float(img)
  h, w, _ = img.shape
  if h < 3 or w < 3:
    return img  # PIL's 3x3 filter leaves images this small unchanged.
  window = sum(img[dy : h - 2 + dy, dx : w - 2 + dx] for dy in range(3) for dx in range(3))
  total = window + 4.0 * img[1:-1, 1:-1]  # [H-2, W-2, C]: kernel 1 1 1 / 1 5 1 / 1 1 1
  # round(total / 13): (total + 6.5)/13 is >= 1/26 away from an integer, so the
  # product with a rounded 1/13 floors exactly (XLA's division need not be exact).
  rounded = jnp.floor((total + 6.5) * (1.0 / 13.0))
  smooth = jnp.pad(rounded, ((1, 1), (1, 1), (0, 0)))
  border = jnp.pad(
    jnp.zeros((h - 2, w - 2, 1), bool), ((1, 1), (1, 1), (0, 0)), constant_values=True
  )  # [H, W, 1]
  smooth = jnp.where(border, img, smooth)
  return _blend(smooth, img, v)


def solarize(img, threshold):
  """PIL ImageOps.solarize: invert every pixel >= threshold (256 leaves the image unchanged)."""
  img = _as_float(img)
  return jnp.where(img >= threshold, 255.0 - img, img)


# ----------------------------------------------------------------------------------------
# Geometric ops: PIL Image.transform(AFFINE) maps output pixel centre (x+.5, y+.5) to the
# input point (a x + b y + c, d x + e y + f).


def _fixed(value):
  """PIL's FIX(): 16.16 fixed point, floor(v * 65536 + 0.5)."""
  return jnp.floor(value * 65536.0 + 0.5).astype(jnp.int32)


def affine_transform(img, coeffs, *, fill=AFFINE_FILL, bilinear: bool = False):
  """PIL im.transform(size, AFFINE, coeffs, NEAREST|BILINEAR, fillcolor=fill).

  coeffs: (a, b, c, d, e, f), maps output pixel centres to input coordinates.
  Nearest uses PIL's 16.16 fixed-point stepping; bilinear its edge-clamped filter.
  """
  img = _as_float(img)
  _check_image(img, 'affine_transform')
  h, w, c = img.shape
  a, b, cc, d, e, f = (jnp.asarray(coeffs[i], jnp.float32) for i in range(6))
  fill = _fill_vector(fill, c)
  ys = jnp.arange(h)[:, None]  # [H, 1]
  xs = jnp.arange(w)[None, :]  # [1, W]
  flat = img.reshape(h * w, c)  # [HW, C]
  if not bilinear:
    x_fix = _fixed(cc + a * 0.5 + b * 0.5) + ys * _fixed(b) + xs * _fixed(a)  # [H, W]
    y_fix = _fixed(f + d * 0.5 + e * 0.5) + ys * _fixed(e) + xs * _fixed(d)
    x_in = jnp.right_shift(x_fix, 16)  # arithmetic shift = floor
    y_in = jnp.right_shift(y_fix, 16)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)  # [H, W]
    index = jnp.clip(y_in, 0, h - 1) * w + jnp.clip(x_in, 0, w - 1)
    sampled = flat[index]  # [H, W, C]
    return jnp.where(inside[..., None], sampled, fill)
  x_src = a * (xs + 0.5) + b * (ys + 0.5) + cc  # [H, W]
  y_src = d * (xs + 0.5) + e * (ys + 0.5) + f
  inside = (x_src >= 0) & (x_src < w) & (y_src >= 0) & (y_src < h)
  x_src, y_src = x_src - 0.5, y_src - 0.5
  x0, y0 = jnp.floor(x_src), jnp.floor(y_src)
  dx, dy = (x_src - x0)[..., None], (y_src - y0)[..., None]  # [H, W, 1]
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  xa, xb = jnp.clip(x0, 0, w - 1), jnp.clip(x0 + 1, 0, w - 1)
  ya, yb = jnp.clip(y0, 0, h - 1), jnp.clip(y0 + 1, 0, h - 1)
  top = flat[ya * w + xa] + dx * (flat[ya * w + xb] - flat[ya * w + xa])  # [H, W, C]
  bottom = flat[yb * w + xa] + dx * (flat[yb * w + xb] - flat[yb * w + xa])
  value = jnp.clip(jnp.floor(top + dy * (bottom - top)), 0.0, 255.0)  # PIL truncates
  return jnp.where(inside[..., None], value, fill)


def _rotate_coeffs(degrees, h: int, w: int):
  """PIL Image.rotate's inverse matrix about the centre (w/2, h/2), counter-clockwise."""
  angle = -jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  cx, cy = w / 2.0, h / 2.0
  return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# Coefficient builders (magnitude, height, width) -> PIL AFFINE (a, b, c, d, e, f).


def _shear_x_coeffs(v, h: int, w: int):
  del h, w
  return (1.0, v, 0.0, 0.0, 1.0, 0.0)


def _shear_y_coeffs(v, h: int, w: int):
  del h, w
  return (1.0, 0.0, 0.0, v, 1.0, 0.0)


def _translate_x_coeffs(frac, h: int, w: int):
  del h
  return (1.0, 0.0, frac * w, 0.0, 1.0, 0.0)


def _translate_y_coeffs(frac, h: int, w: int):
  del w
  return (1.0, 0.0, 0.0, 0.0, 1.0, frac * h)


def _identity_coeffs(v, h: int, w: int):
  del v, h, w
  return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _affine_op(img, coeffs_fn, value, fill, bilinear: bool):
  """One geometric op: the affine coefficients of `value` for this image size, applied."""
  img = _as_float(img)
  return affine_transform(img, coeffs_fn(value, *img.shape[:2]), fill=fill, bilinear=bilinear)


def rotate(img, degrees, *, fill=AFFINE_FILL, bilinear: bool = False):
  """PIL img.rotate(degrees): counter-clockwise about the centre, same size."""
  return _affine_op(img, _rotate_coeffs, degrees, fill, bilinear)


def shear_x(img, v, *, fill=AFFINE_FILL, bilinear: bool = False):
  """USB ShearX: PIL AFFINE (1, v, 0, 0, 1, 0), output (x, y) reads input (x + v y, y)."""
  return _affine_op(img, _shear_x_coeffs, v, fill, bilinear)


def shear_y(img, v, *, fill=AFFINE_FILL, bilinear: bool = False):
  """USB ShearY: PIL AFFINE (1, 0, 0, v, 1, 0), output (x, y) reads input (x, y + v x)."""
  return _affine_op(img, _shear_y_coeffs, v, fill, bilinear)


def translate_x(img, frac, *, fill=AFFINE_FILL, bilinear: bool = False):
  """USB TranslateX: output x reads input x + frac*width (positive frac moves content left)."""
  return _affine_op(img, _translate_x_coeffs, frac, fill, bilinear)


def translate_y(img, frac, *, fill=AFFINE_FILL, bilinear: bool = False):
  """USB TranslateY: output y reads input y + frac*height (positive frac moves content up)."""
  return _affine_op(img, _translate_y_coeffs, frac, fill, bilinear)


def cutout(img, center_yx, size, fill):
  """USB CutoutAbs: PIL rectangle (x0, y0, min(W, x0+size), min(H, y0+size)), corners included.

  x0 = int(max(0, cx - size/2)), same for y; size <= 0 leaves the image unchanged.
  """
  img = _as_float(img)
  h, w, c = img.shape
  size = jnp.asarray(size, jnp.float32)
  cy, cx = center_yx[0], center_yx[1]
  x0 = jnp.floor(jnp.maximum(0.0, cx - 0.5 * size))
  y0 = jnp.floor(jnp.maximum(0.0, cy - 0.5 * size))
  x1 = jnp.floor(jnp.minimum(w, x0 + size))  # inclusive, PIL truncates the corner
  y1 = jnp.floor(jnp.minimum(h, y0 + size))
  cols = jnp.arange(w)[None, :]
  rows = jnp.arange(h)[:, None]
  box = (cols >= x0) & (cols <= x1) & (rows >= y0) & (rows <= y1) & (size > 0)  # [H, W]
  return jnp.where(box[..., None], _fill_vector(fill, c), img)


_paint_cutout = cutout  # strong_augment/augment_batch take a `cutout` flag of the same name.


# ----------------------------------------------------------------------------------------
# Random views.


def random_flip(key, img):
  """Horizontal flip with probability 1/2 (torchvision RandomHorizontalFlip)."""
  img = _as_float(img)
  return jnp.where(jax.random.bernoulli(key, 0.5), img[:, ::-1], img)


def random_crop(key, img, pad: int):
  """Reflect-pad by `pad` (mirror without repeating the edge) and crop back at a uniform offset."""
  img = _as_float(img)
  _check_image(img, 'random_crop')
  h, w, c = img.shape
  if not 0 <= pad < min(h, w):
    raise ValueError(
      f'random_crop: pad={pad} must be in [0, {min(h, w)}) for a {h}x{w} image '
      '(reflect padding needs pad < side); lower pad_frac.'
    )
  if pad == 0:
    return img
  padded = jnp.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode='reflect')  # [H+2p, W+2p, C]
  offset = jax.random.randint(key, (2,), 0, 2 * pad + 1)  # (top, left), inclusive range
  return jax.lax.dynamic_slice(padded, (offset[0], offset[1], 0), (h, w, c))


def crop_pad(pad_frac: float, side: int) -> int:
  """Padding in pixels: round-half-up(pad_frac * side) (4 at 32, 12 at 96, 4 at 28)."""
  if not 0.0 <= pad_frac < 1.0:
    raise ValueError(f'pad_frac={pad_frac} must be in [0, 1); USB uses 1 - crop_ratio = 0.125.')
  return int(math.floor(pad_frac * side + 0.5))


def weak_augment(key, img, *, pad_frac: float = 0.125, flip: bool = True):
  """USB weak view of one image: reflect-pad (by crop_pad of the width) + random crop, then
  random horizontal flip."""
  img = _as_float(img)
  _check_image(img, 'weak_augment')
  key_crop, key_flip = jax.random.split(key)
  img = random_crop(key_crop, img, crop_pad(pad_frac, img.shape[1]))
  return random_flip(key_flip, img) if flip else img


# (name, op, low, high): USB's augment_list, in its order; magnitude = low + (high-low)*U[0,1).
RANDAUGMENT_OPS: tuple[tuple[str, Callable, float, float], ...] = (
  ('AutoContrast', auto_contrast, 0.0, 1.0),
  ('Brightness', brightness, 0.05, 0.95),
  ('Color', color, 0.05, 0.95),
  ('Contrast', contrast, 0.05, 0.95),
  ('Equalize', equalize, 0.0, 1.0),
  ('Identity', identity, 0.0, 1.0),
  ('Posterize', posterize, 4.0, 8.0),
  ('Rotate', rotate, -30.0, 30.0),
  ('Sharpness', sharpness, 0.05, 0.95),
  ('ShearX', shear_x, -0.3, 0.3),
  ('ShearY', shear_y, -0.3, 0.3),
  ('Solarize', solarize, 0.0, 256.0),
  ('TranslateX', translate_x, -0.3, 0.3),
  ('TranslateY', translate_y, -0.3, 0.3),
)
_GEOMETRIC_COEFFS = {
  rotate: _rotate_coeffs,
  shear_x: _shear_x_coeffs,
  shear_y: _shear_y_coeffs,
  translate_x: _translate_x_coeffs,
  translate_y: _translate_y_coeffs,
}


def randaugment_op(img, op_index, unit, *, fill=AFFINE_FILL):
  """Applies RANDAUGMENT_OPS[op_index] with magnitude low + (high-low)*unit; vmap-safe.

  Branch-free under vmap: a lax.switch picks the photometric result (identity for
  geometric ops) and another the affine coefficients (identity for photometric ops), so
  the five geometric ops share one gather instead of each doing its own.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  photometric, geometric = [], []
  for _, op, low, high in RANDAUGMENT_OPS:
    scaled = lambda u, low=low, high=high: low + (high - low) * u
    coeffs = _GEOMETRIC_COEFFS.get(op)
    if coeffs is None:
      photometric.append(lambda x, u, op=op, scaled=scaled: op(x, scaled(u)))
      geometric.append(lambda u: _identity_coeffs(u, h, w))
    else:
      photometric.append(lambda x, u: x)
      geometric.append(
        lambda u, coeffs=coeffs, scaled=scaled: tuple(
          jnp.asarray(v, jnp.float32) for v in coeffs(scaled(u), h, w)
        )
      )
  img = jax.lax.switch(op_index, photometric, img, unit)
  return affine_transform(img, jax.lax.switch(op_index, geometric, unit), fill=fill)


def strong_augment(
  key,
  img,
  *,
  pad_frac: float = 0.125,
  flip: bool = True,
  num_ops: int = 3,
  cutout: bool = True,
  affine_fill=AFFINE_FILL,
):
  """USB strong view of one image: weak view, num_ops RandAugment ops drawn with
  replacement (uniform magnitude each), then Cutout (side U[0, 0.5)*width)."""
  img = _as_float(img)
  _check_image(img, 'strong_augment')
  if num_ops < 0:
    raise ValueError(f'num_ops={num_ops} must be >= 0 (USB uses 3).')
  key_weak, key_ops, key_cut = jax.random.split(key, 3)
  img = weak_augment(key_weak, img, pad_frac=pad_frac, flip=flip)

  def apply_random_op(image, key_op):
    key_index, key_unit = jax.random.split(key_op)
    op_index = jax.random.randint(key_index, (), 0, len(RANDAUGMENT_OPS))
    return randaugment_op(image, op_index, jax.random.uniform(key_unit), fill=affine_fill), None

  # A scan, not a Python loop: compiles one op slot, and XLA cannot fuse one slot's
  # gathers into the next (which made 3 slots cost ~5x one on CPU).
  img, _ = jax.lax.scan(apply_random_op, img, jax.random.split(key_ops, num_ops))
  if not cutout:
    return img
  h, w, c = img.shape
  key_size, key_x, key_y = jax.random.split(key_cut, 3)
  size = jax.random.uniform(key_size) * 0.5 * w  # USB: v * img.size[0]
  center_x = w + (1.0 - w) * jax.random.uniform(key_x)  # np.random.uniform(w): U(1, w]
  center_y = h + (1.0 - h) * jax.random.uniform(key_y)
  fill = CUTOUT_FILL_RGB if c == 3 else CUTOUT_FILL_GRAY
  return _paint_cutout(img, (center_y, center_x), size, fill)


def augment_batch(
  key,
  images_uint8,
  *,
  strong: bool,
  pad_frac: float = 0.125,
  flip: bool = True,
  num_ops: int = 3,
  cutout: bool = True,
):
  """Weak or strong views of a batch [N, H, W, C] (uint8 or 0..255) -> float32 [N, H, W, C]."""
  images = jnp.asarray(images_uint8)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(
      f'augment_batch: expected images [N, H, W, C] with C = 1 or 3, got '
      f'shape {tuple(images.shape)}; add a channel axis for grayscale.'
    )
  crop_pad(pad_frac, images.shape[2])  # validates pad_frac before tracing the vmap
  if strong:
    view = functools.partial(
      strong_augment, pad_frac=pad_frac, flip=flip, num_ops=num_ops, cutout=cutout
    )
  else:
    view = functools.partial(weak_augment, pad_frac=pad_frac, flip=flip)
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(view)(keys, images)


def normalize(images_0_255, mean: Sequence[float], std: Sequence[float]):
  """(x/255 - mean)/std per channel, mean/std in 0..1 units; any leading shape [..., C]."""
  images = jnp.asarray(images_0_255, jnp.float32)
  mean = np.asarray(mean, np.float32).reshape(-1)
  std = np.asarray(std, np.float32).reshape(-1)
  if mean.shape != std.shape or mean.shape[0] not in (1, images.shape[-1]):
    raise ValueError(
      f'normalize: mean {mean.shape} / std {std.shape} must have one value or '
      f'one per channel ({images.shape[-1]}); use the dataset info values.'
    )
  if np.any(std <= 0):
    raise ValueError('normalize: std must be positive.')
  return (images / 255.0 - mean) / std
