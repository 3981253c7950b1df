"""The GLDv2 listings in the manual dir and the GLDv2 exclusion lists, as (id, landmark id) pairs.

`clean`: train_clean.csv (landmark_id,images); `full`: train.csv (id,url,landmark_id). An
exclusion list is a CSV with a `landmark_id` and/or an `id` (image id) column. The CSVs are parsed
strictly by csv_metadata (errors name the file and line).
"""

from __future__ import annotations

import os
from typing import List, Sequence, Tuple

from dolg_jax.data import build_plan
from dolg_jax.data import csv_metadata
from dolg_jax.data.build_plan import Exclusion


# subset -> (file, its columns, reader)
_LISTINGS = {
  'clean': ('train_clean.csv', 'landmark_id,images', csv_metadata.read_train_clean),
  'full': ('train.csv', 'id,url,landmark_id', csv_metadata.read_train),
}


def read_listing(manual_dir: str, subset: str) -> List[Tuple[str, int]]:
  """(image id, landmark id) pairs of the `clean` or `full` listing, in file order."""
  if subset not in _LISTINGS:
    raise ValueError(f'unknown GLDv2 subset {subset!r} (expected clean or full)')
  name, columns, read = _LISTINGS[subset]
  path = os.path.join(manual_dir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f'{path} not found: the manual dir must hold the official {name} ({columns})'
    )
  return read(path)


def read_exclusion(path: str) -> Exclusion:
  """Reads an exclusion list (class keys: landmark ids; image ids)."""
  digest = build_plan.file_sha256(path, 'exclusion list')
  landmarks, images = csv_metadata.read_exclusion(path)
  return Exclusion(path, digest, landmarks, images)


def describe_exclusion(exclusion: Exclusion) -> dict:
  """The exclusion list as recorded in build_options (metadata, summary.json)."""
  return {
    'file': os.path.abspath(exclusion.path),
    'sha256': exclusion.sha256,
    'num_landmark_ids': len(exclusion.class_keys),
    'num_image_ids': len(exclusion.image_ids),
  }


def exclude_pairs(
  pairs: Sequence[Tuple[str, int]], exclusion: Exclusion
) -> Tuple[List[Tuple[str, int]], dict]:
  """Drops the listed pairs the exclusion names; returns the rest and the summary's counts."""
  kept, counts = build_plan.exclude_pairs(pairs, exclusion)
  return kept, {
    **describe_exclusion(exclusion),
    'images_removed': counts['images_removed'],
    'landmarks_removed': counts['classes_removed'],
    'excluded_landmarks_not_listed': counts['excluded_classes_not_listed'],
  }
