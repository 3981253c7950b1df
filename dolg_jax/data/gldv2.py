"""TFDS builder `gldv2` (Google Landmarks Dataset v2, train set) -> ArrayRecord, without TensorFlow.

Reads the official layout from the manual dir:
  train.csv                      id,url,landmark_id           (config `full`)
  train_clean.csv                landmark_id,images           (config `clean`; images space-separated)
  images_000.tar ... images_499.tar   members a/b/c/<id>.jpg  (a, b, c: first characters of the id)
  md5.images_000.txt ...         "<md5>  images_000.tar"      (checked with verify_md5=True)
or, instead of (or besides) the tars, an extracted tree train/a/b/c/<id>.jpg.

Writes features {image: original file bytes, label: int64 contiguous, landmark_id: int64, id: text}
and splits 'train' / 'validation' (per class, validation = floor(val_fraction * n) images chosen with
a seeded permutation, so classes with fewer than 5 images stay whole in train at 20%).
Next to the data (in the version directory): label_map.csv (label,landmark_id,num_train,
num_validation), skipped.csv (id,landmark_id,split,reason), missing.csv (id,landmark_id,split),
summary.json (counts: listed = written + skipped + missing), plus TFDS' metadata.json with
`num_classes` and the counts.

Bad input: listed-but-absent images raise `MissingImagesError` (count, shards searched, first ids)
unless allow_missing=True; undecodable files are skipped and listed; a truncated tar raises
`TruncatedShardError` naming the shard; md5 mismatches raise `ChecksumError`.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import math
import os
import re
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from dolg_jax.data import csv_metadata
from dolg_jax.data import decode

SPLITS = ('train', 'validation')
SIDE_FILES = ('label_map.csv', 'skipped.csv', 'missing.csv', 'summary.json')
_SHARD_RE = re.compile(r'^images_(\d+)\.tar$')
_MAX_IDS_IN_MESSAGE = 10


class MissingImagesError(RuntimeError):
  """Images listed in the CSV were found in no shard."""


class TruncatedShardError(RuntimeError):
  """A tar shard ends before its declared contents."""


class ChecksumError(RuntimeError):
  """A tar shard does not match its md5 file."""


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
  """Where the bytes of one image are: a tar member (offset/size) or a plain file."""
  path: str
  offset: int = -1   # -1: the whole file at `path`.
  size: int = -1


@dataclasses.dataclass(slots=True)
class Record:
  id: str
  landmark_id: int
  label: int
  split: str
  location: Optional[Location] = None


@dataclasses.dataclass
class BuildPlan:
  """Everything decided before a byte of image data is read."""
  records: List[Record]                  # Every listed image, in listing order.
  landmark_ids: List[int]                # label -> landmark_id (sorted).
  shards: List[str]                      # Tar shards searched (basenames).
  extracted_dir: Optional[str]           # Extracted tree searched, if any.
  missing: List[Record]
  duplicates: int = 0                    # CSV rows repeating an id already listed (ignored).


# ------------------------------------------------------------------------------------ CSV parsing


def _open_csv(path: str) -> Iterator[Dict[str, str]]:
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None:
      raise ValueError(f'{path}: empty file (expected a CSV header)')
    yield from reader


def _require_columns(path: str, row: Dict[str, str], columns: Sequence[str]) -> None:
  missing = [c for c in columns if c not in row]
  if missing:
    raise ValueError(f'{path}: missing column(s) {missing}; found {sorted(row)}')


def read_listing(manual_dir: str, subset: str) -> List[Tuple[str, int]]:
  """(image id, landmark id) pairs of the `clean` or `full` listing, in file order."""
  if subset == 'clean':
    path = os.path.join(manual_dir, 'train_clean.csv')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: the manual dir must hold the official '
                              'train_clean.csv (landmark_id,images)')
    return csv_metadata.read_train_clean(path)
  if subset == 'full':
    path = os.path.join(manual_dir, 'train.csv')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: the manual dir must hold the official '
                              'train.csv (id,url,landmark_id)')
    return csv_metadata.read_train(path)
  raise ValueError(f'unknown GLDv2 subset {subset!r} (expected clean or full)')


def split_per_class(pairs: Sequence[Tuple[str, int]], val_fraction: float, seed: int
                    ) -> Tuple[List[Record], List[int]]:
  """Contiguous labels (sorted landmark ids) and the seeded per-class train/validation split.

  Each class's ids are sorted, permuted by a generator seeded with (seed, landmark_id), and the
  first floor(val_fraction * n) go to validation: independent of the other classes and of the
  CSV's order. Duplicated ids keep their first listing.
  """
  by_class: Dict[int, List[str]] = collections.defaultdict(list)
  seen = set()
  order = []
  for image_id, landmark in pairs:
    if image_id in seen:
      continue
    seen.add(image_id)
    by_class[landmark].append(image_id)
    order.append((image_id, landmark))
  landmark_ids = sorted(by_class)
  label_of = {lm: i for i, lm in enumerate(landmark_ids)}
  split_of = {}
  for landmark, ids in by_class.items():
    ids = sorted(ids)
    n_val = int(math.floor(len(ids) * val_fraction + 1e-9))
    perm = np.random.default_rng([seed, landmark]).permutation(len(ids))
    for rank, j in enumerate(perm):
      split_of[ids[j]] = 'validation' if rank < n_val else 'train'
  records = [Record(i, lm, label_of[lm], split_of[i]) for i, lm in order]
  return records, landmark_ids


# ------------------------------------------------------------------------------------ shards


def find_shards(manual_dir: str) -> List[str]:
  """Sorted paths of images_NNN.tar in the manual dir."""
  paths = [p for p in glob.glob(os.path.join(manual_dir, 'images_*.tar'))
           if _SHARD_RE.match(os.path.basename(p))]
  return sorted(paths, key=lambda p: int(_SHARD_RE.match(os.path.basename(p)).group(1)))


def _id_from_member(name: str) -> Optional[str]:
  base = os.path.basename(name)
  stem, ext = os.path.splitext(base)
  if ext.lower() not in ('.jpg', '.jpeg') or not stem:
    return None
  return stem


def index_shard(path: str) -> Dict[str, Location]:
  """id -> Location of every image member; raises TruncatedShardError if the tar is cut short."""
  name = os.path.basename(path)
  file_size = os.path.getsize(path)
  index = {}
  try:
    with tarfile.open(path, mode='r:') as tar:
      for member in tar:
        if not member.isfile():
          continue
        end = member.offset_data + member.size
        if end > file_size:
          raise TruncatedShardError(
              f'{path}: tar shard {name} is truncated: member {member.name} needs bytes up to '
              f'{end} but the file has {file_size} (re-download {name})')
        image_id = _id_from_member(member.name)
        if image_id is not None and image_id not in index:
          index[image_id] = Location(path, member.offset_data, member.size)
      end_of_members = tar.offset
  except tarfile.TarError as e:
    raise TruncatedShardError(f'{path}: tar shard {name} is unreadable or truncated: {e} '
                              f'(re-download {name})') from e
  # A complete archive ends with zero blocks; without them the file was cut between members.
  with open(path, 'rb') as f:
    f.seek(end_of_members)
    trailer = f.read(1024)
  if len(trailer) < 1024 or trailer.strip(b'\0'):
    raise TruncatedShardError(
        f'{path}: tar shard {name} is truncated: no end-of-archive marker after byte '
        f'{end_of_members} of {file_size} (re-download {name})')
  return index


def read_md5_file(path: str) -> str:
  with open(path) as f:
    text = f.read().split()
  if not text or not re.fullmatch(r'[0-9a-fA-F]{32}', text[0]):
    raise ValueError(f'{path}: expected "<md5 hex> <file name>", got {" ".join(text)[:80]!r}')
  return text[0].lower()


def verify_md5(shard_path: str) -> None:
  """Compares the shard with md5.images_NNN.txt next to it; raises ChecksumError on mismatch."""
  name = os.path.basename(shard_path)
  md5_path = os.path.join(os.path.dirname(shard_path), 'md5.' + name[:-len('.tar')] + '.txt')
  if not os.path.exists(md5_path):
    raise FileNotFoundError(f'{md5_path} not found (needed to verify {name}; build without '
                            'verify_md5 to skip the check)')
  expected = read_md5_file(md5_path)
  digest = hashlib.md5()
  with open(shard_path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  if digest.hexdigest() != expected:
    raise ChecksumError(f'{shard_path}: md5 {digest.hexdigest()} != {expected} from {md5_path} '
                        f'(re-download {name})')


def _describe_shards(names: Sequence[str]) -> str:
  if not names:
    return 'no images_*.tar shard'
  if len(names) <= 6:
    return ', '.join(names)
  return f'{len(names)} shards {names[0]} .. {names[-1]}'


def make_plan(manual_dir: str, subset: str, *, val_fraction: float, seed: int,
              allow_missing: bool = False, check_md5: bool = False) -> BuildPlan:
  """Parses the listing, splits it, and locates every image (raising on missing unless allowed)."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'manual dir {manual_dir} does not exist')
  pairs = read_listing(manual_dir, subset)
  records, landmark_ids = split_per_class(pairs, val_fraction, seed)
  shards = find_shards(manual_dir)
  locations: Dict[str, Location] = {}
  for shard in shards:
    if check_md5:
      verify_md5(shard)
    for image_id, loc in index_shard(shard).items():
      locations.setdefault(image_id, loc)
  extracted = os.path.join(manual_dir, 'train')
  extracted_dir = extracted if os.path.isdir(extracted) else None
  missing = []
  for rec in records:
    loc = locations.get(rec.id)
    if loc is None and extracted_dir is not None and len(rec.id) >= 3:
      path = os.path.join(extracted_dir, rec.id[0], rec.id[1], rec.id[2], rec.id + '.jpg')
      if os.path.isfile(path):
        loc = Location(path)
    rec.location = loc
    if loc is None:
      missing.append(rec)
  shard_names = [os.path.basename(s) for s in shards]
  if missing and not allow_missing:
    searched = _describe_shards(shard_names)
    if extracted_dir:
      searched += f' and the extracted tree {extracted_dir}'
    first = ', '.join(r.id for r in missing[:_MAX_IDS_IN_MESSAGE])
    raise MissingImagesError(
        f'{len(missing)} of {len(records)} images listed for gldv2/{subset} are absent from '
        f'{manual_dir} (searched {searched}); first ids: {first}. Download the missing shards, '
        'or pass --allow_missing to build without them (they are listed in missing.csv).')
  return BuildPlan(records, landmark_ids, shard_names, extracted_dir, missing,
                   duplicates=len(pairs) - len(records))


