"""GLDv2 retrieval evaluation from descriptors: exact top-100 on device, then the official metrics.

`evaluate(query_desc, query_ids, index_desc, index_ids, public, private, k=100, rerank=None)`:

* rows whose id is None (images absent from the prepared data) are dropped from both sides; a
  dropped query has no prediction and counts 0, as in the official scoring;
* the top k index images of every query come from the chunked device top-k of
  `dolg_jax.retrieval.search.topk` (exact, float32 dot products, ties to the lower row);
* with `rerank={'M': 400, 'K': 9, 'beta': 0.15}` the list is SuperGlobal's
  (`dolg_jax.retrieval.rerank.superglobal_topm`): the re-ranked top M, then, if k > M, the initial
  order;
* Public and Private are scored separately with `metrics.gldv2_map_at_k` and
  `metrics.gldv2_mean_precisions` (DELF's compute_retrieval_metrics: each subset's predictions
  against its own solution; ignored queries are in neither).

Returns {'public': {'map@k', 'mp@k', 'num_queries', 'num_predicted'}, 'private': {...},
'num_index', 'k', 'rerank'} with the metrics as fractions (x100 for the usual percentages).

From a prepared dataset: `split_descriptors(extractor, data_dir, split)` -> (descriptors, ids) in
one pass over the stored images (cache these), then `evaluate(q, q_ids, x, x_ids,
*gldv2_retrieval.load_solution(data_dir)[:2], rerank=...)`; `evaluate_prepared` does both.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from dolg_jax.data import gldv2_retrieval
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import rerank as rerank_lib
from dolg_jax.retrieval import search


def _present(desc, ids, what: str) -> tuple[np.ndarray, list[str]]:
  desc = np.asarray(desc, np.float32)
  if desc.ndim != 2 or desc.shape[0] != len(ids):
    raise ValueError(f'{what}: descriptors {desc.shape} do not match {len(ids)} ids.')
  keep = [i for i, x in enumerate(ids) if x is not None]
  return desc[keep], [str(ids[i]) for i in keep]


def ranked_lists(
  queries: np.ndarray,
  index: np.ndarray,
  k: int = 100,
  rerank: Optional[Mapping] = None,
  chunk_size: int = 65536,
  query_chunk: int = 2048,
) -> np.ndarray:
  """(n_queries, min(k, n_index)) index rows, best first, plain or SuperGlobal-re-ranked.

  Queries go in chunks of `query_chunk` (device memory: query_chunk x chunk_size float32 scores).
  """
  n = index.shape[0]
  k = min(int(k), n)
  out = np.empty((queries.shape[0], k), np.int64)
  for a in range(0, queries.shape[0], query_chunk):
    q = queries[a : a + query_chunk]
    if rerank is None:
      out[a : a + query_chunk] = search.topk(q, index, k, chunk_size)[1]
      continue
    m = min(int(rerank['M']), n)
    _, head = rerank_lib.superglobal_topm(
      q, index, m, int(rerank['K']), float(rerank['beta']), chunk_size
    )
    if k <= m:
      out[a : a + query_chunk] = head[:, :k]
    else:
      initial = search.topk(q, index, k, chunk_size)[1]
      out[a : a + query_chunk] = np.concatenate([head, initial[:, m:]], axis=1)
  return out


def evaluate(
  query_desc,
  query_ids: Sequence[Optional[str]],
  index_desc,
  index_ids: Sequence[Optional[str]],
  public: Mapping[str, Sequence[str]],
  private: Mapping[str, Sequence[str]],
  k: int = 100,
  rerank: Optional[Mapping] = None,
  chunk_size: int = 65536,
  query_chunk: int = 2048,
) -> dict:
  """Private / Public mAP@k and mP@k of the descriptors (see the module docstring)."""
  q, qids = _present(query_desc, query_ids, 'queries')
  x, xids = _present(index_desc, index_ids, 'index')
  if not x.shape[0]:
    raise ValueError('the index has no image with a descriptor.')
  rows = (
    ranked_lists(q, x, k, rerank, chunk_size, query_chunk)
    if q.shape[0]
    else np.zeros((0, 0), np.int64)
  )
  predictions = {t: [xids[j] for j in r] for t, r in zip(qids, rows)}
  out = {'num_index': len(xids), 'k': int(k), 'rerank': dict(rerank) if rerank else None}
  for name, solution in (('public', public), ('private', private)):
    preds = {t: p for t, p in predictions.items() if t in solution}
    out[name] = {
      f'map@{k}': metrics.gldv2_map_at_k(preds, solution, k),
      f'mp@{k}': float(metrics.gldv2_mean_precisions(preds, solution, k)[k - 1]),
      'num_queries': len(solution),
      'num_predicted': len(preds),
    }
  return out


def split_descriptors(
  extractor: extract_lib.Extractor, data_dir: str, split: str
) -> tuple[np.ndarray, list[str]]:
  """(descriptors (n, D), ids) of the stored images of one split ('index' or 'test')."""
  ids: list[str] = []
  num, examples = gldv2_retrieval.extraction_examples(data_dir, split, ids)
  desc = extractor.extract(examples, num)
  if len(ids) != num:
    raise AssertionError(f'gldv2_retrieval/{split}: {len(ids)} ids for {num} descriptors')
  return desc, ids


def evaluate_prepared(
  extractor: extract_lib.Extractor,
  data_dir: str,
  k: int = 100,
  rerank: Optional[Mapping] = None,
  chunk_size: int = 65536,
) -> dict:
  """Extracts both splits of the prepared gldv2_retrieval and evaluates them (no cache)."""
  q, q_ids = split_descriptors(extractor, data_dir, 'test')
  x, x_ids = split_descriptors(extractor, data_dir, 'index')
  public, private, _ = gldv2_retrieval.load_solution(data_dir)
  return evaluate(q, q_ids, x, x_ids, public, private, k, rerank, chunk_size)
