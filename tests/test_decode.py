"""Tests of dolg_jax.data.decode: every stored mode decodes to RGB; fast crop-resize is accurate;
the default route equals `cv2.imread(path)[..., ::-1]` pixel for pixel on files written to disk
(EXIF orientations 1-8, progressive, grayscale, CMYK, PNG incl. RGBA/16-bit/palette/EXIF)."""

import io

import cv2
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


@pytest.mark.parametrize(
  'mode,fmt,tol',
  [
    (None, 'JPEG', 4.0),
    ('CMYK', 'JPEG', 4.0),
    (None, 'PNG', 0.0),
    ('RGBA', 'PNG', 0.0),
    ('P', 'PNG', 0.0),
  ],
)
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


def test_rgba_png_drops_alpha_like_imread_and_pillow_fallback_composites_on_white():
  rgba = np.zeros((10, 10, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[:, :5, 3] = 255  # Left half opaque red, right half fully transparent.
  # PNG: OpenCV reads it; IMREAD_COLOR drops the alpha channel (no compositing).
  img = decode.decode_rgb(_encode(rgba, 'PNG'))
  np.testing.assert_array_equal(img, np.broadcast_to([200, 0, 0], (10, 10, 3)))
  # TGA: OpenCV cannot read it (cv2.imread returns None): Pillow composites on white.
  img = decode.decode_rgb(_encode(rgba, 'TGA'))
  np.testing.assert_array_equal(img[:, :5], np.broadcast_to([200, 0, 0], (10, 5, 3)))
  np.testing.assert_array_equal(img[:, 5:], np.full((10, 5, 3), 255))


def test_check_decodable_reports_bad_files():
  good = _encode(_smooth(64, 64), 'JPEG', quality=90)
  assert decode.check_decodable(good) is None
  assert 'Premature end' in decode.check_decodable(good[: len(good) // 2])
  assert 'not a recognised image' in decode.check_decodable(b'<html>403</html>' * 4)
  assert decode.check_decodable(b'') == 'empty file'
  with pytest.raises(decode.DecodeError):
    decode.decode_rgb(b'\xff\xd8garbage')


def test_dct_downscaled_decode_matches_full_resolution():
  src = _smooth(640, 800, seed=2)
  data = _encode(src, 'JPEG', quality=95)
  box = (100, 40, 400, 560)
  # Output 64: crop 400x560 -> the decoder may use 1/4 scale (crop stays >= 64 px).
  small = decode.decode_rgb(
    data, min_height=640 * 64 // 400 + 1, min_width=800 * 64 // 560 + 1, fast=True
  )
  assert small.shape[0] < 640 // 2
  fast = decode.decode_crop_resize(data, box, (64, 64), fast=True).astype(float)
  ref = np.asarray(
    Image.fromarray(src)
    .crop((40, 100, 600, 500))
    .resize((64, 64), Image.BILINEAR, reducing_gap=None)
  ).astype(float)
  assert fast.shape == (64, 64, 3)
  assert np.abs(fast - ref).mean() < 4.0
  # Upscaling path (crop smaller than the output): no downscaling, same picture.
  fast512 = decode.decode_crop_resize(data, box, (512, 512), fast=True).astype(float)
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


# ------------------------------------------------------------------ exact route == cv2.imread
def _with_orientation(arr, orientation, progressive=False, fmt='JPEG', **kw):
  im = Image.fromarray(arr)
  exif = im.getexif()
  exif[0x0112] = orientation
  buf = io.BytesIO()
  if fmt == 'JPEG':
    kw.update(quality=90, progressive=progressive)
  im.save(buf, fmt, exif=exif.tobytes(), **kw)
  return buf.getvalue()


def _imread_cases():
  """name -> encoded bytes of every case the exact route must read as cv2.imread does."""
  src = _smooth(48, 80, seed=4)  # Non-square: orientations 5-8 swap height and width.
  cases = {f'exif{o}': _with_orientation(src, o) for o in range(1, 9)}
  cases.update(
    {f'exif{o}_progressive': _with_orientation(src, o, progressive=True) for o in (1, 6, 7)}
  )
  cases['progressive'] = _encode(src, 'JPEG', quality=90, progressive=True)
  cases['grayscale'] = _encode(src, 'JPEG', 'L', quality=90)
  cases['grayscale_exif8'] = _with_orientation(np.asarray(Image.fromarray(src).convert('L')), 8)
  cases['cmyk'] = _encode(src, 'JPEG', 'CMYK', quality=90)
  cases['subsampling444'] = _encode(src, 'JPEG', quality=90, subsampling=0)
  cases['png'] = _encode(src, 'PNG')
  cases['png_exif6'] = _with_orientation(src, 6, fmt='PNG')
  cases['png_rgba'] = _encode(np.dstack([src, src[..., :1]]), 'PNG')
  cases['png_gray_alpha'] = _encode(np.dstack([src, src[..., :1]]), 'PNG', 'LA')
  cases['png_palette'] = _encode(src, 'PNG', 'P')
  rng = np.random.default_rng(5)
  for name, shape in (('png_gray16', (48, 80)), ('png_bgr16', (48, 80, 3))):
    ok, buf = cv2.imencode('.png', rng.integers(0, 65536, shape, dtype=np.uint16))
    assert ok
    cases[name] = buf.tobytes()
  return cases


@pytest.fixture(scope='module')
def imread_files(tmp_path_factory):
  root = tmp_path_factory.mktemp('imread')
  out = {}
  for name, data in _imread_cases().items():
    path = root / (name + ('.png' if data[:4] == b'\x89PNG' else '.jpg'))
    path.write_bytes(data)
    out[name] = (str(path), data)
  return out


def test_default_decode_equals_cv2_imread_pixel_for_pixel(imread_files):
  for name, (path, data) in imread_files.items():
    ref = cv2.imread(path)
    assert ref is not None, name
    img = decode.decode_rgb(data)
    assert img.dtype == np.uint8 and img.flags.c_contiguous, name
    np.testing.assert_array_equal(img, ref[..., ::-1], err_msg=name)
    assert decode.image_size(data) == img.shape[:2], name


def test_exif_orientations_are_the_eight_transforms(imread_files):
  upright = decode.decode_rgb(imread_files['exif1'][1]).astype(int)
  expected = {
    2: upright[:, ::-1],
    3: upright[::-1, ::-1],
    4: upright[::-1],
    5: upright.transpose(1, 0, 2),
    6: upright[::-1].transpose(1, 0, 2),
    7: upright[::-1, ::-1].transpose(1, 0, 2),
    8: upright[:, ::-1].transpose(1, 0, 2),
  }
  for o, want in expected.items():
    got = decode.decode_rgb(imread_files[f'exif{o}'][1]).astype(int)
    assert got.shape == want.shape, o
    # Lossless JPEG rotation is not what the writer did: the stored pixels were encoded as they
    # are, so the displayed image equals the transformed upright one up to JPEG noise.
    assert np.abs(got - want).mean() < 1.0, o
    assert decode.exif_orientation(imread_files[f'exif{o}'][1]) == o


@pytest.mark.parametrize(
  'name',
  [
    'exif1',
    'exif3',
    'exif5',
    'exif6',
    'exif7_progressive',
    'exif8',
    'grayscale_exif8',
    'cmyk',
    'progressive',
    'png_exif6',
  ],
)
def test_fast_route_applies_the_orientation_too(imread_files, name):
  path, data = imread_files[name]
  exact = cv2.imread(path)[..., ::-1].astype(float)
  fast = decode.decode_rgb(data, fast=True)
  assert fast.shape == exact.shape
  assert np.abs(fast - exact).mean() < 4.0  # Fast DCT + upsampling: a few grey levels.
  assert np.abs(fast - exact[::-1, ::-1]).mean() > 20  # A wrong orientation would be far off.
  # DCT downscaling keeps at least the requested size of the ORIENTED image.
  small = decode.decode_rgb(data, min_height=30, min_width=12, fast=True)
  assert small.shape[0] >= 30 and small.shape[1] >= 12
  if data[:2] == b'\xff\xd8':
    assert small.shape[0] * small.shape[1] < exact.shape[0] * exact.shape[1]
  # Crops are in oriented coordinates on both routes.
  box = (5, 3, exact.shape[0] - 10, exact.shape[1] - 6)
  a = decode.decode_crop_resize(data, box, (16, 16), fast=True).astype(float)
  b = decode.decode_crop_resize(data, box, (16, 16)).astype(float)
  assert np.abs(a - b).mean() < 4.0


def test_truncated_jpeg_reads_like_imread(tmp_path):
  data = _encode(_smooth(64, 64), 'JPEG', quality=90, progressive=True)
  for frac in (0.5, 0.9):
    cut = data[: int(len(data) * frac)]
    path = tmp_path / f'cut{frac}.jpg'
    path.write_bytes(cut)
    ref = cv2.imread(str(path))  # The decoded part, missing blocks grey.
    assert ref is not None and cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is None
    np.testing.assert_array_equal(decode.decode_rgb(cut), ref[..., ::-1])
    with pytest.raises(decode.DecodeError, match='Premature end'):
      decode.decode_rgb(cut, strict=True)
  with pytest.raises(decode.DecodeError):  # Header cut: cv2.imread returns None.
    decode.decode_rgb(data[:200])
