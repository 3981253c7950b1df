"""Training inputs: opens the configured dataset and builds per-process batch iterators.

`open_data(config)` -> Data for `config.data.dataset`: a prepared TFDS name ('gldv2/clean',
'folder/NAME'; read with grain through `dolg_jax.data.grain_pipeline`; with `data.make_fixture`
the small GLDv2 fixture, built on first use), FileNotFoundError when it is not prepared; or
'synthetic'. `train_iterator` yields host-local {'image': uint8 (B, S, S, 3), 'label': int32 (B,)}
(+ 'lighting': float32 (B, 3) with `data.augmentation='official'`, the PCA lighting offset on the
[0, 255] scale) and has JSON-serialisable `get_state()` / `set_state()`; `device_batch` makes the
global batch on the devices (the offset added there); `validation_passes` the validation batches.
"""

import dataclasses
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from dolg_jax import sharding as shd
from dolg_jax.data import folder
from dolg_jax.data import gldv2
from dolg_jax.data import grain_pipeline
from dolg_jax.data import record_check
from dolg_jax.data.synthetic import gldv2_fixture
from dolg_jax.training import manifest


@dataclasses.dataclass
class Data:
  """An opened dataset."""

  train_source: Any
  val_source: Any
  num_train_examples: int
  num_classes: int
  manifest: dict


def data_seed(config: ml_collections.ConfigDict) -> int:
  return int(config.seed) + 1


# --------------------------------------------------------------------------- synthetic
class SyntheticIterator:
  """Deterministic synthetic batches: example i of class i % C is a class colour plus noise.

  Process p of P yields rows [p*B/P, (p+1)*B/P) of each global batch, so the union over processes
  is independent of the process count.
  """

  def __init__(
    self,
    *,
    image_size: int,
    num_classes: int,
    global_batch: int,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    self.image_size, self.num_classes = image_size, num_classes
    self.global_batch, self.seed = global_batch, seed
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.step = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def _example(self, i: int) -> tuple[np.ndarray, int]:
    label = i % self.num_classes
    rng = np.random.default_rng([self.seed, i])
    colour = np.random.default_rng([self.seed, 10**9 + label]).integers(0, 256, 3)
    noise = rng.normal(0.0, 40.0, (self.image_size, self.image_size, 3))
    return np.clip(colour + noise, 0, 255).astype(np.uint8), label

  def __next__(self) -> dict[str, np.ndarray]:
    base = self.step * self.global_batch + self.offset
    examples = [self._example(base + j) for j in range(self.local)]
    self.step += 1
    return {
      'image': np.stack([e[0] for e in examples]),
      'label': np.array([e[1] for e in examples], np.int32),
    }

  def get_state(self) -> dict[str, Any]:
    return {'step': self.step}

  def set_state(self, state: dict[str, Any]) -> None:
    self.step = int(state['step'])


SYNTHETIC_TRAIN_EXAMPLES = 1 << 20
SYNTHETIC_CLASSES = 1000


# --------------------------------------------------------------------------- public
@jax.jit
def _add_lighting(image: jax.Array, lighting: jax.Array) -> jax.Array:
  return image.astype(jnp.float32) + lighting.astype(jnp.float32)[:, None, None, :]


def device_batch(mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's batch -> the global batch on the devices (`sharding.global_batch`); a batch
  with 'lighting' (augmentation='official') becomes {'image': float32 image + offset, 'label'},
  the addition done on the devices (same sharding as the image)."""
  batch = shd.global_batch(mesh, local_batch)
  if 'lighting' in batch:
    lighting = batch.pop('lighting')
    batch['image'] = _add_lighting(batch['image'], lighting)
  return batch


def open_data(config: ml_collections.ConfigDict) -> Data:
  """Opens the training dataset named by `config.data.dataset`."""
  d = config.data
  if d.dataset == 'synthetic':
    n_classes = config.head.num_classes or SYNTHETIC_CLASSES
    return Data(
      None,
      None,
      SYNTHETIC_TRAIN_EXAMPLES,
      n_classes,
      {'name': 'synthetic', 'num_classes': n_classes},
    )
  return _open_tfds(config)


def train_iterator(config: ml_collections.ConfigDict, data: Data, *, per_host_batch: int):
  """This process's training iterator (state restorable with `set_state`)."""
  if config.data.dataset == 'synthetic':
    return SyntheticIterator(
      image_size=config.data.image_size,
      num_classes=data.num_classes,
      global_batch=config.train.global_batch_size,
      seed=data_seed(config),
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
  return grain_pipeline.make_train_iterator(
    config,
    data.train_source,
    seed=data_seed(config),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    per_host_batch=per_host_batch,
  )


def validation_passes(config: ml_collections.ConfigDict, data: Data, per_host_batch: int):
  """This process's validation batches (each with a 'mask') as passes repeatable through one set of
  input workers (`grain_pipeline.ValidationPasses`; the first config.train.eval_batches batches
  when > 0); None without a validation split."""
  if data.val_source is None:
    return None
  return grain_pipeline.make_validation_passes(
    config,
    data.val_source,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    per_host_batch=per_host_batch,
    max_batches=int(config.train.eval_batches),
  )


def _open_tfds(config: ml_collections.ConfigDict) -> Data:
  """Opens a prepared GLDv2 or folder TFDS dataset (building the fixture first when configured)."""
  d = config.data
  data_dir = os.path.expanduser(d.data_dir) if d.data_dir else None
  if d.get('make_fixture', False):
    if not data_dir:
      raise ValueError('config.data.make_fixture needs config.data.data_dir.')
    error = None
    if jax.process_index() == 0:
      try:
        gldv2_fixture.ensure_fixture_dataset(data_dir, dataset=d.dataset)
      except Exception as e:  # noqa: BLE001  # re-raised below, after telling the others
        error = e
    if jax.process_count() > 1:
      # Every process learns whether process 0 succeeded (instead of waiting for it forever).
      ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
      if not ok and error is None:
        raise RuntimeError(
          f'process 0 failed to build the fixture dataset in {data_dir}; see its log'
        )
    if error is not None:
      raise error
  open_builder = folder.builder if folder.is_folder_dataset(d.dataset) else gldv2.builder
  builder = open_builder(d.dataset, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
      f'config.data.dataset={d.dataset!r} is not prepared under config.data.data_dir='
      f'{d.data_dir!r} ({builder.data_path}); run `python -m dolg_jax.data.prepare` first.'
    )
  sources = builder.as_data_source()
  info = builder.info
  splits = {name: int(split.num_examples) for name, split in info.splits.items()}
  n_classes = int(info.metadata['num_classes'])
  record = {
    'name': d.dataset,
    'version': str(info.version),
    'data_path': os.fspath(builder.data_path),
    'splits': splits,
    'num_classes': n_classes,
    # Build options: listing (gldv2) or folder / labels file, validation fraction,
    # exclusion list (file + sha256).
    'build_options': info.metadata.get('build_options'),
    # Only process 0 writes the manifest: the others skip reading every shard.
    'fingerprint': (
      manifest.directory_fingerprint(os.fspath(builder.data_path))
      if jax.process_index() == 0
      else None
    ),
  }
  named = {k: record_check.NamedSource(v, d.dataset, data_dir or '') for k, v in sources.items()}
  return Data(named['train'], named.get('validation'), len(sources['train']), n_classes, record)
