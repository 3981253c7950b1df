"""Converted checkpoint directories (written by `python -m dolg_jax.convert`), read without torch.

Layout: config.json {"format": "dolg_jax.converted", "version": 1, "source", "has_head", "model":
the c.model fields}, variables.msgpack {'params', 'batch_stats'} (flax msgpack, float32 numpy) and,
optionally, head.msgpack (the margin head {'weight': (num_classes, dim), 't': ()}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from flax import serialization

from dolg_jax import atomic
from dolg_jax.weights import architecture
from dolg_jax.weights import torch_format

CONFIG_FILE = 'config.json'
VARIABLES_FILE = 'variables.msgpack'
HEAD_FILE = 'head.msgpack'
FORMAT_NAME = 'dolg_jax.converted'
FORMAT_VERSION = 1


# -------------------------------------------------------------------------------- converted dirs
def is_converted_dir(path: str | os.PathLike) -> bool:
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_converted(
  out_dir: str | os.PathLike,
  cfg: ml_collections.ConfigDict,
  variables: Mapping,
  head: Mapping | None = None,
  *,
  source: str = '',
) -> None:
  """Writes config.json, variables.msgpack and (if given) head.msgpack into `out_dir`."""
  os.makedirs(out_dir, exist_ok=True)
  np_vars = jax.tree.map(np.asarray, dict(variables))
  atomic.write_bytes(
    os.path.join(out_dir, VARIABLES_FILE), serialization.msgpack_serialize(np_vars)
  )
  head_path = os.path.join(out_dir, HEAD_FILE)
  if head is not None:
    head_np = jax.tree.map(np.asarray, dict(head))
    atomic.write_bytes(head_path, serialization.msgpack_serialize(head_np))
  elif os.path.exists(head_path):
    os.remove(head_path)  # a stale head from an earlier conversion
  meta = {
    'format': FORMAT_NAME,
    'version': FORMAT_VERSION,
    'source': str(source),
    'has_head': head is not None,
    'model': architecture.config_to_json(cfg),
  }
  atomic.write_json(os.path.join(out_dir, CONFIG_FILE), meta, indent=2, sort_keys=True)


def read_converted_meta(path: str) -> dict:
  cfg_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(cfg_path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise torch_format.CheckpointError(cfg_path, f'unreadable: {e}') from e
  if meta.get('format') != FORMAT_NAME or 'model' not in meta:
    raise torch_format.CheckpointError(
      cfg_path, f'not a {FORMAT_NAME} config (format={meta.get("format")!r})'
    )
  if meta.get('version') != FORMAT_VERSION:
    raise torch_format.CheckpointError(cfg_path, f'unsupported version {meta.get("version")!r}')
  return meta


def read_msgpack(path: str) -> dict:
  try:
    with open(path, 'rb') as f:
      tree = serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several types on truncated data
    raise torch_format.CheckpointError(
      path, f'unreadable or truncated msgpack: {type(e).__name__}: {e}'
    ) from e
  if not isinstance(tree, Mapping):
    raise torch_format.CheckpointError(
      path, f'expected a dict of arrays, got {type(tree).__name__}'
    )
  return tree


def load_converted(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  meta = read_converted_meta(path)
  cfg = architecture.config_from_json(meta['model'])
  var_path = os.path.join(path, VARIABLES_FILE)
  flat = torch_format.flatten_tree(read_msgpack(var_path))
  expected = architecture.expected_shapes(cfg)
  unknown = ['/'.join(p) for p in flat if p not in expected]
  if unknown:
    raise torch_format.UnknownKeysError(var_path, unknown)
  missing = ['/'.join(p) for p in expected if p not in flat]
  if missing:
    raise torch_format.MissingKeysError(var_path, missing)
  bad = [
    ('/'.join(p), expected[p], tuple(np.shape(v)))
    for p, v in flat.items()
    if tuple(np.shape(v)) != tuple(expected[p])
  ]
  if bad:
    raise torch_format.ShapeMismatchError(var_path, bad)
  return cfg, torch_format.unflatten_tree(flat)
