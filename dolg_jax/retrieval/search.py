"""Nearest-neighbour search for retrieval evaluation, and the exact +1M fast path.

Scores are float32 dot products of L2-normalised descriptors, computed on the default JAX device
in fixed-size database chunks (`iter_score_chunks`); the database may be several segments, never
concatenated. Ranking rule (every path follows it): `np.argsort(-scores[q], kind='stable')`, i.e.
decreasing score, ties to the lower index. `full_ranks` is the slow reference; `item_positions` /
`fast_compute_map` give the labelled images' positions without sorting (methods 'host', 'device')
and bit-identical mAP. How the fast path works and its measurements: docs/design_notes.md.
"""

from __future__ import annotations

import functools
from typing import Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dolg_jax.models.normalize import l2_normalize
from dolg_jax.retrieval import metrics

DbLike = np.ndarray | Sequence[np.ndarray]


def as_segments(db: DbLike) -> list[np.ndarray]:
  """A database given as one (N, D) array or a list of (N_i, D) arrays -> list of arrays."""
  if isinstance(db, np.ndarray) or isinstance(db, jax.Array):
    segs = [np.asarray(db)]
  else:
    segs = [np.asarray(s) for s in db]
  dims = {s.shape[1] for s in segs if s.ndim == 2}
  if any(s.ndim != 2 for s in segs) or len(dims) != 1:
    raise ValueError(f'database segments must be 2-D with one width; got {[s.shape for s in segs]}')
  return segs


def db_size(db: DbLike) -> int:
  return sum(s.shape[0] for s in as_segments(db))


def _gather_rows(segs: list[np.ndarray], start: int, stop: int, chunk: int) -> np.ndarray:
  """Rows [start, stop) of the virtual concatenation, zero-padded to `chunk` rows, float32."""
  offset = 0
  for s in segs:
    if offset <= start and stop <= offset + s.shape[0] and stop - start == chunk:
      return np.asarray(s[start - offset : stop - offset], np.float32)  # a view, no copy
    offset += s.shape[0]
  out = np.zeros((chunk, segs[0].shape[1]), np.float32)
  offset = 0
  for s in segs:
    lo, hi = max(start, offset), min(stop, offset + s.shape[0])
    if lo < hi:
      out[lo - start : hi - start] = s[lo - offset : hi - offset]
    offset += s.shape[0]
  return out


@jax.jit
def _chunk_scores(queries: jax.Array, block: jax.Array) -> jax.Array:
  return jnp.matmul(queries, block.T, precision=jax.lax.Precision.HIGHEST)


def iter_score_chunks(
  queries, db: DbLike, chunk_size: int = 65536, only_chunks: Sequence[int] | None = None
) -> Iterator[tuple[int, int, jax.Array]]:
  """Yields (start, n_valid, scores) with scores (n_queries, chunk) float32 on device.

  The chunk is min(chunk_size, N) rows; the last chunk is zero-padded (its columns beyond n_valid
  are meaningless). `only_chunks` restricts to the given chunk numbers.
  """
  segs = as_segments(db)
  n = sum(s.shape[0] for s in segs)
  chunk = max(1, min(int(chunk_size), n))
  q = jnp.asarray(np.asarray(queries, np.float32))
  ids = range((n + chunk - 1) // chunk) if only_chunks is None else sorted(set(only_chunks))
  for c in ids:
    start = c * chunk
    stop = min(n, start + chunk)
    yield start, stop - start, _chunk_scores(q, jnp.asarray(_gather_rows(segs, start, stop, chunk)))


def _chunk_len(n: int, chunk_size: int) -> int:
  return max(1, min(int(chunk_size), n))


def similarity_matrix(queries, db: DbLike, chunk_size: int = 65536) -> np.ndarray:
  """The canonical float32 scores (n_queries, N) (memory: 4 x n_queries x N bytes)."""
  n = db_size(db)
  out = np.empty((np.shape(queries)[0], n), np.float32)
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size):
    out[:, start : start + n_valid] = np.asarray(s)[:, :n_valid]
  return out


def full_ranks(scores: np.ndarray) -> np.ndarray:
  """Reference full ranking (N, n_queries): stable argsort of -scores (ties: lower index first)."""
  return np.argsort(-np.asarray(scores), axis=1, kind='stable').T


@functools.partial(jax.jit, static_argnames=('k',))
def _merge_topk(best_s, best_i, scores, start, n_valid, k):
  col = jnp.arange(scores.shape[1])
  scores = jnp.where(col[None, :] < n_valid, scores, -jnp.inf)
  s, i = jax.lax.top_k(scores, min(k, scores.shape[1]))
  all_s = jnp.concatenate([best_s, s], axis=1)
  all_i = jnp.concatenate([best_i, (i + start).astype(jnp.int32)], axis=1)
  s2, j = jax.lax.top_k(all_s, k)
  return s2, jnp.take_along_axis(all_i, j, axis=1)


