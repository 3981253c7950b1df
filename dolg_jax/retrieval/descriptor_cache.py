"""Descriptors of one prepared revisitop split, extracted once and cached on disk.

`split_descriptors(extractor, name, data_dir, split, cache_dir=..., model_key=..., use_crop=...)`
returns the (n, D) unit-norm descriptors of a split of a prepared revisitop-layout dataset
(dolg_jax.data.revisitop). The cache file name is a digest of everything that determines the
numbers: the dataset and split, `model_key` (the weights' content hash from `variables_hash` plus
the compute dtype), whether queries are cropped, and the extraction settings
(`ExtractConfig.key()`); a JSON file beside each .npy records that key. Files are written by
process 0 under a temporary name and moved into place, so a reader never sees a partial file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from dolg_jax.data import revisitop
from dolg_jax.retrieval import extract as extract_lib


def variables_hash(variables: Any) -> str:
  """Content hash of a variables tree (names, shapes, dtypes and bytes)."""
  h = hashlib.sha1()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(variables)[0],
                           key=lambda kv: jax.tree_util.keystr(kv[0])):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def cache_path(cache_dir: str, key: Mapping[str, Any]) -> str:
  """Where the descriptors of `key` are cached."""
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f'{key["dataset"]}_{key["split"]}_{digest}.npy')


def split_descriptors(extractor: extract_lib.Extractor, name: str, data_dir: str, split: str,
                      *, cache_dir: Optional[str], model_key: str, use_crop: bool) -> np.ndarray:
  """(n, D) descriptors of one split, from the cache when present."""
  key = {'dataset': name, 'split': split, 'model': model_key, 'crop': use_crop,
         'extract': extractor.cfg.key()}
  path = cache_path(cache_dir, key) if cache_dir else None
  if path and os.path.exists(path):
    logging.info('descriptors from cache %s', path)
    return np.load(path)
  src = revisitop.data_source(name, data_dir, split)
  n = len(src)

  def examples():
    for ex in revisitop.iter_examples(src):
      out = {'index': int(ex['index']), 'image': ex['image']}
      if use_crop:
        out['bbx'] = np.asarray(ex['bbx'], np.float64)
      yield out

  t0 = time.perf_counter()
  num = int(revisitop.load_summary(name, data_dir)[f'num_{split}'])  # list length
  desc = extractor.extract(examples(), num)
  logging.info('%s/%s: %d images in %.1fs', name, split, n, time.perf_counter() - t0)
  if path and jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + '.tmp.npy'
    np.save(tmp, desc)
    os.replace(tmp, path)
    with open(path[:-4] + '.json', 'w') as f:
      json.dump(key, f, indent=1)
  return desc
