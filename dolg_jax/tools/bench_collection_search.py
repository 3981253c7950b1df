r"""Search at scale on synthetic clustered descriptors.

  python -m dolg_jax.tools.bench_collection_search --n=1000000 --dim=512 --clusters=2000 \
      --queries=200 --k=100 --threads=2 [--methods=numpy,flat,faiss_flat,ivfpq,ivfpq_norefine,hnsw]

Descriptors: `clusters` Gaussian centres plus isotropic noise (`--noise`), L2-normalised; queries
are fresh vectors drawn the same way. Per method, on the same data: build time, memory (RSS growth
while building, bytes per vector), latency p50 / p99 (one query at a time) and batched (all queries
at once, per query), recall@k against exact search. Methods: numpy (matmul + argpartition, the
baseline), flat (the collection's exact search, faiss_index 'flat'), faiss_flat
(IndexFlatIP.search), ivfpq (IVF{nlist},PQ{m} + exact refine of k * refine), ivfpq_norefine, hnsw
(IndexHNSWFlat). The projection to `--project_to` vectors scales memory by the bytes per vector and
the batched latency linearly for the exact methods (a full scan), as log n for HNSW, and the p50 as
sqrt(n) for IVF-PQ (nlist grows as sqrt(n), same nprobe). Prints a table and one JSON line.
Measurements: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

from absl import app
from absl import flags
import faiss
import numpy as np

from dolg_jax import cli
from dolg_jax.collection import faiss_index

FLAGS = flags.FLAGS
METHODS = ('numpy', 'flat', 'faiss_flat', 'ivfpq', 'ivfpq_norefine', 'hnsw')


def define_flags() -> None:
  flags.DEFINE_integer('n', 1_000_000, 'Database vectors.')
  flags.DEFINE_integer('dim', 512, 'Dimension.')
  flags.DEFINE_integer('clusters', 2000, 'Gaussian clusters.')
  flags.DEFINE_float(
    'noise', 0.6, 'Noise std relative to the centres (per dimension, x 1/sqrt(d) of a unit centre).'
  )
  flags.DEFINE_integer('queries', 200, 'Queries.')
  flags.DEFINE_integer('k', 100, 'Results per query (recall@k).')
  flags.DEFINE_integer('threads', 2, 'Threads (FAISS OpenMP and BLAS).')
  flags.DEFINE_list('methods', list(METHODS), f'Any of {METHODS}.')
  flags.DEFINE_integer('nlist', 1024, 'IVF lists.')
  flags.DEFINE_integer('pq_m', 64, 'PQ sub-quantizers.')
  flags.DEFINE_integer('pq_bits', 4, 'PQ bits per code (4 = fast scan).')
  flags.DEFINE_integer('nprobe', 16, 'IVF lists probed.')
  flags.DEFINE_integer('refine', 10, 'IVF-PQ exact refine factor.')
  flags.DEFINE_integer('train_size', 65536, 'IVF-PQ training sample.')
  flags.DEFINE_integer('hnsw_m', 32, 'HNSW links per node.')
  flags.DEFINE_integer('ef_construction', 80, 'HNSW efConstruction.')
  flags.DEFINE_integer('ef_search', 400, 'HNSW efSearch.')
  flags.DEFINE_integer('single_queries', 100, 'Queries timed one at a time (p50 / p99).')
  flags.DEFINE_integer('project_to', 100_000_000, 'Projection target.')
  flags.DEFINE_integer('seed', 0, 'Data seed.')


def centres_of(clusters: int, d: int, seed: int) -> np.ndarray:
  c = np.random.default_rng(seed).standard_normal((clusters, d)).astype(np.float32)
  return c / np.linalg.norm(c, axis=1, keepdims=True)


def clustered(
  centres: np.ndarray, n: int, noise: float, seed: int, block: int = 100_000
) -> np.ndarray:
  """n unit vectors: a random centre each plus Gaussian noise (noise / sqrt(d) per dimension)."""
  rng = np.random.default_rng(seed)
  d = centres.shape[1]
  out = np.empty((n, d), np.float32)
  for a in range(0, n, block):
    b = min(n, a + block)
    x = centres[rng.integers(0, centres.shape[0], b - a)]
    x += (noise / math.sqrt(d)) * rng.standard_normal((b - a, d), dtype=np.float32)
    out[a:b] = x / np.linalg.norm(x, axis=1, keepdims=True)
  return out


def rss_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def numpy_topk(q: np.ndarray, x: np.ndarray, k: int, block: int = 65536):
  """Plain numpy: scores by matmul, argpartition per block, then sort the k (the baseline)."""
  best_s = np.zeros((q.shape[0], 0), np.float32)
  best_i = np.zeros((q.shape[0], 0), np.int64)
  for a in range(0, x.shape[0], block):
    s = q @ x[a : a + block].T
    p = np.argpartition(-s, k - 1, axis=1)[:, :k]
    best_s = np.concatenate([best_s, np.take_along_axis(s, p, 1)], 1)
    best_i = np.concatenate([best_i, p + a], 1)
    if best_s.shape[1] > k:
      p = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
      best_s, best_i = np.take_along_axis(best_s, p, 1), np.take_along_axis(best_i, p, 1)
  o = np.argsort(-best_s, axis=1, kind='stable')
  return np.take_along_axis(best_s, o, 1), np.take_along_axis(best_i, o, 1)


def timed(fn, queries: np.ndarray, single: int) -> dict:
  t0 = time.perf_counter()
  _, ids = fn(queries)
  batched = (time.perf_counter() - t0) / queries.shape[0]
  lat = []
  for i in range(min(single, queries.shape[0])):
    t0 = time.perf_counter()
    fn(queries[i : i + 1])
    lat.append(time.perf_counter() - t0)
  lat = np.asarray(lat) * 1000
  return {
    'ids': ids,
    'batched_ms': 1000 * batched,
    'p50_ms': float(np.percentile(lat, 50)),
    'p99_ms': float(np.percentile(lat, 99)),
  }


def run_methods(x: np.ndarray, q: np.ndarray) -> list[dict]:
  k = FLAGS.k
  take = lambda ids: x[ids]
  blocks = lambda: ((a, x[a : a + 65536]) for a in range(0, x.shape[0], 65536))
  t0 = time.perf_counter()
  _, exact = numpy_topk(q, x, k)
  print(f'exact reference: {time.perf_counter() - t0:.1f}s', flush=True)
  rows = []
  specs = {
    'flat': faiss_index.Spec(kind='flat'),
    'faiss_flat': faiss_index.Spec(kind='flat'),
    'ivfpq': faiss_index.Spec(
      kind='ivfpq',
      nlist=FLAGS.nlist,
      pq_m=FLAGS.pq_m,
      pq_bits=FLAGS.pq_bits,
      nprobe=FLAGS.nprobe,
      refine=FLAGS.refine,
      train_size=FLAGS.train_size,
    ),
    'hnsw': faiss_index.Spec(
      kind='hnsw',
      hnsw_m=FLAGS.hnsw_m,
      ef_construction=FLAGS.ef_construction,
      ef_search=FLAGS.ef_search,
    ),
  }
  built = {}
  for method in FLAGS.methods:
    if method not in METHODS:
      raise app.UsageError(f'unknown method {method}; choose from {METHODS}')
    print(f'{method}: building ...', flush=True)
    rss0, t0 = rss_bytes(), time.perf_counter()
    if method == 'numpy':
      fn = lambda qq: numpy_topk(qq, x, k)
      build_s, mem, per_vec, desc = 0.0, 0, 4 * x.shape[1], 'numpy matmul + argpartition'
    else:
      key = 'ivfpq' if method.startswith('ivfpq') else ('flat' if 'flat' in method else method)
      if key not in built:
        index, spec, info = faiss_index.build(blocks, take, x.shape[0], x.shape[1], specs[key])
        built[key] = (index, spec, time.perf_counter() - t0, rss_bytes() - rss0)
      index, spec, build_s, mem = built[key]
      if method == 'ivfpq_norefine':
        spec = dataclasses.replace(spec, refine=1)
      if method == 'faiss_flat':
        fn = lambda qq, index=index: index.search(qq, k)
      else:
        fn = lambda qq, index=index, spec=spec: faiss_index.search(index, spec, qq, k, take)
      desc = 'IndexFlatIP.search' if method == 'faiss_flat' else faiss_index.description(spec)
      per_vec = {
        'flat': 4 * x.shape[1],
        'hnsw': 4 * x.shape[1] + 2 * 4 * spec.hnsw_m,
        'ivfpq': spec.pq_m * spec.pq_bits // 8 + 8,
      }[key]
      if method == 'ivfpq':
        per_vec_note = f'{per_vec} B codes+ids (+ {4 * x.shape[1]} B stored descriptors, on disk)'
    t = timed(fn, q, FLAGS.single_queries)
    ids = np.asarray(t.pop('ids'))
    row = {
      'method': method,
      'structure': desc,
      'build_s': build_s,
      'mem_mb': mem / 2**20,
      'bytes_per_vector': per_vec,
      'recall': faiss_index.recall_at_k(ids, exact),
      **t,
    }
    if method == 'ivfpq':
      row['note'] = per_vec_note
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def project(rows: list[dict], n: int, target: int) -> list[dict]:
  out = []
  f = target / n
  for r in rows:
    if r['method'] in ('numpy', 'flat', 'faiss_flat', 'hnsw'):
      lat = r['batched_ms'] * (f if r['method'] != 'hnsw' else math.log(target) / math.log(n))
    else:
      lat = r['p50_ms'] * math.sqrt(f)
    out.append(
      {
        'method': r['method'],
        'memory_gb': r['bytes_per_vector'] * target / 2**30,
        'latency_ms': lat,
      }
    )
  return out


def main(argv):
  del argv
  faiss.omp_set_num_threads(FLAGS.threads)
  t0 = time.perf_counter()
  centres = centres_of(FLAGS.clusters, FLAGS.dim, FLAGS.seed)
  x = clustered(centres, FLAGS.n, FLAGS.noise, FLAGS.seed + 1)
  q = clustered(centres, FLAGS.queries, FLAGS.noise, FLAGS.seed + 2)  # near the data, not copies
  print(
    f'data: {FLAGS.n} x {FLAGS.dim}, {FLAGS.clusters} clusters, '
    f'{time.perf_counter() - t0:.1f}s; '
    f'{FLAGS.queries} queries, k={FLAGS.k}, {FLAGS.threads} threads, faiss {faiss.__version__}',
    flush=True,
  )
  rows = run_methods(x, q)
  print(
    f'\n{"method":16s} {"structure":36s} {"build s":>8s} {"mem MB":>8s} {"B/vec":>6s} '
    f'{"p50 ms":>8s} {"p99 ms":>8s} {"batch ms/q":>10s} {"recall@" + str(FLAGS.k):>10s}'
  )
  for r in rows:
    print(
      f'{r["method"]:16s} {r["structure"][:36]:36s} {r["build_s"]:8.1f} {r["mem_mb"]:8.0f} '
      f'{r["bytes_per_vector"]:6d} {r["p50_ms"]:8.2f} {r["p99_ms"]:8.2f} '
      f'{r["batched_ms"]:10.2f} {r["recall"]:10.4f}'
    )
  proj = project(rows, FLAGS.n, FLAGS.project_to)
  print(f'\nprojection to {FLAGS.project_to:,} vectors (see the module docstring for the model):')
  for p in proj:
    print(
      f'  {p["method"]:16s} memory {p["memory_gb"]:8.1f} GB   latency ~{p["latency_ms"]:10.1f} '
      'ms/query'
    )
  print(
    json.dumps(
      {
        'config': {
          k: FLAGS[k].value
          for k in (
            'n',
            'dim',
            'clusters',
            'noise',
            'queries',
            'k',
            'threads',
            'nlist',
            'pq_m',
            'pq_bits',
            'nprobe',
            'refine',
            'train_size',
            'hnsw_m',
            'ef_construction',
            'ef_search',
          )
        },
        'faiss': faiss.__version__,
        'rows': rows,
        'projection': proj,
      }
    )
  )


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
