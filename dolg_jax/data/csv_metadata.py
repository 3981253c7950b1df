"""Strict readers of the GLDv2 metadata CSVs, our own CSVs and the revisitop ground truth.

`read_train_clean` / `read_train` -> (image id, landmark id) pairs; `read_image_ids` (index.csv,
test.csv); `read_retrieval_solution` -> (public, private, ignored); `read_exclusion`,
`read_labels`, `read_folder_exclusion` (our exclusion lists and folder labels); `read_lines`;
`check_gnd(cfg, path)` checks a revisitop gnd_<name>.pkl dict and returns it. A malformed file
raises `MetadataError` (a ValueError) 'PATH:LINE: what is wrong; what to do'.
The formats and every check: docs/design_notes.md.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import posixpath
import re
from typing import Any, Iterator, Sequence

IMAGE_ID = re.compile(r'[0-9a-f]{16}')
LANDMARK_ID = re.compile(r'[0-9]+')
_SHOW = 60


class MetadataError(ValueError):
  """A metadata file is malformed (message: 'PATH:LINE: what is wrong; what to do')."""


def _remedy(path: str, own: str = '') -> str:
  """What to do about a bad file: official downloads are re-downloaded, files of ours (`own`
  names their kind, e.g. 'exclusion list') fixed."""
  if own:
    return f'fix the {own} {os.path.basename(path)}'
  return f'fix or re-download {os.path.basename(path)} (the official file has no such rows)'


def read_text(path: str, own: str = '') -> str:
  """The file decoded as strict UTF-8 (MetadataError naming the line of the first bad byte)."""
  with open(path, 'rb') as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8) :]
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise MetadataError(
      f'{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); the file is '
      f'damaged or was re-encoded: {_remedy(path, own)}'
    ) from None


def rows(
  path: str, columns: Sequence[str], *, any_of: bool = False, own: str = ''
) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {column: value}) of each data row; the header must hold `columns` (with
  `any_of`: at least one of them). `own`: see `_remedy`."""
  text = read_text(path, own)
  reader = csv.reader(io.StringIO(text, newline=''), strict=True)
  expected = (' and/or ' if any_of else ',').join(columns)
  try:
    header = next(reader, None)
    if header is None:
      raise MetadataError(f'{path}:1: empty file (expected the header {expected})')
    missing = [c for c in columns if c not in header]
    if missing and (not any_of or len(missing) == len(columns)):
      raise MetadataError(
        f'{path}:1: header {",".join(header)!r} lacks column(s) '
        f'{", ".join(missing)} (expected {expected})'
      )
    while True:
      start = reader.line_num + 1
      try:
        row = next(reader)
      except StopIteration:
        return
      if not row:
        continue
      if len(row) != len(header):
        shown = ','.join(row)
        shown = shown if len(shown) <= _SHOW else shown[:_SHOW] + '...'
        hint = (
          ' (a comma where a space belongs? image ids are separated by spaces)'
          if len(row) > len(header)
          else ''
        )
        raise MetadataError(
          f'{path}:{start}: {len(row)} fields, the header has {len(header)}'
          f'{hint}: {shown!r}; {_remedy(path, own)}'
        )
      yield start, dict(zip(header, row))
  except csv.Error as e:
    raise MetadataError(
      f'{path}:{reader.line_num}: malformed CSV ({e}); {_remedy(path, own)}'
    ) from None


def _landmark(path: str, line: int, value: str, own: str = '') -> int:
  if not LANDMARK_ID.fullmatch(value):
    raise MetadataError(
      f'{path}:{line}: landmark_id {value!r} is not a non-negative integer; {_remedy(path, own)}'
    )
  return int(value)


def _image_id(path: str, line: int, value: str, own: str = '') -> str:
  if not value:
    raise MetadataError(
      f'{path}:{line}: empty image id (two spaces in a row, or a leading or '
      f'trailing space); {_remedy(path, own)}'
    )
  if not IMAGE_ID.fullmatch(value):
    raise MetadataError(
      f'{path}:{line}: image id {value!r} is not 16 lowercase hex digits; {_remedy(path, own)}'
    )
  return value