def read_bytes(loc: Location, handles: Dict[str, object]) -> bytes:
  """Reads one image; `handles` caches open files (caller closes them)."""
  f = handles.get(loc.path)
  if f is None:
    f = handles[loc.path] = open(loc.path, 'rb')
  if loc.offset < 0:
    f.seek(0)
    return f.read()
  f.seek(loc.offset)
  data = f.read(loc.size)
  if len(data) != loc.size:
    name = os.path.basename(loc.path)
    raise TruncatedShardError(f'{loc.path}: tar shard {name} is truncated (short read at byte '
                              f'{loc.offset}; re-download {name})')
  return data


# ------------------------------------------------------------------------------------ builder


class Gldv2Config(tfds.core.BuilderConfig):
  """`clean` (train_clean.csv) or `full` (train.csv)."""

  def __init__(self, *, subset: str, val_fraction: float = 0.2, split_seed: int = 0, **kwargs):
    super().__init__(name=subset, **kwargs)
    self.subset = subset
    self.val_fraction = val_fraction
    self.split_seed = split_seed


class Gldv2(tfds.core.GeneratorBasedBuilder):
  """Google Landmarks Dataset v2 (train), original JPEG bytes, contiguous labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      Gldv2Config(subset='clean', description='GLDv2-clean: 1,580,470 images, 81,313 landmarks.'),
      Gldv2Config(subset='full', description='GLDv2 train: 4,132,914 images, 203,094 landmarks.'),
  ]
  DEFAULT_CONFIG_NAME = 'clean'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the GLDv2 train set (https://github.com/cvdfoundation/google-landmark) into the manual
  dir: train.csv, train_clean.csv, images_000.tar ... images_499.tar and md5.images_NNN.txt (or an
  extracted tree train/a/b/c/<id>.jpg).
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS' default probes `importlib_resources` (not installed) for builders inside packages.
    return epath.Path(__file__)

  def __init__(self, *, allow_missing: bool = False, verify_md5: bool = False, **kwargs):
    self._allow_missing = allow_missing
    self._verify_md5 = verify_md5
    self._plan: Optional[BuildPlan] = None
    self._skipped: List[Tuple[Record, str]] = []
    self._written: Dict[str, int] = {s: 0 for s in SPLITS}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'label': tfds.features.Scalar(dtype=np.int64),
            'landmark_id': tfds.features.Scalar(dtype=np.int64),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/cvdfoundation/google-landmark',
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    self._plan = make_plan(os.fspath(dl_manager.manual_dir), cfg.subset,
                           val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                           allow_missing=self._allow_missing, check_md5=self._verify_md5)
    self._skipped = []
    self._written = {s: 0 for s in SPLITS}
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str):
    plan = self._plan
    todo = [r for r in plan.records if r.split == split and r.location is not None]
    todo.sort(key=lambda r: (r.location.path, r.location.offset))  # Sequential reads.
    handles: Dict[str, object] = {}
    try:
      for rec in todo:
        data = read_bytes(rec.location, handles)
        reason = decode.check_decodable(data)
        if reason is not None:
          self._skipped.append((rec, reason))
          continue
        self._written[split] += 1
        yield rec.id, {'image': data, 'label': rec.label, 'landmark_id': rec.landmark_id,
                       'id': rec.id}
    finally:
      for f in handles.values():
        f.close()

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    summary = write_side_files(os.fspath(self.data_path), self._plan, self._skipped,
                               self._written, name=f'gldv2/{self.builder_config.name}')
    self.info.metadata.update({k: v for k, v in summary.items() if k != 'skipped_examples'})
    self.summary = summary


def write_side_files(out_dir: str, plan: BuildPlan, skipped: Sequence[Tuple[Record, str]],
                     written: Dict[str, int], *, name: str) -> dict:
  """label_map.csv, skipped.csv, missing.csv, summary.json; returns the summary dict."""
  counts = {s: collections.Counter() for s in SPLITS}
  for rec in plan.records:
    counts[rec.split][rec.label] += 1
  with open(os.path.join(out_dir, 'label_map.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['label', 'landmark_id', 'num_train_listed', 'num_validation_listed'])
    for label, landmark in enumerate(plan.landmark_ids):
      w.writerow([label, landmark, counts['train'][label], counts['validation'][label]])
  with open(os.path.join(out_dir, 'skipped.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['id', 'landmark_id', 'split', 'reason'])
    for rec, reason in skipped:
      w.writerow([rec.id, rec.landmark_id, rec.split, reason])
  with open(os.path.join(out_dir, 'missing.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['id', 'landmark_id', 'split'])
    for rec in plan.missing:
      w.writerow([rec.id, rec.landmark_id, rec.split])
  listed = {s: sum(counts[s].values()) for s in SPLITS}
  n_skipped = {s: sum(1 for r, _ in skipped if r.split == s) for s in SPLITS}
  n_missing = {s: sum(1 for r in plan.missing if r.split == s) for s in SPLITS}
  summary = {
      'dataset': name,
      'num_classes': len(plan.landmark_ids),
      'listed': sum(listed.values()),
      'duplicate_listings_ignored': plan.duplicates,
      'written': sum(written.values()),
      'skipped': sum(n_skipped.values()),
      'missing': len(plan.missing),
      'per_split': {s: {'listed': listed[s], 'written': written[s], 'skipped': n_skipped[s],
                        'missing': n_missing[s]} for s in SPLITS},
      'shards_searched': list(plan.shards),
      'extracted_dir': plan.extracted_dir,
      'skipped_examples': [{'id': r.id, 'reason': why} for r, why in skipped[:20]],
  }
  for s in SPLITS:
    per = summary['per_split'][s]
    if per['listed'] != per['written'] + per['skipped'] + per['missing']:
      raise AssertionError(f'gldv2 summary does not add up for split {s}: {per}')
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  logging.info('gldv2 summary: %s', format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  """Human-readable summary (printed by prepare)."""
  lines = [f"{summary['dataset']}: {summary['num_classes']} classes; listed {summary['listed']} = "
           f"written {summary['written']} + skipped {summary['skipped']} + missing "
           f"{summary['missing']}"]
  for s, per in summary['per_split'].items():
    lines.append(f"  {s}: listed {per['listed']}, written {per['written']}, skipped "
                 f"{per['skipped']}, missing {per['missing']}")
  if summary.get('duplicate_listings_ignored'):
    lines.append(f"  {summary['duplicate_listings_ignored']} duplicate CSV listings of an id were "
                 'ignored (each id is used once)')
  for item in summary.get('skipped_examples', []):
    lines.append(f"  skipped {item['id']}: {item['reason']}")
  if summary['skipped'] > len(summary.get('skipped_examples', [])):
    lines.append('  ... (all skipped ids in skipped.csv)')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------ helpers


def builder(dataset: str = 'gldv2/clean', data_dir: Optional[str] = None,
            **kwargs) -> Gldv2:
  """The builder for 'gldv2/clean' or 'gldv2/full' (kwargs: allow_missing, verify_md5)."""
  name, _, config = dataset.partition('/')
  if name != 'gldv2':
    raise ValueError(f'not a gldv2 dataset name: {dataset!r}')
  kwargs.setdefault('file_format', 'array_record')
  return Gldv2(config=config or 'clean', data_dir=data_dir, **kwargs)


def prepare(dataset: str, manual_dir: str, data_dir: str, *, allow_missing: bool = False,
            verify_md5: bool = False) -> Gldv2:
  """Builds the dataset (no-op if already built); returns the builder (`.summary` when built)."""
  b = builder(dataset, data_dir, allow_missing=allow_missing, verify_md5=verify_md5)
  b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return b


def data_sources(dataset: str, data_dir: str) -> dict:
  """{'train': source, 'validation': source}: random-access sources of the prepared dataset."""
  return builder(dataset, data_dir).as_data_source()


def num_classes(dataset: str, data_dir: str) -> int:
  return int(builder(dataset, data_dir).info.metadata['num_classes'])


def read_label_map(dataset: str, data_dir: str) -> List[int]:
  """label -> landmark_id, from label_map.csv next to the data."""
  path = os.path.join(os.fspath(builder(dataset, data_dir).data_path), 'label_map.csv')
  with open(path, newline='') as f:
    return [int(row['landmark_id']) for row in csv.DictReader(f)]


def ensure_fixture_dataset(data_dir: str, *, dataset: str = 'gldv2/clean',
                           manual_dir: Optional[str] = None, **fixture_kwargs) -> Gldv2:
  """Writes the small fixture (if absent) and prepares it (if absent); returns the builder.

  For tests and configs/tiny.py. The fixture's planted missing images are allowed. Safe to call
  from several processes at once (they serialise on a lock file in data_dir).
  """
  from dolg_jax.data import gldv2_fixture  # pylint: disable=g-import-not-at-top
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, '.gldv2_fixture.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      b = builder(dataset, data_dir)
      if b.is_prepared():
        return b
      manual_dir = manual_dir or os.path.join(data_dir, 'gldv2_manual')
      if not os.path.exists(os.path.join(manual_dir, 'train.csv')):
        gldv2_fixture.write_fixture(manual_dir, **fixture_kwargs)
      return prepare(dataset, manual_dir, data_dir, allow_missing=True)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
