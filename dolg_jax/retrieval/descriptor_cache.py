"""Descriptors of one prepared split, extracted once and cached on disk.

`split_descriptors(extractor, name, data_dir, split, cache_dir=, model_key=, use_crop=)` -> (n, D)
unit-norm descriptors of a revisitop-layout split, in list order; `gldv2_split_descriptors(...)` ->
(descriptors, ids) of a gldv2_retrieval split (ValueError when a cached entry has no ids). Both go
through `cached(cache_dir, key, compute)`. Files, written by process 0 under temporary names (the
ids before the descriptors): CACHE_DIR/<dataset>_<split>_<digest of the key>.npy, beside it the
key as .json and the ids as .ids.npy. The key: dataset, split, `model_key(variables, dtype,
overrides)`, query cropping and `ExtractConfig.key()`. Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from dolg_jax import atomic
from dolg_jax.data import revisitop
from dolg_jax.retrieval import extract as extract_lib
from dolg_jax.retrieval import gldv2_eval

Ids = Optional[list]


def variables_hash(variables: Any) -> str:
  """Content hash of a variables tree (names, shapes, dtypes and bytes)."""
  h = hashlib.sha1()
  for path, leaf in sorted(
    jax.tree_util.tree_flatten_with_path(variables)[0], key=lambda kv: jax.tree_util.keystr(kv[0])
  ):
    a = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()[:16]


def model_key(variables: Any, dtype: str, overrides: Mapping[str, Any]) -> str:
  """'<variables_hash>-<dtype>' plus '-<field>=<value>' for each model override that is on.

  Overrides that are off (0 / False) add nothing, so the key of the plain model stays the same.
  """
  key = f'{variables_hash(variables)}-{dtype}'
  return key + ''.join(f'-{k}={v}' for k, v in sorted(overrides.items()) if v)


def cache_path(cache_dir: str, key: Mapping[str, Any]) -> str:
  """Where the descriptors of `key` are cached."""
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
  return os.path.join(cache_dir, f'{key["dataset"]}_{key["split"]}_{digest}.npy')


def _atomic_save(path: str, array: np.ndarray) -> None:
  with atomic.writing(path) as f:
    np.save(f, array)


def cached(
  cache_dir: Optional[str], key: Mapping[str, Any], compute: Callable[[], tuple[np.ndarray, Ids]]
) -> tuple[np.ndarray, Ids]:
  """(descriptors, ids or None) of `key`: from the cache when present, else `compute()` (saved
  when `cache_dir` is set)."""
  path = cache_path(cache_dir, key) if cache_dir else None
  ids_path = path[:-4] + '.ids.npy' if path else None
  if path and os.path.exists(path):
    logging.info('descriptors from cache %s', path)
    ids = np.load(ids_path).tolist() if os.path.exists(ids_path) else None
    return np.load(path), ids
  t0 = time.perf_counter()
  desc, ids = compute()
  logging.info(
    '%s/%s: %d images in %.1fs',
    key['dataset'],
    key['split'],
    desc.shape[0],
    time.perf_counter() - t0,
  )
  if path and jax.process_index() == 0:
    os.makedirs(cache_dir, exist_ok=True)
    atomic.write_json(path[:-4] + '.json', dict(key), indent=1)
    if ids is not None:
      _atomic_save(ids_path, np.asarray(ids, dtype=str))
    _atomic_save(path, desc)
  return desc, ids


def _key(
  extractor: extract_lib.Extractor, name: str, split: str, model: str, use_crop: bool
) -> dict:
  return {
    'dataset': name,
    'split': split,
    'model': model,
    'crop': use_crop,
    'extract': extractor.cfg.key(),
  }


def split_descriptors(
  extractor: extract_lib.Extractor,
  name: str,
  data_dir: str,
  split: str,
  *,
  cache_dir: Optional[str],
  model_key: str,
  use_crop: bool,
) -> np.ndarray:
  """(n, D) descriptors of one split of a revisitop-layout dataset, from the cache when present."""

  def compute():
    src = revisitop.data_source(name, data_dir, split)

    def examples():  # this process's records only (each process reads only its share)
      for i in extract_lib.own_share(len(src)):
        ex = src[i]
        out = {'index': int(ex['index']), 'image': ex['image']}
        if use_crop:
          out['bbx'] = np.asarray(ex['bbx'], np.float64)
        yield out

    num = int(revisitop.load_summary(name, data_dir)[f'num_{split}'])  # list length
    return extractor.extract(examples(), num, presharded=True), None

  key = _key(extractor, name, split, model_key, use_crop)
  return cached(cache_dir, key, compute)[0]


def gldv2_split_descriptors(
  extractor: extract_lib.Extractor,
  data_dir: str,
  split: str,
  *,
  cache_dir: Optional[str],
  model_key: str,
) -> tuple[np.ndarray, list[str]]:
  """(descriptors (n, D), ids) of the stored images of one gldv2_retrieval split, cached."""
  key = _key(extractor, 'gldv2_retrieval', split, model_key, False)
  desc, ids = cached(
    cache_dir, key, lambda: gldv2_eval.split_descriptors(extractor, data_dir, split)
  )
  if ids is None or len(ids) != desc.shape[0]:
    raise ValueError(
      f'{cache_path(cache_dir, key)}: the cached descriptors have no matching '
      'ids file (.ids.npy); delete the entry to re-extract it.'
    )
  return desc, ids
