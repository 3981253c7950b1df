"""GLDv2 retrieval evaluation from descriptors: exact top-100 on device, then the official metrics.

`evaluate(query_desc, query_ids, index_desc, index_ids, public, private, k=100, rerank=None)` ->
{'public': {'map@k', 'mp@k', 'num_queries', 'num_predicted'}, 'private': {...}, 'num_index', 'k',
'rerank'} (fractions; keys with the value of k, e.g. 'map@100'). Rows whose id is None are dropped
(a dropped query counts 0); the top k come from `search.topk`, or with `rerank={'M', 'K', 'beta'}`
from `rerank.superglobal_topm`; Public and Private are scored separately (`metrics.gldv2_map_at_k`,
`metrics.gldv2_mean_precisions`). ValueError: descriptors that do not match their ids, an empty
index. `split_descriptors(extractor, data_dir, split)` -> (descriptors, ids) of a prepared split;
`evaluate_prepared` extracts both splits and evaluates them. Design notes: docs/design_notes.md.
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
  """Private / Public mAP@k and mP@k of the descriptors (the dict of the module docstring)."""
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
