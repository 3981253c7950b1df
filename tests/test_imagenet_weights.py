"""dolg_jax.weights.imagenet: names -> URLs, download once, verify, fail cleanly; training logs it.

Checkpoints are generated (tiny ResNets in the pycls and torchvision key layouts) and served by a
threaded http.server on 127.0.0.1; nothing leaves the machine.
"""

import hashlib
import http.server
import importlib
import io
import json
import os
import socket
import struct
import threading

import jax
import numpy as np
import pytest
import torch

from dolg_jax import models
from dolg_jax.weights import architecture
from dolg_jax.weights import backbone as backbone_lib
from dolg_jax.weights import torch_format
from dolg_jax.training import state as state_lib
from dolg_jax.weights import imagenet

from tests.helpers import train_testlib as tl

TINY_WIDTH, TINY_DEPTHS = 8, (1, 1, 1, 1)  # configs/tiny.py's backbone


# ------------------------------------------------------------------------- generated checkpoints
def _model_cfg(width=TINY_WIDTH, stage_depths=TINY_DEPTHS):
  cfg = architecture.default_model_config()
  cfg.width, cfg.stage_depths = width, stage_depths
  cfg.local_dim = cfg.global_dim = 16 * width
  return cfg


def _backbone_state_dict(layout: str, seed: int = 0) -> dict:
  """A pycls- or torchvision-keyed state dict of configs/tiny.py's ResNet, with its classifier."""
  rng = np.random.default_rng(seed)
  sd = {}
  for path, shape in architecture.expected_shapes(_model_cfg()).items():
    if path[1] != 'globalmodel':
      continue
    key = torch_format.flax_path_to_torch(path)[len('globalmodel.') :]
    if len(shape) == 4:
      shape = (shape[3], shape[2], shape[0], shape[1])  # HWIO -> OIHW
    value = rng.uniform(0.5, 1.5, shape) if path[-1] == 'var' else rng.normal(0, 0.1, shape)
    sd[key] = torch.tensor(value, dtype=torch.float32)
    if path[-1] == 'var':
      sd[key.replace('running_var', 'num_batches_tracked')] = torch.tensor(7)
  if layout == 'torchvision':
    sd = {backbone_lib.pycls_to_torchvision_key(k): v for k, v in sd.items()}
    sd['fc.weight'], sd['fc.bias'] = torch.zeros(10, 16 * TINY_WIDTH), torch.zeros(10)
    return sd
  sd['head.fc.weight'], sd['head.fc.bias'] = torch.zeros(10, 16 * TINY_WIDTH), torch.zeros(10)
  return {'epoch': 100, 'model_state': sd}


def _torch_bytes(obj) -> bytes:
  buf = io.BytesIO()
  torch.save(obj, buf)
  return buf.getvalue()


@pytest.fixture(scope='module')
def checkpoints():
  pycls = _torch_bytes(_backbone_state_dict('pycls'))
  tv = _torch_bytes(_backbone_state_dict('torchvision'))
  return {'pycls': pycls, 'torchvision': tv, 'tv_prefix': hashlib.sha256(tv).hexdigest()[:8]}


