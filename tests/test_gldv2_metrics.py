"""GLDv2 retrieval mAP@k and mean precisions on hand-computed cases."""

import numpy as np
import pytest

from dolg_jax.retrieval import metrics

SOLUTION = {'a': ['x1', 'x2', 'x3'], 'b': ['y1'], 'c': ['z1'], 'd': None}
PREDICTIONS = {
  'a': ['x1', 'n1', 'x2', 'x2', 'x3'],  # duplicate x2 skipped but occupies position 4
  'b': ['n2', 'y1'],  # short list
  'd': ['x1', 'y1'],  # ignored query: not scored
}  # 'c' has no prediction: counts 0


def test_map_hand_computed():
  ap_a = (1 / 1 + 2 / 3 + 3 / 5) / 3
  ap_b = (1 / 2) / 1
  assert metrics.gldv2_map_at_k(PREDICTIONS, SOLUTION) == pytest.approx(
    (ap_a + ap_b + 0) / 3, abs=1e-15
  )
  # k = 3: x3 at position 5 falls out; the denominator is min(3, 3).
  assert metrics.gldv2_map_at_k(PREDICTIONS, SOLUTION, k=3) == pytest.approx(
    ((1 + 2 / 3) / 3 + 0.5) / 3, abs=1e-15
  )


def test_map_divides_by_min_relevant_k_and_skips_duplicate_hits():
  sol = {'q': ['r1', 'r2', 'r3', 'r4', 'r5']}
  assert metrics.gldv2_map_at_k({'q': ['r1', 'r2', 'r9']}, sol, k=2) == 1.0
  assert metrics.gldv2_map_at_k({'q': ['r1', 'r2']}, sol) == pytest.approx(2 / 5)
  sol2 = {'q': ['x1', 'x2']}
  assert metrics.gldv2_map_at_k({'q': ['x1', 'x1', 'x2']}, sol2) == pytest.approx((1 + 2 / 3) / 2)
  assert metrics.gldv2_map_at_k({}, sol2) == 0.0


def test_mean_precisions_hand_computed():
  p = metrics.gldv2_mean_precisions(PREDICTIONS, SOLUTION, k=6)
  a = [1, 1 / 2, 2 / 3, 2 / 4, 3 / 5, 3 / 6]
  b = [0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6]
  np.testing.assert_allclose(p, (np.array(a) + np.array(b)) / 3, rtol=0, atol=1e-15)
  assert metrics.gldv2_mean_precisions({'q': ['x1', 'x1']}, {'q': ['x1']}, k=2).tolist() == [1, 0.5]


def test_bad_inputs():
  with pytest.raises(ValueError, match='not in the solution'):
    metrics.gldv2_map_at_k({'zz': ['x']}, SOLUTION)
  with pytest.raises(ValueError, match='empty list'):
    metrics.gldv2_mean_precisions({}, {'q': []})
  with pytest.raises(ValueError, match='no scored query'):
    metrics.gldv2_map_at_k({}, {'q': None})
