"""Prometheus text-format metrics of the search service (`GET /metrics`), thread-safe.

Counters of requests by route and status and of index reloads, a latency histogram per route, a
histogram of the images per device call (micro-batch sizes), the queue depth and the index size as
gauges.
"""

from __future__ import annotations

import bisect
import threading
from typing import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
  def __init__(self, buckets: Sequence[float]):
    self.buckets = tuple(buckets)
    self.counts = [0] * (len(self.buckets) + 1)
    self.sum = 0.0
    self.count = 0

  def observe(self, v: float) -> None:
    self.counts[bisect.bisect_left(self.buckets, v)] += 1
    self.sum += v
    self.count += 1

  def lines(self, name: str, labels: str = '') -> list[str]:
    sep = ',' if labels else ''
    out, acc = [], 0
    for b, c in zip(self.buckets, self.counts):
      acc += c
      out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
    out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
    lab = f'{{{labels}}}' if labels else ''
    out += [f'{name}_sum{lab} {self.sum:.6f}', f'{name}_count{lab} {self.count}']
    return out


class Metrics:
  """What /metrics reports; every method may be called from any thread."""

  def __init__(self):
    self._lock = threading.Lock()
    self.requests: dict[tuple[str, int], int] = {}
    self.latency: dict[str, Histogram] = {}
    self.batch_images = Histogram(BATCH_BUCKETS)
    self.queue_depth = 0
    self.images = 0
    self.reloads = 0

  def request(self, route: str, status: int, seconds: float) -> None:
    with self._lock:
      self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
      self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

  def batch(self, n_images: int) -> None:
    with self._lock:
      self.batch_images.observe(n_images)

  def set_queue_depth(self, n: int) -> None:
    with self._lock:
      self.queue_depth = n

  def text(self) -> str:
    with self._lock:
      out = [
        '# HELP dolg_requests_total HTTP requests by route and status.',
        '# TYPE dolg_requests_total counter',
      ]
      out += [
        f'dolg_requests_total{{route="{r}",status="{s}"}} {n}'
        for (r, s), n in sorted(self.requests.items())
      ]
      out += [
        '# HELP dolg_request_seconds Request latency by route.',
        '# TYPE dolg_request_seconds histogram',
      ]
      for r, h in sorted(self.latency.items()):
        out += h.lines('dolg_request_seconds', f'route="{r}"')
      out += [
        '# HELP dolg_batch_images Query images per device call (micro-batch size).',
        '# TYPE dolg_batch_images histogram',
        *self.batch_images.lines('dolg_batch_images'),
        '# HELP dolg_queue_depth Query images waiting for the device.',
        '# TYPE dolg_queue_depth gauge',
        f'dolg_queue_depth {self.queue_depth}',
        '# HELP dolg_index_images Images in the served index.',
        '# TYPE dolg_index_images gauge',
        f'dolg_index_images {self.images}',
        '# HELP dolg_reloads_total Index reloads since start.',
        '# TYPE dolg_reloads_total counter',
        f'dolg_reloads_total {self.reloads}',
      ]
    return '\n'.join(out) + '\n'
