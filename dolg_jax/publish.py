"""Copy an index into Milvus: python -m dolg_jax.publish.

  python -m dolg_jax.publish --index=INDEX_DIR --milvus_uri=URI [--milvus_collection=NAME]
      [--batch_rows=2000] [--milvus_index=AUTOINDEX] [--replace] [--recall_sample=100]

URI: a milvus-lite file (`/data/photos.db`) or a server (`http://host:19530`). The collection
holds one entity per index row: `id` (the row id, primary key), `vector` (the L2-normalised
descriptor, inner-product metric), `path` (as indexed, `collection.files.escape`d), `height`,
`width`, `bytes`, `sha1`; a collection property names the index it came from (descriptor
fingerprint, dimension). Rows are upserted in batches of `--batch_rows`, skipping batches already
there, so a rerun resumes and adds images indexed later. A collection of another index is refused
(`--replace` drops it). The entity count is checked and recall@100 against exact search over
`--recall_sample` rows is printed and written to the index's manifest (`milvus.NAME`); `python -m
dolg_jax.serve --backend=milvus` answers from it. A failure ends with one line `FAILED: ...`
(exit code 1).
"""

from __future__ import annotations

import json
import time
from typing import Callable, Optional

from absl import app
from absl import flags
import numpy as np
from pymilvus import DataType
from pymilvus import MilvusClient

from dolg_jax import cli
from dolg_jax.collection import faiss_index
from dolg_jax.collection import store as store_lib
from dolg_jax.serve import backends
from dolg_jax.training import failures

FLAGS = flags.FLAGS
INDEX_TYPES = ('AUTOINDEX', 'FLAT', 'IVF_FLAT', 'HNSW')
DEFAULT_BATCH_ROWS = 2000
PATH_LENGTH = 4096
RECALL_K = 100


def define_flags() -> None:
  """Defines the command-line flags (at entry only, so importing this module defines none)."""
  flags.DEFINE_string('index', None, 'Index directory (python -m dolg_jax.index --out).')
  flags.DEFINE_string('milvus_uri', None, 'milvus-lite file path or http://host:19530.')
  flags.DEFINE_string('milvus_collection', backends.DEFAULT_COLLECTION, 'Collection name.')
  flags.DEFINE_integer('batch_rows', DEFAULT_BATCH_ROWS, 'Rows per upsert (unit of resumption).')
  flags.DEFINE_enum('milvus_index', 'AUTOINDEX', list(INDEX_TYPES), "Milvus's vector index.")
  flags.DEFINE_bool('replace', False, 'Drop a collection published from another index.')
  flags.DEFINE_integer('recall_sample', 100, 'Queries (index rows) for the recall@100 check.')


def _schema(client_cls, dim: int):
  s = client_cls.create_schema(auto_id=False, enable_dynamic_field=False)
  s.add_field('id', DataType.INT64, is_primary=True)
  s.add_field('vector', DataType.FLOAT_VECTOR, dim=dim)
  s.add_field('path', DataType.VARCHAR, max_length=PATH_LENGTH)
  for name in ('height', 'width', 'bytes'):
    s.add_field(name, DataType.INT64)
  s.add_field('sha1', DataType.VARCHAR, max_length=64)
  return s


def _count_range(cl, name: str, a: int, b: int) -> int:
  got = cl.query(
    name, filter=f'id >= {a} and id < {b}', output_fields=['count(*)'], consistency_level='Strong'
  )
  return int(got[0]['count(*)'])


