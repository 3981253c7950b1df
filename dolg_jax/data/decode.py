"""Image decoding for the input pipelines: any stored bytes -> (H, W, 3) uint8 RGB, EXIF orientation
applied.

`decode_rgb(data, fast=False)`: by default pixel for pixel `cv2.imread(path)[..., ::-1]` (what the
official code reads; evaluation always decodes so); `fast=True` decodes JPEGs with simplejpeg's
fast DCT and DCT-domain downscaling (a few grey levels off). Bytes OpenCV cannot read go to Pillow.
`decode_crop_resize` decodes a box `(top, left, height, width)` (pixels of the oriented full-size
image, whatever scale the decoder picks) and resizes it (`resize`, OpenCV); `image_size` reads
only headers; `check_decodable` gives the reason bytes do not decode cleanly. Bytes that cannot
be decoded raise `DecodeError`. Both routes in detail: docs/design_notes.md.
"""

from __future__ import annotations

import io
import math
from typing import Optional, Tuple

import cv2
import numpy as np
from PIL import Image
from PIL import ImageOps
import simplejpeg

cv2.setNumThreads(1)  # One thread per worker process: grain parallelises across processes.

Box = Tuple[int, int, int, int]  # (top, left, height, width)

_JPEG_MAGIC = b'\xff\xd8'


class DecodeError(ValueError):
  """The bytes are not an image we can decode (message says why)."""


def is_jpeg(data: bytes) -> bool:
  return data[:2] == _JPEG_MAGIC


_EXIF_ORIENTATION_TAG = 0x0112
# Orientations whose transform swaps height and width (EXIF 5-8).
_TRANSPOSING = (5, 6, 7, 8)


def exif_orientation(data: bytes) -> int:
  """The EXIF orientation tag (1-8) of the encoded image; 1 when absent, unreadable or invalid."""
  try:
    with Image.open(io.BytesIO(data)) as im:
      value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception:  # noqa: BLE001  # No readable EXIF: no transform, as OpenCV.
    return 1
  try:
    value = int(value)
  except (TypeError, ValueError):
    return 1
  return value if 1 <= value <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
  """Displays a stored (H, W, C) image as EXIF `orientation` asks (OpenCV's eight transforms).

  2 mirror left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise,
  7 transverse, 8 rotate 90 counter-clockwise; 1 (and anything else) unchanged.
  """
  if orientation in _TRANSPOSING:
    img = img.transpose(1, 0, *range(2, img.ndim))
  if orientation in (2, 3, 6, 7):
    img = img[:, ::-1]
  if orientation in (3, 4, 7, 8):
    img = img[::-1]
  return np.ascontiguousarray(img)


def image_size(data: bytes) -> Tuple[int, int]:
  """(height, width) of the image as decoded (EXIF orientation applied), reading only headers."""
  if is_jpeg(data):
    try:
      h, w, _, _ = simplejpeg.decode_jpeg_header(data)
      h, w = int(h), int(w)
    except ValueError:
      pass
    else:
      return (w, h) if exif_orientation(data) in _TRANSPOSING else (h, w)
  try:
    with Image.open(io.BytesIO(data)) as im:
      w, h = im.size
      orientation = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
  except Exception as e:  # Pillow raises several types for bad data.
    raise DecodeError(f'cannot read image header: {e}') from e
  return (int(w), int(h)) if orientation in _TRANSPOSING else (int(h), int(w))


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


def _decode_pillow(data: bytes, min_height: int, min_width: int) -> np.ndarray:
  """Pillow route for bytes OpenCV cannot read (and strict validation); raises on truncation."""
  with Image.open(io.BytesIO(data)) as im:
    if im.format == 'JPEG' and (min_height or min_width):
      im.draft(im.mode, (max(int(min_width), 1), max(int(min_height), 1)))
    im.load()
    return _pil_to_rgb(ImageOps.exif_transpose(im))


def _reason(e: Exception) -> str:
  if isinstance(e, Image.UnidentifiedImageError):
    return 'not a recognised image format'  # never the file's bytes (a link may point anywhere)
  return f'{type(e).__name__}: {e}'


