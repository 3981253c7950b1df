"""SuperGlobal re-ranking (Shao et al., ICCV 2023), with the semantics of the authors' code.

`superglobal(queries, db, M=400, K=9, beta=0.15)` returns ranks (n_db, n_queries) in the revisitop
convention (column q = database indices for query q, best first), like `search.full_ranks`.
`superglobal_topm` re-ranks only the initial top M (n_queries, M); `superglobal_positions` /
`fast_compute_protocols` give exact positions in the `superglobal` ranking without the full sort
(the +1M path); `rerank_heads` re-ranks given initial heads. Every sort is stable (ties to the
lower index), on float32 with HIGHEST matmul precision, in jitted chunks of `query_chunk` queries.
The algorithm step by step and where it follows the released code: docs/design_notes.md.
"""

from __future__ import annotations

import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import search

_HI = jax.lax.Precision.HIGHEST


def take_rows(db: search.DbLike, idx: np.ndarray) -> np.ndarray:
  """db[idx] for a database given as one array or as segments; idx any int shape -> (..., d)."""
  segs = search.as_segments(db)
  idx = np.asarray(idx, np.int64)
  n = sum(s.shape[0] for s in segs)
  if idx.size and (idx.min() < 0 or idx.max() >= n):
    raise ValueError(f'row indices must be in [0, {n}); got [{idx.min()}, {idx.max()}].')
  out = np.empty(idx.shape + (segs[0].shape[1],), np.float32)
  offset = 0
  for s in segs:
    sel = (idx >= offset) & (idx < offset + s.shape[0])
    out[sel] = s[idx[sel] - offset]
    offset += s.shape[0]
  return out


@functools.partial(jax.jit, static_argnames=('k', 'beta'))
def _rerank_chunk(q: jax.Array, x: jax.Array, k: int, beta: float) -> tuple[jax.Array, jax.Array]:
  """q (b, d), x (b, M, d) candidates in initial order -> (order (b, M), final scores (b, M)).

  `order` holds positions into the candidate axis, best first; `final` is in that order.
  """
  m = x.shape[1]
  kk = min(k + 1, m)
  sim = jnp.einsum('bmd,bnd->bmn', x, x, precision=_HI)
  nn_s, nn_i = jax.lax.top_k(sim, kk)  # (b, M, kk), decreasing, ties to the lower index
  w = jnp.concatenate([jnp.ones_like(nn_s[..., :1]), beta * nn_s[..., 1:]], axis=-1)
  neighbours = jax.vmap(lambda xb, ib: xb[ib])(x, nn_i)  # (b, M, kk, d)
  refined = jnp.einsum('bmk,bmkd->bmd', w, neighbours, precision=_HI) / jnp.sum(w, -1)[..., None]
  r = jnp.einsum('bd,bmd->bm', q, refined, precision=_HI)
  r_sorted, pre = jax.lax.top_k(r, m)  # pre-order
  refined_pre = jnp.take_along_axis(refined, pre[..., None], axis=1)
  expanded = jnp.max(refined_pre[:, :kk], axis=1)  # (b, d)
  final = (r_sorted + jnp.einsum('bd,bmd->bm', expanded, refined_pre, precision=_HI)) / 2.0
  final_sorted, post = jax.lax.top_k(final, m)
  return jnp.take_along_axis(pre, post, axis=1), final_sorted


def _check(queries, db, M, K, beta) -> tuple[np.ndarray, int]:
  queries = np.asarray(queries, np.float32)
  if queries.ndim != 2:
    raise ValueError(f'queries must be (n_queries, d); got shape {queries.shape}.')
  segs = search.as_segments(db)
  if segs[0].shape[1] != queries.shape[1]:
    raise ValueError(f'queries have width {queries.shape[1]} but the database {segs[0].shape[1]}.')
  if int(M) < 1 or int(K) < 0 or not beta >= 0:
    raise ValueError(f'superglobal needs M >= 1, K >= 0, beta >= 0; got M={M}, K={K}, beta={beta}.')
  if not np.all(np.isfinite(queries)):
    raise ValueError('queries contain NaN or inf.')
  n = search.db_size(db)
  if n == 0:
    raise ValueError('the database is empty.')
  return queries, min(int(M), n)


def rerank_heads(
  queries: np.ndarray,
  db: search.DbLike,
  top: np.ndarray,
  K: int = 9,
  beta: float = 0.15,
  query_chunk: int = 16,
) -> np.ndarray:
  """Re-ranks given initial heads: top (nq, M) database indices, best first -> (nq, M)."""
  queries = np.asarray(queries, np.float32)
  top = np.asarray(top, np.int64)
  nq, m = top.shape
  out = np.empty_like(top)
  for a in range(0, nq, query_chunk):
    b = min(nq, a + query_chunk)
    qb = np.zeros((query_chunk, queries.shape[1]), np.float32)
    qb[: b - a] = queries[a:b]
    tb = np.zeros((query_chunk, m), np.int64)
    tb[: b - a] = top[a:b]
    order, _ = _rerank_chunk(jnp.asarray(qb), jnp.asarray(take_rows(db, tb)), int(K), float(beta))
    out[a:b] = np.take_along_axis(tb, np.asarray(order), axis=1)[: b - a]
  return out


