r"""TFDS builder `folder` (your own labelled images) -> ArrayRecord, as the GLDv2 builder does.

  python -m dolg_jax.data.prepare --dataset=folder/NAME --manual_dir=DIR --data_dir=D \
      [--val_fraction=F] [--exclude=FILE] [--labels=CSV] [--allow_missing]

DIR holds one sub-folder per class (files at any depth below it; the folder name is the class), or
`labels=CSV` lists `path,label` rows. Writes the features of `gldv2` as {image, label, class_name,
id}, splits `train` (and `validation` when val_fraction > 0) and the same side files
(label_map.csv, skipped.csv, missing.csv, summary.json). Undecodable, unreadable and ambiguous
files are skipped and listed; bad input stops the build (FolderError, FolderChangedError). Layout,
splits, options and every rule for bad input: docs/design_notes.md.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import errno
import hashlib
import math
import os
import re
import stat
import unicodedata
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from dolg_jax.data import build_plan
from dolg_jax.data import class_split
from dolg_jax.data import csv_metadata
from dolg_jax.data import decode
from dolg_jax.data import side_files
from dolg_jax.data.builder_mixin import PackagedBuilder

PREFIX = 'folder/'
CLASS_COLUMN = 'class_name'
DEFAULT_VAL_FRACTION = 0.2
_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
_SHOW = 3  # examples named in one warning line


class FolderError(ValueError):
  """The folder (or its labels file) cannot make a dataset as it is."""


class FolderChangedError(RuntimeError):
  """A file changed or vanished while the dataset was being built."""


@dataclasses.dataclass(frozen=True)
class Labels:
  """A labels file: (line, relative path, label) rows and the file's sha256."""

  path: str
  sha256: str
  rows: Tuple[Tuple[int, str, str], ...]

  def describe(self) -> dict:
    return {'file': os.path.abspath(self.path), 'sha256': self.sha256, 'num_rows': len(self.rows)}


@dataclasses.dataclass
class FolderPlan:
  """Everything decided before a byte is written."""

  manual_dir: str
  build: build_plan.BuildPlan  # records (all splits + unassigned), class names
  sha256: Dict[str, str]  # id -> sha256 of the bytes that were checked
  skipped: List[Tuple[build_plan.Record, str]]  # skipped before the split (split 'unassigned')
  warnings: List[str]


# ------------------------------------------------------------------------------------ names


def parse_name(dataset: str) -> str:
  """'folder/NAME' -> NAME (letters, digits, '_', '.', '-'; FolderError otherwise)."""
  if not is_folder_dataset(dataset):
    raise ValueError(f'not a folder dataset name: {dataset!r} (expected folder/NAME)')
  name = dataset[len(PREFIX) :]
  if not _NAME_RE.fullmatch(name):
    raise FolderError(
      f'bad dataset name {dataset!r}: NAME in folder/NAME must start with a letter '
      'or digit and hold only letters, digits, "_", "." and "-" (it names a '
      'directory of the data dir; the class names come from the sub-folders)'
    )
  return name


def is_folder_dataset(dataset: str) -> bool:
  return str(dataset).startswith(PREFIX)


def _nfc(name: str) -> str:
  return unicodedata.normalize('NFC', name)


# ------------------------------------------------------------------------------------ listing


def _bad_entry_reason(path: str, error: OSError) -> str:
  if error.errno == errno.ELOOP:
    return (
      f'symlink loop ({path} -> {os.readlink(path)})' if os.path.islink(path) else 'symlink loop'
    )
  if os.path.islink(path) and error.errno == errno.ENOENT:
    return f'broken symlink (-> {os.readlink(path)})'
  return f'unreadable: {error.strerror or error}'


def _scandir(path: str) -> list:
  try:
    with os.scandir(path) as it:
      return sorted(it, key=lambda e: e.name)
  except OSError as e:
    raise FolderError(
      f'{path}: cannot list the folder ({e.strerror or e}); fix its permissions '
      'or move it out of --manual_dir'
    ) from None


