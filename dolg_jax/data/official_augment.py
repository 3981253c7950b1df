"""The official DOLG training augmentation (`config.data.augmentation = 'official'`).

Reproduces pycls's ImageNet pipeline (random-sized crop -> horizontal flip -> AlexNet PCA lighting
-> normalisation) draw for draw on an RGB image, with an explicit random generator. Two forms of
the same draws: `official_train_example` (training: uint8 image plus a (3,) float32 'lighting'
offset on the [0, 255] scale, added on the device) and `official_train_image` / `augment_rgb`
(float32 reference, pycls' own order); they differ by at most 1 grey level per pixel. The draws of
`random_sized_crop`, `horizontal_flip`, `lighting_offset`, and the differences from pycls:
docs/design_notes.md.
"""

from __future__ import annotations

import math
from typing import Tuple

import cv2
import numpy as np

from dolg_jax.data import decode

# pycls datasets/imagenet.py: eigenvalues and eigenvectors (rows: R, G, B) of the ImageNet pixel
# covariance, on the [0, 1] scale.
EIG_VALS = np.array([0.2175, 0.0188, 0.0045])
EIG_VECS = np.array(
  [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]
)
LIGHTING_STD = 0.1
MAX_ITER = 10


def _resize_float(im: np.ndarray, height: int, width: int) -> np.ndarray:
  return cv2.resize(
    np.ascontiguousarray(im, np.float32), (width, height), interpolation=cv2.INTER_LINEAR
  )


def scale_short_side(size: int, im: np.ndarray) -> np.ndarray:
  """pycls `scale`: short side -> size, long side floor(long / short * size); bilinear."""
  h, w = im.shape[:2]
  if (w <= h and w == size) or (h <= w and h == size):
    return im
  h_new, w_new = size, size
  if w < h:
    h_new = int(math.floor(float(h) / w * size))
  else:
    w_new = int(math.floor(float(w) / h * size))
  return _resize_float(im, h_new, w_new)


def center_crop(size: int, im: np.ndarray) -> np.ndarray:
  """pycls `center_crop`: corner at ceil((side - size) / 2)."""
  h, w = im.shape[:2]
  y = int(math.ceil((h - size) / 2))
  x = int(math.ceil((w - size) / 2))
  return im[y : y + size, x : x + size]


def random_sized_crop(
  im: np.ndarray,
  size: int,
  rng,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  max_iter: int = MAX_ITER,
) -> np.ndarray:
  """pycls `random_sized_crop` on an (H, W, C) float32 image (docs/design_notes.md).

  `rng` needs `uniform(low, high)`, `uniform()` and `integers(low, high)` (numpy Generator).
  """
  box = random_sized_crop_box(im.shape[0], im.shape[1], rng, area_frac, ratio, max_iter)
  if box is None:
    return np.asarray(center_crop(size, scale_short_side(size, im)), np.float32)
  y, x, h, w = box
  return _resize_float(im[y : y + h, x : x + w], size, size)


def random_sized_crop_box(
  h: int,
  w: int,
  rng,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  max_iter: int = MAX_ITER,
) -> Tuple[int, int, int, int] | None:
  """The draws of `random_sized_crop` for an h x w image: the (top, left, height, width) box, or
  None after `max_iter` misses (then: scale the short side and take the centre crop)."""
  area = h * w
  for _ in range(max_iter):
    target_area = rng.uniform(area_frac, 1.0) * area
    aspect = rng.uniform(ratio[0], ratio[1])
    w_crop = int(round(math.sqrt(float(target_area) * aspect)))
    h_crop = int(round(math.sqrt(float(target_area) / aspect)))
    if rng.uniform() < 0.5:
      w_crop, h_crop = h_crop, w_crop
    if h_crop <= h and w_crop <= w:
      y = 0 if h_crop == h else int(rng.integers(0, h - h_crop))
      x = 0 if w_crop == w else int(rng.integers(0, w - w_crop))
      return y, x, h_crop, w_crop
  return None


