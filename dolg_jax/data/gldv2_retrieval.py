"""TFDS builder `gldv2_retrieval` (GLDv2 retrieval benchmark: index and test sets) -> ArrayRecord.

`prepare(manual_dir, data_dir)` reads the official index.csv, test.csv, retrieval_solution_v2.1.csv
and index/, test/ images_NNN.tar (or extracted a/b/c/<id>.jpg trees) and writes splits 'index' and
'test' of {image: original bytes, id: text, index: int64 row in index.csv / test.csv, height,
width: int64}, stored in key order (place results by `index`); beside the data: the solution's copy
(`load_solution`), skipped.csv, missing.csv, summary.json (listed = written + skipped + missing).
Raises build_plan.MissingImagesError (unless allow_missing), tar_index.TruncatedShardError,
md5_check.ChecksumError (verify_md5), csv_metadata.MetadataError (a ValueError); reading an
unprepared dataset, `NotPreparedError` naming the prepare command. Layout: docs/design_notes.md.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds

from dolg_jax.data import csv_metadata
from dolg_jax.data import decode
from dolg_jax.data import build_plan
from dolg_jax.data import tar_index
from dolg_jax.data.builder_mixin import PackagedBuilder

SPLITS = ('index', 'test')
SOLUTION_FILE = 'retrieval_solution_v2.1.csv'
OFFICIAL_COUNTS = {'index': 761757, 'test': 117577}


def read_ids(path: str) -> List[str]:
  """The `id` column of index.csv / test.csv, in file order (csv_metadata.read_image_ids: 16-hex
  ids, no repeats; errors name the file and line)."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: the manual dir must hold the official '
      f'{os.path.basename(path)} (column id)'
    )
  return csv_metadata.read_image_ids(path)


