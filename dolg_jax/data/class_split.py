"""The seeded per-class train/validation split and the contiguous labels of a listing."""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Dict, Hashable, List, Sequence, Tuple

import numpy as np

from dolg_jax.data.build_plan import Record


def class_seed(key) -> int:
  """The per-class seed of `split_per_class`: a landmark id itself; a class name (the folder
  dataset) the first 8 bytes of its UTF-8 sha256."""
  if isinstance(key, str):
    return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')
  return int(key)


def split_per_class(
  pairs: Sequence[Tuple[str, Hashable]], val_fraction: float, seed: int
) -> Tuple[List[Record], list]:
  """(records in listing order, label -> class key): labels follow the sorted class keys.

  Each class's ids are sorted, permuted by a generator seeded with (seed, class_seed(key)), and
  the first floor(val_fraction * n) go to validation: independent of the other classes and of
  the listing's order. Duplicated ids keep their first listing.
  """
  by_class: Dict[Hashable, List[str]] = collections.defaultdict(list)
  seen = set()
  order = []
  for image_id, key in pairs:
    if image_id in seen:
      continue
    seen.add(image_id)
    by_class[key].append(image_id)
    order.append((image_id, key))
  class_keys = sorted(by_class)
  label_of = {key: i for i, key in enumerate(class_keys)}
  split_of = {}
  for key, ids in by_class.items():
    ids = sorted(ids)
    n_val = int(math.floor(len(ids) * val_fraction + 1e-9))
    perm = np.random.default_rng([seed, class_seed(key)]).permutation(len(ids))
    for rank, j in enumerate(perm):
      split_of[ids[j]] = 'validation' if rank < n_val else 'train'
  records = [Record(i, key, label_of[key], split_of[i]) for i, key in order]
  return records, class_keys
