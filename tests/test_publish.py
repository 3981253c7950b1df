"""python -m dolg_jax.publish into milvus-lite and `serve --backend=milvus`: a killed publish
resumes without duplicates, the service answers the same top k as FAISS exact search, a
collection from another index is refused (--replace rebuilds it)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests

from tests.helpers import collection_testlib as ctl
from tests.helpers import serve_testlib as stl
from tests.helpers.paths import REPO


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  return stl.build_index(str(tmp_path_factory.mktemp('publish')))


def publish_cmd(index, uri, *extra):
  return [
    sys.executable,
    '-m',
    'dolg_jax.publish',
    f'--index={index}',
    f'--milvus_uri={uri}',
    '--milvus_collection=photos',
    *extra,
  ]


_IDS = """
import json, sys
from pymilvus import MilvusClient
cl = MilvusClient(sys.argv[1])
cl.load_collection(sys.argv[2])
rows = cl.query(sys.argv[2], filter='id >= 0', output_fields=['id'], limit=16384)
print(json.dumps(sorted(int(r['id']) for r in rows)))
"""


def _ids(uri, name='photos'):
  """The collection's ids, read by another process (milvus-lite locks its file per process)."""
  proc = ctl.run([sys.executable, '-c', _IDS, uri, name])
  assert proc.returncode == 0, ctl.explain(proc)
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def published(env):
  """Publish one row per batch, kill -9 after three batches, publish again."""
  uri = os.path.join(os.path.dirname(env['index']), 'milvus.db')
  proc = subprocess.Popen(
    publish_cmd(env['index'], uri, '--batch_rows=1'),
    cwd=REPO,
    env=ctl.env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if sum(l.startswith('batch ') for l in lines) == 3:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(60)
  assert proc.returncode == -signal.SIGKILL, ''.join(lines)
  env['killed_output'] = ''.join(lines)
  env['uri'] = uri
  proc = ctl.run(publish_cmd(env['index'], uri, '--batch_rows=4'))
  assert proc.returncode == 0, ctl.explain(proc)
  env['resumed_output'] = proc.stdout
  return env


def test_killed_publish_resumes_without_duplicates(published):
  from dolg_jax.collection import store

  n = len(store.Rows(store.IndexStore(published['index'])))
  assert f'published {n} rows' in published['resumed_output'], published['resumed_output']
  assert f'({n} new)' not in published['resumed_output']  # the first batches were kept
  assert _ids(published['uri']) == list(range(n))
  manifest = json.load(open(os.path.join(published['index'], 'manifest.json')))
  entry = manifest['milvus']['photos']
  assert entry['rows'] == n and entry['recall_at_100'] == 1.0
  proc = ctl.run(publish_cmd(published['index'], published['uri']))  # idempotent
  assert proc.returncode == 0 and '(0 new)' in proc.stdout, ctl.explain(proc)
  assert _ids(published['uri']) == list(range(n))


def test_serve_milvus_equals_faiss_exact(published):
  from dolg_jax.collection import query

  col = query.Collection(published['index'])
  server = stl.Server(
    f'--index={published["index"]}',
    '--backend=milvus',
    f'--milvus_uri={published["uri"]}',
    '--milvus_collection=photos',
    '--watch_s=0',
  )
  try:
    q = col.rows.take(np.arange(len(col)))
    r = requests.post(
      server.url + '/api/search', json={'descriptors': q.tolist()[:8], 'k': 5}, timeout=60
    )
    assert r.status_code == 200, r.text
    scores, ids = col.search_descriptors(q[:8], 5)
    for got, s, i in zip(r.json()['queries'], scores, ids):
      assert [h['id'] for h in got['results']] == i.tolist()
      np.testing.assert_allclose([h['score'] for h in got['results']], s, atol=1e-5)
    path = os.path.join(published['images'], 'a/img06.jpg')
    with open(path, 'rb') as f:
      r = requests.post(
        server.url + '/api/search',
        files={'image': ('img06.jpg', f.read())},
        data={'k': '6', 'rerank': 'superglobal'},
        timeout=60,
      )
    assert r.status_code == 200, r.text
    want = col.search_images([path], k=6, rerank='superglobal')[0]
    assert [h['path'] for h in r.json()['queries'][0]['results']] == [p for p, _ in want]
  finally:
    assert server.stop() == 0, server.output()[-3000:]


def test_another_index_is_refused_and_replace_rebuilds(published, tmp_path):
  from dolg_jax import publish
  from dolg_jax.collection import store
  from pymilvus import MilvusClient

  uri = str(tmp_path / 'other.db')
  publish.publish(published['index'], uri, 'photos', batch_rows=100)
  cl = MilvusClient(uri)
  cl.alter_collection_properties(
    'photos',
    properties={'dolg_jax.identity': json.dumps({'fingerprint': {'model': 'other'}, 'dim': 16})},
  )
  cl.close()
  with pytest.raises(store.IndexMismatchError, match='another index'):
    publish.publish(published['index'], uri, 'photos')
  out = publish.publish(published['index'], uri, 'photos', replace=True)
  assert out['inserted'] == out['rows']