def publish(
  index_dir: str,
  uri: str,
  name: str = backends.DEFAULT_COLLECTION,
  *,
  batch_rows: int = DEFAULT_BATCH_ROWS,
  index_type: str = 'AUTOINDEX',
  replace: bool = False,
  recall_sample: int = 100,
  progress: Optional[Callable[[str], None]] = None,
) -> dict:
  """Copies the index's rows into the Milvus collection `name` at `uri` (module docstring)."""
  say = progress or (lambda s: None)
  if batch_rows < 1:
    raise ValueError(f'batch_rows must be >= 1; got {batch_rows}')
  if index_type not in INDEX_TYPES:
    raise ValueError(f'milvus_index must be one of {INDEX_TYPES}; got {index_type!r}')
  store = store_lib.IndexStore(index_dir)
  manifest = store.manifest()
  if manifest.get('status') != 'complete':
    raise store_lib.NotAnIndexError(
      f'{store.path}: the index is not complete; rerun the index command that built it'
    )
  store.verify_for_search(manifest, faiss=False)  # faiss.index is not read here
  rows = store_lib.Rows(store)
  n, dim = len(rows), rows.dim or int(manifest.get('dim') or 0)
  want = backends.identity(manifest)
  cl = MilvusClient(uri)
  exists = cl.has_collection(name)
  got, count = None, 0  # the collection's identity property and entity count
  if exists:
    cl.load_collection(name)  # a reopened collection starts released
    got = backends.published_identity(cl, name)
    count = backends.row_count(cl, name)
    problem = None
    if got is None and count:
      problem = 'holds rows that no dolg_jax.publish wrote'
    elif got is not None and got != want:
      problem = 'was published from another index (model, protocol or dimension differ)'
    elif count > n:
      problem = f'holds {count} rows, more than the index\'s {n} (another index?)'
    if problem and not replace:
      raise store_lib.IndexMismatchError(
        f'Milvus collection {name!r} at {uri} {problem}: '
        'pass --replace to drop it and publish this index'
      )
    if problem:
      say(f'dropping {name!r} ({problem})')
      cl.drop_collection(name)
      exists, got, count = False, None, 0
  if not exists:
    if not n:
      raise ValueError(f'{store.path} holds 0 images: nothing to publish')
    params = cl.prepare_index_params()
    extra = {'M': 16, 'efConstruction': 200} if index_type == 'HNSW' else {}
    params.add_index('vector', index_type=index_type, metric_type='IP', params=extra)
    cl.create_collection(name, schema=_schema(MilvusClient, dim), index_params=params)
  if got is None:
    cl.alter_collection_properties(
      name, properties={backends.IDENTITY_PROPERTY: json.dumps(want, sort_keys=True)}
    )
  t0 = time.perf_counter()
  inserted = 0
  if count != n:
    table = rows.table.table  # path (as the CSV holds it: escaped), height, width, bytes, sha1
    for a in range(0, n, batch_rows):
      b = min(n, a + batch_rows)
      present = _count_range(cl, name, a, b) if count else 0  # an empty collection holds none
      if present == b - a:
        continue
      vec = rows.take(np.arange(a, b))
      cl.upsert(
        name,
        [
          dict(m, id=i, vector=v.tolist())
          for i, v, m in zip(range(a, b), vec, table.slice(a, b - a).to_pylist())
        ],
      )
      inserted += b - a - present
      say(f'batch {a}..{b} of {n}')
    cl.flush(name)
    count = backends.row_count(cl, name)
  if count != n:
    raise store_lib.DamagedIndexError(
      f'Milvus collection {name!r} holds {count} rows after '
      f'publishing, the index {n}: rerun this command'
    )
  s = min(recall_sample, n)
  sample = np.random.default_rng(0).choice(n, size=s, replace=False)
  q = rows.take(np.sort(sample))
  k = min(RECALL_K, n)
  recall = 1.0
  if s:
    _, exact = faiss_index.exact_topk(q, rows.iter_blocks(), k)
    hits = cl.search(
      name,
      data=q.tolist(),
      limit=k,
      output_fields=['id'],
      search_params={'metric_type': 'IP'},
      consistency_level='Strong',
    )
    approx = np.asarray([[int(h['id']) for h in one[:k]] + [-1] * (k - len(one)) for one in hits])
    recall = faiss_index.recall_at_k(approx, exact)
  summary = {
    'uri': uri,
    'rows': n,
    'dim': dim,
    'index_type': index_type,
    f'recall_at_{RECALL_K}': recall,
    'recall_sample': s,
    'published': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
  }
  manifest = store.manifest()
  manifest.setdefault('milvus', {})[name] = summary
  store.write_manifest(manifest)
  return dict(summary, inserted=inserted, seconds=time.perf_counter() - t0, collection=name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.index or not FLAGS.milvus_uri:
    raise app.UsageError('--index and --milvus_uri are required.')
  failures.quiet_library_tracebacks()
  out = failures.call_or_exit(
    lambda: publish(
      FLAGS.index,
      FLAGS.milvus_uri,
      FLAGS.milvus_collection,
      batch_rows=FLAGS.batch_rows,
      index_type=FLAGS.milvus_index,
      replace=FLAGS.replace,
      recall_sample=FLAGS.recall_sample,
      progress=lambda s: print(s, flush=True),
    ),
    FLAGS.milvus_uri,
  )
  print(
    f'published {out["rows"]} rows ({out["inserted"]} new) to {out["collection"]!r} at '
    f'{out["uri"]} in {out["seconds"]:.1f} s; recall@{RECALL_K} of {out["index_type"]} on '
    f'{out["recall_sample"]} queries: {out[f"recall_at_{RECALL_K}"]:.4f}',
    flush=True,
  )


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
