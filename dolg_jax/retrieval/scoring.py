"""Scoring one dataset: ranks (optional DBA / alpha-QE), revisited E/M/H tables, +1M, the table text.

`score_dataset(q, db, gnd, eval_cfg, distractors)` returns {'base': table, '+1m': table (with
distractors), 'topk': (scores, indices) of the 10 best per query on the base set}; a table maps
each protocol ('easy', 'medium', 'hard') to its mAP, mP@k and per-query APs (None where a query has
no positive). `format_table(results)` prints them in percent.
"""

from __future__ import annotations

from typing import Mapping, Optional

import ml_collections
import numpy as np

from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import search

KAPPAS = (1, 5, 10)


def table_entry(res: Mapping[str, dict]) -> dict:
  """JSON-able table of `metrics.compute_protocols` output."""
  out = {}
  for p in metrics.PROTOCOLS:
    r = res[p]
    out[p] = {'map': float(r['map']), **{f'mp@{k}': float(v) for k, v in zip(r['kappas'], r['mp'])},
              'aps': [None if np.isnan(a) else float(a) for a in r['aps']]}
  return out


def score_dataset(q: np.ndarray, db: np.ndarray, gnd: list, e: ml_collections.ConfigDict,
                  distractors: Optional[np.ndarray] = None) -> dict:
  """{'base': table, '+1m': table (when distractors), 'topk': (scores, idx) on the base set}.

  `e` is the `c.eval` section (search_chunk_size, dba_k/dba_alpha, qe_k/qe_alpha).
  """
  chunk = int(e.search_chunk_size)
  if int(e.dba_k) > 0:
    db = search.database_augmentation(db, int(e.dba_k), float(e.dba_alpha), chunk)
  q_base = q
  if int(e.qe_k) > 0:
    q_base = search.alpha_query_expansion(q, db, int(e.qe_k), float(e.qe_alpha), chunk)
  scores = search.similarity_matrix(q_base, db, chunk)
  ranks = search.full_ranks(scores)
  out = {'base': table_entry(metrics.compute_protocols(ranks, gnd, KAPPAS)),
         'topk': (np.take_along_axis(scores, ranks[:10].T, 1), ranks[:10].T)}
  if distractors is not None:
    segs = [db, distractors]
    q_1m = q
    if int(e.qe_k) > 0:
      q_1m = search.alpha_query_expansion(q, segs, int(e.qe_k), float(e.qe_alpha), chunk)
    out['+1m'] = table_entry(search.fast_compute_protocols(q_1m, segs, gnd, KAPPAS,
                                                           chunk_size=chunk))
  return out


def format_table(results: Mapping[str, dict]) -> str:
  """Per dataset and setting: E/M/H mAP and mP@1,5,10 (percent)."""
  head = (f'{"dataset":<18}' + ''.join(f'{p[0].upper() + " mAP":>8}' for p in metrics.PROTOCOLS)
          + ''.join(f'{p[0].upper() + "@" + str(k):>7}' for p in metrics.PROTOCOLS for k in KAPPAS))
  lines = [head, '-' * len(head)]
  for name, res in results.items():
    for setting in ('base', '+1m'):
      if setting not in res:
        continue
      t = res[setting]
      label = name + ('+1M' if setting == '+1m' else '')
      lines.append(f'{label:<18}' + ''.join(f'{100 * t[p]["map"]:8.2f}' for p in metrics.PROTOCOLS)
                   + ''.join(f'{100 * t[p][f"mp@{k}"]:7.2f}' for p in metrics.PROTOCOLS
                             for k in KAPPAS))
  return '\n'.join(lines)


def flat_maps(results: Mapping[str, dict]) -> dict[str, float]:
  """{'map/<dataset>/<base|+1m>/<protocol>': mAP} (for metrics.jsonl and TensorBoard)."""
  flat = {}
  for name, res in results.items():
    for setting, table in res.items():
      for protocol, r in table.items():
        flat[f'map/{name}/{setting}/{protocol}'] = r['map']
  return flat
