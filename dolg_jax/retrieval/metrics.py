"""Retrieval metrics: revisitop's `compute_map` (exact semantics) and the GLDv2 challenge's.

`compute_map(ranks, gnd, kappas)`: ranks (n_db, n_queries) of database indices (column i = query
i's ranking, best first), gnd dicts with 'ok' and 'junk' -> (mAP, aps, mean P@k, P@k per query);
a query without positives gets NaN and is left out of the means. `compute_protocols(ranks,
raw_gnd)` scores Easy / Medium / Hard (`protocol_gnd`); `summarize` is shared with the +1M fast
path of `dolg_jax.retrieval.search` (bit-identical numbers). `gldv2_map_at_k` and
`gldv2_mean_precisions`: DELF's mAP@k and mean precisions. Bad input raises ValueError.
The semantics step by step: docs/design_notes.md.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

PROTOCOLS = ('easy', 'medium', 'hard')

_OK = np.int8(1)
_JUNK = np.int8(2)


def protocol_gnd(gnd: Sequence[Mapping[str, Sequence[int]]], protocol: str) -> list[dict]:
  """Assembles revisitop's 'ok'/'junk' lists from 'easy'/'hard'/'junk' for one protocol.

  Easy: ok = easy, junk = junk + hard. Medium: ok = easy + hard, junk = junk.
  Hard: ok = hard, junk = junk + easy.
  """
  if protocol == 'easy':
    ok_keys, junk_keys = ('easy',), ('junk', 'hard')
  elif protocol == 'medium':
    ok_keys, junk_keys = ('easy', 'hard'), ('junk',)
  elif protocol == 'hard':
    ok_keys, junk_keys = ('hard',), ('junk', 'easy')
  else:
    raise ValueError(f'Unknown protocol {protocol!r}; expected one of {PROTOCOLS}.')

  def cat(g, keys):
    return np.concatenate([np.asarray(g[k], dtype=np.int64).reshape(-1) for k in keys])

  out = []
  for g in gnd:
    out.append({'ok': cat(g, ok_keys), 'junk': cat(g, junk_keys)})
  return out


def _as_index_array(values, what: str) -> np.ndarray:
  arr = np.asarray(values if values is not None else [], dtype=np.int64).reshape(-1)
  if arr.size and arr.min() < 0:
    raise ValueError(f'{what} contains negative database indices.')
  return arr


def summarize(
  query_ids: np.ndarray, positions: np.ndarray, nres: np.ndarray, kappas: Sequence[int]
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """Turns junk-free positive positions into (map, aps, pr, prs), revisitop-exact.

  Args:
    query_ids: (P,) int, query of each entry, non-decreasing.
    positions: (P,) int, 0-based junk-free position of each found positive (increasing within a
      query).
    nres: (n_queries,) int, len(ok) per query (0 = no positives: NaN row, excluded from the means).
    kappas: the k of mP@k.

  Returns:
    (map, aps, pr, prs) like revisitop's compute_map.
  """
  nres = np.asarray(nres, dtype=np.int64)
  nq = nres.shape[0]
  query_ids = np.asarray(query_ids, dtype=np.int64)
  r = np.asarray(positions, dtype=np.int64)
  counts = np.bincount(query_ids, minlength=nq)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  j = np.arange(r.shape[0], dtype=np.int64) - starts[query_ids]
  missing = (nres > 0) & (counts == 0)
  if missing.any():
    raise ValueError(
      f'Queries {np.flatnonzero(missing)[:5].tolist()} have positives but none appears in the '
      'ranking; revisitop cannot score them (pass a ranking that covers the database).'
    )
  # Trapezoid rule, term by term exactly as the reference writes it.
  rf = r.astype(np.float64)
  jf = j.astype(np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    precision_0 = np.where(r == 0, 1.0, jf / np.where(r == 0, 1.0, rf))
  precision_1 = (jf + 1.0) / (rf + 1.0)
  recall_step = 1.0 / np.maximum(nres, 1).astype(np.float64)
  terms = (precision_0 + precision_1) * recall_step[query_ids] / 2.0
  aps = np.bincount(query_ids, weights=terms, minlength=nq).astype(np.float64)
  kappas = [int(k) for k in kappas]
  prs = np.zeros((nq, len(kappas)), dtype=np.float64)
  if r.shape[0]:
    last = np.zeros(nq, dtype=np.int64)
    np.maximum.at(last, query_ids, r + 1)
    for col, kappa in enumerate(kappas):
      kq = np.minimum(last, kappa)
      hits = np.bincount(query_ids, weights=(r + 1 <= kq[query_ids]), minlength=nq)
      prs[:, col] = hits / np.maximum(kq, 1)
  empty = nres == 0
  aps[empty] = np.nan
  prs[empty, :] = np.nan
  valid = np.flatnonzero(~empty)
  mean_ap = 0.0
  pr = np.zeros(len(kappas))
  for i in valid:  # sequential sums, in query order, like the reference
    mean_ap = mean_ap + aps[i]
    pr = pr + prs[i, :]
  if valid.size == 0:
    return float('nan'), aps, np.full(len(kappas), np.nan), prs
  return mean_ap / valid.size, aps, pr / valid.size, prs


def compute_map(
  ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10)
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
  """revisitop's compute_map, vectorised (semantics: docs/design_notes.md).

  Args:
    ranks: (n_db, n_queries) int array of database indices (best first per column). It may cover
      only part of the database, but every query with positives needs at least one in it.
    gnd: per-query dicts with 'ok' and optionally 'junk' (sequences of database indices).
    kappas: the k of mP@k.

  Returns:
    (map, aps (n_queries,), pr (len(kappas),), prs (n_queries, len(kappas))).
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 2:
    raise ValueError(f'ranks must be (n_db, n_queries); got shape {ranks.shape}.')
  _, nq = ranks.shape
  if len(gnd) != nq:
    raise ValueError(f'ranks has {nq} query columns but gnd has {len(gnd)} entries.')
  if ranks.size and ranks.min() < 0:
    raise ValueError('ranks contains negative database indices.')
  oks = [_as_index_array(g['ok'], f'gnd[{i}]["ok"]') for i, g in enumerate(gnd)]
  junks = [_as_index_array(g.get('junk', None), f'gnd[{i}]["junk"]') for i, g in enumerate(gnd)]
  nres = np.array([o.shape[0] for o in oks], dtype=np.int64)
  # Labels only concern indices up to the largest labelled one: a small (cache-resident) table,
  # everything beyond it (e.g. distractors) is unlabelled.
  top = max([0] + [int(a.max()) for a in oks + junks if a.size])
  table = np.zeros(top + 2, dtype=np.int8)  # last entry: "beyond top", always 0
  all_q, all_r = [], []
  for q in range(nq):
    if not oks[q].size:
      continue
    table[junks[q]] = _JUNK
    table[oks[q]] |= _OK
    labels = table[np.minimum(ranks[:, q], top + 1)]
    pos = np.flatnonzero(labels & _OK)
    junk = np.flatnonzero(labels & _JUNK)
    all_q.append(np.full(pos.shape[0], q, np.int64))
    all_r.append(pos - np.searchsorted(junk, pos, side='left'))  # junk strictly before
    table[junks[q]] = 0
    table[oks[q]] = 0
  query_ids = np.concatenate(all_q) if all_q else np.zeros(0, np.int64)
  positions = np.concatenate(all_r) if all_r else np.zeros(0, np.int64)
  # Queries without positives contribute no entries; summarize marks them NaN.
  return summarize(query_ids, positions, nres, kappas)


