"""python -m dolg_jax.search and the Python search API on a small index built with the tiny model.

- a duplicate of an indexed image (another path) and re-encoded copies (PNG -> JPEG, JPEG at
  another quality) find the original first; results.json has exactly the contract's schema and
  report.html shows every query and its k results as thumbnails;
- --rerank=superglobal gives the ranking of retrieval.rerank over the stored descriptors;
- `query.rerank_candidates` re-ranks another system's candidate lists as rerank_heads does;
- IVF-PQ with the exact refine stage: recall@k against exact search is measured and recorded in
  the manifest (synthetic clustered descriptors, and the index's own structure rebuilt in place).
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

from dolg_jax.collection import build
from dolg_jax.collection import faiss_index
from dolg_jax.collection import query
from dolg_jax.collection import store as store_lib
from dolg_jax.retrieval import rerank
from tests.helpers import collection_testlib as ct

K = 5


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('collection_search')
  folder = ct.write_folder(str(root / 'images'))
  ckpt = ct.write_checkpoint(str(root / 'tiny'), 0)
  out = str(root / 'index')
  proc = ct.run(ct.index_cmd(ckpt, folder, out, str(root / 'xla')))
  assert proc.returncode == 0, ct.explain(proc)
  # Queries, outside the indexed folder.
  qdir = root / 'queries'
  qdir.mkdir()
  shutil.copy(os.path.join(folder, 'a/b/img08.png'), qdir / 'duplicate.png')
  Image.open(os.path.join(folder, 'a/img05.PNG')).convert('RGB').save(
    qdir / 'reencoded.jpg', quality=90
  )
  Image.open(os.path.join(folder, 'img03.Jpeg')).save(qdir / 'requality.jpg', quality=70)
  return {
    'root': root,
    'folder': folder,
    'index': out,
    'xla': str(root / 'xla'),
    'queries': {n: str(qdir / n) for n in ('duplicate.png', 'reencoded.jpg', 'requality.jpg')},
  }


def _search(built, *args, out):
  cmd = [
    sys.executable,
    '-m',
    'dolg_jax.search',
    f'--index={built["index"]}',
    f'--k={K}',
    f'--out={out}',
    *args,
  ]
  proc = ct.run(cmd)
  assert proc.returncode == 0, ct.explain(proc)
  with open(os.path.join(out, 'results.json')) as f:
    return json.load(f)


def _check_schema(res, index, queries, sorted_scores=True):
  assert set(res) == {'index', 'queries'} and res['index'] == index
  assert [q['query'] for q in res['queries']] == list(queries)
  for q in res['queries']:
    assert set(q) == {'query', 'results'} and len(q['results']) == K
    for r in q['results']:
      assert set(r) == {'path', 'score'} and isinstance(r['score'], float)
    scores = [r['score'] for r in q['results']]
    assert all(-1.0001 <= v <= 1.0001 for v in scores)
    if sorted_scores:  # re-ranked lists keep their cosine similarities, in the re-ranked order
      assert scores == sorted(scores, reverse=True)


def test_duplicate_and_reencoded_queries_come_first(built, tmp_path):
  q = built['queries']
  queries = [
    q['duplicate.png'],
    q['reencoded.jpg'],
    q['requality.jpg'],
    os.path.join(built['folder'], 'a/img06.jpg'),
  ]
  out = str(tmp_path / 'search')
  res = _search(
    built,
    *[f'--query={p}' for p in queries],
    '--box=0,0,64,64',
    '--box=0,0,400,400',
    '--box=0,0,400,400',
    '--box=0,0,400,400',
    out=out,
  )
  _check_schema(res, built['index'], queries)
  top = [r['results'][0] for r in res['queries']]
  # A box cut down to the whole image equals the uncropped picture (as the duplicate would).
  assert [t['path'] for t in top[1:]] == ['a/img05.PNG', 'img03.Jpeg', 'a/img06.jpg']
  assert top[3]['score'] == pytest.approx(1.0, abs=1e-5)
  assert top[1]['score'] > 0.99 and top[2]['score'] > 0.99
  with open(os.path.join(out, 'report.html')) as f:
    page = f.read()
  assert page.count('data:image/jpeg;base64,') == len(queries) * (K + 1)
  assert 'a/img05.PNG' in page


@pytest.fixture(scope='module')
def collection(built):
  return query.Collection(built['index'])  # one model load and compilation for the module


def test_duplicate_query_without_box_scores_one(built, collection):
  col = collection
  hits = col.search_images([built['queries']['duplicate.png']], k=K)
  assert hits[0][0][0] == 'a/b/img08.png' and hits[0][0][1] == pytest.approx(1.0, abs=1e-5)
  # The same through stored descriptors: each row finds itself.
  x = col.rows.all_descriptors()
  _, ids = col.search_descriptors(x, k=1)
  np.testing.assert_array_equal(ids[:, 0], np.arange(len(col)))


def test_superglobal_rerank_cli_and_api(built, collection, tmp_path):
  q = built['queries']['duplicate.png']
  res = _search(built, f'--query={q}', '--rerank=superglobal', out=str(tmp_path / 'sg'))
  _check_schema(res, built['index'], [q], sorted_scores=False)
  col = collection
  x = col.rows.all_descriptors()
  p = col.rerank_params()
  qd = col.describe_images([q])
  want = rerank.superglobal(qd, x, p['M'], p['K'], p['beta'])[:K, 0]
  assert [r['path'] for r in res['queries'][0]['results']] == [col.paths[i] for i in want]
  np.testing.assert_allclose(
    [r['score'] for r in res['queries'][0]['results']], x[want] @ qd[0], atol=1e-5
  )
  scores, ids = col.search_descriptors(x[:3], k=K, rerank='superglobal')
  np.testing.assert_array_equal(ids, rerank.superglobal(x[:3], x, p['M'], p['K'], p['beta'])[:K].T)
  np.testing.assert_allclose(scores, np.einsum('qd,qkd->qk', x[:3], x[ids]), atol=1e-5)


def test_rerank_candidates_from_another_system():
  rng = np.random.default_rng(0)
  cand = rng.standard_normal((3, 20, 8)).astype(np.float32)
  cand /= np.linalg.norm(cand, axis=-1, keepdims=True)
  qs = cand[:, 0] + 0.1 * rng.standard_normal((3, 8)).astype(np.float32)
  qs /= np.linalg.norm(qs, axis=-1, keepdims=True)
  order = query.rerank_candidates(qs, cand, K=3, beta=0.15)
  for i in range(3):
    want = rerank.rerank_heads(qs[i : i + 1], cand[i], np.arange(20)[None], 3, 0.15)[0]
    np.testing.assert_array_equal(order[i], want)
  assert sorted(order[0].tolist()) == list(range(20))


def _clustered(n, d, clusters, seed=0):
  rng = np.random.default_rng(seed)
  c = rng.standard_normal((clusters, d)).astype(np.float32)
  x = c[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ivfpq_recall_is_measured_and_refine_restores_it():
  import faiss

  faiss.omp_set_num_threads(1)
  x = _clustered(4000, 32, 40)
  blocks = lambda: ((a, x[a : a + 1000]) for a in range(0, len(x), 1000))
  take = lambda ids: x[ids]
  out = {}
  for refine in (1, 10):
    spec = faiss_index.Spec(kind='ivfpq', nlist=32, pq_m=4, pq_bits=6, nprobe=8, refine=refine)
    index, spec, info = faiss_index.build(blocks, take, len(x), 32, spec)
    assert info['type'].startswith('IVF32,PQ4x6') and info['trained_on'] == 2560
    out[refine] = faiss_index.measure_recall(index, spec, take, blocks, len(x), k=50, sample=50)
  assert out[1]['recall'] < 0.8  # PQ codes alone miss many of the true top 50
  assert out[10]['recall'] >= 0.95  # the exact re-scoring of the shortlist restores it
  scores, ids = faiss_index.search(index, spec, x[:5], 10, take)
  np.testing.assert_allclose(scores, np.einsum('qd,qkd->qk', x[:5], x[ids]), atol=1e-6)


def test_index_structure_rebuilt_as_ivfpq_records_recall(built, collection, tmp_path):
  out = str(tmp_path / 'ivfpq_index')
  shutil.copytree(built['index'], out)
  opts = ct.options(faiss=faiss_index.Spec(kind='ivfpq'), recall_k=5, recall_sample=12)
  m = build.finalize(store_lib.IndexStore(out), opts, {})
  assert m['faiss']['type'].startswith('IVF') and 'refine' in m['faiss']['type']
  assert m['faiss']['recall'] == pytest.approx(
    {
      'k': 5,
      'queries': 12,
      'recall': 1.0,
      'ms_per_query_batched': m['faiss']['recall']['ms_per_query_batched'],
    }
  )
  with open(os.path.join(out, 'manifest.json')) as f:
    assert json.load(f)['faiss']['recall']['recall'] == 1.0
  col = query.Collection(out)
  flat = collection
  x = flat.rows.all_descriptors()
  s1, i1 = col.search_descriptors(x[:4], k=K)
  s2, i2 = flat.search_descriptors(x[:4], k=K)
  np.testing.assert_array_equal(i1, i2)
  np.testing.assert_allclose(s1, s2, atol=1e-6)