# ----------------------------------------------------------------------------------- the server
class _Handler(http.server.BaseHTTPRequestHandler):
  files: dict = {}  # path -> bytes
  # path -> 'truncate' (close mid-body) | 'reset' (RST mid-body) | 'nolength' | 'chunked'
  modes: dict = {}
  hits: dict = {}

  def do_GET(self):
    self.hits[self.path] = self.hits.get(self.path, 0) + 1
    data = self.files.get(self.path)
    if data is None:
      self.send_error(404, 'Not Found')
      return
    mode = self.modes.get(self.path, 'ok')
    self.send_response(200)
    self.send_header('Content-Type', 'application/octet-stream')
    if mode == 'chunked':  # No Content-Length: HTTP/1.1 chunks mark the end.
      self.protocol_version = 'HTTP/1.1'
      self.send_header('Transfer-Encoding', 'chunked')
      self.end_headers()
      for i in range(0, len(data), 1 << 16):
        piece = data[i : i + (1 << 16)]
        self.wfile.write(b'%x\r\n%s\r\n' % (len(piece), piece))
      self.wfile.write(b'0\r\n\r\n')
      self.close_connection = True
      return
    if mode != 'nolength':
      self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data[: len(data) // 2] if mode in ('truncate', 'reset') else data)
    self.wfile.flush()
    self.close_connection = True
    if mode == 'reset':  # Abort the connection: the client sees ECONNRESET.
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
      self.connection.close()

  def log_message(self, *args):
    pass


@pytest.fixture(scope='module')
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  httpd.handle_error = lambda request, address: None  # The 'reset' mode's closed socket.
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  base = f'http://127.0.0.1:{httpd.server_address[1]}'

  class Server:
    url = base
    handler = _Handler

    def serve(self, path, data, mode='ok'):
      _Handler.files[path] = data
      _Handler.modes[path] = mode
      return base + path

    def hits(self, path):
      return _Handler.hits.get(path, 0)

  yield Server()
  httpd.shutdown()
  httpd.server_close()


def _table(url: str, depth: int = 50):
  return {'pycls_r50': imagenet.Backbone(url, depth, 'pycls')}


def _listing(directory) -> list[str]:
  return sorted(os.listdir(directory)) if os.path.isdir(directory) else []


# ------------------------------------------------------------------------------------- tests
def test_published_names_urls_and_checksums():
  b = imagenet.BACKBONES
  assert b['pycls_r101'].url == (
    'https://dl.fbaipublicfiles.com/pycls/dds_baselines/161167170/R-101-1x64d_dds_8gpu.pyth'
  )
  assert b['pycls_r50'].url == (
    'https://dl.fbaipublicfiles.com/pycls/dds_baselines/161235311/R-50-1x64d_dds_8gpu.pyth'
  )
  assert b['torchvision_r50'].url == 'https://download.pytorch.org/models/resnet50-0676ba61.pth'
  assert b['torchvision_r101'].url == 'https://download.pytorch.org/models/resnet101-63fe2227.pth'
  assert [b[n].sha256_prefix for n in ('pycls_r50', 'pycls_r101')] == [None, None]
  assert b['torchvision_r50'].sha256_prefix == '0676ba61'
  assert b['torchvision_r101'].sha256_prefix == '63fe2227'
  assert [b[n].depth for n in b] == [50, 101, 50, 101]


def test_pycls_download_records_sha256_and_every_later_use_verifies_it(
  server, checkpoints, tmp_path
):
  data = checkpoints['pycls']
  url = server.serve('/dds/1/R-50-1x64d_dds_8gpu.pyth', data)
  cache = tmp_path / 'cache'
  r = imagenet.resolve('pycls_r50', cache_dir=str(cache), table=_table(url), progress=False)
  sha = hashlib.sha256(data).hexdigest()
  assert r.downloaded and r.sha256 == sha and r.url == url and r.name == 'pycls_r50'
  assert r.path == str(cache / 'R-50-1x64d_dds_8gpu.pyth')
  assert open(r.path, 'rb').read() == data
  assert _listing(cache) == ['R-50-1x64d_dds_8gpu.pyth', 'R-50-1x64d_dds_8gpu.pyth.sha256']
  assert open(r.path + '.sha256').read() == f'{sha}  R-50-1x64d_dds_8gpu.pyth\n'  # sha256sum -c
  assert 'recorded' in r.verification and r.record()['sha256'] == sha
  # The loader reads it (pycls layout, classifier ignored) and it fits configs/tiny.py's model.
  bb = backbone_lib.load_backbone(r.path)
  assert set(bb['params']['globalmodel']) == {'stem', 's1', 's2', 's3', 's4'}
  tiny_vars = jax.eval_shape(
    models.build_model(_model_cfg()).init, jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)
  )
  assert state_lib.uncovered_backbone_leaves(tiny_vars, bb) == []
  # Second use: no request, the recorded digest is checked.
  hits = server.hits('/dds/1/R-50-1x64d_dds_8gpu.pyth')
  again = imagenet.resolve('pycls_r50', cache_dir=str(cache), table=_table(url), progress=False)
  assert not again.downloaded and again.sha256 == sha and again.path == r.path
  assert 'recorded in R-50-1x64d_dds_8gpu.pyth.sha256' in again.verification
  assert server.hits('/dds/1/R-50-1x64d_dds_8gpu.pyth') == hits
  # A cached file that changed is refused, naming the file and the fix.
  with open(r.path, 'r+b') as f:
    f.seek(100)
    f.write(b'\x00\x01\x02')
  with pytest.raises(
    imagenet.ChecksumError,
    match=r'differs from .* recorded at the first '
    r'download .* delete it',
  ):
    imagenet.resolve('pycls_r50', cache_dir=str(cache), table=_table(url), progress=False)


