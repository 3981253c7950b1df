"""Released DOLG weights -> (model, variables): `load(path)`, plus the model config and margin head.

`load(path, dtype=, allow_pickle=)` reads the official pycls container `.pyth` ({"model_state",
...}) or a raw torch state dict `.pth` (DataParallel's `module.` prefix allowed), both with torch,
or a `python -m dolg_jax.convert` directory (dolg_jax.weights.converted) without torch; the
architecture is inferred from the keys (weights.architecture). `model.apply(variables,
rgb_images)` gives the official `global_feature` of the same images. `load_config` gives the
inferred model config, `load_head` the margin head, `convert_file` writes a converted directory.
Failures raise `torch_format.CheckpointError` (or one of its kinds). Design notes:
docs/design_notes.md.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dolg_jax.weights import architecture
from dolg_jax.weights import converted
from dolg_jax.weights import torch_format


# ----------------------------------------------------------------------------------- public API
def load_state_dict(
  path: str | os.PathLike, *, allow_pickle: bool = False
) -> torch_format.StateDict:
  """The torch state dict (numpy values, no `module.` prefix) of a `.pth`/`.pyth` file."""
  return torch_format.read_torch_state_dict(path, allow_pickle=allow_pickle)


def convert_state_dict(
  sd: torch_format.StateDict, source: Any = '<state dict>'
) -> tuple[ml_collections.ConfigDict, dict, dict | None]:
  """(model config, variables {'params','batch_stats'} as numpy, head or None) of a state dict."""
  cfg = architecture.infer_model_config(sd, source)
  head_sd = {k: v for k, v in sd.items() if k.startswith('desc_cls.')}
  body = {k: v for k, v in sd.items() if not k.startswith('desc_cls.')}
  variables = torch_format.state_dict_to_variables(
    body, architecture.expected_shapes(cfg), source=source
  )
  variables.setdefault('batch_stats', {})
  head = None
  if head_sd:
    unknown = sorted(set(head_sd) - {'desc_cls.weight', 'desc_cls.t'})
    if unknown:
      raise torch_format.UnknownKeysError(source, unknown)
    weight = torch_format.require_key(head_sd, 'desc_cls.weight', source)
    if weight.ndim != 2 or weight.shape[1] != cfg.embedding_dim:
      raise torch_format.ShapeMismatchError(
        source, [('desc_cls.weight', ('num_classes', cfg.embedding_dim), tuple(weight.shape))]
      )
    head = {'weight': np.asarray(weight, np.float32)}
    if 'desc_cls.t' in head_sd:
      head['t'] = np.asarray(head_sd['desc_cls.t'], np.float32).reshape(())
  return cfg, variables, head


def load(path: str | os.PathLike, *, dtype: Any = jnp.float32, allow_pickle: bool = False):
  """(model, variables) of a released DOLG checkpoint (.pyth/.pth) or a converted directory.

  `model.apply(variables, images)` with float32 RGB images in [0, 255] (N, H, W, 3) returns the
  official (N, 512) `global_feature` (before L2 normalisation). `dtype` is the model's compute
  dtype (e.g. 'bfloat16'); variables stay float32. `allow_pickle`: see
  `torch_format.read_torch_state_dict`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if not converted.is_converted_dir(path):
      raise torch_format.CheckpointError(
        path,
        f'a directory without {converted.CONFIG_FILE}: not written by python -m dolg_jax.convert',
      )
    cfg, variables = converted.load_converted(path)
  else:
    cfg, variables, _ = convert_state_dict(
      torch_format.read_torch_state_dict(path, allow_pickle=allow_pickle), path
    )
  return architecture.build_model(cfg, dtype), architecture.to_jax(variables)


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """The inferred model config of a checkpoint (file or converted directory)."""
  path = os.fspath(path)
  if converted.is_converted_dir(path):
    return architecture.config_from_json(converted.read_converted_meta(path)['model'])
  return architecture.infer_model_config(torch_format.read_torch_state_dict(path), path)


def load_head(path: str | os.PathLike) -> dict | None:
  """The margin head {'weight': (num_classes, dim), 't': ()} of a checkpoint, or None if absent.

  `weight` is in the layout of dolg_jax.models.margins (class dimension first, like torch);
  `t` is CurricularFace's EMA statistic (absent in checkpoints without it).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    meta = converted.read_converted_meta(path)
    if not meta.get('has_head'):
      return None
    head = converted.read_msgpack(os.path.join(path, converted.HEAD_FILE))
    return {k: jnp.asarray(v) for k, v in head.items()}
  _, _, head = convert_state_dict(torch_format.read_torch_state_dict(path), path)
  return None if head is None else {k: jnp.asarray(v) for k, v in head.items()}


def convert_file(
  input_path: str,
  output_dir: str,
  *,
  include_head: bool = True,
  overwrite: bool = False,
  allow_pickle: bool = False,
) -> dict:
  """Converts `input_path` into `output_dir`; returns a summary dict (config, counts)."""
  if os.path.exists(os.path.join(output_dir, converted.CONFIG_FILE)) and not overwrite:
    raise FileExistsError(f'{output_dir} already holds a converted checkpoint; pass --overwrite')
  sd = torch_format.read_torch_state_dict(input_path, allow_pickle=allow_pickle)
  cfg, variables, head = convert_state_dict(sd, input_path)
  converted.save_converted(
    output_dir, cfg, variables, head if include_head else None, source=os.path.abspath(input_path)
  )
  n_params = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(variables['params']))
  return {
    'model': cfg.to_dict(),
    'num_params': n_params,
    'head_shape': None if head is None or not include_head else tuple(head['weight'].shape),
  }
