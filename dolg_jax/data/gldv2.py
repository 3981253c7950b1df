"""TFDS builder `gldv2` (Google Landmarks Dataset v2, train set) -> ArrayRecord, without TensorFlow.

Reads the official CSVs and tars (or extracted images) from the manual dir, checking the md5 files
with verify_md5=True. Configs `clean` / `full` hold out validation (val_fraction 0.2), `clean_all`
/ `full_all` do not; suffixes `-val<F>` and `-ex<sha>` (an exclusion list) make further configs.
Writes {image, label, landmark_id, id}, splits 'train' / 'validation', and label_map.csv,
skipped.csv, missing.csv, summary.json beside the data. Absent images raise `MissingImagesError`
(unless allow_missing), truncated tars `TruncatedShardError`, md5 mismatches `ChecksumError`.
Accepted layouts, option naming and split rules: docs/design_notes.md.
"""

from __future__ import annotations

import csv
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from dolg_jax.data import decode
from dolg_jax.data import gldv2_config
from dolg_jax.data import tar_index
from dolg_jax.data.builder_mixin import PackagedBuilder
from dolg_jax.data.build_plan import SPLITS, UNASSIGNED, BuildPlan, Exclusion, MissingImagesError
from dolg_jax.data.build_plan import Record
from dolg_jax.data.class_split import split_per_class
from dolg_jax.data.gldv2_config import resolve_config
from dolg_jax.data.gldv2_listing import exclude_pairs, read_exclusion, read_listing
from dolg_jax.data.md5_check import ChecksumError
from dolg_jax.data.side_files import format_summary, write_side_files
from dolg_jax.data.tar_index import TruncatedShardError, describe_shards, index_shard, read_bytes

# The builder's API, and the names its callers and tests use from here (defined in the modules
# above: build_plan, class_split, gldv2_config, gldv2_listing, md5_check, side_files, tar_index).
__all__ = [
  'ChecksumError',
  'Gldv2',
  'MissingImagesError',
  'TruncatedShardError',
  'UNASSIGNED',
  'builder',
  'data_sources',
  'format_summary',
  'index_shard',
  'make_plan',
  'num_classes',
  'prepare',
  'read_bytes',
  'read_exclusion',
  'read_label_map',
  'resolve_config',
  'split_per_class',
]

_MAX_IDS_IN_MESSAGE = 10


