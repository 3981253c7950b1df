"""compute_map vs the loop reference of revisitop, on the real revisited Oxford/Paris gnd."""

import os
import pickle

import numpy as np
import pytest

from dolg_jax.retrieval import metrics
from tests.helpers.revisitop_reference import reference_compute_map, reference_protocol_gnd

from tests.helpers.paths import GND_DIR

KAPPAS = (1, 5, 10)


def _load_gnd(name):
  path = os.path.join(GND_DIR, f'gnd_{name}.pkl')
  if not os.path.exists(path):
    pytest.skip(f'real ground truth {path} is absent')
  with open(path, 'rb') as f:
    return pickle.load(f)


def _assert_same(ours, ref, tol=1e-9):
  m, aps, pr, prs = ours
  rm, raps, rpr, rprs = ref
  assert abs(m - rm) <= tol
  np.testing.assert_allclose(aps, raps, rtol=0, atol=tol, equal_nan=True)
  np.testing.assert_allclose(pr, rpr, rtol=0, atol=tol, equal_nan=True)
  np.testing.assert_allclose(prs, rprs, rtol=0, atol=tol, equal_nan=True)
  assert np.array_equal(np.isnan(aps), np.isnan(raps))


def _structured_rankings(gnd, n_db, n_total, rng):
  """Rankings that stress junk handling: best case, worst case, junk first, interleaved."""
  nq = len(gnd)
  out = {}
  perfect = np.zeros((n_total, nq), np.int64)
  worst = np.zeros((n_total, nq), np.int64)
  junk_first = np.zeros((n_total, nq), np.int64)
  interleaved = np.zeros((n_total, nq), np.int64)
  for i, g in enumerate(gnd):
    easy, hard, junk = (np.asarray(g[k], np.int64) for k in ('easy', 'hard', 'junk'))
    labelled = np.concatenate([easy, hard, junk])
    rest = np.setdiff1d(np.arange(n_total), labelled)
    rest = rng.permutation(rest)
    perfect[:, i] = np.concatenate([easy, hard, junk, rest])
    worst[:, i] = np.concatenate([rest, junk, hard, easy])
    junk_first[:, i] = np.concatenate([junk, hard, rest[:7], easy, rest[7:]])
    pos = rng.permutation(labelled)
    slots = np.sort(rng.choice(n_total, size=pos.shape[0], replace=False))
    col = np.full(n_total, -1, np.int64)
    col[slots] = pos
    col[col < 0] = rest
    interleaved[:, i] = col
  out['perfect'] = perfect
  out['worst'] = worst
  out['junk_first'] = junk_first
  out['interleaved'] = interleaved
  return out


@pytest.mark.parametrize('name', ['roxford5k', 'rparis6k'])
def test_compute_map_matches_reference_on_real_gnd(name):
  cfg = _load_gnd(name)
  gnd = cfg['gnd']
  n_db = len(cfg['imlist'])
  assert len(cfg['qimlist']) == 70 and len(gnd) == 70
  rng = np.random.default_rng(0)
  n_distractors = 3000
  n_total = n_db + n_distractors
  rankings = {
    'random': np.stack([rng.permutation(n_db) for _ in gnd], axis=1),
    'random_distractors': np.stack([rng.permutation(n_total) for _ in gnd], axis=1),
  }
  rankings.update(_structured_rankings(gnd, n_db, n_total, rng))
  for protocol in metrics.PROTOCOLS:
    ours_gnd = metrics.protocol_gnd(gnd, protocol)
    ref_gnd = reference_protocol_gnd(gnd, protocol)
    for a, b in zip(ours_gnd, ref_gnd):
      np.testing.assert_array_equal(a['ok'], b['ok'])
      np.testing.assert_array_equal(a['junk'], b['junk'])
    for kind, ranks in rankings.items():
      for kappas in (KAPPAS, (1, 3, 100)):
        ours = metrics.compute_map(ranks, ours_gnd, kappas)
        ref = reference_compute_map(ranks.copy(), ref_gnd, kappas)
        _assert_same(ours, ref)
      if kind == 'perfect':
        m, aps, pr, _ = ours
        assert abs(m - 1.0) < 1e-12
        np.testing.assert_allclose(pr, 1.0)


def test_roxford_easy_leaves_out_queries_without_positives():
  cfg = _load_gnd('roxford5k')
  gnd = metrics.protocol_gnd(cfg['gnd'], 'easy')
  n_empty = sum(len(g['ok']) == 0 for g in gnd)
  assert n_empty == 2  # ROxf Easy averages 68 of 70 queries.
  ranks = np.stack([np.random.default_rng(i).permutation(len(cfg['imlist'])) for i in range(70)], 1)
  m, aps, pr, prs = metrics.compute_map(ranks, gnd)
  assert np.isnan(aps).sum() == 2 and np.isnan(prs).any(axis=1).sum() == 2
  assert abs(m - np.nanmean(aps)) < 1e-12
  np.testing.assert_allclose(pr, np.nanmean(prs, axis=0), atol=1e-12)


def test_compute_map_hand_computed():
  # One query, database of 6. Ranking: 3 (ok), 0 (junk), 5 (neg), 1 (ok), 4 (neg), 2 (ok).
  ranks = np.array([[3], [0], [5], [1], [4], [2]])
  gnd = [{'ok': [1, 2, 3], 'junk': [0]}]
  m, aps, pr, prs = metrics.compute_map(ranks, gnd, kappas=(1, 2, 5, 10))
  # Junk removed: positives at 0, 2, 4 (0-based). Trapezoids with recall step 1/3.
  ap = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2) / 3
  assert abs(m - ap) < 1e-15 and abs(aps[0] - ap) < 1e-15
  # 1-based positions 1, 3, 5; last = 5 so k=10 is clipped to 5.
  np.testing.assert_allclose(prs[0], [1.0, 1 / 2, 3 / 5, 3 / 5])
  np.testing.assert_allclose(pr, prs[0])
  # Partial (truncated) rankings are fine while every query finds a positive.
  _assert_same(
    metrics.compute_map(ranks[:4], gnd), reference_compute_map(ranks[:4].copy(), gnd, KAPPAS)
  )


def test_compute_map_errors():
  with pytest.raises(ValueError, match='query columns'):
    metrics.compute_map(np.zeros((3, 2), np.int64), [{'ok': [0]}])
  with pytest.raises(ValueError, match='none appears'):
    metrics.compute_map(np.array([[1], [2]]), [{'ok': [0], 'junk': []}])
  with pytest.raises(ValueError, match='protocol'):
    metrics.protocol_gnd([{'easy': [], 'hard': [], 'junk': []}], 'medium-rare')
