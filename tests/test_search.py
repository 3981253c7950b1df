"""Chunked search, top-k, the exact +1M fast path (vs full stable argsort) and alpha-QE / DBA."""

import os
import pickle

import numpy as np
import pytest

from dolg_jax.retrieval import metrics, search

from tests.helpers.paths import GND_DIR


def _l2n(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _tied_descriptors(rng, n, d, levels=3):
  """Coarsely quantised descriptors: many exactly equal scores (ties) and duplicates."""
  x = rng.integers(-levels, levels + 1, size=(n, d)).astype(np.float32)
  x[x.sum(1) == 0, 0] = 1.0
  return x


def test_similarity_and_topk():
  rng = np.random.default_rng(0)
  db = [_l2n(rng.standard_normal((300, 16))), _l2n(rng.standard_normal((77, 16)))]
  q = _l2n(rng.standard_normal((5, 16)))
  full = np.concatenate(db)
  s = search.similarity_matrix(q, db, chunk_size=64)
  np.testing.assert_allclose(s, q @ full.T, atol=1e-5)
  ts, ti = search.topk(q, db, k=10, chunk_size=64)
  ranks = search.full_ranks(s)
  np.testing.assert_array_equal(ti, ranks[:10].T)
  np.testing.assert_array_equal(ts, np.take_along_axis(s, ti, axis=1))
  # Ties: identical database rows -> lower index first, like the stable argsort.
  dup = np.repeat(full[:20], 4, axis=0)
  s2 = search.similarity_matrix(q, dup, chunk_size=32)
  _, ti2 = search.topk(q, dup, k=12, chunk_size=32)
  np.testing.assert_array_equal(ti2, search.full_ranks(s2)[:12].T)


@pytest.mark.parametrize('method', ['host', 'device'])
def test_item_positions_match_full_argsort_with_ties(method):
  rng = np.random.default_rng(1)
  db = [_tied_descriptors(rng, 700, 6), _tied_descriptors(rng, 900, 6, levels=1)]
  q = _tied_descriptors(rng, 9, 6)
  n = 1600
  items = [rng.choice(n, size=rng.integers(0, 60), replace=False) for _ in range(9)]
  items[3] = np.arange(n)  # every image: positions must be a permutation
  s = search.similarity_matrix(q, db, chunk_size=256)
  assert (np.diff(np.sort(s, axis=1), axis=1) == 0).mean() > 0.5  # heavy ties
  inv = np.argsort(search.full_ranks(s), axis=0)  # inv[x, q] = position of image x
  pos = search.item_positions(q, db, items, chunk_size=256, method=method, bins_bits=6)
  for qi, it in enumerate(items):
    np.testing.assert_array_equal(pos[qi], inv[it, qi])


def _structured(rng, gnd, n_db, d):
  """Base descriptors where easy (and, less so, hard) positives lean towards their query."""
  base = rng.standard_normal((n_db, d))
  qs = rng.standard_normal((len(gnd), d))
  for qv, g in zip(qs, gnd):
    base[np.asarray(g['easy'], int)] += 1.0 * qv
    base[np.asarray(g['hard'], int)] += 0.5 * qv
  return _l2n(base), _l2n(qs)


@pytest.mark.parametrize('name', ['roxford5k', 'rparis6k'])
def test_fast_path_equals_full_sort_on_real_gnd(name):
  path = os.path.join(GND_DIR, f'gnd_{name}.pkl')
  if not os.path.exists(path):
    pytest.skip(f'real ground truth {path} is absent')
  with open(path, 'rb') as f:
    gnd = pickle.load(f)['gnd']
  rng = np.random.default_rng(2)
  n_db = {'roxford5k': 4993, 'rparis6k': 6322}[name]
  d = 64
  base, q = _structured(rng, gnd, n_db, d)
  # Inject exact ties: duplicated positives and junk inside the base set and among distractors.
  base[rng.choice(n_db, 300)] = base[np.asarray(gnd[0]['easy'])[:1]]
  distractors = _l2n(rng.standard_normal((20000, d)))
  for g in gnd[:10]:
    src = np.concatenate([np.asarray(g[k], int) for k in ('easy', 'hard', 'junk')])
    distractors[rng.choice(20000, 10, replace=False)] = base[rng.choice(src, 10)]
  for db in ([base], [base, distractors]):
    s = search.similarity_matrix(q, db, chunk_size=4096)
    ranks = search.full_ranks(s)
    ref = metrics.compute_protocols(ranks, gnd)
    methods = ['host', 'device'] if len(db) == 2 else ['host']
    for method in methods:
      fast = search.fast_compute_protocols(q, db, gnd, chunk_size=4096, method=method)
      for p in metrics.PROTOCOLS:
        assert fast[p]['map'] == ref[p]['map'], (method, p)
        np.testing.assert_array_equal(fast[p]['aps'], ref[p]['aps'])
        np.testing.assert_array_equal(fast[p]['mp'], ref[p]['mp'])
        np.testing.assert_array_equal(fast[p]['prs'], ref[p]['prs'])
    # The generic form (ok/junk dicts) agrees too.
    gm = metrics.protocol_gnd(gnd, 'hard')
    got = search.fast_compute_map(q, db, gm, chunk_size=4096, method='host')
    want = metrics.compute_map(ranks, gm)
    assert got[0] == want[0]
    np.testing.assert_array_equal(got[3], want[3])
    # Informative rankings: far from chance but not perfect.
    assert 0.05 < ref['medium']['map'] < 0.999


def test_item_positions_validates():
  q = np.ones((1, 4), np.float32)
  with pytest.raises(ValueError, match='unique indices'):
    search.item_positions(q, np.ones((5, 4), np.float32), [np.array([7])])
  with pytest.raises(ValueError, match='method'):
    search.item_positions(q, np.ones((5, 4), np.float32), [np.array([1])], method='gpu')


def _brute_weighted(vectors, db, k, alpha, include_self):
  s = vectors @ db.T
  idx = np.argsort(-s, axis=1, kind='stable')[:, :k]
  w = np.maximum(np.take_along_axis(s, idx, 1), 0) ** alpha
  out = (w[..., None] * db[idx]).sum(1) + (vectors if include_self else 0)
  return _l2n(out)


def test_alpha_qe_and_dba():
  rng = np.random.default_rng(3)
  db = _l2n(rng.standard_normal((200, 8)))
  q = _l2n(rng.standard_normal((6, 8)))
  np.testing.assert_array_equal(search.alpha_query_expansion(q, db, k=0), q)
  got = search.alpha_query_expansion(q, [db[:50], db[50:]], k=3, alpha=3.0, chunk_size=64)
  np.testing.assert_allclose(got, _brute_weighted(q, db, 3, 3.0, True), atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
  dba = search.database_augmentation(db, k=4, alpha=1.0, chunk_size=64, block=64)
  np.testing.assert_allclose(dba, _brute_weighted(db, db, 4, 1.0, False), atol=1e-5)
  # With k=1 the neighbour is the vector itself: DBA is the identity.
  np.testing.assert_allclose(search.database_augmentation(db, k=1), db, atol=1e-6)
