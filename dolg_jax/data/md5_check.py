"""The md5 check of a GLDv2 tar shard against its md5.images_NNN.txt ("<md5>  images_NNN.tar").

`verify_md5(shard, manual_dir)` looks for the md5 file beside the shard, then (given the manual
dir) in it, its train/ and md5sum/train/ (`md5_file_for`); a mismatch raises `ChecksumError`
naming both files, an absent md5 file FileNotFoundError.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Optional

MD5_DIRS = ('', 'train', os.path.join('md5sum', 'train'))


class ChecksumError(RuntimeError):
  """A tar shard does not match its md5 file."""


def md5_file_for(shard_path: str, manual_dir: Optional[str] = None) -> Optional[str]:
  """md5.images_NNN.txt of a shard: beside it, or (manual dir) in it, train/ or md5sum/train/."""
  name = 'md5.' + os.path.basename(shard_path)[: -len('.tar')] + '.txt'
  candidates = [os.path.join(os.path.dirname(shard_path), name)]
  if manual_dir is not None:
    candidates += [os.path.join(manual_dir, sub, name) for sub in MD5_DIRS]
  for path in candidates:
    if os.path.isfile(path):
      return path
  return None


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
    where = [os.path.dirname(shard_path)] + (
      [os.path.join(manual_dir, d) for d in MD5_DIRS] if manual_dir else []
    )
    raise FileNotFoundError(
      f'md5.{name[: -len(".tar")]}.txt not found in {sorted(set(where))} '
      f'(needed to verify {name}; build without verify_md5 to skip the '
      'check)'
    )
  expected = read_md5_file(md5_path)
  digest = hashlib.md5()
  with open(shard_path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  if digest.hexdigest() != expected:
    raise ChecksumError(
      f'{shard_path}: md5 {digest.hexdigest()} != {expected} from {md5_path} (re-download {name})'
    )