def scan_folder(
  manual_dir: str,
) -> Tuple[List[Tuple[str, str]], List[Tuple[str, str, str]], List[str], List[str]]:
  """(files (id, class), skipped (id, class, reason), warnings, class names) of a class-folder tree.

  ids are paths relative to `manual_dir` with '/' separators.
  """
  files: List[Tuple[str, str]] = []
  skipped: List[Tuple[str, str, str]] = []
  warnings: List[str] = []
  root = os.stat(manual_dir)
  visited: Dict[Tuple[int, int], str] = {(root.st_dev, root.st_ino): '.'}
  classes: Dict[str, str] = {}

  def walk(path: str, rel: str, cls: str, ancestors: Dict[Tuple[int, int], str]) -> None:
    for entry in _scandir(path):
      sub, sub_rel = entry.path, f'{rel}/{entry.name}'
      try:
        st = os.stat(sub)
      except OSError as e:
        skipped.append((sub_rel, cls, _bad_entry_reason(sub, e)))
        continue
      if stat.S_ISDIR(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if key in ancestors:
          target = os.readlink(sub) if entry.is_symlink() else sub
          warnings.append(
            f'symlink loop: {sub_rel} -> {target} leads back to {ancestors[key]!r}; not followed'
          )
        elif key in visited:
          warnings.append(
            f'{sub_rel} is the folder {visited[key]!r} again (a symlink); its files '
            'are listed once, there'
          )
        else:
          visited[key] = sub_rel
          walk(sub, sub_rel, cls, {**ancestors, key: sub_rel})
      elif stat.S_ISREG(st.st_mode):
        files.append((sub_rel, cls))
      else:
        skipped.append((sub_rel, cls, 'not a regular file'))

  for entry in _scandir(manual_dir):
    try:
      st = os.stat(entry.path)
    except OSError as e:
      skipped.append((entry.name, '', _bad_entry_reason(entry.path, e)))
      continue
    if not stat.S_ISDIR(st.st_mode):
      skipped.append(
        (
          entry.name,
          '',
          'not in a class folder (--manual_dir holds one sub-folder per class)'
          if stat.S_ISREG(st.st_mode)
          else 'not a regular file',
        )
      )
      continue
    if entry.name.startswith('.'):
      warnings.append(f'hidden folder {entry.name!r} is not a class: ignored')
      continue
    name = _nfc(entry.name)
    if name in classes:
      raise FolderError(
        f'{manual_dir}: class folders {classes[name]!r} and {entry.name!r} have '
        'the same name after Unicode normalisation (NFC); rename or merge them'
      )
    key = (st.st_dev, st.st_ino)
    if key in visited:
      warnings.append(
        f'class folder {entry.name!r} is the folder {visited[key]!r} again (a '
        'symlink): not a class of its own'
      )
      continue
    classes[name] = entry.name
    visited[key] = entry.name
    walk(entry.path, entry.name, name, {(root.st_dev, root.st_ino): '.', key: entry.name})
  return files, skipped, warnings, sorted(classes)


def read_labels(path: str) -> Labels:
  digest = build_plan.file_sha256(path, 'labels file')
  return Labels(path, digest, tuple(csv_metadata.read_labels(path)))


def list_labelled(manual_dir: str, labels: Labels) -> Tuple[list, list, list]:
  """(files (id, class), skipped (id, class, reason), absent (id, class)) of a labels file."""
  files, skipped, absent = [], [], []
  for line, rel, label in labels.rows:
    path = os.path.join(manual_dir, rel)
    cls = _nfc(label)
    try:
      st = os.stat(path)
    except OSError as e:
      if e.errno == errno.ENOENT and not os.path.islink(path):
        absent.append((rel, cls))
      else:
        skipped.append((rel, cls, _bad_entry_reason(path, e)))
      continue
    if stat.S_ISDIR(st.st_mode):
      raise csv_metadata.MetadataError(
        f'{labels.path}:{line}: {rel} is a folder, not an image file; list its files one per '
        f'row; fix the labels file {os.path.basename(labels.path)}'
      )
    if not stat.S_ISREG(st.st_mode):
      skipped.append((rel, cls, 'not a regular file'))
      continue
    files.append((rel, cls))
  return files, skipped, absent


def read_exclusion(path: str) -> build_plan.Exclusion:
  """An exclusion list: a CSV with a `label` and/or a `path` column (csv_metadata)."""
  digest = build_plan.file_sha256(path, 'exclusion list')
  labels, paths = csv_metadata.read_folder_exclusion(path)
  return build_plan.Exclusion(path, digest, frozenset(_nfc(l) for l in labels), paths)


def _exclude(pairs, skipped, exclusion: build_plan.Exclusion):
  kept, counts = build_plan.exclude_pairs(pairs, exclusion)
  counts = {**_exclusion_record(exclusion), **counts}
  skipped = [s for s in skipped if not exclusion.excludes(s[0], s[1])]
  return kept, skipped, counts


def _examples(items: Sequence[str]) -> str:
  shown = ', '.join(items[:_SHOW])
  return shown + (f' and {len(items) - _SHOW} more' if len(items) > _SHOW else '')


# ------------------------------------------------------------------------------------ the plan


def _read(manual_dir: str, image_id: str) -> bytes:
  with open(os.path.join(manual_dir, image_id), 'rb') as f:
    return f.read()


def _vanished(manual_dir: str, image_id: str, when: str) -> FolderChangedError:
  return FolderChangedError(
    f'{os.path.join(manual_dir, image_id)} vanished {when}; nothing was written. Keep '
    '--manual_dir unchanged while preparing and run again, or pass --allow_missing to build '
    'without such files (listed in missing.csv)'
  )


def make_plan(
  manual_dir: str,
  *,
  val_fraction: float,
  seed: int = 0,
  exclusion: Optional[build_plan.Exclusion] = None,
  labels: Optional[Labels] = None,
  allow_missing: bool = False,
) -> FolderPlan:
  """Lists, reads, hashes and checks every file, then splits (docs/design_notes.md)."""
  if not os.path.isdir(manual_dir):
    raise FileNotFoundError(f'manual dir {manual_dir} does not exist')
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  absent: List[Tuple[str, str]] = []
  if labels is None:
    files, skipped, warnings, classes = scan_folder(manual_dir)
  else:
    files, skipped, absent = list_labelled(manual_dir, labels)
    warnings, classes = [], sorted({_nfc(label) for _, _, label in labels.rows})
  excluded = None
  if exclusion is not None:
    files, skipped, excluded = _exclude(files, skipped, exclusion)
    absent = [a for a in absent if not exclusion.excludes(a[0], a[1])]
    classes = [c for c in classes if c not in exclusion.class_keys]
  if absent and not allow_missing:
    raise build_plan.MissingImagesError(
      f'{len(absent)} of {len(absent) + len(files) + len(skipped)} files listed in '
      f'{labels.path} are absent from {manual_dir}; first: '
      f'{_examples([a for a, _ in absent])}. Fix the labels file, or pass --allow_missing to '
      'build without them (listed in missing.csv)'
    )
  # Every file is read once here: its sha256 (duplicates; the writer checks it again) and a strict
  # decode (a non-image never gets a label).
  sha: Dict[str, str] = {}
  usable: List[Tuple[str, str]] = []
  for image_id, cls in files:
    try:
      data = _read(manual_dir, image_id)
    except FileNotFoundError:
      if not allow_missing:
        raise _vanished(manual_dir, image_id, 'while the folder was being read') from None
      warnings.append(f'{image_id} vanished while the folder was being read: listed in missing.csv')
      absent.append((image_id, cls))
      continue
    except OSError as e:
      skipped.append((image_id, cls, f'unreadable: {e.strerror or e}'))
      continue
    reason = decode.check_decodable(data)
    if reason is not None:
      skipped.append((image_id, cls, f'not a decodable image: {reason}'))
      continue
    sha[image_id] = hashlib.sha256(data).hexdigest()
    usable.append((image_id, cls))

  by_digest: Dict[str, List[Tuple[str, str]]] = collections.defaultdict(list)
  for image_id, cls in usable:
    by_digest[sha[image_id]].append((image_id, cls))
  dropped: Dict[str, str] = {}
  across, within = [], []
  for items in by_digest.values():
    if len(items) < 2:
      continue
    items = sorted(items)
    if len({c for _, c in items}) > 1:
      for image_id, cls in items:
        other_id, other_cls = next((o, c) for o, c in items if c != cls)
        dropped[image_id] = (
          f'same content as {other_id} of class {other_cls!r}: the label is '
          'ambiguous, every copy is skipped'
        )
      across.append(' = '.join(i for i, _ in items))
    else:
      for image_id, _ in items[1:]:
        dropped[image_id] = f'same content as {items[0][0]} (same class): kept once'
      within.append(' = '.join(i for i, _ in items))
  if across:
    warnings.append(
      f'{len(across)} image(s) occur in more than one class (same sha256), every '
      f'copy is skipped: {_examples(across)} (skipped.csv)'
    )
  if within:
    warnings.append(
      f'{len(within)} image(s) occur more than once in one class (same sha256), kept '
      f'once: {_examples(within)} (skipped.csv)'
    )
  usable = [u for u in usable if u[0] not in dropped]
  skipped += [(i, c, dropped[i]) for i, c in files if i in dropped]

  per_class = collections.Counter(cls for _, cls in usable)
  empty = [c for c in classes if per_class[c] == 0]
  if empty:
    warnings.append(
      f'{len(empty)} class(es) without a usable image are not classes of the '
      f'dataset: {_examples([repr(c) for c in empty])}'
      + (
        ' (their files are in skipped.csv)'
        if any(s[1] in empty for s in skipped)
        else ' (empty folders)'
      )
    )
  single = sorted(c for c, n in per_class.items() if n == 1)
  if single:
    warnings.append(
      f'{len(single)} class(es) have a single image (kept in train, no validation '
      f'image): {_examples([repr(c) for c in single])}'
    )
  if not usable:
    first = '; '.join(f'{i}: {why}' for i, _, why in sorted(skipped)[:_SHOW])
    raise FolderError(
      f'{manual_dir}: no usable image ({len(files) + len(skipped)} files found, every one '
      f'skipped{": " + first if first else ""}); --manual_dir must hold one sub-folder per class '
      'with the images in it (or pass --labels=CSV with path,label rows)'
    )

  records, class_names = class_split.split_per_class(usable, val_fraction, seed)
  if val_fraction > 0 and not any(r.split == 'validation' for r in records):
    warnings.append(
      f'no class has enough images for a validation image at val_fraction '
      f'{val_fraction:g} (a class needs {math.ceil(1 / val_fraction - 1e-9)}): the '
      'dataset has no validation split'
    )
  for rec in records:
    rec.location = build_plan.Location(os.path.join(manual_dir, rec.id))
  pre = sorted(skipped)
  unassigned = [build_plan.Record(i, c, -1, build_plan.UNASSIGNED) for i, c, _ in pre]
  missing = [build_plan.Record(i, c, -1, build_plan.UNASSIGNED) for i, c in sorted(absent)]
  build = build_plan.BuildPlan(
    records + unassigned + missing, class_names, [], manual_dir, missing, excluded=excluded
  )
  return FolderPlan(manual_dir, build, sha, list(zip(unassigned, (r for _, _, r in pre))), warnings)


# ------------------------------------------------------------------------------------ builder


class FolderConfig(tfds.core.BuilderConfig):
  """One user dataset `folder/NAME`; `plan` and `options` only when building."""

  def __init__(
    self, *, name: str, plan: Optional[FolderPlan] = None, options: Optional[dict] = None, **kwargs
  ):
    super().__init__(name=name, description=f'folder/{name}: your labelled images', **kwargs)
    self.plan = plan
    self.options = options


class Folder(PackagedBuilder, tfds.core.GeneratorBasedBuilder):
  """Labelled images from a folder tree or a labels CSV; original bytes, contiguous labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put one sub-folder per class into the manual dir (or pass a labels CSV with path,label rows), and
  build with python -m dolg_jax.data.prepare --dataset=folder/NAME --manual_dir=DIR --data_dir=D.
  """

  def __init__(self, **kwargs):
    self._skipped: List[Tuple[build_plan.Record, str]] = []
    self._written: Dict[str, int] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Tensor(shape=(), dtype=np.object_),
          'label': tfds.features.Scalar(dtype=np.int64),
          CLASS_COLUMN: tfds.features.Text(),
          'id': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.plan is None:
      raise FolderError(
        f'folder/{cfg.name} is not prepared in {self.data_dir}: run python -m '
        f'dolg_jax.data.prepare --dataset=folder/{cfg.name} --manual_dir=DIR '
        f'--data_dir={self.data_dir}'
      )
    self._skipped = list(cfg.plan.skipped)
    self._written = {s: 0 for s in build_plan.SPLITS}
    splits = {'train': self._generate_examples('train')}
    if any(r.split == 'validation' for r in cfg.plan.build.records):  # TFDS cannot write empty ones
      splits['validation'] = self._generate_examples('validation')
    return splits

  def _generate_examples(self, split: str):
    plan = self.builder_config.plan
    allow_missing = self.builder_config.options['allow_missing']
    for rec in plan.build.records:
      if rec.split != split:
        continue
      try:
        data = _read(plan.manual_dir, rec.id)
      except FileNotFoundError:
        if not allow_missing:
          raise _vanished(plan.manual_dir, rec.id, 'while the dataset was being written') from None
        plan.warnings.append(
          f'{rec.id} vanished while the dataset was being written: listed in missing.csv'
        )
        plan.build.missing.append(rec)
        continue
      if hashlib.sha256(data).hexdigest() != plan.sha256[rec.id]:
        raise FolderChangedError(
          f'{os.path.join(plan.manual_dir, rec.id)} changed while the dataset was being '
          'written (its sha256 differs from the one checked first); nothing was written. Keep '
          '--manual_dir unchanged while preparing and run again'
        )
      self._written[split] += 1
      yield rec.id, {'image': data, 'label': rec.label, CLASS_COLUMN: rec.class_key, 'id': rec.id}

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    cfg = self.builder_config
    summary = side_files.write_side_files(
      os.fspath(self.data_path),
      cfg.plan.build,
      self._skipped,
      self._written,
      name=f'folder/{cfg.name}',
      build_options=cfg.options,
      class_column=CLASS_COLUMN,
      extra={'warnings': list(cfg.plan.warnings)},
    )
    for key in ('shards_searched', 'extracted_dir', 'duplicate_listings_ignored'):
      summary.pop(key, None)  # GLDv2's; the folder is in build_options.
    self.info.metadata.update({k: v for k, v in summary.items() if k != 'skipped_examples'})
    self.summary = summary


# ------------------------------------------------------------------------------------ public


def builder(dataset: str, data_dir: Optional[str] = None, **kwargs) -> Folder:
  """The builder of `folder/NAME` in `data_dir` (for reading a prepared dataset)."""
  kwargs.setdefault('file_format', 'array_record')
  return Folder(config=FolderConfig(name=parse_name(dataset)), data_dir=data_dir, **kwargs)


def build_options(
  manual_dir: str,
  *,
  val_fraction: float,
  split_seed: int,
  exclusion: Optional[build_plan.Exclusion],
  labels: Optional[Labels],
) -> dict:
  return {
    'source': 'labels file' if labels is not None else 'class folders',
    'manual_dir': os.path.abspath(manual_dir),
    'val_fraction': val_fraction,
    'split_seed': split_seed,
    'exclusion': _exclusion_record(exclusion),
    'labels': labels.describe() if labels else None,
  }


def _exclusion_record(exclusion: Optional[build_plan.Exclusion]) -> Optional[dict]:
  if exclusion is None:
    return None
  return {
    'file': os.path.abspath(exclusion.path),
    'sha256': exclusion.sha256,
    'num_labels': len(exclusion.class_keys),
    'num_paths': len(exclusion.image_ids),
  }


def _remove_empty_parents(path: str, stop: str) -> None:
  """Removes `path` and its parents up to (not including) `stop` while they are empty."""
  path, stop = os.path.abspath(path), os.path.abspath(stop)
  while path.startswith(stop + os.sep) and os.path.isdir(path) and not os.listdir(path):
    os.rmdir(path)
    path = os.path.dirname(path)


def prepare(
  dataset: str,
  manual_dir: str,
  data_dir: str,
  *,
  val_fraction: Optional[float] = None,
  exclude: Optional[str] = None,
  labels: Optional[str] = None,
  allow_missing: bool = False,
  split_seed: int = 0,
) -> Folder:
  """Builds `folder/NAME` (no-op if already built with the same options); returns the builder
  (`.summary` when built now). Every check happens before anything is written."""
  name = parse_name(dataset)
  val = DEFAULT_VAL_FRACTION if val_fraction is None else float(val_fraction)
  if not 0.0 <= val < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val}')
  exclusion = read_exclusion(exclude) if exclude else None
  labels_file = read_labels(labels) if labels else None
  options = build_options(
    manual_dir, val_fraction=val, split_seed=split_seed, exclusion=exclusion, labels=labels_file
  )
  existing = builder(dataset, data_dir)
  if existing.is_prepared():
    recorded = dict(existing.info.metadata.get('build_options') or {})
    recorded.pop('allow_missing', None)
    if recorded != options:
      changed = sorted(k for k in set(recorded) | set(options) if recorded.get(k) != options.get(k))
      raise FolderError(
        f'{dataset} is already prepared in {existing.data_path} with other options ('
        + ', '.join(f'{k}: {recorded.get(k)!r} then, {options.get(k)!r} now' for k in changed)
        + f'); prepare it under another NAME, or delete {existing.data_path} first'
      )
    return existing
  plan = make_plan(
    manual_dir,
    val_fraction=val,
    seed=split_seed,
    exclusion=exclusion,
    labels=labels_file,
    allow_missing=allow_missing,
  )
  config = FolderConfig(name=name, plan=plan, options={**options, 'allow_missing': allow_missing})
  b = Folder(config=config, data_dir=data_dir, file_format='array_record')
  try:
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  except BaseException:
    _remove_empty_parents(os.path.dirname(os.fspath(b.data_path)), os.fspath(data_dir))
    raise
  return b


def num_classes(dataset: str, data_dir: str) -> int:
  return int(builder(dataset, data_dir).info.metadata['num_classes'])


def read_label_map(dataset: str, data_dir: str) -> List[str]:
  """label -> class name, from label_map.csv next to the data."""
  path = os.path.join(os.fspath(builder(dataset, data_dir).data_path), 'label_map.csv')
  with open(path, newline='', encoding='utf-8') as f:
    return [row[CLASS_COLUMN] for row in csv.DictReader(f)]
