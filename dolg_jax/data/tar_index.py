"""GLDv2 tar shards (images_NNN.tar): finding them, indexing their members, reading the bytes.

`index_shard` maps each image id (a member's file name without .jpg) to its `Location` (offset and
size in the tar) and raises `TruncatedShardError` naming the shard when the tar is cut short;
`read_bytes` reads a `Location` (a member or a whole file). `locate(ids, shard_dir, tree_dir, ...)`
finds listed ids in the shards of a folder, else in an extracted tree a/b/c/<id>.jpg;
`read_in_order(items)` reads (key, Location) pairs in file order.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from typing import Dict, Hashable, Iterable, Iterator, List, Optional, Sequence, Tuple

from dolg_jax.data import md5_check
from dolg_jax.data.build_plan import Location

SHARD_DIRS = ('', 'train')  # Flat layout; official download script and public bucket.
_SHARD_RE = re.compile(r'^images_(\d+)\.tar$')


class TruncatedShardError(RuntimeError):
  """A tar shard ends before its declared contents."""


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
        raise ValueError(
          f'{manual_dir}: {name} is both at {found[name]} and at {p}; keep one '
          '(the official layout has the shards in train/)'
        )
      found[name] = p
  return [found[n] for n in sorted(found, key=lambda n: int(_SHARD_RE.match(n).group(1)))]


def describe_shards(names: Sequence[str]) -> str:
  """The shards searched, for an error message."""
  if not names:
    return 'no images_*.tar shard'
  if len(names) <= 6:
    return ', '.join(names)
  return f'{len(names)} shards {names[0]} .. {names[-1]}'


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
            f'{end} but the file has {file_size} (re-download {name})'
          )
        image_id = _id_from_member(member.name)
        if image_id is not None and image_id not in index:
          index[image_id] = Location(path, member.offset_data, member.size)
      end_of_members = tar.offset
  except tarfile.TarError as e:
    raise TruncatedShardError(
      f'{path}: tar shard {name} is unreadable or truncated: {e} (re-download {name})'
    ) from e
  # A complete archive ends with zero blocks; without them the file was cut between members.
  with open(path, 'rb') as f:
    f.seek(end_of_members)
    trailer = f.read(1024)
  if len(trailer) < 1024 or trailer.strip(b'\0'):
    raise TruncatedShardError(
      f'{path}: tar shard {name} is truncated: no end-of-archive marker after byte '
      f'{end_of_members} of {file_size} (re-download {name})'
    )
  return index


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
    raise TruncatedShardError(
      f'{loc.path}: tar shard {name} is truncated (short read at byte '
      f'{loc.offset}; re-download {name})'
    )
  return data


def locate(
  ids: Iterable[str],
  shard_dir: str,
  tree_dir: Optional[str],
  *,
  check_md5: bool,
  md5_dir: Optional[str] = None,
) -> Tuple[Dict[str, Location], List[str]]:
  """({id: Location} of the ids found, the shard paths searched). An id is looked up in the shards
  of `shard_dir` (`find_shards`; md5-verified when `check_md5`, see `md5_check.verify_md5`), then
  as `tree_dir`/a/b/c/<id>.jpg; ids found nowhere are left out."""
  shards = find_shards(shard_dir) if os.path.isdir(shard_dir) else []
  found: Dict[str, Location] = {}
  for shard in shards:
    if check_md5:
      md5_check.verify_md5(shard, md5_dir)
    for image_id, loc in index_shard(shard).items():
      found.setdefault(image_id, loc)
  locations = {}
  for image_id in ids:
    loc = found.get(image_id)
    if loc is None and tree_dir is not None and len(image_id) >= 3:
      path = os.path.join(tree_dir, image_id[0], image_id[1], image_id[2], image_id + '.jpg')
      if os.path.isfile(path):
        loc = Location(path)
    if loc is not None:
      locations[image_id] = loc
  return locations, shards


def read_in_order(items: Iterable[Tuple[Hashable, Location]]) -> Iterator[Tuple[Hashable, bytes]]:
  """(key, bytes) of each (key, Location), read in (file, offset) order; files closed at the end."""
  handles: Dict[str, object] = {}
  try:
    for key, loc in sorted(items, key=lambda kv: (kv[1].path, kv[1].offset)):
      yield key, read_bytes(loc, handles)
  finally:
    for f in handles.values():
      f.close()
