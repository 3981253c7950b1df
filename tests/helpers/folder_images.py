"""Class folders of small images for the folder dataset's tests: one colour per class plus noise, so
that a tiny model can tell the classes apart."""

import os

import cv2
import numpy as np


def image(seed: int, colour, size: int = 64) -> np.ndarray:
  rng = np.random.default_rng(seed)
  base = np.broadcast_to(np.asarray(colour, np.float32), (size, size + 8, 3))
  return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


def write_classes(
  root: str, counts: dict, *, size: int = 64, seed: int = 0, ext: str = '.jpg'
) -> dict:
  """Writes counts[name] images into root/name/ (deterministic); returns {name: [paths]}."""
  out = {}
  for k, (name, n) in enumerate(sorted(counts.items())):
    colour = np.random.default_rng([seed, k]).integers(0, 256, 3)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    out[name] = []
    for i in range(n):
      path = os.path.join(folder, f'{i:03d}{ext}')
      assert cv2.imwrite(path, image(seed * 1000 + k * 100 + i, colour, size)[..., ::-1])
      out[name].append(path)
  return out