def compute_protocols(
  ranks,
  gnd: Sequence[Mapping],
  kappas: Sequence[int] = (1, 5, 10),
  protocols: Sequence[str] = PROTOCOLS,
) -> dict[str, dict]:
  """Runs compute_map for each revisited protocol on the raw gnd ('easy'/'hard'/'junk').

  Returns {protocol: {'map', 'aps', 'mp' (mean P@k), 'prs', 'kappas'}}.
  """
  out = {}
  for p in protocols:
    m, aps, pr, prs = compute_map(ranks, protocol_gnd(gnd, p), kappas)
    out[p] = {'map': m, 'aps': aps, 'mp': pr, 'prs': prs, 'kappas': tuple(kappas)}
  return out


# ----------------------------------------------------------------------------- GLDv2 retrieval


def _gldv2_scored(
  predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Sequence[str] | None]
) -> dict:
  """Solution without ignored queries (value None); checks predictions refer to known queries."""
  scored = {key: list(v) for key, v in solution.items() if v is not None}
  for key, v in scored.items():
    if not v:
      raise ValueError(
        f'GLDv2 solution: query {key} has an empty list of relevant images (use '
        'None for an ignored query).'
      )
  unknown = [key for key in predictions if key not in solution]
  if unknown:
    raise ValueError(
      f'GLDv2 predictions: {len(unknown)} test ids are not in the solution '
      f'(first: {unknown[:5]}); predictions must come from the same test set.'
    )
  if not scored:
    raise ValueError('GLDv2 solution has no scored query (all are None/ignored).')
  return scored


def gldv2_map_at_k(
  predictions: Mapping[str, Sequence[str]],
  solution: Mapping[str, Sequence[str] | None],
  k: int = 100,
) -> float:
  """mAP@k of the Google Landmarks v2 retrieval challenge (DELF's MeanAveragePrecision).

  `predictions` maps a test id to its ranked index ids; `solution` a test id to its relevant index
  ids, or None for a query ignored in scoring (Usage 'Ignored'; see
  dolg_jax.data.gldv2_retrieval.read_solution). The mean is over all scored queries of the
  solution (a query without prediction counts 0). ValueError for predictions of ids absent from
  the solution (as in the official code). Semantics: docs/design_notes.md.
  """
  scored = _gldv2_scored(predictions, solution)
  mean_ap = 0.0
  for key, prediction in predictions.items():  # summation order of the official code
    relevant = scored.get(key)
    if relevant is None:
      continue
    relevant = set(relevant)
    seen = set()
    hits = 0
    ap = 0.0
    for i, image in enumerate(list(prediction)[:k]):
      if image in seen:
        continue
      if image in relevant:
        hits += 1
        ap += hits / (i + 1)
      seen.add(image)
    mean_ap += ap / min(len(scored[key]), k)
  return mean_ap / len(scored)


def gldv2_mean_precisions(
  predictions: Mapping[str, Sequence[str]],
  solution: Mapping[str, Sequence[str] | None],
  k: int = 100,
) -> np.ndarray:
  """Mean precision at 1..k (array (k,)) as DELF's MeanPrecisions: duplicates skipped, P@i =
  hits in the first i / i (a short list keeps its hits, so P@i falls as i grows), mean over all
  scored queries of the solution (a query without prediction has P@i = 0). mP@100 = [99]."""
  scored = _gldv2_scored(predictions, solution)
  precisions = np.zeros((len(scored), k))
  row = 0
  for key, prediction in predictions.items():
    if key not in scored:
      continue
    relevant = set(scored[key])
    prediction = list(prediction)
    seen = set()
    hits = 0
    for i in range(k):
      if i < len(prediction) and prediction[i] not in seen:
        if prediction[i] in relevant:
          hits += 1
        seen.add(prediction[i])
      precisions[row, i] = hits / (i + 1)
    row += 1
  return np.mean(precisions, axis=0)