def _image_list(path: str, line: int, value: str, what: str) -> list[str]:
  """Space-separated 16-hex image ids (at least one)."""
  if not value.strip():
    raise MetadataError(f'{path}:{line}: {what} lists no images; {_remedy(path)}')
  return [_image_id(path, line, image_id) for image_id in value.split(' ')]


def _first_listing(path: str, line: int, image_id: str, seen: dict[str, int], what: str) -> None:
  if image_id in seen:
    raise MetadataError(
      f'{path}:{line}: {what} {image_id} is listed again (first at line '
      f'{seen[image_id]}); {_remedy(path)}'
    )
  seen[image_id] = line


def read_train_clean(path: str) -> list[tuple[str, int]]:
  """(image id, landmark id) pairs of train_clean.csv, in file order."""
  pairs = []
  for line, row in rows(path, ('landmark_id', 'images')):
    landmark = _landmark(path, line, row['landmark_id'])
    pairs.extend(
      (image_id, landmark)
      for image_id in _image_list(path, line, row['images'], f'landmark {landmark}')
    )
  return pairs


def read_train(path: str) -> list[tuple[str, int]]:
  """(image id, landmark id) pairs of train.csv, in file order."""
  return [
    (_image_id(path, line, row['id']), _landmark(path, line, row['landmark_id']))
    for line, row in rows(path, ('id', 'url', 'landmark_id'))
  ]


def read_image_ids(path: str) -> list[str]:
  """The `id` column of the GLDv2 retrieval index.csv / test.csv, in file order (no repeats)."""
  ids: list[str] = []
  seen: dict[str, int] = {}
  for line, row in rows(path, ('id',)):
    image_id = _image_id(path, line, row['id'])
    _first_listing(path, line, image_id, seen, 'image id')
    ids.append(image_id)
  return ids


SOLUTION_USAGES = ('Public', 'Private', 'Ignored')


def read_retrieval_solution(
  path: str,
) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str]]:
  """(public, private, ignored) of retrieval_solution_v2.1.csv: test id -> relevant index ids for
  the Public and Private rows; the test ids of the Ignored rows (whose images column is None)."""
  public: dict[str, list[str]] = {}
  private: dict[str, list[str]] = {}
  ignored: list[str] = []
  seen: dict[str, int] = {}
  for line, row in rows(path, ('id', 'images', 'Usage')):
    test_id, usage = _image_id(path, line, row['id']), row['Usage']
    if usage not in SOLUTION_USAGES:
      raise MetadataError(
        f'{path}:{line}: Usage {usage!r} of {test_id} is not one of '
        f'{", ".join(SOLUTION_USAGES)}; {_remedy(path)}'
      )
    _first_listing(path, line, test_id, seen, 'test id')
    if usage == 'Ignored':
      ignored.append(test_id)
      continue
    if row['images'] == 'None':
      raise MetadataError(
        f'{path}:{line}: {usage} test id {test_id} has images None (only '
        f'Ignored rows may); {_remedy(path)}'
      )
    (public if usage == 'Public' else private)[test_id] = _image_list(
      path, line, row['images'], f'{usage} test id {test_id}'
    )
  return public, private, ignored


def read_exclusion(path: str) -> tuple[frozenset[int], frozenset[str]]:
  """(landmark ids, image ids) of an exclusion list: a CSV with a landmark_id and/or an id column;
  a row may leave either empty (spaces around values are ignored). At least one id overall."""
  own = 'exclusion list'
  landmarks: set[int] = set()
  images: set[str] = set()
  for line, row in rows(path, ('landmark_id', 'id'), any_of=True, own=own):
    landmark = row.get('landmark_id', '').strip()
    image_id = row.get('id', '').strip()
    if landmark:
      landmarks.add(_landmark(path, line, landmark, own))
    if image_id:
      images.add(_image_id(path, line, image_id, own))
  if not landmarks and not images:
    raise MetadataError(
      f'{path}: the exclusion list names no landmark_id and no id; {_remedy(path, own)}'
    )
  return frozenset(landmarks), frozenset(images)


def _relative_path(path: str, line: int, value: str, own: str) -> str:
  """A path relative to the dataset folder, normalised (posix separators, no '.' parts)."""
  if not value.strip():
    raise MetadataError(f'{path}:{line}: empty path; {_remedy(path, own)}')
  norm = posixpath.normpath(value.replace('\\', '/'))
  if posixpath.isabs(norm) or norm == '..' or norm.startswith('../') or norm == '.':
    raise MetadataError(
      f'{path}:{line}: path {value!r} is not a file below the folder (paths '
      f'are relative to --manual_dir); {_remedy(path, own)}'
    )
  return norm