def test_torchvision_name_prefix_is_checked(server, checkpoints, tmp_path):
  data, prefix = checkpoints['torchvision'], checkpoints['tv_prefix']
  url = server.serve(f'/models/resnet-tiny-{prefix}.pth', data)
  cache = tmp_path / 'cache'
  r = imagenet.resolve(url, cache_dir=str(cache), progress=False)  # A URL as the spec.
  assert r.sha256.startswith(prefix) and r.downloaded
  assert f'published prefix {prefix}' in r.verification
  bb = backbone_lib.load_backbone(r.path)
  np.testing.assert_array_equal(
    bb['params']['globalmodel']['stem']['conv']['kernel'],
    torch.load(io.BytesIO(data))['conv1.weight'].numpy().transpose(2, 3, 1, 0),
  )  # RGB, as is
  again = imagenet.resolve(url, cache_dir=str(cache), progress=False)
  assert not again.downloaded and f'published prefix {prefix}' in again.verification
  # Wrong published prefix: refused, and nothing at all is left in the cache.
  bad = server.serve('/models/resnet-tiny-00000000.pth', data)
  cache2 = tmp_path / 'cache2'
  with pytest.raises(
    imagenet.ChecksumError, match=r"name says it starts with 00000000; nothing was kept"
  ):
    imagenet.resolve(bad, cache_dir=str(cache2), progress=False)
  assert _listing(cache2) == []


def test_redownload_must_match_the_recorded_sha256(server, checkpoints, tmp_path):
  path = '/dds/2/R-50-1x64d_dds_8gpu.pyth'
  url = server.serve(path, checkpoints['pycls'])
  cache = tmp_path / 'cache'
  first = imagenet.resolve(url, cache_dir=str(cache), progress=False)
  os.remove(first.path)  # The file goes, its record stays.
  server.serve(path, checkpoints['torchvision'])  # The publisher's file changed.
  with pytest.raises(imagenet.ChecksumError, match='not .* as recorded at the first download'):
    imagenet.resolve(url, cache_dir=str(cache), progress=False)
  assert _listing(cache) == ['R-50-1x64d_dds_8gpu.pyth.sha256']


def test_interrupted_transfer_leaves_nothing_and_a_stale_part_is_never_used(
  server, checkpoints, tmp_path
):
  path = '/dds/3/R-50-1x64d_dds_8gpu.pyth'
  data = checkpoints['pycls']
  url = server.serve(path, data, mode='truncate')  # Server closes mid-body.
  cache = tmp_path / 'cache'
  with pytest.raises(
    imagenet.DownloadError,
    match=rf'interrupted: received {len(data) // 2} of {len(data)} bytes; '
    r'nothing was kept',
  ):
    imagenet.resolve(url, cache_dir=str(cache), progress=False)
  assert _listing(cache) == []
  server.serve(path, data, mode='reset')
  with pytest.raises(imagenet.DownloadError, match=r'interrupted.*nothing was kept'):
    imagenet.resolve(url, cache_dir=str(cache), progress=False)
  assert _listing(cache) == []
  # No Content-Length (and not chunked): a cut could not be detected, so it is refused.
  server.serve(path, data, mode='nolength')
  with pytest.raises(imagenet.DownloadError, match='states no Content-Length'):
    imagenet.resolve(url, cache_dir=str(cache), progress=False)
  assert _listing(cache) == []
  # A process killed mid-transfer leaves its temporary file; it is never read.
  (cache / '.R-50-1x64d_dds_8gpu.pyth.k1ll3d.part').write_bytes(data[:1000])
  server.serve(path, data)
  r = imagenet.resolve(url, cache_dir=str(cache), progress=True)  # Progress bar path too.
  assert r.downloaded and open(r.path, 'rb').read() == data