def read_solution(path: str) -> Tuple[Dict[str, List[str]], Dict[str, List[str]], List[str]]:
  """(public, private, ignored) from retrieval_solution_v2.1.csv, as DELF's ReadSolution.

  public / private map a test id to its relevant index ids; `ignored` lists the test ids with
  Usage 'Ignored' (their images column is 'None'). For `metrics.gldv2_map_at_k`, pass `public` or
  `private` (or a dict with None for ignored ids). Parsed by csv_metadata.read_retrieval_solution.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: the manual dir must hold the official {SOLUTION_FILE} (id,images,Usage)'
    )
  return csv_metadata.read_retrieval_solution(path)


class Gldv2Retrieval(PackagedBuilder, tfds.core.GeneratorBasedBuilder):
  """GLDv2 retrieval benchmark: index (761,757) and test (117,577) images, original bytes."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the GLDv2 index and test sets (https://github.com/cvdfoundation/google-landmark) into the
  manual dir: index.csv, test.csv, retrieval_solution_v2.1.csv, index/images_000.tar ..
  images_099.tar, test/images_000.tar .. images_019.tar and their md5.images_NNN.txt files.
  """

  def __init__(self, *, allow_missing: bool = False, verify_md5: bool = False, **kwargs):
    self._allow_missing = allow_missing
    self._verify_md5 = verify_md5
    self.summary: Optional[dict] = None
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'id': tfds.features.Text(),
          'index': tfds.features.Scalar(dtype=np.int64),
          'height': tfds.features.Scalar(dtype=np.int64),
          'width': tfds.features.Scalar(dtype=np.int64),
        }
      ),
      homepage='https://github.com/cvdfoundation/google-landmark',
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if not os.path.isdir(root):
      raise FileNotFoundError(f'manual dir {root} does not exist')
    self._solution_path = os.path.join(root, SOLUTION_FILE)
    public, private, ignored = read_solution(self._solution_path)
    self._ids, self._loc, self._missing = {}, {}, {}
    self._skipped: Dict[str, List[Tuple[str, str]]] = {s: [] for s in SPLITS}
    self._written = {s: 0 for s in SPLITS}
    searched = {}
    for split in SPLITS:
      ids = read_ids(os.path.join(root, f'{split}.csv'))
      sub = os.path.join(root, split)
      tree = sub if os.path.isdir(sub) else None
      loc, shard_paths = tar_index.locate(ids, sub, tree, check_md5=self._verify_md5)
      shards = [os.path.basename(p) for p in shard_paths]
      self._ids[split], self._loc[split] = ids, loc
      self._missing[split] = [i for i in ids if i not in loc]
      searched[split] = {'shards': shards, 'extracted_dir': tree}
      if self._missing[split] and not self._allow_missing:
        where = tar_index.describe_shards(shards)
        first = ', '.join(self._missing[split][:10])
        raise build_plan.MissingImagesError(
          f'{len(self._missing[split])} of {len(ids)} images listed in {split}.csv are absent '
          f'from {os.path.join(root, split)} (searched {where}'
          f'{" and the extracted tree" if tree else ""}); first ids: {first}. Download the '
          'missing shards, or pass allow_missing=True (they are listed in missing.csv).'
        )
    test_ids = set(self._ids['test'])
    index_ids = set(self._ids['index'])
    unknown = [t for t in list(public) + list(private) + ignored if t not in test_ids]
    if unknown:
      raise ValueError(
        f'{self._solution_path}: {len(unknown)} test ids are not in test.csv (first: {unknown[:5]})'
      )
    bad_refs = [
      i for v in list(public.values()) + list(private.values()) for i in v if i not in index_ids
    ]
    if bad_refs:
      raise ValueError(
        f'{self._solution_path}: {len(bad_refs)} relevant ids are not in index.csv '
        f'(first: {bad_refs[:5]})'
      )
    self._searched = searched
    self._solution_counts = {
      'public': len(public),
      'private': len(private),
      'ignored': len(ignored),
    }
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    order = {image_id: i for i, image_id in enumerate(self._ids[split])}
    for image_id, data in tar_index.read_in_order(self._loc[split].items()):
      reason = decode.check_decodable(data)
      if reason is not None:
        self._skipped[split].append((image_id, reason))
        continue
      h, w = decode.image_size(data)
      self._written[split] += 1
      yield (
        image_id,
        {'image': data, 'id': image_id, 'index': order[image_id], 'height': h, 'width': w},
      )

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    out = os.fspath(self.data_path)
    shutil.copyfile(self._solution_path, os.path.join(out, SOLUTION_FILE))
    with open(os.path.join(out, 'skipped.csv'), 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['split', 'id', 'reason'])
      for split in SPLITS:
        w.writerows((split, i, why) for i, why in self._skipped[split])
    with open(os.path.join(out, 'missing.csv'), 'w', newline='') as f:
      w = csv.writer(f)
      w.writerow(['split', 'id'])
      for split in SPLITS:
        w.writerows((split, i) for i in self._missing[split])
    per = {}
    for split in SPLITS:
      per[split] = {
        'listed': len(self._ids[split]),
        'written': self._written[split],
        'skipped': len(self._skipped[split]),
        'missing': len(self._missing[split]),
        'official_count': OFFICIAL_COUNTS[split],
        **self._searched[split],
      }
      counts = per[split]
      if counts['listed'] != counts['written'] + counts['skipped'] + counts['missing']:
        raise AssertionError(f'gldv2_retrieval summary does not add up for {split}: {per[split]}')
    self.summary = {
      'dataset': 'gldv2_retrieval',
      'per_split': per,
      'solution': self._solution_counts,
      'matches_official_counts': all(per[s]['listed'] == OFFICIAL_COUNTS[s] for s in SPLITS),
    }
    with open(os.path.join(out, 'summary.json'), 'w') as f:
      json.dump(self.summary, f, indent=1)
    self.info.metadata.update({f'num_{s}': per[s]['listed'] for s in SPLITS})


def builder(data_dir: Optional[str] = None, **kwargs) -> Gldv2Retrieval:
  """The builder (kwargs: allow_missing, verify_md5)."""
  kwargs.setdefault('file_format', 'array_record')
  return Gldv2Retrieval(data_dir=data_dir, **kwargs)


def prepare(
  manual_dir: str, data_dir: str, *, allow_missing: bool = False, verify_md5: bool = False
) -> Gldv2Retrieval:
  """Builds the dataset (no-op if already built); returns the builder (`.summary` when built)."""
  b = builder(data_dir, allow_missing=allow_missing, verify_md5=verify_md5)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


class NotPreparedError(FileNotFoundError):
  """gldv2_retrieval is not prepared under the data dir; the message says how to prepare it."""


def prepare_command(data_dir: str) -> str:
  return (
    f'python -m dolg_jax.data.prepare --dataset=gldv2_retrieval --manual_dir=M '
    f'--data_dir={data_dir or "DATA_DIR"}'
  )


def require_prepared(data_dir: str) -> Gldv2Retrieval:
  """The builder of the prepared dataset; NotPreparedError with the command that prepares it."""
  b = builder(data_dir)
  if not b.is_prepared():
    where = data_dir or 'the current directory (the data dir is empty)'
    raise NotPreparedError(
      f'gldv2_retrieval is not prepared under {where}: prepare with '
      f'`{prepare_command(data_dir)}` with M holding the official '
      'index.csv, test.csv, retrieval_solution_v2.1.csv and the index/ and test/ images_NNN.tar '
      '(github.com/cvdfoundation/google-landmark)'
    )
  return b


def data_source(data_dir: str, split: str):
  """Random-access source of a prepared split ('index' or 'test')."""
  b = require_prepared(data_dir)
  if split not in SPLITS:
    raise ValueError(f'gldv2_retrieval has splits {SPLITS}; got {split!r}')
  return b.as_data_source()[split]


def load_solution(data_dir: str):
  """(public, private, ignored) from the solution copied next to the prepared data."""
  return read_solution(os.path.join(os.fspath(require_prepared(data_dir).data_path), SOLUTION_FILE))


def load_summary(data_dir: str) -> dict:
  with open(os.path.join(os.fspath(require_prepared(data_dir).data_path), 'summary.json')) as f:
    return json.load(f)


def listed_ids(data_dir: str, split: str) -> List[str]:
  """Ids of index.csv / test.csv by row (item i = the example with `index` i), None for the rows
  not written (missing or skipped); the row count comes from the prepared data's summary.json.
  """
  src = data_source(data_dir, split)
  n = load_summary(data_dir)['per_split'][split]['listed']
  out: List[Optional[str]] = [None] * n
  for i in range(len(src)):
    ex = src[i]
    out[int(ex['index'])] = ex['id'].decode() if isinstance(ex['id'], bytes) else str(ex['id'])
  return out


def extraction_examples(data_dir: str, split: str, ids_out: List[str]):
  """(num, generator) for `Extractor.extract`: every stored example as {'index': i, 'image'} with
  i its storage position, while the generator appends each example's id to `ids_out` (so
  descriptor row i belongs to ids_out[i], in one pass over the images)."""
  src = data_source(data_dir, split)

  def gen():
    for i in range(len(src)):
      ex = src[i]
      ids_out.append(ex['id'].decode() if isinstance(ex['id'], bytes) else str(ex['id']))
      yield {'index': i, 'image': ex['image']}

  return len(src), gen()
