"""Tests of dolg_jax.data.decode: every stored mode decodes to RGB; fast crop-resize is accurate."""

import io

import numpy as np
from PIL import Image
import pytest

from dolg_jax.data import decode


def _smooth(h, w, seed=0):
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, size=(max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))


def _encode(arr, fmt='JPEG', mode=None, **kw):
  im = Image.fromarray(arr)
  if mode:
    im = im.convert(mode)
  buf = io.BytesIO()
  im.save(buf, fmt, **kw)
  return buf.getvalue()


@pytest.mark.parametrize('mode,fmt,tol', [
    (None, 'JPEG', 4.0), ('CMYK', 'JPEG', 4.0), (None, 'PNG', 0.0), ('RGBA', 'PNG', 0.0),
    ('P', 'PNG', 0.0)])
def test_modes_decode_to_rgb(mode, fmt, tol):
  src = _smooth(96, 128)
  data = _encode(src, fmt, mode, **({'quality': 95} if fmt == 'JPEG' else {}))
  img = decode.decode_rgb(data)
  assert img.dtype == np.uint8 and img.shape == (96, 128, 3)
  if mode == 'P':  # Palette quantisation is lossy: compare with the palette's own colours.
    src = np.asarray(Image.fromarray(src).convert('P').convert('RGB'))
  assert np.abs(img.astype(float) - src).mean() <= tol
  assert decode.image_size(data) == (96, 128)


def test_grayscale_jpeg_decodes_to_three_equal_channels():
  src = _smooth(80, 60, seed=1)
  data = _encode(src, 'JPEG', 'L', quality=95)
  img = decode.decode_rgb(data)
  assert img.shape == (80, 60, 3)
  np.testing.assert_array_equal(img[..., 0], img[..., 1])
  np.testing.assert_array_equal(img[..., 0], img[..., 2])
  gray = np.asarray(Image.fromarray(src).convert('L')).astype(float)
  assert np.abs(img[..., 0] - gray).mean() < 3.0


def test_png_bytes_named_jpg_and_rgba_alpha_composited_on_white():
  rgba = np.zeros((10, 10, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :5, 3] = 255   # Left half opaque red, right half fully transparent.
  img = decode.decode_rgb(_encode(rgba, 'PNG'))
  np.testing.assert_array_equal(img[:, :5], np.broadcast_to([200, 0, 0], (10, 5, 3)))
  np.testing.assert_array_equal(img[:, 5:], np.full((10, 5, 3), 255))


def test_check_decodable_reports_bad_files():
  good = _encode(_smooth(64, 64), 'JPEG', quality=90)
  assert decode.check_decodable(good) is None
  assert 'Premature end' in decode.check_decodable(good[:len(good) // 2])
  assert 'not a recognised image' in decode.check_decodable(b'<html>403</html>' * 4)
  assert decode.check_decodable(b'') == 'empty file'
  with pytest.raises(decode.DecodeError):
    decode.decode_rgb(b'\xff\xd8garbage')


def test_dct_downscaled_decode_matches_full_resolution():
  src = _smooth(640, 800, seed=2)
  data = _encode(src, 'JPEG', quality=95)
  box = (100, 40, 400, 560)
  # Output 64: crop 400x560 -> the decoder may use 1/4 scale (crop stays >= 64 px).
  small = decode.decode_rgb(data, min_height=640 * 64 // 400 + 1, min_width=800 * 64 // 560 + 1)
  assert small.shape[0] < 640 // 2
  fast = decode.decode_crop_resize(data, box, (64, 64)).astype(float)
  ref = np.asarray(Image.fromarray(src).crop((40, 100, 600, 500)).resize(
      (64, 64), Image.BILINEAR, reducing_gap=None)).astype(float)
  assert fast.shape == (64, 64, 3)
  assert np.abs(fast - ref).mean() < 4.0
  # Upscaling path (crop smaller than the output): no downscaling, same picture.
  fast512 = decode.decode_crop_resize(data, box, (512, 512)).astype(float)
  ref512 = decode.naive_crop_resize(data, box, (512, 512)).astype(float)
  assert np.abs(fast512 - ref512).mean() < 3.0


def test_flip_mirrors_columns():
  data = _encode(_smooth(100, 120, seed=3), 'JPEG', quality=90)
  a = decode.decode_crop_resize(data, (10, 10, 80, 90), (32, 48))
  b = decode.decode_crop_resize(data, (10, 10, 80, 90), (32, 48), flip=True)
  np.testing.assert_array_equal(a[:, ::-1], b)


def test_random_resized_crop_box_respects_ranges():
  rng = np.random.default_rng(0)
  scale, ratio = (0.25, 1.0), (3 / 4, 4 / 3)
  for hw in [(600, 800), (800, 600), (64, 500), (37, 41)]:
    for _ in range(200):
      top, left, h, w = decode.random_resized_crop_box(rng, hw, scale, ratio)
      assert 0 <= top and top + h <= hw[0] and 0 <= left and left + w <= hw[1]
      assert h >= 1 and w >= 1
      if hw == (600, 800):  # Sampled crops always succeed here: check the distributions.
        assert 0.24 <= h * w / (600 * 800) <= 1.0
        assert 0.74 <= w / h <= 1.35


def test_center_square_box():
  assert decode.center_square_box((600, 800)) == (0, 100, 600, 600)
  assert decode.center_square_box((801, 300)) == (250, 0, 300, 300)
