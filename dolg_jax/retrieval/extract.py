"""Multi-scale global descriptors for retrieval evaluation, sharded over devices, bounded compiles.

Per image (the official DOLG / DELG test protocol): decode to RGB, crop a query to its box
(`crop_rounding`), cap the long side (`max_side`, and always `LARGEST_SIDE`), then for every scale
resize bilinearly -> model -> L2 normalise, and pool the scales (mean, or `scale_pool='max'`) ->
L2 normalise. Compilations are bounded by padding into a ladder of canvases (`pad`) or bucketing
the sides (`bucket`). The batch axis is sharded over this process's devices; with several
processes each extracts its own share (`extract_own`), and `extract` returns the full array on
every process. Each step, the compile bounds and the sharding in detail: docs/design_notes.md.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from concurrent import futures
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import cv2  # Bilinear resize (half-pixel centres, like the official cv2-based loaders).
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dolg_jax import config_rules as rules
from dolg_jax import profiling
from dolg_jax.data import decode
from dolg_jax.models.normalize import l2_normalize


OFFICIAL_SCALES = (0.3535, 0.5, 0.7071, 1.0, 1.4142)
LARGEST_SIDE = 8192  # the longest side a scaled image may have (the ladders end here)
MAX_BATCH_PIXELS = 16 * 2048**2  # pixels of one batch, padding rows included
SCALE_POOLS = ('mean', 'max')


@dataclasses.dataclass(frozen=True)
class ExtractConfig:
  """Extraction settings; built from the `c.eval` config section (`from_config`), which holds
  every default and documents each field (configs/default.py)."""

  scales: tuple[float, ...]
  max_side: int  # long-side cap before scaling (0 = none; DELG 1024)
  crop_rounding: str  # 'trunc' | 'round' | 'expand'
  bucket: int  # 0 = exact sizes (one compile per shape)
  geometric_from: int  # > 0: beyond this side, geometric buckets (0 = never)
  steps_per_octave: int  # geometric bucket density
  batch_size: int  # per process; the rows a batch runs at: padded_batch
  num_workers: int  # host threads decoding / cropping / resizing (0 = inline)
  min_side: int  # the model needs H, W >= this
  pad: bool  # exact sizes in padded canvases; apply_fn takes valid_hw
  canvas_steps_per_octave: int  # canvas ladder density above 256
  crop_canvas_steps_per_octave: int  # the same for query crops, which come in every size
  scale_pool: str  # 'mean' (official) | 'max' (SuperGlobal scale-GeM)

  def __post_init__(self):
    # Checked here, once: pooling reads any other value as 'mean'.
    rules.check_value('eval.scale_pool', self.scale_pool, CONFIG_RULES['eval.scale_pool'])

  def key(self) -> dict:
    """What determines the descriptors (for caching)."""
    d = dataclasses.asdict(self) | {'scales': [float(s) for s in self.scales]}
    d.pop('num_workers')
    if d['scale_pool'] == 'mean':
      d.pop('scale_pool')  # keys of caches written before the field existed stay valid
    return d


def from_config(eval_cfg: Mapping[str, Any], **overrides: Any) -> ExtractConfig:
  """ExtractConfig from a `c.eval` ConfigDict (every field must be there), then `overrides`."""
  fields = [f.name for f in dataclasses.fields(ExtractConfig)]
  missing = [k for k in fields if k not in eval_cfg and k not in overrides]
  if missing:
    raise KeyError(
      f'config.eval lacks the extraction field(s) {missing}; start the config from '
      'configs/default.py'
    )
  kwargs = {k: eval_cfg[k] for k in fields if k in eval_cfg} | overrides
  kwargs['scales'] = tuple(float(s) for s in kwargs['scales'])
  return ExtractConfig(**kwargs)


# ----------------------------------------------------------------------------- geometry


CROP_ROUNDINGS = ('trunc', 'round', 'expand')  # the choices of config.eval.crop_rounding
CONFIG_RULES = {
  'eval.crop_rounding': rules.one_of(CROP_ROUNDINGS),
  'eval.batch_size': rules.POSITIVE_INT,
  'eval.max_side': rules.NON_NEGATIVE_INT,
  'eval.bucket': rules.NON_NEGATIVE_INT,
  'eval.pad': rules.BOOL,
  'eval.scale_pool': rules.one_of(SCALE_POOLS),
}


def check_config(config: Mapping[str, Any]) -> None:
  """ValueError `config.PATH=VALUE: allowed` for an extraction field of config.eval."""
  rules.check(config, CONFIG_RULES)
  scales = rules.get(config, 'eval.scales')
  if scales is not rules.MISSING and (
    not isinstance(scales, (tuple, list))
    or not scales
    or not all(rules.is_number(s) and s > 0 for s in scales)
  ):
    rules.fail('eval.scales', scales, 'must be one or more numbers > 0')


def crop_box(
  bbx: Sequence[float], height: int, width: int, rounding: str = 'trunc'
) -> tuple[int, int, int, int]:
  """(y0, y1, x0, x1) pixel bounds (end exclusive) of box [x1, y1, x2, y2], clipped to the image."""
  x1, y1, x2, y2 = (float(v) for v in bbx)
  if rounding == 'trunc':
    c = [int(y1), int(y2), int(x1), int(x2)]
  elif rounding == 'round':
    c = [int(round(y1)), int(round(y2)), int(round(x1)), int(round(x2))]
  elif rounding == 'expand':
    c = [math.floor(y1), math.ceil(y2), math.floor(x1), math.ceil(x2)]
  else:
    raise ValueError(f'crop_rounding must be one of {CROP_ROUNDINGS}; got {rounding!r}')
  y0, y1_, x0, x1_ = c
  y0, x0 = max(0, y0), max(0, x0)
  y1_, x1_ = min(height, y1_), min(width, x1_)
  if y1_ <= y0 or x1_ <= x0:
    raise ValueError(f'box {list(bbx)} is empty inside a {height}x{width} image')
  return y0, y1_, x0, x1_


def capped_size(h: int, w: int, max_side: int) -> tuple[int, int]:
  if max_side and max(h, w) > max_side:
    s = max_side / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))
  return h, w


def scaled_size(h: int, w: int, scale: float) -> tuple[int, int]:
  """Exact target size at `scale` (cv2's fx/fy rounding)."""
  return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


@functools.lru_cache(maxsize=None)  # called per image; ExtractConfig is frozen
def long_side_cap(cfg: ExtractConfig) -> int:
  """The long-side cap applied before scaling: `max_side` (0 = none) and, always, the largest side
  whose every scale fits LARGEST_SIDE."""
  side = int(LARGEST_SIDE / max(cfg.scales)) + 1
  while side > 1 and max(scaled_size(side, side, s)[0] for s in cfg.scales) > LARGEST_SIDE:
    side -= 1
  return min(cfg.max_side, side) if cfg.max_side else side


def batch_rows(cfg: ExtractConfig, n_dev: int, hw: tuple[int, int]) -> int:
  """Rows of a full batch of spatial shape hw: batch_size rounded up to a multiple of the device
  count, fewer (still a multiple, at least n_dev) where it would exceed MAX_BATCH_PIXELS."""
  cap = int(math.ceil(max(cfg.batch_size, n_dev) / n_dev) * n_dev)
  fit = MAX_BATCH_PIXELS // max(1, int(hw[0]) * int(hw[1])) // n_dev * n_dev
  return max(n_dev, min(cap, fit))


def padded_batch(n: int, cfg: ExtractConfig, n_dev: int, hw: tuple[int, int]) -> int:
  """The batch size n images of shape hw run at: the full batch in pad mode (one compilation per
  canvas), else the next power of two times the device count, at most the full batch."""
  cap = batch_rows(cfg, n_dev, hw)
  b = max(n_dev, 1)
  while b < n:
    b *= 2
  if cfg.pad and n <= cap:
    return cap
  return min(b, cap) if n <= cap else b


def allowed_sides(cfg: ExtractConfig, limit: int = LARGEST_SIDE) -> np.ndarray:
  """Sorted side lengths the buckets snap to."""
  b = cfg.bucket
  if not b:
    return np.zeros(0, np.int64)
  if not cfg.geometric_from:
    return np.arange(b, limit + 1, b, dtype=np.int64)
  sides = list(range(b, max(cfg.geometric_from, b) + 1, b))
  x = float(cfg.geometric_from)
  ratio = 2.0 ** (1.0 / cfg.steps_per_octave)
  while x < limit:
    x *= ratio
    v = int(round(x / b)) * b
    if v > sides[-1]:
      sides.append(v)
  return np.array(sides, np.int64)


def bucket_side(n: int, cfg: ExtractConfig, sides: Optional[np.ndarray] = None) -> int:
  """Nearest allowed side (in log space); exact `n` when bucketing is off. At least min_side."""
  n = max(int(n), cfg.min_side)
  if not cfg.bucket:
    return n
  sides = allowed_sides(cfg) if sides is None else sides
  sides = sides[sides >= cfg.min_side]
  j = int(np.argmin(np.abs(np.log(sides / n))))
  return int(sides[j])


def target_size(h: int, w: int, scale: float, cfg: ExtractConfig, sides=None) -> tuple[int, int]:
  th, tw = scaled_size(h, w, scale)
  if cfg.pad:
    return max(th, cfg.min_side), max(tw, cfg.min_side)
  return bucket_side(th, cfg, sides), bucket_side(tw, cfg, sides)


def canvas_sides(cfg: ExtractConfig, limit: int = LARGEST_SIDE, crops: bool = False) -> np.ndarray:
  """The canvas side ladder of `pad` mode: multiples of 32 up to 256, then geometric steps
  (`crop_canvas_steps_per_octave` per octave for query crops, else `canvas_steps_per_octave`)."""
  sides = list(range(32, 257, 32))
  steps = cfg.crop_canvas_steps_per_octave if crops else cfg.canvas_steps_per_octave
  ratio = 2.0 ** (1.0 / steps)
  x = 256.0
  while sides[-1] < limit:
    x *= ratio
    sides.append(max(sides[-1] + 32, int(math.ceil(x / 32)) * 32))
  return np.array(sides, np.int64)


def canvas_side(n: int, sides: np.ndarray) -> int:
  """Smallest ladder side >= n."""
  j = int(np.searchsorted(sides, n))
  if j == len(sides):
    raise ValueError(f'image side {n} exceeds the largest canvas {int(sides[-1])}')
  return int(sides[j])


def batch_key(th: int, tw: int, cfg: ExtractConfig, sides: np.ndarray) -> tuple[int, int]:
  """The spatial shape an image resized to (th, tw) is run at (its canvas in pad mode)."""
  if cfg.pad:
    return canvas_side(th, sides), canvas_side(tw, sides)
  return th, tw


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear resize of (H, W, 3) uint8 (OpenCV INTER_LINEAR, half-pixel centres)."""
  if img.shape[0] == height and img.shape[1] == width:
    return np.ascontiguousarray(img)
  return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=cv2.INTER_LINEAR)


def prepare_image(
  image: np.ndarray | bytes, bbx: Optional[Sequence[float]], cfg: ExtractConfig
) -> np.ndarray:
  """Decoded (and cropped, capped) uint8 RGB image before scaling."""
  img = decode.decode_rgb(image) if isinstance(image, (bytes, bytearray)) else np.asarray(image)
  if img.dtype != np.uint8:
    img = np.clip(img, 0, 255).astype(np.uint8)
  if bbx is not None:
    y0, y1, x0, x1 = crop_box(bbx, img.shape[0], img.shape[1], cfg.crop_rounding)
    img = img[y0:y1, x0:x1]
  h, w = capped_size(img.shape[0], img.shape[1], long_side_cap(cfg))
  return resize_bilinear(img, h, w)


# ----------------------------------------------------------------------------- extraction


def local_mesh() -> Mesh:
  return Mesh(np.array(jax.local_devices()), ('data',))


def ordered_map(fn, items, workers: int, window: int = 64):
  """map(fn, items) on a thread pool (decoders and cv2 release the GIL), in order, bounded."""
  if workers <= 0:
    yield from map(fn, items)
    return
  with futures.ThreadPoolExecutor(workers) as pool:
    queue = collections.deque()
    for item in items:
      queue.append(pool.submit(fn, item))
      if len(queue) >= window:
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()


class Extractor:
  """Holds the jitted, sharded forward pass; counts compilations, batches and batch slots.

  `rows_run` counts the (image, scale) rows sent to the model, `slots_run` the batch rows run
  including the padding rows that fill a batch to its size (so rows_run / slots_run is the share of
  the device's work that was real images).
  """

  def __init__(
    self,
    apply_fn: Callable[..., jax.Array],
    variables: Any,
    cfg: ExtractConfig,
    mesh: Optional[Mesh] = None,
    profile: Optional[profiling.Window] = None,
  ):
    """`profile`: a profiler window over the batches run (counted from 0 across calls)."""
    self.cfg = cfg
    self.profile = profile
    self.batches_run = 0
    self.rows_run = 0
    self.slots_run = 0
    self.mesh = mesh or local_mesh()
    self.n_dev = self.mesh.devices.size
    self._replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P('data'))
    self.variables = jax.device_put(variables, self._replicated)

    def forward(variables, images, valid_hw):
      if valid_hw is None:
        d = apply_fn(variables, images)
      else:
        d = apply_fn(variables, images, valid_hw=valid_hw)
      d = d.astype(jnp.float32)
      return l2_normalize(d)

    self._forward = jax.jit(forward, out_shardings=self.batch_sharding)
    self.shapes_seen: set[tuple[int, ...]] = set()
    self.sides = allowed_sides(cfg)
    self.canvas = canvas_sides(cfg)
    self.crop_canvas = canvas_sides(cfg, crops=True)

  def set_variables(self, variables: Any) -> None:
    """New weights of the same shapes: the compiled forward passes are reused (an in-training
    evaluation compiles nothing after the first one)."""
    self.variables = jax.device_put(variables, self._replicated)

  @property
  def compile_count(self) -> int:
    """Distinct input shapes run so far (= XLA compilations of the forward pass)."""
    return len(self.shapes_seen)

  def run_batch(
    self, images: list[np.ndarray], canvas: Optional[tuple[int, int]] = None
  ) -> jax.Array:
    """Unit-norm descriptors (len(images), D) of uint8 images (async).

    Without `canvas` the images share one shape; with it (pad mode) each is placed top-left in a
    zero canvas of that (H, W) and the model gets their sizes as valid_hw.
    """
    n = len(images)
    shape = images[0].shape if canvas is None else tuple(canvas) + images[0].shape[2:]
    b = padded_batch(n, self.cfg, self.n_dev, shape[:2])
    batch = np.zeros((b,) + shape, np.uint8)
    valid_hw = None
    if canvas is None:
      batch[:n] = np.stack(images)
    else:
      valid_hw = np.full((b, 2), min(shape[0], shape[1]), np.int32)  # padding rows: any size
      for k, im in enumerate(images):
        batch[k, : im.shape[0], : im.shape[1]] = im
        valid_hw[k] = im.shape[:2]
      valid_hw = jax.device_put(valid_hw, self.batch_sharding)
    self.shapes_seen.add(batch.shape)
    i = self.batches_run
    self.batches_run += 1
    self.rows_run += n
    self.slots_run += b
    if self.profile is not None:
      self.profile.before(i)
    with profiling.step_region('extract', i):
      out = self._forward(self.variables, jax.device_put(batch, self.batch_sharding), valid_hw)
    if self.profile is not None:
      self.profile.after(i, out)
    return out[:n]

  def extract_own(
    self,
    examples: Iterable[Mapping[str, Any]],
    *,
    progress: Optional[Callable[[int], None]] = None,
    presharded: bool = False,
    num: Optional[int] = None,
  ) -> tuple[np.ndarray, np.ndarray]:
    """(indices (m,) int64, descriptors (m, D) float32) of THIS process's examples, in the order
    they came; nothing is gathered.

    presharded: the examples are already this process's share (the caller read only those, e.g.
      `own_share`); otherwise this process takes every process_count-th example of the iterable
      (every process then reads every example's bytes: prefer `presharded`).
    num: when given, every index must be in [0, num).
    """
    run = _OwnExtraction(self, progress)
    for idx, scaled in ordered_map(
      self.scaled_images, _own_examples(examples, presharded, num), self.cfg.num_workers
    ):
      run.add(idx, scaled)
    return run.finish()

  def scaled_images(
    self, item: tuple[int, Mapping[str, Any]]
  ) -> tuple[int, list[tuple[tuple[int, int], np.ndarray]]]:
    """(index, [(batch key, resized uint8 image) per scale]) of one (index, example): what
    `extract_own` batches by key, a full batch being `batch_rows(cfg, n_dev, key)` rows."""
    idx, ex = item
    cfg = self.cfg
    img = prepare_image(ex['image'], ex.get('bbx', None), cfg)
    ladder = self.canvas if ex.get('bbx', None) is None else self.crop_canvas
    out = []
    for s in cfg.scales:
      th, tw = target_size(img.shape[0], img.shape[1], s, cfg, self.sides)
      out.append((batch_key(th, tw, cfg, ladder), resize_bilinear(img, th, tw)))
    return idx, out

  def extract(
    self,
    examples: Iterable[Mapping[str, Any]],
    num: int,
    progress: Optional[Callable[[int], None]] = None,
    *,
    presharded: bool = False,
  ) -> np.ndarray:
    """Descriptors (num, D) float32, row ex['index'] for each example, on every process.

    examples: dicts with 'index' (int), 'image' (encoded bytes or uint8 HWC array) and optionally
      'bbx' ([x1, y1, x2, y2], queries only: the crop). With several processes and `presharded`,
      each process passes only its own share (`own_share(num)`), so it reads only those bytes;
      the processes then exchange only their own rows (one (num / process_count, D) block each).
    """
    idx, desc = self.extract_own(examples, progress=progress, presharded=presharded, num=num)
    nproc = jax.process_count()
    dim = desc.shape[1]
    if nproc > 1:  # A process given no image must still join the gathers with the right shape.
      counts = multihost_utils.process_allgather(np.asarray([idx.size, dim], np.int32))
      dim, cap = int(counts[:, 1].max()), int(counts[:, 0].max())
      own = np.zeros((cap, dim), np.float32)
      own[: idx.size] = desc if idx.size else 0
      own_idx = np.full(cap, -1, np.int64)
      own_idx[: idx.size] = idx
      idx = multihost_utils.process_allgather(own_idx).reshape(-1)
      desc = multihost_utils.process_allgather(own).reshape(-1, dim)
      keep = idx >= 0
      idx, desc = idx[keep], desc[keep]
    out = np.zeros((num, dim), np.float32)
    have = np.zeros(num, bool)
    out[idx] = desc
    have[idx] = True
    if not have.all():
      missing = np.flatnonzero(~have)
      raise ValueError(
        f'{missing.size} of {num} indices got no example (first: {missing[:5].tolist()})'
      )
    return out


def _own_examples(
  examples: Iterable[Mapping[str, Any]], presharded: bool, num: Optional[int]
) -> Iterator[tuple[int, Mapping[str, Any]]]:
  """(index, example) of this process's examples: all of them when `presharded`, else every
  process_count-th; an index outside [0, num) is an error."""
  pid, nproc = jax.process_index(), jax.process_count()
  for k, ex in enumerate(examples):
    if presharded or k % nproc == pid:
      idx = int(ex['index'])
      if num is not None and not 0 <= idx < num:
        raise ValueError(f'example index {idx} outside [0, {num})')
      yield idx, ex


class _OwnExtraction:
  """One `Extractor.extract_own` call: the scaled images waiting for a full batch (`pending`, by
  batch key), the batches running on the devices (`inflight`, at most 2 beyond the newest) and the
  per-image sum (mean pooling) or running max of the scale descriptors (`pooled`)."""

  def __init__(self, extractor: 'Extractor', progress: Optional[Callable[[int], None]]):
    self.extractor, self.cfg, self.progress = extractor, extractor.cfg, progress
    self.use_max = self.cfg.scale_pool == 'max'
    self.order: list[int] = []
    self.seen: set[int] = set()
    self.pending: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
    self.inflight: list[tuple[list[int], jax.Array]] = []
    self.pooled: dict[int, np.ndarray] = {}
    self.done = 0

  def add(self, idx: int, scaled: list[tuple[tuple[int, int], np.ndarray]]) -> None:
    """Queues the scaled images of example `idx`; runs every batch that becomes full."""
    if idx in self.seen:
      raise ValueError(f'example index {idx} given twice')
    self.seen.add(idx)
    self.order.append(idx)
    for key, im in scaled:
      self.pending.setdefault(key, []).append((idx, im))
      if len(self.pending[key]) >= batch_rows(self.cfg, self.extractor.n_dev, key):
        self.run(key)

  def run(self, key: tuple[int, int]) -> None:
    """Starts the batch of the images pending under `key`; collects all but the newest 2."""
    items = self.pending.pop(key)
    canvas = key if self.cfg.pad else None
    out = self.extractor.run_batch([im for _, im in items], canvas)
    self.inflight.append(([i for i, _ in items], out))
    self.collect(2)

  def collect(self, keep: int) -> None:
    """Pools the results of the oldest batches until `keep` are in flight."""
    while len(self.inflight) > keep:
      idx, out = self.inflight.pop(0)
      for i, v in zip(idx, np.asarray(out)):
        self.pool(i, v)
      self.done += len(idx)
      if self.progress:
        self.progress(self.done)

  def pool(self, i: int, v: np.ndarray) -> None:
    if i not in self.pooled:
      self.pooled[i] = v.astype(np.float32)  # a new array (astype copies)
    elif self.use_max:
      self.pooled[i] = np.maximum(self.pooled[i], v)
    else:
      self.pooled[i] = self.pooled[i] + v

  def finish(self) -> tuple[np.ndarray, np.ndarray]:
    """Runs what is pending, waits for everything; (indices, unit descriptors) in arrival order."""
    for key in list(self.pending):
      self.run(key)
    self.collect(0)
    if not self.order:
      return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    n_scales = len(self.cfg.scales)
    rows = [
      l2_normalize(self.pooled[i] if self.use_max else self.pooled[i] / n_scales)
      for i in self.order
    ]
    return np.asarray(self.order, np.int64), np.stack(rows).astype(np.float32)


def own_share(num: int) -> range:
  """The example indices this process extracts (`Extractor.extract(..., presharded=True)`):
  every process_count-th from process_index."""
  return range(jax.process_index(), num, jax.process_count())


def simulate_shapes(
  sizes: Sequence[tuple[int, int]],
  boxes: Sequence[Optional[Sequence[float]]],
  cfg: ExtractConfig,
  n_dev: int = 1,
) -> set[tuple[int, int, int]]:
  """The (batch, H, W) inputs Extractor.extract would compile for images of these (H, W) sizes
  (boxes: query crops or None), without running anything. len() = the compile count."""
  sides = allowed_sides(cfg)
  canvas, crop_canvas = canvas_sides(cfg), canvas_sides(cfg, crops=True)
  counts: dict[tuple[int, int], int] = {}
  for (h, w), bbx in zip(sizes, boxes):
    if bbx is not None:
      y0, y1, x0, x1 = crop_box(bbx, h, w, cfg.crop_rounding)
      h, w = y1 - y0, x1 - x0
    h, w = capped_size(h, w, long_side_cap(cfg))
    for s in cfg.scales:
      t = batch_key(*target_size(h, w, s, cfg, sides), cfg, canvas if bbx is None else crop_canvas)
      counts[t] = counts.get(t, 0) + 1
  shapes = set()
  for (th, tw), c in counts.items():
    full = batch_rows(cfg, n_dev, (th, tw))
    if c >= full:
      shapes.add((full, th, tw))  # a full batch runs at its own size
    if c % full:
      shapes.add((padded_batch(c % full, cfg, n_dev, (th, tw)), th, tw))
  return shapes


def extract_descriptors(
  apply_fn, variables, images_iter, *, num: int, cfg: ExtractConfig, **cfg_overrides
) -> np.ndarray:
  """Functional form: (num, D) unit-norm multi-scale descriptors (see Extractor.extract)."""
  cfg = dataclasses.replace(cfg, **cfg_overrides)
  return Extractor(apply_fn, variables, cfg).extract(images_iter, num)
