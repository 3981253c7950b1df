"""Deterministic, resumable, per-process-sharded grain input pipelines for GLDv2.

`make_train_iterator(config, data_source, seed=, per_host_batch=)` -> `TrainIterator` of batches
{'image': uint8 (B, S, S, 3), 'label': int32 (B,)} (and 'lighting' (B, 3) float32 with the official
augmentation): reshuffled every epoch, this process's 1/process_count share; `get_state()` /
`set_state()` resume at exactly the next batch with any number of workers (training checkpoints
store that state with training.checkpointing.IteratorStateHandler, not grain's CheckpointSave).
`make_eval_iterator` / `make_validation_passes`: central square crops in source order, the same
number of batches on every process, padding with `mask` False. Bad config.data values raise
ValueError (`check_config`). Pipeline order, determinism, decoding: docs/design_notes.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

from absl import flags
import grain
import jax
import numpy as np

from dolg_jax import config_rules as rules
from dolg_jax.data import decode
from dolg_jax.data import official_augment

_U32 = 2**32
DECODE_ROUTES = ('exact', 'fast')


def _data_config(config):
  """Accepts the full config (uses config.data) or the data section itself."""
  return config.data if 'data' in config else config


def fast_decode(cfg) -> bool:
  """True for `config.data.decode` = 'fast', False for 'exact'; anything else is an error."""
  return rules.check_value('data.decode', cfg.decode, CONFIG_RULES['data.decode']) == 'fast'


def _crop_range(max_: float) -> rules.Rule:
  """(min, max) with 0 < min <= max (<= `max_`)."""
  bound = ' <= 1' if max_ == 1 else ''
  return rules.Rule(
    f'must be (min, max) with 0 < min <= max{bound}',
    lambda v: (
      isinstance(v, (tuple, list))
      and len(v) == 2
      and all(map(rules.is_number, v))
      and 0.0 < v[0] <= v[1] <= max_
    ),
  )


AUGMENTATIONS = ('paper', 'official')
CONFIG_RULES = {
  'data.augmentation': rules.one_of(AUGMENTATIONS),
  'data.decode': rules.one_of(DECODE_ROUTES),
  'data.image_size': rules.POSITIVE_INT,
  'data.random_flip': rules.BOOL,
  'data.crop_scale': _crop_range(1.0),
  'data.crop_ratio': _crop_range(float('inf')),
  **{
    f'data.{f}': rules.NON_NEGATIVE_INT
    for f in ('num_workers', 'prefetch_buffer_size', 'read_threads', 'worker_buffer_size')
  },
}


def check_config(config) -> None:
  """ValueError `config.PATH=VALUE: allowed` for a data field the pipeline cannot use."""
  rules.check(config, CONFIG_RULES)


@dataclasses.dataclass(frozen=True)
class TrainTransform:
  """(index, record) -> {'image': uint8 (S, S, 3), 'label': int32} (+ 'lighting' for 'official').

  `augmentation` 'paper': random-resized crop (area in `scale`, log-uniform aspect in `ratio`) and
  flip; 'official': `official_augment.official_train_example` (the pycls/DOLG recipe), whose
  'lighting' (float32 (3,), [0, 255] scale) is added on the device. `index` is the global position
  in the repeated, shuffled stream; the RNG is Philox seeded from (seed, epoch, index in epoch).
  ValueError for 'official' with crop_scale[1] != 1 and for 'paper' with lighting_std != 0.
  """

  image_size: int
  scale: Tuple[float, float]
  ratio: Tuple[float, float]
  flip: bool
  seed: int
  epoch_length: int
  fast_decode: bool
  augmentation: str
  lighting_std: float

  def __post_init__(self):
    rules.check_value('data.augmentation', self.augmentation, CONFIG_RULES['data.augmentation'])
    if self.augmentation == 'official' and self.scale[1] != 1.0:
      raise ValueError(
        f"config.data.crop_scale={self.scale}: augmentation='official' draws the "
        'area fraction from crop_scale[0] to 1; set crop_scale[1] to 1.0'
      )
    if self.augmentation == 'paper' and self.lighting_std:
      raise ValueError(
        f'config.data.lighting_std={self.lighting_std}: lighting noise is part of '
        "augmentation='official' only; set it to 0 or use the official recipe"
      )

  def rng(self, index: int) -> np.random.Generator:
    epoch, position = divmod(int(index), self.epoch_length)
    return np.random.Generator(
      np.random.Philox(np.random.SeedSequence([self.seed % _U32, epoch, position]))
    )

  def __call__(self, index: int, record: Dict[str, Any]) -> Dict[str, np.ndarray]:
    rng = self.rng(index)
    data = record['image']
    if self.augmentation == 'official':
      image, lighting = official_augment.official_train_example(
        data,
        self.image_size,
        rng,
        area_frac=self.scale[0],
        ratio=self.ratio,
        flip=self.flip,
        lighting_std=self.lighting_std,
      )
      return {'image': image, 'lighting': lighting, 'label': np.int32(record['label'])}
    hw = decode.image_size(data)
    box = decode.random_resized_crop_box(rng, hw, self.scale, self.ratio)
    flip = bool(self.flip and rng.random() < 0.5)
    image = decode.decode_crop_resize(
      data, box, (self.image_size, self.image_size), image_hw=hw, flip=flip, fast=self.fast_decode
    )
    return {'image': image, 'label': np.int32(record['label'])}


@dataclasses.dataclass(frozen=True)
class EvalTransform:
  """record -> {'image': uint8 (S, S, 3) central square resized, 'label': int32, 'mask': bool}."""

  image_size: int
  fast_decode: bool

  def __call__(self, record: Dict[str, Any]) -> Dict[str, np.ndarray]:
    size = self.image_size
    if not record:  # Padding element (an empty dict: grain drops None elements).
      return {
        'image': np.zeros((size, size, 3), np.uint8),
        'label': np.int32(-1),
        'mask': np.bool_(False),
      }
    data = record['image']
    hw = decode.image_size(data)
    image = decode.decode_crop_resize(
      data, decode.center_square_box(hw), (size, size), image_hw=hw, fast=self.fast_decode
    )
    return {'image': image, 'label': np.int32(record['label']), 'mask': np.bool_(True)}


class _ShardedPaddedSource:
  """Records process_index::process_count of `source`, then {} up to `length` (picklable)."""

  def __init__(self, source, process_index: int, process_count: int, length: int):
    self._source = source
    self._indices = range(process_index, len(source), process_count)
    self._length = length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, i: int):
    if i < len(self._indices):
      return self._source[self._indices[i]]
    return {}


def _check_process(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, process_count={process_count})')
  return int(process_index), int(process_count)


def _to_iterator(
  ds: grain.MapDataset, cfg, num_workers: Optional[int], read_threads: Optional[int]
) -> grain.DatasetIterator:
  num_workers = int(cfg.num_workers if num_workers is None else num_workers)
  read_threads = int(cfg.read_threads if read_threads is None else read_threads)
  buffer = max(int(cfg.prefetch_buffer_size), read_threads)
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=buffer)
  )
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use
      flags.FLAGS.mark_as_parsed()  # their defaults.
    it_ds = it_ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=int(cfg.worker_buffer_size)
      )
    )
  return iter(it_ds)


def train_dataset(
  config,
  data_source,
  *,
  seed: int,
  process_index: int,
  process_count: int,
  per_host_batch: int,
  num_epochs: Optional[int] = None,
) -> grain.MapDataset:
  """The training pipeline as a grain MapDataset of batches (random access by step)."""
  cfg = _data_config(config)
  n = len(data_source)
  usable = n - n % process_count
  per_process = usable // process_count
  if per_process < per_host_batch:
    raise ValueError(
      f'{n} training records over {process_count} process(es) give {per_process} '
      f'per process: fewer than one batch of {per_host_batch}'
    )
  transform = TrainTransform(
    image_size=int(cfg.image_size),
    scale=tuple(float(x) for x in cfg.crop_scale),
    ratio=tuple(float(x) for x in cfg.crop_ratio),
    flip=bool(cfg.random_flip),
    seed=int(seed),
    epoch_length=n,
    fast_decode=fast_decode(cfg),
    augmentation=str(cfg.augmentation),
    lighting_std=float(cfg.lighting_std),
  )
  ds = grain.MapDataset.source(data_source)
  ds = ds.shuffle(seed=int(seed) % _U32)  # Reshuffled each epoch (seed + epoch).
  ds = ds.map_with_index(transform)  # Index = global position in the stream.
  ds = ds[:usable][process_index::process_count]
  ds = ds.batch(per_host_batch, drop_remainder=True)
  return ds.repeat(num_epochs)


class TrainIterator(grain.DatasetIterator):
  """Iterator over the training batches whose state is just the step (portable, exact).

  `get_state()` -> {'next_step': n, plus the arguments that define the stream}; `set_state` (on an
  iterator built with the same arguments, any num_workers or read_threads) resumes at batch n. A
  state of other stream arguments (seed, process_index/count, per_host_batch, dataset size,
  image_size) is refused with a ValueError.
  """

  def __init__(self, ds: grain.MapDataset, make_iter, stream: Dict[str, Any]):
    super().__init__()
    self._ds = ds
    self._make_iter = make_iter
    self._stream = dict(stream)
    self._next_step = 0
    self._inner: Optional[grain.DatasetIterator] = None

  @property
  def next_step(self) -> int:
    """Index of the batch the next `next()` returns (batches consumed so far)."""
    return self._next_step

  def _ensure_inner(self) -> grain.DatasetIterator:
    if self._inner is None:
      self._inner = self._make_iter(self._ds[self._next_step :])
    return self._inner

  def __next__(self) -> Dict[str, np.ndarray]:
    self._assert_not_closed()
    batch = next(self._ensure_inner())
    self._next_step += 1
    return batch

  def get_state(self) -> Dict[str, Any]:
    return {'next_step': self._next_step, **self._stream}

  def set_state(self, state: Dict[str, Any]) -> None:
    diffs = [
      f'{k}: saved {state.get(k)!r}, now {v!r}'
      for k, v in self._stream.items()
      if state.get(k) != v
    ]
    if diffs:
      raise ValueError(
        'the saved input-pipeline state belongs to a different stream ('
        + '; '.join(diffs)
        + '); restore with the same data arguments or start '
        'the data iterator afresh'
      )
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    self._next_step = int(state['next_step'])

  def start_prefetch(self) -> None:
    self._ensure_inner().start_prefetch()

  def close(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None
    super().close()

  def __str__(self) -> str:
    return f'TrainIterator(next_step={self._next_step}, {self._stream})'


def make_train_iterator(
  config,
  data_source,
  *,
  seed: int,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  per_host_batch: int,
  num_epochs: Optional[int] = None,
  num_workers: Optional[int] = None,
  read_threads: Optional[int] = None,
) -> TrainIterator:
  """Iterator of {'image': (B, S, S, 3), 'label': int32 (B,)} for this process.

  Images are uint8; with `augmentation='official'` each batch also holds 'lighting' (B, 3) float32,
  the per-example lighting offset to add on the device (training.inputs.device_batch).

  Args:
    config: full config (uses config.data) or its data section: image_size, augmentation,
      crop_scale, crop_ratio, random_flip, lighting_std, decode, num_workers, read_threads,
      prefetch_buffer_size, worker_buffer_size.
    data_source: random-access source of records with 'image' (encoded bytes) and 'label'
      (e.g. `gldv2.data_sources(dataset, data_dir)['train']`).
    seed: shuffle and augmentation seed (the same on every process).
    process_index, process_count: this process's shard (default: jax.process_index/count()).
    per_host_batch: global batch // process_count.
    num_epochs: None repeats forever; an epoch is (N // process_count) // per_host_batch steps.
    num_workers, read_threads: override config (0 workers = in-process; output is identical).

  Returns:
    A `TrainIterator` (a grain DatasetIterator): `next(it)`, `it.get_state()`,
    `it.set_state(state)`, `it.close()`.
  """
  process_index, process_count = _check_process(process_index, process_count)
  cfg = _data_config(config)
  ds = train_dataset(
    config,
    data_source,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    per_host_batch=per_host_batch,
    num_epochs=num_epochs,
  )
  stream = {
    'seed': int(seed),
    'process_index': process_index,
    'process_count': process_count,
    'per_host_batch': int(per_host_batch),
    'num_records': len(data_source),
    'image_size': int(cfg.image_size),
  }
  make_iter = functools.partial(
    _to_iterator, cfg=cfg, num_workers=num_workers, read_threads=read_threads
  )
  return TrainIterator(ds, make_iter, stream)


def steps_per_epoch(num_records: int, *, process_count: int, per_host_batch: int) -> int:
  """Training steps in one epoch of `make_train_iterator` (the one place this is computed; equal
  to num_records // (process_count * per_host_batch) since floor(floor(n/p)/b) = floor(n/(p b)))."""
  return (num_records - num_records % process_count) // process_count // per_host_batch


def eval_dataset(
  config, data_source, *, process_index: int, process_count: int, per_host_batch: int
) -> grain.MapDataset:
  cfg = _data_config(config)
  n = len(data_source)
  per_process = math.ceil(n / process_count)
  num_batches = math.ceil(per_process / per_host_batch)
  source = _ShardedPaddedSource(
    data_source, process_index, process_count, num_batches * per_host_batch
  )
  ds = grain.MapDataset.source(source).map(EvalTransform(int(cfg.image_size), fast_decode(cfg)))
  return ds.batch(per_host_batch, drop_remainder=False)


def make_eval_iterator(
  config,
  data_source,
  *,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  per_host_batch: int,
  num_workers: Optional[int] = None,
  read_threads: Optional[int] = None,
) -> grain.DatasetIterator:
  """One pass over `data_source` (e.g. the 'validation' split), this process's share.

  Yields {'image': uint8 (B, S, S, 3), 'label': int32 (B,), 'mask': bool (B,)}; every process
  yields ceil(ceil(N / process_count) / per_host_batch) batches; padding has mask False and
  label -1.
  """
  process_index, process_count = _check_process(process_index, process_count)
  ds = eval_dataset(
    config,
    data_source,
    process_index=process_index,
    process_count=process_count,
    per_host_batch=per_host_batch,
  )
  return _to_iterator(ds, _data_config(config), num_workers, read_threads)


class ValidationPasses:
  """Repeated, identical passes over a validation split through one grain iterator.

  `next_pass()` yields the split's `num_batches` batches (the same ones, in the same order, every
  time); workers and read threads start once per run. After a pass left unfinished the next pass
  starts a fresh iterator at batch 0.
  """

  def __init__(self, ds: grain.MapDataset, make_iter):
    self.num_batches = len(ds)
    self._repeated = ds.repeat(None)
    self._make_iter = make_iter
    self._inner: Optional[grain.DatasetIterator] = None
    self._position = 0  # batches consumed in the current pass

  def next_pass(self):
    """A generator of this pass's batches (each a dict as `make_eval_iterator` yields)."""
    if self._position:
      self._close_inner()
    if self._inner is None:
      self._inner = self._make_iter(self._repeated)
    for _ in range(self.num_batches):
      batch = next(self._inner)
      self._position += 1
      yield batch
    self._position = 0

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()
    self._inner, self._position = None, 0

  def close(self) -> None:
    """Stops the worker processes."""
    self._close_inner()


def make_validation_passes(
  config,
  data_source,
  *,
  process_index: Optional[int] = None,
  process_count: Optional[int] = None,
  per_host_batch: int,
  max_batches: int = 0,
  num_workers: Optional[int] = None,
  read_threads: Optional[int] = None,
) -> ValidationPasses:
  """`make_eval_iterator`'s batches (the first `max_batches` when > 0) as repeatable passes; every
  process gets the same `num_batches`."""
  process_index, process_count = _check_process(process_index, process_count)
  ds = eval_dataset(
    config,
    data_source,
    process_index=process_index,
    process_count=process_count,
    per_host_batch=per_host_batch,
  )
  if max_batches > 0:
    ds = ds[:max_batches]
  return ValidationPasses(
    ds,
    functools.partial(
      _to_iterator, cfg=_data_config(config), num_workers=num_workers, read_threads=read_threads
    ),
  )


def first_batches(iterator, n: int) -> Sequence[Dict[str, np.ndarray]]:
  """The next n batches (copies), for tests and debugging."""
  return [{k: np.array(v) for k, v in next(iterator).items()} for _ in range(n)]
