"""TFDS builder `gldv2` (Google Landmarks Dataset v2, train set) -> ArrayRecord, without TensorFlow.

Reads the official files from the manual dir, in any of these layouts:
  train.csv                      id,url,landmark_id           (configs `full`, `full_all`)
  train_clean.csv                landmark_id,images           (configs `clean`, `clean_all`)
  flat:   images_000.tar ... images_499.tar (members a/b/c/<id>.jpg), md5.images_NNN.txt beside them
  official download script (run inside train/): train/images_NNN.tar, train/md5.images_NNN.txt
  public bucket: train/images_NNN.tar, md5sum/train/md5.images_NNN.txt
  extracted: train/a/b/c/<id>.jpg (a, b, c: the id's first characters), instead of or besides tars.
The md5 files ("<md5>  images_NNN.tar") are checked with verify_md5=True.

Dataset names (`gldv2/<config>`): `clean` / `full` hold out a validation split (val_fraction 0.2);
`clean_all` / `full_all` put every listed image in train (val_fraction 0, as the official DOLG
training list). Build options make further configs, named by suffixes so that each has its own
directory: `-val<F>` (another validation fraction, e.g. `gldv2/clean-val0.1`) and `-ex<sha>` (an
exclusion list, the first 12 hex digits of its sha256: e.g. landmarks shared with the test sets as
in the revisited GLDv2-clean). An exclusion list is a CSV with a `landmark_id` column, an `id`
column (image ids), or both; the excluded images are removed before the split and the labels.
The options are recorded in the dataset's metadata (`build_options`, also in summary.json) and
from there in the training run's manifest.

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
import glob
import hashlib
import json
import logging
import math
import os
import re
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

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
  shards: List[str]                      # Tar shards searched (paths relative to the manual dir).
  extracted_dir: Optional[str]           # Extracted tree searched, if any.
  missing: List[Record]
  duplicates: int = 0                    # CSV rows repeating an id already listed (ignored).
  excluded: Optional[dict] = None        # Exclusion list applied (see `exclude_pairs`), if any.


@dataclasses.dataclass(frozen=True)
class Exclusion:
  """An exclusion list: landmark ids and image ids to leave out of the dataset."""
  path: str
  sha256: str
  landmark_ids: frozenset
  image_ids: frozenset

  @property
  def tag(self) -> str:
    return self.sha256[:12]

  def describe(self) -> dict:
    return {'file': os.path.abspath(self.path), 'sha256': self.sha256,
            'num_landmark_ids': len(self.landmark_ids), 'num_image_ids': len(self.image_ids)}


# ------------------------------------------------------------------------------------ CSV parsing


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


def class_seed(key) -> int:
  """The per-class seed of `split_per_class`: a landmark id itself; a class name (the folder
  dataset) the first 8 bytes of its UTF-8 sha256."""
  if isinstance(key, str):
    return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')
  return int(key)


def split_per_class(pairs: Sequence[Tuple[str, int]], val_fraction: float, seed: int
                    ) -> Tuple[List[Record], List[int]]:
  """Contiguous labels (sorted landmark ids) and the seeded per-class train/validation split.

  Each class's ids are sorted, permuted by a generator seeded with (seed, class_seed(landmark_id)),
  and the first floor(val_fraction * n) go to validation: independent of the other classes and of
  the CSV's order. Duplicated ids keep their first listing. The class keys may also be names
  (str; the folder dataset), then sorted by name.
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
    perm = np.random.default_rng([seed, class_seed(landmark)]).permutation(len(ids))
    for rank, j in enumerate(perm):
      split_of[ids[j]] = 'validation' if rank < n_val else 'train'
  records = [Record(i, lm, label_of[lm], split_of[i]) for i, lm in order]
  return records, landmark_ids


