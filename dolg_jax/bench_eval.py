"""Evaluation benchmark: +1M search (full argsort vs exact fast path), extraction throughput,
compile counts and bucketed-vs-exact descriptor cosine.

  python -m dolg_jax.bench_eval                        # 70 queries x (4,993 + 1,000,000) x 512
  python -m dolg_jax.bench_eval --distractors=100000 --extract_model=tiny
  python -m dolg_jax.bench_eval --checkpoint=r50.pyth         # cosine/throughput with real weights

Search part: real ROxf ground truth (REVISITOP_GND_DIR or /work/shared/data/revisitop) when present,
random unit descriptors with positives pulled towards their query; both paths produce the Easy /
Medium / Hard tables from the same float32 scores and the run checks they are identical.
"""

from __future__ import annotations

import argparse
import os
import pickle
import resource
import time

import numpy as np

from dolg_jax.retrieval import extract as ex
from dolg_jax.retrieval import metrics, search


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _gnd(n_db: int, nq: int, rng) -> list:
  path = os.path.join(os.environ.get('REVISITOP_GND_DIR', '/work/shared/data/revisitop'),
                      'gnd_roxford5k.pkl')
  if os.path.exists(path):
    with open(path, 'rb') as f:
      return pickle.load(f)['gnd']
  gnd = []
  for _ in range(nq):
    idx = rng.choice(n_db, 120, replace=False)
    gnd.append({'easy': idx[:50].tolist(), 'hard': idx[50:90].tolist(), 'junk': idx[90:].tolist(),
                'bbx': [0, 0, 500, 500]})
  return gnd


def bench_search(n_distractors: int, dim: int, chunk: int, with_reference: bool) -> None:
  rng = np.random.default_rng(0)
  n_db = 4993
  gnd = _gnd(n_db, 70, rng)
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
    dis[s:s + blk.shape[0]] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
  db = [base, dis]
  print(f'[search] {nq} queries x ({n_db} + {n_distractors}) x {dim}, chunk {chunk}; '
        f'data made in {time.perf_counter() - t:.1f}s')

  # Warm-up (compiles) on a small slice so both timings exclude compilation.
  search.fast_compute_protocols(q, [base], gnd, chunk_size=chunk)

  t0 = time.perf_counter()
  scores = search.similarity_matrix(q, db, chunk)
  t1 = time.perf_counter()
  ranks = search.full_ranks(scores)
  t2 = time.perf_counter()
  full = metrics.compute_protocols(ranks, gnd)
  t3 = time.perf_counter()
  print(f'[search] full argsort path: scores {t1 - t0:.2f}s + stable argsort {t2 - t1:.2f}s + '
        f'compute_map x3 {t3 - t2:.2f}s = {t3 - t0:.2f}s (peak RSS {_rss_gib():.2f} GiB)')
  if with_reference:
    # pylint: disable-next=g-import-not-at-top
    from tests.revisitop_reference import reference_compute_map, reference_protocol_gnd
    t4 = time.perf_counter()
    for p in metrics.PROTOCOLS:
      ref = reference_compute_map(ranks, reference_protocol_gnd(gnd, p), [1, 5, 10])
      assert abs(ref[0] - full[p]['map']) < 1e-9
    print(f'[search]   (revisitop-style loop compute_map x3 on the same ranks: '
          f'{time.perf_counter() - t4:.2f}s)')
  del ranks, scores
  for method in ('host', 'device'):
    if method == 'device' and n_distractors > 200000:
      # The device counting is for accelerators; on CPU XLA gathers make it slower than argsort.
      continue
    t5 = time.perf_counter()
    fast = search.fast_compute_protocols(q, db, gnd, chunk_size=chunk, method=method)
    t6 = time.perf_counter()
    same = all(fast[p]['map'] == full[p]['map'] and np.array_equal(fast[p]['prs'], full[p]['prs'],
                                                                   equal_nan=True)
               and np.array_equal(fast[p]['aps'], full[p]['aps'], equal_nan=True)
               for p in metrics.PROTOCOLS)
    print(f'[search] fast path ({method}): {t6 - t5:.2f}s incl. its scores; identical to full '
          f'sort: {same}')
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


def bench_compiles() -> None:
  rng = np.random.default_rng(0)
  gnd = _gnd(4993, 70, rng)
  sizes, boxes = roxf_like_sizes(rng, gnd)
  for label, cfg in (('exact sizes', ex.ExtractConfig(bucket=0)),
                     ('padded canvases (eval default, exact descriptors)', ex.ExtractConfig(pad=True)),
                     ('resize to bucket 32', ex.ExtractConfig(bucket=32)),
                     ('bucket 64', ex.ExtractConfig(bucket=64)),
                     ('bucket 32, geometric 2^(1/8) above 512',
                      ex.ExtractConfig(bucket=32, geometric_from=512)),
                     ('bucket 32, official 5 scales', ex.ExtractConfig(scales=ex.OFFICIAL_SCALES)),
                     ('bucket 32, max_side 1024', ex.ExtractConfig(max_side=1024))):
    shapes = ex.simulate_shapes(sizes, boxes, cfg)
    n_q = len(ex.simulate_shapes(sizes[-70:], boxes[-70:], cfg))
    print(f'[compiles] ROxf-like mix (4,993 index + 70 query crops), {label}: {len(shapes)} '
          f'compilations ({n_q} for the queries alone)')


