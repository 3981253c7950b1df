"""The search service's state: the opened index, micro-batched extraction + search, reloads.

`Service(index_dir, settings, checkpoint=, workdir=)` opens the index once
(`backends.open_collection`: FAISS, or a Milvus collection published from it), compiles the common
indexed image shapes, and answers `search_images(images, bbxs, k, rerank)` (a future; the images of
every waiting request share one `Extractor.extract_own` call through a `MicroBatcher`, so results
equal `dolg_jax.search` on the same files), `search_descriptors(q, k, rerank)`, `image(row, thumb)`
(by row id only) and `reload()` (swaps in the index only when it is complete and verified; a
watcher thread reloads when the manifest changes). Refused requests raise `BadRequest` (an HTTP
status and a message). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import threading
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from dolg_jax.collection import query
from dolg_jax.collection import reading
from dolg_jax.serve import backends
from dolg_jax.serve import batching
from dolg_jax.serve import metrics as metrics_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every default of the service (the flags of `python -m dolg_jax.serve` take theirs here)."""

  host: str = '127.0.0.1'
  port: int = 8080
  token: str = ''
  cors_origin: str = ''
  max_upload_mb: int = 20
  max_k: int = 1000
  max_queries: int = 16  # image files (or descriptors) per request
  max_wait_ms: float = 5.0  # how long the batcher waits for more requests
  max_batch_images: int = 32  # images per device call
  watch_s: float = 2.0  # manifest polling for reloads (0 = only POST /api/reload)
  thumb_side: int = 256
  warmup_shapes: int = 3  # most common indexed image sizes compiled before `ready`
  backend: str = 'faiss'
  milvus_uri: str = ''
  milvus_collection: str = backends.DEFAULT_COLLECTION
  unit_tolerance: float = 1e-3  # |norm - 1| allowed for descriptors given as JSON


