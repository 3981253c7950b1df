"""python -m dolg_jax.serve: the real server on a free port over one small index (one server for
the module): answers equal the search library's, micro-batching, every bad input answered 4xx
JSON, the token, no CORS, images by id only, the page in headless Chromium, reload of a grown
index, and a clean stop on SIGTERM."""

import concurrent.futures
import os
import shutil

import numpy as np
import pytest
import requests

from tests.helpers import collection_testlib as ctl
from tests.helpers import serve_testlib as stl

TOKEN = 'SECRET'
AUTH = {'Authorization': f'Bearer {TOKEN}'}
CHROMIUM = '/usr/bin/chromium'


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  env = stl.build_index(str(tmp_path_factory.mktemp('serve')))
  server = stl.Server(
    f'--index={env["index"]}', f'--token={TOKEN}', '--max_upload_mb=1', '--watch_s=0.3'
  )
  env['server'], env['url'] = server, server.url
  yield env
  server.stop()


@pytest.fixture(scope='module')
def collection(served):
  from dolg_jax.collection import query

  return query.Collection(served['index'])


def post(served, files=None, data=None, json=None, headers=AUTH, **kw):
  return requests.post(
    served['url'] + '/api/search',
    files=files,
    data=data,
    json=json,
    headers=headers,
    timeout=120,
    **kw,
  )


def upload(served, rel):
  with open(os.path.join(served['images'], rel), 'rb') as f:
    return (os.path.basename(rel), f.read())


def test_search_equals_the_search_library(served, collection):
  q = ['img00.jpg', 'a/img05.PNG']
  r = post(served, files=[('image', upload(served, p)) for p in q], data={'k': '5'})
  assert r.status_code == 200, r.text
  got = r.json()
  assert got['index'] == served['index']
  want = collection.search_images([os.path.join(served['images'], p) for p in q], k=5)
  for qname, qres, w in zip(q, got['queries'], want):
    assert qres['query'] == os.path.basename(qname)
    assert [h['path'] for h in qres['results']] == [p for p, _ in w]
    assert [collection.paths[h['id']] for h in qres['results']] == [p for p, _ in w]
    np.testing.assert_allclose([h['score'] for h in qres['results']], [s for _, s in w], atol=1e-5)
  assert got['queries'][0]['results'][0]['path'] == 'img00.jpg'
  # A box, and SuperGlobal re-ranking.
  box = (10, 5, 40, 50)
  r = post(
    served,
    files={'image': upload(served, 'img02.png')},
    data={'k': '4', 'box': ','.join(map(str, box)), 'rerank': 'superglobal'},
  )
  assert r.status_code == 200, r.text
  want = collection.search_images(
    [os.path.join(served['images'], 'img02.png')], [box], k=4, rerank='superglobal'
  )[0]
  res = r.json()['queries'][0]['results']
  assert [h['path'] for h in res] == [p for p, _ in want]
  np.testing.assert_allclose([h['score'] for h in res], [s for _, s in want], atol=1e-5)


def test_descriptors_as_json(served, collection):
  q = collection.rows.take(np.asarray([3, 7]))
  r = post(served, json={'descriptors': q.tolist(), 'k': 3})
  assert r.status_code == 200, r.text
  scores, ids = collection.search_descriptors(q, 3)
  for qres, s, i in zip(r.json()['queries'], scores, ids):
    assert [h['id'] for h in qres['results']] == i.tolist()
    np.testing.assert_allclose([h['score'] for h in qres['results']], s, atol=1e-6)
  assert r.json()['queries'][0]['results'][0]['id'] == 3