def _resize_uint8(im: np.ndarray, height: int, width: int) -> np.ndarray:
  if im.shape[:2] == (height, width):
    return np.ascontiguousarray(im)
  return cv2.resize(np.ascontiguousarray(im), (width, height), interpolation=cv2.INTER_LINEAR)


def _scale_short_side_uint8(size: int, im: np.ndarray) -> np.ndarray:
  h, w = im.shape[:2]
  if (w <= h and w == size) or (h <= w and h == size):
    return im
  if w < h:
    return _resize_uint8(im, int(math.floor(float(h) / w * size)), size)
  return _resize_uint8(im, size, int(math.floor(float(w) / h * size)))


def augment_rgb_uint8(
  rgb: np.ndarray,
  size: int,
  rng,
  *,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  lighting_std: float = LIGHTING_STD,
) -> Tuple[np.ndarray, np.ndarray]:
  """The uint8 form of `augment_rgb` (same draws): (uint8 (size, size, 3) image, float32 (3,) RGB
  lighting offset on the [0, 255] scale, to be added after the conversion to float)."""
  box = random_sized_crop_box(rgb.shape[0], rgb.shape[1], rng, area_frac, ratio)
  if box is None:
    im = center_crop(size, _scale_short_side_uint8(size, rgb))
  else:
    y, x, h, w = box
    im = _resize_uint8(rgb[y : y + h, x : x + w], size, size)
  if flip:
    im = horizontal_flip(im, rng)
  offset = (255.0 * lighting_offset(rng, lighting_std)).astype(np.float32)
  return np.ascontiguousarray(im), offset


def official_train_example(
  data: bytes,
  size: int,
  rng,
  *,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  lighting_std: float = LIGHTING_STD,
) -> Tuple[np.ndarray, np.ndarray]:
  """Encoded image bytes -> (uint8 image, float32 (3,) lighting offset); see the module doc."""
  return augment_rgb_uint8(
    decode.decode_rgb(data),
    size,
    rng,
    area_frac=area_frac,
    ratio=ratio,
    flip=flip,
    lighting_std=lighting_std,
  )


def horizontal_flip(im: np.ndarray, rng, p: float = 0.5) -> np.ndarray:
  """pycls `horizontal_flip` (HWC): flips when U(0, 1) < p."""
  if rng.uniform() < p:
    return im[:, ::-1]
  return im


def lighting_offset(rng, alpha_std: float = LIGHTING_STD) -> np.ndarray:
  """(3,) RGB offset on the [0, 1] scale of pycls `lighting` (zeros, no draw, for alpha_std 0)."""
  if alpha_std == 0:
    return np.zeros(3)
  alpha = rng.normal(0.0, alpha_std, size=(1, 3))
  return np.sum(EIG_VECS * (alpha * EIG_VALS[None, :]), axis=1)


def augment_rgb(
  rgb: np.ndarray,
  size: int,
  rng,
  *,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  lighting_std: float = LIGHTING_STD,
) -> np.ndarray:
  """Crop, flip and lighting of a decoded (H, W, 3) RGB image -> float32 (size, size, 3), [0, 255]
  scale."""
  im = random_sized_crop(np.asarray(rgb, np.float32), size, rng, area_frac, ratio)
  if flip:
    im = horizontal_flip(im, rng)
  offset = (255.0 * lighting_offset(rng, lighting_std)).astype(np.float32)
  return np.ascontiguousarray(im + offset[None, None, :], np.float32)


def official_train_image(
  data: bytes,
  size: int,
  rng,
  *,
  area_frac: float = 0.08,
  ratio: Tuple[float, float] = (3 / 4, 4 / 3),
  flip: bool = True,
  lighting_std: float = LIGHTING_STD,
) -> np.ndarray:
  """Encoded image bytes -> the official training image (float32 RGB, [0, 255] scale)."""
  return augment_rgb(
    decode.decode_rgb(data),
    size,
    rng,
    area_frac=area_frac,
    ratio=ratio,
    flip=flip,
    lighting_std=lighting_std,
  )