def read_labels(path: str) -> list[tuple[int, str, str]]:
  """(line, relative path, label) of a folder dataset's labels CSV (`path,label`), in file order.
  Paths are normalised; each may be listed once; labels are non-empty class names, kept as
  written (spaces and non-ASCII letters included)."""
  own = 'labels file'
  out = []
  seen: dict[str, int] = {}
  for line, row in rows(path, ('path', 'label'), own=own):
    rel = _relative_path(path, line, row['path'], own)
    if not row['label'].strip():
      raise MetadataError(f'{path}:{line}: empty label for {rel}; {_remedy(path, own)}')
    if rel in seen:
      raise MetadataError(
        f'{path}:{line}: {rel} is listed again (first at line {seen[rel]}); {_remedy(path, own)}'
      )
    seen[rel] = line
    out.append((line, rel, row['label']))
  if not out:
    raise MetadataError(f'{path}: the labels file lists no image; {_remedy(path, own)}')
  return out


def read_folder_exclusion(path: str) -> tuple[frozenset[str], frozenset[str]]:
  """(class names, relative paths) of a folder dataset's exclusion list: a CSV with a label and/or a
  path column; a row may leave either empty. At least one entry overall."""
  own = 'exclusion list'
  labels: set[str] = set()
  paths: set[str] = set()
  for line, row in rows(path, ('label', 'path'), any_of=True, own=own):
    if row.get('label', '').strip():
      labels.add(row['label'])
    if row.get('path', '').strip():
      paths.add(_relative_path(path, line, row['path'], own))
  if not labels and not paths:
    raise MetadataError(
      f'{path}: the exclusion list names no label and no path; {_remedy(path, own)}'
    )
  return frozenset(labels), frozenset(paths)


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a UTF-8 list file (e.g. revisitop1m.txt)."""
  return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def check_gnd(cfg: Any, path: str) -> dict:
  """Checks a revisitop ground-truth dict; returns it (MetadataError naming path and entry)."""
  if not isinstance(cfg, dict):
    raise MetadataError(
      f'{path}: holds a {type(cfg).__name__}, not the revisitop ground-truth dict; re-download it'
    )
  for key in ('imlist', 'qimlist', 'gnd'):
    if key not in cfg:
      raise MetadataError(f'{path}: missing key {key!r} (found {sorted(cfg)}); re-download it')
    if not isinstance(cfg[key], (list, tuple)):
      raise MetadataError(
        f'{path}: {key} is a {type(cfg[key]).__name__}, not a list; re-download it'
      )
  for key in ('imlist', 'qimlist'):
    for i, name in enumerate(cfg[key]):
      if not isinstance(name, str) or not name:
        raise MetadataError(f'{path}: {key}[{i}] is {name!r}, not an image name; re-download it')
  n_db = len(cfg['imlist'])
  if len(cfg['gnd']) != len(cfg['qimlist']):
    raise MetadataError(
      f'{path}: {len(cfg["gnd"])} gnd entries but {len(cfg["qimlist"])} queries; re-download it'
    )
  for i, g in enumerate(cfg['gnd']):
    if not isinstance(g, dict):
      raise MetadataError(f'{path}: gnd[{i}] is not a dict; re-download it')
    for key in ('bbx', 'easy', 'hard', 'junk'):
      if key not in g:
        raise MetadataError(f'{path}: gnd[{i}] lacks {key!r}; re-download it')
    bbx = g['bbx']
    if len(bbx) != 4 or not all(
      isinstance(v, (int, float)) or hasattr(v, '__float__') for v in bbx
    ):
      raise MetadataError(f'{path}: gnd[{i}].bbx {bbx!r} is not 4 numbers; re-download it')
    for key in ('easy', 'hard', 'junk'):
      for j in g[key]:
        if not (isinstance(j, int) or hasattr(j, '__index__')) or not 0 <= int(j) < n_db:
          raise MetadataError(
            f'{path}: gnd[{i}].{key} holds {j!r}, not an index into the '
            f'{n_db} database images; re-download it'
          )
  return cfg
