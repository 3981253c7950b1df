"""Evaluation benchmark: +1M search (full argsort vs exact fast path), extraction throughput,
compile counts and bucketed-vs-exact descriptor cosine.

  python -m dolg_jax.tools.bench_eval                  # 70 queries x (4,993 + 1,000,000) x 512, R50
  python -m dolg_jax.tools.bench_eval --distractors=100000 --config=configs/tiny.py
  python -m dolg_jax.tools.bench_eval --checkpoint=r50.pyth   # cosine/throughput with real weights
  [--config.eval.batch_size=4] [--config.eval.compute_dtype=bfloat16] [--extract=False]

Extraction: the model and c.eval settings of --config (default configs/default.py), images/s of
real images over --extract_images (0: config.eval.batch_size, every scale's batch full). Search: the
ROxf ground truth in --gnd_dir (default $REVISITOP_GND_DIR, else ../shared/data/revisitop beside the
repository) when present, else random unit descriptors with positives pulled towards their query;
both paths' Easy / Medium / Hard tables come from the same float32 scores and are checked identical.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import resource
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dolg_jax import cli
from dolg_jax import models
from dolg_jax.retrieval import extract as ex
from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import search
from dolg_jax.weights import released

FLAGS = flags.FLAGS
REPO_GND_DIR = os.path.join(
  os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
  '..',
  'shared',
  'data',
  'revisitop',
)


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Model and c.eval settings.', lock_config=True
  )
  flags.DEFINE_string(
    'gnd_dir',
    os.environ.get('REVISITOP_GND_DIR', REPO_GND_DIR),
    'Directory holding gnd_roxford5k.pkl (synthetic ground truth if absent).',
  )
  flags.DEFINE_integer('distractors', 1_000_000, '+1M distractor count.')
  flags.DEFINE_integer('dim', 512, 'Descriptor width.')
  flags.DEFINE_integer('chunk', 131072, 'Database rows per similarity chunk.')
  flags.DEFINE_bool('search', True, 'Run the search part.')
  flags.DEFINE_bool('extract', True, 'Run the extraction part.')
  flags.DEFINE_string(
    'checkpoint',
    '',
    'Released .pyth/.pth or converted dir (else random init of the config\'s model).',
  )
  flags.DEFINE_integer(
    'extract_images',
    0,
    'Images timed (0: config.eval.batch_size, which fills '
    'every scale\'s batch; with fewer, the padded batch slots cost time too).',
  )
  flags.DEFINE_list('extract_hw', ['768', '1024'], 'H,W of the timed images.')
  flags.DEFINE_string('cosine_sizes', '683,1024;771,1024', "'H,W;H,W' ('' = skip)")
  flags.DEFINE_list('cosine_buckets', ['32', '64'], 'Bucket sizes compared with exact sizes.')


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _gnd(n_db: int, nq: int, rng, gnd_dir: str) -> list:
  path = os.path.join(gnd_dir, 'gnd_roxford5k.pkl')
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)['gnd']
  gnd = []
  for _ in range(nq):
    idx = rng.choice(n_db, 120, replace=False)
    gnd.append(
      {
        'easy': idx[:50].tolist(),
        'hard': idx[50:90].tolist(),
        'junk': idx[90:].tolist(),
        'bbx': [0, 0, 500, 500],
      }
    )
  return gnd


def bench_search(n_distractors: int, dim: int, chunk: int, gnd_dir: str) -> None:
  rng = np.random.default_rng(0)
  n_db = 4993
  gnd = _gnd(n_db, 70, rng, gnd_dir)
  nq = len(gnd)
  t = time.perf_counter()
  base = rng.standard_normal((n_db, dim), dtype=np.float32)
  qv = rng.standard_normal((nq, dim), dtype=np.float32)
  for v, g in zip(qv, gnd):
    base[np.asarray(g['easy'], int)] += 0.4 * v
    base[np.asarray(g['hard'], int)] += 0.2 * v
  base /= np.linalg.norm(base, axis=1, keepdims=True)
  q = qv / np.linalg.norm(qv, axis=1, keepdims=True)
  dis = np.empty((n_distractors, dim), np.float32)
  for s in range(0, n_distractors, 100000):
    blk = rng.standard_normal((min(100000, n_distractors - s), dim), dtype=np.float32)
    dis[s : s + blk.shape[0]] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
  db = [base, dis]
  print(
    f'[search] {nq} queries x ({n_db} + {n_distractors}) x {dim}, chunk {chunk}; '
    f'data made in {time.perf_counter() - t:.1f}s'
  )

  # Warm-up (compiles) on a small slice so both timings exclude compilation.
  search.fast_compute_protocols(q, [base], gnd, chunk_size=chunk)

  t0 = time.perf_counter()
  scores = search.similarity_matrix(q, db, chunk)
  t1 = time.perf_counter()
  ranks = search.full_ranks(scores)
  t2 = time.perf_counter()
  full = metrics.compute_protocols(ranks, gnd)
  t3 = time.perf_counter()
  print(
    f'[search] full argsort path: scores {t1 - t0:.2f}s + stable argsort {t2 - t1:.2f}s + '
    f'compute_map x3 {t3 - t2:.2f}s = {t3 - t0:.2f}s (peak RSS {_rss_gib():.2f} GiB)'
  )
  del ranks, scores
  for method in ('host', 'device'):
    if method == 'device' and n_distractors > 200000:
      # The device counting is for accelerators; on CPU XLA gathers make it slower than argsort.
      continue
    t5 = time.perf_counter()
    fast = search.fast_compute_protocols(q, db, gnd, chunk_size=chunk, method=method)
    t6 = time.perf_counter()
    same = all(
      fast[p]['map'] == full[p]['map']
      and np.array_equal(fast[p]['prs'], full[p]['prs'], equal_nan=True)
      and np.array_equal(fast[p]['aps'], full[p]['aps'], equal_nan=True)
      for p in metrics.PROTOCOLS
    )
    print(
      f'[search] fast path ({method}): {t6 - t5:.2f}s incl. its scores; identical to full '
      f'sort: {same}'
    )
  print('[search] mAP E/M/H: ' + ' '.join(f'{100 * full[p]["map"]:.2f}' for p in metrics.PROTOCOLS))


def roxf_like_sizes(rng, gnd) -> tuple[list, list]:
  """4,993 index sizes (mostly 1024x768 / 768x1024, some variety), 70 query crops (real boxes)."""
  sizes = []
  for _ in range(4993):
    u = rng.random()
    if u < 0.6:
      sizes.append((768, 1024))
    elif u < 0.85:
      sizes.append((1024, 768))
    else:
      short = int(rng.integers(500, 1024))
      sizes.append((short, 1024) if rng.random() < 0.7 else (1024, short))
  qsizes, boxes = [], []
  for g in gnd:
    x1, y1, x2, y2 = g['bbx']
    h, w = (768, 1024) if x2 > 768 or y2 <= 768 else (1024, 768)
    qsizes.append((max(h, int(np.ceil(y2))), max(w, int(np.ceil(x2)))))
    boxes.append(g['bbx'])
  return sizes + qsizes, [None] * len(sizes) + boxes


def bench_compiles(base: ex.ExtractConfig, gnd_dir: str) -> None:
  """Compilations of a ROxf-like size mix under several extraction settings (from `base`)."""
  rng = np.random.default_rng(0)
  gnd = _gnd(4993, 70, rng, gnd_dir)
  sizes, boxes = roxf_like_sizes(rng, gnd)
  nopad = dataclasses.replace(base, pad=False, bucket=32, geometric_from=0)
  for label, cfg in (
    ('exact sizes', dataclasses.replace(nopad, bucket=0)),
    ('padded canvases (eval default, exact descriptors)', dataclasses.replace(base, pad=True)),
    ('resize to bucket 32', nopad),
    ('bucket 64', dataclasses.replace(nopad, bucket=64)),
    (
      'bucket 32, geometric 2^(1/8) above 512',
      dataclasses.replace(nopad, geometric_from=512, steps_per_octave=8),
    ),
    ('bucket 32, official 5 scales', dataclasses.replace(nopad, scales=ex.OFFICIAL_SCALES)),
    ('bucket 32, max_side 1024', dataclasses.replace(nopad, max_side=1024)),
  ):
    shapes = ex.simulate_shapes(sizes, boxes, cfg)
    n_q = len(ex.simulate_shapes(sizes[-70:], boxes[-70:], cfg))
    print(
      f'[compiles] ROxf-like mix (4,993 index + 70 query crops), {label}: {len(shapes)} '
      f'compilations ({n_q} for the queries alone)'
    )


def _model(model_cfg, checkpoint: str, dtype: str):
  if checkpoint:
    model, variables = released.load(checkpoint, dtype=dtype)
  else:
    model = models.build_model(model_cfg, dtype=dtype)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  return (lambda v, x, valid_hw=None: model.apply(v, x, train=False, valid_hw=valid_hw)), variables


def _natural_images(rng, sizes):
  out = []
  for h, w in sizes:
    small = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
    img = ex.resize_bilinear(small, h, w).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def time_extraction(extractor: ex.Extractor, examples: list) -> dict:
  """Extracts `examples` twice (the first pass compiles) and times the second.

  Returns `images_per_sec` (real images / seconds of the second pass), `image_scales` (the (image,
  scale) rows run), `batch_slots` (batch rows including padding), `slot_fill` (their ratio; below
  1.0 padded slots cost time), `first_pass_s`, `compilations`, `seconds`, `images`.
  """
  n = len(examples)
  t = time.perf_counter()
  extractor.extract(examples, n)
  first = time.perf_counter() - t
  rows, slots = extractor.rows_run, extractor.slots_run
  t = time.perf_counter()
  extractor.extract(examples, n)
  dt = time.perf_counter() - t
  rows, slots = extractor.rows_run - rows, extractor.slots_run - slots
  return {
    'images': n,
    'image_scales': rows,
    'batch_slots': slots,
    'slot_fill': rows / slots,
    'first_pass_s': first,
    'compilations': extractor.compile_count,
    'seconds': dt,
    'images_per_sec': n / dt,
  }


def bench_extraction(
  config, checkpoint: str, n_images: int, hw: tuple[int, int], cosine_sizes: list, buckets=(32, 64)
) -> None:
  """Extraction images/s, compilations and bucketed-vs-exact cosine (config.model, config.eval).

  `n_images` 0: config.eval.batch_size (every scale's batches full)."""
  dtype = config.eval.compute_dtype or config.compute_dtype
  batch = config.eval.batch_size
  n_images = n_images or batch
  base = ex.from_config(config.eval)
  apply, variables = _model(config.model, checkpoint, dtype)
  rng = np.random.default_rng(1)
  what = checkpoint or f'R{config.model.depth} width {config.model.width} (random init)'
  imgs = _natural_images(rng, [hw] * n_images)
  exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  e = ex.Extractor(apply, variables, dataclasses.replace(base, pad=True))
  r = time_extraction(e, exs)
  print(
    f'[extract] {what}, {dtype}, {hw[0]}x{hw[1]}, scales {e.cfg.scales}, batch {batch}: '
    f'{r["images_per_sec"]:.3f} images/s ({n_images} images in {r["seconds"]:.1f}s, '
    f'{r["image_scales"]} image-scales in {r["batch_slots"]} batch slots; first call incl. '
    f'{r["compilations"]} compilations {r["first_pass_s"]:.1f}s)'
  )
  if r['slot_fill'] < 1.0:
    print(
      f'[extract] only {100 * r["slot_fill"]:.0f}% of the batch slots held images: pass '
      f'--extract_images as a multiple of the batch ({batch}) for full-batch throughput'
    )
  if cosine_sizes:
    imgs = _natural_images(rng, cosine_sizes)
    exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
    nopad = dataclasses.replace(base, pad=False, geometric_from=0)
    d0 = ex.Extractor(apply, variables, dataclasses.replace(nopad, bucket=0)).extract(
      exs, len(imgs)
    )
    variants = [('padded canvas', dataclasses.replace(base, pad=True))]
    variants += [(f'resize to bucket {b}', dataclasses.replace(nopad, bucket=b)) for b in buckets]
    for label, cfg in variants:
      d1 = ex.Extractor(apply, variables, cfg).extract(exs, len(imgs))
      cos = (d0 * d1).sum(1)
      print(
        f'[extract] cosine {label} vs exact size, {what}, sizes {cosine_sizes}: '
        f'min {cos.min():.6f} mean {cos.mean():.6f}'
      )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if FLAGS.search:
    bench_search(FLAGS.distractors, FLAGS.dim, FLAGS.chunk, FLAGS.gnd_dir)
  bench_compiles(ex.from_config(config.eval), FLAGS.gnd_dir)
  if FLAGS.extract:
    hw = tuple(int(v) for v in FLAGS.extract_hw)
    cos_sizes = [tuple(int(v) for v in s.split(',')) for s in FLAGS.cosine_sizes.split(';') if s]
    bench_extraction(
      config,
      FLAGS.checkpoint,
      FLAGS.extract_images,
      hw,
      cos_sizes,
      tuple(int(b) for b in FLAGS.cosine_buckets),
    )


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
