"""Shared pieces of the search-service tests: one small index per module and the real server
(`python -m dolg_jax.serve --port=0`) as a subprocess, ready when it prints its ready line."""

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

from tests.helpers import collection_testlib as ctl
from tests.helpers.paths import REPO

READY = re.compile(r'^serving .* \((\d+) images\) on (http://\S+)$')
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


class Server:
  """`python -m dolg_jax.serve ARGS --port=0` until `stop()`; `url` once it is ready."""

  def __init__(self, *args: str, timeout: float = 300):
    self.proc = subprocess.Popen(
      [sys.executable, '-m', 'dolg_jax.serve', '--port=0', *args],
      cwd=REPO,
      env=ctl.env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines: list[str] = []
    self._q: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    deadline = time.monotonic() + timeout
    self.url, self.images = None, None
    while self.url is None:
      try:
        line = self._q.get(timeout=max(0.1, deadline - time.monotonic()))
      except queue.Empty:
        line = None
      if line is None:
        self.stop()
        raise AssertionError('the server did not get ready:\n' + ''.join(self.lines[-60:]))
      m = READY.match(line.strip())
      if m:
        self.images, self.url = int(m.group(1)), m.group(2)

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      self._q.put(line)
    self._q.put(None)

  def output(self) -> str:
    return ''.join(self.lines)

  def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode
