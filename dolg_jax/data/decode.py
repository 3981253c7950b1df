"""Image decoding for the input pipelines: any stored bytes -> RGB uint8, fast.

Fast path (chosen by measurement, see `dolg_jax.tools.bench_data`): JPEG bytes are decoded by libjpeg-turbo
through `simplejpeg`, with decode-time DCT downscaling (1/2, 1/4, 1/8) whenever the crop that will be
kept is at least twice the output size, then the crop is resized with OpenCV's bilinear `resize`
(about 10x faster than Pillow's at 512x512). Whatever simplejpeg cannot read (PNG bytes under a .jpg
name, exotic JPEGs) falls back to Pillow, which also handles palette, alpha and 16-bit modes; every
path returns (H, W, 3) uint8 RGB. Grayscale and CMYK JPEGs are converted to RGB by libjpeg-turbo.

Boxes are `(top, left, height, width)` in ORIGINAL image pixels, whatever scale the decoder picks.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Tuple

import numpy as np
from PIL import Image
import simplejpeg

try:  # OpenCV is the fast resizer; Pillow is the fallback if it is not installed.
  import cv2
  cv2.setNumThreads(1)  # One thread per worker process: grain parallelises across processes.
except ImportError:  # pragma: no cover - exercised only where opencv is absent.
  cv2 = None

Box = Tuple[int, int, int, int]  # (top, left, height, width)

_JPEG_MAGIC = b'\xff\xd8'


class DecodeError(ValueError):
  """The bytes are not an image we can decode (message says why)."""


def is_jpeg(data: bytes) -> bool:
  return data[:2] == _JPEG_MAGIC


def image_size(data: bytes) -> Tuple[int, int]:
  """(height, width) of the encoded image, reading only its header."""
  if is_jpeg(data):
    try:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      return int(h), int(w)
    except ValueError:
      pass
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
  except Exception as e:  # Pillow raises several types for bad data.
    raise DecodeError(f'cannot read image header: {e}') from e
  return int(h), int(w)


def _pil_to_rgb(im: Image.Image) -> np.ndarray:
  if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
    im = im.convert('RGBA')
    background = Image.new('RGBA', im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(background, im)
  if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
    arr = np.asarray(im, dtype=np.float64)
    scale = 255.0 / max(float(arr.max()), 1.0)
    im = Image.fromarray((arr * scale).round().astype(np.uint8), mode='L')
  return np.asarray(im.convert('RGB'))


def decode_rgb(data: bytes, *, min_height: int = 0, min_width: int = 0,
               strict: bool = False, fast: bool = True) -> np.ndarray:
  """Decodes image bytes to (H, W, 3) uint8 RGB.

  Args:
    data: encoded image (JPEG of any colour space, or anything Pillow reads).
    min_height, min_width: the decoder may downscale by 2, 4 or 8 in the DCT domain as long as the
      result keeps at least this size (0: full size).
    strict: raise on recoverable JPEG errors (truncated data) instead of returning a partial image.
    fast: libjpeg-turbo's fast DCT and upsampling (a few % faster, imperceptible difference).

  Raises:
    DecodeError: the bytes cannot be decoded (the message gives the reason).
  """
  if not data:
    raise DecodeError('empty file')
  jpeg_error = None
  if is_jpeg(data):
    try:
      return simplejpeg.decode_jpeg(data, colorspace='RGB', fastdct=fast, fastupsample=fast,
                                    min_height=max(int(min_height), 0),
                                    min_width=max(int(min_width), 0), strict=strict)
    except ValueError as e:
      jpeg_error = e  # Retry with Pillow: it reads some JPEGs that libjpeg-turbo's API rejects.
  try:
    with Image.open(io.BytesIO(data)) as im:
      if im.format == 'JPEG' and (min_height or min_width):
        im.draft(im.mode, (max(int(min_width), 1), max(int(min_height), 1)))
      if strict:
        im.load()
      return _pil_to_rgb(im)
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad data.
    if isinstance(e, Image.UnidentifiedImageError):
      reason = f'not a recognised image format (first bytes {bytes(data[:12])!r})'
    else:
      reason = f'{type(e).__name__}: {e}'
    if jpeg_error is not None:
      reason = f'libjpeg-turbo: {jpeg_error}; Pillow: {reason}'
    raise DecodeError(reason) from e


def check_decodable(data: bytes) -> Optional[str]:
  """None if `data` decodes cleanly (strict, at 1/8 scale to be quick), else the reason."""
  try:
    img = decode_rgb(data, min_height=1, min_width=1, strict=True)
  except DecodeError as e:
    return str(e)
  if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
    return f'decoded to unexpected shape {img.shape}'
  return None


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of (H, W, 3) uint8 (OpenCV if available, else Pillow)."""
  if img.shape[0] == height and img.shape[1] == width:
    return np.ascontiguousarray(img)
  if cv2 is not None:
    shrink = img.shape[0] >= 2 * height and img.shape[1] >= 2 * width
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=interp)
  return np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR))


def decode_crop_resize(data: bytes, box: Box, size: Tuple[int, int], *,
                       image_hw: Optional[Tuple[int, int]] = None, flip: bool = False
                       ) -> np.ndarray:
  """Decodes the `box` of the image and resizes it to `size` = (height, width); uint8 RGB.

  The decoder downscales in the DCT domain as far as it can while the crop keeps at least `size`
  pixels, so large images cost a fraction of a full decode.
  """
  if image_hw is None:
    image_hw = image_size(data)
  full_h, full_w = image_hw
  top, left, h, w = box
  out_h, out_w = size
  min_h = math.ceil(full_h * out_h / max(h, 1))
  min_w = math.ceil(full_w * out_w / max(w, 1))
  img = decode_rgb(data, min_height=min_h, min_width=min_w)
  sy, sx = img.shape[0] / full_h, img.shape[1] / full_w
  y0 = min(int(round(top * sy)), img.shape[0] - 1)
  x0 = min(int(round(left * sx)), img.shape[1] - 1)
  y1 = max(min(int(round((top + h) * sy)), img.shape[0]), y0 + 1)
  x1 = max(min(int(round((left + w) * sx)), img.shape[1]), x0 + 1)
  out = resize(img[y0:y1, x0:x1], out_h, out_w)
  if flip:
    out = np.ascontiguousarray(out[:, ::-1])
  return out


def random_resized_crop_box(rng: np.random.Generator, image_hw: Tuple[int, int],
                            scale: Tuple[float, float], ratio: Tuple[float, float],
                            attempts: int = 10) -> Box:
  """Inception-style crop: area fraction in `scale`, aspect w/h log-uniform in `ratio`.

  Falls back to the central crop with the aspect clamped to `ratio` (torchvision's rule).
  """
  height, width = image_hw
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    w, h = width, height
  h, w = max(min(h, height), 1), max(min(w, width), 1)
  return (height - h) // 2, (width - w) // 2, h, w


def center_square_box(image_hw: Tuple[int, int]) -> Box:
  """The largest central square (= resize the short side, then centre-crop)."""
  height, width = image_hw
  side = min(height, width)
  return (height - side) // 2, (width - side) // 2, side, side


def naive_crop_resize(data: bytes, box: Box, size: Tuple[int, int]) -> np.ndarray:
  """Baseline for the benchmark: full Pillow decode, crop, resize (Pillow's default filter)."""
  top, left, h, w = box
  with Image.open(io.BytesIO(data)) as im:
    im = im.convert('RGB').crop((left, top, left + w, top + h)).resize((size[1], size[0]))
  return np.asarray(im)
