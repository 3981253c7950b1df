"""A small, deterministic GLDv2 in the exact official layout, with planted bad files.

`write_fixture(manual_dir, layout=...)` writes train.csv (id,url,landmark_id), train_clean.csv
(landmark_id,images) and shards of members a/b/c/<id>.jpg: 'flat' images_NNN.tar and
md5.images_NNN.txt side by side; 'official' (the download script's) train/images_NNN.tar and
train/md5.images_NNN.txt; 'bucket' (the public bucket's) train/images_NNN.tar and
md5sum/train/md5.images_NNN.txt; `extract_fixture` the tree train/a/b/c/<id>.jpg. Planted
(listed in both CSVs): `missing` ids (in no tar), `corrupt` ids (a truncated JPEG, non-image
bytes), `grayscale` and `cmyk` JPEGs, `png` ids (PNG bytes named .jpg). Images are smooth random
colour fields of varied sizes, so decoded pixels can be compared with the source.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import os
import shutil
import tarfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from dolg_jax import atomic
from dolg_jax.data import gldv2

DEFAULT_IMAGES_PER_CLASS = (2, 4, 5, 6, 7, 9, 10, 12)
LAYOUTS = {
  'flat': ('', ''),
  'official': ('train', 'train'),
  'bucket': ('train', os.path.join('md5sum', 'train')),
}  # (shard dir, md5 dir)


@dataclasses.dataclass
class FixtureInfo:
  """What was written (ids are 16 lowercase hex chars, like the official ones)."""

  manual_dir: str
  clean: Dict[int, List[str]]  # landmark_id -> ids in train_clean.csv
  full: Dict[int, List[str]]  # landmark_id -> ids in train.csv
  shards: List[str]
  missing: List[str]
  corrupt: List[str]
  grayscale: List[str]
  cmyk: List[str]
  png: List[str]
  pixels: Dict[str, np.ndarray] = dataclasses.field(repr=False, default_factory=dict)

  @property
  def clean_ids(self) -> List[str]:
    return [i for ids in self.clean.values() for i in ids]

  @property
  def full_ids(self) -> List[str]:
    return [i for ids in self.full.values() for i in ids]


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  coarse = rng.integers(0, 256, size=(max(height // 16, 2), max(width // 16, 2), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _encode(pixels: np.ndarray, kind: str, quality: int) -> bytes:
  im = Image.fromarray(pixels)
  buf = io.BytesIO()
  if kind == 'grayscale':
    im.convert('L').save(buf, 'JPEG', quality=quality)
  elif kind == 'cmyk':
    im.convert('CMYK').save(buf, 'JPEG', quality=quality)
  elif kind == 'png':
    im.save(buf, 'PNG')
  else:
    im.save(buf, 'JPEG', quality=quality)
  return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  info.mtime = 1500000000  # Fixed: the tars (and their md5) are byte-for-byte reproducible.
  info.mode = 0o644
  tar.addfile(info, io.BytesIO(data))


def unique_ids(rng: np.random.Generator) -> Callable[[], str]:
  """A generator of distinct 16-hex image ids (GLDv2's format) drawn from `rng`."""
  used = set()

  def new_id() -> str:
    while True:
      image_id = ''.join('0123456789abcdef'[d] for d in rng.integers(0, 16, size=16))
      if image_id not in used:
        used.add(image_id)
        return image_id

  return new_id


def write_fixture(
  manual_dir: str,
  *,
  num_classes: int = 8,
  images_per_class: Union[int, Sequence[int]] = DEFAULT_IMAGES_PER_CLASS,
  seed: int = 0,
  num_shards: int = 3,
  num_missing: int = 2,
  num_corrupt: int = 2,
  num_grayscale: int = 2,
  num_cmyk: int = 2,
  num_png: int = 2,
  num_noisy_classes: int = 2,
  size_range: Tuple[int, int] = (48, 160),
  quality: int = 90,
  layout: str = 'flat',
) -> FixtureInfo:
  """Writes the fixture; deterministic in its arguments. Returns what was planted where.

  Args:
    manual_dir: output directory (created; existing fixture files are overwritten).
    num_classes: landmarks in train_clean.csv; `num_noisy_classes` more appear only in train.csv.
    images_per_class: int, or per-class counts cycled over the classes (default mixes classes
      below and above 5 images, to exercise the floor(20%) validation rule).
    seed: controls ids, landmark ids, image sizes, pixels and which images are bad.
    num_shards: images_000.tar .. images_{num_shards-1}.tar.
    size_range: min and max image side in pixels.
    layout: 'flat', 'official' or 'bucket' (see the module docstring); same bytes in each.
  """
  rng = np.random.default_rng(seed)
  counts = (
    [images_per_class] * num_classes
    if isinstance(images_per_class, int)
    else [images_per_class[i % len(images_per_class)] for i in range(num_classes)]
  )
  total_classes = num_classes + num_noisy_classes
  landmarks = sorted(int(x) for x in rng.choice(200000, size=total_classes, replace=False))
  order = rng.permutation(total_classes)
  clean_landmarks = sorted(landmarks[i] for i in order[:num_classes])
  noisy_landmarks = sorted(landmarks[i] for i in order[num_classes:])
  new_id = unique_ids(rng)

  clean: Dict[int, List[str]] = {}
  full: Dict[int, List[str]] = {}
  for landmark, n in zip(clean_landmarks, counts):
    clean[landmark] = [new_id() for _ in range(n)]
    full[landmark] = list(clean[landmark]) + [new_id()]  # One noisy image left out of clean.
  for landmark in noisy_landmarks:
    full[landmark] = [new_id() for _ in range(3)]
  full = dict(sorted(full.items()))

  clean_ids = [i for ids in clean.values() for i in ids]
  n_bad = num_missing + num_corrupt + num_grayscale + num_cmyk + num_png
  if n_bad > len(clean_ids):
    raise ValueError(f'{n_bad} planted files but only {len(clean_ids)} clean images')
  bad = [clean_ids[j] for j in rng.permutation(len(clean_ids))[:n_bad]]
  cuts = np.cumsum([num_missing, num_corrupt, num_grayscale, num_cmyk, num_png])
  missing, corrupt, grayscale, cmyk, png = (
    list(x) for x in np.split(np.array(bad, dtype=object), cuts[:-1])
  )
  kinds = {i: 'grayscale' for i in grayscale}
  kinds.update({i: 'cmyk' for i in cmyk})
  kinds.update({i: 'png' for i in png})

  os.makedirs(manual_dir, exist_ok=True)
  all_ids = [(i, lm) for lm, ids in full.items() for i in ids]
  pixels = {}
  payload: Dict[str, bytes] = {}
  for image_id, _ in all_ids:
    h, w = (int(x) for x in rng.integers(size_range[0], size_range[1] + 1, size=2))
    img = _smooth_image(rng, h, w)
    pixels[image_id] = img
    if image_id in missing:
      continue
    if image_id in corrupt:
      good = _encode(img, 'rgb', quality)
      payload[image_id] = (
        good[: len(good) // 2]
        if corrupt.index(image_id) % 2 == 0
        else b'<html>403 Forbidden</html>' + bytes(rng.integers(0, 256, 64, dtype=np.uint8))
      )
      continue
    payload[image_id] = _encode(img, kinds.get(image_id, 'rgb'), quality)

  shards = write_layout(
    manual_dir, full=full, clean=clean, payload=payload, num_shards=num_shards, layout=layout
  )
  return FixtureInfo(
    manual_dir, clean, full, shards, missing, corrupt, grayscale, cmyk, png, pixels
  )


def extract_fixture(manual_dir: str, out_dir: str) -> None:
  """Copies the CSVs and extracts the tars (of any layout) into out_dir/train/a/b/c/<id>.jpg."""
  os.makedirs(out_dir, exist_ok=True)
  for name in ('train.csv', 'train_clean.csv'):
    shutil.copy(os.path.join(manual_dir, name), os.path.join(out_dir, name))
  for shard_dir in sorted({os.path.join(manual_dir, d) for d, _ in LAYOUTS.values()}):
    if not os.path.isdir(shard_dir):
      continue
    for name in sorted(os.listdir(shard_dir)):
      if name.startswith('images_') and name.endswith('.tar'):
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
          tar.extractall(os.path.join(out_dir, 'train'), filter='data')


def write_shards(
  shard_dir: str, md5_dir: str, ids: List[str], payload: Dict[str, bytes], num_shards: int
) -> List[str]:
  """images_NNN.tar in `shard_dir` (id k in shard k % num_shards, as a/b/c/<id>.jpg; ids absent
  from `payload` in none) and md5.images_NNN.txt in `md5_dir`; returns the shard paths."""
  os.makedirs(shard_dir, exist_ok=True)
  os.makedirs(md5_dir, exist_ok=True)
  shards = []
  for s in range(num_shards):
    name = f'images_{s:03d}.tar'
    path = os.path.join(shard_dir, name)
    with atomic.writing(path) as tmp:
      with tarfile.open(fileobj=tmp, mode='w', format=tarfile.USTAR_FORMAT) as tar:
        for k, image_id in enumerate(ids):
          if k % num_shards == s and image_id in payload:
            member = f'{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg'
            _add_member(tar, member, payload[image_id])
    with open(path, 'rb') as f:
      digest = hashlib.md5(f.read()).hexdigest()
    with open(os.path.join(md5_dir, f'md5.images_{s:03d}.txt'), 'w') as f:
      f.write(f'{digest}  {name}\n')
    shards.append(path)
  return shards


def write_layout(
  manual_dir: str,
  *,
  full: Dict[int, List[str]],
  clean: Dict[int, List[str]],
  payload: Dict[str, bytes],
  num_shards: int,
  layout: str = 'flat',
) -> List[str]:
  """Writes images and listings in the official GLDv2 layout; returns the shard paths.

  full / clean: landmark_id -> image ids for train.csv / train_clean.csv. payload: id -> file bytes
  (ids absent from it are listed but in no shard, i.e. missing). Image k of train.csv goes to shard
  k % num_shards as a/b/c/<id>.jpg; each shard gets its md5.images_NNN.txt. The CSVs are written
  last: their presence marks a complete layout.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'unknown fixture layout {layout!r}; known: {sorted(LAYOUTS)}')
  shard_dir, md5_dir = (os.path.join(manual_dir, d) for d in LAYOUTS[layout])
  all_ids = [(i, lm) for lm, ids in full.items() for i in ids]
  shards = write_shards(shard_dir, md5_dir, [i for i, _ in all_ids], payload, num_shards)
  # The CSVs last: their presence marks a complete fixture (see ensure_fixture_dataset).
  with open(os.path.join(manual_dir, 'train_clean.csv'), 'w', newline='') as f:
    f.write('landmark_id,images\n')
    for landmark, ids in clean.items():
      f.write(f'{landmark},{" ".join(ids)}\n')

  with open(os.path.join(manual_dir, 'train.csv'), 'w', newline='') as f:
    f.write('id,url,landmark_id\n')
    for image_id, landmark in all_ids:
      f.write(f'{image_id},https://example.invalid/{image_id}.jpg,{landmark}\n')
  return shards


def ensure_fixture_dataset(
  data_dir: str, *, dataset: str = 'gldv2/clean', manual_dir: Optional[str] = None, **fixture_kwargs
) -> gldv2.Gldv2:
  """Writes the small fixture (if absent) and prepares it (if absent); returns the builder.

  For tests and configs/tiny.py. The fixture's planted missing images are allowed. Safe to call
  from several processes at once (they serialise on a lock file in data_dir).
  """
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.gldv2_fixture.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      b = gldv2.builder(dataset, data_dir)
      if b.is_prepared():
        return b
      manual_dir = manual_dir or os.path.join(data_dir, 'gldv2_manual')
      if not os.path.exists(os.path.join(manual_dir, 'train.csv')):
        write_fixture(manual_dir, **fixture_kwargs)
      return gldv2.prepare(dataset, manual_dir, data_dir, allow_missing=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