def read_exclusion(path: str) -> Exclusion:
  """Reads an exclusion list: a CSV with a `landmark_id` and/or an `id` (image id) column
  (parsed strictly by csv_metadata.read_exclusion; errors name the file and line)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'exclusion list {path} not found')
  with open(path, 'rb') as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  landmarks, images = csv_metadata.read_exclusion(path)
  return Exclusion(path, digest, landmarks, images)


def exclude_pairs(pairs: Sequence[Tuple[str, int]], exclusion: Exclusion
                  ) -> Tuple[List[Tuple[str, int]], dict]:
  """Drops the listed (id, landmark) pairs the exclusion names; returns them and the counts."""
  kept = [(i, lm) for i, lm in pairs
          if lm not in exclusion.landmark_ids and i not in exclusion.image_ids]
  listed_landmarks = {lm for _, lm in pairs}
  kept_landmarks = {lm for _, lm in kept}
  counts = {**exclusion.describe(),
            'images_removed': len(pairs) - len(kept),
            'landmarks_removed': len(listed_landmarks - kept_landmarks),
            'excluded_landmarks_not_listed': len(exclusion.landmark_ids - listed_landmarks)}
  return kept, counts


# ------------------------------------------------------------------------------------ shards


SHARD_DIRS = ('', 'train')  # Flat layout; official download script and public bucket.
MD5_DIRS = ('', 'train', os.path.join('md5sum', 'train'))


def find_shards(manual_dir: str) -> List[str]:
  """Sorted paths of images_NNN.tar in the manual dir or its train/ directory.

  Raises ValueError when one shard name is in both places (which copy is meant is unclear).
  """
  found: Dict[str, str] = {}
  for sub in SHARD_DIRS:
    for p in glob.glob(os.path.join(manual_dir, sub, 'images_*.tar')):
      name = os.path.basename(p)
      if not _SHARD_RE.match(name):
        continue
      if name in found:
        raise ValueError(f'{manual_dir}: {name} is both at {found[name]} and at {p}; keep one '
                         '(the official layout has the shards in train/)')
      found[name] = p
  return [found[n] for n in sorted(found, key=lambda n: int(_SHARD_RE.match(n).group(1)))]


def md5_file_for(shard_path: str, manual_dir: Optional[str] = None) -> Optional[str]:
  """md5.images_NNN.txt of a shard: beside it, or (manual dir) in train/ or md5sum/train/."""
  name = 'md5.' + os.path.basename(shard_path)[:-len('.tar')] + '.txt'
  candidates = [os.path.join(os.path.dirname(shard_path), name)]
  if manual_dir is not None:
    candidates += [os.path.join(manual_dir, sub, name) for sub in MD5_DIRS]
  for path in candidates:
    if os.path.isfile(path):
      return path
  return None


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


def verify_md5(shard_path: str, manual_dir: Optional[str] = None) -> None:
  """Compares the shard with its md5.images_NNN.txt (see `md5_file_for`); raises ChecksumError
  when they differ."""
  name = os.path.basename(shard_path)
  md5_path = md5_file_for(shard_path, manual_dir)
  if md5_path is None:
    where = [os.path.dirname(shard_path)] + ([os.path.join(manual_dir, d) for d in MD5_DIRS]
                                             if manual_dir else [])
    raise FileNotFoundError(f'md5.{name[:-len(".tar")]}.txt not found in {sorted(set(where))} '
                            f'(needed to verify {name}; build without verify_md5 to skip the '
                            'check)')
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
              allow_missing: bool = False, check_md5: bool = False,
              exclusion: Optional[Exclusion] = None) -> BuildPlan:
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
  shards = find_shards(manual_dir)
  locations: Dict[str, Location] = {}
  for shard in shards:
    if check_md5:
      verify_md5(shard, manual_dir)
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
  shard_names = [os.path.relpath(s, manual_dir) for s in shards]
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
                   duplicates=len(pairs) - len(records), excluded=excluded)


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
  """A listing (`clean`: train_clean.csv, `full`: train.csv) with its build options."""

  def __init__(self, *, subset: str, val_fraction: float = 0.2, split_seed: int = 0,
               name: Optional[str] = None, exclusion: Optional[Exclusion] = None,
               exclusion_tag: str = '', **kwargs):
    super().__init__(name=name or subset, **kwargs)
    self.subset = subset
    self.val_fraction = val_fraction
    self.split_seed = split_seed
    self.exclusion = exclusion
    self.exclusion_tag = exclusion.tag if exclusion is not None else exclusion_tag

  def build_options(self) -> dict:
    return {'subset': self.subset, 'val_fraction': self.val_fraction,
            'split_seed': self.split_seed,
            'exclusion': self.exclusion.describe() if self.exclusion is not None else None}


# Named configs: listing and validation fraction.
NAMED_CONFIGS = {'clean': ('clean', 0.2), 'full': ('full', 0.2),
                 'clean_all': ('clean', 0.0), 'full_all': ('full', 0.0)}
_SUFFIX_RE = re.compile(r'-(val(?P<val>\d+(\.\d+)?)|ex(?P<ex>[0-9a-f]{12}))')


def config_name(base: str, *, val_fraction: Optional[float] = None,
                exclusion: Optional[Exclusion] = None) -> str:
  """The config name of a named config with build options (see the module docstring)."""
  if base not in NAMED_CONFIGS:
    raise ValueError(f'unknown gldv2 config {base!r}; known: {sorted(NAMED_CONFIGS)}')
  name = base
  if val_fraction is not None and val_fraction != NAMED_CONFIGS[base][1]:
    if not 0.0 <= val_fraction < 1.0 or round(val_fraction, 4) != val_fraction:
      raise ValueError(f'val_fraction must be in [0, 1) with at most 4 decimals, got '
                       f'{val_fraction}')
    name += '-val' + f'{val_fraction:.4f}'.rstrip('0').rstrip('.')
  if exclusion is not None:
    name += f'-ex{exclusion.tag}'
  return name


def parse_config_name(name: str) -> Tuple[str, float, str]:
  """'clean_all-ex0123456789ab' -> (base, val_fraction, exclusion tag or '')."""
  base, _, rest = name.partition('-')
  if base not in NAMED_CONFIGS:
    raise ValueError(f'unknown gldv2 config {name!r}: it must start with one of '
                     f'{sorted(NAMED_CONFIGS)}, optionally followed by -val<F> and -ex<12 hex>')
  val, tag = NAMED_CONFIGS[base][1], ''
  rest = '-' + rest if rest else ''
  for m in _SUFFIX_RE.finditer(rest):
    if m.group('val') is not None:
      val = float(m.group('val'))
    else:
      tag = m.group('ex')
  if _SUFFIX_RE.sub('', rest):
    raise ValueError(f'bad gldv2 config name {name!r}: after {base!r} only -val<F> (e.g. -val0.1) '
                     'and -ex<first 12 hex digits of the exclusion list sha256> may follow')
  return base, val, tag


class Gldv2(tfds.core.GeneratorBasedBuilder):
  """Google Landmarks Dataset v2 (train), original JPEG bytes, contiguous labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      Gldv2Config(subset='clean', description='GLDv2-clean: 1,580,470 images, 81,313 landmarks.'),
      Gldv2Config(subset='full', description='GLDv2 train: 4,132,914 images, 203,094 landmarks.'),
      Gldv2Config(subset='clean', name='clean_all', val_fraction=0.0,
                  description='GLDv2-clean, every image in train (no validation split).'),
      Gldv2Config(subset='full', name='full_all', val_fraction=0.0,
                  description='GLDv2 train, every image in train (no validation split).'),
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
    if cfg.exclusion_tag and cfg.exclusion is None:
      raise ValueError(f'gldv2/{cfg.name} is not prepared and needs its exclusion list to be '
                       'built: pass it (prepare --exclude=FILE, whose sha256 starts with '
                       f'{cfg.exclusion_tag})')
    self._plan = make_plan(os.fspath(dl_manager.manual_dir), cfg.subset,
                           val_fraction=cfg.val_fraction, seed=cfg.split_seed,
                           allow_missing=self._allow_missing, check_md5=self._verify_md5,
                           exclusion=cfg.exclusion)
    self._skipped = []
    self._written = {s: 0 for s in SPLITS}
    splits = {'train': self._generate_examples('train')}
    if cfg.val_fraction > 0:
      splits['validation'] = self._generate_examples('validation')
    return splits

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
                               self._written, name=f'gldv2/{self.builder_config.name}',
                               build_options=self.builder_config.build_options())
    self.info.metadata.update({k: v for k, v in summary.items() if k != 'skipped_examples'})
    self.summary = summary


