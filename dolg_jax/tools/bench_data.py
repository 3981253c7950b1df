"""Decode + crop + resize throughput per core, fast path vs naive Pillow, on GLDv2-like JPEGs.

  python -m dolg_jax.tools.bench_data [--num_images=32] [--rounds=5] [--size=512]
      [--height=600 --width=800] [--pipeline_workers=0,2]

Makes textured JPEGs (quality 90) of about the GLDv2 train size, draws the training pipeline's
random-resized crops (scale 0.25-1, ratio 3/4-4/3) and times, in one process, images/s per core of:
naive (Pillow decode, crop, bicubic resize), naive_bilinear, fast (`decode_crop_resize(fast=True)`),
exact (its default, cv2.imread's pixels), alternatives (Pillow draft() + box resize; OpenCV
imdecode + resize), the training transforms (`grain_pipeline.TrainTransform`, augmentation 'paper'
and 'official', and `official_augment.official_train_image`) and the parts of the fast path
(decode only, resize only); the median of alternating rounds is reported. --pipeline_workers also
times `make_train_iterator` end to end per worker count. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Callable, Dict, List, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags
import numpy as np
from PIL import Image

from dolg_jax import cli
from dolg_jax.data import decode
from dolg_jax.data import grain_pipeline
from dolg_jax.data import official_augment


def make_jpegs(n: int, height: int, width: int, seed: int = 0, quality: int = 90) -> List[bytes]:
  """Photo-like JPEGs: smooth colour fields plus fine noise (size close to real photos)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    coarse = rng.integers(0, 256, size=(height // 8, width // 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), np.float32)
    noisy = base + rng.normal(0.0, 10.0, size=base.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, 'JPEG', quality=quality)
    out.append(buf.getvalue())
  return out


def _time_round(fn: Callable[[int], object], n: int) -> float:
  start = time.perf_counter()
  for i in range(n):
    fn(i)
  return n / (time.perf_counter() - start)


def time_methods(
  num_images: int = 32,
  rounds: int = 5,
  size: int = 512,
  height: int = 600,
  width: int = 800,
  seed: int = 0,
) -> Dict[str, float]:
  """Median images/s of each method (single thread)."""
  jpegs = make_jpegs(num_images, height, width, seed)
  rng = np.random.default_rng(seed + 1)
  boxes = [
    decode.random_resized_crop_box(rng, (height, width), (0.25, 1.0), (3 / 4, 4 / 3)) for _ in jpegs
  ]
  out = (size, size)
  decoded = [decode.decode_rgb(j) for j in jpegs]

  def crop(i):
    t, l, h, w = boxes[i]
    return decoded[i][t : t + h, l : l + w]

  def naive_bilinear(i):
    t, l, h, w = boxes[i]
    with Image.open(io.BytesIO(jpegs[i])) as im:
      return np.asarray(
        im.convert('RGB').crop((l, t, l + w, t + h)).resize((size, size), Image.BILINEAR)
      )

  def pil_draft(i):
    t, l, h, w = boxes[i]
    with Image.open(io.BytesIO(jpegs[i])) as im:
      im.draft('RGB', (-(-width * size // w), -(-height * size // h)))  # DCT scaling in Pillow.
      sx, sy = im.size[0] / width, im.size[1] / height
      return np.asarray(
        im.convert('RGB').resize(
          (size, size), Image.BILINEAR, box=(l * sx, t * sy, (l + w) * sx, (t + h) * sy)
        )
      )

  def cv2_only(i):
    t, l, h, w = boxes[i]
    img = decode.cv2.imdecode(np.frombuffer(jpegs[i], np.uint8), decode.cv2.IMREAD_COLOR_RGB)
    return decode.cv2.resize(
      img[t : t + h, l : l + w], (size, size), interpolation=decode.cv2.INTER_LINEAR
    )

  methods: Dict[str, Callable[[int], object]] = {
    'naive (Pillow decode+crop+bicubic resize)': lambda i: decode.naive_crop_resize(
      jpegs[i], boxes[i], out
    ),
    'naive_bilinear (Pillow decode+crop+bilinear)': naive_bilinear,
    'fast (simplejpeg+DCT scaling, cv2 bilinear)': lambda i: decode.decode_crop_resize(
      jpegs[i], boxes[i], out, fast=True
    ),
    'exact (= cv2.imread, full decode, cv2 resize)': lambda i: decode.decode_crop_resize(
      jpegs[i], boxes[i], out
    ),
    'alt: Pillow draft (DCT scaling) + box resize': pil_draft,
    'alt: OpenCV imdecode + resize': cv2_only,
    '  part: simplejpeg decode only': lambda i: decode.decode_rgb(jpegs[i], fast=True),
    '  part: exact decode only': lambda i: decode.decode_rgb(jpegs[i]),
    '  part: Pillow decode only': lambda i: np.asarray(
      Image.open(io.BytesIO(jpegs[i])).convert('RGB')
    ),
    '  part: resize only (fast path)': lambda i: decode.resize(crop(i), size, size),
  }
  transforms = {
    name: grain_pipeline.TrainTransform(
      image_size=size,
      scale=scale,
      ratio=(3 / 4, 4 / 3),
      flip=True,
      seed=seed,
      epoch_length=num_images,
      fast_decode=False,
      augmentation=name,
      lighting_std=light,
    )
    for name, scale, light in (('paper', (0.25, 1.0), 0.0), ('official', (0.08, 1.0), 0.1))
  }
  records = [{'image': j, 'label': 0} for j in jpegs]
  methods['transform: default (paper, exact decode)'] = lambda i: transforms['paper'](i, records[i])
  methods['transform: official (uint8 + lighting offset)'] = lambda i: transforms['official'](
    i, records[i]
  )
  methods['transform: official, float32 form (before)'] = lambda i: (
    official_augment.official_train_image(jpegs[i], size, transforms['official'].rng(i))
  )
  if decode.cv2 is None:
    del methods['alt: OpenCV imdecode + resize']
  for fn in methods.values():  # Warm-up.
    fn(0)
  results: Dict[str, List[float]] = {name: [] for name in methods}
  for _ in range(rounds):
    for name, fn in methods.items():
      results[name].append(_time_round(fn, num_images))
  return {name: statistics.median(v) for name, v in results.items()}


def run_pipeline(
  data_cfg: ml_collections.ConfigDict,
  workers: Sequence[int],
  num_images: int = 64,
  size: int = 512,
  height: int = 600,
  width: int = 800,
  batch: int = 16,
  seconds: float = 5.0,
) -> Dict[int, float]:
  """Images/s of the full training pipeline (make_train_iterator) per worker count, with the
  augmentation and decode settings of `data_cfg` (a c.data section) at `size`, 1 read thread."""
  source = [{'image': j, 'label': i} for i, j in enumerate(make_jpegs(num_images, height, width))]
  cfg = data_cfg.copy_and_resolve_references()
  cfg.image_size, cfg.read_threads = size, 1
  out = {}
  for w in workers:
    it = grain_pipeline.make_train_iterator(
      cfg, source, seed=0, process_index=0, process_count=1, per_host_batch=batch, num_workers=w
    )
    try:
      next(it)  # Start-up (worker spawn) is not timed.
      n, start = 0, time.perf_counter()
      while time.perf_counter() - start < seconds:
        n += len(next(it)['label'])
      out[w] = n / (time.perf_counter() - start)
    finally:
      it.close()
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    'config',
    'configs/default.py',
    'Config whose c.data settings the pipeline part uses.',
    lock_config=True,
  )
  flags.DEFINE_integer('num_images', 32, 'JPEGs per round.')
  flags.DEFINE_integer('rounds', 5, 'Timed rounds (the median is reported).')
  flags.DEFINE_integer('size', 512, 'Crop output side.')
  flags.DEFINE_integer('height', 600, 'JPEG height.')
  flags.DEFINE_integer('width', 800, 'JPEG width.')
  flags.DEFINE_list(
    'pipeline_workers',
    [],
    'Also time make_train_iterator end to end with these '
    'worker counts, e.g. 0,2 (1 read thread per process).',
  )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  sample = make_jpegs(1, FLAGS.height, FLAGS.width)[0]
  print(
    f'{FLAGS.num_images} JPEGs {FLAGS.width}x{FLAGS.height} q90 (~{len(sample) // 1024} KiB), '
    f'random-resized crop -> {FLAGS.size}x{FLAGS.size}, 1 thread, median of {FLAGS.rounds} '
    'rounds'
  )
  res = time_methods(FLAGS.num_images, FLAGS.rounds, FLAGS.size, FLAGS.height, FLAGS.width)
  naive = next(v for k, v in res.items() if k.startswith('naive ('))
  naive_bl = next(v for k, v in res.items() if k.startswith('naive_bilinear'))
  for name, value in res.items():
    print(f'{name:48s} {value:8.1f} images/s/core')
  fast = next(v for k, v in res.items() if k.startswith('fast'))
  print(
    f'speed-up of fast over naive: {fast / naive:.2f}x (over naive_bilinear: '
    f'{fast / naive_bl:.2f}x)'
  )
  paper = res['transform: default (paper, exact decode)']
  official = res['transform: official (uint8 + lighting offset)']
  print(
    f'official / default transform: {official / paper:.2f}x; cores per 1,000 images/s: '
    f'default {1000 / paper:.1f}, official {1000 / official:.1f}'
  )
  if FLAGS.pipeline_workers:
    workers = [int(w) for w in FLAGS.pipeline_workers]
    for w, value in run_pipeline(
      FLAGS.config.data, workers, size=FLAGS.size, height=FLAGS.height, width=FLAGS.width
    ).items():
      print(f'pipeline, {w} worker(s): {value:8.1f} images/s (whole process tree)')


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
