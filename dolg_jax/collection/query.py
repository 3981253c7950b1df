"""Search a collection index from Python (the library behind `python -m dolg_jax.search`).

  from dolg_jax.collection import query
  col = query.Collection('INDEX_DIR')
  hits = col.search_images(['q.jpg'], k=10)                  # [[(path, score), ...]] per query
  hits = col.search_images(['q.jpg'], boxes=[(top, left, height, width)], rerank='superglobal')
  scores, ids = col.search_descriptors(q, k=10)               # (nq, k) each; col.paths[i] per id
  order = query.rerank_candidates(q, candidates)              # SuperGlobal on another system's list

Query descriptors come from the model and protocol the index was built with (a box, in pixels of
the EXIF-oriented image, crops the query as evaluation crops revisitop queries); scores are cosine
similarities, best first; `rerank='superglobal'` re-ranks the top max(config.eval.rerank_m, k)
from the stored descriptors. `search_to_dir` writes results.json and report.html (unless
`report=False`). Raises
`store.NotAnIndexError` (no complete index), `store.DamagedIndexError` (a damaged file, a
non-finite score), `store.IndexMismatchError` (weights or long-side cap differ from the index's;
pass `checkpoint=` / `workdir=` when the file moved), ValueError (k < 1, an unreadable query, a bad
box or `rerank`). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import ml_collections
import numpy as np

from dolg_jax import atomic
from dolg_jax.collection import build as build_lib
from dolg_jax.collection import faiss_index
from dolg_jax.collection import files as files_lib
from dolg_jax.collection import html_report
from dolg_jax.collection import reading
from dolg_jax.collection import store as store_lib
from dolg_jax.retrieval import evaluate
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import rerank as rerank_lib

RERANKERS = ('', 'superglobal')


def _tuples(obj: Any) -> Any:
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def config_of(manifest: dict) -> ml_collections.ConfigDict:
  """The config an index was built with (lists back to tuples, as configs write them)."""
  return ml_collections.ConfigDict(_tuples(manifest['model']['config']))


def box_to_bbx(box: Sequence[float]) -> np.ndarray:
  """(top, left, height, width) -> evaluation's [x1, y1, x2, y2]."""
  top, left, height, width = (float(v) for v in box)
  if height <= 0 or width <= 0:
    raise ValueError(f'box {tuple(box)}: height and width must be positive')
  return np.asarray([left, top, left + width, top + height], np.float64)


def rerank_candidates(
  queries: np.ndarray, candidates: np.ndarray, K: int = 9, beta: float = 0.15
) -> np.ndarray:
  """SuperGlobal re-ranking of candidate lists from any system.

  queries (nq, D) and candidates (nq, M, D) in their initial order (both L2-normalised, as the
  model gives them) -> positions (nq, M) into the candidate axis, best first.
  """
  queries = np.asarray(queries, np.float32)
  candidates = np.asarray(candidates, np.float32)
  nq, m, d = candidates.shape
  if queries.shape != (nq, d):
    raise ValueError(f'queries {queries.shape} do not fit candidates {candidates.shape}')
  top = np.arange(nq * m, dtype=np.int64).reshape(nq, m)
  out = rerank_lib.rerank_heads(queries, candidates.reshape(nq * m, d), top, K, beta)
  return out - top[:, :1]


def check_k(k: int) -> None:
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'k must be an integer >= 1; got {k!r}')


