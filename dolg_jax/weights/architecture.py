"""The DOLG architecture of a checkpoint: inferred from torch keys, or stored as JSON.

`infer_model_config(sd)` reads from an official state dict the depth (50/101/152 from the blocks per
stage, else explicit `stage_depths`), the stem width, whether the local branch, multi-atrous
(`localmodel.aspp.*`) and learnable GeM p (`pool_g.p`) are present, and the widths of f_g, f_l, the
atrous convolutions and the descriptor; it raises `torch_format.CheckpointError` for a state dict it
cannot map. `expected_shapes(cfg)` gives the Flax variable path -> shape map of the model `cfg`
describes, without computation. `default_model_config()` is the released-checkpoint architecture.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dolg_jax import defaults
from dolg_jax import models
from dolg_jax.weights import torch_format

DEPTH_FROM_BLOCKS = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}


# --------------------------------------------------------------------------- architecture inference
def _block_counts(sd: Mapping[str, Any], prefix: str) -> tuple[int, ...]:
  counts = []
  for i in range(1, 5):
    pattern = re.compile(rf'{re.escape(prefix)}s{i}\.b(\d+)\.')
    blocks = {int(m.group(1)) for k in sd for m in [pattern.match(k)] if m}
    counts.append(max(blocks) if blocks else 0)
  return tuple(counts)


def infer_backbone(
  sd: Mapping[str, np.ndarray], source: Any, prefix: str = ''
) -> tuple[int, int, tuple[int, ...]]:
  """(depth, width, stage_depths) of a pycls-keyed ResNet under `prefix`.

  stage_depths is () for the standard depths (50, 101, 152) and the block counts otherwise (then
  depth is 50 and ignored by the model); a stage without blocks raises CheckpointError.
  """
  width = int(torch_format.require_key(sd, f'{prefix}stem.conv.weight', source).shape[0])
  counts = _block_counts(sd, prefix)
  if counts in DEPTH_FROM_BLOCKS:
    return DEPTH_FROM_BLOCKS[counts], width, ()
  if min(counts) < 1:
    raise torch_format.CheckpointError(
      source,
      f'cannot infer the ResNet: blocks per stage {counts} (keys {prefix}s1..s4.bK); '
      'every stage needs at least one block',
    )
  return 50, width, counts


def default_model_config() -> ml_collections.ConfigDict:
  """The released-checkpoint architecture (R50, no multi-atrous, learnable p) with paper widths:
  configs/default.py's model section (the paper's) with those two changes."""
  m = ml_collections.ConfigDict(defaults.model_defaults())
  m.use_multi_atrous = False
  m.gem_p_learnable = True
  return m


def infer_model_config(
  sd: Mapping[str, np.ndarray], source: Any = '<state dict>'
) -> ml_collections.ConfigDict:
  """The model config of an official DOLG state dict (keys without `module.`)."""
  if not any(k.startswith('globalmodel.') for k in sd):
    hint = (
      ' (it looks like an ImageNet backbone: use pretrained.load_backbone)'
      if any(k.startswith(('stem.', 'conv1.', 'layer1.')) for k in sd)
      else ''
    )
    raise torch_format.CheckpointError(
      source,
      f'not a DOLG state dict: no "globalmodel.*" keys{hint}; '
      f'first keys: {torch_format.format_keys(list(sd), 5)}',
    )
  m = default_model_config()
  m.depth, m.width, m.stage_depths = infer_backbone(sd, source, 'globalmodel.')
  m.global_dim = int(torch_format.require_key(sd, 'fc_t.weight', source).shape[0])
  m.embedding_dim = int(torch_format.require_key(sd, 'fc.weight', source).shape[0])
  m.gem_p_learnable = 'pool_g.p' in sd
  if m.gem_p_learnable:
    m.gem_p = float(np.asarray(sd['pool_g.p']).reshape(-1)[0])
  m.use_local_branch = any(k.startswith('localmodel.') for k in sd)
  m.use_multi_atrous = any(k.startswith('localmodel.aspp.') for k in sd)
  if m.use_local_branch:
    m.local_dim = int(torch_format.require_key(sd, 'localmodel.conv1.weight', source).shape[0])
  if m.use_multi_atrous:
    atrous0 = torch_format.require_key(sd, 'localmodel.aspp.aspp.0.weight', source)
    m.atrous_dim = int(atrous0.shape[0])
    n_atrous = len({k.split('.')[3] for k in sd if k.startswith('localmodel.aspp.aspp.')}) - 1
    if n_atrous != len(m.atrous_rates):
      raise torch_format.CheckpointError(
        source,
        f'{n_atrous} dilated multi-atrous convolutions '
        f'(localmodel.aspp.aspp.1..); only the official 3 (rates 6, 12, 18) '
        f'can be imported',
      )
  return m


# ------------------------------------------------------------------------------------ model side
def build_model(cfg: ml_collections.ConfigDict, dtype: Any = jnp.float32):
  return models.build_model(cfg, dtype)


@functools.lru_cache(maxsize=16)
def _expected_shapes_cached(cfg_json: str) -> tuple[tuple[torch_format.Path, tuple], ...]:
  cfg = config_from_json(json.loads(cfg_json))
  model = build_model(cfg)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return tuple((p, tuple(v.shape)) for p, v in torch_format.flatten_tree(shapes).items())


def expected_shapes(cfg: ml_collections.ConfigDict) -> dict[torch_format.Path, tuple]:
  """Flax variable path -> shape of the model built from `cfg` (no computation)."""
  return dict(_expected_shapes_cached(json.dumps(config_to_json(cfg), sort_keys=True)))


def config_to_json(cfg: ml_collections.ConfigDict) -> dict:
  return json.loads(cfg.to_json())


def config_from_json(d: Mapping) -> ml_collections.ConfigDict:
  m = default_model_config()
  m.update({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
  return m


def to_jax(tree):
  return jax.tree.map(jnp.asarray, tree)
