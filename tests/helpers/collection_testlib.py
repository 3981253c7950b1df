"""Shared pieces of the collection tests: a tiny converted checkpoint, a folder of small images in
every layout the index must handle, a PNG pixel bomb, the build options and the index command run
as a subprocess.

Images are 65-96 px and the protocol one scale, so every image runs in one 96x96 canvas: one
compilation per process, shared between processes through a persistent XLA cache directory.
"""

import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
from PIL import Image

from tests.helpers.paths import REPO

# (relative path, format) of the decodable images; nested dirs, mixed-case extensions, PNG.
IMAGES = (
  ('img00.jpg', 'JPEG'),
  ('img01.JPG', 'JPEG'),
  ('img02.png', 'PNG'),
  ('img03.Jpeg', 'JPEG'),
  ('a/img04.jpeg', 'JPEG'),
  ('a/img05.PNG', 'PNG'),
  ('a/img06.jpg', 'JPEG'),
  ('a/b/img07.JPG', 'JPEG'),
  ('a/b/img08.png', 'PNG'),
  ('a/b/img09.jpg', 'JPEG'),
  ('c/img10.tif', 'TIFF'),
  ('c/img11.bmp', 'BMP'),
)
BAD = ('a/not_an_image.jpg', 'b/truncated.JPG')  # text named .jpg; a JPEG cut in half
IGNORED = ('notes.txt', 'a/b/.hidden.jpg')  # no image extension; hidden
LATER = (('a/later0.jpg', 'JPEG'), ('d/later1.png', 'PNG'))  # added after the first index
PROTOCOL = (
  '--config.eval.scales=(1.0,)',
  '--config.eval.batch_size=4',
  '--config.eval.num_workers=0',
)


def image(seed: int) -> np.ndarray:
  """A distinct small picture: coloured shapes on a coloured background, 65-96 px sides."""
  rng = np.random.default_rng(1000 + seed)
  h, w = (int(v) for v in rng.integers(65, 97, 2))
  img = np.zeros((h, w, 3), np.uint8)
  img[:] = rng.integers(0, 256, 3)
  for _ in range(4):
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      p = tuple(int(v) for v in rng.integers(0, min(h, w), 2))
      cv2.circle(img, p, int(rng.integers(6, 25)), colour, -1)
    else:
      x0, y0 = (int(v) for v in rng.integers(0, min(h, w) - 10, 2))
      cv2.rectangle(
        img, (x0, y0), (x0 + int(rng.integers(8, 40)), y0 + int(rng.integers(8, 40))), colour, -1
      )
  return img


def save(path: str, img: np.ndarray, fmt: str, **kw) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path, format=fmt, **kw)


def write_folder(root: str) -> str:
  for i, (rel, fmt) in enumerate(IMAGES):
    save(os.path.join(root, rel), image(i), fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
  os.makedirs(os.path.join(root, 'b'), exist_ok=True)
  with open(os.path.join(root, BAD[0]), 'w') as f:
    f.write('this is text, not a JPEG')
  with open(os.path.join(root, IMAGES[0][0]), 'rb') as f:
    data = f.read()
  with open(os.path.join(root, BAD[1]), 'wb') as f:
    f.write(data[: len(data) // 2])
  for rel in IGNORED:
    with open(os.path.join(root, rel), 'w') as f:
      f.write('ignored')
  return root


def add_later(root: str) -> None:
  for i, (rel, fmt) in enumerate(LATER):
    save(os.path.join(root, rel), image(100 + i), fmt)


def write_checkpoint(path: str, seed: int) -> str:
  """A converted tiny checkpoint (pretrained.save_converted) with random weights."""
  from configs import tiny
  from dolg_jax import pretrained
  from dolg_jax.models import random_weights

  cfg = tiny.get_config()
  pretrained.save_converted(path, cfg.model, random_weights.random_variables(cfg.model, seed))
  return path


def png_bomb(side: int = 20000) -> bytes:
  """A valid 1-bit greyscale PNG of side x side zero pixels (a few kB: zlib of zero rows)."""

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  row = b'\x00' * (1 + (side + 7) // 8)  # the filter byte, then the row's bits
  z = zlib.compressobj(9)
  idat = b''.join(z.compress(row) for _ in range(side)) + z.flush()
  header = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')


def options(**overrides):
  """build.Options of the in-process builds: parts of 3 (as index_cmd's), float32, flat FAISS,
  files read in the calling thread, recall@10 over 5 queries; `overrides` replace fields."""
  from dolg_jax.collection import build

  base = dict(
    part_size=3,
    descriptor_dtype='float32',
    faiss=build.faiss_index.Spec(),
    replace=False,
    read_workers=0,
    recall_k=10,
    recall_sample=5,
  )
  return build.Options(**(base | overrides))


def index_cmd(
  ckpt: str,
  images: str,
  out: str,
  xla_cache: str,
  *extra: str,
  program=('-m', 'dolg_jax.index'),
  part_size: int = 3,
  read_workers: int | None = 2,
  protocol=PROTOCOL,
) -> list[str]:
  """The index command; `read_workers=None` leaves the command's default, `protocol=()` the
  config's (three scales)."""
  return [
    sys.executable,
    *program,
    '--config=configs/tiny.py',
    f'--checkpoint={ckpt}',
    f'--images={images}',
    f'--out={out}',
    f'--part_size={part_size}',
    *([] if read_workers is None else [f'--read_workers={read_workers}']),
    f'--config.eval.xla_cache_dir={xla_cache}',
    *protocol,
    *extra,
  ]


def env() -> dict:
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)


def run(cmd: list[str], timeout: int = 300, extra_env=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    cmd,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(env(), **(extra_env or {})),
  )


def explain(proc: subprocess.CompletedProcess) -> str:
  return f'rc={proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}'


def index_files(out: str) -> dict[str, bytes]:
  """Every file of an index whose bytes define it (parts, plans, skipped.csv, faiss.index)."""
  files = {}
  for sub in ('parts', 'plans'):
    for name in sorted(os.listdir(os.path.join(out, sub))):
      with open(os.path.join(out, sub, name), 'rb') as f:
        files[f'{sub}/{name}'] = f.read()
  for name in ('skipped.csv', 'faiss.index'):
    with open(os.path.join(out, name), 'rb') as f:
      files[name] = f.read()
  return files
