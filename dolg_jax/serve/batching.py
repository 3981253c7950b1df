"""Micro-batching: requests that arrive together share one device call.

`MicroBatcher(process, max_wait_s, max_images)`: `submit(job, n_images)` returns a
`concurrent.futures.Future`. One worker thread takes the first waiting job, then keeps collecting
for at most `max_wait_s` (or until `max_images` images are waiting) and calls
`process(jobs) -> [result or Exception per job]` once for all of them; each future gets its own
result. `expect_more()` (default: always) says whether another job is on its way (the service:
a request is being read or decoded); when not, the batch runs at once, so a lone request never
waits. Jobs are answered in arrival order; `close()` answers what is queued, then stops.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent import futures
from typing import Any, Callable, Optional, Sequence


class MicroBatcher:
  def __init__(
    self,
    process: Callable[[Sequence[Any]], Sequence[Any]],
    max_wait_s: float,
    max_images: int,
    on_batch: Optional[Callable[[int], None]] = None,
    on_depth: Optional[Callable[[int], None]] = None,
    expect_more: Optional[Callable[[], bool]] = None,
  ):
    if max_wait_s < 0 or max_images < 1:
      raise ValueError(f'max_wait_s >= 0 and max_images >= 1; got {max_wait_s}, {max_images}')
    self._process = process
    self.max_wait_s = max_wait_s
    self.max_images = max_images
    self._on_batch = on_batch or (lambda n: None)
    self._on_depth = on_depth or (lambda n: None)
    self._expect_more = expect_more or (lambda: True)
    self._queue: collections.deque = collections.deque()
    self._waiting_images = 0
    self._cv = threading.Condition()
    self._closed = False
    self._thread = threading.Thread(target=self._loop, name='micro-batcher', daemon=True)
    self._thread.start()

  def submit(self, job: Any, n_images: int = 1) -> futures.Future:
    fut: futures.Future = futures.Future()
    with self._cv:
      if self._closed:
        raise RuntimeError('the service is shutting down')
      self._queue.append((job, max(1, n_images), fut))
      self._waiting_images += max(1, n_images)
      self._on_depth(self._waiting_images)
      self._cv.notify()
    return fut

  def _take(self) -> list:
    with self._cv:
      while not self._queue and not self._closed:
        self._cv.wait()
      if not self._queue:
        return []
      deadline = time.monotonic() + self.max_wait_s
      while self._waiting_images < self.max_images and not self._closed and self._expect_more():
        left = deadline - time.monotonic()
        if left <= 0:
          break
        self._cv.wait(min(left, 0.002))
      taken, n = [], 0
      while self._queue and (not taken or n + self._queue[0][1] <= self.max_images):
        item = self._queue.popleft()
        taken.append(item)
        n += item[1]
      self._waiting_images -= n
      self._on_depth(self._waiting_images)
      return taken

  def _loop(self) -> None:
    while True:
      taken = self._take()
      if not taken:
        return
      self._on_batch(sum(n for _, n, _ in taken))
      try:
        results = list(self._process([job for job, _, _ in taken]))
      except Exception as e:  # noqa: BLE001  # every job of the batch gets it
        results = [e] * len(taken)
      for (_, _, fut), res in zip(taken, results):
        if isinstance(res, BaseException):
          fut.set_exception(res)
        else:
          fut.set_result(res)

  def close(self, timeout: Optional[float] = None) -> None:
    """Answers the queued jobs, then stops the worker."""
    with self._cv:
      self._closed = True
      self._cv.notify_all()
    self._thread.join(timeout)