# Split of the records a builder skips before splitting (the folder dataset: unreadable files,
# duplicates, classes without a usable image); counted as its own line of the summary.
UNASSIGNED = 'unassigned'


def write_side_files(out_dir: str, plan: BuildPlan, skipped: Sequence[Tuple[Record, str]],
                     written: Dict[str, int], *, name: str,
                     build_options: Optional[dict] = None, class_column: str = 'landmark_id',
                     extra: Optional[dict] = None) -> dict:
  """label_map.csv, skipped.csv, missing.csv, summary.json; returns the summary dict.

  `class_column`: the name of the class key column (`Record.landmark_id`; the folder dataset's is
  `class_name`). Records of split UNASSIGNED (skipped before the split) get their own per-split
  line. `extra` is added to the summary.
  """
  splits = SPLITS + ((UNASSIGNED,) if any(r.split == UNASSIGNED for r in plan.records) else ())
  counts = {s: collections.Counter() for s in splits}
  for rec in plan.records:
    counts[rec.split][rec.label] += 1
  with open(os.path.join(out_dir, 'label_map.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['label', class_column, 'num_train_listed', 'num_validation_listed'])
    for label, landmark in enumerate(plan.landmark_ids):
      w.writerow([label, landmark, counts['train'][label], counts['validation'][label]])
  with open(os.path.join(out_dir, 'skipped.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', class_column, 'split', 'reason'])
    for rec, reason in skipped:
      w.writerow([rec.id, rec.landmark_id, rec.split, reason])
  with open(os.path.join(out_dir, 'missing.csv'), 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(['id', class_column, 'split'])
    for rec in plan.missing:
      w.writerow([rec.id, rec.landmark_id, rec.split])
  written = {s: written.get(s, 0) for s in splits}
  listed = {s: sum(counts[s].values()) for s in splits}
  n_skipped = {s: sum(1 for r, _ in skipped if r.split == s) for s in splits}
  n_missing = {s: sum(1 for r in plan.missing if r.split == s) for s in splits}
  summary = {
      'dataset': name,
      'num_classes': len(plan.landmark_ids),
      'listed': sum(listed.values()),
      'duplicate_listings_ignored': plan.duplicates,
      'written': sum(written.values()),
      'skipped': sum(n_skipped.values()),
      'missing': len(plan.missing),
      'per_split': {s: {'listed': listed[s], 'written': written[s], 'skipped': n_skipped[s],
                        'missing': n_missing[s]} for s in splits},
      'build_options': build_options,
      'excluded': plan.excluded,
      'shards_searched': list(plan.shards),
      'extracted_dir': plan.extracted_dir,
      'skipped_examples': [{'id': r.id, 'reason': why} for r, why in skipped[:20]],
      **(extra or {}),
  }
  for s in splits:
    per = summary['per_split'][s]
    if per['listed'] != per['written'] + per['skipped'] + per['missing']:
      raise AssertionError(f'{name} summary does not add up for split {s}: {per}')
  with open(os.path.join(out_dir, 'summary.json'), 'w') as f:
    json.dump(summary, f, indent=1)
  logging.info('%s summary: %s', name, format_summary(summary))
  return summary


def format_summary(summary: dict) -> str:
  """Human-readable summary (printed by prepare)."""
  lines = [f"{summary['dataset']}: {summary['num_classes']} classes; listed {summary['listed']} = "
           f"written {summary['written']} + skipped {summary['skipped']} + missing "
           f"{summary['missing']}"]
  for s, per in summary['per_split'].items():
    lines.append(f"  {s}: listed {per['listed']}, written {per['written']}, skipped "
                 f"{per['skipped']}, missing {per['missing']}")
  if summary.get('excluded'):
    ex = summary['excluded']
    lines.append(f"  exclusion list {ex['file']} (sha256 {ex['sha256'][:12]}): removed "
                 f"{ex['images_removed']} listed images, "
                 + (f"{ex['landmarks_removed']} landmarks" if 'landmarks_removed' in ex
                    else f"{ex['classes_removed']} classes"))
  if summary.get('duplicate_listings_ignored'):
    lines.append(f"  {summary['duplicate_listings_ignored']} duplicate CSV listings of an id were "
                 'ignored (each id is used once)')
  for warning in summary.get('warnings', []):
    lines.append(f'  warning: {warning}')
  for item in summary.get('skipped_examples', []):
    lines.append(f"  skipped {item['id']}: {item['reason']}")
  if summary['skipped'] > len(summary.get('skipped_examples', [])):
    lines.append('  ... (all skipped ids in skipped.csv)')
  return '\n'.join(lines)


# ------------------------------------------------------------------------------------ helpers


def resolve_config(dataset: str, *, val_fraction: Optional[float] = None,
                   exclude: Optional[str] = None) -> Gldv2Config:
  """The builder config of a dataset name plus build options (see the module docstring).

  `val_fraction` / `exclude` (a file) may also be given on top of a name; the result's name
  encodes all of them. A name with `-ex<tag>` given together with `exclude` must match its sha256.
  """
  name, _, config = dataset.partition('/')
  if name != 'gldv2':
    raise ValueError(f'not a gldv2 dataset name: {dataset!r}')
  base, named_val, tag = parse_config_name(config or 'clean')
  if val_fraction is not None and config and '-val' in config and val_fraction != named_val:
    raise ValueError(f'{dataset!r} names validation fraction {named_val:g} but val_fraction='
                     f'{val_fraction:g} was given')
  val = named_val if val_fraction is None else float(val_fraction)
  if not 0.0 <= val < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val}')
  exclusion = read_exclusion(exclude) if exclude else None
  if exclusion is not None and tag and tag != exclusion.tag:
    raise ValueError(f'{dataset!r} was built with an exclusion list whose sha256 starts with '
                     f'{tag}, but {exclude} has sha256 {exclusion.sha256[:12]}...')
  full = config_name(base, val_fraction=val, exclusion=exclusion)
  if exclusion is None and tag:
    full += f'-ex{tag}'
  if full == base:
    return next(c for c in Gldv2.BUILDER_CONFIGS if c.name == base)
  subset = NAMED_CONFIGS[base][0]
  return Gldv2Config(subset=subset, name=full, val_fraction=val, exclusion=exclusion,
                     exclusion_tag=tag, description=f'gldv2/{base} with build options')


def builder(dataset: str = 'gldv2/clean', data_dir: Optional[str] = None, *,
            val_fraction: Optional[float] = None, exclude: Optional[str] = None,
            **kwargs) -> Gldv2:
  """The builder of a gldv2 dataset name (kwargs: allow_missing, verify_md5).

  Names: 'gldv2/clean', 'gldv2/full', 'gldv2/clean_all', 'gldv2/full_all', with optional
  '-val<F>' and '-ex<tag>' suffixes; `val_fraction` and `exclude` add those options.
  """
  config = resolve_config(dataset, val_fraction=val_fraction, exclude=exclude)
  kwargs.setdefault('file_format', 'array_record')
  if any(config is c for c in Gldv2.BUILDER_CONFIGS):
    return Gldv2(config=config.name, data_dir=data_dir, **kwargs)
  return Gldv2(config=config, data_dir=data_dir, **kwargs)


def prepare(dataset: str, manual_dir: str, data_dir: str, *, allow_missing: bool = False,
            verify_md5: bool = False, val_fraction: Optional[float] = None,
            exclude: Optional[str] = None) -> Gldv2:
  """Builds the dataset (no-op if already built); returns the builder (`.summary` when built).

  The dataset's full name (to put in config.data.dataset) is
  `'gldv2/' + builder.builder_config.name`.
  """
  b = builder(dataset, data_dir, allow_missing=allow_missing, verify_md5=verify_md5,
              val_fraction=val_fraction, exclude=exclude)
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
