"""Strict readers of the GLDv2 metadata CSVs and the revisitop ground truth; every error names the
file and line.

  train_clean.csv   landmark_id,images        images: 16-hex ids separated by single spaces
  train.csv         id,url,landmark_id        one image per row

Checked: UTF-8 encoding (a byte order mark is accepted), CSV quoting (`csv` strict mode: a stray
quote is an error, not a silently merged field), the header's columns, the same number of fields
on every row as in the header (a comma where a space belongs is caught), image ids of exactly 16
lowercase hex digits, landmark ids that are non-negative integers, and no empty image lists.

`check_gnd(cfg, path)` checks a revisitop `gnd_<name>.pkl` dict: image lists of strings, one entry
per query with a 4-number `bbx` and `easy` / `hard` / `junk` lists of valid database indices.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
from typing import Any, Iterator, Sequence

IMAGE_ID = re.compile(r'[0-9a-f]{16}')
LANDMARK_ID = re.compile(r'[0-9]+')
_SHOW = 60


class MetadataError(ValueError):
  """A metadata file is malformed (message: 'PATH:LINE: what is wrong; what to do')."""


def _remedy(path: str) -> str:
  return (f'fix or re-download {os.path.basename(path)} (the official file has no such rows)')


def read_text(path: str) -> str:
  """The file decoded as strict UTF-8 (MetadataError naming the line of the first bad byte)."""
  with open(path, 'rb') as f:
    data = f.read()
  if data.startswith(codecs.BOM_UTF8):
    data = data[len(codecs.BOM_UTF8):]
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    column = e.start - (data.rfind(b'\n', 0, e.start) + 1) + 1
    raise MetadataError(
        f'{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {column}); the file is '
        f'damaged or was re-encoded: {_remedy(path)}') from None


def rows(path: str, columns: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, {column: value}) of each data row; the header must hold `columns`."""
  text = read_text(path)
  reader = csv.reader(io.StringIO(text, newline=''), strict=True)
  try:
    header = next(reader, None)
    if header is None:
      raise MetadataError(f'{path}:1: empty file (expected the header {",".join(columns)})')
    missing = [c for c in columns if c not in header]
    if missing:
      raise MetadataError(f'{path}:1: header {",".join(header)!r} lacks column(s) '
                          f'{", ".join(missing)} (expected {",".join(columns)})')
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
        hint = (' (a comma where a space belongs? image ids are separated by spaces)'
                if len(row) > len(header) else '')
        raise MetadataError(f'{path}:{start}: {len(row)} fields, the header has {len(header)}'
                            f'{hint}: {shown!r}; {_remedy(path)}')
      yield start, dict(zip(header, row))
  except csv.Error as e:
    raise MetadataError(f'{path}:{reader.line_num}: malformed CSV ({e}); {_remedy(path)}') from None


def _landmark(path: str, line: int, value: str) -> int:
  if not LANDMARK_ID.fullmatch(value):
    raise MetadataError(f'{path}:{line}: landmark_id {value!r} is not a non-negative integer; '
                        f'{_remedy(path)}')
  return int(value)


def _image_id(path: str, line: int, value: str) -> str:
  if not value:
    raise MetadataError(f'{path}:{line}: empty image id (two spaces in a row, or a leading or '
                        f'trailing space); {_remedy(path)}')
  if not IMAGE_ID.fullmatch(value):
    raise MetadataError(f'{path}:{line}: image id {value!r} is not 16 lowercase hex digits; '
                        f'{_remedy(path)}')
  return value


def read_train_clean(path: str) -> list[tuple[str, int]]:
  """(image id, landmark id) pairs of train_clean.csv, in file order."""
  pairs = []
  for line, row in rows(path, ('landmark_id', 'images')):
    landmark = _landmark(path, line, row['landmark_id'])
    images = row['images']
    if not images.strip():
      raise MetadataError(f'{path}:{line}: landmark {landmark} lists no images; {_remedy(path)}')
    for image_id in images.split(' '):
      pairs.append((_image_id(path, line, image_id), landmark))
  return pairs


def read_train(path: str) -> list[tuple[str, int]]:
  """(image id, landmark id) pairs of train.csv, in file order."""
  return [(_image_id(path, line, row['id']), _landmark(path, line, row['landmark_id']))
          for line, row in rows(path, ('id', 'url', 'landmark_id'))]


def read_lines(path: str) -> list[str]:
  """Non-empty stripped lines of a UTF-8 list file (e.g. revisitop1m.txt)."""
  return [line.strip() for line in read_text(path).splitlines() if line.strip()]


def check_gnd(cfg: Any, path: str) -> dict:
  """Checks a revisitop ground-truth dict; returns it (MetadataError naming path and entry)."""
  if not isinstance(cfg, dict):
    raise MetadataError(f'{path}: holds a {type(cfg).__name__}, not the revisitop ground-truth '
                        'dict; re-download it')
  for key in ('imlist', 'qimlist', 'gnd'):
    if key not in cfg:
      raise MetadataError(f'{path}: missing key {key!r} (found {sorted(cfg)}); re-download it')
    if not isinstance(cfg[key], (list, tuple)):
      raise MetadataError(f'{path}: {key} is a {type(cfg[key]).__name__}, not a list; '
                          're-download it')
  for key in ('imlist', 'qimlist'):
    for i, name in enumerate(cfg[key]):
      if not isinstance(name, str) or not name:
        raise MetadataError(f'{path}: {key}[{i}] is {name!r}, not an image name; re-download it')
  n_db = len(cfg['imlist'])
  if len(cfg['gnd']) != len(cfg['qimlist']):
    raise MetadataError(f'{path}: {len(cfg["gnd"])} gnd entries but {len(cfg["qimlist"])} '
                        'queries; re-download it')
  for i, g in enumerate(cfg['gnd']):
    if not isinstance(g, dict):
      raise MetadataError(f'{path}: gnd[{i}] is not a dict; re-download it')
    for key in ('bbx', 'easy', 'hard', 'junk'):
      if key not in g:
        raise MetadataError(f'{path}: gnd[{i}] lacks {key!r}; re-download it')
    bbx = g['bbx']
    if len(bbx) != 4 or not all(isinstance(v, (int, float)) or hasattr(v, '__float__')
                                for v in bbx):
      raise MetadataError(f'{path}: gnd[{i}].bbx {bbx!r} is not 4 numbers; re-download it')
    for key in ('easy', 'hard', 'junk'):
      for j in g[key]:
        if not (isinstance(j, int) or hasattr(j, '__index__')) or not 0 <= int(j) < n_db:
          raise MetadataError(f'{path}: gnd[{i}].{key} holds {j!r}, not an index into the '
                              f'{n_db} database images; re-download it')
  return cfg
