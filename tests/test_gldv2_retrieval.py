"""GLDv2 retrieval benchmark: builder on the official-layout fixture, solution parsing, and the
evaluation from descriptors with a known mAP@100 (with and without SuperGlobal re-ranking)."""

import os

import numpy as np
import pytest

from dolg_jax.data import gldv2
from dolg_jax.data import gldv2_retrieval
from dolg_jax.data.synthetic import gldv2_retrieval_fixture
from dolg_jax.data import prepare
from dolg_jax.retrieval import gldv2_eval, rerank, search
from tests.helpers.eval_config import extract_config


@pytest.fixture(scope='module')
def fixture(tmp_path_factory):
  return gldv2_retrieval_fixture.write_fixture(str(tmp_path_factory.mktemp('manual')))


@pytest.fixture(scope='module')
def built(fixture, tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  rc = prepare.main(
    [
      'prepare',
      '--dataset=gldv2_retrieval',
      f'--manual_dir={fixture.manual_dir}',
      f'--data_dir={data_dir}',
      '--allow_missing',
      '--verify_md5',
    ]
  )
  assert rc == 0
  return data_dir, gldv2_retrieval.load_summary(data_dir)


def test_layout_and_solution(fixture):
  names = sorted(os.listdir(fixture.manual_dir))
  assert names == ['index', 'index.csv', 'retrieval_solution_v2.1.csv', 'test', 'test.csv']
  assert sorted(os.listdir(os.path.join(fixture.manual_dir, 'test'))) == [
    'images_000.tar',
    'images_001.tar',
    'md5.images_000.txt',
    'md5.images_001.txt',
  ]
  public, private, ignored = gldv2_retrieval.read_solution(
    os.path.join(fixture.manual_dir, 'retrieval_solution_v2.1.csv')
  )
  assert (public, private, ignored) == (fixture.public, fixture.private, fixture.ignored)
  assert len(ignored) == 1 and public and private


def test_build(fixture, built):
  data_dir, summary = built
  per = summary['per_split']
  assert per['index'] == per['index'] | {'listed': 17, 'written': 16, 'skipped': 1, 'missing': 0}
  assert per['test'] == per['test'] | {'listed': 9, 'written': 8, 'skipped': 0, 'missing': 1}
  assert summary['solution'] == {'public': 4, 'private': 4, 'ignored': 1}
  for split, ids in (('index', fixture.index_ids), ('test', fixture.test_ids)):
    src = gldv2_retrieval.data_source(data_dir, split)
    got = {}
    for i in range(len(src)):
      ex = src[i]
      got[int(ex['index'])] = ex
    for row, ex in got.items():
      image_id = ex['id'].decode() if isinstance(ex['id'], bytes) else ex['id']
      assert image_id == ids[row]
      assert 40 <= ex['height'] <= 72 and 40 <= ex['width'] <= 72
  listed = gldv2_retrieval.listed_ids(data_dir, 'test')
  assert [i for i in listed if i is not None] == [
    t for t in fixture.test_ids if t not in fixture.missing_test
  ]
  assert gldv2_retrieval.load_solution(data_dir)[0] == fixture.public
  ids = []
  num, examples = gldv2_retrieval.extraction_examples(data_dir, 'index', ids)
  rows = [ex['index'] for ex in examples]
  assert num == 16 and rows == list(range(16))
  assert sorted(ids) == sorted(set(fixture.index_ids) - set(fixture.corrupt_index))


def test_missing_and_bad_files_are_errors(fixture, tmp_path):
  with pytest.raises(gldv2.MissingImagesError, match='1 of 9 images listed in test.csv'):
    gldv2_retrieval.prepare(fixture.manual_dir, str(tmp_path / 'd1'))
  bad = tmp_path / 'bad.csv'
  bad.write_text('id,images,Usage\n0123456789abcdef,None,Public\n')
  with pytest.raises(ValueError, match=r'bad.csv:2: .* has images None \(only Ignored rows may\)'):
    gldv2_retrieval.read_solution(str(bad))
  bad.write_text('id,images,Usage\n0123456789abcdef,x,Secret\n')
  with pytest.raises(ValueError, match="bad.csv:2: Usage 'Secret'"):
    gldv2_retrieval.read_solution(str(bad))


def test_known_map_with_and_without_rerank(fixture, built):
  data_dir, _ = built
  index_ids = gldv2_retrieval.listed_ids(data_dir, 'index')
  test_ids = gldv2_retrieval.listed_ids(data_dir, 'test')
  d = 8
  eye = np.eye(d, dtype=np.float32)
  rng = np.random.default_rng(0)

  def desc(lm):  # landmark lm -> its axis; unrelated -> the last axis (far from every landmark)
    return eye[lm] if lm >= 0 else eye[d - 1]

  x = np.stack(
    [desc(fixture.index_landmark[i]) if i else np.zeros(d, np.float32) for i in index_ids]
  ) + 0.01 * rng.standard_normal((len(index_ids), d))
  q = np.stack(
    [desc(fixture.test_landmark[t]) if t else np.zeros(d, np.float32) for t in test_ids]
  ) + 0.01 * rng.standard_normal((len(test_ids), d))
  x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
  q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
  public, private, _ = gldv2_retrieval.load_solution(data_dir)
  # Every present query retrieves its 3 relevant images first (AP 1); the missing one counts 0.
  miss = fixture.missing_test[0]
  want = {'public': (4 - (miss in public)) / 4, 'private': (4 - (miss in private)) / 4}
  for rr in (None, {'M': 400, 'K': 9, 'beta': 0.15}, {'M': 5, 'K': 2, 'beta': 0.15}):
    res = gldv2_eval.evaluate(
      q, test_ids, x, index_ids, public, private, rerank=rr, chunk_size=5, query_chunk=3
    )
    assert res['num_index'] == 16
    for name in ('public', 'private'):
      assert res[name]['map@100'] == pytest.approx(want[name], abs=1e-12)
      # 3 relevant among 100: P@100 = 3/100 for a present query.
      assert res[name]['mp@100'] == pytest.approx(want[name] * 0.03, abs=1e-12)


def test_ranked_lists_are_the_heads_of_the_full_rankings():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((300, 16)).astype(np.float32)
  q = rng.standard_normal((7, 16)).astype(np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  plain = gldv2_eval.ranked_lists(q, x, k=20, chunk_size=64, query_chunk=3)
  np.testing.assert_array_equal(plain, search.full_ranks(search.similarity_matrix(q, x, 64))[:20].T)
  for m in (8, 40):  # re-ranked heads shorter and longer than k
    got = gldv2_eval.ranked_lists(
      q, x, k=20, rerank={'M': m, 'K': 3, 'beta': 0.15}, chunk_size=64, query_chunk=3
    )
    full = rerank.superglobal(q, x, M=m, K=3, beta=0.15, chunk_size=64)
    np.testing.assert_array_equal(got, full[:20].T)


def test_evaluate_prepared_end_to_end(built):
  """Extraction from the stored images (stand-in model) + scoring equals a brute-force ranking
  of the same descriptors scored by the official-semantics metric."""
  import jax.numpy as jnp
  from dolg_jax.retrieval import extract, metrics

  data_dir, _ = built
  w = jnp.asarray(np.random.default_rng(5).standard_normal((6, 8)), jnp.float32)

  def apply(v, images):
    x = images.astype(jnp.float32) / 255.0
    ramp = jnp.linspace(-1.0, 1.0, images.shape[2])[None, None, :, None]
    return jnp.concatenate([x.mean((1, 2)), (x * ramp).mean((1, 2))], -1) @ v

  extractor = extract.Extractor(apply, w, extract_config(scales=(1.0,), batch_size=4))
  res = gldv2_eval.evaluate_prepared(extractor, data_dir)
  q, q_ids = gldv2_eval.split_descriptors(extractor, data_dir, 'test')
  x, x_ids = gldv2_eval.split_descriptors(extractor, data_dir, 'index')
  public, private, _ = gldv2_retrieval.load_solution(data_dir)
  order = np.argsort(-(q.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind='stable')
  preds = {t: [x_ids[j] for j in row] for t, row in zip(q_ids, order)}
  for name, sol in (('public', public), ('private', private)):
    p = {t: v for t, v in preds.items() if t in sol}
    assert res[name]['map@100'] == pytest.approx(metrics.gldv2_map_at_k(p, sol), abs=1e-12)
    assert res[name]['num_predicted'] == len(p) and res[name]['num_queries'] == 4
  assert 0 < res['public']['map@100'] + res['private']['map@100'] < 2