class Collection:
  """An opened index: search by descriptors or by images, re-rank (module docstring)."""

  # False in a subclass whose `candidates` never search FAISS: faiss.index is then neither
  # loaded nor hashed (its size is still checked), and `index` / `spec` stay None.
  searches_faiss = True

  def __init__(
    self,
    index_dir: str,
    *,
    checkpoint: Optional[str] = None,
    workdir: Optional[str] = None,
    mmap_faiss: bool = False,
  ):
    self.index_dir = index_dir
    self.store = store_lib.IndexStore(index_dir)
    self.manifest = self.store.manifest()
    if self.manifest.get('status') != 'complete':
      raise store_lib.NotAnIndexError(
        f'{self.store.path}: the index is not complete (status {self.manifest.get("status")!r}'
        '); rerun the index command that built it'
      )
    load = self.searches_faiss and bool(self.manifest.get('faiss'))
    # faiss.index is read once: hashed as it is loaded (streamed first where it is memory-mapped)
    self.store.verify_for_search(self.manifest, faiss=load and mmap_faiss)
    self.spec, self.index = None, None
    if load:
      self.spec = faiss_index.Spec(**self.manifest['faiss']['spec'])
      if mmap_faiss:
        self.index = faiss_index.load(self.store.faiss_path, self.spec, mmap=True)
      else:
        data = self.store.read_faiss(self.manifest.get('checksums'))
        self.index = faiss_index.deserialize(data, self.spec)
        del data
    self.rows = store_lib.Rows(self.store)
    if self.searches_faiss and (
      (self.index.ntotal if self.index is not None else 0) != len(self.rows)
    ):
      raise store_lib.DamagedIndexError(
        f'{self.store.faiss_path} does not hold the {len(self.rows)} rows of the parts; '
        f'{store_lib.REPAIR}'
      )
    self.root = self.manifest['images_root']
    protocol = self.manifest.get('protocol', {})
    self.limits = reading.Limits(
      protocol.get('max_pixels', reading.MAX_PIXELS),
      protocol.get('max_file_mb', reading.MAX_FILE_MB),
    )
    self.config = config_of(self.manifest)
    self._model_paths = {'checkpoint': checkpoint, 'workdir': workdir}
    self._extractor: Optional[extract_lib.Extractor] = None

  @property
  def paths(self) -> list[str]:
    """Row -> path as indexed (relative to the images root)."""
    return self.rows.paths

  def __len__(self) -> int:
    return len(self.rows)

  # ------------------------------------------------------------------ descriptors

  def extractor(self) -> extract_lib.Extractor:
    """The index's model and protocol, loaded once (fingerprint checked)."""
    if self._extractor is None:
      given = {k: v for k, v in self._model_paths.items() if v}
      recorded = {k: v for k in ('checkpoint', 'workdir') if (v := self.manifest['model'].get(k))}
      paths = given or recorded
      apply_fn, variables, _ = evaluate.load_model(self.config, **paths)
      cfg = extract_lib.from_config(self.config.eval)
      fp = build_lib.fingerprint(
        self.config, apply_fn, variables, cfg, self.manifest['fingerprint']['descriptor_dtype']
      )
      diff = store_lib.fingerprint_diff(self.manifest['fingerprint'], fp)
      if diff:
        raise store_lib.IndexMismatchError(
          f'the model at {paths} differs from the one {self.store.path} was built with '
          f'({", ".join(diff)}): pass the checkpoint the index was built with'
        )
      problem = store_lib.long_side_cap_problem(self.manifest, extract_lib.long_side_cap(cfg))
      if problem:
        raise store_lib.IndexMismatchError(
          f'{self.store.path}: {problem}: rebuild the index (python -m dolg_jax.index --replace) '
          'or use the version that built it'
        )
      self._extractor = extract_lib.Extractor(apply_fn, variables, cfg)
    return self._extractor

  def describe_images(
    self, paths: Sequence[str], boxes: Optional[Sequence[Optional[Sequence[float]]]] = None
  ) -> np.ndarray:
    """(n, D) query descriptors of image files (boxes: (top, left, height, width) or None each)."""
    boxes = list(boxes) if boxes is not None else [None] * len(paths)
    if len(boxes) != len(paths):
      raise ValueError(f'{len(boxes)} boxes for {len(paths)} queries')
    examples = []
    for i, (p, b) in enumerate(zip(paths, boxes)):
      got = reading.read_image(p, self.limits)
      if got.reason is not None:
        raise ValueError(f'query {files_lib.escape(p)}: {got.reason}')
      img = got.image
      ex = {'index': i, 'image': img}
      if b is not None:
        ex['bbx'] = box_to_bbx(b)
      examples.append(ex)
    _, desc = self.extractor().extract_own(examples, presharded=True)
    return desc

  # ------------------------------------------------------------------ search

  def rerank_params(self) -> dict:
    e = self.config.eval
    return {'M': int(e.rerank_m), 'K': int(e.rerank_k), 'beta': float(e.rerank_beta)}

  def search_descriptors(
    self, queries: np.ndarray, k: int = 100, rerank: str = ''
  ) -> tuple[np.ndarray, np.ndarray]:
    """(scores (nq, k'), row ids (nq, k')), best first, k' = min(k, len(self))."""
    if rerank not in RERANKERS:
      raise ValueError(f'rerank must be one of {RERANKERS}; got {rerank!r}')
    check_k(k)
    q = np.asarray(queries, np.float32)
    if not len(self):  # an index of 0 images
      return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
    if q.ndim != 2 or q.shape[1] != self.rows.dim:
      raise ValueError(f'queries must be (n, {self.rows.dim}); got {q.shape}')
    if not np.isfinite(q).all():
      raise ValueError('query descriptors must be finite')
    scores, ids = self._search(q, k, rerank)
    bad = ~np.isfinite(scores)
    if bad.any():
      raise store_lib.DamagedIndexError(
        f'{self.store.path}: stored descriptors of rows {sorted(set(ids[bad].tolist()))[:5]} '
        f'are not finite (a damaged part); {store_lib.REPAIR}'
      )
    return scores, ids

  def candidates(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, row ids) (nq, k) of the search structure, best first (the serving backends
    override it: dolg_jax.serve.backends)."""
    return faiss_index.search(self.index, self.spec, q, k, self.rows.take)

  def _search(self, q: np.ndarray, k: int, rerank: str) -> tuple[np.ndarray, np.ndarray]:
    if not rerank:
      return self.candidates(q, k)
    p = self.rerank_params()
    m = min(max(p['M'], k), len(self))
    _, top = self.candidates(q, m)
    if top.shape[1] < m or (top < 0).any():
      raise ValueError(
        f'the search structure returned fewer than M={m} candidates; raise '
        'nprobe / ef_search when building the index'
      )
    cand = self.rows.take(top)  # (nq, m, D), once; raises on damaged (non-finite) candidates
    pos = rerank_candidates(q, cand, p['K'], p['beta'])[:, : min(k, m)]
    scores = np.einsum('qd,qkd->qk', q, np.take_along_axis(cand, pos[..., None], 1))
    return scores.astype(np.float32), np.take_along_axis(top, pos, 1)

  def search_images(
    self, paths: Sequence[str], boxes=None, k: int = 100, rerank: str = ''
  ) -> list[list[tuple[str, float]]]:
    """Per query: [(path as indexed, cosine similarity), ...] best first."""
    check_k(k)
    if not len(self):  # an index of 0 images: the queries are still read (named errors)
      for p in paths:
        if (reason := reading.read_image(p, self.limits).reason) is not None:
          raise ValueError(f'query {files_lib.escape(p)}: {reason}')
      return [[] for _ in paths]
    scores, ids = self.search_descriptors(self.describe_images(paths, boxes), k, rerank)
    return [
      [(self.paths[i], float(s)) for s, i in zip(sr, ir) if i >= 0] for sr, ir in zip(scores, ids)
    ]


def search_to_dir(
  index_dir: str,
  queries: Sequence[str],
  boxes: Optional[Sequence[Optional[Sequence[float]]]],
  out_dir: str,
  *,
  k: int = 100,
  rerank: str = '',
  checkpoint: Optional[str] = None,
  workdir: Optional[str] = None,
  report: bool = True,
) -> dict:
  """Searches image files; writes OUT_DIR/results.json and OUT_DIR/report.html.

  results.json: {"index": INDEX_DIR (as given), "queries": [{"query": PATH (as given), "results":
  [{"path": PATH_AS_INDEXED, "score": cosine similarity}, ...] (k best first)}, ...]}.
  """
  col = Collection(index_dir, checkpoint=checkpoint, workdir=workdir)
  boxes = list(boxes) if boxes is not None else [None] * len(queries)
  hits = col.search_images(list(queries), boxes, k=k, rerank=rerank)
  out = {
    'index': index_dir,
    'queries': [
      {'query': q, 'results': [{'path': p, 'score': s} for p, s in h]}
      for q, h in zip(queries, hits)
    ],
  }
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_json(os.path.join(out_dir, 'results.json'), out, **store_lib.JSON_STYLE)
  if report:
    html_report.write(out_dir, index_dir, col.root, out['queries'], boxes, limits=col.limits)
  return out
