"""The search structure of a collection index: FAISS (faiss-cpu; faiss-gpu where installed).

`Spec.kind` (inner product of L2-normalised descriptors = cosine similarity): 'flat' (default;
`IndexFlatIP`, exact, searched by blocked matmul + argpartition over its vectors), 'ivfpq'
(`IVF{nlist},PQ{m}x{bits}`, trained on a seeded sample, `nprobe` lists; with `refine` > 1 the top
k * refine are re-scored exactly from the stored descriptors) or 'hnsw' (`IndexHNSWFlat`). Zero
parameters are automatic (`resolve`). `build` / `extend` / `save` / `load` (`deserialize`: from its
bytes) the structure; `search` -> (scores, ids), best first, ties to the lower row;
`measure_recall` -> the manifest's recall@k (mean |approx ∩ exact| / k over a sample of stored
rows). Raises ValueError for an unknown kind or rows added out of order. Design notes:
docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Iterable, Optional

import faiss
import numpy as np

from dolg_jax import atomic

KINDS = ('flat', 'ivfpq', 'hnsw')


@dataclasses.dataclass(frozen=True)
class Spec:
  kind: str = 'flat'
  nlist: int = 0  # ivfpq: inverted lists (0: ~4 sqrt(n), a power of two, <= n / 39)
  pq_m: int = 0  # ivfpq: sub-quantizers (0: D / 8, a divisor of D)
  pq_bits: int = 4  # ivfpq: bits per code (4: SIMD fast scan; lowered for small samples)
  nprobe: int = 32  # ivfpq: lists visited per query
  refine: int = 10  # ivfpq: shortlist k * refine re-scored exactly (1 = off)
  hnsw_m: int = 32  # hnsw: links per node
  ef_construction: int = 80
  ef_search: int = 400
  train_size: int = 0  # ivfpq: training sample (0: min(n, max(32 nlist, 40 * 2^bits), 131072))
  seed: int = 0

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def resolve(spec: Spec, n: int, d: int) -> Spec:
  """`spec` with its automatic (0) parameters set for n rows of width d."""
  if spec.kind not in KINDS:
    raise ValueError(f'faiss kind must be one of {KINDS}; got {spec.kind!r}')
  if spec.kind != 'ivfpq':
    return spec
  nlist = spec.nlist or max(1, min(2 ** round(math.log2(max(4 * math.sqrt(n), 1))), n // 39))
  nlist = max(1, min(nlist, n))
  m = spec.pq_m or max(1, d // 8)
  while d % m:
    m -= 1
  train = spec.train_size or min(n, max(32 * nlist, 40 * 2**spec.pq_bits, 1), 131072)
  train = min(train, n)
  bits = max(1, min(spec.pq_bits, int(math.floor(math.log2(max(train, 2))))))
  return dataclasses.replace(spec, nlist=nlist, pq_m=m, pq_bits=bits, train_size=train)


def factory_string(spec: Spec) -> str:
  """FAISS factory string of an 'ivfpq' spec: 4-bit codes with an even m use the fast-scan
  kernels ('fs'; PQ training with 16 centroids per sub-space is also 16x cheaper than 256)."""
  fs = 'fs' if spec.pq_bits == 4 and spec.pq_m % 2 == 0 else ''
  return f'IVF{spec.nlist},PQ{spec.pq_m}x{spec.pq_bits}{fs}'


def description(spec: Spec) -> str:
  if spec.kind == 'flat':
    return 'IndexFlatIP'
  if spec.kind == 'hnsw':
    return f'HNSW{spec.hnsw_m},Flat'
  return factory_string(spec) + (f' + exact refine x{spec.refine}' if spec.refine > 1 else '')


def _empty(spec: Spec, d: int):
  if spec.kind == 'flat':
    return faiss.IndexFlatIP(d)
  if spec.kind == 'hnsw':
    index = faiss.IndexHNSWFlat(d, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = spec.ef_construction
    return index
  return faiss.index_factory(d, factory_string(spec), faiss.METRIC_INNER_PRODUCT)


def configure(index, spec: Spec) -> None:
  """Sets the search-time parameters (nprobe, efSearch) of a built or loaded index."""
  if spec.kind == 'ivfpq':
    faiss.extract_index_ivf(index).nprobe = spec.nprobe
  elif spec.kind == 'hnsw':
    index.hnsw.efSearch = spec.ef_search


def build(
  blocks: Callable[[], Iterable[tuple[int, np.ndarray]]],
  take: Callable,
  n: int,
  d: int,
  spec: Spec,
  resolved: Optional[Spec] = None,
  trained_rows: Optional[int] = None,
) -> tuple[object, Spec, dict]:
  """(index, resolved spec, info) over n rows of width d.

  blocks(): yields (start, float32 block) in row order; take(ids): float32 rows (training sample).
  resolved, trained_rows: rebuild an index first built over `trained_rows` rows with these
  parameters (same training sample, so the same structure as that index extended to n rows).
  """
  spec = resolved or resolve(spec, n, d)
  trained_rows = int(trained_rows or n)
  index = _empty(spec, d)
  info = {
    'type': description(spec),
    'spec': spec.to_json(),
    'ntotal': 0,
    'trained_rows': trained_rows,
  }
  t0 = time.perf_counter()
  if spec.kind == 'ivfpq':
    rng = np.random.default_rng(spec.seed)
    sample = np.sort(rng.choice(trained_rows, spec.train_size, replace=False))
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.seed = spec.seed
    pq_index = faiss.downcast_index(ivf)
    if hasattr(pq_index, 'pq'):
      pq_index.pq.cp.seed = spec.seed
    index.train(np.ascontiguousarray(take(sample), np.float32))
    info['trained_on'] = int(spec.train_size)
  info['train_seconds'] = time.perf_counter() - t0
  extend(index, blocks())
  info['ntotal'] = int(index.ntotal)
  info['build_seconds'] = time.perf_counter() - t0
  configure(index, spec)
  return index, spec, info


def extend(index, blocks: Iterable[tuple[int, np.ndarray]]) -> None:
  """Appends blocks (start, float32 rows) whose start must be index.ntotal."""
  for start, block in blocks:
    if start != index.ntotal:
      raise ValueError(
        f'rows must be added in order: block starts at {start}, index has {index.ntotal}'
      )
    index.add(np.ascontiguousarray(block, np.float32))


def save(index, path: str) -> None:
  """Writes `index` to `path` atomically (`dolg_jax.atomic.replacing`)."""
  with atomic.replacing(path) as tmp:
    faiss.write_index(index, tmp)


def load(path: str, spec: Spec, mmap: bool = False):
  flags = faiss.IO_FLAG_MMAP if mmap else 0
  index = faiss.read_index(path, flags)
  configure(index, spec)
  return index


def deserialize(data: bytes, spec: Spec):
  """The structure `save` wrote, from its bytes (read and checked by the caller), copied into
  the index block by block (faiss.deserialize_index would copy the whole of `data` first)."""
  view, pos = memoryview(data), 0

  def read(n: int) -> bytes:
    nonlocal pos
    chunk = bytes(view[pos : pos + n])
    pos += len(chunk)
    return chunk

  index = faiss.read_index(faiss.PyCallbackIOReader(read))
  configure(index, spec)
  return index


# ----------------------------------------------------------------------------- search


def _merge(best_s, best_i, s, i, k):
  all_s = np.concatenate([best_s, s], axis=1)
  all_i = np.concatenate([best_i, i], axis=1)
  kk = min(k, all_s.shape[1])
  part = (
    np.argpartition(-all_s, kk - 1, axis=1)[:, :kk]
    if all_s.shape[1] > kk
    else np.broadcast_to(np.arange(all_s.shape[1]), all_s.shape).copy()
  )
  return np.take_along_axis(all_s, part, 1), np.take_along_axis(all_i, part, 1)


def sort_results(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each row best first: decreasing score, ties to the lower id; -1 ids (no result) last."""
  key_s = np.where(ids < 0, -np.inf, scores)
  out_s, out_i = np.empty_like(scores), np.empty_like(ids)
  for r in range(scores.shape[0]):
    o = np.lexsort((ids[r], -key_s[r]))
    out_s[r], out_i[r] = scores[r][o], ids[r][o]
  return out_s, out_i


