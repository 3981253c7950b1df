"""Shared pieces of the search-service tests: one small index per module and the real server
(`python -m dolg_jax.serve --port=0`) as a subprocess, ready when it prints its ready line."""

import os

from dolg_jax.tools import bench_serve
from tests.helpers import collection_testlib as ctl
from tests.helpers.paths import REPO

XSS_NAME = '<img src=x onerror=alert(1)>.jpg'


def build_index(root: str) -> dict:
  """Images (the collection tests' folder + a file named like HTML), a tiny checkpoint, an index."""
  images = ctl.write_folder(os.path.join(root, 'images'))
  ctl.save(os.path.join(images, XSS_NAME), ctl.image(50), 'JPEG', quality=95)
  ckpt = ctl.write_checkpoint(os.path.join(root, 'ckpt'), seed=0)
  out = os.path.join(root, 'index')
  cache = os.path.join(root, 'xla_cache')
  proc = ctl.run(ctl.index_cmd(ckpt, images, out, cache))
  assert proc.returncode == 0, ctl.explain(proc)
  return {'images': images, 'ckpt': ckpt, 'index': out, 'cache': cache}


class Server(bench_serve.Server):
  """bench_serve's server in the repository with the tests' environment (CPU); not ready within
  `timeout` seconds fails the test."""

  NotReady = AssertionError

  def __init__(self, *args: str, timeout: float = 300):
    super().__init__(*args, timeout=timeout, env=ctl.env(), cwd=REPO)
