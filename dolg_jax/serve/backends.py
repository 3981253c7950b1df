"""Where the service's nearest neighbours come from: the index's FAISS structure or Milvus.

`open_collection(index_dir, settings, checkpoint=, workdir=)` -> a `query.Collection`. With
`settings.backend == 'milvus'` it is a `MilvusCollection`: the same index directory (model,
protocol, row table, stored descriptors for SuperGlobal) whose candidates come from the Milvus
collection `python -m dolg_jax.publish` wrote (`settings.milvus_uri`: a milvus-lite file or
http://host:19530); it refuses a collection that does not hold exactly this index's rows.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from pymilvus import MilvusClient

from dolg_jax.collection import query

if TYPE_CHECKING:  # service imports this module
  from dolg_jax.serve.service import Settings

BACKENDS = ('faiss', 'milvus')
DEFAULT_COLLECTION = 'dolg_jax'
IDENTITY_PROPERTY = 'dolg_jax.identity'
MAX_MILVUS_LIMIT = 16384  # Milvus's topk limit


def identity(manifest: dict) -> dict:
  """What a published collection must match: the descriptors' fingerprint and the dimension."""
  return {'fingerprint': manifest['fingerprint'], 'dim': manifest.get('dim')}


def published_identity(cl, name: str) -> Optional[dict]:
  props = cl.describe_collection(name).get('properties') or {}
  raw = props.get(IDENTITY_PROPERTY)
  return json.loads(raw) if raw else None


def row_count(cl, name: str) -> int:
  got = cl.query(name, filter='id >= 0', output_fields=['count(*)'], consistency_level='Strong')
  return int(got[0]['count(*)'])


class MilvusCollection(query.Collection):
  """A query.Collection whose candidates come from Milvus (module docstring)."""

  searches_faiss = False  # faiss.index is neither read nor hashed

  def __init__(self, index_dir: str, uri: str, name: str, **kw: Any):
    super().__init__(index_dir, **kw)
    if not uri:
      raise ValueError(
        '--backend=milvus needs --milvus_uri (a milvus-lite file or http://host:19530)'
      )
    self.milvus_uri, self.milvus_collection = uri, name
    self.client = MilvusClient(uri)
    if not self.client.has_collection(name):
      raise ValueError(
        f'{uri} has no collection {name!r}: run python -m dolg_jax.publish '
        f'--index={index_dir} --milvus_uri={uri} --milvus_collection={name}'
      )
    self.client.load_collection(name)  # a reopened collection starts released
    got, want = published_identity(self.client, name), identity(self.manifest)
    if got != want:
      raise ValueError(
        f'Milvus collection {name!r} at {uri} was published from another index '
        '(fingerprint or dimension differ): publish this one with --replace'
      )
    n = row_count(self.client, name)
    if n != len(self.rows):
      raise ValueError(
        f'Milvus collection {name!r} holds {n} rows, the index {len(self.rows)}: '
        f'run python -m dolg_jax.publish --index={index_dir} --milvus_uri={uri} '
        f'--milvus_collection={name}'
      )

  def candidates(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    k = min(k, len(self.rows), MAX_MILVUS_LIMIT)
    got = self.client.search(
      self.milvus_collection,
      data=np.asarray(q, np.float32).tolist(),
      limit=k,
      output_fields=['id'],
      search_params={'metric_type': 'IP'},
      consistency_level='Strong',
    )
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for r, hits in enumerate(got):
      for c, h in enumerate(hits[:k]):
        ids[r, c], scores[r, c] = int(h['id']), float(h['distance'])
    # Scores as FAISS exact reports them: the inner products of the stored descriptors.
    ok = ids >= 0
    if ok.any():
      scores[ok] = np.einsum(
        'nd,nd->n', np.repeat(np.asarray(q, np.float32), ok.sum(1), axis=0), self.rows.take(ids[ok])
      )
    return scores, ids


def open_collection(
  index_dir: str,
  settings: Settings,
  *,
  checkpoint: Optional[str] = None,
  workdir: Optional[str] = None,
) -> query.Collection:
  if settings.backend not in BACKENDS:
    raise ValueError(f'backend must be one of {BACKENDS}; got {settings.backend!r}')
  if settings.backend == 'milvus':
    return MilvusCollection(
      index_dir,
      settings.milvus_uri,
      settings.milvus_collection,
      checkpoint=checkpoint,
      workdir=workdir,
    )
  return query.Collection(index_dir, checkpoint=checkpoint, workdir=workdir)