def exact_topk(
  queries: np.ndarray, blocks: Iterable[tuple[int, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
  """Exact top k by float32 matmul + argpartition over (start, block) rows; best first."""
  q = np.ascontiguousarray(queries, np.float32)
  best_s = np.zeros((q.shape[0], 0), np.float32)
  best_i = np.zeros((q.shape[0], 0), np.int64)
  for start, block in blocks:
    s = q @ np.asarray(block, np.float32).T
    ids = np.broadcast_to(np.arange(start, start + block.shape[0], dtype=np.int64), s.shape)
    if s.shape[1] > k:
      part = np.argpartition(-s, k - 1, axis=1)[:, :k]
      s, ids = np.take_along_axis(s, part, 1), np.take_along_axis(ids, part, 1)
    best_s, best_i = _merge(best_s, best_i, s, ids, k)
  return sort_results(best_s, best_i)


def flat_vectors(index) -> np.ndarray:
  """The (ntotal, d) float32 vectors of an IndexFlat, as a view (no copy)."""
  return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


def flat_blocks(index, rows: int = 65536):
  x = flat_vectors(index)
  for a in range(0, x.shape[0], rows):
    yield a, x[a : a + rows]


def search(
  index,
  spec: Spec,
  queries: np.ndarray,
  k: int,
  take: Optional[Callable[[np.ndarray], np.ndarray]] = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(scores, ids), each (nq, k'), k' = min(k, ntotal), best first, scores exact for 'flat',
  'hnsw' and refined 'ivfpq' (take: row ids -> stored float32 descriptors, for the refine)."""
  q = np.ascontiguousarray(queries, np.float32)
  k = int(min(k, index.ntotal))
  if k <= 0:
    return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
  if spec.kind == 'flat':
    return exact_topk(q, flat_blocks(index), k)
  if spec.kind == 'ivfpq' and spec.refine > 1 and take is not None:
    short = int(min(k * spec.refine, index.ntotal))
    _, ids = index.search(q, short)
    ids = ids.astype(np.int64)
    valid = ids >= 0
    vecs = take(np.where(valid, ids, 0))
    s = np.einsum('qd,qmd->qm', q, vecs).astype(np.float32)
    s = np.where(valid, s, -np.inf)
    part = (
      np.argpartition(-s, k - 1, axis=1)[:, :k]
      if short > k
      else np.broadcast_to(np.arange(short), s.shape)
    )
    s, ids = np.take_along_axis(s, part, 1), np.take_along_axis(ids, part, 1)
    return sort_results(s, ids)
  s, ids = index.search(q, k)
  return sort_results(s.astype(np.float32), ids.astype(np.int64))


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
  """Mean over rows of |approx ∩ exact| / |exact| (ids; -1 never counts)."""
  hits = [
    len(set(a[a >= 0].tolist()) & set(e.tolist())) / max(1, len(e)) for a, e in zip(approx, exact)
  ]
  return float(np.mean(hits)) if hits else 1.0


def measure_recall(
  index,
  spec: Spec,
  take: Callable,
  blocks: Callable,
  n: int,
  k: int = 100,
  sample: int = 200,
  seed: int = 0,
) -> dict:
  """recall@k of `search` against exact search, a seeded sample of stored rows as queries."""
  k = int(min(k, n))
  m = int(min(sample, n))
  if not k or not m:
    return {'k': k, 'queries': m, 'recall': None}
  rng = np.random.default_rng(seed + 1)
  qids = np.sort(rng.choice(n, m, replace=False))
  q = take(qids)
  _, exact = exact_topk(q, blocks(), k)
  t0 = time.perf_counter()
  _, approx = search(index, spec, q, k, take)
  seconds = time.perf_counter() - t0
  return {
    'k': k,
    'queries': m,
    'recall': recall_at_k(approx, exact),
    'ms_per_query_batched': 1000 * seconds / m,
  }
