"""Scoring one dataset: ranks (optional DBA / alpha-QE / SuperGlobal), E/M/H tables, +1M, GLDv2.

`score_dataset(q, db, gnd, eval_cfg, distractors)` -> {'base': table, '+1m': table (with
distractors), 'topk': (dot products, indices) of the 10 best per query on the base set, in the
final order}; a table maps 'easy' / 'medium' / 'hard' to {'map', 'mp@k', 'aps' (None for a query
without positives)}. `score_gldv2(...)` -> {'base': {'public': ..., 'private': ...}} (mAP@100,
mP@100). `format_table` prints them in percent (re-ranked rows end in ' SG'); `flat_maps` flattens
the mAPs. `check_config` raises ValueError for a search field's bad value, then (`check_search`)
for settings that cannot be honoured together (alpha-QE with re-ranking; QE or DBA with
gldv2_retrieval). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

from typing import Mapping, Optional

import ml_collections
import numpy as np

from dolg_jax import config_rules as rules
from dolg_jax.retrieval import gldv2_eval
from dolg_jax.retrieval import metrics
from dolg_jax.retrieval import rerank as rerank_lib
from dolg_jax.retrieval import search

KAPPAS = (1, 5, 10)
GLDV2 = 'gldv2_retrieval'  # the dataset name in eval.datasets
GLDV2_K = 100  # the benchmark's list length (mAP@100, mP@100)
RERANKERS = ('', 'superglobal')
SEARCH_FIELDS = (
  'qe_k',
  'qe_alpha',
  'dba_k',
  'dba_alpha',
  'rerank',
  'rerank_m',
  'rerank_k',
  'rerank_beta',
)


CONFIG_RULES = {
  'eval.rerank': rules.one_of(RERANKERS),
  'eval.search_chunk_size': rules.POSITIVE_INT,
  'eval.rerank_m': rules.POSITIVE_INT,
  'eval.rerank_k': rules.NON_NEGATIVE_INT,
  'eval.qe_k': rules.NON_NEGATIVE_INT,
  'eval.dba_k': rules.NON_NEGATIVE_INT,
  'eval.rerank_beta': rules.NON_NEGATIVE,
  'eval.report_queries': rules.NON_NEGATIVE_INT,
  'eval.use_distractors': rules.BOOL,
  'eval.data_dir': rules.STRING,
  'eval.output_dir': rules.STRING,
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """ValueError `config.PATH=VALUE: allowed` for a search field of config.eval, then the
  settings that cannot be honoured together (`check_search`)."""
  rules.check(config, CONFIG_RULES)
  if all(
    rules.get(config, f'eval.{k}') is not rules.MISSING for k in SEARCH_FIELDS + ('datasets',)
  ):
    check_search(config.eval)


def check_search(e: ml_collections.ConfigDict) -> None:
  """One-line errors for search settings that cannot be honoured together (each field's own rule
  is in CONFIG_RULES: `check_config` checks both, before any extraction)."""
  if e.rerank and int(e.qe_k) > 0:
    raise ValueError(
      f'config.eval.rerank={e.rerank!r} and config.eval.qe_k={e.qe_k} are both '
      'set: alpha-QE before SuperGlobal is not defined here; set one of them off.'
    )
  if GLDV2 in e.datasets and (int(e.qe_k) > 0 or int(e.dba_k) > 0):
    raise ValueError(
      f'config.eval.datasets has {GLDV2!r}, which is scored without alpha-QE / '
      f'DBA; set config.eval.qe_k=0 and dba_k=0 (got {e.qe_k}, {e.dba_k}) or '
      f'evaluate {GLDV2} in a separate run.'
    )


def search_settings(e: ml_collections.ConfigDict) -> dict:
  """The search block of results.json (QE, DBA, re-ranking)."""
  return {k: e[k] for k in SEARCH_FIELDS}


def rerank_params(e: ml_collections.ConfigDict) -> Optional[dict]:
  """{'M', 'K', 'beta'} when eval.rerank='superglobal', else None."""
  if not e.rerank:
    return None
  return {'M': int(e.rerank_m), 'K': int(e.rerank_k), 'beta': float(e.rerank_beta)}


def table_entry(res: Mapping[str, dict]) -> dict:
  """JSON-able table of `metrics.compute_protocols` output."""
  out = {}
  for p in metrics.PROTOCOLS:
    r = res[p]
    out[p] = {
      'map': float(r['map']),
      **{f'mp@{k}': float(v) for k, v in zip(r['kappas'], r['mp'])},
      'aps': [None if np.isnan(a) else float(a) for a in r['aps']],
    }
  return out


def score_dataset(
  q: np.ndarray,
  db: np.ndarray,
  gnd: list,
  e: ml_collections.ConfigDict,
  distractors: Optional[np.ndarray] = None,
) -> dict:
  """{'base': table, '+1m': table (when distractors), 'topk': (scores, idx) on the base set}.

  `e` is the `c.eval` section (search_chunk_size, dba_k/dba_alpha, qe_k/qe_alpha, rerank*).
  """
  chunk = int(e.search_chunk_size)
  rr = rerank_params(e)
  if int(e.dba_k) > 0:
    db = search.database_augmentation(db, int(e.dba_k), float(e.dba_alpha), chunk)
  q_base = q
  if int(e.qe_k) > 0:
    q_base = search.alpha_query_expansion(q, db, int(e.qe_k), float(e.qe_alpha), chunk)
  scores = search.similarity_matrix(q_base, db, chunk)
  if rr is None:
    ranks = search.full_ranks(scores)
  else:
    ranks = rerank_lib.superglobal(q_base, db, rr['M'], rr['K'], rr['beta'], chunk_size=chunk)
  out = {
    'base': table_entry(metrics.compute_protocols(ranks, gnd, KAPPAS)),
    'topk': (np.take_along_axis(scores, ranks[:10].T, 1), ranks[:10].T),
  }
  if distractors is not None:
    segs = [db, distractors]
    if rr is not None:
      out['+1m'] = table_entry(
        rerank_lib.fast_compute_protocols(
          q, segs, gnd, KAPPAS, rr['M'], rr['K'], rr['beta'], chunk_size=chunk
        )
      )
      return out
    q_1m = q
    if int(e.qe_k) > 0:
      q_1m = search.alpha_query_expansion(q, segs, int(e.qe_k), float(e.qe_alpha), chunk)
    out['+1m'] = table_entry(
      search.fast_compute_protocols(q_1m, segs, gnd, KAPPAS, chunk_size=chunk)
    )
  return out


def score_gldv2(
  q: np.ndarray,
  q_ids: list,
  x: np.ndarray,
  x_ids: list,
  public: Mapping,
  private: Mapping,
  e: ml_collections.ConfigDict,
) -> dict:
  """{'base': {'public': r, 'private': r}} with r = {'map@100', 'mp@100', 'num_queries',
  'num_predicted', 'num_index'} (fractions), re-ranked when eval.rerank is set."""
  res = gldv2_eval.evaluate(
    q,
    q_ids,
    x,
    x_ids,
    public,
    private,
    k=GLDV2_K,
    rerank=rerank_params(e),
    chunk_size=int(e.search_chunk_size),
  )
  return {'base': {s: {**res[s], 'num_index': res['num_index']} for s in ('public', 'private')}}


def _rerank_note(search_cfg: Mapping) -> tuple[str, str]:
  """(row suffix, footnote) for re-ranked rows."""
  if not search_cfg.get('rerank'):
    return '', ''
  return (
    ' SG',
    f'SG: SuperGlobal re-ranking (M={search_cfg["rerank_m"]}, '
    f'K={search_cfg["rerank_k"]}, beta={search_cfg["rerank_beta"]})',
  )


def format_table(results: Mapping[str, dict], search_cfg: Mapping) -> str:
  """Per dataset and setting: E/M/H mAP and mP@1,5,10 (percent); GLDv2: Public / Private mAP@100
  and mP@100. `search_cfg` is the search block (`search_settings`): re-ranked rows end in ' SG'."""
  suffix, note = _rerank_note(search_cfg)
  head = (
    f'{"dataset":<22}'
    + ''.join(f'{p[0].upper() + " mAP":>8}' for p in metrics.PROTOCOLS)
    + ''.join(f'{p[0].upper() + "@" + str(k):>7}' for p in metrics.PROTOCOLS for k in KAPPAS)
  )
  lines = []
  revisited = {k: v for k, v in results.items() if k != GLDV2}
  if revisited:
    lines += [head, '-' * len(head)]
  for name, res in revisited.items():
    for setting in ('base', '+1m'):
      if setting not in res:
        continue
      t = res[setting]
      label = name + ('+1M' if setting == '+1m' else '') + suffix
      lines.append(
        f'{label:<22}'
        + ''.join(f'{100 * t[p]["map"]:8.2f}' for p in metrics.PROTOCOLS)
        + ''.join(f'{100 * t[p][f"mp@{k}"]:7.2f}' for p in metrics.PROTOCOLS for k in KAPPAS)
      )
  if GLDV2 in results:
    k = GLDV2_K
    g_head = f'{"dataset":<22}' + ''.join(
      f'{s + " " + m + "@" + str(k):>18}' for s in ('Public', 'Private') for m in ('mAP', 'mP')
    )
    lines += [g_head, '-' * len(g_head)]
    t = results[GLDV2]['base']
    lines.append(
      f'{GLDV2 + suffix:<22}'
      + ''.join(
        f'{100 * t[s][f"{m}@{k}"]:18.2f}' for s in ('public', 'private') for m in ('map', 'mp')
      )
    )
  if note:
    lines.append(note)
  return '\n'.join(lines)


def flat_maps(results: Mapping[str, dict]) -> dict[str, float]:
  """{'map/<dataset>/<base|+1m>/<protocol>': mAP}, for GLDv2 {'map@100/gldv2_retrieval/<public|
  private>': mAP@100} (for metrics.jsonl and TensorBoard)."""
  flat = {}
  for name, res in results.items():
    if name == GLDV2:
      for subset, r in res['base'].items():
        flat[f'map@{GLDV2_K}/{name}/{subset}'] = r[f'map@{GLDV2_K}']
      continue
    for setting, table in res.items():
      for protocol, r in table.items():
        flat[f'map/{name}/{setting}/{protocol}'] = r['map']
  return flat
