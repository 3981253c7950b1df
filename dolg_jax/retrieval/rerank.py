"""SuperGlobal re-ranking (Shao et al., ICCV 2023), with the semantics of the authors' code.

`superglobal(queries, db, M=400, K=9, beta=0.15)` returns ranks (n_db, n_queries) in the revisitop
convention (column q = database indices for query q, best first), like `search.full_ranks`.

What the released code computes (ShihaoShao-GH/SuperGlobal, modules/reranking/MDescAug.py and
RerankwMDA.py, called from test/test_model.py), and what this module computes, per query q with
L2-normalised descriptors:

1. Initial ranking: dot products, decreasing; `top` = the first M database indices (M is clipped
   to n_db). Here the order follows the ranking rule of `dolg_jax.retrieval.search` (float32
   scores of `iter_score_chunks`, ties to the lower index); the released code uses torch.argsort
   (no tie rule).
2. MDescAug: X = db[top] (M, d); S = X X^T (M, M). For every candidate m, its K+1 best entries of
   S[m] (decreasing; normally the first is m itself) with weights w = (1, beta s_1, ..., beta s_K)
   (weight 1 for the best, whatever its similarity; beta times the similarity for the others) give
   the refined descriptor x'_m = sum_j w_j X[j] / sum_j w_j. x'_m is NOT re-normalised.
3. Refined scores r_m = q . x'_m; the candidates are put in the order of decreasing r
   ("pre-order").
4. RerankwMDA: the expanded query is the element-wise max of the refined descriptors of the K+1
   first candidates in pre-order (the query itself is not part of the max); the final score of the
   candidate at pre-order position p is (r_(p) + expanded . x'_(p)) / 2, and the top M are sorted
   by it (decreasing; ties keep the pre-order). The database items beyond the first M keep their
   initial order.

This module follows the released code. Its points that a reading of the method alone could get
wrong (the paper's method section was not available to check against here; where it differs, the
code is what we reproduce):
* weight 1 for the nearest entry (normally the candidate itself) whatever its similarity, and
  beta * similarity for the K others; the sum is divided by the sum of the weights (a weighted
  mean) and the refined descriptor is not L2-normalised again;
* the expanded query is the max over the K+1 best refined database descriptors only; the query
  descriptor is not part of it;
* RerankwMDA also multiplies the K+1 best refined scores by beta into a tensor that is never used
  (`ranks_value_trans`); it has no effect and is not reproduced;
* K counts the neighbours besides the candidate (K+1 in total, the code's `self.K = K + 1`); when
  M < K + 1 all M are used;
* the final sort is over the refined-score order (pre-order), so equal final scores keep the
  refined-score order; torch.argsort itself has no tie rule, we use stable sorts throughout.

Tie rule: every sort is stable (top-k with lower index first), on float32 device arithmetic with
HIGHEST matmul precision. The re-ranking runs in jitted chunks of `query_chunk` queries; only
(query_chunk, M, d) candidate descriptors and (query_chunk, M, M) similarities live on device.

Entry points:
* `superglobal_topm`: the initial top M from the chunked device top-k (`search.topk`, no sort of
  the database) and their re-ranking (n_queries, M): seconds even with +1M distractors.
* `superglobal`: the full (n_db, n_queries) ranks. The tail's initial order needs one stable sort
  of the (n_queries, n_db) scores (host numpy, `search.full_ranks`, per query chunk); its first M
  rows are the initial top M, re-ranked in place. The sort dominates its time with 1M distractors.
* `superglobal_positions` / `fast_compute_protocols`: exact positions of chosen items in the
  `superglobal` ranking without that sort (the +1M fast path for revisitop's mAP, same numbers).
* `rerank_heads`: the re-ranking of given initial heads.

Timing: `python -m dolg_jax.tools.bench_rerank --queries=70 --db=1000000 --dim=512` (`benchmark`
here).
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
    raise ValueError(f'superglobal needs M >= 1, K >= 0, beta >= 0; got M={M}, K={K}, '
                     f'beta={beta}.')
  if not np.all(np.isfinite(queries)):
    raise ValueError('queries contain NaN or inf.')
  n = search.db_size(db)
  if n == 0:
    raise ValueError('the database is empty.')
  return queries, min(int(M), n)


def rerank_heads(queries: np.ndarray, db: search.DbLike, top: np.ndarray, K: int = 9,
                 beta: float = 0.15, query_chunk: int = 16) -> np.ndarray:
  """Re-ranks given initial heads: top (nq, M) database indices, best first -> (nq, M)."""
  queries = np.asarray(queries, np.float32)
  top = np.asarray(top, np.int64)
  nq, m = top.shape
  out = np.empty_like(top)
  for a in range(0, nq, query_chunk):
    b = min(nq, a + query_chunk)
    qb = np.zeros((query_chunk, queries.shape[1]), np.float32)
    qb[:b - a] = queries[a:b]
    tb = np.zeros((query_chunk, m), np.int64)
    tb[:b - a] = top[a:b]
    order, _ = _rerank_chunk(jnp.asarray(qb), jnp.asarray(take_rows(db, tb)), int(K), float(beta))
    out[a:b] = np.take_along_axis(tb, np.asarray(order), axis=1)[:b - a]
  return out


def superglobal_topm(queries, db: search.DbLike, M: int = 400, K: int = 9, beta: float = 0.15,
                     chunk_size: int = 65536, query_chunk: int = 16
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranked top M without any full sort: (initial top-M (nq, M), re-ranked top-M (nq, M)).

  Both best first; the initial top M come from the chunked device top-k (`search.topk`). M is
  clipped to the database size.
  """
  queries, m = _check(queries, db, M, K, beta)
  _, top = search.topk(queries, db, m, chunk_size)
  return top, rerank_heads(queries, db, top, K, beta, query_chunk)


def superglobal(queries, db: search.DbLike, M: int = 400, K: int = 9, beta: float = 0.15,
                chunk_size: int = 65536, query_chunk: int = 16) -> np.ndarray:
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


def superglobal_positions(queries, db: search.DbLike, items: Sequence[np.ndarray], M: int = 400,
                          K: int = 9, beta: float = 0.15, chunk_size: int = 65536,
                          query_chunk: int = 16, method: str = 'auto') -> list[np.ndarray]:
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


def fast_compute_protocols(queries, db: search.DbLike, gnd_raw, kappas=(1, 5, 10), M: int = 400,
                           K: int = 9, beta: float = 0.15, chunk_size: int = 65536,
                           method: str = 'auto') -> dict[str, dict]:
  """`metrics.compute_protocols(superglobal(queries, db, M, K, beta), gnd_raw)`, without the
  full sort (same numbers; the +1M path)."""
  n = search.db_size(db)
  items = []
  for g in gnd_raw:
    allk = np.concatenate([np.asarray(g[k], np.int64).reshape(-1)
                           for k in ('easy', 'hard', 'junk')])
    items.append(np.unique(allk[(allk >= 0) & (allk < n)]))
  positions = superglobal_positions(queries, db, items, M, K, beta, chunk_size, method=method)
  out = {}
  for p in metrics.PROTOCOLS:
    mp, aps, pr, prs = search._summarize_from_positions(  # pylint: disable=protected-access
        metrics.protocol_gnd(gnd_raw, p), items, positions, n, kappas)
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
