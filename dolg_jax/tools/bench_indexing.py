"""Indexing throughput: python -m dolg_jax.tools.bench_indexing.

  python -m dolg_jax.tools.bench_indexing --config=configs/tiny.py --num_images=256 --size=160,120
  python -m dolg_jax.tools.bench_indexing --config=configs/r50.py --num_images=16 --size=512,384

Writes `num_images` synthetic JPEGs (quality 90) of WIDTH,HEIGHT and a converted checkpoint of the
config's model with random weights into --workdir (default: a temporary folder), then prints:
* the host time per image, one thread, in ms: read, decode (strict JPEG check + `decode_rgb`),
  resize (long-side cap + `resize_bilinear` to every scale: `Extractor.scaled_images`) and device
  (`Extractor.run_batch` on the batches extraction runs, `batch_rows` per shape, after
  compilation);
* end to end: `collection.build.build` on the folder, after a warm-up build that compiled the same
  shapes (persistent XLA cache), in images/s; then one JSON line.
The protocol is the config's `eval` section (scales, max_side, padding, batch size, compute dtype).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import cv2
import jax
import numpy as np
from ml_collections import config_flags
from PIL import Image

from dolg_jax import cli
from dolg_jax import pretrained
from dolg_jax.models import random_weights
from dolg_jax.collection import build as build_lib
from dolg_jax.collection import faiss_index
from dolg_jax.data import decode
from dolg_jax.retrieval import evaluate
from dolg_jax.retrieval import extract as extract_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file('config', 'configs/tiny.py', 'Config file.', lock_config=False)
  flags.DEFINE_integer('num_images', 128, 'Images indexed.')
  flags.DEFINE_list('size', ['160', '120'], 'WIDTH,HEIGHT of the images.')
  flags.DEFINE_integer('read_workers', 4, 'Index reader threads.')
  flags.DEFINE_string(
    'workdir', None, 'Where images, checkpoint and index go (default: a temporary directory).'
  )


def write_images(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(n):
    img = np.zeros((height, width, 3), np.uint8)
    img[:] = rng.integers(0, 256, 3)
    for _ in range(8):
      c = tuple(int(v) for v in rng.integers(0, 256, 3))
      p = (int(rng.integers(0, width)), int(rng.integers(0, height)))
      cv2.circle(img, p, int(rng.integers(5, max(6, min(width, height) // 3))), c, -1)
    img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)  # texture
    path = os.path.join(folder, f'{i // 100:03d}', f'img{i:05d}.jpg')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(img).save(path, quality=90)
    paths.append(path)
  return paths


def host_split(paths: list[str], extractor: extract_lib.Extractor) -> dict:
  """Host ms per image of read, decode and resize (`Extractor.scaled_images`), and device ms per
  image of the batches the extractor runs (`batch_rows` per shape), after compiling their sizes."""
  cfg = extractor.cfg
  t = {'read': 0.0, 'decode': 0.0, 'resize': 0.0, 'device': 0.0}
  by_shape: dict = {}
  for i, p in enumerate(paths):
    t0 = time.perf_counter()
    with open(p, 'rb') as f:
      data = f.read()
    t1 = time.perf_counter()
    if decode.is_jpeg(data):
      decode.check_decodable(data)
    img = decode.decode_rgb(data)
    t2 = time.perf_counter()
    for key, im in extractor.scaled_images((i, {'image': img}))[1]:
      by_shape.setdefault(key, []).append(im)
    t3 = time.perf_counter()
    t['read'] += t1 - t0
    t['decode'] += t2 - t1
    t['resize'] += t3 - t2
  batches = []
  for key, ims in by_shape.items():
    rows = extract_lib.batch_rows(cfg, extractor.n_dev, key)
    batches += [(key, ims[a : a + rows]) for a in range(0, len(ims), rows)]
  compiled = set()
  for key, ims in batches:  # compile every batch shape first (not timed)
    shape = (extract_lib.padded_batch(len(ims), cfg, extractor.n_dev, key), *key)
    if shape not in compiled:
      compiled.add(shape)
      extractor.run_batch(ims, key if cfg.pad else None).block_until_ready()
  for key, ims in batches:
    t0 = time.perf_counter()
    extractor.run_batch(ims, key if cfg.pad else None).block_until_ready()
    t['device'] += time.perf_counter() - t0
  return {k: 1000 * v / len(paths) for k, v in t.items()}


def main(argv):
  del argv
  config = FLAGS.config
  width, height = (int(v) for v in FLAGS.size)
  work = FLAGS.workdir or tempfile.mkdtemp(prefix='dolg_bench_indexing_')
  jax.config.update('jax_compilation_cache_dir', os.path.join(work, 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  folder = os.path.join(work, 'images')
  paths = write_images(folder, FLAGS.num_images, width, height)
  ckpt = os.path.join(work, 'checkpoint')
  pretrained.save_converted(ckpt, config.model, random_weights.random_variables(config.model))
  apply_fn, variables, _ = evaluate.load_model(config, checkpoint=ckpt)
  cfg = extract_lib.from_config(config.eval)
  extractor = extract_lib.Extractor(apply_fn, variables, cfg)
  split = host_split(paths[: max(cfg.batch_size, min(len(paths), 64))], extractor)
  print(
    'host time per image (ms, one thread): ' + ', '.join(f'{k} {v:.1f}' for k, v in split.items()),
    flush=True,
  )
  options = build_lib.Options(
    part_size=1024,
    descriptor_dtype='float32',
    faiss=faiss_index.Spec(),
    replace=False,
    read_workers=FLAGS.read_workers,
    recall_k=100,
    recall_sample=200,
    progress=False,
  )
  warm_list = os.path.join(folder, 'warm.txt')
  with open(warm_list, 'w') as f:
    f.write('\n'.join(os.path.relpath(p, folder) for p in paths[: cfg.batch_size]))
  build_lib.build(
    config, checkpoint=ckpt, images=warm_list, out=os.path.join(work, 'warm'), options=options
  )
  t0 = time.perf_counter()
  m = build_lib.build(
    config, checkpoint=ckpt, images=folder, out=os.path.join(work, 'index'), options=options
  )
  wall = time.perf_counter() - t0
  out = {
    'config': config_flags.get_config_filename(FLAGS['config']),
    'model': {'depth': config.model.depth, 'width': config.model.width},
    'images': len(paths),
    'size': [width, height],
    'scales': list(cfg.scales),
    'batch_size': cfg.batch_size,
    'num_workers': cfg.num_workers,
    'read_workers': FLAGS.read_workers,
    'devices': [str(d) for d in jax.local_devices()],
    'host_ms_per_image': split,
    'end_to_end_seconds': wall,
    'images_per_second': m['counts']['indexed'] / wall,
    'extract_images_per_second': m['last_run']['images_per_second_process_0'],
  }
  print(
    f'end to end: {m["counts"]["indexed"]} images in {wall:.1f}s = '
    f'{out["images_per_second"]:.2f} images/s (extraction phase '
    f'{out["extract_images_per_second"]:.2f} images/s)'
  )
  print(json.dumps(out))


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