@pytest.mark.parametrize('mode', ['ok', 'chunked'])
def test_download_prints_whole_progress_lines(server, tmp_path, capsys, mode):
  data = os.urandom(3 << 20)
  url = server.serve(f'/progress/{mode}/w.pyth', data, mode=mode)
  digest = imagenet.download(url, str(tmp_path / 'w.pyth'), progress=True)
  assert digest == hashlib.sha256(data).hexdigest() and _listing(tmp_path) == ['w.pyth']
  lines = capsys.readouterr().err.splitlines()
  assert lines and all(line.startswith('w.pyth: ') for line in lines) and '\r' not in ''.join(lines)
  # The last line is the whole file: its size and 100% where the server states it.
  assert lines[-1].startswith('w.pyth: 3.00MB/3.00MB 100% ' if mode == 'ok' else 'w.pyth: 3.00MB ')


def test_offline_and_http_errors_say_where_to_put_the_file(server, tmp_path):
  with socket.socket() as s:  # A port nobody listens on.
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  url = f'http://127.0.0.1:{port}/pycls/R-101-1x64d_dds_8gpu.pyth'
  cache = tmp_path / 'cache'
  with pytest.raises(imagenet.OfflineError) as e:
    imagenet.resolve(
      'pycls_r101',
      cache_dir=str(cache),
      table={'pycls_r101': imagenet.Backbone(url, 101, 'pycls')},
      progress=False,
    )
  msg = str(e.value)
  assert '\n' not in msg
  assert url in msg and 'R-101-1x64d_dds_8gpu.pyth' in msg
  assert f'put it at {cache / "R-101-1x64d_dds_8gpu.pyth"}' in msg
  assert 'DOLG_JAX_WEIGHTS_CACHE' in msg and 'backbone_init to its path' in msg
  assert _listing(cache) == []
  with pytest.raises(imagenet.OfflineError, match='HTTP 404'):
    imagenet.resolve(server.url + '/missing/R-50.pyth', cache_dir=str(cache), progress=False)
  assert _listing(cache) == []


def test_file_placed_by_hand_is_used_without_a_request(checkpoints, tmp_path, monkeypatch):
  cache = tmp_path / 'by_hand'
  cache.mkdir()
  (cache / 'R-101-1x64d_dds_8gpu.pyth').write_bytes(checkpoints['pycls'])
  monkeypatch.setenv(imagenet.ENV_CACHE_DIR, str(cache))  # Found through the env variable.
  url = 'http://127.0.0.1:9/never/R-101-1x64d_dds_8gpu.pyth'  # Would fail if requested.
  r = imagenet.resolve(
    'pycls_r101', table={'pycls_r101': imagenet.Backbone(url, 101, 'pycls')}, progress=False
  )
  assert not r.downloaded and r.sha256 == hashlib.sha256(checkpoints['pycls']).hexdigest()
  assert 'recorded at first use' in r.verification
  assert (cache / 'R-101-1x64d_dds_8gpu.pyth.sha256').exists()


