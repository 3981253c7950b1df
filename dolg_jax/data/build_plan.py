"""What a builder of labelled images decides before reading image data (`gldv2`, `folder`).

A `Record` is one listed image: its id, its class key (a GLDv2 landmark id or a folder class
name), its contiguous label, its split and where its bytes are (`Location`). A `BuildPlan` holds
every record and the class key of each label. An `Exclusion` names class keys and image ids to
leave out before the split (`exclude_pairs`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Hashable, List, Optional, Sequence, Tuple

SPLITS = ('train', 'validation')
# Split of the records a builder skips before splitting (the folder dataset: unreadable files,
# duplicates, classes without a usable image); counted as its own line of the summary.
UNASSIGNED = 'unassigned'


class MissingImagesError(RuntimeError):
  """Images listed were found nowhere."""


@dataclasses.dataclass(frozen=True, slots=True)
class Location:
  """Where the bytes of one image are: a tar member (offset/size) or a plain file."""

  path: str
  offset: int = -1  # -1: the whole file at `path`.
  size: int = -1


@dataclasses.dataclass(slots=True)
class Record:
  id: str
  class_key: Hashable  # GLDv2: the landmark id (int); folder: the class name (str).
  label: int  # Contiguous, in sorted class-key order; -1 when unassigned.
  split: str
  location: Optional[Location] = None


@dataclasses.dataclass
class BuildPlan:
  """Everything decided before a byte of image data is read."""

  records: List[Record]  # Every listed image, in listing order.
  class_keys: list  # label -> class key (sorted).
  shards: List[str]  # Tar shards searched (paths relative to the manual dir).
  extracted_dir: Optional[str]  # Extracted tree (folder) searched, if any.
  missing: List[Record]
  duplicates: int = 0  # Listings repeating an id already listed (ignored).
  excluded: Optional[dict] = None  # Exclusion list applied (its counts), if any.


@dataclasses.dataclass(frozen=True)
class Exclusion:
  """An exclusion list: class keys and image ids to leave out of the dataset."""

  path: str
  sha256: str
  class_keys: frozenset
  image_ids: frozenset

  @property
  def tag(self) -> str:
    return self.sha256[:12]

  def excludes(self, image_id: str, class_key) -> bool:
    return class_key in self.class_keys or image_id in self.image_ids


def exclude_pairs(
  pairs: Sequence[Tuple[str, Hashable]], exclusion: Exclusion
) -> Tuple[List[Tuple[str, Hashable]], dict]:
  """Drops the (id, class key) pairs the exclusion names; returns the rest and the counts
  (`images_removed`, `classes_removed`, `excluded_classes_not_listed`)."""
  kept = [(i, c) for i, c in pairs if not exclusion.excludes(i, c)]
  listed = {c for _, c in pairs}
  kept_classes = {c for _, c in kept}
  return kept, {
    'images_removed': len(pairs) - len(kept),
    'classes_removed': len(listed - kept_classes),
    'excluded_classes_not_listed': len(exclusion.class_keys - listed),
  }


def file_sha256(path: str, what: str) -> str:
  """The sha256 of a listed input file (`what`: 'labels file', 'exclusion list', ...), recorded in
  the build options; FileNotFoundError naming it when it is absent."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{what} {path} not found')
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()
