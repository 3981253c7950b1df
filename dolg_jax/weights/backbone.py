"""ImageNet initialisation: backbone weights from pycls, torchvision or DOLG checkpoints.

`load_backbone(path)` reads a pycls `R-50-1x64d` / `R-101-1x64d` checkpoint, a torchvision
ResNet-50/101 state dict, the backbone of a DOLG checkpoint or a converted directory, and returns
{'params': {'globalmodel': ...}, 'batch_stats': ...}; `merge_backbone(variables, backbone)` puts it
into freshly initialised model variables. Failures raise `torch_format.CheckpointError` (or its
key and shape kinds, naming the keys as the file does). Design notes: docs/design_notes.md.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from dolg_jax.weights import architecture
from dolg_jax.weights import converted
from dolg_jax.weights import torch_format

# --------------------------------------------------------------------------------- ImageNet init
_TV_BLOCK = {
  'conv1': 'f.a',
  'conv2': 'f.b',
  'conv3': 'f.c',
  'bn1': 'f.a_bn',
  'bn2': 'f.b_bn',
  'bn3': 'f.c_bn',
  'downsample.0': 'proj',
  'downsample.1': 'bn',
}


def torchvision_to_pycls_key(key: str) -> str | None:
  """torchvision ResNet key -> pycls key; None for the classifier (`fc.*`)."""
  if key.startswith('fc.'):
    return None
  if key.startswith('conv1.'):
    return 'stem.conv.' + key[len('conv1.') :]
  if key.startswith('bn1.'):
    return 'stem.bn.' + key[len('bn1.') :]
  m = re.match(r'layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.\d)\.(.+)$', key)
  if not m or m.group(3) not in _TV_BLOCK:
    return key  # reported as unknown later
  return f's{m.group(1)}.b{int(m.group(2)) + 1}.{_TV_BLOCK[m.group(3)]}.{m.group(4)}'


def pycls_to_torchvision_key(key: str) -> str:
  """Inverse of `torchvision_to_pycls_key` (for messages)."""
  m = re.match(r'stem\.(conv|bn)\.(.+)$', key)
  if m:
    return f'{"conv1" if m.group(1) == "conv" else "bn1"}.{m.group(2)}'
  inverse = {v: k for k, v in _TV_BLOCK.items()}
  m = re.match(r's(\d+)\.b(\d+)\.(f\.\w+|proj|bn)\.(.+)$', key)
  if not m or m.group(3) not in inverse:
    return key
  return f'layer{m.group(1)}.{int(m.group(2)) - 1}.{inverse[m.group(3)]}.{m.group(4)}'


def _backbone_expected(
  depth: int, width: int, stage_depths: tuple[int, ...]
) -> dict[torch_format.Path, tuple]:
  cfg = architecture.default_model_config()
  cfg.depth, cfg.width, cfg.stage_depths = depth, width, tuple(stage_depths)
  cfg.local_dim = cfg.global_dim = 16 * width
  return {p: s for p, s in architecture.expected_shapes(cfg).items() if p[1] == 'globalmodel'}


def load_backbone(path: str | os.PathLike) -> dict:
  """ImageNet (or DOLG) backbone weights as {'params': {'globalmodel': ...}, 'batch_stats': ...}.

  Reads pycls (`stem.*`, `s{i}.b{j}.*`; `head.*` ignored; stem channels reversed), torchvision
  (`conv1`, `layer{i}.*`; `fc.*` ignored; used as is), DOLG (`globalmodel.*` only) or a converted
  directory; depth and width come from the keys. Raises CheckpointError (or its key/shape kinds).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    _, variables = (
      converted.load_converted(path) if converted.is_converted_dir(path) else (None, None)
    )
    if variables is None:
      raise torch_format.CheckpointError(path, f'a directory without {converted.CONFIG_FILE}')
    return architecture.to_jax({c: {'globalmodel': t['globalmodel']} for c, t in variables.items()})
  sd = torch_format.read_torch_state_dict(path)
  if any(k.startswith('globalmodel.') for k in sd):
    kind, reverse = 'dolg', True
    sd = {k[len('globalmodel.') :]: v for k, v in sd.items() if k.startswith('globalmodel.')}
  elif 'conv1.weight' in sd or any(k.startswith('layer1.') for k in sd):
    kind, reverse = 'torchvision', False
    renamed = {}
    for k, v in sd.items():
      new = torchvision_to_pycls_key(k)
      if new is not None:
        renamed[new] = v
    sd = renamed
  elif 'stem.conv.weight' in sd:
    kind, reverse = 'pycls', True
    sd = {k: v for k, v in sd.items() if not k.startswith('head.')}
  else:
    raise torch_format.CheckpointError(
      path,
      'not a ResNet backbone state dict (pycls `stem.*`, torchvision `conv1.*` or DOLG '
      f'`globalmodel.*`); first keys: {torch_format.format_keys(list(sd), 5)}',
    )
  depth, width, stage_depths = architecture.infer_backbone(sd, path)
  sd = {'globalmodel.' + k: v for k, v in sd.items()}
  try:
    variables = torch_format.state_dict_to_variables(
      sd, _backbone_expected(depth, width, stage_depths), source=path, reverse_bgr=reverse
    )
  except (
    torch_format.UnknownKeysError,
    torch_format.MissingKeysError,
    torch_format.ShapeMismatchError,
  ) as e:
    # Name the keys as the file does (the mapping above prefixed/renamed them).
    def name(k: str) -> str:
      k = k[len('globalmodel.') :]
      return {'dolg': 'globalmodel.' + k, 'pycls': k}.get(kind) or pycls_to_torchvision_key(k)

    if isinstance(e, torch_format.ShapeMismatchError):
      raise torch_format.ShapeMismatchError(
        path, [(name(k), a, b) for k, a, b in e.mismatches]
      ) from e
    raise type(e)(path, [name(k) for k in e.keys]) from e
  return architecture.to_jax(variables)


def merge_backbone(variables: Mapping, backbone: Mapping) -> dict:
  """A copy of `variables` with every leaf present in `backbone` replaced (shapes must agree)."""
  flat = torch_format.flatten_tree(variables)
  bad_path, bad_shape = [], []
  for p, v in torch_format.flatten_tree(backbone).items():
    if p not in flat:
      bad_path.append('/'.join(p))
    elif tuple(np.shape(flat[p])) != tuple(np.shape(v)):
      bad_shape.append(('/'.join(p), tuple(np.shape(flat[p])), tuple(np.shape(v))))
    else:
      flat[p] = jnp.asarray(v, dtype=jnp.result_type(flat[p]))
  if bad_path:
    raise torch_format.UnknownKeysError('<backbone>', bad_path)
  if bad_shape:
    raise torch_format.ShapeMismatchError('<backbone>', bad_shape)
  return torch_format.unflatten_tree(flat)