def test_concurrent_requests_share_device_calls(served):
  names = [rel for rel, _ in ctl.IMAGES[:8]]
  alone = {
    n: post(served, files={'image': upload(served, n)}, data={'k': '3'}).json() for n in names[:2]
  }
  with concurrent.futures.ThreadPoolExecutor(8) as ex:
    answers = list(
      ex.map(lambda n: post(served, files={'image': upload(served, n)}, data={'k': '3'}), names * 2)
    )
  assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
  for n, a in zip(names * 2, answers):
    assert a.json()['queries'][0]['results'][0]['path'] == n
    if n in alone:
      np.testing.assert_allclose(
        [h['score'] for h in a.json()['queries'][0]['results']],
        [h['score'] for h in alone[n]['queries'][0]['results']],
        atol=1e-5,
      )
  metrics = requests.get(served['url'] + '/metrics', timeout=30).text
  count = _metric(metrics, 'dolg_batch_images_count')
  images = _metric(metrics, 'dolg_batch_images_sum')
  assert images > count, f'no device call held two requests:\n{metrics}'
  for name in (
    'dolg_requests_total{route="/api/search",status="200"}',
    'dolg_queue_depth',
    'dolg_request_seconds_bucket{route="/api/search",le="+Inf"}',
  ):
    assert name in metrics


def _metric(text, name):
  return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + ' ')))


def _chunked_multipart():
  yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.jpg"\r\n\r\n'
  for _ in range(40):
    yield b'x' * 65536


