"""Small revisitop datasets in the exact official layouts, for tests and demos.

`write_gnd_fixture(root, name, ...)` writes root/jpg/<name>.jpg and root/gnd_<name>.pkl
({'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}); `write_r1m_fixture(root, n)`
writes revisitop1m.txt and the jpg/ tree (nested directories like the real one). Each landmark has
a colour: easy index images show it, hard ones 60% colour + 40% grey, junk ones 30% + 70% (plus
pixel noise); queries show it inside their box and grey outside, so a mean-colour descriptor of the
query CROP ranks easy, hard, then junk images of its landmark before grey distractors (tests rely
on it). `extra_index` adds named index images of given colours (outside every landmark).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Optional, Sequence

import numpy as np
from PIL import Image

PALETTE = np.array(
  [[200, 40, 40], [40, 180, 60], [40, 60, 200], [200, 200, 40], [160, 40, 200], [40, 200, 200]],
  np.float32,
)
GREY = np.full(3, 128.0, np.float32)


def jpeg_bytes(img: np.ndarray, quality: int = 95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def _image(rng, colour, h, w, noise=8.0):
  img = np.broadcast_to(colour, (h, w, 3)) + rng.normal(0, noise, (h, w, 3))
  return img


def write_gnd_fixture(
  root: str,
  name: str = 'roxford5k',
  *,
  num_landmarks: int = 3,
  per_landmark: Sequence[int] = (2, 1, 1),
  num_other: int = 4,
  queries_per_landmark: int = 1,
  sizes: Sequence[tuple[int, int]] = ((96, 128), (128, 96)),
  extra_index: Sequence[tuple[str, Sequence[float]]] = (),
  seed: int = 0,
) -> dict:
  """Writes a tiny roxford5k/rparis6k-style dataset; returns the gnd dict written.

  Per landmark L: per_landmark = (easy, hard, junk) counts of index images of colour L (hard ones
  60% colour + 40% grey, junk ones 30% colour). `num_other` index images are grey distractors.
  Each query shows colour L inside its box `bbx` and neutral grey outside.
  """
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'jpg'), exist_ok=True)
  imlist, qimlist, gnd = [], [], []
  per_lm_idx = []
  n_easy, n_hard, n_junk = per_landmark
  for lm in range(num_landmarks):
    groups = {'easy': [], 'hard': [], 'junk': []}
    colour = PALETTE[lm % len(PALETTE)]
    for kind, count, mix in (('easy', n_easy, 1.0), ('hard', n_hard, 0.6), ('junk', n_junk, 0.3)):
      for _ in range(count):
        groups[kind].append(len(imlist))
        imlist.append(f'lm{lm}_{kind}_{len(imlist):04d}')
        h, w = sizes[len(imlist) % len(sizes)]
        _save(root, imlist[-1], _image(rng, mix * colour + (1 - mix) * GREY, h, w))
    per_lm_idx.append(groups)
  for k in range(num_other):
    imlist.append(f'other_{k:04d}')
    h, w = sizes[k % len(sizes)]
    _save(root, imlist[-1], _image(rng, GREY, h, w, noise=30.0))
  for k, (extra_name, rgb) in enumerate(extra_index):
    imlist.append(extra_name)
    h, w = sizes[k % len(sizes)]
    _save(root, extra_name, _image(rng, np.asarray(rgb, np.float32), h, w))
  order = rng.permutation(len(imlist))  # shuffle so that indices are not grouped
  remap = np.empty_like(order)
  remap[order] = np.arange(len(order))
  imlist = [imlist[i] for i in order]
  for lm in range(num_landmarks):
    for qk in range(queries_per_landmark):
      qname = f'query_lm{lm}_{qk}'
      h, w = sizes[(lm + qk) % len(sizes)]
      img = np.full((h, w, 3), 128.0) + rng.normal(0, 4, (h, w, 3))
      x1, y1 = 10.5 + 3 * qk, 12.7
      x2, y2 = w - 20.3, h - 15.9
      img[int(y1) : int(y2) + 1, int(x1) : int(x2) + 1] = PALETTE[lm % len(PALETTE)]
      _save(root, qname, img)
      qimlist.append(qname)
      g = per_lm_idx[lm]
      gnd.append(
        {
          'bbx': [x1, y1, x2, y2],
          'easy': sorted(int(remap[i]) for i in g['easy']),
          'hard': sorted(int(remap[i]) for i in g['hard']),
          'junk': sorted(int(remap[i]) for i in g['junk']),
        }
      )
  cfg = {'imlist': imlist, 'qimlist': qimlist, 'gnd': gnd}
  with open(os.path.join(root, f'gnd_{name}.pkl'), 'wb') as f:
    pickle.dump(cfg, f)
  return cfg


def _save(root, name, img, rel: Optional[str] = None):
  path = os.path.join(root, 'jpg', rel if rel else name + '.jpg')
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(jpeg_bytes(img))


def write_r1m_fixture(
  root: str,
  num_images: int = 6,
  *,
  size=(80, 112),
  seed: int = 1,
  colours: Sequence[Optional[Sequence[float]]] = (),
) -> list[str]:
  """Writes revisitop1m.txt + jpg/<a>/<b>/<name>.jpg distractors (grey unless `colours[i]` is
  given); returns the list."""
  rng = np.random.default_rng(seed)
  names = []
  for i in range(num_images):
    rel = f'{i % 10}/{(i // 10) % 10}/r1m_{i:07d}.jpg'
    names.append(rel)
    c = colours[i] if i < len(colours) and colours[i] is not None else None
    c = np.full(3, 110.0 + 5 * (i % 5)) if c is None else c
    _save(root, None, _image(rng, np.asarray(c, np.float32), *size, noise=30.0), rel=rel)
  with open(os.path.join(root, 'revisitop1m.txt'), 'w') as f:
    f.write('\n'.join(names) + '\n')
  return names
