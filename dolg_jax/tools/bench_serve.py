"""The search service under load, against one process per search, and over 10^7 rows.

  python -m dolg_jax.tools.bench_serve [--configs=tiny,r50] [--clients=1,8,32] [--requests=64]
      [--images=48] [--side=160] [--search_calls=3] [--synthetic_rows=10000000] [--out=DIR]

Per shipped config (random weights): indexes `--images` synthetic photos (`python -m
dolg_jax.index`, one scale), starts `python -m dolg_jax.serve` with micro-batching (the defaults)
and with one request per device call (--max_batch_images=1 --max_wait_ms=0), and sends
`--requests` image searches (k=10) from each `--clients` level: requests/s, p50/p99 latency and the
batching speed-up, beside `python -m dolg_jax.search` (one process per call). Then, for the first
config, a synthetic index of `--synthetic_rows` rows (parts, plan, flat FAISS; no images): its row
table's conversion and memory-mapped open, `serve`'s start-up time and RSS, and the search p50
through HTTP. Prints a table and one JSON line. Measurements: docs/design_notes.md.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags
import numpy as np
import requests

from dolg_jax import cli
from dolg_jax import defaults
from dolg_jax import pretrained
from dolg_jax.models import random_weights
from dolg_jax.collection import build
from dolg_jax.collection import columns
from dolg_jax.collection import faiss_index
from dolg_jax.collection import store as store_lib
from dolg_jax.tools import bench_indexing

FLAGS = flags.FLAGS
READY = re.compile(r'^serving .* \((\d+) images\) on (http://\S+)$')


def define_flags() -> None:
  flags.DEFINE_list('configs', ['tiny', 'r50'], 'Shipped configs to measure.')
  flags.DEFINE_list('clients', ['1', '8', '32'], 'Concurrent clients.')
  flags.DEFINE_integer('requests', 64, 'Requests per client level.')
  flags.DEFINE_integer('images', 48, 'Synthetic photos indexed (and used as queries).')
  flags.DEFINE_integer('side', 160, 'Long side of the synthetic photos.')
  flags.DEFINE_integer('search_calls', 3, 'python -m dolg_jax.search calls timed.')
  flags.DEFINE_integer('synthetic_rows', 10_000_000, 'Rows of the synthetic index (0 = skip).')
  flags.DEFINE_integer('synthetic_part_size', 1 << 17, 'Rows per part of the synthetic index.')
  flags.DEFINE_string('out', None, 'Working folder (default: a temporary one, removed).')


def _env() -> dict:
  return dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(
      [os.path.dirname(cli.PACKAGE_DIR), os.environ.get('PYTHONPATH', '')]
    ),
  )


PHOTO_ASPECTS = (1.0, 0.8, 0.6)  # width / height: the photos come in three sizes


def photos(root: str, n: int, side: int) -> list[str]:
  """`n` synthetic JPEG photos `side` high (bench_indexing's), in PHOTO_ASPECTS widths, the
  sizes interleaved (as requests of mixed sizes arrive)."""
  groups = []
  for g, aspect in enumerate(PHOTO_ASPECTS):
    w = max(1, int(side * aspect))
    count = n // len(PHOTO_ASPECTS) + (g < n % len(PHOTO_ASPECTS))
    groups.append(bench_indexing.write_images(os.path.join(root, f'w{w}'), count, w, side, seed=g))
  return [p for i in range(max(map(len, groups))) for group in groups for p in group[i : i + 1]]


def checkpoint(name: str, path: str) -> str:
  cfg = defaults.shipped_config(name)
  pretrained.save_converted(path, cfg.model, random_weights.random_variables(cfg.model))
  return path


class Server:
  """`python -m dolg_jax.serve --port=0 ARGS` until `stop()`: `url` and `images` from its ready
  line, `startup_s` to it, every output line in `lines`. Raises `NotReady` (after stopping it)
  when the process ends, or `timeout` seconds pass (None: no limit), before the ready line."""

  NotReady: type[Exception] = RuntimeError

  def __init__(
    self, *args: str, timeout: float | None = None, env: dict | None = None, cwd: str | None = None
  ):
    t0 = time.perf_counter()
    self.proc = subprocess.Popen(
      [sys.executable, '-m', 'dolg_jax.serve', '--port=0', *args],
      cwd=cwd,
      env=_env() if env is None else env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    self.lines: list[str] = []
    self._q: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    deadline = None if timeout is None else time.monotonic() + timeout
    self.url, self.images = None, None
    while self.url is None:
      try:
        wait = None if deadline is None else max(0.1, deadline - time.monotonic())
        line = self._q.get(timeout=wait)
      except queue.Empty:
        line = None
      if line is None:
        self.stop()
        raise self.NotReady('the server did not get ready:\n' + ''.join(self.lines[-60:]))
      m = READY.match(line.strip())
      if m:
        self.images, self.url = int(m.group(1)), m.group(2)
    self.startup_s = time.perf_counter() - t0

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.append(line)
      self._q.put(line)
    self._q.put(None)

  def output(self) -> str:
    return ''.join(self.lines)

  def rss_mb(self) -> float:
    with open(f'/proc/{self.proc.pid}/status') as f:
      return next(int(l.split()[1]) for l in f if l.startswith('VmRSS')) / 1024

  def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
    """Sends `sig` and waits `timeout` seconds (then kills it); the return code."""
    if self.proc.poll() is None:
      self.proc.send_signal(sig)
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    return self.proc.returncode


def load(url: str, files: list[str], clients: int, requests_n: int) -> dict:
  datas = [open(p, 'rb').read() for p in files]
  lat = []
  lock = threading.Lock()
  counter = iter(range(requests_n))

  def client():
    s = requests.Session()
    while True:
      with lock:
        i = next(counter, None)
      if i is None:
        return
      t = time.perf_counter()
      r = s.post(
        url + '/api/search',
        files={'image': (f'q{i}.jpg', datas[i % len(datas)])},
        data={'k': '10'},
        timeout=600,
      )
      r.raise_for_status()
      with lock:
        lat.append(time.perf_counter() - t)

  t0 = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(clients) as ex:
    for f in [ex.submit(client) for _ in range(clients)]:
      f.result()
  wall = time.perf_counter() - t0
  return {
    'rps': requests_n / wall,
    'p50_ms': 1000 * float(np.percentile(lat, 50)),
    'p99_ms': 1000 * float(np.percentile(lat, 99)),
  }


def bench_config(name: str, work: str) -> tuple[dict, str, str]:
  root = os.path.join(work, name)
  os.makedirs(os.path.join(root, 'photos'), exist_ok=True)
  files = photos(os.path.join(root, 'photos'), FLAGS.images, FLAGS.side)
  ckpt = checkpoint(name, os.path.join(root, 'ckpt'))
  index = os.path.join(root, 'index')
  cache = os.path.join(work, 'xla_cache')
  proto = [
    '--config.eval.scales=(1.0,)',
    '--config.eval.num_workers=0',
    f'--config.eval.xla_cache_dir={cache}',
  ]
  subprocess.run(
    [
      sys.executable,
      '-m',
      'dolg_jax.index',
      f'--config=dolg_jax:{name}',
      f'--checkpoint={ckpt}',
      f'--images={root}/photos',
      f'--out={index}',
      *proto,
    ],
    env=_env(),
    check=True,
    capture_output=True,
  )
  out = {'config': name, 'levels': {}}
  for mode, extra in (
    ('batched', []),
    ('one_at_a_time', ['--max_batch_images=1', '--max_wait_ms=0']),
  ):
    server = Server(f'--index={index}', '--watch_s=0', *extra)
    try:
      load(server.url, files, 1, len(files))  # every query shape compiled (or cached) first
      for c in FLAGS.clients:
        out['levels'].setdefault(c, {})[mode] = load(server.url, files, int(c), FLAGS.requests)
    finally:
      server.stop(timeout=120)
  for c, lv in out['levels'].items():
    lv['speedup'] = lv['batched']['rps'] / lv['one_at_a_time']['rps']
  times = []
  for i in range(FLAGS.search_calls):
    t = time.perf_counter()
    subprocess.run(
      [
        sys.executable,
        '-m',
        'dolg_jax.search',
        f'--index={index}',
        f'--query={files[i]}',
        '--k=10',
        f'--out={root}/search{i}',
        '--report=false',
      ],
      env=_env(),
      check=True,
      capture_output=True,
    )
    times.append(time.perf_counter() - t)
  out['search_process'] = {
    'rps': 1 / float(np.mean(times)),
    'p50_ms': 1000 * float(np.median(times)),
  }
  return out, index, files[0]


def synthetic_index(base: str, out: str, n: int, part_size: int) -> dict:
  shutil.copytree(base, out)
  store = store_lib.IndexStore(out)
  dim = store_lib.Rows(store).dim
  t0 = time.perf_counter()
  plan = store.write_plan([f'synthetic/{i:08d}.jpg' for i in range(n)], part_size)
  rng = np.random.default_rng(0)
  for g, p, names in store.plan_parts(plan):
    d = rng.standard_normal((len(names), dim), dtype=np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    rows = [
      {'path': f, 'height': 480, 'width': 640, 'bytes': 123456, 'sha1': '0' * 40} for f in names
    ]
    store.write_part(g, p, d, rows, [])
  options = build.Options(
    part_size=part_size,
    descriptor_dtype='float32',
    faiss=faiss_index.Spec(),
    replace=False,
    read_workers=0,
    recall_k=100,
    recall_sample=20,
    progress=False,
  )
  build.finalize(store, options, {'synthetic': True})
  npy = sum(
    os.path.getsize(os.path.join(store.parts_dir, f))
    for f in os.listdir(store.parts_dir)
    if f.endswith('.npy')
  )
  return {'rows': n, 'dim': dim, 'write_s': time.perf_counter() - t0, 'descriptor_mb': npy / 2**20}


def bench_synthetic(base: str, work: str, query_file: str) -> dict:
  out_dir = os.path.join(work, 'synthetic')
  info = synthetic_index(base, out_dir, FLAGS.synthetic_rows, FLAGS.synthetic_part_size)
  store = store_lib.IndexStore(out_dir)
  os.remove(os.path.join(out_dir, columns.TABLE_FILE))
  t = time.perf_counter()
  n = len(store_lib.Rows(store))
  info['rows'] = n
  info['rows_open_from_csv_s'] = time.perf_counter() - t
  t = time.perf_counter()
  store_lib.Rows(store)
  info['rows_open_mmap_s'] = time.perf_counter() - t
  server = Server(f'--index={out_dir}', '--watch_s=0')
  try:
    info['serve_startup_s'] = server.startup_s
    info['serve_rss_mb'] = server.rss_mb()
    q = np.random.default_rng(1).standard_normal((1, info['dim']))
    q /= np.linalg.norm(q)
    s = requests.Session()
    lat = []
    for _ in range(20):
      t = time.perf_counter()
      s.post(
        server.url + '/api/search', json={'descriptors': q.tolist(), 'k': 100}, timeout=600
      ).raise_for_status()
      lat.append(time.perf_counter() - t)
    info['descriptor_search_p50_ms'] = 1000 * float(np.median(lat))
    data = open(query_file, 'rb').read()
    lat = []
    for _ in range(10):
      t = time.perf_counter()
      s.post(
        server.url + '/api/search', files={'image': ('q.jpg', data)}, data={'k': '100'}, timeout=600
      ).raise_for_status()
      lat.append(time.perf_counter() - t)
    info['image_search_p50_ms'] = 1000 * float(np.median(lat))
    info['serve_rss_after_mb'] = server.rss_mb()
  finally:
    server.stop(timeout=120)
  return info


def main(argv):
  del argv
  work = FLAGS.out or tempfile.mkdtemp(prefix='bench_serve_')
  os.makedirs(work, exist_ok=True)
  results = {'configs': []}
  try:
    first = None
    for name in FLAGS.configs:
      res, index, query_file = bench_config(name, work)
      results['configs'].append(res)
      first = first or (index, query_file)
      print(f'\n{name}: requests/s (p50 / p99 ms), one serve process, k=10')
      print(f'{"clients":>8} {"batched":>26} {"one at a time":>26} {"speed-up":>9}')
      for c, lv in res['levels'].items():
        b, o = lv['batched'], lv['one_at_a_time']
        print(
          f'{c:>8} {b["rps"]:8.1f} ({b["p50_ms"]:7.1f} / {b["p99_ms"]:7.1f}) '
          f'{o["rps"]:8.1f} ({o["p50_ms"]:7.1f} / {o["p99_ms"]:7.1f}) {lv["speedup"]:8.2f}x'
        )
      sp = res['search_process']
      print(
        f'python -m dolg_jax.search, one process per call: {sp["rps"]:.2f} requests/s '
        f'({sp["p50_ms"]:.0f} ms per call)'
      )
    if FLAGS.synthetic_rows and first:
      syn = bench_synthetic(first[0], work, first[1])
      results['synthetic'] = syn
      print(
        f'\nsynthetic index: {syn["rows"]} rows x {syn["dim"]} ({syn["descriptor_mb"]:.0f} MB '
        f'of descriptors, written in {syn["write_s"]:.0f} s)'
      )
      print(
        f'row table: {syn["rows_open_from_csv_s"]:.1f} s from the CSV parts (converted), '
        f'{syn["rows_open_mmap_s"]:.2f} s memory-mapped'
      )
      print(
        f'serve: start-up {syn["serve_startup_s"]:.1f} s to the ready line, RSS '
        f'{syn["serve_rss_mb"]:.0f} MB ({syn["serve_rss_after_mb"]:.0f} MB after searching); '
        f'search p50 through HTTP: {syn["descriptor_search_p50_ms"]:.1f} ms (descriptor), '
        f'{syn["image_search_p50_ms"]:.1f} ms (image), k=100'
      )
    print(json.dumps(results))
  finally:
    if not FLAGS.out:
      shutil.rmtree(work, ignore_errors=True)


def run() -> None:
  define_flags()
  cli.run_app(main)


if __name__ == '__main__':
  run()