def test_bad_input_is_a_4xx_json_naming_the_problem(served, collection):
  dim = collection.rows.dim
  jpeg = upload(served, 'img00.jpg')[1]
  bomb = ctl.png_bomb()
  assert len(bomb) < 200_000
  peak_before = _peak_kb(served)
  one = lambda name, data, **fields: post(served, files={'image': (name, data)}, data=fields)
  cases = {
    'text file': (one('notes.jpg', b'this is text, not an image'), 400, 'not a decodable'),
    'truncated JPEG': (one('half.jpg', jpeg[: len(jpeg) // 2]), 400, 'truncated'),
    'empty upload': (one('empty.jpg', b''), 400, 'empty'),
    'PNG bomb': (one('bomb.png', bomb), 413, 'too many pixels'),
    'body over max_upload_mb': (one('big.jpg', b'\xff' * (1 << 20) + jpeg), 413, 'max_upload_mb'),
    'chunked body over max_upload_mb': (
      post(
        served,
        data=_chunked_multipart(),
        headers=dict(AUTH, **{'Content-Type': 'multipart/form-data; boundary=b'}),
      ),
      413,
      'max_upload_mb',
    ),
    'box outside': (one('q.jpg', jpeg, box='0,0,500,500'), 400, 'outside the image'),
    'box not four numbers': (one('q.jpg', jpeg, box='1,2,3'), 400, 'TOP,LEFT,HEIGHT,WIDTH'),
    'k = 0': (one('q.jpg', jpeg, k='0'), 400, 'k must be'),
    'k < 0': (one('q.jpg', jpeg, k='-3'), 400, 'k must be'),
    'k over the limit': (one('q.jpg', jpeg, k='100000'), 400, 'k must be'),
    'k not a number': (one('q.jpg', jpeg, k='ten'), 400, 'k must be'),
    'unknown reranker': (one('q.jpg', jpeg, rerank='magic'), 400, 'rerank'),
    'no image': (post(served, data={'k': '3'}, files={'other': ('x', b'1')}), 400, 'no image'),
    'image not a file': (post(served, files={'k': (None, '3')}, data={'image': 'x'}), 400, 'file'),
    'wrong content type': (
      post(served, data='hello', headers=dict(AUTH, **{'Content-Type': 'text/plain'})),
      415,
      'multipart',
    ),
    'descriptor width': (post(served, json={'descriptors': [[1.0, 0.0]]}), 400, 'descriptors'),
    'descriptor not unit': (post(served, json={'descriptors': [[0.5] * dim]}), 400, 'unit'),
    'descriptor NaN': (
      post(
        served,
        data='{"descriptors": [[%s]]}' % ', '.join(['NaN'] * dim),
        headers=dict(AUTH, **{'Content-Type': 'application/json'}),
      ),
      400,
      'finite',
    ),
    'descriptors not numbers': (post(served, json={'descriptors': 'abc'}), 400, 'descriptors'),
    'JSON not JSON': (
      post(served, data='{', headers=dict(AUTH, **{'Content-Type': 'application/json'})),
      400,
      'JSON',
    ),
    'unknown id': (
      requests.get(served['url'] + '/api/image/999999', headers=AUTH),
      404,
      'no image with id',
    ),
    'id not a number': (
      requests.get(served['url'] + '/api/image/abc', headers=AUTH),
      404,
      'integer',
    ),
    'a path as id': (
      requests.get(served['url'] + '/api/image/..%2F..%2Fetc%2Fpasswd', headers=AUTH),
      404,
      'not found',
    ),
  }
  wrong = {}
  for name, (r, status, words) in cases.items():
    body = r.json() if r.headers.get('content-type', '').startswith('application/json') else {}
    if r.status_code != status or words.lower() not in str(body.get('error', '')).lower():
      wrong[name] = (r.status_code, r.text[:300])
  assert not wrong, wrong
  assert requests.get(served['url'] + '/healthz', timeout=30).status_code == 200  # still alive
  # The bomb is refused from its header: decoded, its 400M pixels would add > 380 MiB to the peak.
  grown = _peak_kb(served) - peak_before
  assert grown < 256 << 10, f'peak memory grew by {grown} kB over the bad requests'


def _peak_kb(served) -> int:
  """The server process's peak resident memory (VmHWM), kB."""
  with open(f'/proc/{served["server"].proc.pid}/status') as f:
    return int(next(line.split()[1] for line in f if line.startswith('VmHWM')))


def test_token_cors_and_security_headers(served):
  url = served['url']
  assert requests.get(url + '/api/info', timeout=30).status_code == 401
  assert (
    requests.get(
      url + '/api/info', headers={'Authorization': 'Bearer nope'}, timeout=30
    ).status_code
    == 401
  )
  r = requests.post(url + '/api/search', files={'image': upload(served, 'img00.jpg')}, timeout=30)
  assert r.status_code == 401 and 'Bearer' in r.json()['error']
  assert requests.get(url + '/api/image/0', timeout=30).status_code == 401
  assert requests.get(url + '/healthz', timeout=30).status_code == 200  # health is not /api
  r = requests.get(url + '/api/info', headers=dict(AUTH, Origin='http://evil.example'), timeout=30)
  assert r.status_code == 200
  assert not any(h.lower().startswith('access-control-') for h in r.headers)
  r = requests.options(
    url + '/api/search',
    headers={'Origin': 'http://evil.example', 'Access-Control-Request-Method': 'POST'},
    timeout=30,
  )
  assert not any(h.lower().startswith('access-control-') for h in r.headers)
  page = requests.get(url + '/', timeout=30)
  assert page.status_code == 200 and "default-src 'none'" in page.headers['content-security-policy']
  assert 'http://' not in page.text and 'https://' not in page.text  # no external assets
  assert 'innerHTML' not in page.text
  spec = requests.get(url + '/openapi.json', timeout=30).json()
  assert '/api/search' in spec['paths'] and '/api/image/{row}' in spec['paths']


def test_images_by_id_only(served, collection):
  row = collection.paths.index('img02.png')
  r = requests.get(f'{served["url"]}/api/image/{row}', headers=AUTH, timeout=30)
  with open(os.path.join(served['images'], 'img02.png'), 'rb') as f:
    assert r.status_code == 200 and r.content == f.read()
  assert r.headers['content-type'] == 'image/png'
  row = collection.paths.index('c/img10.tif')  # not a web format: sent as PNG
  r = requests.get(f'{served["url"]}/api/image/{row}?thumb=1', headers=AUTH, timeout=30)
  assert r.status_code == 200 and r.headers['content-type'] == 'image/jpeg'
  assert r.content[:3] == b'\xff\xd8\xff'


def test_page_in_headless_chromium(served, collection):
  from playwright import sync_api  # requirements-test.txt

  if not os.path.exists(CHROMIUM):
    pytest.skip(f'{CHROMIUM} is absent (apt-get install chromium)')
  dialogs = []
  with sync_api.sync_playwright() as p:
    browser = p.chromium.launch(
      executable_path=CHROMIUM,
      args=[
        '--no-sandbox',
        '--disable-gpu',
        '--disable-background-networking',
        '--disable-component-update',
      ],
    )
    try:
      # The page's CSP forbids eval, which Playwright's wait_for_function needs.
      page = browser.new_page(viewport={'width': 1280, 'height': 800}, bypass_csp=True)
      page.on('dialog', lambda d: (dialogs.append(d.message), d.dismiss()))
      page.add_init_script(f'sessionStorage.setItem("dolg_token", "{TOKEN}")')
      page.goto(served['url'] + '/')
      page.fill('#k', '8')
      page.set_input_files('#file', os.path.join(served['images'], 'img00.jpg'))
      page.wait_for_function('document.querySelectorAll(".hit img[src^=blob]").length === 8')
      first = page.locator('.hit').first
      assert first.get_attribute('data-path') == 'img00.jpg'
      # The README's screenshot: DOLG_SCREENSHOT=docs/serve_page.png python -m pytest ... -k page
      shot = os.environ.get('DOLG_SCREENSHOT') or os.path.join(served['images'], '..', 'page.png')
      page.screenshot(path=shot)
      assert os.path.getsize(shot) > 10_000  # a rendered page, not a blank one
      # Clicking a result searches with it.
      second = page.locator('.hit').nth(1)
      path = second.get_attribute('data-path')
      second.click()
      page.wait_for_function(
        'p => document.getElementById("qname").textContent === p &&'
        ' document.querySelector(".hit").dataset.path === p',
        arg=path,
      )
      # A file named like HTML is shown as text.
      page.set_input_files('#file', os.path.join(served['images'], stl.XSS_NAME))
      page.wait_for_function(
        'n => document.querySelector(".hit") && document.querySelector(".hit").dataset.path === n',
        arg=stl.XSS_NAME,
      )
      assert page.locator('.hit .path').first.text_content() == stl.XSS_NAME
      assert page.locator('img[src="x"]').count() == 0 and not dialogs
      # A text file: the error is shown in the page.
      page.set_input_files(
        '#file',
        files=[{'name': 'notes.jpg', 'mimeType': 'image/jpeg', 'buffer': b'not an image at all'}],
      )
      page.wait_for_selector('#error', state='visible')
      assert 'not a decodable image' in page.text_content('#error')
    finally:
      browser.close()


def test_reload_picks_up_added_images_then_sigterm_stops_cleanly(served):
  url, server = served['url'], served['server']
  before = requests.get(url + '/healthz', timeout=30).json()['images']
  ctl.add_later(served['images'])
  proc = ctl.run(ctl.index_cmd(served['ckpt'], served['images'], served['index'], served['cache']))
  assert proc.returncode == 0, ctl.explain(proc)
  got = before
  for _ in range(300):  # the watcher polls every 0.3 s
    got = requests.get(url + '/healthz', timeout=30).json()['images']
    if got == before + len(ctl.LATER):
      break
    import time

    time.sleep(0.1)
  assert got == before + len(ctl.LATER), server.output()[-3000:]
  r = post(served, files={'image': upload(served, ctl.LATER[0][0])}, data={'k': '2'})
  assert r.json()['queries'][0]['results'][0]['path'] == ctl.LATER[0][0]
  r = requests.post(url + '/api/reload', headers=AUTH, timeout=120)
  assert r.status_code == 200 and r.json()['images'] == got, r.text
  # A broken index is refused and the old one stays served.
  shutil.copy(os.path.join(served['index'], 'faiss.index'), os.path.join(served['index'], 'x'))
  with open(os.path.join(served['index'], 'faiss.index'), 'r+b') as f:
    f.seek(100)
    f.write(b'\x00\x01\x02\x03')
  r = requests.post(url + '/api/reload', headers=AUTH, timeout=120)
  assert r.status_code == 409 and 'damaged' in r.json()['error'], r.text
  assert requests.get(url + '/healthz', timeout=30).json()['images'] == got
  os.replace(os.path.join(served['index'], 'x'), os.path.join(served['index'], 'faiss.index'))
  assert server.stop() == 0, server.output()[-3000:]
  assert 'stopped' in server.output()