def topk(queries, db: DbLike, k: int, chunk_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
  """Top-k (scores, indices), each (n_queries, k), best first, ties to the lower index."""
  n = db_size(db)
  k = int(min(k, n))
  nq = np.shape(queries)[0]
  best_s = jnp.full((nq, k), -jnp.inf, jnp.float32)
  best_i = jnp.full((nq, k), -1, jnp.int32)
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size):
    best_s, best_i = _merge_topk(best_s, best_i, s, start, n_valid, k)
  return np.asarray(best_s), np.asarray(best_i).astype(np.int64)


# ----------------------------------------------------------------------------- exact positions


def _order_key(s: np.ndarray) -> np.ndarray:
  """Order-preserving float32 -> uint32 (equal floats, -0.0 == +0.0, map to equal keys)."""
  bits = np.asarray(s, np.float32).view(np.uint32)
  bits = np.where(np.asarray(s) == 0, np.uint32(0), bits)  # -0.0 -> +0.0
  neg = (bits >> np.uint32(31)).astype(bool)
  return np.where(neg, ~bits, bits | np.uint32(0x80000000))


@jax.jit
def _order_key_device(s: jax.Array) -> jax.Array:
  """`_order_key` on device (same bits)."""
  bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
  bits = jnp.where(s == 0, jnp.uint32(0), bits)
  neg = (bits >> 31).astype(bool)
  return jnp.where(neg, ~bits, bits | jnp.uint32(0x80000000))


def _composite(key: np.ndarray, index: np.ndarray) -> np.ndarray:
  """uint64 that is larger exactly when the image ranks earlier (higher key, then lower index)."""
  inv_index = np.uint64(0xFFFFFFFF) - index.astype(np.uint64)
  return (key.astype(np.uint64) << np.uint64(32)) | inv_index