def superglobal_topm(
  queries,
  db: search.DbLike,
  M: int = 400,
  K: int = 9,
  beta: float = 0.15,
  chunk_size: int = 65536,
  query_chunk: int = 16,
) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranked top M without any full sort: (initial top-M (nq, M), re-ranked top-M (nq, M)).

  Both best first; the initial top M come from the chunked device top-k (`search.topk`). M is
  clipped to the database size.
  """
  queries, m = _check(queries, db, M, K, beta)
  _, top = search.topk(queries, db, m, chunk_size)
  return top, rerank_heads(queries, db, top, K, beta, query_chunk)


def superglobal(
  queries,
  db: search.DbLike,
  M: int = 400,
  K: int = 9,
  beta: float = 0.15,
  chunk_size: int = 65536,
  query_chunk: int = 16,
) -> np.ndarray:
  """Full ranks (n_db, n_queries), revisitop convention: re-ranked top M, then the initial order.

  The tail's order needs the full initial ranking anyway, so here each chunk of queries is scored
  (`search.similarity_matrix`) and stably sorted once on the host (`search.full_ranks`); its first
  M rows are the initial top M (the same as `search.topk` would give) and are re-ranked.
  """
  queries, m = _check(queries, db, M, K, beta)
  n = search.db_size(db)
  ranks = np.empty((n, queries.shape[0]), np.int64)
  for a in range(0, queries.shape[0], query_chunk):
    b = min(queries.shape[0], a + query_chunk)
    r = search.full_ranks(search.similarity_matrix(queries[a:b], db, chunk_size))
    r[:m] = rerank_heads(queries[a:b], db, r[:m].T, K, beta, query_chunk).T
    ranks[:, a:b] = r
  return ranks


def superglobal_positions(
  queries,
  db: search.DbLike,
  items: Sequence[np.ndarray],
  M: int = 400,
  K: int = 9,
  beta: float = 0.15,
  chunk_size: int = 65536,
  query_chunk: int = 16,
  method: str = 'auto',
) -> list[np.ndarray]:
  """0-based positions of items[q] in query q's `superglobal` ranking, without sorting the tail.

  The re-ranking permutes the initial top M among themselves, so an item's position is its place
  in the re-ranked top M if it is there, else its initial position (`search.item_positions`).
  """
  queries, m = _check(queries, db, M, K, beta)
  _, new = superglobal_topm(queries, db, m, K, beta, chunk_size, query_chunk)
  positions = search.item_positions(queries, db, items, chunk_size, method)
  out = []
  for q, (it, pos) in enumerate(zip(items, positions)):
    it = np.asarray(it, np.int64).reshape(-1)
    place = {int(i): p for p, i in enumerate(new[q])}
    pos = pos.copy()
    inside = pos < m
    pos[inside] = [place[int(i)] for i in it[inside]]
    out.append(pos)
  return out


def fast_compute_protocols(
  queries,
  db: search.DbLike,
  gnd_raw,
  kappas=(1, 5, 10),
  M: int = 400,
  K: int = 9,
  beta: float = 0.15,
  chunk_size: int = 65536,
  method: str = 'auto',
) -> dict[str, dict]:
  """`metrics.compute_protocols(superglobal(queries, db, M, K, beta), gnd_raw)`, without the
  full sort (same numbers; the +1M path)."""
  n = search.db_size(db)
  items = []
  for g in gnd_raw:
    allk = np.concatenate(
      [np.asarray(g[k], np.int64).reshape(-1) for k in ('easy', 'hard', 'junk')]
    )
    items.append(np.unique(allk[(allk >= 0) & (allk < n)]))
  positions = superglobal_positions(queries, db, items, M, K, beta, chunk_size, method=method)
  out = {}
  for p in metrics.PROTOCOLS:
    mp, aps, pr, prs = search._summarize_from_positions(
      metrics.protocol_gnd(gnd_raw, p), items, positions, n, kappas
    )
    out[p] = {'map': mp, 'aps': aps, 'mp': pr, 'prs': prs, 'kappas': tuple(kappas)}
  return out


# ----------------------------------------------------------------------------- timing


def _l2n(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def benchmark(nq: int, ndb: int, dim: int, full: bool = True, seed: int = 0) -> dict:
  """Seconds for the re-ranked top 400 (first call with compilation, then warm) and, optionally,
  for the full (n_db, nq) ranks."""
  rng = np.random.default_rng(seed)
  db = _l2n(rng.standard_normal((ndb, dim), dtype=np.float32))
  q = _l2n(rng.standard_normal((nq, dim), dtype=np.float32))
  out = {'queries': nq, 'db': ndb, 'dim': dim, 'backend': jax.default_backend()}
  t = time.perf_counter()
  superglobal_topm(q, db)
  out['topm_first_call_s'] = time.perf_counter() - t
  t = time.perf_counter()
  superglobal_topm(q, db)
  out['topm_s'] = time.perf_counter() - t
  t = time.perf_counter()
  search.topk(q, db, 400)
  out['of_which_initial_topk_s'] = time.perf_counter() - t
  if full:
    t = time.perf_counter()
    superglobal(q, db)
    out['full_ranks_s'] = time.perf_counter() - t
  return out