class BadRequest(ValueError):
  """A request the service refuses (HTTP status, message)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


def _manifest_signature(index_dir: str) -> Optional[tuple]:
  try:
    st = os.stat(os.path.join(index_dir, 'manifest.json'))
  except OSError:
    return None
  return (st.st_ino, st.st_mtime_ns, st.st_size)


WEB_TYPES = {b'\xff\xd8\xff': 'image/jpeg', b'\x89PNG': 'image/png', b'GIF8': 'image/gif'}


def _content_type(data: bytes) -> Optional[str]:
  for magic, kind in WEB_TYPES.items():
    if data.startswith(magic):
      return kind
  if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
    return 'image/webp'
  return None


class Service:
  """See the module docstring."""

  def __init__(
    self,
    index_dir: str,
    settings: Settings = Settings(),
    *,
    checkpoint: Optional[str] = None,
    workdir: Optional[str] = None,
  ):
    self.index_dir = index_dir
    self.settings = settings
    self.metrics = metrics_lib.Metrics()
    self._model_paths = {'checkpoint': checkpoint, 'workdir': workdir}
    self._reload_lock = threading.Lock()
    self._signature = _manifest_signature(index_dir)
    self._failed_signature: Optional[tuple] = None
    self.last_reload_error: Optional[str] = None
    self.generation = 0
    # Thumbnails by (generation, row id), per service: no key holds a Collection, so a reload
    # frees the old index (reload() also clears the cache).
    self._thumb = functools.lru_cache(maxsize=4096)(self._thumb_uncached)
    self.col = self._open()
    self.col.extractor()  # loads the model once, checks its fingerprint
    self.metrics.images = len(self.col)
    self.warm_up()
    self._arriving = 0  # search requests being read or decoded (not yet in the batcher)
    self._arriving_lock = threading.Lock()
    self.batcher = batching.MicroBatcher(
      self._process,
      settings.max_wait_ms / 1000.0,
      settings.max_batch_images,
      on_batch=self.metrics.batch,
      on_depth=self.metrics.set_queue_depth,
      expect_more=lambda: self._arriving > 0,
    )
    self._stop = threading.Event()
    self._watcher = None
    if settings.watch_s > 0:
      self._watcher = threading.Thread(target=self._watch, name='index-watcher', daemon=True)
      self._watcher.start()

  def _open(self) -> query.Collection:
    return backends.open_collection(self.index_dir, self.settings, **self._model_paths)

  def __len__(self) -> int:
    return len(self.col)

  # ------------------------------------------------------------------ start-up

  def warm_up(self) -> None:
    """Compiles the forward pass for the most common indexed image sizes (and runs one search)."""
    col = self.col
    sizes = collections.Counter()
    n = len(col)
    step = max(1, n // 10000)  # a sample is enough to find the common sizes
    if n:
      table = col.rows.table.table  # the columnar row table (store.Rows)
      hs = table.column('height').to_numpy()[::step]
      ws = table.column('width').to_numpy()[::step]
      sizes.update(zip(hs.tolist(), ws.tolist()))
    shapes = [hw for hw, _ in sizes.most_common(self.settings.warmup_shapes)] or [(224, 224)]
    examples = [
      {'index': i, 'image': np.full(hw + (3,), 128, np.uint8)} for i, hw in enumerate(shapes)
    ]
    _, desc = col.extractor().extract_own(examples, presharded=True)
    if len(col):
      col.search_descriptors(desc[:1], 1)

  # ------------------------------------------------------------------ search

  def check_k(self, k: Any) -> int:
    try:
      k = int(k)
    except (TypeError, ValueError):
      raise BadRequest(f'k must be an integer; got {str(k)[:40]!r}') from None
    if not 1 <= k <= self.settings.max_k:
      raise BadRequest(f'k must be in [1, {self.settings.max_k}]; got {k}')
    return k

  @staticmethod
  def check_rerank(rerank: Any) -> str:
    rerank = '' if rerank is None else str(rerank)
    if rerank not in query.RERANKERS:
      raise BadRequest(f'rerank must be one of {list(query.RERANKERS)}; got {rerank[:40]!r}')
    return rerank

  def decode(self, name: str, data: bytes) -> np.ndarray:
    """An uploaded file -> uint8 RGB image, or BadRequest naming the file and the problem."""
    limits = self.col.limits
    if len(data) > limits.max_bytes:
      raise BadRequest(f'{name}: file too large ({len(data)} bytes > {limits.max_bytes})', 413)
    img, reason = reading.decode_image(data, limits.max_pixels)
    if reason is not None:
      raise BadRequest(f'{name}: {reason}', 413 if reason.startswith('too many pixels') else 400)
    return img

  @staticmethod
  def parse_box(text: str, image: np.ndarray, name: str) -> np.ndarray:
    """'TOP,LEFT,HEIGHT,WIDTH' inside the image -> evaluation's [x1, y1, x2, y2]."""
    try:
      vals = [float(v) for v in str(text).split(',')]
    except ValueError:
      vals = []
    if len(vals) != 4 or not np.isfinite(vals).all():
      raise BadRequest(f'box {str(text)[:60]!r} of {name}: expected TOP,LEFT,HEIGHT,WIDTH')
    top, left, height, width = vals
    h, w = image.shape[:2]
    if height <= 0 or width <= 0 or top < 0 or left < 0 or top + height > h or left + width > w:
      raise BadRequest(
        f'box {text} of {name} is outside the image ({h} high, {w} wide): '
        'TOP,LEFT >= 0, HEIGHT,WIDTH > 0, TOP+HEIGHT <= height, LEFT+WIDTH <= width'
      )
    return query.box_to_bbx(vals)

  def arriving(self, delta: int) -> None:
    """A search request started (+1) or stopped (-1) being read and decoded."""
    with self._arriving_lock:
      self._arriving += delta

  def search_images(
    self, images: Sequence[np.ndarray], bbxs: Sequence[Optional[np.ndarray]], k: int, rerank: str
  ):
    """A future of [[{'id', 'path', 'score'}, ...] per image] (micro-batched)."""
    return self.batcher.submit(
      {'images': list(images), 'bbxs': list(bbxs), 'k': k, 'rerank': rerank}, len(images)
    )

  def _process(self, jobs: Sequence[dict]) -> list:
    col = self.col  # one index for the whole batch, even if a reload swaps it meanwhile
    examples, owner = [], []
    for j, job in enumerate(jobs):
      for img, bbx in zip(job['images'], job['bbxs']):
        ex = {'index': len(examples), 'image': img}
        if bbx is not None:
          ex['bbx'] = bbx
        examples.append(ex)
        owner.append(j)
    results: list[Any] = [[] for _ in jobs]
    try:
      order, desc = col.extractor().extract_own(examples, presharded=True)
    except ValueError as e:  # e.g. an empty crop: every job of the batch is checked alone
      if len(jobs) == 1:
        return [BadRequest(str(e))]
      return [self._process([job])[0] for job in jobs]
    by_row = {int(i): d for i, d in zip(order, desc)}
    groups: dict[tuple, list[int]] = {}
    for e, j in enumerate(owner):
      groups.setdefault((jobs[j]['k'], jobs[j]['rerank']), []).append(e)
    rows: dict[int, list] = {}
    for (k, rerank), members in groups.items():
      try:
        q = np.stack([by_row[e] for e in members])
        scores, ids = col.search_descriptors(q, k, rerank)
      except Exception as err:  # noqa: BLE001  # answered to those jobs only
        for e in members:
          rows[e] = err
        continue
      for e, sr, ir in zip(members, scores, ids):
        rows[e] = hits(col, sr, ir)
    for e, j in enumerate(owner):
      if isinstance(results[j], BaseException):
        continue
      if isinstance(rows[e], BaseException):
        results[j] = rows[e]
      else:
        results[j].append(rows[e])
    return results

  def search_descriptors(self, q: Any, k: int, rerank: str) -> list:
    col = self.col
    dim = col.rows.dim
    try:
      arr = np.asarray(q, np.float64)
    except (TypeError, ValueError):
      raise BadRequest('descriptors must be a list of lists of numbers') from None
    if arr.ndim != 2 or arr.shape[0] < 1 or (dim and arr.shape[1] != dim):
      raise BadRequest(
        f'descriptors must be a non-empty list of {dim}-number lists; got shape {list(arr.shape)}'
      )
    if arr.shape[0] > self.settings.max_queries:
      raise BadRequest(
        f'at most {self.settings.max_queries} descriptors per request; got {arr.shape[0]}'
      )
    # Shape and unit norm are this service's checks; a NaN (whose norm passes the test below) is
    # refused by Collection.search_descriptors (its ValueError is a 400).
    norms = np.linalg.norm(arr, axis=1)
    bad = np.flatnonzero(np.abs(norms - 1) > self.settings.unit_tolerance)
    if bad.size:
      raise BadRequest(
        f'descriptors must be unit norm (L2-normalised): descriptor {int(bad[0])} '
        f'has norm {norms[bad[0]]:.6g}'
      )
    scores, ids = col.search_descriptors(arr.astype(np.float32), k, rerank)
    return [hits(col, sr, ir) for sr, ir in zip(scores, ids)]

  # ------------------------------------------------------------------ images

  def image(self, row: int, thumb: bool) -> tuple[bytes, str]:
    """(bytes, content type) of an indexed image by row id (BadRequest 404 for another id)."""
    if thumb:
      return self._thumb(self.generation, row)
    return self._image(self.col, row, False)

  def _thumb_uncached(self, generation: int, row: int) -> tuple[bytes, str]:
    del generation  # the cache key: a reload makes new keys
    return self._image(self.col, row, True)

  def _image(self, col, row: int, thumb: bool) -> tuple[bytes, str]:
    if not 0 <= row < len(col):
      raise BadRequest(f'no image with id {row}: the index holds ids 0..{len(col) - 1}', 404)
    path = os.path.join(col.root, col.paths[row])
    data, reason = reading.read_bytes(path, col.limits.max_bytes)
    kind = None if reason is not None or thumb else _content_type(data)
    if kind:
      return data, kind
    img = None
    if reason is None:
      img, reason = reading.decode_image(data, col.limits.max_pixels)
    if reason is not None:
      raise BadRequest(f'image {row} cannot be read now: {reason}', 410)
    if thumb:
      h, w = img.shape[:2]
      s = self.settings.thumb_side / max(h, w)
      if s < 1:
        img = cv2.resize(
          img, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA
        )
      ok, enc = cv2.imencode('.jpg', img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
      return enc.tobytes(), 'image/jpeg'
    ok, enc = cv2.imencode('.png', img[..., ::-1])
    return enc.tobytes(), 'image/png'

  # ------------------------------------------------------------------ reload

  def reload(self) -> dict:
    """Opens the index again and swaps it in (raises if it is not complete and verified)."""
    with self._reload_lock:
      sig = _manifest_signature(self.index_dir)
      try:
        new = self._open()
      except Exception:
        self._failed_signature = sig
        raise
      old = self.col
      if (
        new.manifest['fingerprint'] == old.manifest['fingerprint']
        and new.manifest['model'] == old.manifest['model']
      ):
        new._extractor = old._extractor  # same model
      else:
        new.extractor()
      before = len(old)
      self.col = new
      self.generation += 1
      self._thumb.cache_clear()
      self._signature = sig
      self.last_reload_error = None
      self.metrics.images = len(new)
      self.metrics.reloads += 1
      log.info('reloaded %s: %d images (was %d)', self.index_dir, len(new), before)
      return {'images': len(new), 'before': before, 'generation': self.generation}

  def _watch(self) -> None:
    while not self._stop.wait(self.settings.watch_s):
      sig = _manifest_signature(self.index_dir)
      if sig is None or sig == self._signature or sig == self._failed_signature:
        continue
      try:
        self.reload()
      except Exception as e:  # noqa: BLE001  # keep serving the old index
        self.last_reload_error = f'{type(e).__name__}: {e}'
        log.info('not reloading %s yet: %s', self.index_dir, self.last_reload_error)

  def close(self) -> None:
    self._stop.set()
    self.batcher.close(timeout=60)


def hits(col: query.Collection, scores: np.ndarray, ids: np.ndarray) -> list[dict]:
  return [
    {'id': int(i), 'path': col.paths[int(i)], 'score': float(s)}
    for s, i in zip(scores, ids)
    if i >= 0
  ]