def _model(kind: str, checkpoint: str, dtype: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dolg_jax import models  # pylint: disable=g-import-not-at-top
  if checkpoint:
    from dolg_jax import pretrained  # pylint: disable=g-import-not-at-top
    model, variables = pretrained.load(checkpoint)
  else:
    if kind == 'tiny':
      from configs import tiny  # pylint: disable=g-import-not-at-top
      cfg = tiny.get_config()
    else:
      from configs import default  # pylint: disable=g-import-not-at-top
      cfg = default.get_config()
    model = models.build_model(cfg.model, dtype=dtype)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
  return (lambda v, x, valid_hw=None: model.apply(v, x, train=False, valid_hw=valid_hw)), variables


def _natural_images(rng, sizes):
  out = []
  for h, w in sizes:
    small = rng.integers(0, 256, size=(max(2, h // 32), max(2, w // 32), 3)).astype(np.uint8)
    img = ex.resize_bilinear(small, h, w).astype(np.float32) + rng.normal(0, 12, (h, w, 3))
    out.append(np.clip(img, 0, 255).astype(np.uint8))
  return out


def bench_extraction(kind: str, checkpoint: str, n_images: int, hw: tuple[int, int],
                     cosine_sizes: list, dtype: str, batch: int, buckets=(32, 64)) -> None:
  apply, variables = _model(kind, checkpoint, dtype)
  rng = np.random.default_rng(1)
  what = checkpoint or f'{kind} (random init)'
  imgs = _natural_images(rng, [hw] * n_images)
  exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
  e = ex.Extractor(apply, variables, ex.ExtractConfig(batch_size=batch, pad=True))
  t = time.perf_counter()
  e.extract(exs, n_images)  # compiles the shapes (same batch shapes as the timed run)
  t_compile = time.perf_counter() - t
  t = time.perf_counter()
  e.extract(exs, n_images)
  dt = time.perf_counter() - t
  print(f'[extract] {what}, {dtype}, {hw[0]}x{hw[1]}, scales {e.cfg.scales}, batch {batch}: '
        f'{n_images / dt:.3f} images/s ({n_images} images in {dt:.1f}s; first call incl. '
        f'{e.compile_count} compilations {t_compile:.1f}s)')
  if cosine_sizes:
    imgs = _natural_images(rng, cosine_sizes)
    exs = [{'index': i, 'image': im} for i, im in enumerate(imgs)]
    d0 = ex.Extractor(apply, variables, ex.ExtractConfig(bucket=0, batch_size=batch)).extract(
        exs, len(imgs))
    variants = [('padded canvas', ex.ExtractConfig(pad=True, batch_size=batch))]
    variants += [(f'resize to bucket {b}', ex.ExtractConfig(bucket=b, batch_size=batch))
                 for b in buckets]
    for label, cfg in variants:
      d1 = ex.Extractor(apply, variables, cfg).extract(exs, len(imgs))
      cos = (d0 * d1).sum(1)
      print(f'[extract] cosine {label} vs exact size, {what}, sizes {cosine_sizes}: '
            f'min {cos.min():.6f} mean {cos.mean():.6f}')


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--distractors', type=int, default=1_000_000)
  ap.add_argument('--dim', type=int, default=512)
  ap.add_argument('--chunk', type=int, default=131072)
  ap.add_argument('--reference', action='store_true', help='also time the loop compute_map')
  ap.add_argument('--extract_model', default='r50', choices=['r50', 'tiny', 'none'])
  ap.add_argument('--checkpoint', default='')
  ap.add_argument('--extract_images', type=int, default=2)
  ap.add_argument('--extract_hw', default='768,1024')
  ap.add_argument('--cosine_sizes', default='683,1024;771,1024', help="'H,W;H,W' ('' = skip)")
  ap.add_argument('--dtype', default='float32')
  ap.add_argument('--batch', type=int, default=4)
  ap.add_argument('--cosine_buckets', default='32,64')
  ap.add_argument('--skip_search', action='store_true')
  args = ap.parse_args()
  if not args.skip_search:
    bench_search(args.distractors, args.dim, args.chunk, args.reference)
  bench_compiles()
  if args.extract_model != 'none':
    hw = tuple(int(v) for v in args.extract_hw.split(','))
    cos_sizes = [tuple(int(v) for v in s.split(',')) for s in args.cosine_sizes.split(';') if s]
    bench_extraction(args.extract_model, args.checkpoint, args.extract_images, hw, cos_sizes,
                     args.dtype, args.batch,
                     tuple(int(b) for b in args.cosine_buckets.split(',') if b))


if __name__ == '__main__':
  main()
