"""SuperGlobal re-ranking vs a straightforward loop re-implementation of the released code."""

import numpy as np
import pytest

from dolg_jax.retrieval import metrics, rerank, search


def _l2n(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(rng, n_clusters, per, d, noise):
  centres = _l2n(rng.standard_normal((n_clusters, d)))
  x = np.repeat(centres, per, axis=0) + noise * rng.standard_normal((n_clusters * per, d))
  return _l2n(x[rng.permutation(len(x))]), centres


def reference_superglobal(q, db, m, k, beta, initial_ranks):
  """Loops and numpy float64, one query and one candidate at a time (MDescAug + RerankwMDA)."""
  n, nq = initial_ranks.shape
  m = min(m, n)
  kk = min(k + 1, m)
  out = initial_ranks.copy()
  for qi in range(nq):
    top = initial_ranks[:m, qi]
    x = db[top].astype(np.float64)
    refined = np.zeros_like(x)
    for c in range(m):
      sims = np.array([x[c] @ x[j] for j in range(m)])
      nn = np.argsort(-sims, kind='stable')[:kk]
      num = np.zeros(x.shape[1])
      den = 0.0
      for rank, j in enumerate(nn):
        w = 1.0 if rank == 0 else beta * sims[j]
        num += w * x[j]
        den += w
      refined[c] = num / den
    r = np.array([q[qi].astype(np.float64) @ refined[c] for c in range(m)])
    pre = np.argsort(-r, kind='stable')
    expanded = refined[pre[0]].copy()
    for c in pre[1:kk]:
      expanded = np.maximum(expanded, refined[c])
    final = np.array([(r[c] + expanded @ refined[c]) / 2 for c in pre])
    post = np.argsort(-final, kind='stable')
    out[:m, qi] = top[pre[post]]
  return out


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  db, centres = _clustered(rng, 12, 25, 32, 0.6)
  q = _l2n(centres[:6] + 0.5 * rng.standard_normal((6, 32)))
  distractors = _l2n(rng.standard_normal((3000, 32)))
  return q, db, distractors


@pytest.mark.parametrize('with_distractors', [False, True])
def test_matches_loop_reference(data, with_distractors):
  q, db, distractors = data
  segs = [db, distractors] if with_distractors else [db]
  full = np.concatenate(segs)
  m, k, beta = 60, 5, 0.15
  initial = search.full_ranks(search.similarity_matrix(q, segs, chunk_size=256))
  ref = reference_superglobal(q, full, m, k, beta, initial)
  got = rerank.superglobal(q, segs, M=m, K=k, beta=beta, chunk_size=256, query_chunk=4)
  assert got.shape == (full.shape[0], q.shape[0])
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_array_equal(got[m:], initial[m:])  # the tail keeps its initial order
  assert not np.array_equal(got[:m], initial[:m])  # and the head really moved
  for c in range(q.shape[0]):
    assert sorted(got[:m, c]) == sorted(initial[:m, c])
  # The sort-free path (device top-k) gives the same heads.
  top, head = rerank.superglobal_topm(q, segs, M=m, K=k, beta=beta, chunk_size=256, query_chunk=4)
  np.testing.assert_array_equal(top, initial[:m].T)
  np.testing.assert_array_equal(head, got[:m].T)


def test_m_at_least_db(data):
  q, db, _ = data
  small = db[:40]
  initial = search.full_ranks(search.similarity_matrix(q, small))
  ref = reference_superglobal(q, small, 400, 9, 0.15, initial)
  got = rerank.superglobal(q, small)  # defaults: M=400 > 40 rows, K=9
  np.testing.assert_array_equal(got, ref)
  tiny = db[:5]  # K + 1 > M: every candidate averages all M
  ref = reference_superglobal(q, tiny, 400, 9, 0.15, search.full_ranks(q @ tiny.T))
  np.testing.assert_array_equal(rerank.superglobal(q, tiny), ref)


def test_fast_positions_match_full_ranks(data):
  q, db, distractors = data
  segs = [db, distractors]
  gnd = []
  rng = np.random.default_rng(1)
  for _ in range(q.shape[0]):
    lab = rng.choice(db.shape[0], 30, replace=False)
    gnd.append({'easy': lab[:12], 'hard': lab[12:24], 'junk': lab[24:]})
  ranks = rerank.superglobal(q, segs, M=60, K=5, chunk_size=512)
  want = metrics.compute_protocols(ranks, gnd)
  got = rerank.fast_compute_protocols(q, segs, gnd, M=60, K=5, chunk_size=512, method='host')
  for p in metrics.PROTOCOLS:
    assert got[p]['map'] == want[p]['map']
    np.testing.assert_array_equal(got[p]['mp'], want[p]['mp'])


def test_bad_input():
  with pytest.raises(ValueError, match='width'):
    rerank.superglobal(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
  with pytest.raises(ValueError, match='M >= 1'):
    rerank.superglobal(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32), M=0)
