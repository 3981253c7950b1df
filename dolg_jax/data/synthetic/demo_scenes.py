"""Procedural landmark-like scenes for the embedded demo.

A *place* is a fixed random composition: a sky/ground backdrop, a building facade with a window
grid, and a few distinctive coloured shapes (towers, domes, banners). A *view* of a place renders it
under a random camera (perspective warp, scale, rotation, translation), lighting (brightness,
contrast, colour cast) and occlusion, then crops it. Views of the same place share the geometry and
colours of its parts, views of different places do not: the retrieval task a DOLG has to learn from
them.

Everything is deterministic given the seeds, and pure NumPy + Pillow.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

CANVAS = 320  # Side of the canvas a place is drawn on before the camera warp.


@dataclasses.dataclass(frozen=True)
class Place:
  """Parameters of one place; `draw` renders it on a CANVAS x CANVAS image."""

  sky: tuple[tuple[int, int, int], tuple[int, int, int]]
  ground: tuple[int, int, int]
  horizon: int
  facade_box: tuple[int, int, int, int]
  facade_color: tuple[int, int, int]
  window_color: tuple[int, int, int]
  window_grid: tuple[int, int]
  shapes: tuple[tuple, ...]

  def draw(self) -> Image.Image:
    ramp = np.linspace(0.0, 1.0, CANVAS, dtype=np.float32)[:, None, None]
    top, bottom = (np.array(c, np.float32) for c in self.sky)
    arr = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (CANVAS, CANVAS, 3)).copy()
    arr[self.horizon :] = self.ground
    img = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = self.facade_box
    d.rectangle(self.facade_box, fill=self.facade_color)
    cols, rows = self.window_grid
    cw, rh = (x1 - x0) / cols, (y1 - y0) / rows
    for i in range(cols):
      for j in range(rows):
        wx, wy = x0 + i * cw, y0 + j * rh
        d.rectangle(
          (wx + cw * 0.25, wy + rh * 0.2, wx + cw * 0.75, wy + rh * 0.7), fill=self.window_color
        )
    for kind, box, color in self.shapes:
      if kind == 'ellipse':
        d.ellipse(box, fill=color)
      elif kind == 'rect':
        d.rectangle(box, fill=color)
      elif kind == 'triangle':
        bx0, by0, bx1, by1 = box
        d.polygon([(bx0, by1), ((bx0 + bx1) / 2, by0), (bx1, by1)], fill=color)
      else:  # stripes
        bx0, by0, bx1, by1 = box
        for k, sx in enumerate(np.linspace(bx0, bx1, 7)[:-1]):
          if k % 2 == 0:
            d.rectangle((sx, by0, sx + (bx1 - bx0) / 6, by1), fill=color)
    return img


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
  return tuple(int(v) for v in rng.integers(0, 256, size=3))


def make_place(seed: int) -> Place:
  """The place with this seed (different seeds give different places)."""
  rng = np.random.default_rng([seed, 7919])
  horizon = int(rng.integers(CANVAS * 0.55, CANVAS * 0.8))
  fw, fh = int(rng.integers(90, 200)), int(rng.integers(70, 170))
  fx = int(rng.integers(10, CANVAS - fw - 10))
  facade = (fx, horizon - fh, fx + fw, horizon)
  shapes = []
  for _ in range(int(rng.integers(3, 7))):
    kind = str(rng.choice(['ellipse', 'rect', 'triangle', 'stripes']))
    w, h = int(rng.integers(25, 110)), int(rng.integers(25, 130))
    x, y = int(rng.integers(0, CANVAS - w)), int(rng.integers(10, horizon - 10))
    shapes.append((kind, (x, y, x + w, min(y + h, CANVAS - 1)), _color(rng)))
  return Place(
    sky=(_color(rng), _color(rng)),
    ground=_color(rng),
    horizon=horizon,
    facade_box=facade,
    facade_color=_color(rng),
    window_color=_color(rng),
    window_grid=(int(rng.integers(2, 7)), int(rng.integers(2, 6))),
    shapes=tuple(shapes),
  )


def _perspective_coeffs(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
  """Coefficients of PIL's PERSPECTIVE transform mapping output points `dst` to inputs `src`."""
  a = []
  for (x, y), (u, v) in zip(dst, src):
    a.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
    a.append([0, 0, 0, x, y, 1, -v * x, -v * y])
  return np.linalg.solve(np.asarray(a, np.float64), src.reshape(-1).astype(np.float64))


def render_view(
  place: Place, seed: int, *, size: tuple[int, int], difficulty: float = 0.5, occlusion: float = 0.0
) -> Image.Image:
  """One RGB photo of `place` of the given (width, height).

  difficulty in [0, 1] scales the camera change (0: frontal, full view; 1: strong perspective, zoom
  and rotation, harsh lighting); occlusion in [0, 1] is the fraction of the frame a random occluder
  may cover.
  """
  rng = np.random.default_rng([seed, 104729])
  base = place.draw()
  w, h = size
  # Camera: a random quadrilateral of the canvas is mapped onto the output frame.
  zoom = 1.0 - rng.uniform(0.0, 0.45) * difficulty
  cx = CANVAS / 2 + rng.uniform(-0.2, 0.2) * CANVAS * difficulty
  cy = CANVAS / 2 + rng.uniform(-0.15, 0.15) * CANVAS * difficulty
  half_w = CANVAS * zoom / 2
  half_h = half_w * h / w
  angle = np.deg2rad(rng.uniform(-12, 12) * difficulty)
  corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
  corners = corners * (1 + rng.uniform(-0.18, 0.18, size=(4, 2)) * difficulty)
  rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  src = corners @ rot.T + [cx, cy]
  dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
  img = base.transform(
    (w, h),
    Image.Transform.PERSPECTIVE,
    _perspective_coeffs(src, dst),
    resample=Image.Resampling.BILINEAR,
    fillcolor=place.ground,
  )
  # Lighting.
  img = ImageEnhance.Brightness(img).enhance(1 + rng.uniform(-0.35, 0.35) * (0.3 + difficulty))
  img = ImageEnhance.Contrast(img).enhance(1 + rng.uniform(-0.3, 0.3) * (0.3 + difficulty))
  cast = 1 + rng.uniform(-0.12, 0.12, size=3) * (0.3 + difficulty)
  arr = np.clip(np.asarray(img, np.float32) * cast, 0, 255)
  arr += rng.normal(0, 3.0, size=arr.shape)  # sensor noise
  img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
  if occlusion > 0:
    d = ImageDraw.Draw(img)
    ow = int(w * np.sqrt(occlusion) * rng.uniform(0.6, 1.0))
    oh = int(h * np.sqrt(occlusion) * rng.uniform(0.6, 1.0))
    ox, oy = int(rng.integers(0, max(1, w - ow))), int(rng.integers(0, max(1, h - oh)))
    d.rectangle((ox, oy, ox + ow, oy + oh), fill=_color(rng))
  if rng.uniform() < 0.3:
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.2))))
  return img


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format='JPEG', quality=quality)
  return buf.getvalue()