def decode_rgb(
  data: bytes, *, min_height: int = 0, min_width: int = 0, strict: bool = False, fast: bool = False
) -> np.ndarray:
  """Decodes image bytes to (H, W, 3) uint8 RGB with the EXIF orientation applied.

  With the defaults, the result equals `cv2.imread(path)[..., ::-1]` for the same file, pixel for
  pixel (docs/design_notes.md).

  Args:
    data: encoded image (JPEG of any colour space, PNG, or anything OpenCV or Pillow reads).
    min_height, min_width: the fast route may downscale JPEGs by 2, 4 or 8 in the DCT domain as long
      as the (oriented) result keeps at least this size (0: full size); the exact route never
      downscales.
    strict: raise on recoverable JPEG errors (corrupt or truncated data, checked with
      libjpeg-turbo's strict mode) instead of returning a partially decoded image.
    fast: the fast route (simplejpeg, fast DCT and upsampling, DCT downscaling) for JPEGs.

  Raises:
    DecodeError: the bytes cannot be decoded (the message gives the reason).
  """
  if not data:
    raise DecodeError('empty file')
  jpeg_error = None
  if is_jpeg(data) and (fast or strict):
    orientation = exif_orientation(data)
    min_h, min_w = max(int(min_height), 0), max(int(min_width), 0)
    if orientation in _TRANSPOSING:
      min_h, min_w = min_w, min_h
    try:
      img = simplejpeg.decode_jpeg(
        data,
        colorspace='RGB',
        fastdct=True,
        fastupsample=True,
        min_height=min_h if fast else 1,
        min_width=min_w if fast else 1,
        strict=strict,
      )
    except ValueError as e:
      # libjpeg-turbo's simple API rejects some JPEGs that the full one (OpenCV) or Pillow reads.
      jpeg_error = e
    else:
      if fast:
        return apply_orientation(img, orientation)
  if jpeg_error is not None and strict:
    try:  # Pillow decides: it also rejects truncated data.
      _decode_pillow(data, 1, 1)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad data.
      raise DecodeError(f'libjpeg-turbo: {jpeg_error}; Pillow: {_reason(e)}') from e
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  if bgr is not None:
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
  if is_jpeg(data) and not strict:
    # Truncated JPEG: cv2.imdecode gives up, but cv2.imread returns the decoded part (missing
    # blocks grey); libjpeg-turbo's accurate route through simplejpeg returns the same pixels.
    try:
      img = simplejpeg.decode_jpeg(
        data, colorspace='RGB', fastdct=False, fastupsample=False, strict=False
      )
    except ValueError as e:
      jpeg_error = e
    else:
      return apply_orientation(img, exif_orientation(data))
  try:  # Formats (or files) OpenCV cannot read.
    return _decode_pillow(data, min_height, min_width)
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad data.
    reason = _reason(e)
    if jpeg_error is not None:
      reason = f'libjpeg-turbo: {jpeg_error}; Pillow: {reason}'
    raise DecodeError(f'OpenCV cannot decode it; {reason}') from e


def check_decodable(data: bytes) -> Optional[str]:
  """None if `data` decodes cleanly (strict, fast route at 1/8 scale: quick), else the reason."""
  try:
    img = decode_rgb(data, min_height=1, min_width=1, strict=True, fast=True)
  except DecodeError as e:
    return str(e)
  if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] < 1 or img.shape[1] < 1:
    return f'decoded to unexpected shape {img.shape}'
  return None


def resize(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of (H, W, 3) uint8 with OpenCV (area averaging when shrinking 2x or more)."""
  if img.shape[0] == height and img.shape[1] == width:
    return np.ascontiguousarray(img)
  shrink = img.shape[0] >= 2 * height and img.shape[1] >= 2 * width
  interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
  return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=interp)


def decode_crop_resize(
  data: bytes,
  box: Box,
  size: Tuple[int, int],
  *,
  image_hw: Optional[Tuple[int, int]] = None,
  flip: bool = False,
  fast: bool = False,
) -> np.ndarray:
  """Decodes the `box` of the image and resizes it to `size` = (height, width); uint8 RGB.

  `fast`: the fast route of `decode_rgb`, which downscales in the DCT domain as far as it can while
  the crop keeps at least `size` pixels, so large images cost a fraction of a full decode. The
  default decodes exactly as `cv2.imread` (full size), then crops.
  """
  if image_hw is None:
    image_hw = image_size(data)
  full_h, full_w = image_hw
  top, left, h, w = box
  out_h, out_w = size
  min_h = math.ceil(full_h * out_h / max(h, 1))
  min_w = math.ceil(full_w * out_w / max(w, 1))
  img = decode_rgb(data, min_height=min_h, min_width=min_w, fast=fast)
  sy, sx = img.shape[0] / full_h, img.shape[1] / full_w
  y0 = min(int(round(top * sy)), img.shape[0] - 1)
  x0 = min(int(round(left * sx)), img.shape[1] - 1)
  y1 = max(min(int(round((top + h) * sy)), img.shape[0]), y0 + 1)
  x1 = max(min(int(round((left + w) * sx)), img.shape[1]), x0 + 1)
  out = resize(img[y0:y1, x0:x1], out_h, out_w)
  if flip:
    out = np.ascontiguousarray(out[:, ::-1])
  return out


def random_resized_crop_box(
  rng: np.random.Generator,
  image_hw: Tuple[int, int],
  scale: Tuple[float, float],
  ratio: Tuple[float, float],
  attempts: int = 10,
) -> Box:
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