def make_plan(
  manual_dir: str,
  subset: str,
  *,
  val_fraction: float,
  seed: int,
  allow_missing: bool = False,
  check_md5: bool = False,
  exclusion: Optional[Exclusion] = None,
) -> BuildPlan:
  """Parses the listing, applies the exclusion list, splits it, and locates every image (raising
  on missing unless allowed)."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'manual dir {manual_dir} does not exist')
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  pairs = read_listing(manual_dir, subset)
  excluded = None
  if exclusion is not None:
    pairs, excluded = exclude_pairs(pairs, exclusion)
  records, landmark_ids = split_per_class(pairs, val_fraction, seed)
  extracted = os.path.join(manual_dir, 'train')
  extracted_dir = extracted if os.path.isdir(extracted) else None
  locations, shards = tar_index.locate(
    (r.id for r in records), manual_dir, extracted_dir, check_md5=check_md5, md5_dir=manual_dir
  )
  missing = []
  for rec in records:
    rec.location = locations.get(rec.id)
    if rec.location is None:
      missing.append(rec)
  shard_names = [os.path.relpath(s, manual_dir) for s in shards]
  if missing and not allow_missing:
    searched = describe_shards(shard_names)
    if extracted_dir:
      searched += f' and the extracted tree {extracted_dir}'
    first = ', '.join(r.id for r in missing[:_MAX_IDS_IN_MESSAGE])
    raise MissingImagesError(
      f'{len(missing)} of {len(records)} images listed for gldv2/{subset} are absent from '
      f'{manual_dir} (searched {searched}); first ids: {first}. Download the missing shards, '
      'or pass --allow_missing to build without them (they are listed in missing.csv).'
    )
  return BuildPlan(
    records,
    landmark_ids,
    shard_names,
    extracted_dir,
    missing,
    duplicates=len(pairs) - len(records),
    excluded=excluded,
  )


class Gldv2(PackagedBuilder, tfds.core.GeneratorBasedBuilder):
  """Google Landmarks Dataset v2 (train), original JPEG bytes, contiguous labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = gldv2_config.BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = 'clean'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the GLDv2 train set (https://github.com/cvdfoundation/google-landmark) into the manual
  dir: train.csv, train_clean.csv, images_000.tar ... images_499.tar and md5.images_NNN.txt (or an
  extracted tree train/a/b/c/<id>.jpg).
  """

  def __init__(self, *, allow_missing: bool = False, verify_md5: bool = False, **kwargs):
    self._allow_missing = allow_missing
    self._verify_md5 = verify_md5
    self._plan: Optional[BuildPlan] = None
    self._skipped: List[Tuple[Record, str]] = []
    self._written: Dict[str, int] = {s: 0 for s in SPLITS}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'label': tfds.features.Scalar(dtype=np.int64),
          'landmark_id': tfds.features.Scalar(dtype=np.int64),
          'id': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://github.com/cvdfoundation/google-landmark',
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.exclusion_tag and cfg.exclusion is None:
      raise ValueError(
        f'gldv2/{cfg.name} is not prepared and needs its exclusion list to be '
        'built: pass it (prepare --exclude=FILE, whose sha256 starts with '
        f'{cfg.exclusion_tag})'
      )
    self._plan = make_plan(
      os.fspath(dl_manager.manual_dir),
      cfg.subset,
      val_fraction=cfg.val_fraction,
      seed=cfg.split_seed,
      allow_missing=self._allow_missing,
      check_md5=self._verify_md5,
      exclusion=cfg.exclusion,
    )
    self._skipped = []
    self._written = {s: 0 for s in SPLITS}
    splits = {'train': self._generate_examples('train')}
    if cfg.val_fraction > 0:
      splits['validation'] = self._generate_examples('validation')
    return splits

  def _generate_examples(self, split: str):
    plan = self._plan
    todo = [r for r in plan.records if r.split == split and r.location is not None]
    for rec, data in tar_index.read_in_order((r, r.location) for r in todo):
      reason = decode.check_decodable(data)
      if reason is not None:
        self._skipped.append((rec, reason))
        continue
      self._written[split] += 1
      yield (
        rec.id,
        {'image': data, 'label': rec.label, 'landmark_id': rec.class_key, 'id': rec.id},
      )

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    summary = write_side_files(
      os.fspath(self.data_path),
      self._plan,
      self._skipped,
      self._written,
      name=f'gldv2/{self.builder_config.name}',
      build_options=self.builder_config.build_options(),
      class_column='landmark_id',
    )
    self.info.metadata.update({k: v for k, v in summary.items() if k != 'skipped_examples'})
    self.summary = summary


def builder(
  dataset: str = 'gldv2/clean',
  data_dir: Optional[str] = None,
  *,
  val_fraction: Optional[float] = None,
  exclude: Optional[str] = None,
  **kwargs,
) -> Gldv2:
  """The builder of a gldv2 dataset name (kwargs: allow_missing, verify_md5).

  Names: 'gldv2/clean', 'gldv2/full', 'gldv2/clean_all', 'gldv2/full_all', with optional
  '-val<F>' and '-ex<tag>' suffixes; `val_fraction` and `exclude` add those options.
  """
  config = resolve_config(dataset, val_fraction=val_fraction, exclude=exclude)
  kwargs.setdefault('file_format', 'array_record')
  if any(config is c for c in Gldv2.BUILDER_CONFIGS):
    return Gldv2(config=config.name, data_dir=data_dir, **kwargs)
  return Gldv2(config=config, data_dir=data_dir, **kwargs)


def prepare(
  dataset: str,
  manual_dir: str,
  data_dir: str,
  *,
  allow_missing: bool = False,
  verify_md5: bool = False,
  val_fraction: Optional[float] = None,
  exclude: Optional[str] = None,
) -> Gldv2:
  """Builds the dataset (no-op if already built); returns the builder (`.summary` when built).

  The dataset's full name (to put in config.data.dataset) is
  `'gldv2/' + builder.builder_config.name`.
  """
  b = builder(
    dataset,
    data_dir,
    allow_missing=allow_missing,
    verify_md5=verify_md5,
    val_fraction=val_fraction,
    exclude=exclude,
  )
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def data_sources(dataset: str, data_dir: str) -> dict:
  """{'train': source, 'validation': source}: random-access sources of the prepared dataset
  ('validation' only where val_fraction > 0).
  """
  return builder(dataset, data_dir).as_data_source()


def num_classes(dataset: str, data_dir: str) -> int:
  return int(builder(dataset, data_dir).info.metadata['num_classes'])


def read_label_map(dataset: str, data_dir: str) -> List[int]:
  """label -> landmark_id, from label_map.csv next to the data."""
  path = os.path.join(os.fspath(builder(dataset, data_dir).data_path), 'label_map.csv')
  with open(path, newline='') as f:
    return [int(row['landmark_id']) for row in csv.DictReader(f)]