def test_cache_dir_precedence(tmp_path, monkeypatch):
  monkeypatch.delenv(imagenet.ENV_CACHE_DIR, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert imagenet.resolve_cache_dir('') == str(tmp_path / 'home/.cache/dolg_jax/weights')
  monkeypatch.setenv(imagenet.ENV_CACHE_DIR, str(tmp_path / 'env'))
  assert imagenet.resolve_cache_dir('') == str(tmp_path / 'env')
  assert imagenet.resolve_cache_dir(str(tmp_path / 'cfg')) == str(tmp_path / 'cfg')


def test_specs_none_local_and_errors(checkpoints, tmp_path):
  none = imagenet.resolve('none')
  assert none.path is None and none.record()['source'] == 'random initialisation'
  assert 'random initialisation' in none.describe()
  local = tmp_path / 'mine.pyth'
  local.write_bytes(checkpoints['pycls'])
  r = imagenet.resolve(str(local))
  assert r.path == str(local) and r.sha256 == hashlib.sha256(checkpoints['pycls']).hexdigest()
  with pytest.raises(imagenet.WeightsError, match="backbone_init is empty.*'none'"):
    imagenet.resolve('')
  with pytest.raises(imagenet.WeightsError, match="'pycls_r5': not a backbone name"):
    imagenet.resolve('pycls_r5')
  # A named backbone that does not fit the model fails before any download.
  cfg = _model_cfg(width=64, stage_depths=())
  cfg.depth = 101
  with pytest.raises(
    imagenet.WeightsError,
    match=r"'pycls_r50' is a ResNet-50 .* "
    r"config.model.depth=101; use 'pycls_r101' or 'torchvision_r101'",
  ):
    imagenet.resolve('pycls_r50', model=cfg, cache_dir=str(tmp_path / 'never'))
  assert not (tmp_path / 'never').exists()
  with pytest.raises(imagenet.WeightsError, match='config.model.width=8'):
    imagenet.resolve('pycls_r50', model=_model_cfg(stage_depths=()), cache_dir=str(tmp_path))
  with pytest.raises(
    imagenet.WeightsError, match=r"stage_depths=\(1, 1, 1, 1\).*use a backbone file"
  ):
    imagenet.resolve('pycls_r50', model=_model_cfg(), cache_dir=str(tmp_path))


def test_a_backbone_with_fewer_blocks_than_the_model_is_refused(checkpoints, tmp_path):
  path = tmp_path / 'tiny.pyth'
  path.write_bytes(checkpoints['pycls'])
  bb = backbone_lib.load_backbone(str(path))
  bigger = jax.eval_shape(
    models.build_model(_model_cfg(stage_depths=(1, 1, 2, 1))).init,
    jax.random.key(0),
    np.zeros((1, 64, 64, 3), np.float32),
  )
  missing = state_lib.uncovered_backbone_leaves(bigger, bb)
  assert missing and all("'s3']['b2']" in k for k in missing)


def test_training_logs_and_records_the_backbone(server, checkpoints, tmp_path):
  """python -m dolg_jax.main --config=configs/tiny.py with a backbone URL served locally."""
  tl.ensure_fixture()
  data = checkpoints['pycls']
  url = server.serve('/zoo/R-tiny-1x8d.pyth', data)
  sha = hashlib.sha256(data).hexdigest()
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  proc = tl.run_main(
    str(workdir),
    tl.STEPS,
    f'--config.train.backbone_init={url}',
    f'--config.train.backbone_cache_dir={cache}',
  )
  assert proc.returncode == 0, tl.explain(proc)
  assert f'Backbone: {url}' in proc.stderr and f'sha256 {sha}' in proc.stderr, tl.explain(proc)
  assert f'Backbone initialised from {cache / "R-tiny-1x8d.pyth"}' in proc.stderr
  with open(workdir / 'manifest.json') as f:
    record = json.load(f)['backbone']
  assert record['url'] == url and record['sha256'] == sha and record['downloaded']
  assert record['path'] == str(cache / 'R-tiny-1x8d.pyth')
  assert 'recorded' in record['verification']
  # Offline: the run stops before compiling anything, with one line saying where the file goes.
  missing = server.url + '/zoo/absent/R-tiny-1x8d.pyth'
  # (The first cache holds a file of that name: it would be used.)
  empty = tmp_path / 'empty_cache'
  proc = tl.run_main(
    str(tmp_path / 'run2'),
    tl.STEPS,
    f'--config.train.backbone_init={missing}',
    f'--config.train.backbone_cache_dir={empty}',
  )
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f'FAILED: cannot download {missing} (HTTP 404'), tl.explain(proc)
  assert f'put it at {empty / "R-tiny-1x8d.pyth"}' in last and 'Traceback' not in proc.stderr
  assert not os.listdir(empty)


def test_configs_start_from_the_pycls_backbone_of_their_depth():
  expected = {
    'r50': 'pycls_r50',
    'r101': 'pycls_r101',
    'released_r101': 'pycls_r101',
    'default': 'pycls_r50',
    'tiny': 'none',
    'demo': 'none',
  }
  for name, spec in expected.items():
    c = importlib.import_module(f'configs.{name}').get_config()
    assert c.train.backbone_init == spec, name
    assert c.train.backbone_cache_dir == ''
    imagenet.check_model(spec, c.model)  # Depth and width fit (no download).
    if spec != 'none':
      assert imagenet.BACKBONES[spec].depth == c.model.depth