def _item_scores(queries, db, items, chunk_size) -> list[np.ndarray]:
  """Scores of the labelled images, taken from the same chunk program as everything else."""
  n = db_size(db)
  chunk = _chunk_len(n, chunk_size)
  needed = sorted({int(i) // chunk for it in items for i in it})
  out = [np.zeros(len(it), np.float32) for it in items]
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size, only_chunks=needed):
    s = np.asarray(s)
    for q, it in enumerate(items):
      sel = (it >= start) & (it < start + n_valid)
      out[q][sel] = s[q, it[sel] - start]
  for q, v in enumerate(out):
    if not np.all(np.isfinite(v)):
      raise ValueError(f'query {q}: non-finite scores (check the descriptors for NaN/inf).')
  return out


def _positions_host(queries, db, items, chunk_size, bins_bits):
  nq = len(items)
  n = db_size(db)
  chunk = _chunk_len(n, chunk_size)
  shift = np.uint32(32 - bins_bits)
  nbins = 1 << bins_bits
  # Chunks holding labelled images come first: their scores give the items' keys, and their own
  # keys are kept (host) until the marks exist, so no chunk is scored twice.
  first = sorted({int(i) // chunk for it in items for i in it})
  held = {}
  item_key = [np.zeros(len(it), np.uint32) for it in items]
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size, only_chunks=first):
    keys = np.asarray(_order_key_device(s))[:, :n_valid]
    held[start] = keys
    for q, it in enumerate(items):
      sel = (it >= start) & (it < start + n_valid)
      item_key[q][sel] = keys[q, it[sel] - start]
  item_bin = [k >> shift for k in item_key]
  marks = np.zeros((nq, nbins), bool)
  for q in range(nq):
    marks[q, item_bin[q]] = True
  hist = np.zeros((nq, nbins), np.int64)
  cands = [[] for _ in range(nq)]

  def consume(start, keys):
    for q in range(nq):
      if not len(items[q]):
        continue
      key = keys[q]
      coarse = key >> shift
      hist[q] += np.bincount(coarse, minlength=nbins)
      hit = np.flatnonzero(marks[q][coarse])
      cands[q].append(_composite(key[hit], hit + start))

  for start, keys in held.items():
    consume(start, keys)
  del held
  rest = [c for c in range((n + chunk - 1) // chunk) if c not in set(first)]
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size, only_chunks=rest):
    consume(start, np.asarray(_order_key_device(s))[:, :n_valid])
  positions = []
  for q in range(nq):
    if not len(items[q]):
      positions.append(np.zeros(0, np.int64))
      continue
    cum = np.cumsum(hist[q])
    above = cum[-1] - cum  # images in strictly higher coarse bins
    marked = hist[q] * marks[q]
    mcum = np.cumsum(marked)
    marked_above = mcum[-1] - mcum  # of which candidates (those bins are marked)
    rs = np.sort(np.concatenate(cands[q]))
    r_items = _composite(item_key[q], items[q])
    n_before_cand = rs.shape[0] - np.searchsorted(rs, r_items, side='right')
    b = item_bin[q].astype(np.int64)
    positions.append((above[b] + n_before_cand - marked_above[b]).astype(np.int64))
  return positions


@functools.lru_cache(maxsize=None)  # one compiled counter per length, reused by every evaluation
def _device_counter(steps: int):
  @jax.jit
  def count(scores, start, n_valid, srt_s, srt_i, hist):
    y = start + jnp.arange(scores.shape[1], dtype=jnp.int32)[None, :]
    m = srt_s.shape[1]
    lo = jnp.zeros(scores.shape, jnp.int32)
    hi = jnp.full(scores.shape, m, jnp.int32)

    def body(_, carry):
      lo, hi = carry
      mid = (lo + hi) // 2
      midc = jnp.minimum(mid, m - 1)
      a = jnp.take_along_axis(srt_s, midc, axis=1)
      b = jnp.take_along_axis(srt_i, midc, axis=1)
      before = (a > scores) | ((a == scores) & (b < y))  # item mid ranks before image y
      active = lo < hi
      return jnp.where(active & before, mid + 1, lo), jnp.where(active & ~before, mid, hi)

    lo, _ = jax.lax.fori_loop(0, steps, body, (lo, hi))
    valid = (y < start + n_valid).astype(jnp.int32)
    rows = jnp.broadcast_to(jnp.arange(scores.shape[0])[:, None], scores.shape)
    return hist.at[rows, lo].add(jnp.broadcast_to(valid, scores.shape))

  return count


def _positions_device(queries, db, items, chunk_size):
  nq = len(items)
  item_s = _item_scores(queries, db, items, chunk_size)
  m = max(1, max(len(it) for it in items))
  srt_s = np.full((nq, m), -np.inf, np.float32)  # padding never ranks before a finite score
  srt_i = np.full((nq, m), np.iinfo(np.int32).max, np.int32)
  orders = []
  for q, (v, it) in enumerate(zip(item_s, items)):
    order = np.lexsort((it, -v))  # rank order: score desc, index asc
    orders.append(order)
    srt_s[q, : len(it)] = v[order]
    srt_i[q, : len(it)] = it[order]
  count = _device_counter(int(np.ceil(np.log2(m + 1))))
  hist = jnp.zeros((nq, m + 1), jnp.int32)
  ss, si = jnp.asarray(srt_s), jnp.asarray(srt_i)
  for start, n_valid, s in iter_score_chunks(queries, db, chunk_size):
    hist = count(s, start, n_valid, ss, si, hist)
  cum = np.cumsum(np.asarray(hist).astype(np.int64), axis=1)
  positions = []
  for q, it in enumerate(items):
    pos = np.empty(len(it), np.int64)
    # k-th item in rank order: #{y with at most k items before it} - 1 (itself).
    pos[orders[q]] = cum[q, : len(it)] - 1
    positions.append(pos)
  return positions


def item_positions(
  queries,
  db: DbLike,
  items: Sequence[np.ndarray],
  chunk_size: int = 65536,
  method: str = 'auto',
  bins_bits: int = 18,
) -> list[np.ndarray]:
  """0-based positions of `items[q]` (unique database indices) in query q's full stable ranking."""
  n = db_size(db)
  items = [np.asarray(it, np.int64).reshape(-1) for it in items]
  for q, it in enumerate(items):
    if it.size and (it.min() < 0 or it.max() >= n or np.unique(it).size != it.size):
      raise ValueError(f'items[{q}] must be unique indices in [0, {n}).')
  if len(items) != np.shape(queries)[0]:
    raise ValueError(f'{np.shape(queries)[0]} queries but {len(items)} item lists.')
  if not np.all(np.isfinite(np.asarray(queries))):
    raise ValueError('queries contain NaN or inf.')
  if method == 'auto':
    method = 'host' if jax.default_backend() == 'cpu' else 'device'
  if method == 'host':
    return _positions_host(queries, db, items, chunk_size, bins_bits)
  if method == 'device':
    return _positions_device(queries, db, items, chunk_size)
  raise ValueError(f"method must be 'auto', 'host' or 'device'; got {method!r}")


def _junk_free(ok, junk, items, pos):
  """revisitop's shift: positions of found positives minus junk ranked strictly before them."""
  lookup = dict(zip(items.tolist(), pos.tolist()))
  gp = np.sort(np.array([lookup[i] for i in ok], np.int64))
  jp = np.sort(np.array([lookup[i] for i in junk], np.int64))
  return gp - np.searchsorted(jp, gp, side='left')


def _labelled(gnd_p: Sequence[Mapping], n: int):
  oks, junks = [], []
  for g in gnd_p:
    ok = np.asarray(g['ok'], np.int64).reshape(-1)
    junk = np.asarray(g.get('junk', []), np.int64).reshape(-1)
    oks.append(np.unique(ok[(ok >= 0) & (ok < n)]))
    junks.append(np.unique(junk[(junk >= 0) & (junk < n)]))
  return oks, junks


def _summarize_from_positions(gnd_p, items, positions, n, kappas):
  oks, junks = _labelled(gnd_p, n)
  nres = np.array([len(np.asarray(g['ok']).reshape(-1)) for g in gnd_p], np.int64)
  qids, rs = [], []
  for q in range(len(gnd_p)):
    if nres[q] == 0:
      continue
    r = _junk_free(oks[q], junks[q], items[q], positions[q])
    qids.append(np.full(r.shape[0], q, np.int64))
    rs.append(r)
  qids = np.concatenate(qids) if qids else np.zeros(0, np.int64)
  rs = np.concatenate(rs) if rs else np.zeros(0, np.int64)
  return metrics.summarize(qids, rs, nres, kappas)


def fast_compute_map(
  queries,
  db: DbLike,
  gnd: Sequence[Mapping],
  kappas=(1, 5, 10),
  chunk_size: int = 65536,
  method: str = 'auto',
):
  """Exactly metrics.compute_map(full_ranks(similarity_matrix(queries, db)), gnd, kappas)."""
  n = db_size(db)
  oks, junks = _labelled(gnd, n)
  items = [np.union1d(o, j) for o, j in zip(oks, junks)]
  positions = item_positions(queries, db, items, chunk_size, method)
  return _summarize_from_positions(gnd, items, positions, n, kappas)


def fast_compute_protocols(
  queries,
  db: DbLike,
  gnd_raw: Sequence[Mapping],
  kappas=(1, 5, 10),
  protocols: Sequence[str] = metrics.PROTOCOLS,
  chunk_size: int = 65536,
  method: str = 'auto',
) -> dict[str, dict]:
  """metrics.compute_protocols over the full ranking, from one pass over the database."""
  n = db_size(db)
  items = []
  for g in gnd_raw:
    allk = np.concatenate(
      [np.asarray(g[k], np.int64).reshape(-1) for k in ('easy', 'hard', 'junk')]
    )
    items.append(np.unique(allk[(allk >= 0) & (allk < n)]))
  positions = item_positions(queries, db, items, chunk_size, method)
  out = {}
  for p in protocols:
    m, aps, pr, prs = _summarize_from_positions(
      metrics.protocol_gnd(gnd_raw, p), items, positions, n, kappas
    )
    out[p] = {'map': m, 'aps': aps, 'mp': pr, 'prs': prs, 'kappas': tuple(kappas)}
  return out


# ----------------------------------------------------------------------------- QE / DBA


def _weighted_neighbours(
  vectors, db: DbLike, k: int, alpha: float, chunk_size: int, include_self: bool
) -> np.ndarray:
  segs = as_segments(db)
  s, idx = topk(vectors, segs, k, chunk_size)
  w = np.maximum(s, 0.0) ** alpha
  out = np.zeros(np.shape(vectors), np.float64)
  offsets = np.cumsum([0] + [g.shape[0] for g in segs])
  for r in range(idx.shape[1]):
    rows = np.empty((idx.shape[0], segs[0].shape[1]), np.float32)
    for g, seg in enumerate(segs):
      sel = (idx[:, r] >= offsets[g]) & (idx[:, r] < offsets[g + 1])
      rows[sel] = seg[idx[sel, r] - offsets[g]]
    out += w[:, r : r + 1] * rows
  if include_self:
    out += np.asarray(vectors, np.float64)
  return l2_normalize(out).astype(np.float32)


def alpha_query_expansion(
  queries, db: DbLike, k: int = 2, alpha: float = 3.0, chunk_size: int = 65536
) -> np.ndarray:
  """alpha-QE (Radenovic et al.): q' = normalise(q + sum_top-k max(s,0)^alpha d_i)."""
  if k <= 0:
    return np.asarray(queries, np.float32)
  return _weighted_neighbours(queries, db, k, alpha, chunk_size, include_self=True)


def database_augmentation(
  db: np.ndarray, k: int = 2, alpha: float = 3.0, chunk_size: int = 65536, block: int = 4096
) -> np.ndarray:
  """DBA: every database vector replaced by normalise(sum over its top-k neighbours, itself
  included as the first, of max(s,0)^alpha d_i). Quadratic in N: meant for the base sets."""
  db = np.asarray(db, np.float32)
  if k <= 0:
    return db
  out = np.empty_like(db)
  for b in range(0, db.shape[0], block):
    out[b : b + block] = _weighted_neighbours(
      db[b : b + block], db, k, alpha, chunk_size, include_self=False
    )
  return out
